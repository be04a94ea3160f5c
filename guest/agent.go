package guest

import (
	"context"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// AgentAPI is the part of go-libvirt the agent transport uses.
type AgentAPI interface {
	DomainLookupByName(name string) (libvirt.Domain, error)
	QEMUDomainAgentCommand(dom libvirt.Domain, cmd string, timeout int32, flags uint32) (libvirt.OptString, error)
	DomainGetState(dom libvirt.Domain, flags uint32) (int32, int32, error)
}

// PausedLimit is how long Run waits on a paused guest (libvirt refuses agent calls to
// it) before it gives up, as the SSH transport's keepalives do.
var PausedLimit = 30 * time.Second

const (
	// agentTimeout is how long libvirt waits for one agent reply, in seconds. A guest
	// starved of CPU (software emulation on a busy host) can take 10 s and more to answer
	// and is still healthy; one that takes longer than this is taken for frozen.
	agentTimeout = 30
	pingTimeout  = 2
	chunk        = 512 << 10 // bytes per guest-file-read; well under libvirt's message cap
	// writeChunk: bytes per guest-file-write. A write of 300 KB (400 KB in base64) was
	// never answered (the agent taken for not responding after 30 s); 260 KB was.
	writeChunk = 128 << 10
	pollMin    = 40 * time.Millisecond
	pollMax    = 250 * time.Millisecond
	killGrace  = 2 * time.Second
	// pollFast: a stage's status is asked for every 5 ms for this long (most stages of
	// a job end within it; each answer costs the guest a little CPU), then less often.
	pollFast = 250 * time.Millisecond
)

// cleanupTime bounds the work Run does after its context ends (killing the script,
// removing its files); that time starts when the cleanup does. The runner wants a
// cancelled stage gone within 5 s, whatever the guest does.
var cleanupTime = 3500 * time.Millisecond

func cleanupContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), cleanupTime)
}

// Agent reaches a guest through the QEMU guest agent, via libvirt.
type Agent struct {
	api AgentAPI
	dom libvirt.Domain
}

// NewAgent returns the agent transport for the domain name.
func NewAgent(api AgentAPI, name string) (*Agent, error) {
	dom, err := api.DomainLookupByName(name)
	if err != nil {
		return nil, fmt.Errorf("look up instance %q: %w", name, err)
	}
	return &Agent{api: api, dom: dom}, nil
}

// AgentError is an error the guest agent itself reported (the command reached the guest).
type AgentError struct {
	Command string
	Err     error
}

func (e *AgentError) Error() string { return fmt.Sprintf("guest agent %s: %v", e.Command, e.Err) }
func (e *AgentError) Unwrap() error { return e.Err }

// call runs one agent command and decodes its "return" value into ret (if not nil).
func (a *Agent) call(ctx context.Context, timeout int32, execute string, args, ret any) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("guest agent %s: %w", execute, context.Cause(ctx))
	}
	req := map[string]any{"execute": execute}
	if args != nil {
		req["arguments"] = args
	}
	cmd, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("guest agent %s: %w", execute, err)
	}
	out, err := a.api.QEMUDomainAgentCommand(a.dom, string(cmd), timeout, 0)
	if err != nil {
		return &AgentError{Command: execute, Err: err}
	}
	if ret == nil {
		return nil
	}
	if len(out) == 0 {
		return fmt.Errorf("guest agent %s: empty reply", execute)
	}
	var reply struct {
		Return json.RawMessage `json:"return"`
	}
	if err := json.Unmarshal([]byte(out[0]), &reply); err != nil {
		return fmt.Errorf("guest agent %s: reply %q: %w", execute, out[0], err)
	}
	if err := json.Unmarshal(reply.Return, ret); err != nil {
		return fmt.Errorf("guest agent %s: reply %q: %w", execute, out[0], err)
	}
	return nil
}

// WaitReady polls guest-ping until the agent answers. While the guest boots libvirt
// answers "agent not connected" at once, so polling fast costs nothing. A domain that
// stops running fails at once.
func (a *Agent) WaitReady(ctx context.Context) error {
	var last error
	for {
		err := a.call(ctx, pingTimeout, "guest-ping", nil, nil)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w: the guest agent did not answer (%v; last error: %v); is qemu-guest-agent installed and started at boot in the template?", ErrNotReady, context.Cause(ctx), last)
		}
		last = err
		var lerr libvirt.Error
		if errors.As(err, &lerr) && (lerr.Code == uint32(libvirt.ErrOperationInvalid) || lerr.Code == uint32(libvirt.ErrNoDomain)) {
			return fmt.Errorf("%w: %v", ErrNotReady, err) // not running any more, or gone
		}
		if !Sleep(ctx, 50*time.Millisecond) {
			continue // the next call reports the context's end
		}
	}
}

// Sleep waits d or until ctx ends; it reports whether it slept the whole time.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

type execStatus struct {
	Exited   bool   `json:"exited"`
	ExitCode *int   `json:"exitcode"`
	Signal   *int   `json:"signal"`
	OutData  string `json:"out-data"`
	ErrData  string `json:"err-data"`
}

func (s execStatus) status() ExitStatus {
	switch {
	case s.Signal != nil:
		return ExitStatus{Code: 128 + *s.Signal, Signal: *s.Signal}
	case s.ExitCode != nil:
		return ExitStatus{Code: *s.ExitCode}
	}
	return ExitStatus{Code: -1}
}

// exec starts path with args, input (if not nil) on its standard input.
func (a *Agent) exec(ctx context.Context, capture bool, input []byte, path string, args ...string) (int, error) {
	cmd := map[string]any{"path": path, "arg": args, "capture-output": capture}
	if input != nil {
		cmd["input-data"] = base64.StdEncoding.EncodeToString(input)
	}
	var ret struct {
		PID int `json:"pid"`
	}
	err := a.call(ctx, agentTimeout, "guest-exec", cmd, &ret)
	return ret.PID, err
}

func (a *Agent) execStatus(ctx context.Context, pid int) (execStatus, error) {
	var st execStatus
	err := a.call(ctx, agentTimeout, "guest-exec-status", map[string]any{"pid": pid}, &st)
	return st, err
}

// execWait runs a short helper command to its end and returns its status and output.
func (a *Agent) execWait(ctx context.Context, path string, args ...string) (ExitStatus, string, error) {
	return a.execWaitInput(ctx, nil, path, args...)
}

// execWaitInput is execWait with input on the command's standard input.
func (a *Agent) execWaitInput(ctx context.Context, input []byte, path string, args ...string) (ExitStatus, string, error) {
	pid, err := a.exec(ctx, true, input, path, args...)
	if err != nil {
		return ExitStatus{}, "", err
	}
	// Helper commands take tens of milliseconds to a few seconds (prepare's set-up):
	// poll closely (every 5 to 40 ms) for their first ten seconds, so that prepare does
	// not wait long after one ends (each answer costs the guest a little CPU).
	start := time.Now()
	for d := pollMin / 8; ; {
		st, err := a.execStatus(ctx, pid)
		if err != nil {
			return ExitStatus{}, "", err
		}
		if st.Exited {
			out, _ := base64.StdEncoding.DecodeString(st.OutData)
			errOut, _ := base64.StdEncoding.DecodeString(st.ErrData)
			return st.status(), string(out) + string(errOut), nil
		}
		if !Sleep(ctx, d) {
			return ExitStatus{}, "", fmt.Errorf("wait for %s: %w", path, context.Cause(ctx))
		}
		if d = min(d*3/2, pollMin); time.Since(start) > 10*time.Second {
			d = pollMax
		}
	}
}

func (a *Agent) open(ctx context.Context, path, mode string) (int, error) {
	var h int
	err := a.call(ctx, agentTimeout, "guest-file-open", map[string]any{"path": path, "mode": mode}, &h)
	return h, err
}

func (a *Agent) close(ctx context.Context, h int) error {
	return a.call(ctx, agentTimeout, "guest-file-close", map[string]any{"handle": h}, nil)
}

// upload writes data to path in the guest, creating Dir first if it is missing.
func (a *Agent) upload(ctx context.Context, path string, data []byte) error {
	h, err := a.open(ctx, path, "w")
	if err != nil {
		// Dir is missing (first stage of a job, or the job removed it): make it and retry.
		st, out, mkErr := a.execWait(ctx, "/bin/sh", "-c", `umask 077 && mkdir -p "$0" && chmod 0700 "$0"`, Dir)
		if mkErr != nil {
			return fmt.Errorf("create %s in the guest: %w", Dir, mkErr)
		}
		if st.Code != 0 {
			return fmt.Errorf("create %s in the guest: %s: %s", Dir, st, out)
		}
		if h, err = a.open(ctx, path, "w"); err != nil {
			return fmt.Errorf("upload %s: %w", path, err)
		}
	}
	for off := 0; off < len(data); off += writeChunk {
		end := min(off+writeChunk, len(data))
		args := map[string]any{"handle": h, "buf-b64": base64.StdEncoding.EncodeToString(data[off:end])}
		if err := a.call(ctx, agentTimeout, "guest-file-write", args, nil); err != nil {
			_ = a.close(ctx, h)
			return fmt.Errorf("upload %s: %w", path, err)
		}
	}
	if err := a.close(ctx, h); err != nil {
		return fmt.Errorf("upload %s: %w", path, err)
	}
	return nil
}

// drain copies what is readable now from the guest file h to w. It returns the number
// of bytes copied.
func (a *Agent) drain(ctx context.Context, h int, w io.Writer) (int, error) {
	total := 0
	for {
		var ret struct {
			Count int    `json:"count"`
			Buf   string `json:"buf-b64"`
		}
		if err := a.call(ctx, agentTimeout, "guest-file-read", map[string]any{"handle": h, "count": chunk}, &ret); err != nil {
			return total, err
		}
		if ret.Count == 0 {
			return total, nil
		}
		buf, err := base64.StdEncoding.DecodeString(ret.Buf)
		if err != nil {
			return total, fmt.Errorf("guest-file-read: %w", err)
		}
		if _, err := w.Write(buf); err != nil {
			return total, fmt.Errorf("write job output: %w", err)
		}
		total += len(buf)
		if ret.Count < chunk {
			return total, nil
		}
	}
}
