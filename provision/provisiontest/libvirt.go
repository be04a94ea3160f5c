// Package provisiontest is a stateful in-memory libvirt for tests, in the manner of
// net/http/httptest: domains and volumes in maps, the XML it is given parsed, the error
// values real libvirt returns, failures injected at any call, and a guest agent in every
// running domain whose scripts are Go functions.
package provisiontest

import (
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Template is a template domain to define in the fake: "tmpl", with one qcow2 disk
// (vda, /t/root.qcow2) and the guest agent channel.
const Template = `<domain type='qemu'><name>tmpl</name><memory unit='KiB'>262144</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/t/root.qcow2'/><target dev='vda' bus='virtio'/></disk>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>`

// TemplatePool holds the template's disk, /t/root.qcow2, as a pool that knows its size
// and change time (what a warm image's name depends on). State leaves it out.
const TemplatePool = "t"

const templateDisk = `<volume><name>root.qcow2</name><capacity unit='bytes'>1073741824</capacity>
<target><path>/t/root.qcow2</path><format type='qcow2'/><timestamps><mtime>1764000000.0</mtime></timestamps></target></volume>`

// Libvirt is a stateful in-memory libvirt: domains and volumes in maps, the XML it is
// given parsed, and the error values real libvirt returns.
type Libvirt struct {
	mu      sync.Mutex
	domains map[string]*domain
	pools   map[string]map[string]string // pool -> volume -> volume XML
	// failures to inject, by method name
	fail     map[string]error
	nth      map[string]nth
	count    map[string]int
	calls    []string
	agentLog []string          // guest agent commands, by name
	data     map[string][]byte // pool/volume -> its content, where something wrote it
	job      JobFunc
	// system is what the guests' systemd says of their boot ("" for no systemd); nics
	// the guests' NICs that have no address.
	system, failed string
	noAddress      map[string]bool
	macs           int // MAC addresses given out
	// gates hold a call, by method name, until the channel is closed; entered gets the
	// method's name when such a call arrives. The call then completes in the fake libvirtd
	// whatever became of the client, as in libvirtd.
	gates   map[string]chan struct{}
	entered chan string
	dropped chan struct{} // closed when the client drops its connection
	drop    func()
}

type domain struct {
	xml     string
	running bool
	paused  bool
	guest   *guest // while it runs
}

func New(pools ...string) *Libvirt {
	f := &Libvirt{domains: map[string]*domain{}, pools: map[string]map[string]string{}, fail: map[string]error{},
		gates: map[string]chan struct{}{}, data: map[string][]byte{}, nth: map[string]nth{}, count: map[string]int{}, entered: make(chan string, 16)}
	f.Reconnect()
	f.pools[TemplatePool] = map[string]string{"root.qcow2": templateDisk}
	for _, p := range pools {
		f.pools[p] = map[string]string{}
	}
	return f
}

func lverr(code libvirt.ErrorNumber, format string, args ...any) error {
	return libvirt.Error{Code: uint32(code), Message: fmt.Sprintf(format, args...)}
}

// enter records a call and returns the failure injected for it, if any.
func (f *Libvirt) enter(method string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, method)
	f.count[method]++
	if n, ok := f.nth[method]; ok && n.n == f.count[method] {
		return n.err
	}
	return f.fail[method]
}

type nth struct {
	n   int
	err error
}

// FailNth makes only the nth call (from 1) of method fail with err.
func (f *Libvirt) FailNth(method string, n int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nth[method] = nth{n, err}
}

// Fail makes every call of method fail with err from now on (nil: succeed again).
func (f *Libvirt) Fail(method string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.fail, method)
		return
	}
	f.fail[method] = err
}

// Calls lists the calls made so far, by method name, in order.
func (f *Libvirt) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// Gate holds every call of method until the returned channel is closed; Entered reports
// each such call as it arrives. The call still completes in the fake libvirtd when the
// gate opens, whatever became of the client, as in libvirtd.
func (f *Libvirt) Gate(method string) chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := make(chan struct{})
	f.gates[method] = g
	return g
}

// Entered receives the method name of each gated call as it arrives.
func (f *Libvirt) Entered() <-chan string { return f.entered }

// Drop is the client dropping its connection: calls in flight return ErrInterrupted.
func (f *Libvirt) Drop() {
	f.mu.Lock()
	drop := f.drop
	f.mu.Unlock()
	drop()
}

// Dropped is closed once the client has dropped its connection.
func (f *Libvirt) Dropped() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dropped
}

// call runs op, a call to the fake libvirtd. A client that has dropped its connection
// gets libvirt.ErrInterrupted, as from go-libvirt. A gated call waits for its gate in
// libvirtd; a client that drops meanwhile gets ErrInterrupted at once, and op still runs
// when the gate opens.
func (f *Libvirt) call(method string, op func() error) error {
	f.mu.Lock()
	gate, dropped := f.gates[method], f.dropped
	f.mu.Unlock()
	select {
	case <-dropped:
		return libvirt.ErrInterrupted
	default:
	}
	if gate == nil {
		return op()
	}
	f.entered <- method
	done := make(chan error, 1)
	go func() {
		<-gate
		done <- op()
	}()
	select {
	case err := <-done:
		return err
	case <-dropped:
		return libvirt.ErrInterrupted
	}
}

// Reconnect is a new client connection to the same fake libvirtd.
func (f *Libvirt) Reconnect() {
	f.mu.Lock()
	defer f.mu.Unlock()
	dropped := make(chan struct{})
	f.dropped, f.drop = dropped, sync.OnceFunc(func() { close(dropped) })
}

func (f *Libvirt) DomainLookupByName(name string) (libvirt.Domain, error) {
	if err := f.enter("DomainLookupByName"); err != nil {
		return libvirt.Domain{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.domains[name]; !ok {
		return libvirt.Domain{}, lverr(libvirt.ErrNoDomain, "Domain not found: no domain with matching name '%s'", name)
	}
	return libvirt.Domain{Name: name}, nil
}

func (f *Libvirt) dom(d libvirt.Domain) (*domain, error) {
	fd, ok := f.domains[d.Name]
	if !ok {
		return nil, lverr(libvirt.ErrNoDomain, "Domain not found: '%s'", d.Name)
	}
	return fd, nil
}

func (f *Libvirt) DomainGetXMLDesc(d libvirt.Domain, _ libvirt.DomainXMLFlags) (string, error) {
	if err := f.enter("DomainGetXMLDesc"); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return "", err
	}
	return fd.xml, nil
}

func (f *Libvirt) DomainGetState(d libvirt.Domain, _ uint32) (int32, int32, error) {
	if err := f.enter("DomainGetState"); err != nil {
		return 0, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return 0, 0, err
	}
	switch {
	case fd.running && fd.paused:
		return int32(libvirt.DomainPaused), 1, nil
	case fd.running:
		return int32(libvirt.DomainRunning), 1, nil
	}
	return int32(libvirt.DomainShutoff), 0, nil
}

func (f *Libvirt) DomainGetMetadata(d libvirt.Domain, typ int32, uri libvirt.OptString, _ libvirt.DomainModificationImpact) (string, error) {
	if err := f.enter("DomainGetMetadata"); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return "", err
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(fd.xml); err != nil {
		return "", err
	}
	if typ != int32(libvirt.DomainMetadataElement) || len(uri) != 1 {
		return "", lverr(libvirt.ErrInvalidArg, "bad metadata request")
	}
	if dom.Metadata != nil {
		// The element in that namespace: the one whose prefix is bound to uri.
		re := regexp.MustCompile(`(?s)<(\w+):(\w+)\s+xmlns:(\w+)="` + regexp.QuoteMeta(uri[0]) + `".*?</(\w+):(\w+)>`)
		if m := re.FindString(dom.Metadata.XML); m != "" {
			return m, nil
		}
	}
	return "", lverr(libvirt.ErrNoDomainMetadata, "metadata not found: Requested metadata element is not present")
}

func (f *Libvirt) DomainDefineXMLFlags(x string, fl libvirt.DomainDefineFlags) (d libvirt.Domain, err error) {
	if err := f.enter("DomainDefineXMLFlags"); err != nil {
		return libvirt.Domain{}, err
	}
	err = f.call("DomainDefineXMLFlags", func() (err error) {
		d, err = f.define(x, fl)
		return err
	})
	return d, err
}

func (f *Libvirt) define(x string, _ libvirt.DomainDefineFlags) (libvirt.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return libvirt.Domain{}, lverr(libvirt.ErrXMLError, "%v", err)
	}
	if _, ok := f.domains[dom.Name]; ok {
		return libvirt.Domain{}, lverr(libvirt.ErrOperationFailed, "domain '%s' already exists", dom.Name)
	}
	// As libvirt does, each NIC without a MAC address gets one.
	if dom.Devices != nil {
		changed := false
		for i := range dom.Devices.Interfaces {
			if iface := &dom.Devices.Interfaces[i]; iface.MAC == nil {
				f.macs++
				iface.MAC = &libvirtxml.DomainInterfaceMAC{Address: fmt.Sprintf("52:54:00:fa:%02x:%02x", f.macs>>8&0xff, f.macs&0xff)}
				changed = true
			}
		}
		if changed {
			if nx, err := dom.Marshal(); err == nil {
				x = nx
			}
		}
	}
	f.domains[dom.Name] = &domain{xml: x}
	return libvirt.Domain{Name: dom.Name}, nil
}

func (f *Libvirt) DomainCreate(d libvirt.Domain) error {
	if err := f.enter("DomainCreate"); err != nil {
		return err
	}
	return f.call("DomainCreate", func() error { return f.start(d) })
}

func (f *Libvirt) start(d libvirt.Domain) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return err
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(fd.xml); err != nil {
		return err
	}
	if dom.Devices == nil {
		dom.Devices = &libvirtxml.DomainDeviceList{}
	}
	for _, disk := range dom.Devices.Disks { // like QEMU: every volume must exist
		if disk.Source == nil {
			continue
		}
		if v := disk.Source.Volume; v != nil {
			if _, ok := f.pools[v.Pool][v.Volume]; !ok {
				return lverr(libvirt.ErrNoStorageVol, "Storage volume not found: no storage vol with matching name '%s'", v.Volume)
			}
		}
	}
	fd.running = true
	return nil
}

func (f *Libvirt) DomainDestroyFlags(d libvirt.Domain, _ libvirt.DomainDestroyFlagsValues) error {
	if err := f.enter("DomainDestroyFlags"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return err
	}
	if !fd.running {
		return lverr(libvirt.ErrOperationInvalid, "Requested operation is not valid: domain is not running")
	}
	fd.running, fd.paused, fd.guest = false, false, nil
	return nil
}

func (f *Libvirt) DomainUndefineFlags(d libvirt.Domain, _ libvirt.DomainUndefineFlagsValues) error {
	if err := f.enter("DomainUndefineFlags"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return err
	}
	if fd.running {
		return lverr(libvirt.ErrOperationInvalid, "cannot undefine a running domain in this fake")
	}
	delete(f.domains, d.Name)
	return nil
}

func (f *Libvirt) StoragePoolLookupByName(name string) (libvirt.StoragePool, error) {
	if err := f.enter("StoragePoolLookupByName"); err != nil {
		return libvirt.StoragePool{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[name]; !ok {
		return libvirt.StoragePool{}, lverr(libvirt.ErrNoStoragePool, "Storage pool not found: no storage pool with matching name '%s'", name)
	}
	return libvirt.StoragePool{Name: name}, nil
}

func (f *Libvirt) StorageVolCreateXML(p libvirt.StoragePool, x string, fl libvirt.StorageVolCreateFlags) (v libvirt.StorageVol, err error) {
	if err := f.enter("StorageVolCreateXML"); err != nil {
		return libvirt.StorageVol{}, err
	}
	err = f.call("StorageVolCreateXML", func() (err error) {
		v, err = f.createVol(p, x, fl)
		return err
	})
	return v, err
}

func (f *Libvirt) createVol(p libvirt.StoragePool, x string, _ libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var v libvirtxml.StorageVolume
	if err := v.Unmarshal(x); err != nil {
		return libvirt.StorageVol{}, lverr(libvirt.ErrXMLError, "%v", err)
	}
	if _, ok := f.pools[p.Name][v.Name]; ok {
		return libvirt.StorageVol{}, lverr(libvirt.ErrStorageVolExist, "storage volume '%s' exists already", v.Name)
	}
	f.pools[p.Name][v.Name] = x
	return libvirt.StorageVol{Pool: p.Name, Name: v.Name}, nil
}

// StorageVolUpload writes length bytes of r into the volume at offset.
func (f *Libvirt) StorageVolUpload(v libvirt.StorageVol, r io.Reader, offset, length uint64, _ libvirt.StorageVolUploadFlags) error {
	if err := f.enter("StorageVolUpload"); err != nil {
		return err
	}
	b, err := io.ReadAll(io.LimitReader(r, int64(length)))
	if err != nil {
		return lverr(libvirt.ErrInternalError, "upload: %v", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[v.Pool][v.Name]; !ok {
		return lverr(libvirt.ErrNoStorageVol, "Storage volume not found: '%s'", v.Name)
	}
	key := v.Pool + "/" + v.Name
	d := f.data[key]
	if end := int(offset) + len(b); end > len(d) {
		d = append(d, make([]byte, end-len(d))...)
	}
	copy(d[offset:], b)
	f.data[key] = d
	return nil
}

// StoragePoolListAllVolumes lists the pool's volumes, by name.
func (f *Libvirt) StoragePoolListAllVolumes(p libvirt.StoragePool, _ int32, _ uint32) ([]libvirt.StorageVol, uint32, error) {
	if err := f.enter("StoragePoolListAllVolumes"); err != nil {
		return nil, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	vols, ok := f.pools[p.Name]
	if !ok {
		return nil, 0, lverr(libvirt.ErrNoStoragePool, "Storage pool not found: no storage pool with matching name '%s'", p.Name)
	}
	var out []libvirt.StorageVol
	for n := range vols {
		out = append(out, libvirt.StorageVol{Pool: p.Name, Name: n})
	}
	slices.SortFunc(out, func(a, b libvirt.StorageVol) int { return strings.Compare(a.Name, b.Name) })
	return out, uint32(len(out)), nil
}

func (f *Libvirt) StorageVolLookupByName(p libvirt.StoragePool, name string) (libvirt.StorageVol, error) {
	if err := f.enter("StorageVolLookupByName"); err != nil {
		return libvirt.StorageVol{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[p.Name][name]; !ok {
		return libvirt.StorageVol{}, lverr(libvirt.ErrNoStorageVol, "Storage volume not found: no storage vol with matching name '%s'", name)
	}
	return libvirt.StorageVol{Pool: p.Name, Name: name}, nil
}

func (f *Libvirt) StorageVolDelete(v libvirt.StorageVol, _ libvirt.StorageVolDeleteFlags) error {
	if err := f.enter("StorageVolDelete"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[v.Pool][v.Name]; !ok {
		return lverr(libvirt.ErrNoStorageVol, "Storage volume not found: '%s'", v.Name)
	}
	delete(f.pools[v.Pool], v.Name)
	delete(f.data, v.Pool+"/"+v.Name)
	return nil
}

// State summarises what exists, for assertions on end state.
func (f *Libvirt) State() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var parts []string
	for n, d := range f.domains {
		parts = append(parts, fmt.Sprintf("domain %s running=%v", n, d.running))
	}
	for p, vols := range f.pools {
		if p == TemplatePool {
			continue // the templates' disks, not what a test makes
		}
		for v := range vols {
			parts = append(parts, "volume "+p+"/"+v)
		}
	}
	slices.Sort(parts)
	return strings.Join(parts, "; ")
}

func (f *Libvirt) DomainSetMetadata(d libvirt.Domain, typ int32, metadata, key, uri libvirt.OptString, _ libvirt.DomainModificationImpact) error {
	if err := f.enter("DomainSetMetadata"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return err
	}
	if typ != int32(libvirt.DomainMetadataElement) || len(metadata) > 1 || len(key) != 1 || len(uri) != 1 {
		return lverr(libvirt.ErrInvalidArg, "bad metadata request")
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(fd.xml); err != nil {
		return err
	}
	// As libvirt does: the element gets the prefix key bound to uri, replacing any other;
	// no element removes the old one.
	el := ""
	if len(metadata) == 1 {
		el = regexp.MustCompile(`^<(\w+)>`).ReplaceAllString(metadata[0], "<"+key[0]+":$1 xmlns:"+key[0]+`="`+uri[0]+`">`)
		el = regexp.MustCompile(`</(\w+)>$`).ReplaceAllString(el, "</"+key[0]+":$1>")
	}
	if dom.Metadata == nil {
		dom.Metadata = &libvirtxml.DomainMetadata{}
	}
	old := regexp.MustCompile(`(?s)<(\w+):(\w+)\s+xmlns:(\w+)="` + regexp.QuoteMeta(uri[0]) + `".*?</(\w+):(\w+)>`)
	dom.Metadata.XML = old.ReplaceAllString(dom.Metadata.XML, "") + el
	x, err := dom.Marshal()
	if err != nil {
		return err
	}
	fd.xml = x
	return nil
}

// QEMUDomainMonitorCommand answers `info usernet` as QEMU 7.2 does for a domain with
// a user-mode network that forwards 127.0.0.1:40022 to the guest's port 22.
func (f *Libvirt) QEMUDomainMonitorCommand(d libvirt.Domain, cmd string, flags uint32) (string, error) {
	if err := f.enter("QEMUDomainMonitorCommand"); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.dom(d); err != nil {
		return "", err
	}
	if cmd != "info usernet" || flags != 1 /* VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP */ {
		return "", lverr(libvirt.ErrOperationUnsupported, "unsupported monitor command %q", cmd)
	}
	return "Hub -1 (gcissh):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n" +
		"  TCP[HOST_FORWARD]   8       127.0.0.1 40023       10.0.2.15    23     0     0\r\n" +
		"  TCP[HOST_FORWARD]   3       127.0.0.1 40022       10.0.2.15    22     0     0\r\n", nil
}

func (f *Libvirt) ConnectListAllDomains(_ int32, _ libvirt.ConnectListAllDomainsFlags) ([]libvirt.Domain, uint32, error) {
	if err := f.enter("ConnectListAllDomains"); err != nil {
		return nil, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []libvirt.Domain
	for n := range f.domains {
		out = append(out, libvirt.Domain{Name: n})
	}
	return out, uint32(len(out)), nil
}

func (f *Libvirt) DomainGetInfo(d libvirt.Domain) (uint8, uint64, uint64, uint16, uint64, error) {
	if err := f.enter("DomainGetInfo"); err != nil {
		return 0, 0, 0, 0, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return 0, 0, 0, 0, 0, err
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(fd.xml); err != nil {
		return 0, 0, 0, 0, 0, err
	}
	state := uint8(libvirt.DomainShutoff)
	if fd.running {
		state = uint8(libvirt.DomainRunning)
	}
	var mem uint64
	if dom.Memory != nil {
		mem = uint64(dom.Memory.Value)
	}
	var cpus uint16
	if dom.VCPU != nil {
		cpus = uint16(dom.VCPU.Value)
	}
	return state, mem, mem, cpus, 0, nil
}

// StorageVolLookupByPath finds a volume by its file's path (/POOL/NAME): the template
// disk /t/root.qcow2 in the pool TemplatePool, an overlay in its pool.
func (f *Libvirt) StorageVolLookupByPath(path string) (libvirt.StorageVol, error) {
	if err := f.enter("StorageVolLookupByPath"); err != nil {
		return libvirt.StorageVol{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	pool, name, ok := f.volAt(path)
	if !ok {
		return libvirt.StorageVol{}, lverr(libvirt.ErrNoStorageVol, "Storage volume not found: no storage vol with matching path '%s'", path)
	}
	return libvirt.StorageVol{Pool: pool, Name: name}, nil
}

// VolumeXML is the XML a volume was created with, or "".
func (f *Libvirt) VolumeXML(pool, name string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pools[pool][name]
}

// DeleteVolumes deletes every volume of pool behind the client's back.
func (f *Libvirt) DeleteVolumes(pool string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pools[pool] = map[string]string{}
}

// RemovePool removes pool and its volumes behind the client's back.
func (f *Libvirt) RemovePool(pool string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.pools, pool)
}
