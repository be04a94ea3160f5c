package main

// Benchmarks on the real VM (make bench): how long each stage takes, split the way the
// progress records' fields report it.

import (
	"encoding/json"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/libvirt-gci/libvirt-gci/cmd/libvirt-gci/internal/fakegitlab"
)

var (
	// a job log's section markers, from GitLab Runner
	sectionRE = regexp.MustCompile(`^section_(start|end):\d+:(\w+)`)
)

// perTransport runs f as a sub-benchmark per transport, each with a job of its own.
func perTransport(b *testing.B, f func(b *testing.B, j *gitlabJob)) {
	for _, tr := range transports {
		b.Run(tr, func(b *testing.B) { f(b, newJobOver(b, tr)) })
	}
}

func BenchmarkPrepare(b *testing.B) { perTransport(b, benchmarkPrepare) }

// msField is the field k of fields(stderr), a number of milliseconds, as a duration.
func msField(stderr string) func(k string) time.Duration {
	f := fields(stderr)
	return func(k string) time.Duration { return time.Duration(f[k] * float64(time.Millisecond)) }
}

// fields collects the numeric fields of the tool's JSON log records (LIBVIRT_GCI_LOG_FORMAT=json).
func fields(stderr string) map[string]float64 {
	out := map[string]float64{}
	for _, line := range strings.Split(stderr, "\n") {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) != nil {
			continue
		}
		for k, v := range rec {
			if f, ok := v.(float64); ok {
				out[k] = f
			}
		}
	}
	return out
}

func benchmarkPrepare(b *testing.B, j *gitlabJob) {
	j.env["LIBVIRT_GCI_LOG_FORMAT"] = "json" // the fields, not the prose
	var define, clone, start, agent, helper, ssh, total time.Duration
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		r := j.stage("prepare")
		total += time.Since(t0)
		if r.code != 0 {
			b.Fatalf("prepare: %s", r.stderr)
		}
		b.StopTimer()
		f := fields(r.stderr)
		if _, ok := f["agent_ready_ms"]; !ok {
			b.Fatalf("no timings in %q", r.stderr)
		}
		ms := func(k string) time.Duration { return time.Duration(f[k] * float64(time.Millisecond)) }
		define += ms("define_ms")
		clone += ms("clone_ms")
		start += ms("start_ms")
		agent += ms("agent_ready_ms")
		helper += ms("setup_ms")
		ssh += ms("ssh_ready_ms")
		if r := j.stage("cleanup"); r.code != 0 {
			b.Fatalf("cleanup: %s", r.stderr)
		}
		b.StartTimer()
	}
	n := float64(b.N)
	b.ReportMetric(float64(define.Milliseconds())/n, "define-ms")
	b.ReportMetric(float64(clone.Milliseconds())/n, "overlay-ms")
	b.ReportMetric(float64(start.Milliseconds())/n, "start-ms")
	b.ReportMetric(float64(agent.Milliseconds())/n, "agent-ready-ms")
	if helper > 0 {
		b.ReportMetric(float64(helper.Milliseconds())/n, "then-setup-ms")
	}
	if ssh > 0 {
		b.ReportMetric(float64(ssh.Milliseconds())/n, "then-ssh-ready-ms")
	}
	b.ReportMetric(float64(total.Milliseconds())/n, "prepare-ms")
}

// Prepare with the gitlab-runner helper: a copy of the runner binary (a binary of its
// own: its helper disk is built first, once, and measured apart), then prepares that
// mount it.
func BenchmarkPrepareWithHelper(b *testing.B) {
	perTransport(b, func(b *testing.B, j *gitlabJob) {
		src, err := os.ReadFile(gitlabRunnerBin(b))
		if err != nil {
			b.Fatal(err)
		}
		bin := filepath.Join(b.TempDir(), "gitlab-runner")
		if err := os.WriteFile(bin, src, 0o755); err != nil {
			b.Fatal(err)
		}
		j.env["LIBVIRT_GCI_RUNNER_BINARY"] = bin
		j.env["LIBVIRT_GCI_LOG_FORMAT"] = "json"
		r := j.stage("prepare")
		if r.code != 0 {
			b.Fatalf("prepare: %s", r.stderr)
		}
		j.stage("cleanup")
		var built float64
		for _, line := range strings.Split(r.stderr, "\n") {
			var rec struct {
				Volume string  `json:"volume"`
				Ms     float64 `json:"helper_build_ms"`
			}
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Volume != "" {
				built = rec.Ms
				b.Cleanup(func() { deleteVolumes(b, j.l, rec.Volume, rec.Volume+".done") })
			}
		}
		b.ResetTimer()
		benchmarkPrepare(b, j)
		b.ReportMetric(built, "helper-disk-built-once-ms")
	})
}

// The per-stage overhead: run with an empty script.
func BenchmarkRunEmptyScript(b *testing.B) { perTransport(b, benchmarkRunEmptyScript) }

func benchmarkRunEmptyScript(b *testing.B, j *gitlabJob) {
	j.prepare()
	script := j.script("empty.sh", "true")
	if r := j.stage("run", script, "build_script"); r.code != 0 { // creates the guest directory
		b.Fatal(r.stderr)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if r := j.stage("run", script, "build_script"); r.code != 0 {
			b.Fatal(r.stderr)
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N), "ms/stage")
	j.stage("cleanup")
}

// Output throughput: a script that prints 16 MiB.
func BenchmarkRunOutput16MiB(b *testing.B) { perTransport(b, benchmarkRunOutput16MiB) }

func benchmarkRunOutput16MiB(b *testing.B, j *gitlabJob) {
	j.prepare()
	script := j.script("out.sh", "head -c 16777216 /dev/zero | tr '\\0' 'x'")
	b.SetBytes(16 << 20)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r := j.stage("run", script, "build_script")
		if r.code != 0 || len(r.stdout) != 16<<20 {
			b.Fatalf("exit %d, %d bytes of output: %s", r.code, len(r.stdout), r.stderr)
		}
	}
	b.StopTimer()
	j.stage("cleanup")
}

func BenchmarkCleanup(b *testing.B) {
	j := newJob(b)
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		if r := j.stage("prepare"); r.code != 0 {
			b.Fatal(r.stderr)
		}
		b.StartTimer()
		if r := j.stage("cleanup"); r.code != 0 {
			b.Fatal(r.stderr)
		}
	}
}

// A trivial job (script: true) end to end through the real gitlab-runner: from the moment
// the runner takes the job to its final update, split by the job log's sections (each
// line carries the runner's timestamp). "setup" is the runner's own start and the config
// stage; "cleanup" is from the last section's end to the final update.
func BenchmarkRunnerTrivialJob(b *testing.B) {
	for _, tr := range transports {
		b.Run(tr, func(b *testing.B) {
			benchmarkRunnerJob(b, tr, nil, func(*runnerHost) fakegitlab.JobSpec { return fakegitlab.JobSpec{Script: []string{"true"}} })
		})
	}
}

// A real pipeline's job: it clones the project, restores and saves a cache (in
// LIBVIRT_GCI_CACHE_DIR), and uploads an artifact, its guest reaching the fake GitLab
// through the forwards; split by the job log's sections.
func BenchmarkRunnerPipelineJob(b *testing.B) {
	for _, tr := range transports {
		b.Run(tr, func(b *testing.B) {
			benchmarkRunnerJob(b, tr, func(h *runnerHost) {
				u, _ := url.Parse(h.gl.URL())
				h.env = append(h.env, "LIBVIRT_GCI_GUEST_FORWARDS="+u.Host, "LIBVIRT_GCI_CACHE_DIR="+cacheDir(b))
			}, func(*runnerHost) fakegitlab.JobSpec {
				return fakegitlab.JobSpec{Fetch: true,
					Script:    []string{`mkdir -p vendor && date >>vendor/log && cp src/greeting.txt out.txt`},
					Cache:     []map[string]any{{"key": "deps", "paths": []string{"vendor/"}, "policy": "pull-push", "when": "on_success"}},
					Artifacts: []map[string]any{{"name": "out", "paths": []string{"out.txt"}, "when": "on_success", "artifact_type": "archive", "artifact_format": "zip"}},
				}
			})
		})
	}
}

func benchmarkRunnerJob(b *testing.B, transport string, setup func(*runnerHost), spec func(*runnerHost) fakegitlab.JobSpec) {
	h := newRunnerHost(b, transport)
	if setup != nil {
		setup(h)
	}
	jobs := make([]*fakegitlab.Job, b.N)
	for i := range jobs {
		jobs[i] = h.gl.Add(spec(h))
	}
	b.ResetTimer()
	p := h.runSingle(b.N)
	for _, j := range jobs {
		if final, trace := h.finish(j); final.State != "success" {
			b.Fatalf("job failed: %+v\n%s", final, trace)
		}
	}
	p.wait(b, time.Minute)
	b.StopTimer()

	phases := map[string]time.Duration{}
	var order []string
	add := func(name string, d time.Duration) {
		if _, ok := phases[name]; !ok {
			order = append(order, name)
		}
		phases[name] += d
	}
	for _, j := range jobs {
		taken, finished := h.gl.Times(j)
		add("job", finished.Sub(taken))
		starts := map[string]time.Time{}
		var first, last time.Time
		for _, l := range fakegitlab.ParseTrace(h.gl.Trace(j)) {
			m := sectionRE.FindStringSubmatch(l.Text)
			switch {
			case m == nil:
			case m[1] == "start":
				starts[m[2]] = l.At
				if first.IsZero() {
					first = l.At
				}
			default:
				add(m[2], l.At.Sub(starts[m[2]]))
				last = l.At
			}
		}
		add("setup", first.Sub(taken))
		add("cleanup", finished.Sub(last))
	}
	for _, name := range order {
		b.ReportMetric(float64(phases[name].Milliseconds())/float64(b.N), name+"-ms")
	}
}

// deleteVolumes removes the named volumes of the test pool, if there.
func deleteVolumes(tb testing.TB, l *libvirt.Libvirt, names ...string) {
	pool, err := l.StoragePoolLookupByName(testPool)
	if err != nil {
		tb.Error(err)
		return
	}
	for _, n := range names {
		if v, err := l.StorageVolLookupByName(pool, n); err == nil {
			if err := l.StorageVolDelete(v, 0); err != nil {
				tb.Error(err)
			}
		}
	}
}
