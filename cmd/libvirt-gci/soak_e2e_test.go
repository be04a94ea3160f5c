package main

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// A soak job's fault: what it does to one job, from its prepare to its cleanup. It says
// whether the job went as that fault should make it go (a fault's own failure is
// expected), and when the fault struck.
type soakFault struct {
	name string
	do   func(t *testing.T, j *gitlabJob, rng *rand.Rand) (ok bool, struck time.Time)
	// host: it strikes every job on the host (libvirtd, the host itself, a warm image all
	// restores share), so it runs alone. gc: what it leaves is gc's (its runner or its
	// ender is gone), so it is counted after the final gc, not a minute after the job.
	host, gc bool
}

// soakFaults are what a host running jobs for a month meets, each a function of its own.
var soakFaults = []soakFault{
	{name: "none", do: func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		if !soakPrepare(t, j) {
			return false, time.Now()
		}
		r := j.run("build_script", "echo ok")
		return r.code == 0 && soakCleanup(t, j), time.Now()
	}},
	{name: "prepare killed", do: func(t *testing.T, j *gitlabJob, rng *rand.Rand) (bool, time.Time) {
		s := j.start("prepare")
		time.Sleep(time.Duration(rng.IntN(2000)) * time.Millisecond)
		_ = s.cmd.Process.Kill()
		struck := time.Now()
		_, _ = s.wait(time.Minute)
		return soakCleanup(t, j), struck
	}},
	{name: "run killed", do: func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		return soakStage(t, j, func(s *started) { _ = s.cmd.Process.Kill() })
	}},
	{name: "run SIGTERM", do: func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		return soakStage(t, j, func(s *started) { _ = s.cmd.Process.Signal(syscall.SIGTERM) })
	}},
	{name: "script fails", do: func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		if !soakPrepare(t, j) {
			return false, time.Now()
		}
		r := j.run("build_script", "exit 3")
		return r.code == 1 && soakCleanup(t, j), time.Now()
	}},
	{name: "guest powers off", do: func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		if !soakPrepare(t, j) {
			return false, time.Now()
		}
		r := j.run("build_script", "busybox poweroff -f 2>/dev/null || echo o >/proc/sysrq-trigger; sleep 30")
		return r.code == 2 && soakCleanup(t, j), time.Now()
	}},
	{name: "guest kernel panics", do: func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		if !soakPrepare(t, j) {
			return false, time.Now()
		}
		r := j.run("build_script", "echo 1 >/proc/sys/kernel/sysrq; echo c >/proc/sysrq-trigger; sleep 30")
		return r.code == 2 && soakCleanup(t, j), time.Now()
	}},
	{name: "QEMU killed", do: func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		return soakStage(t, j, func(*started) { _ = killQEMU(j.instance()) })
	}},
	{name: "cleanup killed", do: func(t *testing.T, j *gitlabJob, rng *rand.Rand) (bool, time.Time) {
		if !soakPrepare(t, j) {
			return false, time.Now()
		}
		s := j.start("cleanup")
		time.Sleep(time.Duration(rng.IntN(100)) * time.Millisecond)
		_ = s.cmd.Process.Kill() // its VM is gc's once the job's time is over
		struck := time.Now()
		_, _ = s.wait(time.Minute)
		return true, struck
	}, gc: true},
	{name: "finisher killed", do: finisherKilled, gc: true},
	{name: "runner restarted", do: runnerRestarted, gc: true},
	{name: "libvirtd restarted", do: libvirtdFault(0), host: true},
	{name: "libvirtd stopped 3 s", do: libvirtdFault(3 * time.Second), host: true},
	{name: "host reboots", do: hostReboots, host: true},
	{name: "pool full", do: poolFull},
	{name: "DHCP range used up", do: rangeUsedUp},
	{name: "warm image damaged", do: warmDamaged, host: true},
}

// soakJobTimeout is the soak jobs' timeout (their job response's): a job whose cleanup was
// killed is gc's this long after its prepare, and LIBVIRT_GCI_JOB_GRACE more.
const soakJobTimeout = 60

func soakPrepare(t *testing.T, j *gitlabJob) bool {
	r := j.stage("prepare")
	if r.code != 0 {
		t.Logf("%s: prepare failed: %s", j.prefix, r.stderr)
	}
	return r.code == 0
}

func soakCleanup(t *testing.T, j *gitlabJob) bool {
	r := j.stage("cleanup")
	if r.code != 0 {
		t.Logf("%s: cleanup failed: %s", j.prefix, r.stderr)
	}
	return r.code == 0
}

// soakStage strikes a running stage (a sleep) with fault; the stage must end as a
// system failure, or from the runner's own kill, within a minute.
func soakStage(t *testing.T, j *gitlabJob, fault func(s *started)) (bool, time.Time) {
	if !soakPrepare(t, j) {
		return false, time.Now()
	}
	s := j.start("run", j.script("b.sh", "echo up; sleep 613"), "build_script")
	s.waitFor("up")
	fault(s)
	struck := time.Now()
	code, _ := s.wait(time.Minute)
	ok := code == 2 || code == -1 // -1: killed by the fault itself
	if !ok {
		t.Logf("%s: the struck stage exited %d: %s", j.prefix, code, s.out.String())
	}
	return soakCleanup(t, j) && ok, struck
}

// soakRun runs n jobs, conc at a time, each with the next fault of kinds in turn (each
// a subtest of its own, where everyKind), over both transports and, one in eight, the systemd
// guest; a host-wide fault runs alone. Then it waits for the killed cleanups' jobs to run
// out of time, runs gc once, and counts what is left. It returns the summary line.
func soakRun(t *testing.T, n, conc int, kinds []soakFault, everyKind bool) string {
	kinds = slices.Clone(kinds)
	base := newJob(t)
	base.env["LIBVIRT_GCI_SECRET_FILE"] = filepath.Join(t.TempDir(), "secret")
	cache := cacheDir(t)
	counts := map[string]int{}
	var mu sync.Mutex
	var host sync.RWMutex // a host-wide fault holds it alone, every other job shares it
	unexpected, worst := 0, time.Duration(0)
	var worstKind string
	var lastKilled time.Time // the last prepare of a job whose cleanup is killed
	var lastLeft time.Time   // the last strike of a fault that leaves its job to gc
	done, start := 0, time.Now()
	one := func(t *testing.T, i int) {
		// Every kind in turn (a piece of a long soak, SOAK_SEED, starts elsewhere in the
		// turn and draws other strikes), so each is drawn as often as the others.
		seed := envInt("SOAK_SEED", 0)
		rng := rand.New(rand.NewPCG(uint64(i), uint64(7+seed)))
		f := kinds[(i+seed)%len(kinds)]
		if everyKind && i < len(kinds) {
			f = kinds[i]
		}
		if f.host {
			host.Lock()
			defer host.Unlock()
		} else {
			host.RLock()
			defer host.RUnlock()
		}
		tr := transports[i%len(transports)]
		j := newJobOver(t, tr)
		// The systemd guest one job in eight, and for every kernel panic where every kind
		// is drawn once: the tiny guest's kernel has no pvpanic driver, and spins a CPU
		// in its panic until the agent's 30 s are over.
		if (i%8 == 7 && !everyKind) || (everyKind && f.name == "guest kernel panics") {
			j = newSystemdJob(t, tr)
		}
		j.prefix, j.env["LIBVIRT_GCI_PREFIX"] = base.prefix, base.prefix
		j.env["LIBVIRT_GCI_JOB_GRACE"] = "1s"
		j.env["LIBVIRT_GCI_SECRET_FILE"] = base.env["LIBVIRT_GCI_SECRET_FILE"]
		if i%4 == 1 { // a project's cache share, mounted on the host
			j.env["LIBVIRT_GCI_CACHE_DIR"] = cache
		}
		j.timeout = soakJobTimeout
		j.writeResponse(j.jobID, "77", "e2e-runner")
		name := j.instance()
		if f.name == "cleanup killed" {
			mu.Lock()
			lastKilled = time.Now()
			mu.Unlock()
		}
		ok, struck := f.do(t, j, rng)
		gone := func() bool { _, err := j.l.DomainLookupByName(name); return err != nil }
		for deadline := time.Now().Add(time.Minute); !gone() && !f.gc && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
		}
		mu.Lock()
		defer mu.Unlock()
		counts[f.name]++
		if f.gc && struck.After(lastLeft) {
			lastLeft = struck
		}
		if done++; !everyKind && done%25 == 0 {
			t.Logf("soak: %d of %d jobs done, %d unexpected, %.0f s", done, n, unexpected, time.Since(start).Seconds())
		}
		if !ok {
			unexpected++
			report := t.Logf // the soak's line counts it
			if everyKind {
				report = t.Errorf // the kind's own test fails
			}
			report("job %d (%s, %s): not as the fault should make it go", i, f.name, tr)
		}
		if !f.gc {
			if !gone() {
				t.Logf("job %d (%s, %s): %s still there a minute after its cleanup", i, f.name, tr, name)
			} else if d := time.Since(struck); d > worst {
				worst, worstKind = d, f.name
			}
		}
	}
	if everyKind { // each kind a subtest of its own: go test -run 'TestSoakEveryFault/pool_full'
		t.Run("kinds", func(t *testing.T) {
			// The killed cleanup first: its job's time runs out meanwhile.
			first := func(f soakFault) int { return cmp.Or(slices.Index([]string{"cleanup killed"}, f.name)+1, 2) }
			slices.SortStableFunc(kinds, func(a, b soakFault) int { return first(a) - first(b) })
			for i, f := range kinds {
				t.Run(f.name, func(t *testing.T) {
					t.Parallel()
					one(t, i)
				})
			}
		})
	} else {
		var wg sync.WaitGroup
		next := make(chan int)
		for range conc {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range next {
					one(t, i)
				}
			}()
		}
		for i := range n {
			next <- i
		}
		close(next)
		wg.Wait()
	}
	wall := time.Since(start)
	// The killed cleanups' jobs' time, and the grace, from the last one's prepare; and
	// the 15 s gc gives a paused instance's ender to record itself before it takes the
	// ender's end for its removal's (a killed finisher's instance, paused just before the
	// last job ended, was left once: CI).
	time.Sleep(time.Until(lastKilled.Add(time.Duration(soakJobTimeout+2) * time.Second)))
	time.Sleep(time.Until(lastLeft.Add(17 * time.Second)))
	base.l = reconnect(t) // libvirtd may have restarted since base connected
	base.env["LIBVIRT_GCI_JOB_GRACE"] = "1s"
	r := base.stage("gc")
	require.Equal(t, 0, r.code, r.stderr)
	left := soakLeft(t, base, cache)
	var drawn []string
	for k, c := range counts {
		drawn = append(drawn, fmt.Sprintf("%s %d", k, c))
	}
	slices.Sort(drawn)
	return fmt.Sprintf("soak: %d jobs, %d at a time; faults: %s; %d unexpected; left after one gc: %s; %.0f s; worst fault to nothing left of its job: %.1f s (%s)",
		n, conc, strings.Join(drawn, ", "), unexpected, left, wall.Seconds(), worst.Seconds(), worstKind)
}

// soakNothingLeft is what soakRun's line says when nothing is left.
const soakNothingLeft = " 0 unexpected; left after one gc: 0 domains, 0 volumes, 0 files, 0 leases, 0 cache mounts, 0 locks, 0 warm images of gone templates;"

// soakLeft counts what the soak left: under its prefix, domains, volumes, files (in the
// pool, and beside the secret besides the secret, the KVM verdict and the lock files),
// leases and host entries; mounts of cache shares whose cache is gone (a share's mount
// stays for the project's next job while its image SHARE.img is there); in the pool,
// locks and the warm images of gone templates.
func soakLeft(t *testing.T, base *gitlabJob, cache string) string {
	var doms, vols, files, leases int
	for _, l := range leftovers(t, base.l, base.prefix) {
		t.Log("left: " + l)
		switch strings.Fields(l)[0] {
		case "domain":
			doms++
		case "volume":
			vols++
		case "file":
			files++
		case "network":
			leases++
		}
	}
	beside, err := os.ReadDir(filepath.Dir(base.env["LIBVIRT_GCI_SECRET_FILE"]))
	require.NoError(t, err)
	for _, e := range beside {
		switch n := e.Name(); {
		case n == "secret", n == "kvm-probe", strings.HasSuffix(n, ".lock"):
		default:
			t.Log("left beside the secret: " + n)
			files++
		}
	}
	mounts := 0
	for m := range mountsBelow(t, cache) {
		if _, err := os.Stat(m + ".img"); err != nil {
			t.Log("left: the mount of a removed cache: " + m)
			mounts++
		}
	}
	locks, images := poolLocks(t, base.l), goneTemplateImages(t, base.l)
	for _, l := range append(locks, images...) {
		t.Log("left: " + l)
	}
	return fmt.Sprintf("%d domains, %d volumes, %d files, %d leases, %d cache mounts, %d locks, %d warm images of gone templates",
		doms, vols, files, leases, mounts, len(locks), len(images))
}

// soakKinds are the fault kinds SOAK_KINDS names (comma-separated), or all of them.
func soakKinds(t *testing.T) []soakFault {
	names := os.Getenv("SOAK_KINDS")
	if names == "" {
		return soakFaults
	}
	var out []soakFault
	for _, name := range strings.Split(names, ",") {
		i := slices.IndexFunc(soakFaults, func(f soakFault) bool { return f.name == strings.TrimSpace(name) })
		require.GreaterOrEqual(t, i, 0, "SOAK_KINDS: no fault kind %q", name)
		out = append(out, soakFaults[i])
	}
	return out
}

// TestSoak runs SOAK_N jobs, SOAK_M at a time, each with a fault drawn from soakFaults,
// and prints one summary line: nothing may be left and nothing unexpected happen.
// `make soak` runs it (LIBVIRT_GCI_SOAK=1).
func TestSoak(t *testing.T) {
	if os.Getenv("LIBVIRT_GCI_SOAK") != "1" {
		t.Skip("soak: set LIBVIRT_GCI_SOAK=1 (make soak)")
	}
	var names []string
	for _, f := range soakKinds(t) {
		names = append(names, f.name)
	}
	fmt.Println("soak: fault kinds: " + strings.Join(names, ", "))
	line := soakRun(t, envInt("SOAK_N", 20), max(1, envInt("SOAK_M", 4)), soakKinds(t), false)
	fmt.Println(line)
	require.Contains(t, line, soakNothingLeft, line)
}

// TestSoakEveryFault is `make test`'s short soak: every fault kind once (SOAK_KINDS: the
// ones named), each a subtest of its own, as many at a time as -parallel lets, and
// nothing left after one gc. Not parallel with the package's other tests: its host-wide
// faults (libvirtd restarted, the host rebooted) strike every job on the host.
func TestSoakEveryFault(t *testing.T) {
	kinds := soakKinds(t)
	line := soakRun(t, len(kinds), 0, kinds, true)
	t.Log(line)
	require.Contains(t, line, soakNothingLeft, line)
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n >= 0 {
		return n
	}
	return def
}
