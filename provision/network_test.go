package provision

import (
	"bytes"
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// Each NIC on a libvirt network with DHCP gets an address of its own before it runs (a
// live host entry named after the instance), booted or restored, and the guest has that
// address; the teardown gives it back.
func TestLaunchReservesItsAddress(t *testing.T) {
	t.Parallel()
	for _, start := range []string{StartBoot, StartRestore} {
		t.Run(start, func(t *testing.T) {
			t.Parallel()
			f := provisiontest.New("ci")
			var log bytes.Buffer
			h := readyHost(t, f, &log, time.Minute)
			h.Start = start
			require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
			hosts := f.Hosts("ci-net")
			require.Len(t, hosts, 1, "the warm image's own entry went with its domain")
			mac, ip, name := splitHost(t, hosts[0])
			assert.Equal(t, "gci-a", name)
			assert.Contains(t, domainXML(t, f, "gci-a"), mac)
			assert.Contains(t, log.String(), "eth0 "+ip+"/24 on network ci-net")
			assert.Contains(t, log.String(), "address "+ip+" on ci-net reserved in")
			x := domainXML(t, f, "gci-a")
			assert.Regexp(t, `<filterref filter="libvirt-gci-job-2">\s*<parameter name="IP" value="`+regexp.QuoteMeta(ip)+`"></parameter>\s*`+
				`<parameter name="GATEWAY" value="10.9.8.1"></parameter>\s*<parameter name="SUBNET" value="10.9.8.0"></parameter>\s*<parameter name="PREFIX" value="24">`, x,
				"its NIC is held to its own address")
			assert.Equal(t, 1, strings.Count(x, "<filterref"))

			require.NoError(t, h.Remove(context.Background(), "gci-a", nil))
			assert.Empty(t, f.Hosts("ci-net"))
			assert.NotContains(t, f.State(), "host ")
		})
	}
}

func splitHost(t *testing.T, h string) (mac, ip, name string) {
	t.Helper()
	f := strings.Fields(h)
	require.Len(t, f, 3, h)
	return f[0], f[1], f[2]
}

// A range with no address left fails the launch at once, saying so, and leaves nothing;
// an address given back serves the next instance.
func TestLaunchFullRange(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	f.AddNetwork(provisiontest.DHCPNetwork("ci-net", 2))
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-b")))
	hosts := f.Hosts("ci-net")
	require.Len(t, hosts, 2)
	_, ipA, _ := splitHost(t, hosts[0])
	_, ipB, _ := splitHost(t, hosts[1])
	assert.NotEqual(t, ipA, ipB)

	err := h.Launch(context.Background(), launchReq("gci-c"))
	require.ErrorContains(t, err, `network "ci-net" has no free address for gci-c: every address of its DHCP range is leased or reserved (2 host entries, 2 leases)`)
	assert.NotContains(t, f.State(), "gci-c")

	require.NoError(t, h.Remove(context.Background(), "gci-a", nil))
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-c")))
	hosts = f.Hosts("ci-net")
	require.Len(t, hosts, 2)
	_, ipC, name := splitHost(t, hosts[1])
	assert.Equal(t, "gci-c", name)
	assert.Equal(t, ipA, ipC, "gci-a's address, given back")
}

// An address another prepare reserved between the look and the entry (libvirt refuses a
// second entry with it) is passed over for another.
func TestLaunchReserveRace(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	f.FailNth("NetworkUpdateCompat", 1, golibvirt.Error{Code: uint32(golibvirt.ErrOperationInvalid), Message: "there is an existing dhcp host entry"})
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	assert.Len(t, f.Hosts("ci-net"), 1)
	assert.Equal(t, 2, countCalls(f, "NetworkUpdateCompat"))
}

// An instance removed by hand (virsh undefine) leaves its host entry: gc gives it back,
// and touches neither a running instance's entry nor one not named like ours.
func TestGCGivesBackAddressesOfGoneInstances(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	h.Out = &bytes.Buffer{}
	h.Start = StartBoot
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-b")))
	n, err := f.NetworkLookupByName("ci-net")
	require.NoError(t, err)
	require.NoError(t, f.NetworkUpdateCompat(n, golibvirt.NetworkUpdateCommandAddLast, golibvirt.NetworkSectionIPDhcpHost, 1,
		"<host mac='52:54:00:00:00:99' name='db' ip='10.9.8.60'/>", golibvirt.NetworkUpdateAffectLive))
	d := mustLookup(t, f, "gci-a")
	require.NoError(t, f.DomainDestroyFlags(d, 0))
	require.NoError(t, f.DomainUndefineFlags(d, 0))
	require.Len(t, f.Hosts("ci-net"), 3)

	sw, err := h.GC(context.Background(), true, 0)
	require.NoError(t, err)
	assert.Zero(t, sw.Addresses, "a dry run gives nothing back")
	assert.Contains(t, h.Out.(*bytes.Buffer).String(), "would give back gci-a's address")
	require.Len(t, f.Hosts("ci-net"), 3)

	sw, err = h.GC(context.Background(), false, 0)
	require.NoError(t, err)
	assert.Equal(t, 1, sw.Addresses)
	hosts := f.Hosts("ci-net")
	require.Len(t, hosts, 2)
	assert.Contains(t, hosts[0]+hosts[1], "gci-b")
	assert.Contains(t, hosts[0]+hosts[1], " db")
}

// doctor says of each template's network whether its range holds MAX_INSTANCES jobs,
// and that one without a DHCP range reserves nothing.
func TestDoctorNetworks(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	req := DoctorRequest{Offered: func(name string, _ bool) bool { return name == "tmpl" }}
	network := func() Finding {
		t.Helper()
		for _, fd := range h.Doctor(context.Background(), req) {
			if fd.Check == "network ci-net" {
				return fd
			}
		}
		t.Fatal("no finding of network ci-net")
		return Finding{}
	}
	h.Limits.Instances = 8
	fd := network()
	assert.Equal(t, FindingOK, fd.Status, "%+v", fd)
	assert.Equal(t, "64 addresses in its DHCP range, 0 held now; each job gets one reserved, under the network filter libvirt-gci-job-2", fd.Detail)

	h.Limits.Instances = 100
	fd = network()
	assert.Equal(t, FindingProblem, fd.Status)
	assert.Contains(t, fd.Detail, "its DHCP range holds 64 addresses, fewer than LIBVIRT_GCI_MAX_INSTANCES 100")

	f.AddNetwork(`<network><name>ci-net</name><bridge name='br-x'/></network>`)
	fd = network()
	assert.Equal(t, FindingNote, fd.Status)
	assert.Contains(t, fd.Detail, "no IPv4 DHCP range")
}

// A libvirtd that stalls while it puts a restored clone's network filter on does not
// hold the prepare past its boot timeout, and the prepare says what it waited for.
func TestFilterStallIsBounded(t *testing.T) {
	t.Parallel()
	f, _, h, _ := firstRestore(t)
	h.BootTimeout = time.Second
	gate := f.Gate("DomainUpdateDeviceFlags")
	t.Cleanup(func() { close(gate) })
	start := time.Now()
	err := h.Launch(context.Background(), launchReq("gci-b"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "the network filters of gci-b")
	assert.Less(t, time.Since(start), 15*time.Second, "bounded by the boot timeout, not by libvirtd")
}

// A template NIC on a libvirt network that hands it to the host's own network plumbing
// (macvtap, a host NIC of its own) is refused like any host access (issue 36): libvirt
// isolates no port there, so clones would reach each other and the host's LAN as the
// host does. The operator may allow it.
func TestTemplateOnAHostPlumbingNetworkIsRefused(t *testing.T) {
	t.Parallel()
	for _, fwd := range []string{`<forward mode='bridge'><interface dev='eth0'/></forward>`, `<forward mode='hostdev' managed='yes'><pf dev='eth1'/></forward>`, `<forward mode='private'><interface dev='eth0'/></forward>`} {
		f := provisiontest.New("ci")
		var log bytes.Buffer
		h := readyHost(t, f, &log, time.Minute)
		f.AddNetwork(`<network><name>ci-net</name>` + fwd + `</network>`)
		err := h.Launch(context.Background(), launchReq("gci-a"))
		require.ErrorContains(t, err, `an <interface> on network "ci-net", forward mode`, fwd)
		assert.ErrorContains(t, err, "LIBVIRT_GCI_ALLOW_HOST_ACCESS")
		assert.NotContains(t, f.State(), "gci-a", "nothing made")
		h.AllowHostAccess = true
		assert.NoError(t, h.Launch(context.Background(), launchReq("gci-a")), fwd)
	}
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	f.AddNetwork(`<network><name>ci-net</name><forward mode='bridge'/><bridge name='br0'/></network>`)
	assert.NoError(t, h.Launch(context.Background(), launchReq("gci-a")), "a host bridge isolates its ports")
}
