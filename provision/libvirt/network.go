package libvirt

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// An instance's addresses on libvirt networks with DHCP (libvirt's own dnsmasq): each of
// its NICs on such a network gets a DHCP host entry of its own, live only, made between
// its define and its start (Reserve), and named after the instance. dnsmasq then hands
// that address to the NIC's first DISCOVER at once: it pings an address it does not know
// before offering it (up to 3 s for every new clone, whose MAC address is new), never a
// reserved one; and no other client gets it meanwhile. The teardown releases the lease
// (on a local libvirt: a DHCPRELEASE on the NIC's behalf) and removes the entry
// (Unreserve), so a network's range serves jobs for ever, however many come and go.

// Networks reads libvirt networks, their leases, and changes their live DHCP host entries.
type Networks interface {
	NetworkLookupByName(name string) (libvirt.Network, error)
	ConnectListAllNetworks(needResults int32, flags libvirt.ConnectListAllNetworksFlags) ([]libvirt.Network, uint32, error)
	NetworkGetXMLDesc(net libvirt.Network, flags uint32) (string, error)
	NetworkUpdateCompat(net libvirt.Network, cmd libvirt.NetworkUpdateCommand, section libvirt.NetworkUpdateSection, parentIndex int32, xml string, flags libvirt.NetworkUpdateFlags) error
	NetworkGetDhcpLeases(net libvirt.Network, mac libvirt.OptString, needResults int32, flags uint32) ([]libvirt.NetworkDhcpLease, uint32, error)
	NwfilterLookupByName(name string) (libvirt.Nwfilter, error)
	NwfilterDefineXML(xml string) (libvirt.Nwfilter, error)
}

// LeaseTime is the lease of an instance's reserved address. Short, so that a lease its
// teardown could not release (a remote libvirt, where no DHCPRELEASE can be sent on the
// NIC's behalf) holds its address minutes, not the network's hour; the guest renews it
// every half of it meanwhile. dnsmasq's shortest is 2 minutes.
const LeaseTime = 10 // minutes

// Reservation is an address an instance's NIC has on a libvirt network, and where.
type Reservation struct {
	Network, MAC, IP string
	Gateway          string
	Subnet           *net.IPNet
}

// dhcpScope is where a network hands out IPv4 addresses with DHCP.
type dhcpScope struct {
	index   int // of its <ip> among the network's, for NetworkUpdate
	gateway net.IP
	subnet  *net.IPNet
	ranges  [][2]uint32
	hosts   []libvirtxml.NetworkDHCPHost
	bridge  string
}

// scopeOf reads the network XML x: its first IPv4 <ip> with a DHCP range, if any.
func scopeOf(x string) (*dhcpScope, error) {
	var n libvirtxml.Network
	if err := n.Unmarshal(x); err != nil {
		return nil, err
	}
	for i, ip := range n.IPs {
		if ip.DHCP == nil || len(ip.DHCP.Ranges) == 0 || (ip.Family != "" && ip.Family != "ipv4") {
			continue
		}
		gw := net.ParseIP(ip.Address).To4()
		if gw == nil {
			continue
		}
		mask := net.IPMask(net.ParseIP(ip.Netmask).To4())
		if ip.Prefix != 0 {
			mask = net.CIDRMask(int(ip.Prefix), 32)
		}
		if mask == nil {
			mask = gw.DefaultMask()
		}
		s := &dhcpScope{index: i, gateway: gw, subnet: &net.IPNet{IP: gw.Mask(mask), Mask: mask}, hosts: ip.DHCP.Hosts}
		if n.Bridge != nil {
			s.bridge = n.Bridge.Name
		}
		for _, r := range ip.DHCP.Ranges {
			a, b := net.ParseIP(r.Start).To4(), net.ParseIP(r.End).To4()
			if a == nil || b == nil {
				continue
			}
			s.ranges = append(s.ranges, [2]uint32{binary.BigEndian.Uint32(a), binary.BigEndian.Uint32(b)})
		}
		if len(s.ranges) > 0 {
			return s, nil
		}
	}
	return nil, nil
}

func ipOf(u uint32) net.IP { return binary.BigEndian.AppendUint32(nil, u) }

// free is the addresses of s's ranges that neither a host entry nor a lease of another
// MAC address holds, nor the gateway is, in order.
func (s *dhcpScope) free(leases []libvirt.NetworkDhcpLease) []net.IP {
	taken := map[string]bool{s.gateway.String(): true}
	for _, h := range s.hosts {
		taken[h.IP] = true
	}
	for _, l := range leases {
		taken[l.Ipaddr] = true
	}
	var out []net.IP
	for _, r := range s.ranges {
		for u := r[0]; u <= r[1] && u >= r[0]; u++ {
			ip := ipOf(u)
			if !taken[ip.String()] && s.subnet.Contains(ip) {
				out = append(out, ip)
			}
		}
	}
	return out
}

// networkNICs lists the NICs of the domain XML x that are on a libvirt network.
func networkNICs(x string) ([]Reservation, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return nil, err
	}
	var out []Reservation
	if dom.Devices == nil {
		return nil, nil
	}
	for _, iface := range dom.Devices.Interfaces {
		if iface.MAC == nil || iface.Source == nil || iface.Source.Network == nil {
			continue
		}
		out = append(out, Reservation{Network: iface.Source.Network.Network, MAC: strings.ToLower(iface.MAC.Address)})
	}
	return out, nil
}

// Reserve gives each NIC of the defined domain dom (named name) that is on a libvirt
// network with DHCP an address of its own there: a live DHCP host entry named name.
// Another prepare may take an address between the look and the entry: libvirt refuses
// the second entry, and the next free address is tried.
func (c *Conn) Reserve(ctx context.Context, dom libvirt.Domain, name string) ([]Reservation, error) {
	x, err := c.api.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if err != nil {
		return nil, fmt.Errorf("definition of %q: %w", name, err)
	}
	nics, err := networkNICs(x)
	if err != nil {
		return nil, fmt.Errorf("definition of %q: %w", name, err)
	}
	var out []Reservation
	for _, nic := range nics {
		r, err := c.reserveNIC(ctx, name, nic)
		if err != nil {
			return out, err
		}
		if r != nil {
			out = append(out, *r)
		}
	}
	if len(out) > 0 {
		return out, c.ensureJobFilter()
	}
	return out, nil
}

// reserveTries bounds how often reserveNIC takes another address after libvirt refused
// one another prepare had just taken.
const reserveTries = 8

func (c *Conn) reserveNIC(ctx context.Context, name string, nic Reservation) (*Reservation, error) {
	var last error
	for range reserveTries {
		n, s, err := c.scope(nic.Network)
		if HasCode(err, libvirt.ErrNoNetwork) {
			return nil, nil // the start says so
		}
		if err != nil || s == nil {
			return nil, err
		}
		leases, _, err := c.api.NetworkGetDhcpLeases(n, libvirt.OptString{}, 1, 0)
		if err != nil {
			return nil, fmt.Errorf("leases of network %q: %w", nic.Network, err)
		}
		free := s.free(leases)
		if len(free) == 0 {
			return nil, fmt.Errorf("network %q has no free address for %s: every address of its DHCP range is leased or reserved (%d host entries, %d leases)",
				nic.Network, name, len(s.hosts), len(leases))
		}
		// Concurrent prepares see the same free addresses: each starts at a place of its own.
		ip := free[rand.IntN(min(len(free), 16))]
		host := libvirtxml.NetworkDHCPHost{MAC: nic.MAC, Name: name, IP: ip.String(), Lease: &libvirtxml.NetworkDHCPLease{Expiry: LeaseTime, Unit: "minutes"}}
		hx, err := host.Marshal()
		if err != nil {
			return nil, err
		}
		var took time.Duration
		err = c.step(ctx, name, fmt.Sprintf("reserve %s for %s on network %q", ip, nic.MAC, nic.Network), &took, func() error {
			return c.api.NetworkUpdateCompat(n, libvirt.NetworkUpdateCommandAddLast, libvirt.NetworkSectionIPDhcpHost, int32(s.index), hx, libvirt.NetworkUpdateAffectLive)
		})
		if err == nil {
			return &Reservation{Network: nic.Network, MAC: nic.MAC, IP: ip.String(), Gateway: s.gateway.String(), Subnet: s.subnet}, nil
		}
		if ctx.Err() != nil || !HasCode(err, libvirt.ErrOperationInvalid) {
			return nil, err
		}
		last = err // another prepare took it meanwhile
	}
	return nil, fmt.Errorf("network %q: no address could be reserved for %s in %d tries: %w", nic.Network, name, reserveTries, last)
}

// reservations lists what the instance name (whose XML is x) has reserved on its
// networks, as their host entries say.
func (c *Conn) reservations(name, x string) ([]Reservation, error) {
	nics, err := networkNICs(x)
	if err != nil {
		return nil, fmt.Errorf("definition of %q: %w", name, err)
	}
	var out []Reservation
	for _, nic := range nics {
		s, err := c.dhcpOf(nic.Network)
		if err != nil {
			return nil, err
		}
		if s == nil {
			continue
		}
		for _, h := range s.hosts {
			if strings.EqualFold(h.MAC, nic.MAC) && h.Name == name {
				out = append(out, Reservation{Network: nic.Network, MAC: nic.MAC, IP: h.IP, Gateway: s.gateway.String(), Subnet: s.subnet})
			}
		}
	}
	return out, nil
}

// dhcpOf is network's live DHCP scope; nil where the network is gone or hands out no
// IPv4 addresses.
func (c *Conn) dhcpOf(network string) (*dhcpScope, error) {
	_, s, err := c.scope(network)
	if HasCode(err, libvirt.ErrNoNetwork) {
		return nil, nil
	}
	return s, err
}

// scope is network's live DHCP scope; nil where it hands out no IPv4 addresses.
func (c *Conn) scope(network string) (libvirt.Network, *dhcpScope, error) {
	n, err := c.api.NetworkLookupByName(network)
	if err != nil {
		return n, nil, fmt.Errorf("network %q: %w", network, err)
	}
	x, err := c.api.NetworkGetXMLDesc(n, 0)
	if err != nil {
		return n, nil, fmt.Errorf("network %q: %w", network, err)
	}
	s, err := scopeOf(x)
	if err != nil {
		return n, nil, fmt.Errorf("network %q: %w", network, err)
	}
	return n, s, nil
}

// Unreserve gives back what the instance name (whose definition is x) holds on its
// networks: each NIC's lease (released where libvirt is local) and the host entry named
// name. A network that is gone, or holds nothing of it, is fine.
func (c *Conn) Unreserve(name, x string) error {
	nics, err := networkNICs(x)
	if err != nil {
		return fmt.Errorf("definition of %q: %w", name, err)
	}
	return c.Unreserved(name, nics)
}

func (c *Conn) unreserve(name string, nic Reservation) error {
	n, s, err := c.scope(nic.Network)
	if HasCode(err, libvirt.ErrNoNetwork) {
		return nil
	}
	if err != nil || s == nil {
		return err
	}
	// Best effort: a lease not released ends by itself (in LeaseTime, where it was
	// reserved), and an instance that cannot be removed would hold far more.
	if c.local && s.bridge != "" {
		leases, _, _ := c.api.NetworkGetDhcpLeases(n, libvirt.OptString{nic.MAC}, 1, 0)
		for _, l := range leases {
			if len(l.Mac) == 0 || !strings.EqualFold(l.Mac[0], nic.MAC) || l.Type != int32(libvirt.IPAddrTypeIpv4) {
				continue
			}
			var clientID string
			if len(l.Clientid) > 0 {
				clientID = l.Clientid[0]
			}
			_ = releaseLease(s.bridge, s.gateway, net.ParseIP(l.Ipaddr), nic.MAC, clientID)
		}
	}
	for _, h := range s.hosts {
		if !strings.EqualFold(h.MAC, nic.MAC) || h.Name != name {
			continue
		}
		hx, err := h.Marshal()
		if err != nil {
			return err
		}
		err = c.api.NetworkUpdateCompat(n, libvirt.NetworkUpdateCommandDelete, libvirt.NetworkSectionIPDhcpHost, int32(s.index), hx, libvirt.NetworkUpdateAffectLive)
		if err != nil && !HasCode(err, libvirt.ErrOperationInvalid) {
			return fmt.Errorf("remove %s's host entry (%s) from network %q: %w", name, h.IP, nic.Network, err)
		}
	}
	return nil
}

// Strays lists the host entries (as reservations, with the name they carry) that are
// named like instances of prefix but whose instance is gone: made for an instance that
// was then removed by hand (virsh undefine), not by a teardown. The entries are read
// before the domains: an instance is defined before its entry is made, so a prepare
// under way is never taken for gone.
func (c *Conn) Strays(prefix string) (map[string][]Reservation, error) {
	nets, _, err := c.api.ConnectListAllNetworks(1, libvirt.ConnectListNetworksActive)
	if err != nil {
		return nil, fmt.Errorf("list networks: %w", err)
	}
	found := map[string][]Reservation{}
	for _, n := range nets {
		s, err := c.dhcpOf(n.Name)
		if err != nil {
			return nil, err
		}
		if s == nil {
			continue
		}
		for _, h := range s.hosts {
			if prefix != "" && strings.HasPrefix(h.Name, prefix) {
				found[h.Name] = append(found[h.Name], Reservation{Network: n.Name, MAC: strings.ToLower(h.MAC), IP: h.IP})
			}
		}
	}
	if len(found) == 0 {
		return nil, nil
	}
	doms, _, err := c.api.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	for _, d := range doms {
		delete(found, d.Name)
	}
	return found, nil
}

// Unreserved gives back what the instance name holds for each of its NICs rs (network
// and MAC address): Unreserve's work for a defined instance, gc's for a gone one.
func (c *Conn) Unreserved(name string, rs []Reservation) error {
	var errs []error
	for _, r := range rs {
		if err := c.unreserve(name, r); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// NetworkRange is how many addresses the IPv4 DHCP range of network holds (0: it hands
// out none), and how many of them a host entry or a lease holds now.
func (c *Conn) NetworkRange(network string) (size, held int, err error) {
	n, s, err := c.scope(network)
	if err != nil || s == nil {
		return 0, 0, err
	}
	for _, r := range s.ranges {
		size += int(r[1]-r[0]) + 1
	}
	leases, _, err := c.api.NetworkGetDhcpLeases(n, libvirt.OptString{}, 1, 0)
	if err != nil {
		return size, 0, fmt.Errorf("leases of network %q: %w", network, err)
	}
	return size, size - len(s.free(leases)), nil
}

// NetworksOf lists the libvirt networks the NICs of the domain XML x are on.
func NetworksOf(x string) ([]string, error) {
	nics, err := networkNICs(x)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, n := range nics {
		out = append(out, n.Network)
	}
	return out, nil
}

// CanFilter says why libvirt cannot put the job filter on a NIC (no nwfilter driver, or
// no clean-traffic filter), or nil.
func (c *Conn) CanFilter() error {
	if _, err := c.api.NwfilterLookupByName("clean-traffic"); err != nil {
		return fmt.Errorf("libvirt's network filter clean-traffic: %w", err)
	}
	return nil
}

// NetworkHostAccess names the NICs of the domain XML x whose libvirt network hands the
// guest to the host's own network plumbing, where libvirt isolates no port: forward mode
// hostdev or passthrough (a host NIC of its own), private or vepa (macvtap), or bridge
// onto a host NIC rather than a bridge (macvtap too). A network that is not there is
// left to libvirt's own error at the define.
func (c *Conn) NetworkHostAccess(x string) ([]string, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return nil, err
	}
	if dom.Devices == nil {
		return nil, nil
	}
	var out []string
	for _, iface := range dom.Devices.Interfaces {
		if iface.Source == nil || iface.Source.Network == nil {
			continue
		}
		name := iface.Source.Network.Network
		n, err := c.api.NetworkLookupByName(name)
		if HasCode(err, libvirt.ErrNoNetwork) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("network %q: %w", name, err)
		}
		nx, err := c.api.NetworkGetXMLDesc(n, 0)
		if err != nil {
			return nil, fmt.Errorf("network %q: %w", name, err)
		}
		var net libvirtxml.Network
		if err := net.Unmarshal(nx); err != nil {
			return nil, fmt.Errorf("network %q: %w", name, err)
		}
		if net.Forward == nil {
			continue
		}
		switch mode := net.Forward.Mode; {
		case mode == "hostdev" || mode == "passthrough" || mode == "private" || mode == "vepa",
			mode == "bridge" && (net.Bridge == nil || net.Bridge.Name == ""):
			out = append(out, fmt.Sprintf("an <interface> on network %q, forward mode %s (host network plumbing: only NAT, routed, isolated and bridge networks are isolated)", name, mode))
		}
	}
	return out, nil
}
