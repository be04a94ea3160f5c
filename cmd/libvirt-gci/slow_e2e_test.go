package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// slowQEMU is a QEMU binary that libvirt takes seconds to probe, as on a host where
// libvirtd probes QEMU again on every call (see "Slow libvirt" in README.rst). It is
// a wrapper that sleeps in libvirt's capability probes (QEMU started with -machine none)
// while the file "slow" exists beside it, and logs each probe's start and end.
type slowQEMU struct {
	dir, bin, log string
}

func newSlowQEMU(t *testing.T) *slowQEMU {
	t.Helper()
	// libvirt runs the probe as its QEMU user: the directory must be open to it.
	dir, err := os.MkdirTemp("", "libvirt-gci-slowqemu")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	q := &slowQEMU{dir: dir, bin: filepath.Join(dir, "qemu-system-x86_64"), log: filepath.Join(dir, "probes.log")}
	require.NoError(t, os.WriteFile(q.log, nil, 0o666))
	require.NoError(t, os.Chmod(q.log, 0o666))
	script := `#!/bin/sh
case " $* " in
*" -machine none"*)
  if [ -e ` + dir + `/slow ]; then echo probe >>` + q.log + `; sleep 4; echo probed >>` + q.log + `; fi ;;
esac
exec /usr/bin/qemu-system-x86_64 "$@"
`
	require.NoError(t, os.WriteFile(q.bin, []byte(script), 0o755))
	return q
}

// slowDown makes the next libvirt call that needs QEMU's capabilities probe again, slowly:
// libvirt's cache of them is invalid once the binary's ctime changes.
func (q *slowQEMU) slowDown(t *testing.T) {
	require.NoError(t, os.WriteFile(filepath.Join(q.dir, "slow"), nil, 0o644))
	now := time.Now()
	require.NoError(t, os.Chtimes(q.bin, now, now))
}

// idle tells whether no probe has run for 5 s.
func (q *slowQEMU) idle() bool {
	s, f := q.probes()
	fi, err := os.Stat(q.log)
	return err == nil && s == f && time.Since(fi.ModTime()) > 5*time.Second
}

func (q *slowQEMU) probes() (started, finished int) {
	b, _ := os.ReadFile(q.log)
	for _, l := range strings.Split(string(b), "\n") {
		switch l {
		case "probe":
			started++
		case "probed":
			finished++
		}
	}
	return
}

// The runner's SIGTERM (a cancel, a timeout) reaches prepare while libvirtd is still
// working on its define, slowly (8 s). Prepare waits for libvirt's answer only for
// provision.CancelGrace, so that it exits within 5 s of the SIGTERM; it then says that
// the define's outcome is unknown and how to remove what it made. The define lands
// later, and the runner's cleanup stage, which follows a failed prepare, removes it.
func TestPrepareSIGTERMDuringSlowDefine(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.env["LIBVIRT_GCI_START"] = "boot" // the define that is slow is the instance's
	q := newSlowQEMU(t)

	// A template like the test template, on the slow QEMU.
	j.defineTemplate("tiny-slowqemu-"+j.jobID, `(?s)<emulator>.*?</emulator>`, "<emulator>"+q.bin+"</emulator>")

	q.slowDown(t)
	cmd := exec.Command(binPath, "prepare")
	cmd.Env = j.environ()
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	require.Eventually(t, func() bool { n, _ := q.probes(); return n > 0 }, 2*time.Minute, 20*time.Millisecond,
		"prepare's define never made libvirt probe QEMU; stderr:\n%s", stderr.String())
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM)) // the define is in libvirtd now
	sent := time.Now()

	select {
	case err := <-exited:
		ee, ok := err.(*exec.ExitError)
		require.True(t, ok, "want a failure exit, got %v; stderr:\n%s", err, stderr.String())
		assert.Equal(t, 2, ee.ExitCode(), "SYSTEM_FAILURE_EXIT_CODE")
		assert.Less(t, time.Since(sent), 5*time.Second, "exit within 5 s of SIGTERM")
	case <-time.After(time.Minute):
		_ = cmd.Process.Kill()
		t.Fatalf("prepare did not exit within a minute of SIGTERM; stderr:\n%s", stderr.String())
	}
	inst := j.instance()
	assert.Contains(t, stderr.String(), fmt.Sprintf("define %q: outcome unknown: libvirt did not answer within 3s of the cancel; "+
		"if the call completes later, `libvirt-gci cleanup --machine %s` removes what it made", inst, inst))

	// Wait until libvirtd is done with the slow QEMU (no probe running, none for 5 s: one
	// define probes twice, 2 s apart); the define has landed by then. The runner's
	// cleanup removes it.
	require.Eventually(t, q.idle, 3*time.Minute, 100*time.Millisecond)
	r := j.stage("cleanup")
	assert.Equal(t, 0, r.code, r.stderr)
	assert.Empty(t, leftovers(t, j.l, j.prefix), "stderr:\n%s", stderr.String())
}

// A stalled libvirtd (here stopped with SIGSTOP) does not keep a cancelled run stage
// alive: go-libvirt has no timeouts, so the stage drops its connection a bounded time
// after the runner's SIGTERM and exits with a system failure. Not parallel: stopping
// libvirtd stalls every test that uses it, and sequential tests run alone.
func TestRunSIGTERMWithStalledLibvirtd(t *testing.T) {
	j := newJob(t)
	j.prepare()
	out, err := exec.Command("pgrep", "-x", "libvirtd").Output()
	require.NoError(t, err, "libvirtd is not running")
	pid, err := strconv.Atoi(strings.Fields(string(out))[0])
	require.NoError(t, err)

	cancelWhileStalled(t, j, "libvirtd", func() func() {
		require.NoError(t, syscall.Kill(pid, syscall.SIGSTOP))
		return func() { _ = syscall.Kill(pid, syscall.SIGCONT) }
	})
	r := j.stage("cleanup")
	assert.Equal(t, 0, r.code, r.stderr)
}

// cancelWhileStalled starts a run stage, waits for its script to start, stalls what it
// depends on (stall returns how to resume it), sends the runner's SIGTERM, and requires
// the stage to exit as a system failure within 5 s.
func cancelWhileStalled(t *testing.T, j *gitlabJob, what string, stall func() (resume func())) {
	t.Helper()
	cmd := exec.Command(binPath, "run", j.script("b.sh", "echo up; sleep 613"), "build_script")
	cmd.Env = j.environ()
	var output lockedBuffer
	cmd.Stdout, cmd.Stderr = &output, &output
	require.NoError(t, cmd.Start())
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	require.Eventually(t, func() bool { return strings.Contains(output.String(), "up") }, time.Minute, 20*time.Millisecond)

	resume := sync.OnceFunc(stall())
	t.Cleanup(resume)
	time.Sleep(500 * time.Millisecond) // the stage is now waiting on it
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
	sent := time.Now()
	select {
	case err := <-exited:
		resume()
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee, "want a failure exit; output:\n%s", output.String())
		assert.Equal(t, 2, ee.ExitCode(), "SYSTEM_FAILURE_EXIT_CODE")
		took := time.Since(sent)
		assert.Less(t, took, 5*time.Second, "exit within 5 s of SIGTERM")
		t.Logf("run exited %.1f s after SIGTERM with %s stopped", took.Seconds(), what)
	case <-time.After(2 * time.Minute):
		resume()
		_ = cmd.Process.Kill()
		t.Fatalf("run still waits on the stopped %s 2 min after SIGTERM; output:\n%s", what, output.String())
	}
}
