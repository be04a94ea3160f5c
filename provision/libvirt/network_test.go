package libvirt

import (
	"net"
	"testing"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The scope is the first IPv4 <ip> with a DHCP range: its index among all <ip>s (what
// NetworkUpdate's parentIndex counts), gateway, subnet (prefix or netmask), ranges and
// host entries.
func TestScopeOf(t *testing.T) {
	t.Parallel()
	s, err := scopeOf(`<network><name>default</name><bridge name='virbr0'/>
<ip family='ipv6' address='fd00::1' prefix='64'><dhcp><range start='fd00::10' end='fd00::20'/></dhcp></ip>
<ip address='192.168.1.1' netmask='255.255.255.0'/>
<ip address='192.168.122.1' netmask='255.255.255.0'><dhcp><range start='192.168.122.2' end='192.168.122.5'/>
<host mac='52:54:00:00:00:01' name='db' ip='192.168.122.3'/></dhcp></ip></network>`)
	require.NoError(t, err)
	require.NotNil(t, s)
	assert.Equal(t, 2, s.index)
	assert.Equal(t, "virbr0", s.bridge)
	assert.Equal(t, "192.168.122.1", s.gateway.String())
	assert.Equal(t, "192.168.122.0/24", s.subnet.String())
	lease := libvirt.NetworkDhcpLease{Ipaddr: "192.168.122.5"}
	assert.Equal(t, []string{"192.168.122.2", "192.168.122.4"}, ipStrings(s.free([]libvirt.NetworkDhcpLease{lease})),
		"neither a host entry's address nor a leased one")

	s, err = scopeOf(`<network><name>iso</name><bridge name='gci-iso0'/></network>`)
	require.NoError(t, err)
	assert.Nil(t, s, "no DHCP, nothing to reserve")

	s, err = scopeOf(`<network><name>n</name><ip address='10.0.0.1' prefix='30'><dhcp><range start='10.0.0.0' end='10.0.0.9'/></dhcp></ip></network>`)
	require.NoError(t, err)
	assert.Equal(t, []string{"10.0.0.0", "10.0.0.2", "10.0.0.3"}, ipStrings(s.free(nil)), "only the subnet's, never the gateway")
}

func ipStrings(ips []net.IP) []string {
	var out []string
	for _, ip := range ips {
		out = append(out, ip.String())
	}
	return out
}

// A DHCPRELEASE carries the lease's address, the client's MAC address and client id, and
// the server's id, as RFC 2131 wants and dnsmasq checks.
func TestReleasePacket(t *testing.T) {
	t.Parallel()
	p, err := releasePacket(net.ParseIP("10.0.0.1"), net.ParseIP("10.0.0.7"), "52:54:00:AB:cd:01", "ff:00:01")
	require.NoError(t, err)
	assert.Equal(t, []byte{1, 1, 6, 0}, p[:4], "BOOTREQUEST, Ethernet")
	assert.Equal(t, net.IP{10, 0, 0, 7}, net.IP(p[12:16]), "ciaddr")
	assert.Equal(t, net.HardwareAddr{0x52, 0x54, 0, 0xab, 0xcd, 1}, net.HardwareAddr(p[28:34]), "chaddr")
	assert.Equal(t, []byte{99, 130, 83, 99}, p[236:240], "magic cookie")
	assert.Equal(t, []byte{53, 1, 7, 54, 4, 10, 0, 0, 1, 61, 3, 0xff, 0, 1, 255}, p[240:])

	p, err = releasePacket(net.ParseIP("10.0.0.1"), net.ParseIP("10.0.0.7"), "52:54:00:ab:cd:01", "")
	require.NoError(t, err)
	assert.Equal(t, []byte{53, 1, 7, 54, 4, 10, 0, 0, 1, 255}, p[240:], "no client id: none sent")

	for _, c := range [][2]string{{"52:54:00", ""}, {"52:54:00:ab:cd:01", "zz"}} {
		_, err := releasePacket(net.ParseIP("10.0.0.1"), net.ParseIP("10.0.0.7"), c[0], c[1])
		assert.Error(t, err, c)
	}
	_, err = releasePacket(net.ParseIP("fd00::1"), net.ParseIP("10.0.0.7"), "52:54:00:ab:cd:01", "")
	assert.Error(t, err)
}

func TestNetworkNICs(t *testing.T) {
	t.Parallel()
	nics, err := networkNICs(`<domain><devices>
<interface type='network'><mac address='52:54:00:AA:00:01'/><source network='default'/></interface>
<interface type='bridge'><mac address='52:54:00:aa:00:02'/><source bridge='br0'/></interface>
<interface type='network'><source network='nomac'/></interface>
</devices></domain>`)
	require.NoError(t, err)
	assert.Equal(t, []Reservation{{Network: "default", MAC: "52:54:00:aa:00:01"}}, nics)
}
