package main

import (
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

// perfSystemd: the systemd Debian guest's rows of the Performance table: prepare by a
// cold boot and by a restore (to a ready agent, then systemd's boot over and the NIC's
// DHCP address), an empty stage over each transport, and a trivial job through the real
// gitlab-runner.
func perfSystemd(b *testing.B, t *perfTable) {
	j := newSystemdJob(b, "agent")
	j.env["LIBVIRT_GCI_LOG_FORMAT"] = "json"
	w := j.stage("template", "warm", testSystemdTmpl)
	if w.code != 0 {
		b.Fatal(w.stderr)
	}
	warm := regexp.MustCompile(`(libvirt-gci-warm-[0-9a-f]+-[0-9a-f]+)`).FindString(w.stderr)
	if warm == "" {
		b.Fatalf("template warm named no image:\n%s", w.stderr)
	}
	type prep struct{ total, restore, agent, system, network, reserve, setup []time.Duration }
	measure := func(start string, runs int) prep {
		var p prep
		j.env["LIBVIRT_GCI_START"] = start
		for i := 0; i < runs; i++ {
			// On a quiet host, as the raw floor is measured: the last prepare's VM gone
			// (its cleanup returns at once, and its finisher destroys it beside the next).
			awaitNoInstances(b, j)
			r, took, _ := j.timedStage("prepare")
			if r.code != 0 {
				b.Fatalf("prepare (%s): %s", start, r.stderr)
			}
			d := msField(r.stderr)
			p.total = append(p.total, took)
			p.restore = append(p.restore, d("restore_ms"))
			p.agent = append(p.agent, d("ready_ms"))
			p.system = append(p.system, d("system_ms"))
			p.network = append(p.network, d("network_ms"))
			p.reserve = append(p.reserve, d("reserve_ms"))
			p.setup = append(p.setup, d("setup_ms"))
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
	awaitNoInstances(b, j)
	floor, _, _ := rawFloors(b, j.l, warm, 0)
	t.add("systemd guest: prepare in all, restore", ms(median(restored.total)), "cold boot "+ms(median(booted.total)), ratio(median(restored.total), median(booted.total)), "")
	t.add("  agent / then systemd / then DHCP", split(restored), "boot: "+split(booted), "", "")
	t.add("systemd guest: restored, ready for its job", ms(median(restored.total)), "raw restore floor "+ms(median(floor)), ratio(median(restored.total), median(floor)), "≤ 1.5")
	t.add("  restore call / the rest to the agent / set-up / address", fmt.Sprintf("%d / %d / %d / %d ms", median(restored.restore).Milliseconds(),
		(median(restored.agent)-median(restored.restore)).Milliseconds(), median(restored.setup).Milliseconds(), median(restored.network).Milliseconds()), "", "", "")
	// The NIC's address: reserved on the network beside the restore (before the start, for
	// a boot), the network filter put on during the guest's set-up (which brings the link
	// up), then the wait for the guest's DHCP client after the link.
	t.add("systemd guest: address after the link, restore", ms(median(restored.network)), "boot "+ms(median(booted.network)), "", "≤ 300 ms")
	t.add("  reserved on the network / set-up with the filter", ms(median(restored.reserve))+" / "+ms(median(restored.setup)),
		"boot: "+ms(median(booted.reserve))+" / "+ms(median(booted.setup)), "", "")

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

	// Prepare with a cache, with a size, and of a 4 GiB guest, beside a plain restore.
	perfVariants(b, t, "systemd guest", newSystemdJob(b, "agent"),
		map[string]string{"CUSTOM_ENV_LIBVIRT_GCI_CPUS": "2", "CUSTOM_ENV_LIBVIRT_GCI_MEMORY": "1536M"},
		map[string]string{"CUSTOM_ENV_LIBVIRT_GCI_MEMORY": "4G"})

	// A trivial job through the real runner, beside the no-VM runner and the raw floors.
	perfJobs(b, t, "systemd guest", testSystemdTmpl, "LIBVIRT_GCI_TEMPLATES=tiny-*,"+testSystemdTmpl,
		"LIBVIRT_GCI_DEFAULT_TEMPLATE="+testSystemdTmpl, "LIBVIRT_GCI_BOOT_TIMEOUT=5m")
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

// awaitNoInstances waits (a minute at most) until no domain of j's prefix is left.
func awaitNoInstances(b *testing.B, j *gitlabJob) {
	b.Helper()
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		doms, _, err := j.l.ConnectListAllDomains(1, 0)
		if err != nil {
			b.Fatal(err)
		}
		left := false
		for _, d := range doms {
			left = left || strings.HasPrefix(d.Name, j.prefix)
		}
		if !left {
			return
		}
		if time.Since(start) > time.Minute {
			b.Fatalf("domains of %s still there after a minute", j.prefix)
		}
	}
}
