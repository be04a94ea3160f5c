package provision

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// checked is one finding of CheckTemplate: what was checked (Check), whether it passed
// (FindingOK, else FindingProblem), and, if not, how to fix it.
func checked(what string, ok bool, fix string) Finding {
	if ok {
		return Finding{Check: what, Status: FindingOK}
	}
	return Finding{Check: what, Status: FindingProblem, Fix: fix}
}

// CheckTemplate says, check by check, whether the domain name can be a template:
// offered (marked, or offered says the operator lists it), shut off, not an instance,
// its disks readable by libvirt and in a format an overlay can stand on, the guest agent
// channel there, and no device that clones would share. It stops at the first check
// whose failure makes the rest meaningless (no such domain).
func (h *Host) CheckTemplate(ctx context.Context, name string, offered bool) ([]Finding, error) {
	conn, err := h.Connect(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	var out []Finding
	add := func(what string, ok bool, hint string) { out = append(out, checked(what, ok, hint)) }
	info, err := conn.TemplateOf(name)
	if errors.Is(err, libvirt.ErrNoInstance) && h.BaseImages.Source != "" {
		x, err := h.baseImageXML(ctx, conn, name)
		if err == nil {
			add(fmt.Sprintf("a base image %s.qcow2 in %s (offered by being there; a built-in definition)", name, h.BaseImages.Source), true, "")
			return h.checkXML(out, conn, x, "")
		}
		if !errors.Is(err, libvirt.ErrNoTemplate) {
			return nil, err
		}
		add(fmt.Sprintf("a libvirt domain, or a base image %s.qcow2 in %s, named %s", name, h.BaseImages.Source, name), false,
			"define one (virsh define), put the image there, or check LIBVIRT_GCI_URI ("+h.URI+")")
		return out, nil
	}
	if errors.Is(err, libvirt.ErrNoInstance) {
		add("a libvirt domain named "+name, false, "define one (virsh define), or check LIBVIRT_GCI_URI ("+h.URI+")")
		return out, nil
	}
	if err != nil {
		return nil, err
	}
	add("not a libvirt-gci instance", !info.Instance, "instances are never templates; pick the domain it was cloned from")
	if info.Instance {
		return out, nil
	}
	add("offered to jobs (marked, or listed in LIBVIRT_GCI_TEMPLATES)", info.Marked || offered, "libvirt-gci template mark "+name)
	add("shut off", info.Shutoff, "its disks back every clone, so it must not run: virsh shutdown "+name)
	x, err := conn.DomainXML(name, true)
	if err != nil {
		return nil, err
	}
	return h.checkXML(out, conn, x, name)
}

// checkXML adds the checks of a template's definition x to out: its disks, agent channel
// and devices; with the domain's name, that libvirt can read its disks.
func (h *Host) checkXML(out []Finding, conn *libvirt.Conn, x, name string) ([]Finding, error) {
	add := func(what string, ok bool, hint string) { out = append(out, checked(what, ok, hint)) }
	tmpl, err := template.Parse(x)
	if err != nil {
		add("disks libvirt-gci can clone (file-backed, qcow2 or raw)", false, err.Error())
		return out, nil
	}
	add("the guest agent channel", tmpl.HasAgent,
		fmt.Sprintf("add <channel type='unix'><target type='virtio' name='%s'/></channel> to its devices, and qemu-guest-agent to the guest", template.AgentChannel))
	access := tmpl.HostAccess()
	if nets, err := conn.NetworkHostAccess(x); err == nil {
		access = append(access, nets...)
	} else {
		add("its networks readable", false, err.Error())
	}
	add("no device clones would share or that reaches the host", len(access) == 0 || h.AllowHostAccess,
		"remove "+strings.Join(access, ", ")+", or allow it with LIBVIRT_GCI_ALLOW_HOST_ACCESS=true")
	add("at least one writable disk", len(tmpl.Disks) > 0, "give it a disk: the job's overlay stands on it")
	for _, d := range tmpl.Disks {
		if name == "" {
			continue
		}
		checked, err := conn.DiskReadable(name, d.Target)
		if !checked {
			continue
		}
		hint := ""
		if err != nil {
			hint = fmt.Sprintf("libvirt cannot read it: %v", err)
		}
		add(fmt.Sprintf("disk %s (%s, %s) readable by libvirt", d.Target, d.Path, d.Format), err == nil, hint)
	}
	return out, nil
}

// TryBoot boots a throwaway instance of the template name (by hand, a cold boot) to a
// ready guest (and ssh, with that transport), removes it, and says how long it took.
func (h *Host) TryBoot(ctx context.Context, name, transport string) (time.Duration, error) {
	hb := *h
	hb.Start = StartBoot
	inst := h.Prefix + "check-" + randomHex(4)
	start := time.Now()
	err := hb.Launch(ctx, Request{Name: inst, Template: name, Offered: true, Owner: meta.Owner{Manual: true}, Transport: transport,
		Replace: func(meta.Metadata) error { return errors.New("an instance of that name exists") }})
	took := time.Since(start)
	if rerr := hb.Remove(ctx, inst, nil); rerr != nil && err == nil {
		err = rerr
	}
	return took, err
}
