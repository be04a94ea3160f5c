package provision

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	golibvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt/dial"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// BaseImages are the Python libvirt-gci's templates: a directory (or a storage pool) of
// disk images named <distro>.qcow2, with no domains. Each is a template with a built-in
// domain definition; the operator offers it by putting it there.
type BaseImages struct {
	// Source is an absolute directory on the libvirt host, or the name of a storage pool.
	Source  string
	CPUs    int
	Memory  uint64 // bytes
	Network string // the libvirt network of its NIC; "" for none
	// Virt is the domain type: kvm, qemu (software emulation), or "" for kvm where the
	// host's capabilities offer it.
	Virt string
}

// IsDir tells whether the images are a directory rather than a pool.
func (b BaseImages) IsDir() bool { return filepath.IsAbs(b.Source) }

// Kernel files beside an image boot it directly: images without a bootloader (the
// project's test guest, say) need them. Their names: <distro> and these suffixes.
const (
	kernelSuffix  = ".vmlinuz"
	initrdSuffix  = ".initrd"
	cmdlineSuffix = ".cmdline" // the kernel command line; "console=ttyS0" if missing
)

// baseImageXML is the domain definition of the base image name, or ErrNoTemplate.
func (h *Host) baseImageXML(ctx context.Context, conn *libvirt.Conn, name string) (string, error) {
	b := h.BaseImages
	if err := h.checkBaseImages(conn); err != nil {
		return "", err
	}
	local := dial.IsLocal(h.URI)
	path, err := b.find(conn, local, name+".qcow2")
	if err != nil {
		return "", err
	}
	if path == "" {
		return "", fmt.Errorf("template %q: %w (no domain has that name, nor is there a base image %s.qcow2 in LIBVIRT_GCI_BASE_IMAGES)", name, libvirt.ErrNoTemplate, name)
	}
	kernel, err := b.find(conn, local, name+kernelSuffix)
	if err != nil {
		return "", err
	}
	var initrd, cmdline string
	if kernel != "" {
		if initrd, err = b.find(conn, local, name+initrdSuffix); err != nil {
			return "", err
		}
		cmdline = "console=ttyS0"
		if b.IsDir() && local {
			if c, err := os.ReadFile(filepath.Join(b.Source, name+cmdlineSuffix)); err == nil {
				cmdline = strings.TrimSpace(string(c))
			}
		}
	}
	virt := b.Virt
	if virt == "" {
		virt = h.virtType(ctx, conn)
	}
	return b.domainXML(name, path, kernel, initrd, cmdline, virt)
}

// find is the path of the image file name on the libvirt host, or "" if there is none
// (local: the libvirt host is this one).
func (b BaseImages) find(conn *libvirt.Conn, local bool, name string) (string, error) {
	if b.IsDir() {
		p := filepath.Join(b.Source, name)
		if !local { // libvirt knows it only if a pool holds it
			if _, err := conn.API().StorageVolLookupByPath(p); err != nil {
				return "", nil
			}
			return p, nil
		}
		if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
			return "", nil
		}
		return p, nil
	}
	pool, err := conn.API().StoragePoolLookupByName(b.Source)
	if err != nil {
		return "", fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES pool %q: %w", b.Source, err)
	}
	vol, err := conn.API().StorageVolLookupByName(pool, name)
	if libvirt.HasCode(err, golibvirt.ErrNoStorageVol) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("base image %s in pool %s: %w", name, b.Source, err)
	}
	return conn.API().StorageVolGetPath(vol)
}

// virtType is kvm where libvirt offers it for x86_64 guests and, on a local libvirt, a
// guest ran under it (the probe), else qemu (software emulation).
func (h *Host) virtType(ctx context.Context, conn *libvirt.Conn) string {
	offered, _, err := h.kvm(ctx, conn, true)
	if !offered {
		return "qemu"
	}
	if err != nil {
		h.Log.Warn("base images run under software emulation: libvirt offers KVM, but " + err.Error() + " (set LIBVIRT_GCI_BASE_VIRT to choose)")
		return "qemu"
	}
	return "kvm"
}

// domainXML is the built-in definition: q35, a virtio disk and NIC, the agent channel, a
// virtio RNG, a serial console.
func (b BaseImages) domainXML(name, disk, kernel, initrd, cmdline, virt string) (string, error) {
	dom := libvirtxml.Domain{
		Type:        virt,
		Name:        name,
		Description: "libvirt-gci base image " + disk,
		Memory:      &libvirtxml.DomainMemory{Value: uint(b.Memory >> 10), Unit: "KiB"},
		VCPU:        &libvirtxml.DomainVCPU{Value: uint(b.CPUs)},
		OS: &libvirtxml.DomainOS{
			Type:    &libvirtxml.DomainOSType{Arch: "x86_64", Machine: "q35", Type: "hvm"},
			Kernel:  kernel,
			Initrd:  initrd,
			Cmdline: cmdline,
		},
		Features:   &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}, APIC: &libvirtxml.DomainFeatureAPIC{}},
		OnPoweroff: "destroy",
		OnReboot:   "restart",
		OnCrash:    "destroy",
		Devices: &libvirtxml.DomainDeviceList{
			Disks: []libvirtxml.DomainDisk{{
				Device: "disk",
				Driver: &libvirtxml.DomainDiskDriver{Name: "qemu", Type: "qcow2"},
				Source: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: disk}},
				Target: &libvirtxml.DomainDiskTarget{Dev: "vda", Bus: "virtio"},
			}},
			Channels: []libvirtxml.DomainChannel{{
				Source: &libvirtxml.DomainChardevSource{UNIX: &libvirtxml.DomainChardevSourceUNIX{}},
				Target: &libvirtxml.DomainChannelTarget{VirtIO: &libvirtxml.DomainChannelTargetVirtIO{Name: template.AgentChannel}},
			}},
			Serials:     []libvirtxml.DomainSerial{{Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}}}},
			RNGs:        []libvirtxml.DomainRNG{{Model: "virtio", Backend: &libvirtxml.DomainRNGBackend{Random: &libvirtxml.DomainRNGBackendRandom{Device: "/dev/urandom"}}}},
			MemBalloon:  &libvirtxml.DomainMemBalloon{Model: "none"},
			Controllers: []libvirtxml.DomainController{{Type: "usb", Model: "none"}},
		},
	}
	if kernel == "" {
		dom.OS.BootDevices = []libvirtxml.DomainBootDevice{{Dev: "hd"}}
	}
	if virt == "kvm" {
		dom.CPU = &libvirtxml.DomainCPU{Mode: "host-passthrough"}
	}
	if b.Network != "" {
		dom.Devices.Interfaces = []libvirtxml.DomainInterface{{
			Source: &libvirtxml.DomainInterfaceSource{Network: &libvirtxml.DomainInterfaceSourceNetwork{Network: b.Network}},
			Model:  &libvirtxml.DomainInterfaceModel{Type: "virtio"},
		}}
	}
	return dom.Marshal()
}

// BaseImageNames are the names of the base images there are (for template list): the
// DISTRO of each DISTRO.qcow2. A directory on a remote libvirt is listed only if a pool
// has it.
func (h *Host) BaseImageNames(conn *libvirt.Conn) ([]string, error) {
	files, err := h.baseFiles(conn, false)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, f := range files {
		if n, ok := strings.CutSuffix(f.name, ".qcow2"); ok {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	return names, nil
}

// baseFile is a file where the base images are: its name, and with paths its path on
// the libvirt host.
type baseFile struct{ name, path string }

// baseFiles lists the files where the base images are (none for a directory on a remote
// libvirt), with their paths if paths is set.
func (h *Host) baseFiles(conn *libvirt.Conn, paths bool) ([]baseFile, error) {
	b := h.BaseImages
	var files []baseFile
	switch {
	case b.Source == "":
	case b.IsDir() && dial.IsLocal(h.URI):
		entries, err := os.ReadDir(b.Source)
		if err != nil {
			return nil, fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES: %w", err)
		}
		for _, e := range entries {
			files = append(files, baseFile{e.Name(), filepath.Join(b.Source, e.Name())})
		}
	case b.IsDir():
	default:
		pool, err := conn.API().StoragePoolLookupByName(b.Source)
		if err != nil {
			return nil, fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES pool %q: %w", b.Source, err)
		}
		vols, _, err := conn.API().StoragePoolListAllVolumes(pool, 1, 0)
		if err != nil {
			return nil, fmt.Errorf("list pool %q: %w", b.Source, err)
		}
		for _, v := range vols {
			f := baseFile{name: v.Name}
			if paths {
				if f.path, err = conn.API().StorageVolGetPath(v); err != nil {
					return nil, fmt.Errorf("base image %s in pool %s: %w", v.Name, b.Source, err)
				}
			}
			files = append(files, f)
		}
	}
	return files, nil
}

// checkBaseImages refuses base images that share their directory or pool with other
// disks: there every NAME.qcow2 is a template any job may clone, so the instance pool
// (its overlays, warm images and helper disks), our own volumes, and any defined
// domain's disk must not be there. The error names the file, not its directory.
func (h *Host) checkBaseImages(conn *libvirt.Conn) error {
	b := h.BaseImages
	const own = "; base images need a directory or pool of their own, where every NAME.qcow2 is a template any job may clone"
	if !b.IsDir() && b.Source == h.Pool {
		return fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES pool %q is the instance pool (LIBVIRT_GCI_POOL)%s", b.Source, own)
	}
	files, err := h.baseFiles(conn, true)
	if err != nil {
		return err
	}
	at := map[string]string{}
	for _, f := range files {
		if strings.HasPrefix(f.name, h.Prefix) || strings.HasPrefix(f.name, "libvirt-gci-") {
			return fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES holds %s, a volume of libvirt-gci's own%s", f.name, own)
		}
		if v, err := conn.API().StorageVolLookupByPath(f.path); err == nil && v.Pool == h.Pool {
			return fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES holds %s, in the instance pool %q (LIBVIRT_GCI_POOL)%s", f.name, h.Pool, own)
		}
		at[f.path] = f.name
	}
	doms, _, err := conn.API().ConnectListAllDomains(1, 0)
	if err != nil {
		return fmt.Errorf("list domains: %w", err)
	}
	for _, d := range doms {
		x, err := conn.API().DomainGetXMLDesc(d, golibvirt.DomainXMLInactive)
		if err != nil {
			continue // gone meanwhile
		}
		var dom libvirtxml.Domain
		if dom.Unmarshal(x) != nil || dom.Devices == nil {
			continue
		}
		for _, disk := range dom.Devices.Disks {
			if disk.Source == nil || disk.Source.File == nil {
				continue
			}
			if name, ok := at[disk.Source.File.File]; ok {
				return fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES holds %s, a disk of the domain %q%s", name, d.Name, own)
			}
		}
	}
	return nil
}
