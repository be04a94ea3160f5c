package provision

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// fakeLibvirt is a stateful in-memory libvirt: domains and volumes in maps, the XML it is
// given parsed, and the error values real libvirt returns.
type fakeLibvirt struct {
	mu      sync.Mutex
	domains map[string]*fakeDomain
	pools   map[string]map[string]string // pool -> volume -> volume XML
	// failures to inject, by method name
	fail map[string]error
	// gates hold a call, by method name, until the channel is closed; entered gets the
	// method's name when such a call arrives. The call then completes in the fake libvirtd
	// whatever became of the client, as in libvirtd.
	gates   map[string]chan struct{}
	entered chan string
	dropped chan struct{} // closed when the client drops its connection
	drop    func()
}

type fakeDomain struct {
	xml     string
	running bool
}

func newFake(pools ...string) *fakeLibvirt {
	f := &fakeLibvirt{domains: map[string]*fakeDomain{}, pools: map[string]map[string]string{}, fail: map[string]error{},
		gates: map[string]chan struct{}{}, entered: make(chan string, 16)}
	f.reconnect()
	for _, p := range pools {
		f.pools[p] = map[string]string{}
	}
	return f
}

func lverr(code libvirt.ErrorNumber, format string, args ...any) error {
	return libvirt.Error{Code: uint32(code), Message: fmt.Sprintf(format, args...)}
}

func (f *fakeLibvirt) injected(method string) error { return f.fail[method] }

// call runs op, a call to the fake libvirtd. A client that has dropped its connection
// gets libvirt.ErrInterrupted, as from go-libvirt. A gated call waits for its gate in
// libvirtd; a client that drops meanwhile gets ErrInterrupted at once, and op still runs
// when the gate opens.
func (f *fakeLibvirt) call(method string, op func() error) error {
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

// reconnect is a new client connection to the same fake libvirtd.
func (f *fakeLibvirt) reconnect() {
	f.mu.Lock()
	defer f.mu.Unlock()
	dropped := make(chan struct{})
	f.dropped, f.drop = dropped, sync.OnceFunc(func() { close(dropped) })
}

func (f *fakeLibvirt) DomainLookupByName(name string) (libvirt.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.domains[name]; !ok {
		return libvirt.Domain{}, lverr(libvirt.ErrNoDomain, "Domain not found: no domain with matching name '%s'", name)
	}
	return libvirt.Domain{Name: name}, nil
}

func (f *fakeLibvirt) dom(d libvirt.Domain) (*fakeDomain, error) {
	fd, ok := f.domains[d.Name]
	if !ok {
		return nil, lverr(libvirt.ErrNoDomain, "Domain not found: '%s'", d.Name)
	}
	return fd, nil
}

func (f *fakeLibvirt) DomainGetXMLDesc(d libvirt.Domain, _ libvirt.DomainXMLFlags) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return "", err
	}
	return fd.xml, nil
}

func (f *fakeLibvirt) DomainGetState(d libvirt.Domain, _ uint32) (int32, int32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return 0, 0, err
	}
	if fd.running {
		return int32(libvirt.DomainRunning), 1, nil
	}
	return int32(libvirt.DomainShutoff), 0, nil
}

func (f *fakeLibvirt) DomainGetMetadata(d libvirt.Domain, typ int32, uri libvirt.OptString, _ libvirt.DomainModificationImpact) (string, error) {
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

func (f *fakeLibvirt) DomainDefineXMLFlags(x string, fl libvirt.DomainDefineFlags) (d libvirt.Domain, err error) {
	err = f.call("DomainDefineXMLFlags", func() (err error) {
		d, err = f.define(x, fl)
		return err
	})
	return d, err
}

func (f *fakeLibvirt) define(x string, _ libvirt.DomainDefineFlags) (libvirt.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("DomainDefineXMLFlags"); err != nil {
		return libvirt.Domain{}, err
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return libvirt.Domain{}, lverr(libvirt.ErrXMLError, "%v", err)
	}
	if _, ok := f.domains[dom.Name]; ok {
		return libvirt.Domain{}, lverr(libvirt.ErrOperationFailed, "domain '%s' already exists", dom.Name)
	}
	f.domains[dom.Name] = &fakeDomain{xml: x}
	return libvirt.Domain{Name: dom.Name}, nil
}

func (f *fakeLibvirt) DomainCreate(d libvirt.Domain) error {
	return f.call("DomainCreate", func() error { return f.start(d) })
}

func (f *fakeLibvirt) start(d libvirt.Domain) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return err
	}
	if err := f.injected("DomainCreate"); err != nil {
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

func (f *fakeLibvirt) DomainDestroyFlags(d libvirt.Domain, _ libvirt.DomainDestroyFlagsValues) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return err
	}
	if !fd.running {
		return lverr(libvirt.ErrOperationInvalid, "Requested operation is not valid: domain is not running")
	}
	fd.running = false
	return nil
}

func (f *fakeLibvirt) DomainUndefineFlags(d libvirt.Domain, _ libvirt.DomainUndefineFlagsValues) error {
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

func (f *fakeLibvirt) StoragePoolLookupByName(name string) (libvirt.StoragePool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[name]; !ok {
		return libvirt.StoragePool{}, lverr(libvirt.ErrNoStoragePool, "Storage pool not found: no storage pool with matching name '%s'", name)
	}
	return libvirt.StoragePool{Name: name}, nil
}

func (f *fakeLibvirt) StorageVolCreateXML(p libvirt.StoragePool, x string, fl libvirt.StorageVolCreateFlags) (v libvirt.StorageVol, err error) {
	err = f.call("StorageVolCreateXML", func() (err error) {
		v, err = f.createVol(p, x, fl)
		return err
	})
	return v, err
}

func (f *fakeLibvirt) createVol(p libvirt.StoragePool, x string, _ libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("StorageVolCreateXML"); err != nil {
		return libvirt.StorageVol{}, err
	}
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

func (f *fakeLibvirt) StorageVolLookupByName(p libvirt.StoragePool, name string) (libvirt.StorageVol, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[p.Name][name]; !ok {
		return libvirt.StorageVol{}, lverr(libvirt.ErrNoStorageVol, "Storage volume not found: no storage vol with matching name '%s'", name)
	}
	return libvirt.StorageVol{Pool: p.Name, Name: name}, nil
}

func (f *fakeLibvirt) StorageVolDelete(v libvirt.StorageVol, _ libvirt.StorageVolDeleteFlags) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("StorageVolDelete"); err != nil {
		return err
	}
	if _, ok := f.pools[v.Pool][v.Name]; !ok {
		return lverr(libvirt.ErrNoStorageVol, "Storage volume not found: '%s'", v.Name)
	}
	delete(f.pools[v.Pool], v.Name)
	return nil
}

// state summarises what exists, for assertions on end state.
func (f *fakeLibvirt) state() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var parts []string
	for n, d := range f.domains {
		parts = append(parts, fmt.Sprintf("domain %s running=%v", n, d.running))
	}
	for p, vols := range f.pools {
		for v := range vols {
			parts = append(parts, "volume "+p+"/"+v)
		}
	}
	slices.Sort(parts)
	return strings.Join(parts, "; ")
}

func (f *fakeLibvirt) DomainSetMetadata(d libvirt.Domain, typ int32, metadata, key, uri libvirt.OptString, _ libvirt.DomainModificationImpact) error {
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
func (f *fakeLibvirt) QEMUDomainMonitorCommand(d libvirt.Domain, cmd string, flags uint32) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.dom(d); err != nil {
		return "", err
	}
	if cmd != "info usernet" || flags != monitorHMP {
		return "", lverr(libvirt.ErrOperationUnsupported, "unsupported monitor command %q", cmd)
	}
	return "Hub -1 (gcissh):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n" +
		"  TCP[HOST_FORWARD]   8       127.0.0.1 40023       10.0.2.15    23     0     0\r\n" +
		"  TCP[HOST_FORWARD]   3       127.0.0.1 40022       10.0.2.15    22     0     0\r\n", nil
}

func (f *fakeLibvirt) ConnectListAllDomains(_ int32, _ libvirt.ConnectListAllDomainsFlags) ([]libvirt.Domain, uint32, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []libvirt.Domain
	for n := range f.domains {
		out = append(out, libvirt.Domain{Name: n})
	}
	return out, uint32(len(out)), nil
}

func (f *fakeLibvirt) DomainGetInfo(d libvirt.Domain) (uint8, uint64, uint64, uint16, uint64, error) {
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

// StorageVolLookupByPath knows no template files: the fake's pools hold only overlays.
func (f *fakeLibvirt) StorageVolLookupByPath(path string) (libvirt.StorageVol, error) {
	return libvirt.StorageVol{}, lverr(libvirt.ErrNoStorageVol, "Storage volume not found: no storage vol with matching path '%s'", path)
}

func (f *fakeLibvirt) StorageVolGetInfo(libvirt.StorageVol) (int8, uint64, uint64, error) {
	return 0, 0, 0, lverr(libvirt.ErrNoStorageVol, "no such volume")
}
