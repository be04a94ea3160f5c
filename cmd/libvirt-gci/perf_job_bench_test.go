package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/libvirt-gci/libvirt-gci/cmd/libvirt-gci/internal/fakegitlab"
)

// jobTimes is what one way of running trivial jobs through the real gitlab-runner
// cost, job by job: from the runner taking the job to its final update, from the end of
// its last run stage to that update, its cleanup stage, and how many run stages it had.
type jobTimes struct {
	took, end, cleanup []time.Duration
	runs               int
}

// stageLog is a stage program that records, for each call, the job, the stage and when
// it started and ended, and runs real with the same arguments.
func stageLog(b *testing.B, real string) (wrapper, log string) {
	dir := b.TempDir()
	wrapper, log = filepath.Join(dir, "stage"), filepath.Join(dir, "stages.log")
	script := fmt.Sprintf("#!/bin/sh\nt0=$(date +%%s%%N)\n%q \"$@\"\nrc=$?\necho \"$CUSTOM_ENV_CI_JOB_ID $1 $t0 $(date +%%s%%N)\" >>%q\nexit $rc\n", real, log)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		b.Fatal(err)
	}
	return wrapper, log
}

// runJobs runs 1+n trivial jobs through h's runner, whose stages are logged to log; the
// first is not timed (it makes the warm image of the runner's profile).
func runJobs(b *testing.B, h *runnerHost, log string, n int, check func(i int, trace string)) jobTimes {
	jobs := make([]*fakegitlab.Job, 1+n)
	for i := range jobs {
		jobs[i] = h.gl.Add(fakegitlab.JobSpec{Script: []string{"true"}})
	}
	p := h.runSingle(len(jobs))
	type span struct{ start, end time.Time }
	stages := map[string][]span{} // by "JOB STAGE"
	var jt jobTimes
	for i, fj := range jobs {
		final, trace := h.finish(fj)
		if final.State != "success" {
			b.Fatalf("job failed: %+v\n%s", final, trace)
		}
		if check != nil {
			check(i, trace)
		}
	}
	p.wait(b, time.Minute)
	f, err := os.Open(log)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	for s := bufio.NewScanner(f); s.Scan(); {
		var job, stage string
		var t0, t1 int64
		if _, err := fmt.Sscan(s.Text(), &job, &stage, &t0, &t1); err != nil {
			b.Fatalf("stage log %q: %v", s.Text(), err)
		}
		stages[job+" "+stage] = append(stages[job+" "+stage], span{time.Unix(0, t0), time.Unix(0, t1)})
	}
	for _, fj := range jobs[1:] {
		taken, finished := h.gl.Times(fj)
		id := strconv.FormatInt(fj.ID, 10)
		runs, cleanup := stages[id+" run"], stages[id+" cleanup"]
		if len(runs) == 0 || len(cleanup) != 1 {
			b.Fatalf("job %s: %d run stages and %d cleanups logged", id, len(runs), len(cleanup))
		}
		jt.took = append(jt.took, finished.Sub(taken))
		jt.end = append(jt.end, finished.Sub(runs[len(runs)-1].end))
		jt.cleanup = append(jt.cleanup, cleanup[0].end.Sub(cleanup[0].start))
		jt.runs = len(runs)
	}
	return jt
}

// hostRunner is a runner whose custom executor runs the script on the host: no VM,
// what the runner itself costs for a job.
func hostRunner(b *testing.B) (*runnerHost, string) {
	h := newRunnerHost(b, "agent")
	dir := b.TempDir()
	real := filepath.Join(dir, "host-executor")
	if err := os.WriteFile(real, []byte("#!/bin/sh\ncase \"$1\" in run) exec bash \"$2\" ;; esac\n"), 0o755); err != nil {
		b.Fatal(err)
	}
	wrapper, log := stageLog(b, real)
	config := fmt.Sprintf(`concurrent = 1
[[runners]]
  name = "host"
  url = %q
  token = %q
  executor = "custom"
  builds_dir = %q
  cache_dir = %q
  [runners.custom]
    prepare_exec = %q
    prepare_args = ["prepare"]
    run_exec = %q
    run_args = ["run"]
    cleanup_exec = %q
    cleanup_args = ["cleanup"]
`, h.gl.URL(), h.gl.RunnerToken, filepath.Join(dir, "builds"), filepath.Join(dir, "cache"), wrapper, wrapper, wrapper)
	if err := os.WriteFile(h.config, []byte(config), 0o600); err != nil {
		b.Fatal(err)
	}
	h.name = "host"
	return h, log
}

// rawFloors: what a job's VM costs here with no tool at all, from the template's warm
// image tmpl (made by `template warm`, its name in warm): a qcow2 overlay on the image's
// and a restore with libvirt (the image's XML, with that overlay) to the first guest-agent
// answer; stages guest-execs of bash -c true and their status, one after the other
// (empty stages' floor: the first after a restore pays for QEMU's empty translation
// cache, as a job's first stage does); a
// destroy (the restored domain is transient) and the overlay's removal.
func rawFloors(b *testing.B, l *libvirt.Libvirt, warm string, stages int) (restore, stage, teardown []time.Duration) {
	pool, err := l.StoragePoolLookupByName(testPool)
	if err != nil {
		b.Fatal(err)
	}
	px, _ := l.StoragePoolGetXMLDesc(pool, 0)
	dir := regexp.MustCompile(`<path>([^<]+)</path>`).FindStringSubmatch(px)[1]
	save := filepath.Join(dir, warm+".save")
	x, err := l.DomainSaveImageGetXMLDesc(save, 0)
	if err != nil {
		b.Fatal(err)
	}
	// The image's own overlay, a volume of the pool: each restore gets a file overlay on it.
	diskRE := regexp.MustCompile(`<disk type='volume'( device='disk'>\s*<driver[^>]*/>\s*)<source pool='[^']+' volume='(` + regexp.QuoteMeta(warm) + `-[a-z]+\.qcow2)'/>`)
	disk := diskRE.FindStringSubmatch(x)
	if disk == nil {
		b.Fatalf("warm image %s: no overlay of its own in its XML:\n%s", warm, x)
	}
	backing := filepath.Join(dir, disk[2])
	for i := 0; i < perfRuns; i++ {
		// libvirt keeps the image's name and UUID (it refuses others): no domain has them
		// once the image is made.
		name := regexp.MustCompile(`<name>([^<]*)</name>`).FindStringSubmatch(x)[1]
		ov := filepath.Join(dir, fmt.Sprintf("e2e-rawrestore-%d-%d.qcow2", os.Getpid(), i))
		start := time.Now()
		if o, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", ov).CombinedOutput(); err != nil {
			b.Fatalf("%v: %s", err, o)
		}
		nx := diskRE.ReplaceAllLiteralString(x, "<disk type='file'"+disk[1]+"<source file='"+ov+"'/>")
		if err := l.DomainRestoreFlags(save, libvirt.OptString{nx}, uint32(libvirt.DomainSaveRunning)); err != nil {
			b.Fatalf("raw restore: %v", err)
		}
		dom, err := l.DomainLookupByName(name)
		if err != nil {
			b.Fatal(err)
		}
		for {
			if _, err := l.QEMUDomainAgentCommand(dom, `{"execute":"guest-ping"}`, 1, 0); err == nil {
				break
			}
			time.Sleep(10 * time.Millisecond)
			if time.Since(start) > time.Minute {
				b.Fatal("no agent after the raw restore")
			}
		}
		restore = append(restore, time.Since(start))
		s := time.Now()
		for range stages {
			agentExecTrue(b, l, dom)
		}
		stage = append(stage, time.Since(s))
		s = time.Now()
		if err := l.DomainDestroy(dom); err != nil {
			b.Fatal(err)
		}
		if err := os.Remove(ov); err != nil { // a restored domain is transient: gone with the destroy
			b.Fatal(err)
		}
		teardown = append(teardown, time.Since(s))
	}
	return restore, stage, teardown
}

// perfJobs: a trivial job (script: true) through the real gitlab-runner on the guest
// tmpl, side by side: with libvirt-gci (restored), with a custom executor that runs the
// script on the host, and the sum of the raw floors of what the job does in a VM (a
// restore, its run stages as bare guest-execs, a teardown). extra is the runner's
// settings for the template.
func perfJobs(b *testing.B, t *perfTable, label, tmpl string, extra ...string) {
	h := newRunnerHost(b, "agent")
	h.env = append(h.env, extra...)
	wrapper, log := stageLog(b, binPath)
	config, _ := readmeConfig(b, h.gl.URL(), h.gl.RunnerToken, wrapper)
	if err := os.WriteFile(h.config, []byte(config), 0o600); err != nil {
		b.Fatal(err)
	}
	vm := runJobs(b, h, log, perfRuns, func(i int, trace string) {
		if i > 0 && !strings.Contains(trace, "restored ") {
			b.Fatalf("job %d was not restored:\n%s", i, trace)
		}
	})

	hh, hlog := hostRunner(b)
	host := runJobs(b, hh, hlog, perfRuns, nil)

	cmd := exec.Command(binPath, "template", "warm", tmpl)
	cmd.Env = h.env
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.Fatalf("template warm: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`warm image (libvirt-gci-warm-\S+) of`).FindSubmatch(out)
	if m == nil {
		b.Fatalf("template warm named no image:\n%s", out)
	}
	restore, stage, teardown := rawFloors(b, h.l, string(m[1]), vm.runs)
	vmFloor := median(restore) + median(stage) + median(teardown)
	floor := median(host.took) + vmFloor

	t.add(label+": trivial job, real runner", ms(median(vm.took)), "no VM "+ms(median(host.took)), ratio(median(vm.took), median(host.took)), "")
	t.add(fmt.Sprintf("  sum of raw floors: no-VM job + restore + %d stages + teardown", vm.runs), ms(floor),
		fmt.Sprintf("%d + %d + %d + %d ms", median(host.took).Milliseconds(), median(restore).Milliseconds(), median(stage).Milliseconds(), median(teardown).Milliseconds()),
		ratio(median(vm.took), floor), "≤ 1.3")
	t.add("  job's end after its last stage", ms(median(vm.end)), "no VM "+ms(median(host.end)), "cleanup stage "+ms(median(vm.cleanup)), "≤ 300 ms")
}

// perfVariants: prepare (restored) with a cache share and with a size of its own,
// beside a plain restore, on j's template; and, where big is given, a restore of a
// guest of that memory beside one of the template's. The first prepare of each variant
// makes its warm image and is not timed.
func perfVariants(b *testing.B, t *perfTable, label string, j *gitlabJob, size, big map[string]string) {
	j.env["LIBVIRT_GCI_LOG_FORMAT"] = "json"
	j.env["LIBVIRT_GCI_MAX_CPUS"] = "4"
	j.env["LIBVIRT_GCI_MAX_MEMORY"] = "8G"
	j.env["LIBVIRT_GCI_MAX_DISK"] = "64G"
	prepare := func(env map[string]string) (total []time.Duration) {
		for k, v := range env {
			j.env[k] = v
		}
		defer func() {
			for k := range env {
				delete(j.env, k)
			}
		}()
		for i := 0; i <= perfRuns; i++ {
			r, took, _ := j.timedStage("prepare")
			if r.code != 0 {
				b.Fatalf("prepare %v: %s", env, r.stderr)
			}
			if !strings.Contains(r.stderr, "restored ") {
				b.Fatalf("prepare %v was not restored:\n%s", env, r.stderr)
			}
			if r := j.stage("cleanup"); r.code != 0 {
				b.Fatalf("cleanup: %s", r.stderr)
			}
			if i > 0 {
				total = append(total, took)
			}
		}
		return total
	}
	plain := prepare(nil)
	cached := prepare(map[string]string{"LIBVIRT_GCI_CACHE_DIR": cacheDir(b)})
	sized := prepare(size)
	t.add(label+": prepare with a cache share", ms(median(cached)), "plain restore "+ms(median(plain)), ratio(median(cached), median(plain)), "≤ 1.2")
	t.add(fmt.Sprintf(label+": prepare with a size (%s CPUs, %s)", size["CUSTOM_ENV_LIBVIRT_GCI_CPUS"], size["CUSTOM_ENV_LIBVIRT_GCI_MEMORY"]), ms(median(sized)), "plain restore "+ms(median(plain)), ratio(median(sized), median(plain)), "≤ 1.2")
	if big != nil {
		large := prepare(big)
		t.add(label+": prepare of a "+big["CUSTOM_ENV_LIBVIRT_GCI_MEMORY"]+" guest", ms(median(large)), "template's size "+ms(median(plain)), ratio(median(large), median(plain)), "≤ 1.2")
	}
}
