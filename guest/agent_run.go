package guest

// A stage's script through the agent: started in the guest by its wrapper, its output
// followed as it grows, its end seen soon, and the script killed when the stage is
// cancelled.

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
)

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
