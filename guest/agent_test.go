package guest

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"

	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// newGuest is a running domain "vm" in provisiontest's fake libvirt, and its agent.
func newGuest(t *testing.T) (*provisiontest.Libvirt, *Agent) {
	t.Helper()
	f := provisiontest.New()
	require.NoError(t, f.Boot("vm"))
	a, err := NewAgent(f, "vm")
	require.NoError(t, err)
	return f, a
}

// killedOr waits until the job is signalled, or the test is long over.
func killedOr(j *provisiontest.Job) bool {
	select {
	case <-j.Killed():
		return true
	case <-time.After(10 * time.Second):
		return false
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestRunStreamsOutputAndCleansUp(t *testing.T) {
	t.Parallel()
	f, a := newGuest(t)
	firstSeen := make(chan struct{})
	f.SetJob(func(j *provisiontest.Job) (int, int) {
		assert.Equal(t, "echo hi", j.Script)
		j.Stdout("line 1\n")
		j.Stderr("warn\n")
		<-firstSeen // the host must read line 1 before the script goes on
		j.Stdout(strings.Repeat("x", 3*chunk+5))
		return 3, 0
	})
	var out, errOut syncBuffer
	go func() {
		for !strings.Contains(out.String(), "line 1") {
			time.Sleep(time.Millisecond)
		}
		close(firstSeen)
	}()
	st, err := a.Run(context.Background(), []byte("echo hi"), &out, &errOut)
	require.NoError(t, err)
	assert.Equal(t, ExitStatus{Code: 3}, st)
	assert.Equal(t, "line 1\n"+strings.Repeat("x", 3*chunk+5), out.String(), "large output arrives whole, in order")
	assert.Equal(t, "warn\n", errOut.String())
	g := f.Guest("vm")
	assert.Contains(t, g.Dirs, Dir, "the script directory was made on first use")
	assert.Zero(t, g.Handles, "every guest file handle is closed")
	assert.Zero(t, g.Procs, "every process is reaped")
	for _, p := range g.Files {
		assert.NotContains(t, p, ".sh", "the script (with the job's secrets) is gone")
	}
}

func TestRunReportsSignals(t *testing.T) {
	t.Parallel()
	f, a := newGuest(t)
	_, err := a.Run(context.Background(), []byte("x"), &bytes.Buffer{}, &bytes.Buffer{})
	require.NoError(t, err)
	f.SetJob(func(*provisiontest.Job) (int, int) { return 0, 9 })
	execs := f.AgentCommands("guest-exec")
	st, err := a.Run(context.Background(), []byte("x"), &bytes.Buffer{}, &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, ExitStatus{Code: 137, Signal: 9}, st)
	assert.Equal(t, "killed by signal 9", st.String())
	assert.Equal(t, 2, f.AgentCommands("guest-exec")-execs, "the wrapper killed: the host removes the files")
}

// An empty stage, or one whose output is small, is one guest-exec (the script goes with
// it) and its status (the output comes with it): nothing uploaded, no file opened, read,
// closed or removed by the host.
func TestShortStageIsOneExecAndItsStatus(t *testing.T) {
	t.Parallel()
	for _, out := range []string{"", "hello\n", strings.Repeat("y", inlineMax-1)} {
		f, a := newGuest(t)
		f.SetScript(func(_, script string) (string, string, int) { return out, "warn\n", 7 })
		var stdout, stderr bytes.Buffer
		st, err := a.Run(context.Background(), []byte("echo hi"), &stdout, &stderr)
		require.NoError(t, err)
		assert.Equal(t, ExitStatus{Code: 7}, st)
		assert.Equal(t, out, stdout.String())
		assert.Equal(t, "warn\n", stderr.String())
		assert.Equal(t, 1, f.AgentCommands("guest-exec"))
		for _, c := range []string{"guest-file-open", "guest-file-read", "guest-file-write", "guest-file-close"} {
			assert.Zero(t, f.AgentCommands(c), c)
		}
		g := f.Guest("vm")
		assert.Zero(t, g.Handles)
		assert.Zero(t, g.Procs)
		for _, p := range g.Files {
			assert.Empty(t, f.GuestFile("vm", p), "%s holds output still", p)
		}
	}
}

// A script larger than inlineScript is uploaded first, and its file emptied once read.
func TestLargeScriptIsUploaded(t *testing.T) {
	t.Parallel()
	f, a := newGuest(t)
	script := "# " + strings.Repeat("z", inlineScript) + "\necho hi\n"
	f.SetScript(func(_, got string) (string, string, int) {
		assert.Equal(t, script, got)
		return "hi\n", "", 0
	})
	var stdout bytes.Buffer
	st, err := a.Run(context.Background(), []byte(script), &stdout, &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, ExitStatus{}, st)
	assert.Equal(t, "hi\n", stdout.String())
	assert.NotZero(t, f.AgentCommands("guest-file-write"))
	for _, p := range f.Guest("vm").Files {
		assert.Empty(t, f.GuestFile("vm", p), "%s: the script (with the job's secrets) is emptied once read", p)
	}
}

func TestRunLostAgentIsAnError(t *testing.T) {
	t.Parallel()
	f, a := newGuest(t)
	f.SetJob(func(j *provisiontest.Job) (int, int) {
		f.Fail("QEMUDomainAgentCommand", libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "domain is not running"})
		killedOr(j)
		return 0, 15
	})
	_, err := a.Run(context.Background(), []byte("x"), &bytes.Buffer{}, &bytes.Buffer{})
	require.Error(t, err)
	var ae *AgentError
	assert.ErrorAs(t, err, &ae)
	assert.Contains(t, err.Error(), "domain is not running")
}

// A paused guest (libvirt refuses agent calls to it) is waited for, up to PausedLimit.
func TestRunWaitsOutAPause(t *testing.T) {
	defer func(d time.Duration) { PausedLimit = d }(PausedLimit)
	PausedLimit = time.Second
	for _, tc := range []struct {
		pause time.Duration
		want  string
	}{{300 * time.Millisecond, ""}, {3 * time.Second, "the guest has been paused for 1s"}} {
		f, a := newGuest(t)
		release := make(chan struct{})
		f.SetJob(func(j *provisiontest.Job) (int, int) {
			j.Stdout("before\n")
			<-release
			j.Stdout("after\n")
			return 0, 0
		})
		var out syncBuffer
		go func() {
			for !strings.Contains(out.String(), "before") {
				time.Sleep(time.Millisecond)
			}
			f.Pause("vm")
			time.Sleep(tc.pause)
			f.Resume("vm")
			close(release)
		}()
		st, err := a.Run(context.Background(), []byte("x"), &out, &bytes.Buffer{})
		if tc.want == "" {
			require.NoError(t, err)
			assert.Equal(t, ExitStatus{}, st)
			assert.Equal(t, "before\nafter\n", out.String())
		} else {
			assert.ErrorContains(t, err, tc.want)
			assert.ErrorContains(t, err, "domain is not running")
		}
	}
}

func TestRunCancelKillsTheScript(t *testing.T) {
	t.Parallel()
	f, a := newGuest(t)
	f.SetJob(func(j *provisiontest.Job) (int, int) {
		j.Stdout("started\n")
		killedOr(j)
		j.Stdout("got TERM\n")
		return 0, 15
	})
	ctx, cancel := context.WithCancelCause(context.Background())
	var out syncBuffer
	go func() {
		for !strings.Contains(out.String(), "started") {
			time.Sleep(time.Millisecond)
		}
		cancel(errors.New("SIGTERM"))
	}()
	_, err := a.Run(ctx, []byte("x"), &out, &bytes.Buffer{})
	var in *Interrupted
	require.ErrorAs(t, err, &in)
	assert.ErrorContains(t, err, "SIGTERM")
	assert.Equal(t, "started\ngot TERM\n", out.String(), "output up to the kill is delivered")
	assert.Equal(t, provisiontest.GuestState{Dirs: []string{"/run", Dir, "/tmp"}}, f.Guest("vm"),
		"the script process reaped, script and output files removed, no handle open")
}

// The time allowed for cleanup starts when the cleanup does: a script cancelled long after
// it started is still killed. (Found by the gitlab-runner test: a cancel 30 s into a job
// left the script running.)
func TestRunCancelLateStillKills(t *testing.T) {
	defer func(d time.Duration) { cleanupTime = d }(cleanupTime)
	cleanupTime = 200 * time.Millisecond
	f, a := newGuest(t)
	f.SetJob(func(j *provisiontest.Job) (int, int) {
		j.Stdout("started\n")
		killedOr(j)
		return 0, 15
	})
	ctx, cancel := context.WithCancelCause(context.Background())
	var out syncBuffer
	go func() {
		for !strings.Contains(out.String(), "started") {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(3 * cleanupTime)
		cancel(errors.New("SIGTERM"))
	}()
	_, err := a.Run(ctx, []byte("x"), &out, &bytes.Buffer{})
	var in *Interrupted
	require.ErrorAs(t, err, &in)
	g := f.Guest("vm")
	assert.Zero(t, g.Procs, "the script was killed")
	assert.Empty(t, g.Files, "script and output files removed")
}

func TestWaitReady(t *testing.T) {
	t.Parallel()
	f, a := newGuest(t)
	const agent = "QEMUDomainAgentCommand"
	f.Fail(agent, libvirt.Error{Code: uint32(libvirt.ErrAgentUnresponsive), Message: "Guest agent is not responding: QEMU guest agent is not connected"})
	// The agent connects after the third ping (counted, not timed: a loaded CI host
	// ran the test's 150 ms with only two polls).
	go func() {
		for f.AgentCommands("guest-ping") < 3 {
			time.Sleep(time.Millisecond)
		}
		f.Fail(agent, nil)
	}()
	require.NoError(t, a.WaitReady(context.Background()))
	assert.GreaterOrEqual(t, f.AgentCommands("guest-ping"), 4, "polled while the agent was not connected, then once more")

	// Timeout: the error says why and gives a hint.
	f.Fail(agent, libvirt.Error{Code: uint32(libvirt.ErrAgentUnresponsive), Message: "QEMU guest agent is not connected"})
	ctx, cancel := context.WithTimeoutCause(context.Background(), 100*time.Millisecond, errors.New("boot timeout 100ms passed"))
	defer cancel()
	err := a.WaitReady(ctx)
	require.ErrorIs(t, err, ErrNotReady)
	assert.ErrorContains(t, err, "boot timeout 100ms passed")
	assert.ErrorContains(t, err, "is qemu-guest-agent installed")

	// A domain that stopped fails at once, not at the timeout.
	f.Fail(agent, libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "domain is not running"})
	t0 := time.Now()
	err = a.WaitReady(context.Background())
	require.ErrorIs(t, err, ErrNotReady)
	assert.Less(t, time.Since(t0), 5*time.Second)
}

// The host key Setup returns for ssh is one the host made: the guest got its private
// half on standard input (not in its arguments, which the guest's process list shows),
// and each set-up makes another.
func TestSetupInstallsAHostKeyMadeOnTheHost(t *testing.T) {
	t.Parallel()
	f, a := newGuest(t)
	s := Setup{Hostname: "vm", HostKeys: true, SSH: &SSHAccess{User: "root", AuthorizedKey: "ssh-ed25519 AAAA x"}}
	k1, err := a.Setup(context.Background(), s)
	require.NoError(t, err)
	require.NotNil(t, k1)
	priv, err := ssh.ParsePrivateKey([]byte(f.GuestFile("vm", "/etc/ssh/ssh_host_ed25519_key")))
	require.NoError(t, err, "the guest holds the private key")
	assert.Equal(t, k1.Marshal(), priv.PublicKey().Marshal(), "the pinned key is the guest's")
	k2, err := a.Setup(context.Background(), s)
	require.NoError(t, err)
	assert.NotEqual(t, k1.Marshal(), k2.Marshal())
	assert.NotContains(t, guestSetup, "ssh-keygen", "no key is made in the guest")
}
