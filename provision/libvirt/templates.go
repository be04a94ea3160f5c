package libvirt

import (
	"encoding/xml"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// TemplateInfo is a domain as `template list` shows it.
type TemplateInfo struct {
	Name     string
	Marked   bool // carries the operator's template mark
	Instance bool // a libvirt-gci instance: never a template
	Shutoff  bool
}

// TemplateXML returns the inactive XML of the template domain name, and whether the
// operator marked it as a template. A template must be shut off (its disks are the
// overlays' backing files) and must not be an instance.
func (c *Conn) TemplateXML(name string) (x string, marked bool, err error) {
	dom, err := c.api.DomainLookupByName(name)
	if HasCode(err, libvirt.ErrNoDomain) {
		return "", false, fmt.Errorf("template %q: %w (no libvirt domain has that name)", name, ErrNoTemplate)
	}
	if err != nil {
		return "", false, fmt.Errorf("look up template %q: %w", name, err)
	}
	info, err := c.TemplateInfo(dom)
	if err != nil {
		return "", false, err
	}
	if info.Instance {
		return "", false, fmt.Errorf("template %q is a libvirt-gci instance: %w", name, ErrNotTemplate)
	}
	if !info.Shutoff {
		return "", info.Marked, fmt.Errorf("template %q is not shut off (%w): a template's disks back every clone, so it must not run", name, ErrNotTemplate)
	}
	x, err = c.api.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if err != nil {
		return "", false, fmt.Errorf("XML of template %q: %w", name, err)
	}
	return x, info.Marked, nil
}

func (c *Conn) TemplateInfo(dom libvirt.Domain) (TemplateInfo, error) {
	info := TemplateInfo{Name: dom.Name}
	_, err := c.metadata(dom)
	switch {
	case err == nil:
		info.Instance = true
	case !errors.Is(err, ErrNotManaged):
		return info, err
	}
	_, err = c.api.DomainGetMetadata(dom, int32(libvirt.DomainMetadataElement), libvirt.OptString{meta.TemplateNS}, libvirt.DomainAffectConfig)
	switch {
	case err == nil:
		info.Marked = true
	case !HasCode(err, libvirt.ErrNoDomainMetadata):
		return info, fmt.Errorf("template metadata of %q: %w", dom.Name, err)
	}
	state, _, err := c.api.DomainGetState(dom, 0)
	if err != nil {
		return info, fmt.Errorf("state of %q: %w", dom.Name, err)
	}
	info.Shutoff = libvirt.DomainState(state) == libvirt.DomainShutoff
	return info, nil
}

// MarkTemplate marks the domain name as a template that jobs may clone, or (mark false)
// takes the mark away. Instances cannot be marked.
func (c *Conn) MarkTemplate(name string, mark bool) error {
	dom, err := c.api.DomainLookupByName(name)
	if HasCode(err, libvirt.ErrNoDomain) {
		return fmt.Errorf("no domain named %q: %w", name, ErrNoTemplate)
	}
	if err != nil {
		return fmt.Errorf("look up %q: %w", name, err)
	}
	if _, err := c.metadata(dom); err == nil {
		return fmt.Errorf("%q is a libvirt-gci instance; only the domains instances are cloned from can be templates", name)
	} else if !errors.Is(err, ErrNotManaged) {
		return err
	}
	var content libvirt.OptString
	if mark {
		b, err := xml.Marshal(meta.TemplateMark{MarkedAt: time.Now().UTC().Format(time.RFC3339)})
		if err != nil {
			return err
		}
		content = libvirt.OptString{string(b)}
	}
	err = c.api.DomainSetMetadata(dom, int32(libvirt.DomainMetadataElement), content, libvirt.OptString{meta.TemplatePrefix},
		libvirt.OptString{meta.TemplateNS}, libvirt.DomainAffectConfig)
	if err != nil {
		return fmt.Errorf("set template mark of %q: %w", name, err)
	}
	return nil
}

// Templates lists the defined domains that are not instances, marked or not.
func (c *Conn) Templates() ([]TemplateInfo, error) {
	doms, _, err := c.api.ConnectListAllDomains(1, libvirt.ConnectListDomainsPersistent)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	var out []TemplateInfo
	for _, d := range doms {
		info, err := c.TemplateInfo(d)
		if HasCode(err, libvirt.ErrNoDomain) {
			continue // gone meanwhile
		}
		if err != nil {
			return nil, err
		}
		if !info.Instance {
			out = append(out, info)
		}
	}
	slices.SortFunc(out, func(a, b TemplateInfo) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	return out, nil
}

// TemplateOf is TemplateInfo of the domain name; an error with ErrNoInstance where there
// is no such domain.
func (c *Conn) TemplateOf(name string) (TemplateInfo, error) {
	dom, err := c.api.DomainLookupByName(name)
	if HasCode(err, libvirt.ErrNoDomain) {
		return TemplateInfo{}, fmt.Errorf("no domain %q: %w", name, ErrNoInstance)
	}
	if err != nil {
		return TemplateInfo{}, fmt.Errorf("look up %q: %w", name, err)
	}
	return c.TemplateInfo(dom)
}

// blockInfoAPI reads a disk's sizes through libvirt (which opens the file).
type blockInfoAPI interface {
	DomainGetBlockInfo(dom libvirt.Domain, path string, flags uint32) (uint64, uint64, uint64, error)
}

// DiskReadable says whether libvirt can read the disk target of the domain name: nil
// where it can; checked is false where this connection cannot tell.
func (c *Conn) DiskReadable(name, target string) (checked bool, err error) {
	bi, ok := c.api.(blockInfoAPI)
	if !ok {
		return false, nil
	}
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return true, err
	}
	_, _, _, err = bi.DomainGetBlockInfo(dom, target, 0)
	return true, err
}

// shutdownAPI shuts a domain down.
type shutdownAPI interface {
	DomainShutdownFlags(dom libvirt.Domain, flags libvirt.DomainShutdownFlagValues) error
}

// Shutdown asks the guest of the domain name to power off: through its guest agent
// (agent), else by ACPI's power button. It does not wait.
func (c *Conn) Shutdown(name string, agent bool) error {
	s, ok := c.api.(shutdownAPI)
	if !ok {
		return errors.New("this libvirt connection cannot shut domains down")
	}
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("look up %q: %w", name, err)
	}
	fl := libvirt.DomainShutdownAcpiPowerBtn
	if agent {
		fl = libvirt.DomainShutdownGuestAgent
	}
	return s.DomainShutdownFlags(dom, fl)
}

// ShutOff says whether the domain name is shut off.
func (c *Conn) ShutOff(name string) (bool, error) {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return false, fmt.Errorf("look up %q: %w", name, err)
	}
	state, _, err := c.api.DomainGetState(dom, 0)
	if err != nil {
		return false, fmt.Errorf("state of %q: %w", name, err)
	}
	return libvirt.DomainState(state) == libvirt.DomainShutoff, nil
}
