package main

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/libvirt-gci/libvirt-gci/cmd/libvirt-gci/internal/fakegitlab"
)

// perfSystemd: the systemd Debian guest's rows of the Performance table: prepare by a
// cold boot and by a restore (to a ready agent, then systemd's boot over and the NIC's
// DHCP address), an empty stage over each transport, and a trivial job through the real
// gitlab-runner.
func perfSystemd(b *testing.B, t *perfTable) {
	j := newSystemdJob(b, "agent")
	j.env["LIBVIRT_GCI_LOG_FORMAT"] = "json"
	if r := j.stage("template", "warm", testSystemdTmpl); r.code != 0 {
		b.Fatal(r.stderr)
	}
	type prep struct{ total, agent, system, network []time.Duration }
	measure := func(start string, runs int) prep {
		var p prep
		j.env["LIBVIRT_GCI_START"] = start
		for i := 0; i < runs; i++ {
			r, took, _ := j.timedStage("prepare")
			if r.code != 0 {
				b.Fatalf("prepare (%s): %s", start, r.stderr)
			}
			d := msField(r.stderr)
			p.total = append(p.total, took)
			p.agent = append(p.agent, d("ready_ms"))
			p.system = append(p.system, d("system_ms"))
			p.network = append(p.network, d("network_ms"))
			if r := j.stage("cleanup"); r.code != 0 {
				b.Fatalf("cleanup: %s", r.stderr)
			}
		}
		return p
	}
	restored := measure("restore", perfRuns)
	booted := measure("boot", 3) // a cold boot takes half a minute here: three
	delete(j.env, "LIBVIRT_GCI_START")
	split := func(p prep) string {
		return fmt.Sprintf("%.1f / %.1f / %.1f s", median(p.agent).Seconds(), median(p.system).Seconds(), median(p.network).Seconds())
	}
	t.add("systemd guest: prepare in all, restore", ms(median(restored.total)), "cold boot "+ms(median(booted.total)), ratio(median(restored.total), median(booted.total)), "")
	t.add("  agent / then systemd / then DHCP", split(restored), "boot: "+split(booted), "", "")

	for _, tr := range transports {
		s := newSystemdJob(b, tr)
		s.prepare()
		empty := s.script("empty.sh", "true")
		var stage []time.Duration
		for i := 0; i < perfRuns; i++ {
			r, took, _ := s.timedStage("run", empty, "build_script")
			if r.code != 0 {
				b.Fatal(r.stderr)
			}
			stage = append(stage, took)
		}
		s.stage("cleanup")
		t.add("systemd guest: empty stage over "+tr, ms(median(stage)), "", "", "")
	}

	// A trivial job through the real runner: the first makes the warm image of the
	// runner's profile (its helper disk), the others are timed from the moment the runner
	// takes the job to its final update.
	h := newRunnerHost(b, "agent")
	h.env = append(h.env, "LIBVIRT_GCI_TEMPLATES=tiny-*,"+testSystemdTmpl, "LIBVIRT_GCI_DEFAULT_TEMPLATE="+testSystemdTmpl, "LIBVIRT_GCI_BOOT_TIMEOUT=5m")
	jobs := make([]*fakegitlab.Job, 1+3)
	for i := range jobs {
		jobs[i] = h.gl.Add(fakegitlab.JobSpec{Script: []string{"true"}})
	}
	p := h.runSingle(len(jobs))
	var took []time.Duration
	for i, fj := range jobs {
		final, trace := h.finish(fj)
		if final.State != "success" {
			b.Fatalf("job failed: %+v\n%s", final, trace)
		}
		if !strings.Contains(trace, "restored ") && i > 0 {
			b.Fatalf("job %d was not restored:\n%s", i, trace)
		}
		taken, finished := h.gl.Times(fj)
		if i > 0 {
			took = append(took, finished.Sub(taken))
		}
	}
	p.wait(b, time.Minute)
	t.add("systemd guest: trivial job, real runner", ms(median(took)), "", "", "")
}

// BenchmarkPerformanceSystemd prints the systemd guest's rows of the Performance table
// alone (BenchmarkPerformance prints them with the others).
func BenchmarkPerformanceSystemd(b *testing.B) {
	if b.N > 1 {
		return
	}
	var t perfTable
	perfSystemd(b, &t)
	fmt.Println()
	t.print(os.Stdout)
}
