package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestSoak runs N sequential and M concurrent jobs with a random fault each (or none),
// then counts what leaked, and prints one summary line. `make soak` runs it
// (LIBVIRT_GCI_SOAK=1; SOAK_N and SOAK_M set the numbers).
func TestSoak(t *testing.T) {
	if os.Getenv("LIBVIRT_GCI_SOAK") != "1" {
		t.Skip("soak: set LIBVIRT_GCI_SOAK=1 (make soak)")
	}
	n, m := envInt("SOAK_N", 6), envInt("SOAK_M", 4)
	base := newJob(t)
	var faults, failed atomic.Int64
	one := func(seed uint64) {
		j := newJob(t)
		j.prefix, j.env["LIBVIRT_GCI_PREFIX"] = base.prefix, base.prefix
		fault := []string{"none", "kill prepare", "kill run", "SIGTERM run", "failing script", "guest poweroff"}[rand.New(rand.NewPCG(seed, 7)).IntN(6)]
		if fault != "none" {
			faults.Add(1)
		}
		switch fault {
		case "kill prepare":
			s := j.start("prepare")
			time.Sleep(time.Duration(seed%2000) * time.Millisecond)
			_ = s.cmd.Process.Kill()
			_, _ = s.wait(time.Minute)
		default:
			if r := j.stage("prepare"); r.code != 0 {
				failed.Add(1)
				t.Logf("prepare failed: %s", r.stderr)
				break
			}
			switch fault {
			case "kill run", "SIGTERM run":
				s := j.start("run", j.script("b.sh", "echo up; sleep 613"), "build_script")
				s.waitFor("up")
				if fault == "kill run" {
					_ = s.cmd.Process.Kill()
				} else {
					_ = s.cmd.Process.Signal(syscall.SIGTERM)
				}
				_, _ = s.wait(time.Minute)
			case "failing script":
				j.run("build_script", "exit 3")
			case "guest poweroff":
				j.run("build_script", "busybox poweroff -f 2>/dev/null || echo o >/proc/sysrq-trigger; sleep 30")
			default:
				if r := j.run("build_script", "echo ok"); r.code != 0 {
					failed.Add(1)
				}
			}
		}
		if r := j.stage("cleanup"); r.code != 0 {
			failed.Add(1)
			t.Logf("cleanup failed: %s", r.stderr)
		}
	}
	start := time.Now()
	for i := range n {
		one(uint64(i))
	}
	var wg sync.WaitGroup
	for i := range m {
		wg.Add(1)
		go func() { defer wg.Done(); one(uint64(1000 + i)) }()
	}
	wg.Wait()
	var doms, vols int
	for _, l := range leftovers(t, base.l, base.prefix) {
		switch {
		case len(l) > 7 && l[:7] == "domain ":
			doms++
		case len(l) > 7 && l[:7] == "volume ":
			vols++
		}
	}
	fmt.Printf("soak: %d jobs (%d sequential, %d concurrent), %d faults injected, %d unexpected failures, %d domains leaked, %d volumes leaked, %.0f s\n",
		n+m, n, m, faults.Load(), failed.Load(), doms, vols, time.Since(start).Seconds())
}

func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n >= 0 {
		return n
	}
	return def
}
