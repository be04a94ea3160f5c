package template

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"libvirt.org/go/libvirtxml"
)

// Clone is what makes an instance restored from a warm image (a saved, running instance
// of a template) its own, in the domain XML its memory is restored into.
type Clone struct {
	Name, UUID string
	Metadata   string             // replaces the warm image's
	Overlays   map[string]Overlay // by disk target: the clone's overlays, on the warm image's
}

// MACChange is a NIC's MAC address in the warm image and in the clone. The guest still
// has Old when its memory is restored: it must be told New before the link comes up.
type MACChange struct {
	Old, New string
	Link     bool // a libvirt <interface>, whose link is down until the guest has New
}

var macArg = regexp.MustCompile(`(^|,)mac=([0-9a-fA-F:]{17})`)

// Restored rewrites a warm image's domain XML (its save image's) into a clone's: its own
// name, UUID, metadata and overlays, and a new MAC address (newMAC's) for every NIC, the
// template's (whose link stays down) and those of QEMU arguments alike. Nothing else
// changes: the devices are the ones whose state the clone's QEMU restores.
func Restored(saveXML string, c Clone, newMAC func() string) (string, []MACChange, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(saveXML); err != nil {
		return "", nil, fmt.Errorf("restored instance %q: %w", c.Name, err)
	}
	if c.Name == "" || c.UUID == "" {
		return "", nil, errors.New("restored instance: empty name or UUID")
	}
	dom.Name, dom.UUID, dom.ID = c.Name, c.UUID, nil
	dom.Metadata = nil
	if c.Metadata != "" {
		dom.Metadata = &libvirtxml.DomainMetadata{XML: c.Metadata}
	}
	var macs []MACChange
	if dom.Devices != nil {
		used := map[string]bool{}
		for i := range dom.Devices.Disks {
			d := &dom.Devices.Disks[i]
			if d.Target == nil {
				continue
			}
			ov, ok := c.Overlays[d.Target.Dev]
			if !ok {
				continue
			}
			if d.Source == nil || d.Source.Volume == nil {
				return "", nil, fmt.Errorf("restored instance %q: disk %q of the warm image is not a volume", c.Name, d.Target.Dev)
			}
			used[d.Target.Dev] = true
			d.Source.Volume.Pool, d.Source.Volume.Volume = ov.Pool, ov.Volume
			d.Source.Index = 0
			// The clone's overlay names its backing file (the warm image's overlay).
			d.BackingStore = nil
		}
		for target := range c.Overlays {
			if !used[target] {
				return "", nil, fmt.Errorf("restored instance %q: the warm image has no disk %q", c.Name, target)
			}
		}
		for i := range dom.Devices.Interfaces {
			iface := &dom.Devices.Interfaces[i]
			if iface.MAC == nil {
				return "", nil, fmt.Errorf("restored instance %q: a NIC of the warm image has no MAC address", c.Name)
			}
			ch := MACChange{Old: strings.ToLower(iface.MAC.Address), New: newMAC(), Link: true}
			macs = append(macs, ch)
			iface.MAC.Address = ch.New
			iface.Target = nil
			iface.Link = &libvirtxml.DomainInterfaceLink{State: "down"}
			// The warm image's filter holds it to the warm image's address: the clone's
			// comes with its link (provision/libvirt's LinksUp).
			iface.FilterRef = nil
		}
	}
	if dom.QEMUCommandline != nil {
		for i := range dom.QEMUCommandline.Args {
			a := &dom.QEMUCommandline.Args[i]
			if m := macArg.FindStringSubmatch(a.Value); m != nil {
				ch := MACChange{Old: strings.ToLower(m[2]), New: newMAC()}
				macs = append(macs, ch)
				a.Value = macArg.ReplaceAllString(a.Value, "${1}mac="+ch.New)
			}
		}
	}
	out, err := dom.Marshal()
	if err != nil {
		return "", nil, fmt.Errorf("restored instance %q: %w", c.Name, err)
	}
	return out, macs, nil
}

// LinkUp is the XML of the NIC with the MAC address mac in the domain XML x, with its
// link up (for a live device update).
func LinkUp(x, mac string) (string, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return "", err
	}
	if dom.Devices != nil {
		for _, iface := range dom.Devices.Interfaces {
			if iface.MAC != nil && strings.EqualFold(iface.MAC.Address, mac) {
				iface.Link = &libvirtxml.DomainInterfaceLink{State: "up"}
				return iface.Marshal()
			}
		}
	}
	return "", fmt.Errorf("no NIC with the MAC address %s", mac)
}

// NIC is a network interface of a domain's own (not one passed to QEMU directly).
type NIC struct {
	MAC     string // lower case
	Network string // what it is on: a libvirt network, a bridge, or its type
}

// UpNICs lists the NICs of the domain XML x whose link is up (all but those with
// <link state='down'/>): the ones a guest is expected to configure.
func UpNICs(x string) ([]NIC, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return nil, err
	}
	var nics []NIC
	if dom.Devices == nil {
		return nil, nil
	}
	for _, iface := range dom.Devices.Interfaces {
		if iface.MAC == nil || (iface.Link != nil && iface.Link.State == "down") {
			continue
		}
		n := NIC{MAC: strings.ToLower(iface.MAC.Address), Network: "a NIC"}
		switch s := iface.Source; {
		case s != nil && s.Network != nil:
			n.Network = "network " + s.Network.Network
		case s != nil && s.Bridge != nil:
			n.Network = "bridge " + s.Bridge.Bridge
		case s != nil && s.User != nil:
			n.Network = "user-mode networking"
		}
		nics = append(nics, n)
	}
	return nics, nil
}

// Saved is what a warm image's domain XML (the one in its save image) says of it.
type Saved struct {
	MemKiB   uint64
	Metadata string            // the inner XML of its <metadata>
	Volumes  map[string]string // by disk target: the pool volume of each disk whose volume starts with prefix
}

// ParseSaved reads a warm image's domain XML x; its own volumes' names start with prefix.
func ParseSaved(x, prefix string) (Saved, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return Saved{}, err
	}
	s := Saved{Volumes: map[string]string{}}
	if dom.Memory != nil {
		s.MemKiB = KiB(dom.Memory.Value, dom.Memory.Unit)
	}
	if dom.Metadata != nil {
		s.Metadata = dom.Metadata.XML
	}
	if dom.Devices != nil {
		for _, d := range dom.Devices.Disks {
			if d.Source != nil && d.Source.Volume != nil && d.Target != nil && strings.HasPrefix(d.Source.Volume.Volume, prefix) {
				s.Volumes[d.Target.Dev] = d.Source.Volume.Volume
			}
		}
	}
	return s, nil
}

// FileDisks are the files of the domain x's disks, by path; nil where x does not parse.
func FileDisks(x string) []string {
	var dom libvirtxml.Domain
	if dom.Unmarshal(x) != nil || dom.Devices == nil {
		return nil
	}
	var out []string
	for _, d := range dom.Devices.Disks {
		if d.Source != nil && d.Source.File != nil {
			out = append(out, d.Source.File.File)
		}
	}
	return out
}
