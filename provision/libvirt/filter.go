package libvirt

import (
	"fmt"
	"net"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// What a job's NIC may send and receive on a libvirt network where it has a reserved
// address: a network filter (nwfilter) of our own, instantiated on the NIC's tap device
// by libvirt itself. Port isolation (template's isolate) already keeps instances on one
// bridge from reaching each other's ports; the filter adds what isolation cannot:
//   - what libvirt's clean-traffic holds a NIC to: frames only with its own MAC
//     address, IPv4 only from its own address (or 0.0.0.0 for DHCP), ARP only for its
//     own MAC and IPv4 addresses, no other protocol (no IPv6, no RARP);
//   - no DHCP server: nothing from UDP port 67 (a job answering others' DISCOVERs);
//   - no neighbour through the gateway: IPv4 from the network's subnet reaches the NIC
//     only from the gateway itself. With the host forwarding IPv4 (every host with a NAT
//     network does), a job that routes a neighbour's address via the gateway has its
//     packets forwarded back onto the bridge, past port isolation; they stop here.
// The guest still reaches the gateway (DHCP, DNS) and, through it, whatever the network
// forwards to.
//
// All its rules are in the root chain of one filter: libvirt runs an ebtables command
// for each rule and several for each chain, each tens of milliseconds (ebtables-nft),
// and a restored clone waits for them. clean-traffic and its seven filters, in five
// chains, and a chain of our own took libvirt 111 ebtables commands and about 3 s for a
// NIC; this filter takes 35 and 1.1-1.4 s.

// JobFilter is the nwfilter each such NIC references. Its name carries a version: a
// filter whose rules change gets a new name, so that instances running under the old
// one keep it, and the new is defined beside it.
const JobFilter = "libvirt-gci-job-2"

var jobFilters = []struct{ name, xml string }{
	{JobFilter, `<filter name='` + JobFilter + `' chain='root'>
  <rule action='drop' direction='out' priority='100'>
    <mac match='no' srcmacaddr='$MAC'/>
  </rule>
  <rule action='drop' direction='out' priority='200'>
    <ip protocol='udp' srcportstart='67' srcportend='67'/>
  </rule>
  <rule action='accept' direction='out' priority='300'>
    <ip srcipaddr='0.0.0.0' protocol='udp'/>
  </rule>
  <rule action='accept' direction='out' priority='310'>
    <ip srcipaddr='$IP'/>
  </rule>
  <rule action='accept' direction='out' priority='400'>
    <arp arpsrcmacaddr='$MAC' arpsrcipaddr='$IP'/>
  </rule>
  <rule action='accept' direction='in' priority='200'>
    <ip srcipaddr='$GATEWAY'/>
  </rule>
  <rule action='drop' direction='in' priority='210'>
    <ip srcipaddr='$SUBNET' srcipmask='$PREFIX'/>
  </rule>
  <rule action='accept' direction='in' priority='300'>
    <ip/>
  </rule>
  <rule action='accept' direction='in' priority='400'>
    <arp/>
  </rule>
  <rule action='drop' direction='inout' priority='1000'/>
</filter>`},
}

// ensureJobFilter defines the job filter (and the one it references) where libvirt does
// not have them yet.
func (c *Conn) ensureJobFilter() error {
	for _, f := range jobFilters {
		_, err := c.api.NwfilterLookupByName(f.name)
		if err == nil {
			continue
		}
		if !HasCode(err, libvirt.ErrNoNwfilter) {
			return fmt.Errorf("network filter %s: %w", f.name, err)
		}
		if _, err := c.api.NwfilterDefineXML(f.xml); err != nil && !HasCode(err, libvirt.ErrOperationFailed) {
			return fmt.Errorf("define network filter %s: %w", f.name, err)
		}
	}
	return nil
}

// filterRef is the job filter with the reservation r's parameters.
func filterRef(r Reservation) *libvirtxml.DomainInterfaceFilterRef {
	return &libvirtxml.DomainInterfaceFilterRef{Filter: JobFilter, Parameters: []libvirtxml.DomainInterfaceFilterParam{
		{Name: "IP", Value: r.IP}, {Name: "GATEWAY", Value: r.Gateway},
		{Name: "SUBNET", Value: r.Subnet.IP.String()}, {Name: "PREFIX", Value: fmt.Sprint(prefixLen(r.Subnet))},
	}}
}

func prefixLen(n *net.IPNet) int {
	ones, _ := n.Mask.Size()
	return ones
}

// filtered is the domain XML x with the job filter on each NIC that has a reservation
// in rs.
func filtered(x string, rs []Reservation) (string, error) {
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(x); err != nil {
		return "", err
	}
	if dom.Devices != nil {
		for i := range dom.Devices.Interfaces {
			iface := &dom.Devices.Interfaces[i]
			for _, r := range rs {
				if iface.MAC != nil && strings.EqualFold(iface.MAC.Address, r.MAC) {
					iface.FilterRef = filterRef(r)
				}
			}
		}
	}
	return dom.Marshal()
}

// filteredNIC is the interface XML ix with the job filter, if it has a reservation in rs.
func filteredNIC(ix string, rs []Reservation) (string, error) {
	var iface libvirtxml.DomainInterface
	if err := iface.Unmarshal(ix); err != nil {
		return "", err
	}
	for _, r := range rs {
		if iface.MAC != nil && strings.EqualFold(iface.MAC.Address, r.MAC) {
			iface.FilterRef = filterRef(r)
			return iface.Marshal()
		}
	}
	return ix, nil
}

// Filter puts the job filter on each NIC of the running instance name that has a
// reserved address and not the filter yet, leaving its link as it is. libvirt takes
// seconds to instantiate a filter (an ebtables and iptables command per rule): a
// restore does it while its guest is set up, its links still down; LinksUp then finds
// the filter in place.
func (c *Conn) Filter(name string) error {
	dom, x, rs, err := c.running(name)
	if err != nil {
		return err
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil || d.Devices == nil {
		return fmt.Errorf("XML of %q: %v", name, err)
	}
	for _, iface := range d.Devices.Interfaces {
		for _, r := range rs {
			if iface.MAC == nil || !strings.EqualFold(iface.MAC.Address, r.MAC) {
				continue
			}
			iface.FilterRef = filterRef(r)
			ix, err := iface.Marshal()
			if err != nil {
				return err
			}
			if err := c.api.DomainUpdateDeviceFlags(dom, ix, libvirt.DomainDeviceModifyLive); err != nil {
				return fmt.Errorf("instance %q: the network filter of its NIC %s: %w", name, r.MAC, err)
			}
		}
	}
	return nil
}

// running is the running instance name, its live XML and its reservations.
func (c *Conn) running(name string) (libvirt.Domain, string, []Reservation, error) {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return dom, "", nil, fmt.Errorf("look up instance %q: %w", name, err)
	}
	x, err := c.api.DomainGetXMLDesc(dom, 0)
	if err != nil {
		return dom, "", nil, fmt.Errorf("XML of %q: %w", name, err)
	}
	rs, err := c.reservations(name, x)
	if err != nil {
		return dom, "", nil, fmt.Errorf("instance %q: %w", name, err)
	}
	return dom, x, rs, nil
}
