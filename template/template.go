// Package template turns a template domain's XML into the XML of a throwaway instance.
//
// It is pure: no libvirt connection, no file system. The caller decides names and
// volumes; this package decides what of the template an instance keeps.
package template

import (
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// AgentChannel is the virtio-serial port name of the QEMU guest agent.
const AgentChannel = "org.qemu.guest_agent.0"

// Disk is a writable template disk: each one gets a copy-on-write overlay in the instance.
type Disk struct {
	Target string // guest device name, e.g. "vda"; unique within a domain
	Path   string // the template's image file, the overlay's backing file
	Format string // the template image's format ("qcow2", "raw")
}

// Template is a parsed template domain.
type Template struct {
	Name     string
	HasAgent bool   // it has the org.qemu.guest_agent.0 channel
	Disks    []Disk // writable disks, in domain order
	dom      libvirtxml.Domain
}

// Parse reads a template domain's inactive XML. It fails for disks it cannot clone.
func Parse(domainXML string) (*Template, error) {
	var t Template
	if err := t.dom.Unmarshal(domainXML); err != nil {
		return nil, fmt.Errorf("parse template XML: %w", err)
	}
	t.Name = t.dom.Name
	if t.dom.Devices == nil {
		return &t, nil
	}
	for _, ch := range t.dom.Devices.Channels {
		if ch.Target != nil && ch.Target.VirtIO != nil && ch.Target.VirtIO.Name == AgentChannel {
			t.HasAgent = true
		}
	}
	for i := range t.dom.Devices.Disks {
		d := &t.dom.Devices.Disks[i]
		if !writable(d) {
			continue
		}
		target := ""
		if d.Target != nil {
			target = d.Target.Dev
		}
		if target == "" {
			return nil, fmt.Errorf("template %q: disk %d has no target device", t.Name, i)
		}
		if d.Source == nil || d.Source.File == nil || d.Source.File.File == "" {
			return nil, fmt.Errorf("template %q: disk %q is not a file-backed disk; only file disks can be cloned (mark it <readonly/> or <shareable/> to pass it through)", t.Name, target)
		}
		format := "raw" // what libvirt assumes when the driver names no type
		if d.Driver != nil && d.Driver.Type != "" {
			format = d.Driver.Type
		}
		if format != "raw" && format != "qcow2" {
			return nil, fmt.Errorf("template %q: disk %q has format %q; only qcow2 and raw can back an overlay", t.Name, target, format)
		}
		t.Disks = append(t.Disks, Disk{Target: target, Path: d.Source.File.File, Format: format})
	}
	return &t, nil
}

// writable tells whether a template disk would be written to by a guest, and so needs an
// overlay: a disk or a floppy that is not read-only, shareable or transient. CD-ROMs
// (read-only by nature), read-only and shareable disks are passed through unchanged; a
// LUN (SCSI commands passed to a host device) cannot have an overlay, and is refused
// (HostAccess).
func writable(d *libvirtxml.DomainDisk) bool {
	switch d.Device {
	case "", "disk", "floppy":
	default:
		return false
	}
	return d.ReadOnly == nil && d.Shareable == nil && d.Transient == nil
}

// Overlay names the storage volume that replaces one writable template disk.
type Overlay struct {
	Pool   string
	Volume string
}

// Instance describes the domain to make from a template.
type Instance struct {
	Name      string
	Overlays  map[string]Overlay // by disk target; one for every Template.Disks entry
	Metadata  string             // an XML element in a namespace of the caller's, added to <metadata>
	QEMUArgs  []string           // extra QEMU arguments, after any the template passes (qemu:commandline)
	CPUs      int                // virtual CPUs instead of the template's; 0 keeps them
	MemoryKiB uint64             // memory instead of the template's; 0 keeps it
	// ReadOnly are disks the instance gets besides the template's: raw, read-only,
	// shared by instances.
	ReadOnly []ReadOnlyDisk
	// Shares are host directories the instance gets (virtiofs), writable.
	Shares []Share
	// SharedMemory: the guest's memory is shared (memfd), as virtiofs needs, even without
	// Shares: a warm image whose instances get their share after the restore (ShareXML).
	SharedMemory bool
	// Warm: the instance is a warm image's (Restored): its NICs start with the link
	// down, so that no clone of it is ever on a network with its MAC address, and it gets
	// a VM generation ID, which guest kernels that know it reseed their RNG from.
	Warm bool
}

// Share is a host directory shared with the guest over virtiofs, which the guest mounts
// by its tag.
type Share struct {
	Source, Tag string
}

// ReadOnlyDisk is a raw storage volume an instance reads, found in the guest by its
// serial.
type ReadOnlyDisk struct {
	Pool, Volume string
	Serial       string
}

// CPUs is the template's number of virtual CPUs.
// VirtType is the template's domain type: kvm, qemu (software emulation), ...
func (t *Template) VirtType() string { return t.dom.Type }

func (t *Template) CPUs() int {
	if t.dom.VCPU == nil || t.dom.VCPU.Value == 0 {
		return 1
	}
	return int(t.dom.VCPU.Value)
}

// MemoryKiB is the template's memory.
func (t *Template) MemoryKiB() uint64 {
	if t.dom.Memory == nil {
		return 0
	}
	return KiB(t.dom.Memory.Value, t.dom.Memory.Unit)
}

// KiB converts a libvirt memory amount (a value and its unit) to KiB.
func KiB(v uint, unit string) uint64 {
	shift := map[string]int{"b": -10, "bytes": -10, "k": 0, "KiB": 0, "": 0, "M": 10, "MiB": 10, "G": 20, "GiB": 20, "T": 30, "TiB": 30}
	if sh, ok := shift[unit]; ok {
		if sh < 0 {
			return uint64(v) >> -sh
		}
		return uint64(v) << sh
	}
	dec := map[string]uint64{"KB": 1000, "MB": 1000 * 1000, "GB": 1000 * 1000 * 1000, "TB": 1000 * 1000 * 1000 * 1000}
	return uint64(v) * dec[unit] / 1024
}

// resize gives the instance its own size, when asked for.
func resize(dom *libvirtxml.Domain, cpus int, memKiB uint64) error {
	if cpus > 0 {
		if dom.VCPU == nil {
			dom.VCPU = &libvirtxml.DomainVCPU{}
		}
		dom.VCPU.Value = uint(cpus)
		dom.VCPU.Current = 0
		dom.VCPUs = nil
		if dom.CPU != nil && dom.CPU.Topology != nil {
			dom.CPU.Topology = &libvirtxml.DomainCPUTopology{Sockets: 1, Dies: 1, Cores: cpus, Threads: 1}
		}
	}
	if memKiB > 0 {
		if dom.CPU != nil && dom.CPU.Numa != nil && len(dom.CPU.Numa.Cell) > 0 {
			return errors.New("the template has NUMA cells, which fix its memory; a job cannot choose another size")
		}
		dom.Memory = &libvirtxml.DomainMemory{Value: uint(memKiB), Unit: "KiB"}
		dom.CurrentMemory = &libvirtxml.DomainCurrentMemory{Value: uint(memKiB), Unit: "KiB"}
	}
	return nil
}

// Render returns the instance's domain XML: the template's hardware with a new name, no
// UUID, no MAC addresses (libvirt generates fresh ones), every writable disk replaced by
// its overlay volume, no NVRAM path (libvirt makes a fresh one from the firmware's
// template), the caller's metadata element instead of the template's, and devices made
// the instance's own (see isolate).
func (t *Template) Render(inst Instance) (string, error) {
	if inst.Name == "" {
		return "", errors.New("render instance: empty name")
	}
	// Work on a deep copy: marshal and parse again, so the template stays untouched.
	src, err := t.dom.Marshal()
	if err != nil {
		return "", fmt.Errorf("render instance %q: %w", inst.Name, err)
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(src); err != nil {
		return "", fmt.Errorf("render instance %q: %w", inst.Name, err)
	}
	dom.Name = inst.Name
	dom.UUID = ""
	dom.ID = nil
	dom.GenID = nil
	if inst.Warm {
		dom.GenID = &libvirtxml.DomainGenID{}
	}
	// Clones of a template hold much the same memory, which KSM would merge across
	// instances, and so across projects: a job that times its writes learns which pages
	// another job's VM holds. No instance's memory is merged.
	if dom.MemoryBacking == nil {
		dom.MemoryBacking = &libvirtxml.DomainMemoryBacking{}
	}
	dom.MemoryBacking.MemoryNosharepages = &libvirtxml.DomainMemoryNosharepages{}
	if dom.OS != nil && dom.OS.NVRam != nil {
		dom.OS.NVRam.NVRam = ""
		dom.OS.NVRam.Source = nil
	}
	// Only the caller's metadata: the template's (its template mark, say) is not the
	// instance's.
	dom.Metadata = nil
	if inst.Metadata != "" {
		dom.Metadata = &libvirtxml.DomainMetadata{XML: inst.Metadata}
	}
	isolate(&dom)
	addPanic(&dom)
	if err := resize(&dom, inst.CPUs, inst.MemoryKiB); err != nil {
		return "", fmt.Errorf("render instance %q: %w", inst.Name, err)
	}
	if dom.Devices != nil {
		newNICs(dom.Devices, inst.Warm)
		if err := t.overlayDisks(dom.Devices, inst); err != nil {
			return "", err
		}
	}
	if err := addReadOnly(&dom, inst.ReadOnly); err != nil {
		return "", fmt.Errorf("render instance %q: %w", inst.Name, err)
	}
	if err := addShares(&dom, inst.Shares, inst.SharedMemory); err != nil {
		return "", fmt.Errorf("render instance %q: %w", inst.Name, err)
	}
	if len(inst.QEMUArgs) > 0 {
		if dom.QEMUCommandline == nil {
			dom.QEMUCommandline = &libvirtxml.DomainQEMUCommandline{}
		}
		for _, a := range inst.QEMUArgs {
			dom.QEMUCommandline.Args = append(dom.QEMUCommandline.Args, libvirtxml.DomainQEMUCommandlineArg{Value: a})
		}
	}
	out, err := dom.Marshal()
	if err != nil {
		return "", fmt.Errorf("render instance %q: %w", inst.Name, err)
	}
	return out, nil
}

// newNICs takes the template's MAC addresses and host-side names off its NICs (libvirt
// makes new ones); a warm image's NICs start with their link down (the restored clone's
// guest changes its MAC addresses first).
func newNICs(devs *libvirtxml.DomainDeviceList, warm bool) {
	for i := range devs.Interfaces {
		iface := &devs.Interfaces[i]
		iface.MAC = nil
		iface.Target = nil
		iface.Alias = nil
		if warm {
			iface.Link = &libvirtxml.DomainInterfaceLink{State: "down"}
		}
	}
}

// overlayDisks puts each writable disk on its overlay volume of inst, and checks that
// every overlay has its disk.
func (t *Template) overlayDisks(devs *libvirtxml.DomainDeviceList, inst Instance) error {
	used := map[string]bool{}
	for i := range devs.Disks {
		d := &devs.Disks[i]
		if !writable(d) {
			continue
		}
		ov, ok := inst.Overlays[d.Target.Dev]
		if !ok || ov.Pool == "" || ov.Volume == "" {
			return fmt.Errorf("render instance %q: no overlay volume for disk %q", inst.Name, d.Target.Dev)
		}
		used[d.Target.Dev] = true
		if d.Driver == nil {
			d.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu"}
		}
		d.Driver.Type = "qcow2"
		// A write the host cannot store for want of room (the file system under the
		// pool full) pauses the VM, whatever the template says: the stage sees the
		// pause and fails at once as the host's failure. Told of it instead ("report"),
		// the guest's file system fails the job's writes or waits on them for ever
		// (measured: a job's write hung until its timeout). Other I/O errors, and
		// reads, are the guest's to see. (A floppy drive has no such properties in
		// QEMU: it keeps QEMU's default.)
		if d.Device == "" || d.Device == "disk" {
			d.Driver.ErrorPolicy, d.Driver.RErrorPolicy = "enospace", "report"
		}
		d.Source = &libvirtxml.DomainDiskSource{
			Volume: &libvirtxml.DomainDiskSourceVolume{Pool: ov.Pool, Volume: ov.Volume},
		}
		// The overlay's qcow2 header names its backing file and format; a chain copied
		// from the template would describe the template, not the overlay.
		d.BackingStore = nil
		d.Alias = nil
	}
	for target := range inst.Overlays {
		if !used[target] {
			return fmt.Errorf("render instance %q: overlay for %q, which is not a writable disk of template %q", inst.Name, target, t.Name)
		}
	}
	return nil
}

// addReadOnly attaches the disks as virtio disks, on targets the template leaves free.
func addReadOnly(dom *libvirtxml.Domain, disks []ReadOnlyDisk) error {
	if len(disks) == 0 {
		return nil
	}
	if dom.Devices == nil {
		dom.Devices = &libvirtxml.DomainDeviceList{}
	}
	used := map[string]bool{}
	for _, d := range dom.Devices.Disks {
		if d.Target != nil {
			used[d.Target.Dev] = true
		}
	}
	next := 'b'
	for _, rd := range disks {
		for ; next <= 'z' && used["vd"+string(next)]; next++ {
		}
		if next > 'z' {
			return errors.New("no free virtio disk name for a read-only disk")
		}
		dev := "vd" + string(next)
		used[dev] = true
		dom.Devices.Disks = append(dom.Devices.Disks, libvirtxml.DomainDisk{
			Device:   "disk",
			Driver:   &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "raw"},
			Source:   &libvirtxml.DomainDiskSource{Volume: &libvirtxml.DomainDiskSourceVolume{Pool: rd.Pool, Volume: rd.Volume}},
			Target:   &libvirtxml.DomainDiskTarget{Dev: dev, Bus: "virtio"},
			ReadOnly: &libvirtxml.DomainDiskReadOnly{},
			Serial:   rd.Serial,
		})
	}
	return nil
}

// addShares shares the directories over virtiofs, whose daemon needs the guest's memory
// shared (memfd).
func addShares(dom *libvirtxml.Domain, shares []Share, sharedMemory bool) error {
	if len(shares) == 0 && !sharedMemory {
		return nil
	}
	mb := dom.MemoryBacking
	if mb != nil && (mb.MemoryHugePages != nil || mb.MemorySource != nil && mb.MemorySource.Type != "memfd") {
		return errors.New("the template's memory backing (huge pages, or a file) cannot be shared with virtiofs for the cache")
	}
	if mb == nil {
		mb = &libvirtxml.DomainMemoryBacking{}
		dom.MemoryBacking = mb
	}
	mb.MemorySource = &libvirtxml.DomainMemorySource{Type: "memfd"}
	mb.MemoryAccess = &libvirtxml.DomainMemoryAccess{Mode: "shared"}
	if dom.Devices == nil {
		dom.Devices = &libvirtxml.DomainDeviceList{}
	}
	for _, sh := range shares {
		dom.Devices.Filesystems = append(dom.Devices.Filesystems, shareDevice(sh))
	}
	return nil
}

func shareDevice(sh Share) libvirtxml.DomainFilesystem {
	return libvirtxml.DomainFilesystem{
		AccessMode: "passthrough",
		Driver:     &libvirtxml.DomainFilesystemDriver{Type: "virtiofs"},
		Source:     &libvirtxml.DomainFilesystemSource{Mount: &libvirtxml.DomainFilesystemSourceMount{Dir: sh.Source}},
		Target:     &libvirtxml.DomainFilesystemTarget{Dir: sh.Tag},
	}
}

// ShareXML is the device XML of the share sh, to attach to a running instance whose
// memory is shared (Instance.SharedMemory): QEMU 7.2 cannot save a virtiofs device, so
// a restored instance gets its share after its restore.
func ShareXML(sh Share) (string, error) {
	d := shareDevice(sh)
	x, err := d.Marshal()
	if err != nil {
		return "", fmt.Errorf("share %s: %w", sh.Tag, err)
	}
	return x, nil
}

// FreePCISlot is a slot on PCI bus 0 that none of the template's devices uses, for a
// device added by QEMU arguments (which libvirt does not place). It picks from the top,
// away from the slots libvirt fills from the bottom.
func (t *Template) FreePCISlot() (int, error) {
	x, err := t.dom.Marshal()
	if err != nil {
		return 0, fmt.Errorf("template %q: %w", t.Name, err)
	}
	used := map[int]bool{0: true}
	dec := xml.NewDecoder(strings.NewReader(x))
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return 0, fmt.Errorf("template %q: %w", t.Name, err)
		}
		el, ok := tok.(xml.StartElement)
		if !ok || el.Name.Local != "address" {
			continue
		}
		a := map[string]string{}
		for _, at := range el.Attr {
			a[at.Name.Local] = at.Value
		}
		if a["type"] != "pci" {
			continue
		}
		dom, _ := strconv.ParseUint(a["domain"], 0, 32)
		bus, _ := strconv.ParseUint(a["bus"], 0, 32)
		if slot, err := strconv.ParseUint(a["slot"], 0, 8); err == nil && dom == 0 && bus == 0 {
			used[int(slot)] = true
		}
	}
	for slot := 31; slot > 0; slot-- {
		if !used[slot] {
			return slot, nil
		}
	}
	return 0, fmt.Errorf("template %q: no free slot on PCI bus 0", t.Name)
}

// addPanic gives an x86 instance whose template has no panic device QEMU's pvpanic (ISA,
// as libvirt places it): a guest whose kernel panics says so, and libvirt's on_crash
// ends the VM at once, where it would otherwise spin in its panic loop until its job's
// timeout. (The guest needs the pvpanic driver, in Debian's kernels but not its cloud
// one.)
func addPanic(dom *libvirtxml.Domain) {
	if dom.Devices == nil || len(dom.Devices.Panics) > 0 || dom.OS == nil || dom.OS.Type == nil {
		return
	}
	if a := dom.OS.Type.Arch; a != "" && a != "x86_64" && a != "i686" {
		return
	}
	dom.Devices.Panics = append(dom.Devices.Panics, libvirtxml.DomainPanic{Model: "isa"})
}
