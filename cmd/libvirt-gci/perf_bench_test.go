package main

// BenchmarkPerformance: the figures of README.rst's "Performance" section, each beside
// its baseline, from one run on the test VM (make bench prints the table).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"golang.org/x/crypto/ssh"

	"github.com/libvirt-gci/libvirt-gci/guest"
)

// perfRuns is how many runs each median is of.
const perfRuns = 5

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	return s[len(s)/2]
}

// perfRow is one line of the table.
type perfRow struct{ figure, value, baseline, ratio, target string }

type perfTable struct {
	mu   sync.Mutex
	rows []perfRow
}

func (p *perfTable) add(figure, value, baseline, ratio, target string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rows = append(p.rows, perfRow{figure, value, baseline, ratio, target})
}

func (p *perfTable) print(w io.Writer) {
	head := perfRow{"figure", "value", "baseline", "ratio", "target"}
	rows := append([]perfRow{head}, p.rows...)
	width := make([]int, 5)
	for _, r := range rows {
		for i, c := range []string{r.figure, r.value, r.baseline, r.ratio, r.target} {
			width[i] = max(width[i], len(c))
		}
	}
	for _, r := range rows {
		for i, c := range []string{r.figure, r.value, r.baseline, r.ratio, r.target} {
			fmt.Fprintf(w, "%-*s  ", width[i], c)
		}
		fmt.Fprintln(w)
	}
}

func ms(d time.Duration) string { return fmt.Sprintf("%d ms", d.Milliseconds()) }

func ratio(a, b time.Duration) string {
	if b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", float64(a)/float64(b))
}

// timedStage runs a stage and returns how long it took and its process's peak RSS
// (KiB), which /usr/bin/time reads: the rusage of a process this (large) one starts
// counts this one's memory (Go starts it with vfork), that of time's child does not.
func (j *gitlabJob) timedStage(args ...string) (result, time.Duration, int64) {
	j.t.Helper()
	rusage := filepath.Join(j.dir, "rusage")
	cmd := exec.Command("/usr/bin/time", append([]string{"-f", "%M", "-o", rusage, binPath}, args...)...)
	cmd.Env = j.environ()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	took := time.Since(start)
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		j.t.Fatal(err)
	}
	b, err := os.ReadFile(rusage)
	if err != nil {
		j.t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	rss, _ := strconv.ParseInt(lines[len(lines)-1], 10, 64)
	return result{code, out.String(), errb.String()}, took, rss
}

func memAvailable() int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "MemAvailable:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return n * 1024
		}
	}
	return 0
}

func BenchmarkPerformance(b *testing.B) {
	if b.N > 1 {
		return // one run (make bench: -benchtime 1x): each figure is a median of its own runs
	}
	var t perfTable
	rss := map[string]int64{}
	peak := func(stage string, kib int64) { rss[stage] = max(rss[stage], kib) }

	// 1. prepare: restored, cold-booted, and the raw floor.
	j := newJobOver(b, "agent")
	j.env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	j.env["LIBVIRT_GCI_LOG_FORMAT"] = "json"
	if r := j.stage("template", "warm", testTmpl); r.code != 0 {
		b.Fatal(r.stderr)
	}
	type prep struct{ total, ready, define, overlay, image, start, agent, setup, cleanup []time.Duration }
	measure := func(start string) prep {
		var p prep
		j.env["LIBVIRT_GCI_START"] = start
		for i := 0; i < perfRuns; i++ {
			r, took, kib := j.timedStage("prepare")
			if r.code != 0 {
				b.Fatalf("prepare: %s", r.stderr)
			}
			peak("prepare", kib)
			d := msField(r.stderr)
			p.total = append(p.total, took)
			p.ready = append(p.ready, d("ready_ms"))
			p.define = append(p.define, d("define_ms"))
			p.overlay = append(p.overlay, d("clone_ms"))
			p.image = append(p.image, d("image_ms"))
			p.start = append(p.start, d("start_ms")+d("restore_ms"))
			p.agent = append(p.agent, d("agent_ready_ms"))
			p.setup = append(p.setup, d("setup_ms"))
			r, took, kib = j.timedStage("cleanup")
			if r.code != 0 {
				b.Fatalf("cleanup: %s", r.stderr)
			}
			peak("cleanup", kib)
			p.cleanup = append(p.cleanup, took)
		}
		return p
	}
	restored := measure("restore")
	booted := measure("boot")
	delete(j.env, "LIBVIRT_GCI_START")
	floor := rawBootFloor(b, j.l)
	t.add("prepare to a ready agent, restore", ms(median(restored.ready)), "cold boot "+ms(median(booted.ready)), ratio(median(restored.ready), median(booted.ready)), "≤ 1000 ms")
	t.add("  raw floor: overlay+define+start+ping", ms(median(floor)), "", ratio(median(restored.ready), median(floor)), "")
	t.add("  of which define / overlay / image copy", fmt.Sprintf("%d / %d / %d ms", median(restored.define).Milliseconds(), median(restored.overlay).Milliseconds(), median(restored.image).Milliseconds()), "", "", "")
	t.add("  of which restore call / agent", fmt.Sprintf("%d / %d ms", median(restored.start).Milliseconds(), median(restored.agent).Milliseconds()), "boot: start "+ms(median(booted.start))+", agent "+ms(median(booted.agent)), "", "")
	t.add("prepare in all, restore", ms(median(restored.total)), "cold boot "+ms(median(booted.total)), ratio(median(restored.total), median(booted.total)), "")
	t.add("  re-identification (guest set-up)", ms(median(restored.setup)), "", "", "")
	t.add("cleanup, restored instance", ms(median(restored.cleanup)), "booted "+ms(median(booted.cleanup)), ratio(median(restored.cleanup), median(booted.cleanup)), "")

	// 2. Eight restores at once.
	perfConcurrent(b, &t, 8)

	// 3. Stages: an empty one, and 100 MB of output, against the raw channel.
	for _, tr := range transports {
		perfStages(b, &t, tr, peak)
	}

	// 3b. A trivial job through the real runner, beside the no-VM runner and the raw floors.
	perfJobs(b, &t, "tiny guest", testTmpl)
	perfVariants(b, &t, "tiny guest", newJob(b), map[string]string{"CUSTOM_ENV_LIBVIRT_GCI_CPUS": "2", "CUSTOM_ENV_LIBVIRT_GCI_MEMORY": "384M"}, nil)

	// 4. A stage on a hypervisor reached over qemu+ssh, against the same VM's local stage.
	for _, tr := range transports {
		perfRemote(b, &t, tr)
	}

	// 5. Overlays on a 1 GiB and a 40 GiB template disk.
	perfOverlays(b, &t, j.l)

	// 6. The systemd Debian guest: prepare, stages and a runner job.
	perfSystemd(b, &t)

	for _, s := range []string{"prepare", "run", "cleanup"} {
		t.add("peak RSS of a "+s+" process", fmt.Sprintf("%.1f MiB", float64(rss[s])/1024), "", "", "")
	}
	fmt.Println()
	t.print(os.Stdout)
}

// rawBootFloor: what the fastest possible cold start costs here, with no tool at all:
// a qcow2 overlay (qemu-img), a define, a start and guest agent pings until one answers.
func rawBootFloor(b *testing.B, l *libvirt.Libvirt) []time.Duration {
	pool, err := l.StoragePoolLookupByName(testPool)
	if err != nil {
		b.Fatal(err)
	}
	px, _ := l.StoragePoolGetXMLDesc(pool, 0)
	dir := regexp.MustCompile(`<path>([^<]+)</path>`).FindStringSubmatch(px)[1]
	base, _ := l.DomainLookupByName(testTmpl)
	bx, _ := l.DomainGetXMLDesc(base, libvirt.DomainXMLInactive)
	root := regexp.MustCompile(`<source file='([^']+)'/>`).FindStringSubmatch(bx)[1]
	var out []time.Duration
	for i := 0; i < perfRuns; i++ {
		name := fmt.Sprintf("e2e-rawfloor-%d-%d", os.Getpid(), i)
		ov := dir + "/" + name + ".qcow2"
		start := time.Now()
		if o, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", root, "-F", "qcow2", ov).CombinedOutput(); err != nil {
			b.Fatalf("%v: %s", err, o)
		}
		x := templateVariant(b, l, name, `<source file='[^']+'/>`, "<source file='"+ov+"'/>")
		dom, err := l.DomainDefineXMLFlags(x, 0)
		if err != nil {
			b.Fatal(err)
		}
		if err := l.DomainCreate(dom); err != nil {
			b.Fatal(err)
		}
		for {
			if _, err := l.QEMUDomainAgentCommand(dom, `{"execute":"guest-ping"}`, 1, 0); err == nil {
				break
			}
			time.Sleep(20 * time.Millisecond)
			if time.Since(start) > 3*time.Minute {
				b.Fatal("no agent")
			}
		}
		out = append(out, time.Since(start))
		_ = l.DomainDestroy(dom)
		_ = l.DomainUndefine(dom)
		_ = os.Remove(ov)
	}
	_ = l.StoragePoolRefresh(pool, 0)
	return out
}

// perfConcurrent restores n instances at once.
func perfConcurrent(b *testing.B, t *perfTable, n int) {
	jobs := make([]*gitlabJob, n)
	for i := range jobs {
		jobs[i] = newJobOver(b, "agent")
		jobs[i].env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	}
	// One alone first: what one clone costs the host.
	before := memAvailable()
	if r := jobs[0].stage("prepare"); r.code != 0 {
		b.Fatal(r.stderr)
	}
	one := before - memAvailable()
	jobs[0].stage("cleanup")
	finished(b, jobs[0].l, jobs[0].prefix)
	time.Sleep(time.Second) // QEMU's memory back to the host
	before = memAvailable()
	var wg sync.WaitGroup
	var failed, restored int
	var mu sync.Mutex
	start := time.Now()
	for _, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := j.stage("prepare")
			mu.Lock()
			defer mu.Unlock()
			if r.code != 0 {
				failed++
				b.Logf("prepare failed: %s", r.stderr)
			} else if strings.Contains(r.stderr, "restored ") {
				restored++
			}
		}()
	}
	wg.Wait()
	wall := time.Since(start)
	used := before - memAvailable()
	for _, j := range jobs {
		j.stage("cleanup")
	}
	for _, j := range jobs {
		finished(b, j.l, j.prefix)
	}
	t.add(fmt.Sprintf("%d prepares at once (restored %d, failed %d)", n, restored, failed), ms(wall), "", "", "0 failures")
	t.add(fmt.Sprintf("  host memory used by the %d", n), fmt.Sprintf("%d MiB", used>>20), fmt.Sprintf("one clone %d MiB", one>>20),
		fmt.Sprintf("%.1f", float64(used)/float64(max(one, 1))), "≤ 3 where memory sharing is possible")
}

// perfStages measures an empty stage and 100 MB of output over transport, each beside
// the same work done directly over the same channel.
func perfStages(b *testing.B, t *perfTable, transport string, peak func(string, int64)) {
	j := newJobOver(b, transport)
	j.env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	j.prepare()
	const size = 100 << 20
	if r := j.run("prep", fmt.Sprintf("head -c %d /dev/zero | tr '\\0' x >/root/100m", size)); r.code != 0 {
		b.Fatal(r.stderr)
	}
	empty := j.script("empty.sh", "true")
	var stage, raw []time.Duration
	for i := 0; i < perfRuns; i++ {
		r, took, kib := j.timedStage("run", empty, "build_script")
		if r.code != 0 {
			b.Fatal(r.stderr)
		}
		peak("run", kib)
		stage = append(stage, took)
	}
	name := j.instance()
	dom, err := j.l.DomainLookupByName(name)
	if err != nil {
		b.Fatal(err)
	}
	var client *ssh.Client
	if transport == "ssh" {
		client = perfSSHDial(b, j, dom)
	}
	for i := 0; i < perfRuns; i++ {
		start := time.Now()
		if transport == "ssh" {
			c := perfSSHDial(b, j, dom)
			s, err := c.NewSession()
			if err != nil {
				b.Fatal(err)
			}
			if err := s.Run("true"); err != nil {
				b.Fatal(err)
			}
			c.Close()
		} else {
			agentExecTrue(b, j.l, dom)
		}
		raw = append(raw, time.Since(start))
	}
	floorName := map[string]string{"agent": "guest-exec bash -c true + status", "ssh": "ssh connect + session running true"}[transport]
	t.add("empty stage over "+transport, ms(median(stage)), floorName+" "+ms(median(raw)), "+"+ms(median(stage)-median(raw)), "≤ floor + 30 ms")

	// 100 MB: the stage's script cats the file; the floor reads it over the same channel.
	catScript := j.script("cat.sh", "cat /root/100m")
	var ours, floor time.Duration
	for i := 0; i < 2; i++ {
		r, took, kib := j.timedStage("run", catScript, "build_script")
		if r.code != 0 || len(r.stdout) != size {
			b.Fatalf("exit %d, %d bytes", r.code, len(r.stdout))
		}
		r.stdout = ""
		peak("run", kib)
		ours += took
		start := time.Now()
		var n int64
		if transport == "ssh" {
			s, err := client.NewSession()
			if err != nil {
				b.Fatal(err)
			}
			out, _ := s.StdoutPipe()
			if err := s.Start("cat /root/100m"); err != nil {
				b.Fatal(err)
			}
			n, _ = io.Copy(io.Discard, out)
			_ = s.Wait()
		} else {
			n = agentRead(b, j.l, dom, "/root/100m")
		}
		if n != size {
			b.Fatalf("raw read %d bytes", n)
		}
		floor += time.Since(start)
	}
	rate := func(d time.Duration) float64 { return 2 * float64(size) / d.Seconds() / 1e6 }
	t.add("100 MB of output over "+transport, fmt.Sprintf("%.1f MB/s", rate(ours)), fmt.Sprintf("raw cat %.1f MB/s", rate(floor)), fmt.Sprintf("%.0f %%", 100*rate(ours)/rate(floor)), "≥ 80 %")
	if client != nil {
		client.Close()
	}
	j.stage("cleanup")
}

// perfRemote: an empty stage through qemu+ssh (the test's second sshd on 127.0.0.1, so
// only the SSH connection's own cost), against the same instance reached locally.
func perfRemote(b *testing.B, t *perfTable, transport string) {
	s := theSSHD(b)
	j := newJobOver(b, transport)
	j.env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	j.env["LIBVIRT_GCI_URI"] = s.uri(s.known)
	j.prepare()
	empty := j.script("empty.sh", "true")
	var remote, local []time.Duration
	for i := 0; i < perfRuns; i++ {
		for _, uri := range []string{s.uri(s.known), testURI} {
			j.env["LIBVIRT_GCI_URI"] = uri
			r, took, _ := j.timedStage("run", empty, "build_script")
			if r.code != 0 {
				b.Fatal(r.stderr)
			}
			if uri == testURI {
				local = append(local, took)
			} else {
				remote = append(remote, took)
			}
		}
	}
	t.add("empty stage over "+transport+", qemu+ssh", ms(median(remote)), "local "+ms(median(local)), "+"+ms(median(remote)-median(local)), "")
	j.env["LIBVIRT_GCI_URI"] = s.uri(s.known)
	j.stage("cleanup")
}

// agentExecTrue: a bare guest-exec of bash -c true, and its status until it exited.
func agentExecTrue(b *testing.B, l *libvirt.Libvirt, dom libvirt.Domain) {
	out, err := l.QEMUDomainAgentCommand(dom, `{"execute":"guest-exec","arguments":{"path":"/bin/bash","arg":["-c","true"]}}`, 10, 0)
	if err != nil {
		b.Fatal(err)
	}
	var r struct {
		Return struct{ PID int } `json:"return"`
	}
	if err := json.Unmarshal([]byte(out[0]), &r); err != nil {
		b.Fatal(err)
	}
	for {
		st, err := l.QEMUDomainAgentCommand(dom, fmt.Sprintf(`{"execute":"guest-exec-status","arguments":{"pid":%d}}`, r.Return.PID), 10, 0)
		if err != nil {
			b.Fatal(err)
		}
		if strings.Contains(st[0], `"exited":true`) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// agentRead reads a guest file through guest-file-read, in the chunks a stage reads.
func agentRead(b *testing.B, l *libvirt.Libvirt, dom libvirt.Domain, path string) int64 {
	out, err := l.QEMUDomainAgentCommand(dom, fmt.Sprintf(`{"execute":"guest-file-open","arguments":{"path":%q,"mode":"r"}}`, path), 10, 0)
	if err != nil {
		b.Fatal(err)
	}
	var h struct{ Return int }
	_ = json.Unmarshal([]byte(out[0]), &h)
	var n int64
	for {
		out, err := l.QEMUDomainAgentCommand(dom, fmt.Sprintf(`{"execute":"guest-file-read","arguments":{"handle":%d,"count":%d}}`, h.Return, 512<<10), 10, 0)
		if err != nil {
			b.Fatal(err)
		}
		var r struct {
			Return struct {
				Count int
				Buf   string `json:"buf-b64"`
			}
		}
		if err := json.Unmarshal([]byte(out[0]), &r); err != nil {
			b.Fatal(err)
		}
		buf, _ := base64.StdEncoding.DecodeString(r.Return.Buf)
		n += int64(len(buf))
		if r.Return.Count == 0 {
			break
		}
	}
	_, _ = l.QEMUDomainAgentCommand(dom, fmt.Sprintf(`{"execute":"guest-file-close","arguments":{"handle":%d}}`, h.Return), 10, 0)
	return n
}

// perfSSHDial connects to the instance's sshd as its stages do: its forwarded port, its
// pinned host key, its client key.
func perfSSHDial(b *testing.B, j *gitlabJob, dom libvirt.Domain) *ssh.Client {
	x, err := j.l.DomainGetXMLDesc(dom, 0)
	if err != nil {
		b.Fatal(err)
	}
	m := regexp.MustCompile(`port="(\d+)"`).FindStringSubmatch(x)
	if m == nil {
		b.Fatalf("no ssh port in %s", x)
	}
	secret, err := guest.LoadSecret(j.env["LIBVIRT_GCI_SECRET_FILE"], false)
	if err != nil {
		b.Fatal(err)
	}
	key, err := guest.ClientKey(secret, dom.UUID)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", "127.0.0.1:"+m[1])
	if err != nil {
		b.Fatal(err)
	}
	cc, chans, reqs, err := ssh.NewClientConn(nc, nc.RemoteAddr().String(), &ssh.ClientConfig{
		User: "root", Auth: []ssh.AuthMethod{ssh.PublicKeys(key)}, HostKeyCallback: ssh.InsecureIgnoreHostKey(), //nolint:gosec // a benchmark's floor, not a stage
		// The stages' cipher (guest/ssh.go): the fastest without AES in the guest.
		Config: ssh.Config{Ciphers: []string{ssh.CipherChaCha20Poly1305}},
	})
	if err != nil {
		b.Fatal(err)
	}
	return ssh.NewClient(cc, chans, reqs)
}

// perfOverlays times the overlay an instance gets on a 1 GiB and a 40 GiB template disk
// (sparse, empty): its creation does not depend on the template's size.
func perfOverlays(b *testing.B, t *perfTable, l *libvirt.Libvirt) {
	pool, err := l.StoragePoolLookupByName(testPool)
	if err != nil {
		b.Fatal(err)
	}
	sizes := []string{"1", "40"}
	paths := map[string]string{}
	for _, size := range sizes {
		name := fmt.Sprintf("e2e-perf-%d-%sg.qcow2", os.Getpid(), size)
		base, err := l.StorageVolCreateXML(pool, fmt.Sprintf(`<volume><name>%s</name><capacity unit='G'>%s</capacity><target><format type='qcow2'/></target></volume>`, name, size), 0)
		if err != nil {
			b.Fatal(err)
		}
		defer func() { _ = l.StorageVolDelete(base, 0) }()
		paths[size], _ = l.StorageVolGetPath(base)
	}
	// Interleaved, many: each takes milliseconds, and the host's noise is of that order.
	ds := map[string][]time.Duration{}
	for i := 0; i < 40; i++ {
		for _, size := range sizes {
			ov := fmt.Sprintf("e2e-perf-%d-%sg-ov%d.qcow2", os.Getpid(), size, i)
			start := time.Now()
			v, err := l.StorageVolCreateXML(pool, fmt.Sprintf(`<volume><name>%s</name><target><format type='qcow2'/></target><backingStore><path>%s</path><format type='qcow2'/></backingStore></volume>`, ov, paths[size]), 0)
			if err != nil {
				b.Fatal(err)
			}
			ds[size] = append(ds[size], time.Since(start))
			_ = l.StorageVolDelete(v, 0)
		}
	}
	res := map[string]time.Duration{}
	for _, size := range sizes {
		res[size] = median(ds[size])
	}
	t.add("overlay on a 40 GiB template disk", fmt.Sprintf("%.1f ms", float64(res["40"].Microseconds())/1000), fmt.Sprintf("1 GiB: %.1f ms", float64(res["1"].Microseconds())/1000), ratio(res["40"], res["1"]), "equal ±10 %")
}
