package guest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"
)

const (
	sshHandshakeTimeout = 10 * time.Second
	sshPollMin          = 50 * time.Millisecond
	sshPollMax          = 250 * time.Millisecond
)

// Keepalives: while a script runs, the connection is probed every KeepaliveInterval; a
// guest that has not answered for KeepaliveTimeout (suspended, frozen, dead, its network
// gone) fails the stage. A guest starved of CPU still answers within seconds.
var (
	KeepaliveInterval = 5 * time.Second
	KeepaliveTimeout  = 30 * time.Second
)

// ErrGuestSilent: the guest stopped answering the transport's keepalives.
var ErrGuestSilent = errors.New("the guest stopped answering")

// SSH reaches a guest over SSH, with a per-instance client key and the host key pinned
// at prepare. It keeps nothing open between calls.
type SSH struct {
	Addr    string        // host:port, e.g. a forward on 127.0.0.1
	User    string        // the guest user jobs run as
	Key     ssh.Signer    // the instance's client key
	HostKey ssh.PublicKey // the only host key accepted
	// Dial, if set, opens the connection to Addr (through the SSH connection to a remote
	// hypervisor, whose 127.0.0.1 Addr is on); nil dials it from this host.
	Dial func(ctx context.Context, addr string) (net.Conn, error)
	// Rekey, if set, is called during WaitReady when the guest presents another host key:
	// at prepare that is an sshd that has not reloaded its new key yet.
	Rekey func(ctx context.Context) error
}

// HostKeyError: the guest presented a host key other than the pinned one.
type HostKeyError struct {
	Addr      string
	Want, Got string // SHA256 fingerprints
}

func (e *HostKeyError) Error() string {
	return fmt.Sprintf("host key mismatch at %s: the guest presented %s, but prepare pinned %s; refusing to connect (was the guest's host key changed, or is something else listening there?)", e.Addr, e.Got, e.Want)
}

func (s *SSH) checkHostKey(_ string, _ net.Addr, key ssh.PublicKey) error {
	if key.Type() == s.HostKey.Type() && bytes.Equal(key.Marshal(), s.HostKey.Marshal()) {
		return nil
	}
	return &HostKeyError{Addr: s.Addr, Want: ssh.FingerprintSHA256(s.HostKey), Got: ssh.FingerprintSHA256(key)}
}

// dial opens an authenticated connection; ctx bounds the dial and the handshake.
func (s *SSH) dial(ctx context.Context) (*ssh.Client, error) {
	dial := s.Dial
	if dial == nil {
		var d net.Dialer
		dial = func(ctx context.Context, addr string) (net.Conn, error) { return d.DialContext(ctx, "tcp", addr) }
	}
	c, err := dial(ctx, s.Addr)
	if err != nil {
		return nil, fmt.Errorf("ssh %s: %w", s.Addr, err)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	_ = c.SetDeadline(time.Now().Add(sshHandshakeTimeout))
	cc, chans, reqs, err := ssh.NewClientConn(c, s.Addr, &ssh.ClientConfig{
		User:              s.User,
		Auth:              []ssh.AuthMethod{ssh.PublicKeys(s.Key)},
		HostKeyCallback:   s.checkHostKey,
		HostKeyAlgorithms: []string{s.HostKey.Type()},
		Config:            ssh.Config{Ciphers: sshCiphers},
	})
	if err != nil {
		_ = c.Close()
		var hk *HostKeyError
		if errors.As(err, &hk) {
			return nil, hk
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("ssh %s: %w", s.Addr, context.Cause(ctx))
		}
		return nil, fmt.Errorf("ssh %s: %w", s.Addr, err)
	}
	_ = c.SetDeadline(time.Time{})
	return ssh.NewClient(cc, chans, reqs), nil
}

// WaitReady polls until an authenticated session runs `true`, or ctx ends.
func (s *SSH) WaitReady(ctx context.Context) error {
	var last error
	var rekeyed time.Time
	for wait := sshPollMin; ; wait = min(2*wait, sshPollMax) {
		err := s.probe(ctx)
		if err == nil {
			return nil
		}
		// An attempt the end of ctx cut short says less than the one before it (a
		// refused host key, a refused login): keep that one to report.
		if last == nil || ctx.Err() == nil {
			last = err
		}
		var hk *HostKeyError
		if errors.As(err, &hk) && s.Rekey != nil && time.Since(rekeyed) > time.Second {
			rekeyed = time.Now()
			if rerr := s.Rekey(ctx); rerr != nil {
				last = fmt.Errorf("%w; reloading sshd: %v", err, rerr)
			}
		}
		if !Sleep(ctx, wait) {
			return fmt.Errorf("%w: no SSH session at %s as %s (%v; last error: %v); is sshd started at boot in the template?", ErrNotReady, s.Addr, s.User, context.Cause(ctx), last)
		}
	}
}

func (s *SSH) probe(ctx context.Context) error {
	c, err := s.dial(ctx)
	if err != nil {
		return err
	}
	defer c.Close()
	defer context.AfterFunc(ctx, func() { _ = c.Close() })()
	sess, err := c.NewSession()
	if err != nil {
		return err
	}
	defer sess.Close()
	return sess.Run("true")
}

// sshCiphers puts ChaCha20-Poly1305 first, as OpenSSH's own client does. The guest's
// sshd does most of the encrypting (the job's output), and a guest CPU without AES
// instructions (QEMU's default models, software emulation) is much faster with it:
// 16 MiB of output took 2.0 s instead of 2.6 s with AES-GCM here. With AES in the
// guest both are far faster than any job prints.
var sshCiphers = []string{
	ssh.CipherChaCha20Poly1305, ssh.CipherAES128GCM, ssh.CipherAES256GCM,
	ssh.CipherAES128CTR, ssh.CipherAES192CTR, ssh.CipherAES256CTR,
}

// sshWrapper runs in the guest as `bash -c sshWrapper gci ID`, the one program a stage
// starts besides the login shell (each costs tens of milliseconds under software
// emulation; the wrapper once ran in sh, wrote the script to a file with cat and ran it
// with a bash of its own, 140 ms over a bare session on the tiny guest). It records its
// own PID (sshd made it a session leader, so that is also its process group) for sshKill
// in a file named after ID, created only if nothing is there already (noclobber: O_EXCL,
// so no file or link planted there is followed), takes the script off its standard
// input with $(</dev/stdin) (bash reads it as a file; its read builtin takes a pipe a
// byte at a time), and runs it as the agent's wrapper does, in a subshell with no
// arguments, its standard input /dev/null, and $0 the path a script file would have
// (BASH_ARGV0, bash 5). It exits with the script's status while rm, in the background
// and cut off from the session, removes the PID file: the stage need not wait for that
// program. If it cannot set up, it kills itself with USR1, which the host reports as a
// transport failure rather than as the script's exit code.
const sshWrapper = `set -C
f="${TMPDIR:-/tmp}/libvirt-gci.$1"
echo $$ >"$f.pid" || { echo "libvirt-gci: cannot write $f.pid" >&2; kill -USR1 $$; }
set +C
__gci_script=$(</dev/stdin)
BASH_ARGV0=$f
(set --; eval "unset __gci_script f; $__gci_script") </dev/null
__gci_rc=$?
rm -f "$f.pid" </dev/null >/dev/null 2>&1 &
exit $__gci_rc`

// sshKill runs as `/bin/sh -c sshKill gci ID` in a second session: it ends the process
// group of the wrapper with that ID, TERM first and KILL after 2 s, and removes its
// files. (OpenSSH's own "signal" request is not honoured by every sshd.)
const sshKill = `f="${TMPDIR:-/tmp}/libvirt-gci.$1"
p=$(cat "$f.pid" 2>/dev/null) || exit 0
kill -TERM -"$p" 2>/dev/null
i=0
while [ $i -lt 20 ] && kill -0 -"$p" 2>/dev/null; do sleep 0.1; i=$((i+1)); done
kill -KILL -"$p" 2>/dev/null
rm -f "$f" "$f.pid"
true`

// shellQuote quotes s for a POSIX shell.
func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// shCommand is the command line that runs a POSIX sh script with arguments (made of
// [0-9a-f] only), whatever the user's login shell.
func shCommand(script string, args ...string) string {
	return shellCommand("/bin/sh", script, args...)
}

// shellCommand is the command line that runs script with the shell sh, with arguments
// (made of [0-9a-f] only), whatever the user's login shell.
func shellCommand(sh, script string, args ...string) string {
	return "exec " + sh + " -c " + shellQuote(script) + " gci " + strings.Join(args, " ")
}

// Run implements Transport.
func (s *SSH) Run(ctx context.Context, script []byte, stdout, stderr io.Writer) (ExitStatus, error) {
	c, err := s.dial(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return ExitStatus{}, &Interrupted{Cause: context.Cause(ctx)}
		}
		return ExitStatus{}, err
	}
	defer c.Close()
	silent := keepalive(c)
	defer silent.stop()
	// Until the script runs, the end of ctx closes the connection: the session's opening
	// and the exec request wait for the guest's answers, which a stalled sshd never gives.
	unbind := context.AfterFunc(ctx, func() { _ = c.Close() })
	interrupted := func(err error) (ExitStatus, error) {
		if !unbind() { // ctx ended, and closed c: that is why
			return ExitStatus{}, &Interrupted{Cause: context.Cause(ctx)}
		}
		return ExitStatus{}, err
	}
	sess, err := c.NewSession()
	if err != nil {
		return interrupted(silent.or(fmt.Errorf("ssh session: %w", err)))
	}
	defer sess.Close()
	sess.Stdout, sess.Stderr = stdout, stderr
	stdin, err := sess.StdinPipe()
	if err != nil {
		return interrupted(fmt.Errorf("ssh session: %w", err))
	}
	id := strings.ToLower(rand.Text())
	if err := sess.Start(shellCommand("bash", sshWrapper, id)); err != nil {
		return interrupted(fmt.Errorf("ssh start: %w", err))
	}
	if !unbind() { // started as ctx ended: c is closed, the script without its session
		return ExitStatus{}, &Interrupted{Cause: context.Cause(ctx)}
	}
	go func() {
		_, _ = stdin.Write(script)
		_ = stdin.Close()
	}()
	done := make(chan error, 1)
	go func() { done <- sess.Wait() }()

	select {
	case err := <-done:
		st, err := sshStatus(err)
		return st, silent.or(err)
	case <-ctx.Done():
	}
	// Cancelled: end the script's process group from a second session, then let the
	// first one finish delivering output. A guest that does not answer gets the
	// connection closed under it when cctx ends.
	cctx, cancel := cleanupContext(ctx)
	defer cancel()
	stop := context.AfterFunc(cctx, func() { _ = c.Close() })
	defer stop()
	if k, err := c.NewSession(); err == nil {
		_ = k.Run(shCommand(sshKill, id))
		_ = k.Close()
	}
	select {
	case <-done:
	case <-cctx.Done():
	}
	return ExitStatus{}, &Interrupted{Cause: context.Cause(ctx)}
}

// sshStatus maps the end of a session to the script's exit status or a transport error.
// A signal that ends the script's shell is the script's exit status, as over the agent
// (128+signal, as shells report it): a script that kills its own process group, or is
// killed by the guest's OOM killer, failed the build, not the system.
func sshStatus(err error) (ExitStatus, error) {
	var ee *ssh.ExitError
	switch {
	case err == nil:
		return ExitStatus{}, nil
	case errors.As(err, &ee) && ee.Signal() == "":
		return ExitStatus{Code: ee.ExitStatus()}, nil
	case errors.As(err, &ee) && ee.Signal() == "USR1":
		return ExitStatus{}, fmt.Errorf("could not set up the script in the guest: %s", strings.TrimSpace(ee.Msg()))
	case errors.As(err, &ee) && signalNumbers[ee.Signal()] != 0:
		n := signalNumbers[ee.Signal()]
		return ExitStatus{Code: 128 + n, Signal: n}, nil
	case errors.As(err, &ee):
		return ExitStatus{}, fmt.Errorf("the script's shell in the guest was killed by SIG%s", ee.Signal())
	default:
		return ExitStatus{}, fmt.Errorf("ssh session lost: %w", err)
	}
}

// signalNumbers are Linux's numbers of the signals SSH names (RFC 4254, 6.10).
var signalNumbers = map[string]int{"HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "ABRT": 6, "FPE": 8, "KILL": 9,
	"USR2": 12, "SEGV": 11, "PIPE": 13, "ALRM": 14, "TERM": 15}

// watchdog is a connection's keepalive: it closes the connection once the guest has not
// answered for KeepaliveTimeout, and then says so instead of the error that caused.
type watchdog struct {
	quit   chan struct{}
	once   sync.Once
	silent atomic.Bool
}

func keepalive(c *ssh.Client) *watchdog {
	w := &watchdog{quit: make(chan struct{})}
	answered := make(chan struct{}, 1)
	go func() {
		tick := time.NewTicker(KeepaliveInterval)
		defer tick.Stop()
		last := time.Now()
		for {
			select {
			case <-w.quit:
				return
			case <-answered:
				last = time.Now()
			case <-tick.C:
				if time.Since(last) >= KeepaliveTimeout {
					w.silent.Store(true)
					_ = c.Close()
					return
				}
				go func() { // blocks until the guest answers, or the connection closes
					if _, _, err := c.SendRequest("keepalive@openssh.com", true, nil); err == nil {
						select {
						case answered <- struct{}{}:
						default:
						}
					}
				}()
			}
		}
	}()
	return w
}

func (w *watchdog) stop() { w.once.Do(func() { close(w.quit) }) }

// or is err, unless the guest had gone silent, which is the real reason.
func (w *watchdog) or(err error) error {
	if err != nil && w.silent.Load() {
		return fmt.Errorf("ssh: %w for %s (suspended, frozen or dead?)", ErrGuestSilent, KeepaliveTimeout)
	}
	return err
}
