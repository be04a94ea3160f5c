package main

import (
	"fmt"
	"math/rand/v2"
	"os"
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
}

// soakFaults are what a host running jobs for a month meets, each a function of its own.
var soakFaults = []soakFault{
	{"none", func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		if !soakPrepare(t, j) {
			return false, time.Now()
		}
		r := j.run("build_script", "echo ok")
		return r.code == 0 && soakCleanup(t, j), time.Now()
	}},
	{"prepare killed", func(t *testing.T, j *gitlabJob, rng *rand.Rand) (bool, time.Time) {
		s := j.start("prepare")
		time.Sleep(time.Duration(rng.IntN(2000)) * time.Millisecond)
		_ = s.cmd.Process.Kill()
		struck := time.Now()
		_, _ = s.wait(time.Minute)
		return soakCleanup(t, j), struck
	}},
	{"run killed", func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		return soakStage(t, j, func(s *started) { _ = s.cmd.Process.Kill() })
	}},
	{"run SIGTERM", func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		return soakStage(t, j, func(s *started) { _ = s.cmd.Process.Signal(syscall.SIGTERM) })
	}},
	{"script fails", func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		if !soakPrepare(t, j) {
			return false, time.Now()
		}
		r := j.run("build_script", "exit 3")
		return r.code == 1 && soakCleanup(t, j), time.Now()
	}},
	{"guest powers off", func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		if !soakPrepare(t, j) {
			return false, time.Now()
		}
		r := j.run("build_script", "busybox poweroff -f 2>/dev/null || echo o >/proc/sysrq-trigger; sleep 30")
		return r.code == 2 && soakCleanup(t, j), time.Now()
	}},
	{"guest kernel panics", func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		if !soakPrepare(t, j) {
			return false, time.Now()
		}
		r := j.run("build_script", "echo 1 >/proc/sys/kernel/sysrq; echo c >/proc/sysrq-trigger; sleep 30")
		return r.code == 2 && soakCleanup(t, j), time.Now()
	}},
	{"QEMU killed", func(t *testing.T, j *gitlabJob, _ *rand.Rand) (bool, time.Time) {
		return soakStage(t, j, func(*started) {
			if b, err := os.ReadFile("/run/libvirt/qemu/" + j.instance() + ".pid"); err == nil {
				if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
					_ = syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		})
	}},
	{"cleanup killed", func(t *testing.T, j *gitlabJob, rng *rand.Rand) (bool, time.Time) {
		if !soakPrepare(t, j) {
			return false, time.Now()
		}
		s := j.start("cleanup")
		time.Sleep(time.Duration(rng.IntN(100)) * time.Millisecond)
		_ = s.cmd.Process.Kill() // its VM is gc's once the job's time is over
		struck := time.Now()
		_, _ = s.wait(time.Minute)
		return true, struck
	}},
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

// soakRun runs n jobs, conc at a time, each with the fault seed draws (kinds: every kind
// once first), over both transports and, one in eight, the systemd guest; then waits
// for the killed cleanups' jobs to run out of time, runs gc once, and counts what is
// left. It returns the summary line.
func soakRun(t *testing.T, n, conc int, everyKind bool) string {
	base := newJob(t)
	counts := map[string]int{}
	var mu sync.Mutex
	unexpected, worst := 0, time.Duration(0)
	one := func(i int) {
		rng := rand.New(rand.NewPCG(uint64(i), 7))
		f := soakFaults[rng.IntN(len(soakFaults))]
		if everyKind && i < len(soakFaults) {
			f = soakFaults[i]
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
		j.timeout = soakJobTimeout
		j.writeResponse(j.jobID, "77", "e2e-runner")
		name := j.instance()
		ok, struck := f.do(t, j, rng)
		gone := func() bool { _, err := j.l.DomainLookupByName(name); return err != nil }
		for deadline := time.Now().Add(time.Minute); !gone() && f.name != "cleanup killed" && time.Now().Before(deadline); {
			time.Sleep(100 * time.Millisecond)
		}
		mu.Lock()
		defer mu.Unlock()
		counts[f.name]++
		if !ok {
			unexpected++
			t.Logf("job %d (%s, %s): not as the fault should make it go", i, f.name, tr)
		}
		if f.name != "cleanup killed" {
			if !gone() {
				t.Logf("job %d (%s, %s): %s still there a minute after its cleanup", i, f.name, tr, name)
			} else if d := time.Since(struck); d > worst {
				worst = d
			}
		}
	}
	start := time.Now()
	var wg sync.WaitGroup
	next := make(chan int)
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				one(i)
			}
		}()
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	if counts["cleanup killed"] > 0 { // their jobs' time, and the grace
		time.Sleep(time.Duration(soakJobTimeout+2) * time.Second)
	}
	base.env["LIBVIRT_GCI_JOB_GRACE"] = "1s"
	r := base.stage("gc")
	require.Equal(t, 0, r.code, r.stderr)
	var doms, vols int
	for _, l := range leftovers(t, base.l, base.prefix) {
		switch {
		case strings.HasPrefix(l, "domain "):
			doms++
		case strings.HasPrefix(l, "volume "):
			vols++
		}
	}
	var kinds []string
	for k, c := range counts {
		kinds = append(kinds, fmt.Sprintf("%s %d", k, c))
	}
	slices.Sort(kinds)
	return fmt.Sprintf("soak: %d jobs, %d at a time; faults: %s; %d unexpected; left after one gc: %d domains, %d volumes; %.0f s; worst fault to nothing left of its job: %.1f s",
		n, conc, strings.Join(kinds, ", "), unexpected, doms, vols, time.Since(start).Seconds(), worst.Seconds())
}

// TestSoak runs SOAK_N jobs, SOAK_M at a time, each with a fault drawn from soakFaults,
// and prints one summary line: nothing may be left and nothing unexpected happen.
// `make soak` runs it (LIBVIRT_GCI_SOAK=1).
func TestSoak(t *testing.T) {
	if os.Getenv("LIBVIRT_GCI_SOAK") != "1" {
		t.Skip("soak: set LIBVIRT_GCI_SOAK=1 (make soak)")
	}
	line := soakRun(t, envInt("SOAK_N", 20), max(1, envInt("SOAK_M", 4)), false)
	fmt.Println(line)
	require.Contains(t, line, " 0 unexpected; left after one gc: 0 domains, 0 volumes;", line)
}

// TestSoakEveryFault is `make test`'s short soak: every fault kind once, two jobs at a
// time (beside the other tests), and nothing left after one gc.
func TestSoakEveryFault(t *testing.T) {
	t.Parallel()
	line := soakRun(t, len(soakFaults), 2, true)
	t.Log(line)
	require.Contains(t, line, " 0 unexpected; left after one gc: 0 domains, 0 volumes;", line)
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n >= 0 {
		return n
	}
	return def
}
