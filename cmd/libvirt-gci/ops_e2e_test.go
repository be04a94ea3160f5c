package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// list shows a job's instance with its owner, template, state and size; a domain that
// only has an instance-like name is not listed (instances are found by metadata).
func TestList(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.prepare()
	impostor := j.prefix + "not-ours"
	dom, err := j.l.DomainDefineXMLFlags(templateVariant(t, j.l, impostor), 0)
	require.NoError(t, err)
	t.Cleanup(func() { _ = j.l.DomainUndefine(dom) })

	r := j.stage("list", "--json")
	require.Equal(t, 0, r.code, r.stderr)
	var list []struct {
		Name, State, Template, Transport string
		Owner                            struct {
			JobID     string `json:"job_id"`
			ProjectID string `json:"project_id"`
		} `json:"owner"`
		CPUs      int `json:"cpus"`
		MemoryMiB int `json:"memory_mib"`
		Volumes   int
	}
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &list), r.stdout)
	var mine []string
	for _, l := range list {
		assert.NotEqual(t, impostor, l.Name, "a domain without our metadata is listed")
		if l.Name != j.instance() {
			continue
		}
		mine = append(mine, l.Name)
		assert.Equal(t, "running", l.State)
		assert.Equal(t, testTmpl, l.Template)
		assert.Equal(t, "agent", l.Transport)
		assert.Positive(t, l.CPUs)
		assert.Positive(t, l.MemoryMiB)
		assert.Equal(t, 1, l.Volumes)
		assert.Equal(t, j.jobID, l.Owner.JobID)
		assert.Equal(t, "77", l.Owner.ProjectID)
	}
	assert.Len(t, mine, 1, r.stdout)
	r = j.stage("list")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, j.instance())
	assert.Contains(t, r.stdout, "job "+j.jobID+" of project 77 on e2e-gitlab")
	checkMetrics(t, j)
	r = j.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
}

// gc removes an instance whose runner is gone (here: prepare run by a shell that then
// exits, as a crashed gitlab-runner would), keeps one whose runner is alive, and never
// touches a domain without our metadata.
func TestGC(t *testing.T) {
	t.Parallel()
	orphan, alive := newJob(t), newJob(t)
	alive.prefix = orphan.prefix // one runner configuration: gc looks at its prefix
	alive.env["LIBVIRT_GCI_PREFIX"] = orphan.prefix
	alive.prepare() // first: the orphan's prepare sweeps, and must keep this one
	cmd := exec.Command("sh", "-c", `"$0" prepare; true`, binPath)
	cmd.Env = orphan.environ()
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.NotContains(t, string(out), "swept")
	impostor := alive.prefix + "not-ours"
	dom, err := alive.l.DomainDefineXMLFlags(templateVariant(t, alive.l, impostor), 0)
	require.NoError(t, err)
	t.Cleanup(func() { _ = alive.l.DomainUndefine(dom) })
	gone, kept := orphan.instance(), alive.instance()

	r := alive.stage("gc", "--dry-run")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `(?m)^would remove `+regexp.QuoteMeta(gone)+`: the runner that prepared it \(pid \d+\) is gone$`, r.stdout)
	assert.NotContains(t, r.stdout, kept)
	assert.NotContains(t, r.stdout, impostor)
	_, err = alive.l.DomainLookupByName(gone)
	require.NoError(t, err, "a dry run removed it")

	r = alive.stage("gc", "--older-than", "1h")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stderr, "gc: removed "+gone+": the runner that prepared it")
	assert.Empty(t, leftovers(t, orphan.l, gone), "the orphan's domain and volumes")
	_, err = alive.l.DomainLookupByName(kept)
	assert.NoError(t, err, "an instance whose runner is alive (and younger than 1h) was removed")
	_, err = alive.l.DomainLookupByName(impostor)
	assert.NoError(t, err, "a domain without our metadata was touched")

	// And a prepare sweeps orphans by itself.
	cmd = exec.Command("sh", "-c", `"$0" prepare; true`, binPath)
	cmd.Env = orphan.environ()
	out, err = cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	next := newJob(t)
	next.prefix, next.env["LIBVIRT_GCI_PREFIX"] = orphan.prefix, orphan.prefix
	next.prepare()
	r = next.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Empty(t, leftovers(t, orphan.l, gone), "the prepare did not sweep the orphan")

	r = alive.run("build_script", "echo still mine")
	assert.Equal(t, 0, r.code, r.stderr)
	r = alive.stage("cleanup")
	assert.Equal(t, 0, r.code, r.stderr)
}

// An instance still shut off after the boot timeout is one no stage will start (a define
// that landed after its prepare was killed, a guest that powered itself off): gc removes
// it, though its runner is alive; a running one of the same age stays.
func TestGCRemovesShutOffInstances(t *testing.T) {
	t.Parallel()
	off, on := newJob(t), newJob(t)
	on.prefix, on.env["LIBVIRT_GCI_PREFIX"] = off.prefix, off.prefix
	for _, j := range []*gitlabJob{off, on} {
		j.env["LIBVIRT_GCI_BOOT_TIMEOUT"] = "40s"
		j.prepare()
	}
	dom, err := off.l.DomainLookupByName(off.instance())
	require.NoError(t, err)
	require.NoError(t, off.l.DomainDestroy(dom))
	r := on.stage("gc", "--dry-run")
	require.Equal(t, 0, r.code, r.stderr)
	// Only its instances: the pool's warm images are every test's, and gc's.
	assert.NotContains(t, r.stdout, off.prefix, "younger than the boot timeout: kept")

	time.Sleep(41 * time.Second)
	r = on.stage("gc")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `gc: removed `+regexp.QuoteMeta(off.instance())+`: it is shut off and \S+ old, older than the boot timeout 40s`, r.stderr)
	assert.Empty(t, leftovers(t, off.l, off.instance()))
	_, err = on.l.DomainLookupByName(on.instance())
	assert.NoError(t, err, "a running instance of the same age was removed")
	assert.Equal(t, 0, on.stage("cleanup").code)
}

// A job asks for its size within the operator's maximums; the guest has it, and list
// shows it. A size over a bound is refused before anything is made.
func TestJobSize(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.env["LIBVIRT_GCI_MAX_CPUS"] = "2"
	j.env["LIBVIRT_GCI_MAX_MEMORY"] = "512M"
	j.env["LIBVIRT_GCI_MAX_DISK"] = "4G"
	j.env["CUSTOM_ENV_LIBVIRT_GCI_MEMORY"] = "1G"
	r := j.stage("prepare")
	assert.Equal(t, 2, r.code)
	assert.Equal(t, "libvirt-gci: error: CUSTOM_ENV_LIBVIRT_GCI_MEMORY 1G is more than this runner allows (LIBVIRT_GCI_MAX_MEMORY 512M)\n", r.stderr)
	assert.Empty(t, leftovers(t, j.l, j.prefix))

	j.env["CUSTOM_ENV_LIBVIRT_GCI_CPUS"] = "2"
	j.env["CUSTOM_ENV_LIBVIRT_GCI_MEMORY"] = "384M"
	j.env["CUSTOM_ENV_LIBVIRT_GCI_DISK"] = "3G" // the template's is 2G
	r = j.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { j.stage("cleanup") })
	assert.Contains(t, r.stderr, "(2 CPUs, 384M memory, 3G disk)")
	assert.Regexp(t, `restored \S+ into \S+ from libvirt-gci-warm-[0-9a-f]+s[0-9a-f]+-\S+ in \d+ ms .*disk grown in \d+ ms`, r.stderr, "a warm image of its size (issue 25)")
	r = j.run("build_script", `echo "cpus=$(nproc) mem=$(awk '/MemTotal/ {print $2}' /proc/meminfo) disk=$(( $(cat /sys/block/vda/size) * 512 ))"`)
	require.Equal(t, 0, r.code, r.stderr)
	var cpus, memKB, disk int64
	_, err := fmt.Sscanf(r.stdout, "cpus=%d mem=%d disk=%d", &cpus, &memKB, &disk)
	require.NoError(t, err, r.stdout)
	assert.Equal(t, int64(2), cpus)
	assert.InDelta(t, 384*1024, memKB, 64*1024, "MemTotal, less what the kernel keeps")
	assert.Equal(t, int64(3<<30), disk)
	r = j.stage("list")
	assert.Regexp(t, regexp.QuoteMeta(j.instance())+`\s.*\s2\s+384 MiB`, r.stdout)
}

// Issue 38: a job whose cleanup never comes (the runner's cleanup_exec killed, or the
// runner lost the job) leaves its VM to gc once the job's timeout (from the job
// response) and LIBVIRT_GCI_JOB_GRACE have passed since its prepare, though its runner
// (this test) lives on; before, it stayed until LIBVIRT_GCI_MAX_AGE, unset by default:
// for good. A job still in its time is left alone. Here its cleanup is killed at once.
func TestCleanupNeverCame(t *testing.T) {
	t.Parallel()
	j, other := newJob(t), newJob(t)
	other.prefix, other.env["LIBVIRT_GCI_PREFIX"] = j.prefix, j.prefix
	j.env["LIBVIRT_GCI_JOB_GRACE"], other.env["LIBVIRT_GCI_JOB_GRACE"] = "1s", "1s"
	// Before j's: its prepare's sweep, once j's time had passed, would remove j's
	// instance before the gc below (CI saw it on a slow run).
	r := other.stage("prepare") // a job of an hour, the default here
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { other.stage("cleanup") })

	j.timeout = 20
	j.writeResponse(j.jobID, "77", "e2e-runner")
	start := time.Now()
	r = j.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	s := j.start("cleanup")
	_ = s.cmd.Process.Kill() // before it did anything, as GitLab Runner's cleanup timeout would
	_, _ = s.wait(time.Minute)
	if _, err := j.l.DomainLookupByName(j.instance()); err != nil {
		t.Skip("the cleanup ended the instance before the kill; nothing to test")
	}
	r = j.stage("gc")
	require.Equal(t, 0, r.code, r.stderr)
	require.NotContains(t, r.stderr, "gc: removed "+j.instance(), "removed before its job's 20 s had passed (%.1f s after its prepare began)", time.Since(start).Seconds())

	time.Sleep(time.Until(start.Add(22 * time.Second))) // the job's 20 s, and the 1 s of grace
	r = j.stage("gc")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `gc: removed `+regexp.QuoteMeta(j.instance())+`: its job's timeout ended \d+s ago \(LIBVIRT_GCI_JOB_GRACE 1s\): its cleanup never came`, r.stderr)
	assert.NotContains(t, r.stderr, other.instance(), "a job within its time stays")
	_, err := j.l.DomainLookupByName(other.instance())
	assert.NoError(t, err)
}

// Issue 36, finding 1: a job starts only where the instance pool holds what every
// instance's disks may still grow to, and its own (LIBVIRT_GCI_DISK_RESERVE=full, the
// default). Two jobs that each ask for 60 % of the pool's free space: the second waits,
// saying for what, and starts once the first has gone. One that asks for more than the
// pool has, with nothing there to end, fails at once as a system failure and leaves
// nothing. Not parallel: the disks it asks for would hold up every other test's jobs.
func TestDiskRoomAdmission(t *testing.T) {
	first := newJob(t)
	pool, err := first.l.StoragePoolLookupByName(testPool)
	require.NoError(t, err)
	_, _, _, free, err := first.l.StoragePoolGetInfo(pool)
	require.NoError(t, err)
	ask := fmt.Sprintf("%dG", free*6/10>>30)
	jobs := []*gitlabJob{first, newJob(t), newJob(t)}
	for _, j := range jobs {
		j.prefix = first.prefix
		j.env["LIBVIRT_GCI_MAX_DISK"] = "1T"
		j.env["CUSTOM_ENV_LIBVIRT_GCI_DISK"] = ask
	}
	r := first.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { first.stage("cleanup") })

	second := jobs[1].start("prepare")
	second.waitFor("waiting for capacity: storage pool " + testPool + " has ")
	assert.Contains(t, second.out.String(), "and this one's disks grow to ")
	time.Sleep(time.Second)
	_, err = first.l.DomainLookupByName(jobs[1].instance())
	assert.Error(t, err, "the second job made nothing while it waits")
	r = first.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
	code, took := second.wait(time.Minute)
	require.Equal(t, 0, code, second.out.String())
	assert.Contains(t, second.out.String(), "capacity free after")
	t.Logf("the second job started %.1f s after the first one's cleanup", took.Seconds())
	r = jobs[1].stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)

	third := jobs[2]
	third.env["CUSTOM_ENV_LIBVIRT_GCI_DISK"] = fmt.Sprintf("%dG", free*2>>30)
	third.env["LIBVIRT_GCI_BOOT_TIMEOUT"] = "20s"
	start := time.Now()
	r = third.stage("prepare")
	assert.Equal(t, 2, r.code, "a system failure: %s", r.stderr)
	assert.Contains(t, r.stderr, "no instance there will free room")
	assert.Less(t, time.Since(start), 15*time.Second, "no wait for room that cannot come")
	assert.Empty(t, leftovers(t, first.l, first.prefix))
}

// Six prepares at once against LIBVIRT_GCI_MAX_INSTANCES=1: they take turns, never two
// instances at a time, and all succeed. One that cannot get room within its boot timeout
// fails as a system failure, having made nothing.
func TestCapacity(t *testing.T) {
	t.Parallel()
	first := newJob(t)
	jobs := []*gitlabJob{first}
	for range 5 {
		j := newJob(t)
		j.prefix = first.prefix
		jobs = append(jobs, j)
	}
	for _, j := range jobs {
		j.env["LIBVIRT_GCI_PREFIX"] = first.prefix
		j.env["LIBVIRT_GCI_SECRET_FILE"] = first.env["LIBVIRT_GCI_SECRET_FILE"] // the lock lives beside it
		j.env["LIBVIRT_GCI_MAX_INSTANCES"] = "1"
	}

	// One holds the only slot: another's prepare waits, then gives up at its timeout.
	first.prepare()
	late := jobs[1]
	late.env["LIBVIRT_GCI_BOOT_TIMEOUT"] = "3s"
	r := late.stage("prepare")
	assert.Equal(t, 2, r.code, r.stderr)
	assert.Contains(t, r.stderr, "waiting for capacity: 1 of 1 instances (LIBVIRT_GCI_MAX_INSTANCES) in use")
	assert.Regexp(t, `no capacity within \d+ s \(boot timeout 3s`, r.stderr) // 4 s under load
	_, err := late.l.DomainLookupByName(late.instance())
	assert.Error(t, err, "the late prepare made its domain")
	late.env["LIBVIRT_GCI_BOOT_TIMEOUT"] = "3m"
	r = first.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)

	// Six at once.
	stop := make(chan struct{})
	most := make(chan int)
	go func() {
		m := 0
		for {
			select {
			case <-stop:
				most <- m
				return
			case <-time.After(20 * time.Millisecond):
			}
			// Running ones: a job's cleanup pauses its VM for good and leaves the rest to a
			// finisher; such an ending VM does not count (its CPUs are stopped, its memory
			// freed within the second).
			doms, _, err := first.l.ConnectListAllDomains(1, libvirt.ConnectListDomainsRunning)
			if err != nil {
				continue
			}
			n := 0
			for _, d := range doms {
				if strings.HasPrefix(d.Name, first.prefix) {
					n++
				}
			}
			m = max(m, n)
		}
	}()
	var wg sync.WaitGroup
	results := make([]result, len(jobs))
	for i, j := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = j.stage("prepare")
			j.stage("cleanup")
		}()
	}
	wg.Wait()
	close(stop)
	assert.Equal(t, 1, <-most, "instances running at once")
	for i, r := range results {
		assert.Equal(t, 0, r.code, "job %d: %s", i, r.stderr)
	}
	assert.Empty(t, leftovers(t, first.l, first.prefix))
}

// assertDisarmed checks that the kept VM name can no longer act (why: what stopped), and
// returns its definition: shut off, and, were it started again, no cache share, no ssh
// NIC (a forward to the host's 127.0.0.1) and every NIC's link down.
func assertDisarmed(t *testing.T, l *libvirt.Libvirt, name, why string) string {
	t.Helper()
	dom, err := l.DomainLookupByName(name)
	require.NoError(t, err)
	state, _, err := l.DomainGetState(dom, 0)
	require.NoError(t, err)
	assert.Equal(t, int32(libvirt.DomainShutoff), state, why)
	x, err := l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	require.NoError(t, err)
	assert.Equal(t, strings.Count(x, "<interface "), len(regexp.MustCompile(`<link state=["']down["']`).FindAllString(x, -1)), "every NIC's link down:\n%s", x)
	assert.NotContains(t, x, "<filesystem")
	assert.NotContains(t, x, "hostfwd")
	return x
}

// With LIBVIRT_GCI_KEEP_FAILED, cleanup keeps the VM of a failed job, and gc removes it
// once its time has passed. A kept VM cannot act (issue 24): what the job left running
// stops with it, its definition has no network left, and it does not count against
// MAX_INSTANCES; a second failed job of the project is not kept (one per project by
// default). A job that succeeded is removed.
func TestKeepFailed(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.env["LIBVIRT_GCI_KEEP_FAILED"] = "15s"
	j.env["LIBVIRT_GCI_MAX_INSTANCES"] = "1"
	j.prepare()
	name := j.instance()
	r := j.run("build_script", "(while :; do date >>/root/alive; sleep 1; done) </dev/null >/dev/null 2>&1 &\necho failing; exit 3")
	require.Equal(t, 1, r.code, r.stderr)
	r = j.run("after_script", "true")
	require.Equal(t, 0, r.code, r.stderr)
	r = j.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stderr, "kept "+name+" after the failed job until ")
	assert.Contains(t, r.stderr, "stopped, without its cache and network")
	assert.Contains(t, r.stderr, "look at them read-only")
	assert.NotContains(t, r.stderr, "virsh console")
	assertDisarmed(t, j.l, name, "the job's background loop no longer runs")
	r = j.stage("gc")
	require.Equal(t, 0, r.code, r.stderr)
	_, err := j.l.DomainLookupByName(name)
	require.NoError(t, err, "gc removed a kept VM before its time: %s", r.stderr)

	// MAX_INSTANCES is 1 and the kept VM holds none of it: the next job prepares at once;
	// it fails too, and is not kept.
	next := newJob(t)
	next.prefix, next.env["LIBVIRT_GCI_PREFIX"] = j.prefix, j.prefix
	next.env["LIBVIRT_GCI_KEEP_FAILED"] = "6s"
	next.env["LIBVIRT_GCI_MAX_INSTANCES"] = "1"
	next.env["LIBVIRT_GCI_BOOT_TIMEOUT"] = "2m"
	next.prepare()
	r = next.run("build_script", "exit 3")
	require.Equal(t, 1, r.code, r.stderr)
	r = next.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stderr, "not keeping "+next.instance()+" after the failed job: 1 of 1 kept VMs of this project (LIBVIRT_GCI_KEEP_FAILED_PER_PROJECT)")
	finished(t, j.l, next.instance())
	_, err = j.l.DomainLookupByName(next.instance())
	assert.Error(t, err, "removed")

	// gc removes it once its time has passed, not before.
	for start := time.Now(); ; {
		r = j.stage("gc")
		require.Equal(t, 0, r.code, r.stderr)
		if strings.Contains(r.stderr, "gc: removed "+name+": kept after its failed job until ") {
			break
		}
		_, err = j.l.DomainLookupByName(name)
		require.NoError(t, err, "gc removed a kept VM before its time: %s", r.stderr)
		require.Less(t, time.Since(start), time.Minute, "gc kept it past its time")
		time.Sleep(time.Second)
	}
	assert.Empty(t, leftovers(t, j.l, j.prefix))

	// A job that succeeds is removed at cleanup as ever.
	ok := newJob(t)
	ok.env["LIBVIRT_GCI_KEEP_FAILED"] = "1h"
	ok.prepare()
	r = ok.run("build_script", "true")
	require.Equal(t, 0, r.code, r.stderr)
	r = ok.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Empty(t, leftovers(t, ok.l, ok.prefix))
}

// checkMetrics holds `metrics` to `list --json` on the real libvirt: its output parses
// with Prometheus's own parser, its instances add up to those listed and are the same
// ones, and j's instance has its prepare's time. Other tests make and remove instances
// meanwhile: it compares when a list before and one after the metrics agree.
func checkMetrics(t *testing.T, j *gitlabJob) {
	t.Helper()
	names := func() []string {
		r := j.stage("list", "--json")
		require.Equal(t, 0, r.code, r.stderr)
		var list []struct{ Name string }
		require.NoError(t, json.Unmarshal([]byte(r.stdout), &list), r.stdout)
		var out []string
		for _, l := range list {
			out = append(out, l.Name)
		}
		slices.Sort(out)
		return out
	}
	for try := 0; ; try++ {
		before := names()
		r := j.stage("metrics")
		require.Equal(t, 0, r.code, r.stderr)
		after := names()
		if !slices.Equal(before, after) && try < 20 {
			continue
		}
		require.True(t, slices.Equal(before, after), "the instances never held still for a list, metrics and a list")
		p := expfmt.NewTextParser(model.UTF8Validation)
		mfs, err := p.TextToMetricFamilies(strings.NewReader(r.stdout))
		require.NoError(t, err, r.stdout)
		n := 0.0
		for _, m := range mfs["libvirt_gci_instances"].GetMetric() {
			n += m.GetGauge().GetValue()
		}
		assert.Equal(t, float64(len(before)), n, "instances in metrics and in list --json:\n%s", r.stdout)
		// The metrics name instances without their projects' paths: by their hashes.
		hash := func(name string) string { return name[strings.LastIndex(name, "-")+1:] }
		var aged, listed []string
		for _, m := range mfs["libvirt_gci_instance_age_seconds"].GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "instance" {
					aged = append(aged, hash(l.GetValue()))
					assert.NotContains(t, l.GetValue(), "my-project", "no project path in the metrics")
				}
			}
		}
		for _, n := range before {
			listed = append(listed, hash(n))
		}
		slices.Sort(aged)
		slices.Sort(listed)
		assert.Equal(t, listed, aged)
		prepared := false
		for _, m := range mfs["libvirt_gci_instance_prepare_seconds"].GetMetric() {
			for _, l := range m.GetLabel() {
				prepared = prepared || (l.GetName() == "instance" && hash(l.GetValue()) == hash(j.instance()) && m.GetGauge().GetValue() > 0)
			}
		}
		assert.True(t, prepared, "%s has its prepare's time", j.instance())
		up := mfs["libvirt_gci_up"].GetMetric()
		require.Len(t, up, 1)
		assert.Equal(t, 1.0, up[0].GetGauge().GetValue())
		return
	}
}

// A kept VM restored from a warm image keeps the image its disk stands on, though its
// template changes and the next job makes a new image (issue 36: the old one was
// deleted under the kept VM's disk); gc removes the kept VM in its time, and the image
// goes with the next one made.
func TestKeptVMKeepsItsWarmImage(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	tmpl := j.prefix + "tmpl"
	j.defineTemplate(tmpl, `<title>`, "<description>one</description><title>")
	j.env["LIBVIRT_GCI_TEMPLATES"] = "tiny-*," + tmpl
	j.env["LIBVIRT_GCI_KEEP_FAILED"] = "20s"
	pool, err := j.l.StoragePoolLookupByName(testPool)
	require.NoError(t, err)
	var families []string
	t.Cleanup(func() { // the template is gone: so are its warm images
		vols, _, err := j.l.StoragePoolListAllVolumes(pool, 1, 0)
		if err == nil {
			for _, v := range vols {
				for _, f := range families {
					if strings.HasPrefix(v.Name, f) {
						_ = j.l.StorageVolDelete(v, 0)
					}
				}
			}
		}
	})
	warmRE := regexp.MustCompile(`restored \S+ into \S+ from (libvirt-gci-warm-[0-9a-f]+-)([0-9a-f]+)`)
	r := j.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	w := warmRE.FindStringSubmatch(r.stderr)
	require.NotNil(t, w, r.stderr)
	families = append(families, w[1])
	kept := j.instance()
	t.Cleanup(func() { // where the test stopped before gc removed it
		if d, err := j.l.DomainLookupByName(kept); err == nil {
			_ = j.l.DomainDestroy(d)
			_ = j.l.DomainUndefineFlags(d, libvirt.DomainUndefineNvram)
			if vols, _, err := j.l.StoragePoolListAllVolumes(pool, 1, 0); err == nil {
				for _, v := range vols {
					if strings.HasPrefix(v.Name, kept) {
						_ = j.l.StorageVolDelete(v, 0)
					}
				}
			}
		}
	})
	require.Equal(t, 1, j.run("build_script", "exit 3").code)
	r = j.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
	require.Contains(t, r.stderr, "kept "+kept)
	// The kept VM's disk: an overlay whose backing file is the warm image's overlay.
	d, err := j.l.DomainLookupByName(kept)
	require.NoError(t, err)
	x, err := j.l.DomainGetXMLDesc(d, libvirt.DomainXMLInactive)
	require.NoError(t, err)
	src := regexp.MustCompile(`<source (?:file='([^']+)'|pool='[^']+' volume='([^']+)')`).FindStringSubmatch(x)
	require.NotNil(t, src, x)
	var vol libvirt.StorageVol
	if src[1] != "" {
		vol, err = j.l.StorageVolLookupByPath(src[1])
	} else {
		vol, err = j.l.StorageVolLookupByName(pool, src[2])
	}
	require.NoError(t, err)
	vx, err := j.l.StorageVolGetXMLDesc(vol, 0)
	require.NoError(t, err)
	backing := regexp.MustCompile(`(?s)<backingStore>.*?<path>([^<]+)</path>`).FindStringSubmatch(vx)
	require.NotNil(t, backing, vx)
	require.Contains(t, backing[1], w[1]+w[2])

	// The operator changes the template; another job makes its new image.
	redefine := func(desc string) {
		t.Helper()
		d, err := j.l.DomainLookupByName(tmpl)
		require.NoError(t, err)
		u := d.UUID // kept: the test's cleanup undefines the template by it
		x := templateVariantOf(t, j.l, tmpl, tmpl, `(?s)<description>.*?</description>`, "<description>"+desc+"</description>",
			`</name>`, fmt.Sprintf("</name><uuid>%x-%x-%x-%x-%x</uuid>", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16]))
		_, err = j.l.DomainDefineXMLFlags(x, 0)
		require.NoError(t, err)
	}
	sibling := func() *gitlabJob { // another job of the same prefix and template
		n := newJob(t)
		n.prefix = j.prefix
		for _, k := range []string{"LIBVIRT_GCI_PREFIX", "LIBVIRT_GCI_TEMPLATES", "LIBVIRT_GCI_KEEP_FAILED", "CUSTOM_ENV_DISTRO"} {
			n.env[k] = j.env[k]
		}
		return n
	}
	redefine("two")
	next := sibling()
	r = next.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stderr, "made the warm image")
	require.Equal(t, 0, next.run("build_script", "true").code)
	require.Equal(t, 0, next.stage("cleanup").code)
	_, err = os.Stat(backing[1])
	assert.NoError(t, err, "the kept VM's disk still has its backing file")

	// gc removes the kept VM in its time; the old image goes with the next one made.
	for start := time.Now(); ; time.Sleep(time.Second) {
		r = j.stage("gc")
		require.Equal(t, 0, r.code, r.stderr)
		if strings.Contains(r.stderr, "gc: removed "+kept) {
			break
		}
		require.Less(t, time.Since(start), time.Minute, "gc kept it past its time")
	}
	redefine("three")
	last := sibling()
	r = last.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	require.Equal(t, 0, last.stage("cleanup").code)
	_, err = os.Stat(backing[1])
	assert.True(t, os.IsNotExist(err), "the old image is gone once nothing stands on it")
}
