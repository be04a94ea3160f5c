package main

// The job's network, on the systemd guest (networkd's DHCP client on a libvirt network
// served by libvirt's own dnsmasq): each clone's NIC has its address as soon as it asks
// (a host entry of its own: no ping of an address dnsmasq does not know), addresses go
// back when jobs end (a range of four serves any number of jobs), and clones at once
// have addresses of their own.

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testNetwork defines and starts an isolated libvirt network (no forward, no DNS) whose
// dnsmasq hands out the size addresses from 10.213.NET.10 on, on the bridge bridge; it
// is gone when the test ends.
func testNetwork(t *testing.T, l *libvirt.Libvirt, name, bridge string, net, size int) {
	t.Helper()
	x := fmt.Sprintf(`<network><name>%s</name><bridge name='%s' stp='off'/><dns enable='no'/>
<ip address='10.213.%d.1' prefix='24'><dhcp><range start='10.213.%[3]d.10' end='10.213.%[3]d.%d'/></dhcp></ip></network>`,
		name, bridge, net, 10+size-1)
	if old, err := l.NetworkLookupByName(name); err == nil { // an earlier run's, killed
		_ = l.NetworkDestroy(old)
		_ = l.NetworkUndefine(old)
	}
	n, err := l.NetworkDefineXML(x)
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = l.NetworkDestroy(n)
		_ = l.NetworkUndefine(n)
	})
	require.NoError(t, l.NetworkCreate(n))
}

// networkHolds lists what the network name holds for instances whose names start with
// prefix: host entries, and leases (their host name is the instance's).
func networkHolds(t testing.TB, l *libvirt.Libvirt, name, prefix string) []string {
	t.Helper()
	n, err := l.NetworkLookupByName(name)
	var lerr libvirt.Error
	if errors.As(err, &lerr) && lerr.Code == uint32(libvirt.ErrNoNetwork) {
		return nil // gone meanwhile
	}
	require.NoError(t, err)
	x, err := l.NetworkGetXMLDesc(n, 0)
	require.NoError(t, err)
	var held []string
	for _, m := range regexp.MustCompile(`<host [^>]*name='([^']+)'[^>]*ip='([^']+)'`).FindAllStringSubmatch(x, -1) {
		if strings.HasPrefix(m[1], prefix) {
			held = append(held, "host entry "+m[1]+" "+m[2])
		}
	}
	leases, _, err := l.NetworkGetDhcpLeases(n, libvirt.OptString{}, 1, 0)
	require.NoError(t, err)
	for _, le := range leases {
		if len(le.Hostname) > 0 && strings.HasPrefix(le.Hostname[0], prefix) {
			held = append(held, "lease "+le.Hostname[0]+" "+le.Ipaddr)
		}
	}
	return held
}

var networkReady = regexp.MustCompile(`network ready after ([0-9.]+) s more: \S+ (10\.213\.\d+\.\d+)/24 on network (\S+)`)

// addressOf reads a prepare's "network ready" line: the address and how long after the
// guest's set-up (which brings up a restored clone's link) it came.
func addressOf(t testing.TB, stderr string) (addr string, after time.Duration) {
	t.Helper()
	m := networkReady.FindStringSubmatch(stderr)
	require.NotNil(t, m, "no network ready line:\n%s", stderr)
	s, err := strconv.ParseFloat(m[1], 64)
	require.NoError(t, err)
	return m[2], time.Duration(s * float64(time.Second))
}

// assertReserved checks that the instance name's address on the network is the one its
// host entry reserved: dnsmasq served the reservation (it would have pinged an address
// of its own choosing, for up to 3 s, before offering it). The time after the set-up is
// logged; the figure is the bench's.
func assertReserved(t testing.TB, l *libvirt.Libvirt, network, name, addr string, after time.Duration) {
	t.Helper()
	t.Logf("%s: %s %.1f s after its set-up", name, addr, after.Seconds())
	assert.Contains(t, networkHolds(t, l, network, name), "host entry "+name+" "+addr, "%s's address is the one reserved for it", name)
}

// A network whose range holds 4 addresses serves 4 jobs at once, then 20 in a row, each
// with an address of its own at once (restored, and cold booted); after them the network
// holds nothing of theirs.
func TestNetworkRangeServesEveryJob(t *testing.T) {
	t.Parallel()
	l := lv(t)
	id := jobSerial.Add(1)
	netName, tmpl := fmt.Sprintf("gci-e2e-net4-%d", id), fmt.Sprintf("e2e-net4-tmpl-%d", id)
	testNetwork(t, l, netName, fmt.Sprintf("gci-n4-%d", id%1000), 215, 4)
	x := templateVariantOf(t, l, testSystemdTmpl, tmpl, `<source network='gci-dhcp'/>`, "<source network='"+netName+"'/>")
	require.Contains(t, x, netName)
	dom, err := l.DomainDefineXMLFlags(x, 0)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.DomainUndefine(dom) })
	job := func() *gitlabJob {
		j := newSystemdJob(t, "agent")
		j.env["CUSTOM_ENV_DISTRO"] = tmpl
		j.env["LIBVIRT_GCI_TEMPLATES"] = tmpl
		return j
	}
	job().warm()
	if t.Failed() {
		return
	}

	// 4 at once.
	jobs := []*gitlabJob{job(), job(), job(), job()}
	prepared := make([]result, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Add(1)
		go func() { defer wg.Done(); prepared[i] = j.stage("prepare") }()
	}
	wg.Wait()
	seen := map[string]string{}
	for i, j := range jobs {
		require.Equal(t, 0, prepared[i].code, prepared[i].stderr)
		name := j.instance()
		assert.Contains(t, prepared[i].stderr, "restored "+tmpl+" into "+name)
		addr, after := addressOf(t, prepared[i].stderr)
		assertReserved(t, l, netName, name, addr, after)
		assert.NotContains(t, seen, addr, "%s has %s's address", name, seen[addr])
		seen[addr] = name
		r := j.run("build_script", `ip -4 -o addr show scope global | awk '{print $4}'`)
		require.Equal(t, 0, r.code, r.stderr)
		assert.Equal(t, addr+"/24", strings.TrimSpace(r.stdout), "the guest has the address the prepare saw")
	}
	for _, j := range jobs {
		assert.Equal(t, 0, j.stage("cleanup").code)
	}
	for _, j := range jobs {
		finished(t, l, j.prefix)
		assert.Empty(t, networkHolds(t, l, netName, j.prefix), "the jobs at once gave everything back")
	}

	// 20 in a row, the last one cold booted.
	for i := range 20 {
		j := job()
		if i == 19 {
			j.env["LIBVIRT_GCI_START"] = "boot"
		}
		r := j.stage("prepare")
		if !assert.Equal(t, 0, r.code, "job %d of 20:\n%s", i+1, r.stderr) {
			j.stage("cleanup")
			break
		}
		addr, after := addressOf(t, r.stderr)
		assertReserved(t, l, netName, j.instance(), addr, after)
		assert.Equal(t, 0, j.stage("cleanup").code)
	}
}

// Eight clones restored at once on the systemd guest's network have eight addresses.
func TestNetworkEightClones(t *testing.T) {
	t.Parallel()
	jobs := make([]*gitlabJob, 8)
	for i := range jobs {
		jobs[i] = newSystemdJob(t, "agent")
	}
	jobs[0].warm()
	if t.Failed() {
		return
	}
	prepared := make([]result, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Add(1)
		go func() { defer wg.Done(); prepared[i] = j.stage("prepare") }()
	}
	wg.Wait()
	seen := map[string]int{}
	for i, j := range jobs {
		j.t.Cleanup(func() { j.stage("cleanup") })
		if !assert.Equal(t, 0, prepared[i].code, prepared[i].stderr) {
			continue
		}
		addr, after := addressOf(t, prepared[i].stderr)
		assertReserved(t, j.l, "gci-dhcp", j.instance(), addr, after)
		assert.NotContains(t, seen, addr, "clones %d and %d", seen[addr], i)
		seen[addr] = i
	}
	assert.Len(t, seen, 8)
}
