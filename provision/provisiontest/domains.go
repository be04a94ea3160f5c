package provisiontest

import (
	"fmt"
	"regexp"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Domains: defined from their XML, started, stopped, listed, with their metadata.

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

func (f *Libvirt) DomainGetXMLDesc(d libvirt.Domain, _ libvirt.DomainXMLFlags) (x string, err error) {
	err = f.withDom("DomainGetXMLDesc", d, func(fd *domain) error { x = fd.xml; return nil })
	return x, err
}

// withDom runs op on the domain d under f.mu, unless a failure is injected for method
// or there is no such domain.
func (f *Libvirt) withDom(method string, d libvirt.Domain, op func(fd *domain) error) error {
	if err := f.enter(method); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return err
	}
	return op(fd)
}

func (f *Libvirt) DomainGetState(d libvirt.Domain, _ uint32) (state, reason int32, err error) {
	err = f.withDom("DomainGetState", d, func(fd *domain) error {
		switch {
		case fd.running && fd.paused && fd.ioError:
			state, reason = int32(libvirt.DomainPaused), int32(libvirt.DomainPausedIoerror)
		case fd.running && fd.paused:
			state, reason = int32(libvirt.DomainPaused), 1
		case fd.running:
			state, reason = int32(libvirt.DomainRunning), 1
		default:
			state = int32(libvirt.DomainShutoff)
			if fd.crashed {
				reason = int32(libvirt.DomainShutoffCrashed)
			}
		}
		return nil
	})
	return state, reason, err
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

func (f *Libvirt) DomainDefineXMLFlags(x string, fl libvirt.DomainDefineFlags) (libvirt.Domain, error) {
	if err := f.enter("DomainDefineXMLFlags"); err != nil {
		return libvirt.Domain{}, err
	}
	return callFor(f, "DomainDefineXMLFlags", func() (libvirt.Domain, error) { return f.define(x, fl) })
}

func (f *Libvirt) define(x string, _ libvirt.DomainDefineFlags) (libvirt.Domain, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return libvirt.Domain{}, lverr(libvirt.ErrXMLError, "%v", err)
	}
	if old, ok := f.domains[dom.Name]; ok {
		// As libvirt does, a definition of the same domain (its UUID) replaces the
		// inactive one: here, of a domain that is not running only.
		var was libvirtxml.Domain
		if old.running || was.Unmarshal(old.xml) != nil || was.UUID != dom.UUID {
			return libvirt.Domain{}, lverr(libvirt.ErrOperationFailed, "domain '%s' already exists", dom.Name)
		}
		old.xml = x
		return libvirt.Domain{Name: dom.Name}, nil
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
	fd.running, fd.crashed = true, false
	return nil
}

func (f *Libvirt) DomainDestroyFlags(d libvirt.Domain, _ libvirt.DomainDestroyFlagsValues) error {
	return f.stop("DomainDestroyFlags", d)
}

// DomainSuspend pauses the running domain d: its guest keeps its state, its agent does
// not answer.
func (f *Libvirt) DomainSuspend(d libvirt.Domain) error {
	return f.withDom("DomainSuspend", d, func(fd *domain) error {
		if !fd.running {
			return lverr(libvirt.ErrOperationInvalid, "Requested operation is not valid: domain is not running")
		}
		fd.paused = true
		return nil
	})
}

// stop stops the running domain d (a destroy, or a guest's shutdown): its guest is gone.
func (f *Libvirt) stop(method string, d libvirt.Domain) error {
	return f.withDom(method, d, func(fd *domain) error {
		if !fd.running {
			return lverr(libvirt.ErrOperationInvalid, "Requested operation is not valid: domain is not running")
		}
		fd.running, fd.paused, fd.guest = false, false, nil
		return nil
	})
}

// running is the domain d, if it runs; under f.mu.
func (f *Libvirt) running(d libvirt.Domain) (*domain, error) {
	fd, err := f.dom(d)
	if err != nil {
		return nil, err
	}
	if !fd.running {
		return nil, lverr(libvirt.ErrOperationInvalid, "Requested operation is not valid: domain is not running")
	}
	return fd, nil
}

func (f *Libvirt) DomainUndefineFlags(d libvirt.Domain, _ libvirt.DomainUndefineFlagsValues) error {
	return f.withDom("DomainUndefineFlags", d, func(fd *domain) error {
		if fd.running {
			return lverr(libvirt.ErrOperationInvalid, "cannot undefine a running domain in this fake")
		}
		delete(f.domains, d.Name)
		return nil
	})
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
	switch {
	case fd.running && fd.paused:
		state = uint8(libvirt.DomainPaused)
	case fd.running:
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
