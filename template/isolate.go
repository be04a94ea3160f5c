package template

import (
	"fmt"

	"libvirt.org/go/libvirtxml"
)

// HostAccess lists the template's devices that give a guest the host's hardware or
// files, or a path to other guests: host devices, host directory shares, writable disks
// shared between domains, shared memory, host-side network plumbing and the like. Every
// clone would hand them to an untrusted job, so prepare refuses such a template unless
// the operator allows them (LIBVIRT_GCI_ALLOW_HOST_ACCESS). The descriptions name no host
// paths: they end up in job logs.
func (t *Template) HostAccess() []string {
	var out []string
	if q := t.dom.QEMUCommandline; q != nil && (len(q.Args) > 0 || len(q.Envs) > 0) {
		out = append(out, "a <qemu:commandline> (QEMU arguments of its own: anything the QEMU process reaches)")
	}
	if t.dom.QEMUOverride != nil {
		out = append(out, "a <qemu:override> (QEMU device properties of its own)")
	}
	d := t.dom.Devices
	if d == nil {
		return out
	}
	for _, h := range d.Hostdevs {
		out = append(out, "a <hostdev> ("+hostdevKind(h)+")")
	}
	for range d.Filesystems {
		out = append(out, "a <filesystem> (a host directory or image shared in)")
	}
	for _, disk := range d.Disks {
		switch {
		case disk.Device == "lun":
			out = append(out, fmt.Sprintf("a <disk device='lun'> (%s: SCSI commands to a host device)", diskTarget(disk)))
		case disk.Shareable != nil && disk.ReadOnly == nil:
			out = append(out, fmt.Sprintf("a writable <shareable/> disk (%s)", diskTarget(disk)))
		}
	}
	for _, tpm := range d.TPMs {
		if b := tpm.Backend; b != nil && (b.Passthrough != nil || b.External != nil) {
			out = append(out, "a <tpm> backed by the host's TPM or an outside emulator")
		}
	}
	for range d.Shmems {
		out = append(out, "a <shmem> (memory shared with other domains)")
	}
	for _, r := range d.RedirDevs {
		if r.Source != nil && hostChardev(r.Source) {
			out = append(out, "a <redirdev> from a host source")
		}
	}
	for _, s := range d.Smartcards {
		if s.Host != nil || s.Passthrough != nil {
			out = append(out, "a <smartcard> of the host's")
		}
	}
	for _, in := range d.Inputs {
		if in.Type == "passthrough" || in.Type == "evdev" {
			out = append(out, fmt.Sprintf("an <input type=%q> (a host input device)", in.Type))
		}
	}
	for _, iface := range d.Interfaces {
		if s := iface.Source; s != nil && (s.Direct != nil || s.Hostdev != nil || s.Ethernet != nil || s.VHostUser != nil ||
			s.Server != nil || s.Client != nil || s.MCast != nil || s.UDP != nil || s.VDPA != nil) {
			out = append(out, "an <interface> on host network plumbing (only network and bridge interfaces are isolated)")
		}
		if s := iface.Source; s != nil && s.User != nil {
			// SLIRP maps its gateway (10.0.2.2) to the host's 127.0.0.1: a job would reach
			// host-local services and other instances' forwarded ports. libvirt has no
			// restrict=on for it, and a restricted one reaches nothing anyway.
			out = append(out, "an <interface type='user'> (QEMU's user network reaches the host's 127.0.0.1 as its gateway; use a libvirt network)")
		}
	}
	for _, ch := range d.Channels {
		if ch.Source != nil && hostChardev(ch.Source) && ch.Source.UNIX == nil {
			out = append(out, "a <channel> to a host file, device or port")
		}
	}
	return out
}

func hostdevKind(h libvirtxml.DomainHostdev) string {
	switch {
	case h.SubsysPCI != nil:
		return "PCI"
	case h.SubsysUSB != nil:
		return "USB"
	case h.SubsysSCSI != nil:
		return "SCSI"
	case h.SubsysMDev != nil:
		return "mediated device"
	}
	return "host device"
}

func diskTarget(d libvirtxml.DomainDisk) string {
	if d.Target != nil {
		return d.Target.Dev
	}
	return "no target"
}

// hostChardev tells whether a character device's source is on the host: a file, pipe,
// device, socket or port (not a pty, a null device or a SPICE/VNC channel).
func hostChardev(s *libvirtxml.DomainChardevSource) bool {
	return s.File != nil || s.Pipe != nil || s.Dev != nil || s.UNIX != nil || s.TCP != nil ||
		s.UDP != nil || s.StdIO != nil || s.NMDM != nil
}

// isolate gives an instance what must be its own: automatic display ports and sockets,
// character devices on ptys rather than the template's files and sockets (no log files
// of the template's), its own vsock CID, and network ports isolated from the other
// clones on the same bridge. It runs on the instance's copy of the template's domain.
func isolate(dom *libvirtxml.Domain) {
	d := dom.Devices
	if d == nil {
		return
	}
	for i := range d.Graphics {
		g := &d.Graphics[i]
		switch {
		case g.VNC != nil:
			v := g.VNC
			v.Port, v.AutoPort, v.Socket = 0, "yes", ""
			if v.WebSocket != 0 {
				v.WebSocket = -1 // automatic
			}
			v.Listeners = ownListeners(v.Listeners)
		case g.Spice != nil:
			s := g.Spice
			if s.Port != 0 || s.TLSPort != 0 || s.AutoPort != "" {
				s.Port, s.TLSPort, s.AutoPort = 0, 0, "yes"
			}
			s.Listeners = ownListeners(s.Listeners)
		case g.RDP != nil:
			g.RDP.Port, g.RDP.AutoPort = 0, "yes"
			g.RDP.Listeners = ownListeners(g.RDP.Listeners)
		case g.DBus != nil:
			g.DBus.Address = ""
		}
	}
	onPty := func(src **libvirtxml.DomainChardevSource, log **libvirtxml.DomainChardevLog) {
		if *src != nil && hostChardev(*src) {
			*src = &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}}
		}
		*log = nil
	}
	for i := range d.Serials {
		onPty(&d.Serials[i].Source, &d.Serials[i].Log)
		d.Serials[i].Protocol = nil
	}
	for i := range d.Consoles {
		onPty(&d.Consoles[i].Source, &d.Consoles[i].Log)
		d.Consoles[i].Protocol = nil
		d.Consoles[i].TTY = ""
	}
	for i := range d.Parallels {
		onPty(&d.Parallels[i].Source, &d.Parallels[i].Log)
		d.Parallels[i].Protocol = nil
	}
	for i := range d.Channels {
		ch := &d.Channels[i]
		ch.Log = nil
		if ch.Source != nil && ch.Source.UNIX != nil {
			// libvirt makes a socket of the instance's own for a channel without a path.
			ch.Source.UNIX.Path = ""
		}
	}
	if d.VSock != nil && d.VSock.CID != nil {
		d.VSock.CID = &libvirtxml.DomainVSockCID{Auto: "yes"}
	}
	for i := range d.Interfaces {
		iface := &d.Interfaces[i]
		if iface.Source != nil && (iface.Source.Network != nil || iface.Source.Bridge != nil) {
			iface.PortOptions = &libvirtxml.DomainInterfacePortOptions{Isolated: "yes"}
		}
	}
}

// ownListeners keeps a display's listen addresses, and turns a socket listener into one
// libvirt names for the instance.
func ownListeners(ls []libvirtxml.DomainGraphicListener) []libvirtxml.DomainGraphicListener {
	for i := range ls {
		if ls[i].Socket != nil {
			ls[i].Socket = &libvirtxml.DomainGraphicListenerSocket{}
		}
	}
	return ls
}
