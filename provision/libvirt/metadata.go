package libvirt

import (
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/digitalocean/go-libvirt"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// An instance's <metadata>: read, written, and listed over every domain that has it.

// Metadata returns the metadata of the instance name. It fails with ErrNotManaged for a
// domain libvirt-gci did not create.
func (c *Conn) Metadata(name string) (meta.Metadata, error) {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return meta.Metadata{}, fmt.Errorf("look up instance %q: %w", name, err)
	}
	return c.metadata(dom)
}

// Instance is a managed instance as a later stage (Lookup) or a listing (Instances)
// finds it. State, CPUs and MemoryKiB are a listing's alone.
type Instance struct {
	Name      string
	UUID      [16]byte // libvirt's, made at define: unique to this instance
	Metadata  meta.Metadata
	State     string // "running", "paused", "shut off", ...
	CPUs      int
	MemoryKiB uint64
}

// Lookup finds the instance name. It fails with ErrNotManaged for a domain libvirt-gci
// did not create.
func (c *Conn) Lookup(name string) (Instance, error) {
	dom, err := c.api.DomainLookupByName(name)
	if HasCode(err, libvirt.ErrNoDomain) {
		return Instance{}, fmt.Errorf("no instance %q: %w", name, ErrNoInstance)
	}
	if err != nil {
		return Instance{}, fmt.Errorf("look up instance %q: %w", name, err)
	}
	m, err := c.metadata(dom)
	if err != nil {
		return Instance{}, err
	}
	return Instance{Name: dom.Name, UUID: dom.UUID, Metadata: m}, nil
}

// SetMetadata replaces the instance's metadata, in the running domain and its definition.
func (c *Conn) SetMetadata(name string, m meta.Metadata) error {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("look up instance %q: %w", name, err)
	}
	return c.setMetadata(dom, m)
}

func (c *Conn) setMetadata(dom libvirt.Domain, m meta.Metadata) error {
	x, err := m.MarshalPlain()
	if err != nil {
		return err
	}
	err = c.api.DomainSetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{x}, libvirt.OptString{meta.Prefix},
		libvirt.OptString{meta.NS}, libvirt.DomainAffectLive|libvirt.DomainAffectConfig)
	if err != nil {
		return fmt.Errorf("set metadata of %q: %w", dom.Name, err)
	}
	return nil
}

// owned looks up the instance name, reads its metadata and asks allow (nil: anyone's)
// whether the caller may act on it; ok is false, with no error, when it is not there
// (or was removed meanwhile, as by a cleanup's finisher): nothing to do. doing names
// the action, for errors.
func (c *Conn) owned(name, doing string, allow func(meta.Metadata) error) (dom libvirt.Domain, m meta.Metadata, ok bool, err error) {
	dom, err = c.api.DomainLookupByName(name)
	if HasCode(err, libvirt.ErrNoDomain) {
		return dom, m, false, nil
	}
	if err != nil {
		return dom, m, false, fmt.Errorf("look up instance %q: %w", name, err)
	}
	m, err = c.metadata(dom)
	if HasCode(err, libvirt.ErrNoDomain) {
		return dom, m, false, nil
	}
	if err != nil {
		return dom, m, false, fmt.Errorf("%s %q: %w", doing, name, err)
	}
	if allow != nil {
		if err := allow(m); err != nil {
			return dom, m, false, err
		}
	}
	return dom, m, true, nil
}

func (c *Conn) metadata(dom libvirt.Domain) (meta.Metadata, error) {
	s, err := c.api.DomainGetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{meta.NS}, libvirt.DomainAffectCurrent)
	if HasCode(err, libvirt.ErrNoDomainMetadata) {
		return meta.Metadata{}, fmt.Errorf("domain %q: %w", dom.Name, ErrNotManaged)
	}
	if err != nil {
		return meta.Metadata{}, fmt.Errorf("metadata of %q: %w", dom.Name, err)
	}
	return meta.Parse(s)
}

var stateNames = map[libvirt.DomainState]string{
	libvirt.DomainNostate: "no state", libvirt.DomainRunning: "running", libvirt.DomainBlocked: "blocked",
	libvirt.DomainPaused: "paused", libvirt.DomainShutdown: "shutting down", libvirt.DomainShutoff: "shut off",
	libvirt.DomainCrashed: "crashed", libvirt.DomainPmsuspended: "suspended",
}

// Instances lists every libvirt-gci instance: every domain that carries our metadata,
// whatever its name. Domains without it are not ours and are not listed.
func (c *Conn) Instances() ([]Instance, error) {
	doms, _, err := c.api.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	var out []Instance
	for _, d := range doms {
		m, err := c.metadata(d)
		if errors.Is(err, ErrNotManaged) || HasCode(err, libvirt.ErrNoDomain) {
			continue
		}
		if err != nil {
			return nil, err
		}
		state, maxMem, _, cpus, _, err := c.api.DomainGetInfo(d)
		if HasCode(err, libvirt.ErrNoDomain) {
			continue // gone meanwhile
		}
		if err != nil {
			return nil, fmt.Errorf("info of %q: %w", d.Name, err)
		}
		name := stateNames[libvirt.DomainState(state)]
		if name == "" {
			name = fmt.Sprintf("state %d", state)
		}
		out = append(out, Instance{Name: d.Name, UUID: d.UUID, Metadata: m, State: name, CPUs: int(cpus), MemoryKiB: maxMem})
	}
	slices.SortFunc(out, func(a, b Instance) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// NotRunning says why the domain name runs no guest any more: it is gone, shut off
// (and why, as libvirt records it), or crashed; "" while it runs (or is paused, or
// libvirt cannot say).
func (c *Conn) NotRunning(name string) string {
	dom, err := c.api.DomainLookupByName(name)
	if HasCode(err, libvirt.ErrNoDomain) {
		return "it is gone"
	}
	if err != nil {
		return ""
	}
	state, reason, err := c.api.DomainGetState(dom, 0)
	if err != nil {
		return ""
	}
	switch libvirt.DomainState(state) {
	case libvirt.DomainShutoff:
		switch libvirt.DomainShutoffReason(reason) {
		case libvirt.DomainShutoffCrashed:
			return "shut off: its QEMU ended without a shutdown (killed, or the guest's kernel panicked)"
		case libvirt.DomainShutoffShutdown:
			return "shut off: its guest powered off"
		case libvirt.DomainShutoffDestroyed:
			return "shut off: destroyed"
		}
		return "shut off"
	case libvirt.DomainCrashed:
		if libvirt.DomainCrashedReason(reason) == libvirt.DomainCrashedPanicked {
			return "crashed: its guest's kernel panicked"
		}
		return "crashed"
	}
	return ""
}
