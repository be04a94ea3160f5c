package main

// Stalls: a libvirtd, a guest or a guest agent that stops answering (SIGSTOP, virsh
// suspend, a slow define). Every wait is bounded and a SIGTERM still ends each stage
// within seconds, leaving nothing behind.

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// silentLibvirtd listens on a unix socket, completes libvirt's RPC handshake (auth list,
// connect open) with each client, and then never answers again: a libvirtd that hangs
// after accepting a connection. It returns a libvirt URI for it.
func silentLibvirtd(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "gci-silent") // short: socket paths are limited
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "libvirt-sock")
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveSilently(c)
		}
	}()
	return "qemu:///system?socket=" + sock
}

// libvirt's RPC procedures of the handshake, and its packet header's fields.
const (
	procConnectOpen = 1
	procAuthList    = 66
	rpcReply        = 1
)

func serveSilently(c net.Conn) {
	defer c.Close()
	for {
		var size uint32
		if err := binary.Read(c, binary.BigEndian, &size); err != nil || size < 28 {
			return
		}
		pkt := make([]byte, size-4)
		if _, err := io.ReadFull(c, pkt); err != nil {
			return
		}
		// program, version, procedure, type, serial, status: six big-endian uint32s.
		proc := binary.BigEndian.Uint32(pkt[8:12])
		var body []byte
		switch proc {
		case procAuthList:
			body = []byte{0, 0, 0, 1, 0, 0, 0, 0} // one method: none
		case procConnectOpen:
		default:
			continue // and never answer
		}
		reply := make([]byte, 28, 28+len(body))
		binary.BigEndian.PutUint32(reply[0:4], uint32(28+len(body)))
		copy(reply[4:16], pkt[0:12]) // program, version, procedure
		binary.BigEndian.PutUint32(reply[16:20], rpcReply)
		copy(reply[20:24], pkt[16:20]) // serial
		if _, err := c.Write(append(reply, body...)); err != nil {
			return
		}
	}
}

// Every stage exits within 5 s of the runner's SIGTERM with a system failure, whatever
// libvirtd does: here it accepts the connection and then never answers. (Before, cleanup
// ignored SIGTERM for its 2-minute bound, and prepare waited minutes for a create call.)
func TestStagesExitSoonAfterSIGTERMWhenLibvirtdHangs(t *testing.T) {
	t.Parallel()
	require.NoError(t, buildErr)
	uri := silentLibvirtd(t)
	for _, tc := range []struct {
		stage []string
		want  string // what it waited for
	}{
		{[]string{"prepare"}, `sweeping orphans: list domains`},
		{[]string{"run", "SCRIPT", "build_script"}, `look up instance "`},
		{[]string{"cleanup"}, `look up instance "`},
	} {
		t.Run(tc.stage[0], func(t *testing.T) {
			t.Parallel()
			j := &gitlabJob{t: t, dir: t.TempDir()}
			j.env = map[string]string{
				"LIBVIRT_GCI_URI":          uri,
				"LIBVIRT_GCI_TEMPLATES":    "tiny-*",
				"JOB_RESPONSE_FILE":        filepath.Join(j.dir, "response.json"),
				"SYSTEM_FAILURE_EXIT_CODE": "2",
				"CUSTOM_ENV_DISTRO":        "tiny-hang",
			}
			j.writeResponse("99", "77", "r")
			args := tc.stage
			if args[0] == "run" {
				args = []string{"run", j.script("b.sh", "echo never"), "build_script"}
			}
			cmd := exec.Command(binPath, args...)
			cmd.Env = j.environ()
			var stderr lockedBuffer
			cmd.Stderr = &stderr
			require.NoError(t, cmd.Start())
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			time.Sleep(time.Second) // now waiting on the silent libvirtd
			select {
			case err := <-exited:
				t.Fatalf("exited before the SIGTERM: %v\n%s", err, stderr.String())
			default:
			}
			require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
			sent := time.Now()
			select {
			case err := <-exited:
				took := time.Since(sent)
				ee, ok := err.(*exec.ExitError)
				require.True(t, ok, "want a failure exit, got %v; stderr:\n%s", err, stderr.String())
				assert.Equal(t, 2, ee.ExitCode(), "SYSTEM_FAILURE_EXIT_CODE")
				assert.Less(t, took, 5*time.Second)
				assert.Contains(t, stderr.String(), tc.want, "names what it waited for")
				assert.Contains(t, stderr.String(), "procedure interrupted while awaiting response (cancelled by SIGTERM)\n")
				t.Logf("%s exited %.1f s after SIGTERM: %s", tc.stage[0], took.Seconds(), stderr.String())
			case <-time.After(30 * time.Second):
				_ = cmd.Process.Kill()
				t.Fatalf("still running 30 s after SIGTERM; stderr:\n%s", stderr.String())
			}
		})
	}
}

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
// libvirt compares ctimes in whole seconds: the new one must be in a later second than
// the one libvirt probed (the binary's making, a second ago or less).
func (q *slowQEMU) slowDown(t *testing.T) {
	require.NoError(t, os.WriteFile(filepath.Join(q.dir, "slow"), nil, 0o644))
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(q.bin, &st))
	time.Sleep(time.Until(time.Unix(st.Ctim.Sec+1, 50e6)))
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
// working on its define, slowly (8 s: two probes of a QEMU that takes 4 s each). Prepare
// waits for libvirt's answer (up to provision.CancelGrace) and removes what the define
// made: nothing is left even before the runner's cleanup. (A libvirtd that does not
// answer within the grace is the unit tests' case: prepare then says the outcome is
// unknown.)
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

	if !assert.Eventually(t, func() bool { n, _ := q.probes(); return n > 0 }, 2*time.Minute, 20*time.Millisecond) {
		_ = cmd.Process.Kill()
		t.Fatalf("prepare's define never made libvirt probe QEMU; stderr:\n%s", stderr.String())
	}
	require.NoError(t, cmd.Process.Signal(syscall.SIGTERM)) // the define is in libvirtd now
	sent := time.Now()

	select {
	case err := <-exited:
		ee, ok := err.(*exec.ExitError)
		require.True(t, ok, "want a failure exit, got %v; stderr:\n%s", err, stderr.String())
		assert.Equal(t, 2, ee.ExitCode(), "SYSTEM_FAILURE_EXIT_CODE")
		assert.Less(t, time.Since(sent), provision.CancelGrace+5*time.Second, "exit within the grace of SIGTERM")
	case <-time.After(time.Minute):
		_ = cmd.Process.Kill()
		t.Fatalf("prepare did not exit within a minute of SIGTERM; stderr:\n%s", stderr.String())
	}
	inst := j.instance()
	assert.Contains(t, stderr.String(), fmt.Sprintf("define %q: done, but cancelled meanwhile", inst))
	assert.NotContains(t, stderr.String(), "outcome unknown")
	assert.Empty(t, leftovers(t, j.l, j.prefix), "prepare's rollback left something; stderr:\n%s", stderr.String())

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

// A guest that is slow or stops mid-script (virsh suspend), over each transport:
//   - its agent answers one call 12 s late (qemu-ga stopped for 12 s, as a guest starved
//     of CPU would be): the job goes on and succeeds (before, one agent reply slower
//     than 10 s failed the job);
//   - suspended for 12 s and resumed: the job goes on and succeeds (before, libvirt's
//     refusal of agent calls to a paused domain failed it at once);
//   - the guest (ssh: suspended) or its agent (stopped) does not answer, then the
//     runner's SIGTERM: the stage exits within 5 s (before, the SSH transport's cancel
//     waited on the frozen guest);
//   - suspended for good: a system failure within a bound (before, SSH waited forever).
//
// And a script that kills its own process group is a build failure over both.
func TestFrozenGuest(t *testing.T) {
	t.Parallel()
	overEachTransport(t, testFrozenGuest)
}

func testFrozenGuest(t *testing.T, j *gitlabJob) {
	j.prepare()
	dom, err := j.l.DomainLookupByName(j.instance())
	require.NoError(t, err)
	resume := func() { _ = j.l.DomainResume(dom) }
	t.Cleanup(resume)

	t.Run("self-kill is a build failure", func(t *testing.T) {
		r := j.run("build_script", "echo before; kill 0; echo after")
		assert.Equal(t, 1, r.code, "BUILD_FAILURE_EXIT_CODE: %s", r.stderr)
		assert.Equal(t, "before\n", r.stdout)
		code, err := os.ReadFile(j.env["BUILD_EXIT_CODE_FILE"])
		require.NoError(t, err)
		assert.Equal(t, "143\n", string(code), "128+SIGTERM, as a shell reports it")
	})

	t.Run("slow agent", func(t *testing.T) {
		r := j.run("build_script", `ga=$(pidof qemu-ga); test -n "$ga"
(sleep 0.5; kill -STOP $ga; sleep 12; kill -CONT $ga) &
wait; echo "agent answers again"`)
		assert.Equal(t, 0, r.code, r.stderr)
		assert.Equal(t, "agent answers again\n", r.stdout)
	})

	t.Run("suspended briefly", func(t *testing.T) {
		s := j.start("run", j.script("b.sh", "echo start; sleep 3; echo end"), "build_script")
		s.waitFor("start")
		require.NoError(t, j.l.DomainSuspend(dom))
		time.Sleep(12 * time.Second)
		require.NoError(t, j.l.DomainResume(dom))
		code, took := s.wait(2 * time.Minute)
		assert.Equal(t, 0, code, "the job survives a 12 s pause (%.1f s): %s", took.Seconds(), s.out.String())
		assert.Contains(t, s.out.String(), "end")
	})

	t.Run("suspended for good", func(t *testing.T) {
		s := j.start("run", j.script("b.sh", "echo up; sleep 613"), "build_script")
		s.waitFor("up")
		require.NoError(t, j.l.DomainSuspend(dom))
		s.sent = time.Now()
		defer resume()
		code, took := s.wait(3 * time.Minute)
		assert.Equal(t, 2, code, "SYSTEM_FAILURE_EXIT_CODE: %s", s.out.String())
		want := map[string]string{"ssh": "the guest stopped answering for 30s", "agent": "the guest has been paused for 30s"}[j.transport]
		assert.Contains(t, s.out.String(), want)
		t.Logf("%s: system failure %.1f s after the guest froze", j.transport, took.Seconds())
	})
	// Last: over the agent, the guest's agent stays stopped.
	t.Run("SIGTERM while the guest does not answer", func(t *testing.T) {
		body := "echo up; sleep 613"
		if j.transport == "agent" {
			// Stop the agent for good (a paused domain makes libvirt refuse agent calls
			// at once; a hung agent is what keeps a call waiting).
			body = `ga=$(pidof qemu-ga); (sleep 1; kill -STOP $ga) & echo up; sleep 613`
		}
		s := j.start("run", j.script("b.sh", body), "build_script")
		s.waitFor("up")
		if j.transport == "ssh" {
			require.NoError(t, j.l.DomainSuspend(dom))
			defer resume()
		}
		time.Sleep(2 * time.Second)
		require.NoError(t, s.cmd.Process.Signal(syscall.SIGTERM), "exited before the SIGTERM: %s", s.out.String())
		s.sent = time.Now()
		code, took := s.wait(time.Minute)
		assert.Equal(t, 2, code, "SYSTEM_FAILURE_EXIT_CODE: %s", s.out.String())
		assert.Less(t, took, 5*time.Second, "exit within 5 s of SIGTERM: %s", s.out.String())
		t.Logf("%s: exited %.1f s after SIGTERM", j.transport, took.Seconds())
	})
	resume()
	r := j.stage("cleanup")
	assert.Equal(t, 0, r.code, r.stderr)
}

// started is a stage running in the background.
type started struct {
	t      *testing.T
	cmd    *exec.Cmd
	out    *lockedBuffer
	exited chan error
	sent   time.Time
}

func (j *gitlabJob) start(args ...string) *started {
	j.t.Helper()
	s := &started{t: j.t.(*testing.T), cmd: exec.Command(binPath, args...), out: &lockedBuffer{}, exited: make(chan error, 1)}
	s.cmd.Env = j.environ()
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	require.NoError(j.t, s.cmd.Start())
	go func() { s.exited <- s.cmd.Wait() }()
	return s
}

func (s *started) waitFor(text string) {
	s.t.Helper()
	require.Eventually(s.t, func() bool { return strings.Contains(s.out.String(), text) }, time.Minute, 20*time.Millisecond,
		"no %q in: %s", text, s.out.String())
	s.sent = time.Now()
}

// wait returns the stage's exit code, and how long it took since sent.
func (s *started) wait(bound time.Duration) (int, time.Duration) {
	s.t.Helper()
	select {
	case err := <-s.exited:
		took := time.Since(s.sent)
		if ee, ok := err.(*exec.ExitError); ok {
			return ee.ExitCode(), took
		}
		require.NoError(s.t, err)
		return 0, took
	case <-time.After(bound):
		_ = s.cmd.Process.Kill()
		s.t.Fatalf("still running after %s: %s", bound, s.out.String())
		return -1, 0
	}
}

// The operator's commands that the gc timer and a person run, doctor and metrics, end
// within their bound when libvirtd accepts a connection and never answers: doctor says
// so as a problem, metrics writes the host as down; both exit non-zero.
func TestOperatorCommandsWithSilentLibvirtd(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.env["LIBVIRT_GCI_URI"] = silentLibvirtd(t)
	j.env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	for _, c := range []struct {
		args  []string
		wants []string
	}{
		{[]string{"doctor"}, []string{"PROBLEM libvirt at qemu:///system: no answer within 15s; fix: "}},
		{[]string{"metrics"}, []string{"libvirt_gci_up{host=\"qemu:///system\"} 0", "metrics: qemu:///system: ", "(no answer within 15s)"}},
	} {
		start := time.Now()
		r := j.stage(c.args...)
		took := time.Since(start)
		assert.Equal(t, 2, r.code, "%v: %s%s", c.args, r.stdout, r.stderr)
		assert.Less(t, took, 25*time.Second, "%v ends within its bound", c.args)
		for _, want := range c.wants {
			assert.Contains(t, r.stdout+r.stderr, want, c.args)
		}
		t.Logf("%v: exit %d after %.1f s:\n%s%s", c.args, r.code, took.Seconds(), r.stdout, r.stderr)
	}
}
