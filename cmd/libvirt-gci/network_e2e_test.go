package main

// The job's network, on the systemd guest (networkd's DHCP client on a libvirt network
// served by libvirt's own dnsmasq): each clone's NIC has its address as soon as it asks
// (a host entry of its own: no ping of an address dnsmasq does not know), addresses go
// back when jobs end (a range of four serves any number of jobs), and clones at once
// have addresses of their own.

import (
	"errors"
	"fmt"
	"net"
	"os"
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

// onTestNetwork defines and starts an isolated libvirt network (no forward) whose
// dnsmasq hands out the size addresses from 10.213.NET.10 on, with dns (a <dns> element,
// or "" for none), and a variant of the systemd guest's template on it; both are gone
// when the test ends. It returns the network's name and a maker of jobs on that
// template.
func onTestNetwork(t *testing.T, l *libvirt.Libvirt, kind string, net, size int, dns string) (string, func() *gitlabJob) {
	t.Helper()
	id := jobSerial.Add(1)
	name, tmpl := fmt.Sprintf("gci-e2e-%s-%d", kind, id), fmt.Sprintf("e2e-%s-tmpl-%d", kind, id)
	if dns == "" {
		dns = "<dns enable='no'/>"
	}
	x := fmt.Sprintf(`<network><name>%s</name><bridge name='gci-%.2s-%d' stp='off'/>%s
<ip address='10.213.%d.1' prefix='24'><dhcp><range start='10.213.%[5]d.10' end='10.213.%[5]d.%d'/></dhcp></ip></network>`,
		name, kind, id%10000, dns, net, 10+size-1)
	n, err := l.NetworkDefineXML(x)
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = l.NetworkDestroy(n)
		_ = l.NetworkUndefine(n)
	})
	require.NoError(t, l.NetworkCreate(n))
	x = templateVariantOf(t, l, testSystemdTmpl, tmpl, `<source network='gci-dhcp'/>`, "<source network='"+name+"'/>")
	require.Contains(t, x, name)
	dom, err := l.DomainDefineXMLFlags(x, 0)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.DomainUndefine(dom) })
	return name, func() *gitlabJob {
		j := newSystemdJob(t, "agent")
		j.env["CUSTOM_ENV_DISTRO"] = tmpl
		j.env["LIBVIRT_GCI_TEMPLATES"] = tmpl
		return j
	}
}

// networkHolds lists what the network name holds for instances whose names start with
// prefix: host entries, and leases (their host name is the instance's).
func networkHolds(t testing.TB, l *libvirt.Libvirt, name, prefix string) []string {
	t.Helper()
	// Another test's network may go (destroyed, then undefined) at any of these calls.
	gone := func(err error) bool {
		var lerr libvirt.Error
		return errors.As(err, &lerr) && (lerr.Code == uint32(libvirt.ErrNoNetwork) || lerr.Code == uint32(libvirt.ErrOperationInvalid))
	}
	n, err := l.NetworkLookupByName(name)
	if gone(err) {
		return nil
	}
	require.NoError(t, err)
	x, err := l.NetworkGetXMLDesc(n, 0)
	if gone(err) {
		return nil
	}
	require.NoError(t, err)
	var held []string
	for _, m := range regexp.MustCompile(`<host [^>]*name='([^']+)'[^>]*ip='([^']+)'`).FindAllStringSubmatch(x, -1) {
		if strings.HasPrefix(m[1], prefix) {
			held = append(held, "host entry "+m[1]+" "+m[2])
		}
	}
	leases, _, err := l.NetworkGetDhcpLeases(n, libvirt.OptString{}, 1, 0)
	if gone(err) {
		return held
	}
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

// prepareAtOnce runs the jobs' prepares at once.
func prepareAtOnce(jobs []*gitlabJob) []result {
	prepared := make([]result, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Add(1)
		go func() { defer wg.Done(); prepared[i] = j.stage("prepare") }()
	}
	wg.Wait()
	return prepared
}

// A network whose range holds 4 addresses serves 4 jobs at once, then 20 in a row, each
// with an address of its own at once (restored, and cold booted); after them the network
// holds nothing of theirs.
func TestNetworkRangeServesEveryJob(t *testing.T) {
	t.Parallel()
	l := lv(t)
	netName, job := onTestNetwork(t, l, "net4", 215, 4, "")
	job().warm()
	if t.Failed() {
		return
	}

	// 4 at once.
	jobs := []*gitlabJob{job(), job(), job(), job()}
	prepared := prepareAtOnce(jobs)
	seen := map[string]string{}
	for i, j := range jobs {
		require.Equal(t, 0, prepared[i].code, prepared[i].stderr)
		name := j.instance()
		assert.Contains(t, prepared[i].stderr, "restored "+j.env["CUSTOM_ENV_DISTRO"]+" into "+name)
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
	prepared := prepareAtOnce(jobs)
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

// listen is a stage script that leaves a listener running in the guest (a unit of its
// own, past the stage's end): whatever reaches its TCP and UDP port 7777 is written,
// with where it came from, to /run/heard.
const listen = `: >/run/heard
systemd-run --quiet --unit=gci-listen perl -MIO::Socket::INET -MIO::Select -e '
$| = 1;
open(my $h, ">>", "/run/heard") or die; $h->autoflush(1);
my $t = IO::Socket::INET->new(LocalPort => 7777, Listen => 5, ReuseAddr => 1) or die "tcp: $!";
my $u = IO::Socket::INET->new(LocalPort => 7777, Proto => "udp") or die "udp: $!";
my $s = IO::Select->new($t, $u);
while (1) { for my $r ($s->can_read) {
  if ($r == $t) { my $c = $t->accept; print $h "tcp from ", $c->peerhost, "\n"; close $c }
  else { my $m; my $from = $u->recv($m, 1500); my ($p, $a) = sockaddr_in($from); print $h "udp from ", inet_ntoa($a), " ($m)\n" }
} }'
for i in $(seq 50); do ss -lun | grep -q ':7777 ' && ss -ltn | grep -q ':7777 ' && exit 0; sleep 0.1; done
echo "the listener did not start" >&2; exit 1`

// probe is a root job's attempts, as a stage script: $1 the neighbour's address, $2 its
// MAC address, $3 the gateway, $4 the host's port there. What reaches the gateway's
// port is the host's to tell; what reaches the neighbour, its /run/heard. It prints
// "dns <address>" for the gateway's answer to gw.gci.test.
const probe = `nb=$1 nbmac=$2 gw=$3 hport=$4
dev=$(ip -4 -o addr show scope global | awk '$4 !~ /^10\.213\.213\./ {print $2; exit}')
own=$(cat /sys/class/net/$dev/address)
ownip=$(ip -4 -o addr show dev "$dev" scope global | awk '{print $4; exit}'); ownip=${ownip%/*}
send() { # from-addr from-port to-addr to-port message
  perl -MIO::Socket::INET -e '
    my %o = (PeerAddr => $ARGV[2], PeerPort => $ARGV[3], Proto => "udp");
    $o{LocalAddr} = $ARGV[0] if $ARGV[0]; $o{LocalPort} = $ARGV[1] if $ARGV[1];
    my $s = IO::Socket::INET->new(%o) or die "udp $ARGV[0]:$ARGV[1] -> $ARGV[2]:$ARGV[3]: $!";
    $s->send($ARGV[4]) for 1..3' "$@" || true
}
tcp() { timeout 3 bash -c "exec 3<>/dev/tcp/$1/7777" 2>/dev/null && echo "tcp to $1 connected" || true; }
send "" "" "$gw" "$hport" own
send "" "" "$nb" 7777 direct; tcp "$nb"
ip route add "$nb/32" via "$gw" dev "$dev"
send "" "" "$nb" 7777 routed; tcp "$nb"
ip route del "$nb/32" via "$gw" dev "$dev"
ip addr add "$nb/32" dev "$dev"
send "$nb" "" "$gw" "$hport" spoofed-ip; send "$nb" "" "$nb" 7777 spoofed-ip
ip addr del "$nb/32" dev "$dev"
send "" 67 "$gw" "$hport" dhcp-server; send "" 67 255.255.255.255 68 dhcp-server
ip link set dev "$dev" address "$nbmac"
send "$ownip" "" "$gw" "$hport" spoofed-mac
ip link set dev "$dev" address "$own"
perl -MIO::Socket::INET -e '
  my $q = pack("n6", 0x4743, 0x0100, 1, 0, 0, 0) . join("", map { chr(length) . $_ } split /\./, "gw.gci.test") . "\0" . pack("n2", 1, 1);
  my $s = IO::Socket::INET->new(PeerAddr => $ARGV[0], PeerPort => 53, Proto => "udp") or die "dns: $!";
  for (1..3) { $s->send($q); my $r; my $in = ""; vec($in, fileno($s), 1) = 1;
    if (select($in, undef, undef, 2)) { $s->recv($r, 1500); my $an = unpack("x6 n", $r);
      if ($an) { print "dns ", join(".", unpack("C4", substr($r, -4))), "\n"; exit } } }
  print "dns none\n"' "$gw"`

// A root job cannot reach another job's VM on the same network, directly or routed
// through the gateway (with the host forwarding IPv4), nor send with another's address
// (IP or MAC) or as a DHCP server; it still reaches the gateway, its DNS among it.
func TestNetworkIsolation(t *testing.T) {
	t.Parallel()
	l := lv(t)
	const gw = "10.213.216.1"
	_, job := onTestNetwork(t, l, "iso", 216, 41,
		`<domain name='gci.test' localOnly='yes'/><dns><host ip='`+gw+`'><hostname>gw.gci.test</hostname></host></dns>`)
	forwarding(t, "1")
	// The host's port on the gateway, and what reaches it.
	hc, err := net.ListenPacket("udp4", gw+":0")
	require.NoError(t, err)
	t.Cleanup(func() { hc.Close() })
	var mu sync.Mutex
	var heard []string
	go func() {
		buf := make([]byte, 1500)
		for {
			k, from, err := hc.ReadFrom(buf)
			if err != nil {
				return
			}
			mu.Lock()
			heard = append(heard, fmt.Sprintf("%s %s", from, buf[:k]))
			mu.Unlock()
		}
	}()
	hport := hc.LocalAddr().(*net.UDPAddr).Port

	a, b := job(), job()
	a.warm()
	if t.Failed() {
		return
	}
	a.prepare()
	b.prepare()
	r := b.run("build_script", listen)
	require.Equal(t, 0, r.code, r.stderr)
	r = b.run("build_script", `dev=$(ip -4 -o addr show scope global | awk '$4 !~ /^10\.213\.213\./ {print $2; exit}')
cat /sys/class/net/$dev/address; ip -4 -o addr show dev $dev scope global | awk '{print $4}'`)
	require.Equal(t, 0, r.code, r.stderr)
	out := strings.Fields(r.stdout)
	require.Len(t, out, 2, r.stdout)
	nbMAC, nbAddr := out[0], strings.TrimSuffix(out[1], "/24")

	r = a.run("build_script", "set -- "+nbAddr+" "+nbMAC+" "+gw+" "+fmt.Sprint(hport)+"\n"+probe+"\nip -4 -o addr show scope global | awk '{print \"own \" $4}'")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "dns "+gw, "the job still reaches the gateway's DNS")
	assert.NotContains(t, r.stdout, "connected", "no TCP connection to the neighbour")
	own := regexp.MustCompile(`own (\S+)/24`).FindStringSubmatch(r.stdout)
	require.NotNil(t, own, r.stdout)

	r = b.run("build_script", "cat /run/heard")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Empty(t, strings.TrimSpace(r.stdout), "nothing of the other job's reached the neighbour")
	time.Sleep(500 * time.Millisecond) // the last of the job's datagrams, on their way
	mu.Lock()
	defer mu.Unlock()
	require.NotEmpty(t, heard, "the job's own datagram reached the gateway")
	for _, h := range heard {
		assert.Regexp(t, `^`+regexp.QuoteMeta(own[1])+`:\d+ own$`, h, "only the job's own datagrams, from its own address, reach the host")
	}
}

// forwarding sets the host's net.ipv4.ip_forward to v for the test, and puts it back.
func forwarding(t *testing.T, v string) {
	t.Helper()
	const p = "/proc/sys/net/ipv4/ip_forward"
	old, err := os.ReadFile(p)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(p, []byte(v), 0o644))
	t.Cleanup(func() { _ = os.WriteFile(p, old, 0o644) })
}
