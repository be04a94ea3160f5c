package guest

import (
	"context"
	"crypto/rand"
	_ "embed"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
	"golang.org/x/crypto/ssh"
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

// runWrapper is run by bash as `bash -c runWrapper BASE.sh SRC`, started by one
// guest-exec that captures its output: the one program a stage starts (under software
// emulation each program started costs tens of milliseconds, and each agent command a
// round trip; a stage once made eleven and more, and started setsid, sh and bash). SRC
// is "-" where the script comes with the guest-exec itself (its standard input), else
// the file the host uploaded it to (a large script), which the wrapper empties once
// read (it carries the job's secrets). bash's read takes a pipe a byte at a time (a
// 33 KB script: 40 ms more than from a file on the systemd guest), so the script comes
// off standard input through $(</dev/stdin), which bash reads as it does a file. The
// job's output goes to BASE.out and BASE.err,
// which the host reads as they grow if the stage runs long enough to be worth it. The
// script runs in a subshell of its own process group (set -m, off again inside it and
// once it is started): a script's `kill 0` kills the script, not the guest agent, and
// the host kills the group by the ID the wrapper writes to BASE.err.pgid. Once the
// script is over, the wrapper hands its output back in the guest-exec's own, after
// the line "gci-inline", where both files are under inlineMax bytes and hold no NUL byte
// (bash's read, a builtin, says so), and then empties the files; otherwise the host
// reads the rest of the files and removes them. (Emptied, not removed: rm is a program,
// and the wrapper's rm, even in the background, held the stage's end up by 45 ms; one
// the host started after the stage slowed the next by 20 ms. The VM goes with the job;
// the empty files, and the script's, hold nothing of it.) The capture's pipes are closed in the
// script, so that a process the job leaves behind cannot hold the stage open.
// The agent's own PATH may lack /usr/local/bin (as under a minimal init); the script
// gets it, as over ssh or from systemd, for the gitlab-runner helper, and the helper's
// own directory first. The script sees what bash running a script file shows (as over
// ssh): $0 its path, no arguments.
var runWrapper = `o=${0%.sh}.out e=${0%.sh}.err
[ -d ` + Dir + ` ] || mkdir -m 0700 -p ` + Dir + `
if [ "$1" = - ]; then __gci_script=$(</dev/stdin); else IFS= read -r -d '' __gci_script <"$1"; : >"$1"; fi
exec 3>&1 4>&2 >>"$o" 2>>"$e" </dev/null
case ":$PATH:" in *:/usr/local/bin:*) ;; *) PATH=/usr/local/bin:$PATH ;; esac
if [ -d ` + HelperDir + ` ]; then PATH=` + HelperDir + `:$PATH; fi
export PATH
set -m
(set +m; set --; exec 3>&- 4>&-; eval "unset __gci_script; $__gci_script") &
set +m
echo "$!" >"$e.pgid"
wait "$!"
__gci_rc=$?
exec >&3 2>&4 3>&- 4>&-
LC_ALL=C
__gci_o= __gci_e=
if ! IFS= read -r -d '' -n ` + strconv.Itoa(inlineMax) + ` __gci_o <"$o" && ! IFS= read -r -d '' -n ` + strconv.Itoa(inlineMax) + ` __gci_e <"$e"; then
  printf 'gci-inline\n%s' "$__gci_o"
  printf '%s' "$__gci_e" >&2
  : >"$o"; : >"$e"; : >"$e.pgid"
fi
exit "$__gci_rc"`

// inlineMax bounds the output, on each of stdout and stderr, that a stage's wrapper
// hands back in its guest-exec's reply; inlineScript bounds the script that goes with
// the guest-exec (larger ones are uploaded first). Both stay far under libvirt's
// message cap once in base64.
const (
	inlineMax    = 16 << 10
	inlineScript = writeChunk // the same bound as a write's: one agent command each
	// firstDrain: a stage that runs this long has its output read as it grows.
	firstDrain = 200 * time.Millisecond
)

// inlineMark starts a stage's captured output where the wrapper handed it all back.
const inlineMark = "gci-inline\n"

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

// Run implements Transport.
func (a *Agent) Run(ctx context.Context, script []byte, stdout, stderr io.Writer) (ExitStatus, error) {
	r, err := a.startScript(ctx, script)
	if err != nil {
		return ExitStatus{}, err
	}
	defer r.closeHandles(ctx)
	return r.follow(ctx, stdout, stderr)
}

// scriptRun is a script started in the guest: its file and its output files (BASE.sh,
// .out, .err), the agent's handles of the output files once opened, how much of each
// has been passed on, and the wrapper's process.
type scriptRun struct {
	a                  *Agent
	script, outF, errF string
	hOut, hErr, pid    int
	opened             bool
	nOut, nErr         int
}

// startScript starts script through runWrapper: with the guest-exec itself, or, if it
// is large, uploaded first. What it made is removed if it fails.
func (a *Agent) startScript(ctx context.Context, script []byte) (*scriptRun, error) {
	base := Dir + "/" + strings.ToLower(rand.Text())
	r := &scriptRun{a: a, script: base + ".sh", outF: base + ".out", errF: base + ".err"}
	args := map[string]any{"path": "bash", "arg": []string{"-c", runWrapper, r.script, "-"}, "capture-output": true}
	if len(script) <= inlineScript {
		args["input-data"] = base64.StdEncoding.EncodeToString(script)
	} else {
		if err := a.upload(ctx, r.script, script); err != nil {
			r.removeFiles(ctx)
			return nil, err
		}
		args["arg"] = []string{"-c", runWrapper, r.script, r.script}
	}
	var ret struct {
		PID int `json:"pid"`
	}
	if err := a.call(ctx, agentTimeout, "guest-exec", args, &ret); err != nil {
		r.removeFiles(ctx)
		return nil, fmt.Errorf("start script: %w", err)
	}
	r.pid = ret.PID
	return r, nil
}

// open opens the output files, once; the wrapper may not have made them yet.
func (r *scriptRun) open(ctx context.Context) error {
	if r.opened {
		return nil
	}
	hOut, err := r.a.open(ctx, r.outF, "r")
	if err != nil {
		return fmt.Errorf("open %s: %w", r.outF, err)
	}
	hErr, err := r.a.open(ctx, r.errF, "r")
	if err != nil {
		_ = r.a.close(ctx, hOut)
		return fmt.Errorf("open %s: %w", r.errF, err)
	}
	r.hOut, r.hErr, r.opened = hOut, hErr, true
	return nil
}

// drain passes on what the output files hold beyond what has been passed on.
func (r *scriptRun) drain(ctx context.Context, stdout, stderr io.Writer) (int, error) {
	if err := r.open(ctx); err != nil {
		return 0, err
	}
	n1, err1 := r.a.drain(ctx, r.hOut, stdout)
	n2, err2 := r.a.drain(ctx, r.hErr, stderr)
	r.nOut, r.nErr = r.nOut+n1, r.nErr+n2
	return n1 + n2, errors.Join(err1, err2)
}

// removeFiles removes the script and its output files; it works after ctx ends (that
// is when it matters most).
func (r *scriptRun) removeFiles(ctx context.Context) {
	cctx, cancel := cleanupContext(ctx)
	defer cancel()
	_, _, _ = r.a.execWait(cctx, "/bin/rm", "-f", r.script, r.outF, r.errF, r.errF+".pgid")
}

func (r *scriptRun) closeHandles(ctx context.Context) {
	if !r.opened {
		return
	}
	cctx, cancel := cleanupContext(ctx)
	defer cancel()
	_ = r.a.close(cctx, r.hOut)
	_ = r.a.close(cctx, r.hErr)
	r.opened = false
}

// interrupted kills the script after ctx ended, passes on the last of its output and
// removes its files.
func (r *scriptRun) interrupted(ctx context.Context, stdout, stderr io.Writer) (ExitStatus, error) {
	cctx, cancel := cleanupContext(ctx)
	defer cancel()
	r.a.kill(cctx, r.pid, r.errF+".pgid")
	_, _ = r.drain(cctx, stdout, stderr)
	r.removeFiles(ctx)
	return ExitStatus{}, &Interrupted{Cause: context.Cause(ctx)}
}

// finish passes on the output of the script that has exited with st: what the wrapper
// handed back (beyond what was passed on from the files), or else the rest of the files,
// which are then removed.
func (r *scriptRun) finish(ctx context.Context, st execStatus, stdout, stderr io.Writer) error {
	out, _ := base64.StdEncoding.DecodeString(st.OutData)
	errOut, _ := base64.StdEncoding.DecodeString(st.ErrData)
	if rest, ok := strings.CutPrefix(string(out), inlineMark); ok {
		if r.nOut < len(rest) {
			if _, err := io.WriteString(stdout, rest[r.nOut:]); err != nil {
				return fmt.Errorf("write job output: %w", err)
			}
		}
		if r.nErr < len(errOut) {
			if _, err := stderr.Write(errOut[r.nErr:]); err != nil {
				return fmt.Errorf("write job output: %w", err)
			}
		}
		return nil
	}
	_, err := r.drain(ctx, stdout, stderr)
	r.removeFiles(ctx)
	if err != nil && !r.opened {
		// The wrapper never made its files: what it said is why.
		return fmt.Errorf("start script: %s: %s%s", st.status(), out, errOut)
	}
	return err
}

// follow passes the script's output on until it exits. A stage's end is seen soon: its
// status is asked for every 5 ms for pollFast (an empty stage took 10-15 ms less than
// with the questions spaced out from the start), then less and less often (up to
// pollMax). A stage that runs for firstDrain has its output read every pollMin while it
// runs.
func (r *scriptRun) follow(ctx context.Context, stdout, stderr io.Writer) (ExitStatus, error) {
	a := r.a
	wait, started, drained := pollMin/8, time.Now(), time.Time{}
	var pausedSince time.Time
	for {
		call := time.Now() // a call in flight when the guest was paused waited for it
		st, err := a.execStatus(ctx, r.pid)
		if err != nil {
			if ctx.Err() != nil {
				return r.interrupted(ctx, stdout, stderr)
			}
			if a.waitWhilePaused(ctx, call, &pausedSince) {
				continue
			}
			return ExitStatus{}, fmt.Errorf("script status: %w", pausedFor(pausedSince, err))
		}
		if st.Exited {
			if err := r.finish(ctx, st, stdout, stderr); err != nil {
				if ctx.Err() != nil {
					return ExitStatus{}, &Interrupted{Cause: context.Cause(ctx)}
				}
				return ExitStatus{}, fmt.Errorf("read script output: %w", err)
			}
			return st.status(), nil
		}
		n := 0
		if time.Since(started) >= firstDrain && time.Since(drained) >= pollMin {
			call = time.Now()
			n, err = r.drain(ctx, stdout, stderr)
			if err != nil {
				if ctx.Err() != nil {
					return r.interrupted(ctx, stdout, stderr)
				}
				if a.waitWhilePaused(ctx, call, &pausedSince) {
					continue
				}
				if r.opened {
					return ExitStatus{}, fmt.Errorf("read script output: %w", pausedFor(pausedSince, err))
				}
				// Not made yet (a guest slow to start bash): next time.
			}
			drained = time.Now()
		}
		pausedSince = time.Time{}
		switch {
		case n > 0:
			wait = pollMin
			continue
		case time.Since(started) < pollFast:
			wait = pollMin / 8
		case time.Since(started) < time.Second:
			wait = min(wait*3/2, pollMin)
		default:
			wait = min(wait*2, pollMax)
		}
		if !Sleep(ctx, wait) {
			return r.interrupted(ctx, stdout, stderr)
		}
	}
}

// waitWhilePaused tells whether a failed call is worth retrying because the domain is
// paused (suspended by the operator, or by libvirt for a snapshot), and waits a little.
// It gives up once the domain has been paused for PausedLimit (since is the start of
// the first call that failed while it was paused).
func (a *Agent) waitWhilePaused(ctx context.Context, call time.Time, since *time.Time) bool {
	state, _, err := a.api.DomainGetState(a.dom, 0)
	if err != nil || libvirt.DomainState(state) != libvirt.DomainPaused {
		return false
	}
	if since.IsZero() {
		*since = call
	}
	return time.Since(*since) < PausedLimit && Sleep(ctx, pollMax)
}

// pausedFor says, if since is set, that the guest was paused when err happened.
func pausedFor(since time.Time, err error) error {
	if since.IsZero() {
		return err
	}
	return fmt.Errorf("the guest has been paused for %s: %w", time.Since(since).Round(time.Second), err)
}

// kill ends the script's process group (runWrapper wrote its ID to pgidFile): SIGTERM,
// then SIGKILL, to the wrapper too, if it is still there after killGrace.
func (a *Agent) kill(ctx context.Context, pid int, pgidFile string) {
	for _, sig := range []string{"TERM", "KILL"} {
		p := strconv.Itoa(pid)
		// The script's group; the wrapper only if it has not started the script yet, or
		// at last: it ends once the script's subshell has.
		_, _, _ = a.execWait(ctx, "/bin/sh", "-c", `g=; read -r g <"$1" 2>/dev/null || true
if [ -n "$g" ]; then kill -`+sig+` -"$g" 2>/dev/null; fi
if [ -z "$g" ] || [ "$2" = KILL ]; then kill -`+sig+` "$0" 2>/dev/null; fi; true`, p, pgidFile, sig)
		deadline := time.Now().Add(killGrace)
		for time.Now().Before(deadline) {
			st, err := a.execStatus(ctx, pid)
			if err != nil || st.Exited {
				return
			}
			if !Sleep(ctx, pollMin) {
				return
			}
		}
	}
}

// guestSetup is what prepare does in a fresh clone through the agent, in one command
// (setup.sh says what, and its arguments).
//
//go:embed setup.sh
var guestSetup string

// sshdReload has a running sshd (re-exec and) load its host keys again.
const sshdReload = `if [ -s /run/sshd.pid ]; then kill -HUP "$(cat /run/sshd.pid)" 2>/dev/null || true; fi`

// NIC is a network interface to configure in the guest, found by its MAC address.
type NIC struct {
	MAC  string // lower case, as Linux shows it
	Addr string // CIDR, such as 10.213.213.15/24
}

// Helper is a program on a read-only disk, found in the guest by the disk's serial,
// mounted on Dir, and put on the PATH (/usr/local/bin).
type Helper struct {
	Serial, Dir, Name string
}

// SSHAccess is what the ssh transport needs in the guest: AuthorizedKey for User, and a
// host key of the instance's own.
type SSHAccess struct {
	User, AuthorizedKey string
}

// Setup is what prepare does in a fresh clone through the agent, before any job code
// runs; nil parts are left out.
type Setup struct {
	NIC    *NIC
	Helper *Helper
	Share  *Share
	SSH    *SSHAccess
	Hosts  []string // names to resolve to 127.0.0.1 (in /etc/hosts)
	// Hostname is the instance's, whatever its start: the kernel's, /etc/hostname's and
	// the 127.0.1.1 line of /etc/hosts.
	Hostname string
	// HostKeys: replace the SSH host keys cloned from the template (or the warm image) by
	// a key of the clone's own, where the guest has sshd, whatever the transport (SSH
	// does it always).
	HostKeys bool
	// Identity makes a clone restored from a warm image its own; nil for a cold boot.
	Identity *Identity
}

// Identity is what two clones restored from one memory image would otherwise share.
type Identity struct {
	MachineID string      // 32 hex digits
	MACs      [][2]string // each NIC's MAC address: the warm image's, and the clone's
}

// Share is a virtiofs share, mounted by its tag on Dir.
type Share struct {
	Tag, Dir string
}

// Setup sets the guest up, in one command. With SSH it returns the guest's new host
// key, made here (from the host's randomness) and installed through the agent: the key
// to pin.
func (a *Agent) Setup(ctx context.Context, s Setup) (ssh.PublicKey, error) {
	args := make([]string, 16)
	args[11] = s.Hostname
	var hostKey ssh.PublicKey
	var input []byte
	if s.HostKeys || s.SSH != nil {
		pub, priv, err := NewHostKey()
		if err != nil {
			return nil, fmt.Errorf("set up the guest: %w", err)
		}
		hostKey, input = pub, priv
		args[15] = AuthorizedKey(pub, "libvirt-gci")
	}
	if id := s.Identity; id != nil {
		var macs []string
		for _, m := range id.MACs {
			macs = append(macs, strings.ToLower(m[0])+"="+strings.ToLower(m[1]))
		}
		seed := make([]byte, 64)
		_, _ = rand.Read(seed)
		now := time.Now()
		args[10] = fmt.Sprintf("%d.%09d", now.Unix(), now.Nanosecond())
		args[12], args[13], args[14] = id.MachineID, hex.EncodeToString(seed), strings.Join(macs, " ")
	}
	if s.NIC != nil {
		args[0], args[1] = s.NIC.MAC, s.NIC.Addr
	}
	if s.Helper != nil {
		args[2], args[3], args[4] = s.Helper.Serial, s.Helper.Dir, s.Helper.Name
	}
	if s.SSH != nil {
		args[5], args[6] = s.SSH.User, s.SSH.AuthorizedKey
	}
	if s.Share != nil {
		args[7], args[8] = s.Share.Tag, s.Share.Dir
	}
	args[9] = strings.Join(s.Hosts, " ")
	st, out, err := a.execWaitInput(ctx, input, "/bin/sh", append([]string{"-c", guestSetup, "gci"}, args...)...)
	if err != nil {
		return nil, fmt.Errorf("set up the guest: %w", err)
	}
	if strings.Contains(out, "gci-rng: cannot reseed") {
		return nil, fmt.Errorf("set up the guest: %w", ErrCannotReseed)
	}
	if st.Code != 0 || st.Signal != 0 {
		return nil, fmt.Errorf("set up the guest: %s: %s", st, strings.TrimSpace(out))
	}
	if s.Identity != nil && !strings.Contains(out, "gci-rng: reseeded") {
		return nil, fmt.Errorf("set up the guest: %w", ErrCannotReseed)
	}
	if s.SSH == nil {
		return nil, nil
	}
	if !strings.Contains(out, "gci-hostkey: installed") {
		return nil, fmt.Errorf("set up the guest: its host key was not installed: %q", strings.TrimSpace(out))
	}
	return hostKey, nil
}

// ReloadSSHD has the guest's sshd load its host keys again.
func (a *Agent) ReloadSSHD(ctx context.Context) error {
	_, _, err := a.execWait(ctx, "/bin/sh", "-c", sshdReload)
	return err
}

// quiesce lets the guest finish its boot (systemd's, where it has it, and says how it
// ended: "gci-system: STATE", "none" without systemd), syncs its file
// systems, drops its page cache and zeroes most of its free memory (the kernel zeroes
// the pages dd's buffer faults in): QEMU saves a zero page in a few bytes, so a memory
// image holds what the guest uses, not what it once read.
//
// Where the guest has perl, it also starts the identity helper that a restored clone's
// set-up asks (setup.sh says what for): perl, waiting on a FIFO, its output away from
// the guest-exec's capture.
const quiesce = `if [ -d /sys/bus/acpi/drivers/vmgenid ] || command -v perl >/dev/null 2>&1 || command -v python3 >/dev/null 2>&1; then
  echo "gci-rng: can reseed"
else
  echo "gci-rng: cannot reseed"
fi
if command -v perl >/dev/null 2>&1 && command -v mkfifo >/dev/null 2>&1; then
  h=` + Dir + `/identity
  mkdir -p -m 0700 ` + Dir + `
  rm -f "$h.in" "$h.out" "$h.pid"
  if mkfifo -m 0600 "$h.in" "$h.out"; then
    perl -e '` + identityHelper + `' "$h.in" "$h.out" "$h.pid" </dev/null >/dev/null 2>&1 &
    echo "$!" >"$h.pid"
  fi
fi
sync
s=none
if [ -d /run/systemd/system ]; then s=$(timeout 120 systemctl is-system-running --wait 2>/dev/null) || true; fi
echo "gci-system: ${s:-unknown}"
echo 3 >/proc/sys/vm/drop_caches
f=$(sed -n 's/^MemFree: *\([0-9]*\) kB$/\1/p' /proc/meminfo)
if [ -n "$f" ]; then dd if=/dev/zero of=/dev/null bs=$((f * 9 / 10))K count=1 2>/dev/null || true; fi
sync`

// identityHelper is the perl program of the identity helper (no single quote in it):
// it reads its requests from the FIFO $ARGV[0] to its writer's end, opens the FIFO
// $ARGV[1] (once its reader has), removes both and its pid file $ARGV[2] (nothing of it
// is left for the job to find), does each request, and says on $ARGV[1] what failed,
// and then "done". Requests: "reseed" (the RNDRESEEDCRNG
// ioctl on /dev/urandom), "rename FROM TO", "mac DEV ADDRESS" (SIOCSIFHWADDR: an
// Ethernet address, as ip link set address sets it).
const identityHelper = `open(my $q, "<", $ARGV[0]) or exit 1;
my @r = <$q>;
close($q);
open(my $o, ">", $ARGV[1]) or exit 1;
unlink(@ARGV);
my ($u, $s);
for (@r) {
  chomp;
  my ($op, $x, $y) = split(/ /, $_, 3);
  if ($op eq "reseed") {
    if (open($u, ">", "/dev/urandom") && ioctl($u, 0x5207, 0)) { print $o "gci-rng: reseeded\n" } else { print $o "gci-rng: cannot reseed: $!\n" }
  } elsif ($op eq "rename") {
    rename($x, $y) or print $o "cannot rename $x to $y: $!\n";
  } elsif ($op eq "mac") {
    (socket($s, 2, 2, 0) && ioctl($s, 0x8924, pack("a16 S C6 x16", $x, 1, map { hex } split(/:/, $y)))) or print $o "cannot set the MAC address of $x to $y: $!\n";
  } else {
    print $o "unknown request $op\n";
  }
}
print $o "done\n";`

// ErrCannotReseed: the guest has no way to reseed its kernel's RNG at once (no vmgenid
// driver, perl or python3 for the RNDRESEEDCRNG ioctl). Clones restored from its memory
// image would make keys from the randomness they share until the kernel reseeds on its
// own schedule, so such a guest is not restored.
var ErrCannotReseed = errors.New("the guest cannot reseed its RNG at once (no vmgenid driver, perl or python3): clones restored from its memory would share its randomness")

// Quiesce readies a guest for a memory image (a warm image's save). It refuses a guest
// whose clones could not reseed their RNG (ErrCannotReseed). It returns systemd's state
// once its boot ended ("running", "degraded", ...), "none" where systemd is not the
// guest's init.
func (a *Agent) Quiesce(ctx context.Context) (string, error) {
	st, out, err := a.execWait(ctx, "/bin/sh", "-c", quiesce)
	if err != nil {
		return "", fmt.Errorf("quiesce the guest: %w", err)
	}
	if st.Code != 0 || st.Signal != 0 {
		return "", fmt.Errorf("quiesce the guest: %s: %s", st, strings.TrimSpace(out))
	}
	if !strings.Contains(out, "gci-rng: can reseed") {
		return "", ErrCannotReseed
	}
	system := "unknown"
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, "gci-system: "); ok {
			system = strings.TrimSpace(v)
		}
	}
	return system, nil
}

// resetIdentity removes what makes a guest one machine rather than a template of many,
// as virt-sysprep does: its machine-id (emptied: systemd makes a new one at the next
// boot), D-Bus's copy of it, its SSH host keys, its logs, and the leases of its DHCP
// clients. Each part is skipped where the guest lacks it.
const resetIdentity = `[ -e /etc/machine-id ] && : >/etc/machine-id
[ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ] && rm -f /var/lib/dbus/machine-id
rm -f /etc/ssh/ssh_host_*key /etc/ssh/ssh_host_*key.pub
find /var/log -type f -delete 2>/dev/null
rm -rf /var/log/journal/* 2>/dev/null
rm -f /var/lib/dhcp/*.leases /var/lib/dhcp/*.lease /var/lib/dhclient/* /var/lib/dhcpcd/*.lease \
  /var/lib/NetworkManager/*.lease /var/lib/systemd/network/* /var/lib/udhcpc/* 2>/dev/null
sync
true`

// ResetIdentity runs resetIdentity in the guest.
func (a *Agent) ResetIdentity(ctx context.Context) error {
	st, out, err := a.execWait(ctx, "/bin/sh", "-c", resetIdentity)
	if err != nil {
		return fmt.Errorf("reset the guest's identity: %w", err)
	}
	if st.Code != 0 || st.Signal != 0 {
		return fmt.Errorf("reset the guest's identity: %s: %s", st, strings.TrimSpace(out))
	}
	return nil
}

// PowerOff asks the guest to power off by itself (poweroff, busybox's, or halt -p), for
// guests whose agent cannot shut them down (no /sbin/shutdown). It does not wait: the
// agent goes down with the guest.
func (a *Agent) PowerOff(ctx context.Context) error {
	_, err := a.exec(ctx, false, nil, "/bin/sh", "-c", "poweroff 2>/dev/null || busybox poweroff 2>/dev/null || halt -p")
	return err
}
