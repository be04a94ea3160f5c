package main

import (
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

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
