package guest

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeGuest is a stateful stand-in for a guest agent: files in a map, processes whose
// behaviour is a Go function of the uploaded script. It answers the JSON protocol the way
// qemu-ga does, so Agent's own request and reply handling is exercised.
type fakeGuest struct {
	mu      sync.Mutex
	files   map[string]*bytes.Buffer
	dirs    map[string]bool
	handles map[int]*fakeHandle
	procs   map[int]*fakeProc
	next    int
	log     []string // commands seen, for assertions
	// job runs a script: it writes output through the writer and returns when done
	job func(script string, w func(stream int, s string), killed <-chan struct{}) (code, signal int)
	// agentDown makes every command fail as if the agent vanished
	agentDown error
	paused    bool // the domain is paused: libvirt refuses agent commands
}

func (g *fakeGuest) DomainGetState(libvirt.Domain, uint32) (int32, int32, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.paused {
		return int32(libvirt.DomainPaused), 1, nil
	}
	return int32(libvirt.DomainRunning), 1, nil
}

type fakeHandle struct {
	path string
	pos  int
}

type fakeProc struct {
	done         chan struct{}
	killed       chan struct{}
	code, signal int
	argv         []string
}

func newFakeGuest() *fakeGuest {
	return &fakeGuest{files: map[string]*bytes.Buffer{}, dirs: map[string]bool{}, handles: map[int]*fakeHandle{},
		procs: map[int]*fakeProc{}, next: 1000}
}

func (g *fakeGuest) DomainLookupByName(name string) (libvirt.Domain, error) {
	return libvirt.Domain{Name: name}, nil
}

func agentErr(msg string) error {
	return libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "internal error: unable to execute QEMU agent command: " + msg}
}

func (g *fakeGuest) QEMUDomainAgentCommand(_ libvirt.Domain, cmd string, _ int32, _ uint32) (libvirt.OptString, error) {
	var req struct {
		Execute   string          `json:"execute"`
		Arguments json.RawMessage `json:"arguments"`
	}
	if err := json.Unmarshal([]byte(cmd), &req); err != nil {
		return nil, err
	}
	var a struct {
		Path    string   `json:"path"`
		Mode    string   `json:"mode"`
		Arg     []string `json:"arg"`
		Handle  int      `json:"handle"`
		Count   int      `json:"count"`
		Buf     string   `json:"buf-b64"`
		PID     int      `json:"pid"`
		Capture bool     `json:"capture-output"`
	}
	if len(req.Arguments) > 0 {
		if err := json.Unmarshal(req.Arguments, &a); err != nil {
			return nil, err
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.log = append(g.log, req.Execute)
	if g.agentDown != nil {
		return nil, g.agentDown
	}
	if g.paused {
		return nil, libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "Requested operation is not valid: domain is not running"}
	}
	ret := func(v any) (libvirt.OptString, error) {
		b, _ := json.Marshal(map[string]any{"return": v})
		return libvirt.OptString{string(b)}, nil
	}
	dir := func(p string) string { return p[:strings.LastIndex(p, "/")] }
	switch req.Execute {
	case "guest-ping", "guest-file-close":
		delete(g.handles, a.Handle)
		return ret(map[string]any{})
	case "guest-file-open":
		if !g.dirs[dir(a.Path)] {
			return nil, agentErr(fmt.Sprintf("failed to open file '%s' (mode: '%s'): No such file or directory", a.Path, a.Mode))
		}
		g.files[a.Path] = &bytes.Buffer{}
		g.next++
		g.handles[g.next] = &fakeHandle{path: a.Path}
		return ret(g.next)
	case "guest-file-write":
		b, _ := base64.StdEncoding.DecodeString(a.Buf)
		g.files[g.handles[a.Handle].path].Write(b)
		return ret(map[string]any{"count": len(b), "eof": false})
	case "guest-file-read":
		h := g.handles[a.Handle]
		data := g.files[h.path].Bytes()[h.pos:]
		n := min(len(data), a.Count)
		h.pos += n
		return ret(map[string]any{"count": n, "buf-b64": base64.StdEncoding.EncodeToString(data[:n]), "eof": n < a.Count})
	case "guest-exec":
		g.next++
		pid := g.next
		p := &fakeProc{done: make(chan struct{}), killed: make(chan struct{}), argv: append([]string{a.Path}, a.Arg...)}
		g.procs[pid] = p
		switch {
		case a.Path == "/bin/sh" && len(a.Arg) > 2 && a.Arg[1] == runWrapper:
			script, out, errf := a.Arg[3], a.Arg[4], a.Arg[5]
			body := g.files[script].String()
			go func() {
				write := func(stream int, s string) {
					g.mu.Lock()
					defer g.mu.Unlock()
					g.files[[]string{"", out, errf}[stream]].WriteString(s)
				}
				p.code, p.signal = g.job(body, write, p.killed)
				g.mu.Lock()
				delete(g.files, script)
				g.mu.Unlock()
				close(p.done)
			}()
		case a.Path == "/bin/sh" && strings.Contains(a.Arg[1], "mkdir"):
			g.dirs[a.Arg[2]] = true
			close(p.done)
		case a.Path == "/bin/sh" && strings.HasPrefix(a.Arg[1], "kill -"):
			var target int
			fmt.Sscan(a.Arg[2], &target)
			if tp := g.procs[target]; tp != nil {
				select {
				case <-tp.killed:
				default:
					close(tp.killed)
				}
			}
			close(p.done)
		case a.Path == "/bin/rm":
			for _, f := range a.Arg[1:] {
				delete(g.files, f)
			}
			close(p.done)
		default:
			return nil, agentErr("unexpected exec " + a.Path)
		}
		return ret(map[string]any{"pid": pid})
	case "guest-exec-status":
		p, ok := g.procs[a.PID]
		if !ok {
			return nil, agentErr(fmt.Sprintf("Invalid parameter 'pid' %d", a.PID))
		}
		select {
		case <-p.done:
			delete(g.procs, a.PID)
			if p.signal != 0 {
				return ret(map[string]any{"exited": true, "signal": p.signal})
			}
			return ret(map[string]any{"exited": true, "exitcode": p.code})
		default:
			return ret(map[string]any{"exited": false})
		}
	}
	return nil, agentErr("unknown command " + req.Execute)
}

func (g *fakeGuest) seen(cmd string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for _, c := range g.log {
		if c == cmd {
			n++
		}
	}
	return n
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
	g := newFakeGuest()
	firstSeen := make(chan struct{})
	g.job = func(script string, w func(int, string), _ <-chan struct{}) (int, int) {
		assert.Equal(t, "echo hi", script)
		w(1, "line 1\n")
		w(2, "warn\n")
		<-firstSeen // the host must read line 1 before the script goes on
		w(1, strings.Repeat("x", 3*chunk+5))
		return 3, 0
	}
	a, err := NewAgent(g, "vm")
	require.NoError(t, err)
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
	assert.True(t, g.dirs[Dir], "the script directory was made on first use")
	assert.Empty(t, g.handles, "every guest file handle is closed")
	for f := range g.files {
		assert.NotContains(t, f, ".sh", "the script (with the job's secrets) is gone")
	}
}

func TestRunReportsSignals(t *testing.T) {
	t.Parallel()
	g := newFakeGuest()
	g.dirs[Dir] = true
	g.job = func(string, func(int, string), <-chan struct{}) (int, int) { return 0, 9 }
	a, _ := NewAgent(g, "vm")
	st, err := a.Run(context.Background(), []byte("x"), &bytes.Buffer{}, &bytes.Buffer{})
	require.NoError(t, err)
	assert.Equal(t, ExitStatus{Code: 137, Signal: 9}, st)
	assert.Equal(t, "killed by signal 9", st.String())
	assert.Equal(t, 0, g.seen("guest-exec")-1, "no mkdir when the directory exists")
}

func TestRunLostAgentIsAnError(t *testing.T) {
	t.Parallel()
	g := newFakeGuest()
	g.dirs[Dir] = true
	started := make(chan struct{})
	g.job = func(_ string, _ func(int, string), killed <-chan struct{}) (int, int) {
		close(started)
		<-killed
		return 0, 15
	}
	a, _ := NewAgent(g, "vm")
	go func() {
		<-started
		g.mu.Lock()
		g.agentDown = libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "domain is not running"}
		g.mu.Unlock()
	}()
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
		g := newFakeGuest()
		g.dirs[Dir] = true
		release := make(chan struct{})
		g.job = func(_ string, w func(int, string), _ <-chan struct{}) (int, int) {
			w(1, "before\n")
			<-release
			w(1, "after\n")
			return 0, 0
		}
		a, _ := NewAgent(g, "vm")
		var out syncBuffer
		go func() {
			for !strings.Contains(out.String(), "before") {
				time.Sleep(time.Millisecond)
			}
			g.mu.Lock()
			g.paused = true
			g.mu.Unlock()
			time.Sleep(tc.pause)
			g.mu.Lock()
			g.paused = false
			g.mu.Unlock()
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
	g := newFakeGuest()
	g.dirs[Dir] = true
	g.job = func(_ string, w func(int, string), killed <-chan struct{}) (int, int) {
		w(1, "started\n")
		<-killed
		w(1, "got TERM\n")
		return 0, 15
	}
	a, _ := NewAgent(g, "vm")
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
	assert.Empty(t, g.procs, "the script process was reaped")
	assert.Empty(t, g.files, "script and output files removed")
	assert.Empty(t, g.handles)
}

// The time allowed for cleanup starts when the cleanup does: a script cancelled long after
// it started is still killed. (Found by the gitlab-runner test: a cancel 30 s into a job
// left the script running.)
func TestRunCancelLateStillKills(t *testing.T) {
	defer func(d time.Duration) { cleanupTime = d }(cleanupTime)
	cleanupTime = 200 * time.Millisecond
	g := newFakeGuest()
	g.dirs[Dir] = true
	g.job = func(_ string, w func(int, string), killed <-chan struct{}) (int, int) {
		w(1, "started\n")
		<-killed
		return 0, 15
	}
	a, _ := NewAgent(g, "vm")
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
	g.mu.Lock()
	defer g.mu.Unlock()
	assert.Empty(t, g.procs, "the script was killed")
	assert.Empty(t, g.files, "script and output files removed")
}

func TestWaitReady(t *testing.T) {
	t.Parallel()
	g := newFakeGuest()
	g.agentDown = libvirt.Error{Code: uint32(libvirt.ErrAgentUnresponsive), Message: "Guest agent is not responding: QEMU guest agent is not connected"}
	a, _ := NewAgent(g, "vm")
	go func() {
		time.Sleep(150 * time.Millisecond)
		g.mu.Lock()
		g.agentDown = nil
		g.mu.Unlock()
	}()
	require.NoError(t, a.WaitReady(context.Background()))
	assert.Greater(t, g.seen("guest-ping"), 2, "polled while the agent was not connected")

	// Timeout: the error says why and gives a hint.
	g.agentDown = libvirt.Error{Code: uint32(libvirt.ErrAgentUnresponsive), Message: "QEMU guest agent is not connected"}
	ctx, cancel := context.WithTimeoutCause(context.Background(), 100*time.Millisecond, errors.New("boot timeout 100ms passed"))
	defer cancel()
	err := a.WaitReady(ctx)
	require.ErrorIs(t, err, ErrNotReady)
	assert.ErrorContains(t, err, "boot timeout 100ms passed")
	assert.ErrorContains(t, err, "is qemu-guest-agent installed")

	// A domain that stopped fails at once, not at the timeout.
	g.agentDown = libvirt.Error{Code: uint32(libvirt.ErrOperationInvalid), Message: "domain is not running"}
	t0 := time.Now()
	err = a.WaitReady(context.Background())
	require.ErrorIs(t, err, ErrNotReady)
	assert.Less(t, time.Since(t0), 5*time.Second)
}
