package provisiontest

import (
	"fmt"
	"slices"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// A libvirt network of the fake: its XML, whose DHCP host entries NetworkUpdateCompat
// changes as libvirt changes a running network's, and the leases its dnsmasq gave: one
// for each host entry whose NIC runs (the guest asked for it at once).

// DHCPNetwork is a network with DHCP for the fake, named name: 10.9.8.0/24, a range of
// size addresses from 10.9.8.10 on, on a bridge of its own.
func DHCPNetwork(name string, size int) string {
	return fmt.Sprintf(`<network><name>%s</name><bridge name='br-%[1]s'/><forward mode='nat'/>
<ip family='ipv6' address='fd00::1' prefix='64'/>
<ip address='10.9.8.1' prefix='24'><dhcp><range start='10.9.8.10' end='10.9.8.%d'/></dhcp></ip></network>`, name, 10+size-1)
}

// AddNetwork defines (and starts) the network of the XML x.
func (f *Libvirt) AddNetwork(x string) {
	var n libvirtxml.Network
	if err := n.Unmarshal(x); err != nil {
		panic(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.networks == nil {
		f.networks = map[string]*libvirtxml.Network{}
	}
	f.networks[n.Name] = &n
}

// Hosts lists the network's DHCP host entries, as "MAC IP NAME".
func (f *Libvirt) Hosts(network string) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []string
	if n := f.networks[network]; n != nil {
		for _, ip := range n.IPs {
			if ip.DHCP != nil {
				for _, h := range ip.DHCP.Hosts {
					out = append(out, h.MAC+" "+h.IP+" "+h.Name)
				}
			}
		}
	}
	return out
}

func (f *Libvirt) NetworkLookupByName(name string) (libvirt.Network, error) {
	if err := f.enter("NetworkLookupByName"); err != nil {
		return libvirt.Network{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.networks[name] == nil {
		return libvirt.Network{}, lverr(libvirt.ErrNoNetwork, "Network not found: no network with matching name '%s'", name)
	}
	return libvirt.Network{Name: name}, nil
}

func (f *Libvirt) network(n libvirt.Network) (*libvirtxml.Network, error) {
	net := f.networks[n.Name]
	if net == nil {
		return nil, lverr(libvirt.ErrNoNetwork, "Network not found: no network with matching name '%s'", n.Name)
	}
	return net, nil
}

func (f *Libvirt) NetworkGetXMLDesc(n libvirt.Network, _ uint32) (string, error) {
	if err := f.enter("NetworkGetXMLDesc"); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	net, err := f.network(n)
	if err != nil {
		return "", err
	}
	return net.Marshal()
}

// NetworkUpdateCompat adds and deletes DHCP host entries, refusing (as libvirt does) an
// entry whose MAC address, name or address another has, and a delete of none.
func (f *Libvirt) NetworkUpdateCompat(n libvirt.Network, cmd libvirt.NetworkUpdateCommand, section libvirt.NetworkUpdateSection, parent int32, x string, flags libvirt.NetworkUpdateFlags) error {
	return f.call("NetworkUpdateCompat", func() error {
		if err := f.enter("NetworkUpdateCompat"); err != nil {
			return err
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		net, err := f.network(n)
		if err != nil {
			return err
		}
		if section != libvirt.NetworkSectionIPDhcpHost || flags != libvirt.NetworkUpdateAffectLive || parent < 0 || int(parent) >= len(net.IPs) || net.IPs[parent].DHCP == nil {
			return lverr(libvirt.ErrInvalidArg, "unsupported network update")
		}
		var h libvirtxml.NetworkDHCPHost
		if err := h.Unmarshal(x); err != nil {
			return lverr(libvirt.ErrXMLError, "%v", err)
		}
		d := net.IPs[parent].DHCP
		i := slices.IndexFunc(d.Hosts, func(o libvirtxml.NetworkDHCPHost) bool {
			return strings.EqualFold(o.MAC, h.MAC) || (h.Name != "" && o.Name == h.Name) || o.IP == h.IP
		})
		switch cmd {
		case libvirt.NetworkUpdateCommandAddLast:
			if i >= 0 {
				return lverr(libvirt.ErrOperationInvalid, "there is an existing dhcp host entry in network '%s' that matches", n.Name)
			}
			d.Hosts = append(d.Hosts, h)
		case libvirt.NetworkUpdateCommandDelete:
			if i < 0 || !strings.EqualFold(d.Hosts[i].MAC, h.MAC) || d.Hosts[i].IP != h.IP || d.Hosts[i].Name != h.Name {
				return lverr(libvirt.ErrOperationInvalid, "couldn't locate a matching dhcp host entry in network '%s'", n.Name)
			}
			d.Hosts = slices.Delete(d.Hosts, i, i+1)
		default:
			return lverr(libvirt.ErrInvalidArg, "unsupported network update command %d", cmd)
		}
		return nil
	})
}

// NetworkGetDhcpLeases lists a lease for each host entry of a running domain's NIC.
func (f *Libvirt) NetworkGetDhcpLeases(n libvirt.Network, mac libvirt.OptString, _ int32, _ uint32) ([]libvirt.NetworkDhcpLease, uint32, error) {
	if err := f.enter("NetworkGetDhcpLeases"); err != nil {
		return nil, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	net, err := f.network(n)
	if err != nil {
		return nil, 0, err
	}
	running := map[string]bool{}
	for _, d := range f.domains {
		if !d.running {
			continue
		}
		for _, r := range nics(d.xml) {
			running[r] = true
		}
	}
	var out []libvirt.NetworkDhcpLease
	for _, ip := range net.IPs {
		if ip.DHCP == nil {
			continue
		}
		for _, h := range ip.DHCP.Hosts {
			m := strings.ToLower(h.MAC)
			if !running[m] || (len(mac) > 0 && !strings.EqualFold(mac[0], m)) {
				continue
			}
			out = append(out, libvirt.NetworkDhcpLease{Iface: net.Bridge.Name, Mac: libvirt.OptString{m}, Ipaddr: h.IP, Prefix: uint32(ip.Prefix), Type: int32(libvirt.IPAddrTypeIpv4)})
		}
	}
	return out, uint32(len(out)), nil
}

// nics is the MAC addresses of the domain XML x's NICs, lower case.
func nics(x string) []string {
	var dom libvirtxml.Domain
	if dom.Unmarshal(x) != nil || dom.Devices == nil {
		return nil
	}
	var out []string
	for _, iface := range dom.Devices.Interfaces {
		if iface.MAC != nil {
			out = append(out, strings.ToLower(iface.MAC.Address))
		}
	}
	return out
}

// reserved is the address a host entry of a network gives mac, if any.
func (f *Libvirt) reserved(mac string) string {
	for _, n := range f.networks {
		for _, ip := range n.IPs {
			if ip.DHCP == nil {
				continue
			}
			for _, h := range ip.DHCP.Hosts {
				if strings.EqualFold(h.MAC, mac) {
					return h.IP
				}
			}
		}
	}
	return ""
}

// NwfilterLookupByName finds a network filter defined with NwfilterDefineXML, or one of
// libvirt's own (clean-traffic).
func (f *Libvirt) NwfilterLookupByName(name string) (libvirt.Nwfilter, error) {
	if err := f.enter("NwfilterLookupByName"); err != nil {
		return libvirt.Nwfilter{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.filters[name]; !ok && name != "clean-traffic" {
		return libvirt.Nwfilter{}, lverr(libvirt.ErrNoNwfilter, "Network filter not found: no nwfilter with matching name '%s'", name)
	}
	return libvirt.Nwfilter{Name: name}, nil
}

// NwfilterDefineXML defines a network filter; every filter it references must exist.
func (f *Libvirt) NwfilterDefineXML(x string) (libvirt.Nwfilter, error) {
	if err := f.enter("NwfilterDefineXML"); err != nil {
		return libvirt.Nwfilter{}, err
	}
	var flt libvirtxml.NWFilter
	if err := flt.Unmarshal(x); err != nil {
		return libvirt.Nwfilter{}, lverr(libvirt.ErrXMLError, "%v", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, e := range flt.Entries {
		if r := e.Ref; r != nil {
			if _, ok := f.filters[r.Filter]; !ok && r.Filter != "clean-traffic" {
				return libvirt.Nwfilter{}, lverr(libvirt.ErrNoNwfilter, "referenced filter '%s' is missing", r.Filter)
			}
		}
	}
	if f.filters == nil {
		f.filters = map[string]string{}
	}
	f.filters[flt.Name] = x
	return libvirt.Nwfilter{Name: flt.Name}, nil
}

func (f *Libvirt) ConnectListAllNetworks(_ int32, _ libvirt.ConnectListAllNetworksFlags) ([]libvirt.Network, uint32, error) {
	if err := f.enter("ConnectListAllNetworks"); err != nil {
		return nil, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []libvirt.Network
	for name := range f.networks {
		out = append(out, libvirt.Network{Name: name})
	}
	slices.SortFunc(out, func(a, b libvirt.Network) int { return strings.Compare(a.Name, b.Name) })
	return out, uint32(len(out)), nil
}
