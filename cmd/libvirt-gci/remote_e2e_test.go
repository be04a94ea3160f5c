package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/libvirt-gci/libvirt-gci/cmd/libvirt-gci/internal/fakegitlab"
	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"
	"golang.org/x/crypto/ssh/agent"
)

// hypervisorSSHD is a second sshd on 127.0.0.1 with keys of its own, through which
// qemu+ssh:// reaches the local libvirt as it would a remote hypervisor's.
type hypervisorSSHD struct {
	port           int
	keyfile, known string // the client key, a known_hosts with the sshd's host key
	pid            int
	mu             sync.Mutex
	log            bytes.Buffer // its debug log: the channels it opened
}

var (
	sshdOnce sync.Once
	sshd     *hypervisorSSHD
	sshdErr  error
)

// theSSHD starts the test binary's one hypervisor sshd, or fails the test.
func theSSHD(t testing.TB) *hypervisorSSHD {
	t.Helper()
	sshdOnce.Do(func() { sshd, sshdErr = startSSHDRetry() })
	require.NoError(t, sshdErr)
	return sshd
}

func (s *hypervisorSSHD) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.Write(p)
}

func (s *hypervisorSSHD) logged() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.log.String()
}

// uri is the qemu+ssh URI of the sshd, with known_hosts file known.
func (s *hypervisorSSHD) uri(known string) string {
	return fmt.Sprintf("qemu+ssh://root@127.0.0.1:%d/system?keyfile=%s&known_hosts=%s", s.port, url.QueryEscape(s.keyfile), url.QueryEscape(known))
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func startSSHD() (*hypervisorSSHD, error) {
	bin := "/usr/sbin/sshd"
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("no sshd (scripts/testenv.sh setup installs openssh-server): %w", err)
	}
	dir, err := os.MkdirTemp("", "libvirt-gci-sshd")
	if err != nil {
		return nil, err
	}
	for _, k := range []string{"host", "client"} {
		if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", k, "-f", filepath.Join(dir, k)).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("ssh-keygen: %v: %s", err, out)
		}
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	s := &hypervisorSSHD{port: port, keyfile: filepath.Join(dir, "client"), known: filepath.Join(dir, "known_hosts")}
	pub, err := os.ReadFile(filepath.Join(dir, "client.pub"))
	if err != nil {
		return nil, err
	}
	hostPub, err := os.ReadFile(filepath.Join(dir, "host.pub"))
	if err != nil {
		return nil, err
	}
	files := map[string]string{
		"authorized_keys": string(pub),
		"known_hosts":     fmt.Sprintf("[127.0.0.1]:%d %s", port, hostPub),
		"sshd_config": fmt.Sprintf(`Port %d
ListenAddress 127.0.0.1
HostKey %s
AuthorizedKeysFile %s
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
PidFile %s
LogLevel DEBUG1
`, port, filepath.Join(dir, "host"), filepath.Join(dir, "authorized_keys"), filepath.Join(dir, "sshd.pid")),
	}
	for n, c := range files {
		if err := os.WriteFile(filepath.Join(dir, n), []byte(c), 0o600); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil { // its privilege separation directory
		return nil, err
	}
	cmd := exec.Command(bin, "-D", "-e", "-f", filepath.Join(dir, "sshd_config"))
	cmd.Stdout, cmd.Stderr = s, s
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	s.pid = cmd.Process.Pid
	addCleanup(func() { _ = cmd.Process.Kill(); _ = os.RemoveAll(dir) })
	deadline := time.Now().Add(30 * time.Second) // a loaded machine starts it slowly
	for time.Now().Before(deadline) {
		select {
		case <-exited: // another process took the port first, say
			return nil, fmt.Errorf("sshd exited: %s", s.logged())
		default:
		}
		if c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port)); err == nil {
			c.Close()
			return s, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return nil, fmt.Errorf("sshd did not listen on 127.0.0.1:%d: %s", port, s.logged())
}

// startSSHDRetry starts an sshd, again on another port if the port it was given was
// taken before it could listen.
func startSSHDRetry() (s *hypervisorSSHD, err error) {
	for range 3 {
		if s, err = startSSHD(); err == nil {
			return s, nil
		}
	}
	return nil, err
}

// mutePort is a TCP port on 127.0.0.1 that accepts connections and then says nothing,
// as a stalled host does, until the test ends.
func mutePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	mute(t, ln)
	return ln.Addr().(*net.TCPAddr).Port
}

// mute has ln accept connections and say nothing on them until the test ends.
func mute(t *testing.T, ln net.Listener) {
	t.Cleanup(func() { ln.Close() })
	go func() {
		var held []net.Conn
		for {
			c, err := ln.Accept()
			if err != nil { // closed at the end of the test
				for _, c := range held {
					c.Close()
				}
				return
			}
			held = append(held, c)
		}
	}()
}

// A job on a hypervisor reached over qemu+ssh, with each transport: the agent through
// the libvirt connection, ssh through a channel of the same SSH connection to the
// guest's forward on the hypervisor's 127.0.0.1.
func TestRemoteQemuSSH(t *testing.T) {
	t.Parallel()
	s := theSSHD(t)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			t.Parallel()
			j := newJobOver(t, tr)
			j.env["LIBVIRT_GCI_URI"] = s.uri(s.known)
			// The warm image first, over qemu+ssh too: a prepare boots rather than wait
			// for another test's prepare that is making the same image meanwhile.
			j.warm()
			start := time.Now()
			r := j.stage("prepare")
			require.Equal(t, 0, r.code, r.stderr)
			t.Cleanup(func() { j.stage("cleanup") })
			t.Logf("prepare over qemu+ssh (%s): %.1f s", tr, time.Since(start).Seconds())
			assert.NotContains(t, r.stderr, "booting", "restored from the warm image, made and read over qemu+ssh")
			assert.Contains(t, r.stderr, "restored")
			start = time.Now()
			r = j.run("build_script", "echo remote-ok; hostname")
			t.Logf("a stage over qemu+ssh (%s): %d ms", tr, time.Since(start).Milliseconds())
			require.Equal(t, 0, r.code, r.stderr)
			assert.Contains(t, r.stdout, "remote-ok")
			assert.Contains(t, r.stdout, j.instance())
			r = j.run("build_script", "exit 3")
			assert.Equal(t, 1, r.code, r.stderr)
			r = j.stage("cleanup")
			require.Equal(t, 0, r.code, r.stderr)
			assert.Empty(t, leftovers(t, j.l, j.prefix))
			if tr == "ssh" {
				// The guest's SSH was reached through the hypervisor's sshd, not directly.
				assert.Regexp(t, `server_request_direct_tcpip: originator .* target 127\.0\.0\.1 port \d+`, s.logged())
			}
			assert.Contains(t, s.logged(), "server_request_direct_streamlocal")
		})
	}
}

// A hypervisor whose host key is not the one known_hosts has, or that known_hosts does
// not list, is refused before anything is made.
func TestRemoteHostKeyRefused(t *testing.T) {
	t.Parallel()
	s := theSSHD(t)
	dir := t.TempDir()
	out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(dir, "other")).CombinedOutput()
	require.NoError(t, err, string(out))
	other, err := os.ReadFile(filepath.Join(dir, "other.pub"))
	require.NoError(t, err)
	wrong, unknown := filepath.Join(dir, "wrong"), filepath.Join(dir, "unknown")
	require.NoError(t, os.WriteFile(wrong, fmt.Appendf(nil, "[127.0.0.1]:%d %s", s.port, other), 0o600))
	require.NoError(t, os.WriteFile(unknown, fmt.Appendf(nil, "[127.0.0.1]:1 %s", other), 0o600))
	for known, want := range map[string]string{
		wrong:   fmt.Sprintf("host key mismatch at 127.0.0.1:%d", s.port),
		unknown: fmt.Sprintf("127.0.0.1:%d is not in %s", s.port, unknown),
	} {
		j := newJob(t)
		j.env["LIBVIRT_GCI_URI"] = s.uri(known)
		r := j.stage("prepare")
		assert.Equal(t, 2, r.code, r.stderr)
		assert.Contains(t, r.stderr, want)
		assert.Contains(t, r.stderr, "refusing to connect")
		assert.Empty(t, leftovers(t, j.l, j.prefix))
	}
}

// With two hypervisors of which one is down (a port that accepts and then says
// nothing, as a stalled host), prepare skips it with a line and places the job on the
// other; run and cleanup find the job there.
func TestRemoteOneHostDown(t *testing.T) {
	t.Parallel()
	s := theSSHD(t)
	down := strings.Replace(s.uri(s.known), fmt.Sprintf(":%d/", s.port), fmt.Sprintf(":%d/", mutePort(t)), 1)
	j := newJob(t)
	j.env["LIBVIRT_GCI_URI"] = down + " " + s.uri(s.known)
	start := time.Now()
	r := j.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { j.stage("cleanup") })
	t.Logf("prepare with one host stalled: %.1f s", time.Since(start).Seconds())
	// A job's log names the hosts without their key and known_hosts paths (issue 24).
	public := func(uri string) string { u, _, _ := strings.Cut(uri, "?"); return u }
	assert.Contains(t, r.stderr, "skipping "+public(down)+": ")
	assert.Contains(t, r.stderr, "placed on "+public(s.uri(s.known))+" (")
	assert.NotContains(t, r.stderr, "keyfile=")
	assert.NotContains(t, r.stderr, "known_hosts=")
	r = j.stage("list", "--json")
	require.Equal(t, 0, r.code, r.stderr)
	var listed []struct{ Name, Host string }
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &listed))
	var ours []string
	for _, l := range listed { // and other tests' instances
		if strings.HasPrefix(l.Name, j.prefix) {
			ours = append(ours, l.Host)
		}
	}
	assert.Equal(t, []string{s.uri(s.known)}, ours, "the host it was placed by, in its metadata")

	r = j.stage("template", "list")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stderr, "skipping "+public(down)+": ")
	assert.Regexp(t, `(?m)^# `+regexp.QuoteMeta(s.uri(s.known))+`\n(.*\n)*`+testTmpl+`\s`, r.stdout, "the host that answered, listed")

	start = time.Now()
	r = j.run("build_script", "echo placed-ok")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "placed-ok")
	assert.Less(t, time.Since(start), 8*time.Second, "run waits for the stalled host though the instance was found")
	r = j.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Empty(t, leftovers(t, j.l, j.prefix))
}

// The real gitlab-runner driving a job on a hypervisor reached over qemu+ssh, over ssh:
// the helper binary goes up through libvirt's stream, the stages through the channel.
func TestRunnerRemoteQemuSSH(t *testing.T) {
	t.Parallel()
	s := theSSHD(t)
	h := newRunnerHost(t, "ssh")
	for i, kv := range h.env {
		if strings.HasPrefix(kv, "LIBVIRT_GCI_URI=") {
			h.env[i] = "LIBVIRT_GCI_URI=" + s.uri(s.known)
		}
	}
	j := h.gl.Add(fakegitlab.JobSpec{Script: []string{`echo "remote job on $(hostname)"`, `gitlab-runner --version | head -1`}})
	p := h.runSingle(1)
	final, trace := h.finish(j)
	p.wait(t, time.Minute)
	assert.Equal(t, "success", final.State, trace)
	assert.Contains(t, trace, "remote job on "+h.prefix, trace)
	assert.Contains(t, trace, "Version:")
	assert.Empty(t, leftovers(t, h.l, h.prefix))
}

// connsTo counts this process's TCP connections to 127.0.0.1:port that are established.
func connsTo(t *testing.T, port int) int {
	t.Helper()
	mine := map[string]bool{}
	fds, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	for _, fd := range fds {
		if l, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil && strings.HasPrefix(l, "socket:[") {
			mine[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	b, err := os.ReadFile("/proc/net/tcp")
	require.NoError(t, err)
	n := 0
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		// rem_address is 0100007F:PORT (hex); state 01 is ESTABLISHED; field 9 the inode
		if len(f) > 9 && f[2] == fmt.Sprintf("0100007F:%04X", port) && f[3] == "01" && mine[f[9]] {
			n++
		}
	}
	return n
}

// Closing a connection over qemu+ssh closes its SSH connection (go-libvirt's own SSH
// dialer leaks one per connection): what a long-lived process needs.
func TestRemoteSSHConnectionsClosed(t *testing.T) {
	t.Parallel()
	s := theSSHD(t)
	lv(t)
	for range 3 {
		conn, err := provision.Connect(context.Background(), s.uri(s.known))
		require.NoError(t, err)
		_, err = conn.Instances()
		require.NoError(t, err)
		require.Equal(t, 1, connsTo(t, s.port), "the SSH connection of the open libvirt connection")
		require.NoError(t, conn.Close())
		require.Eventually(t, func() bool { return connsTo(t, s.port) == 0 }, 5*time.Second, 20*time.Millisecond, "the SSH connection is closed with the libvirt one")
	}
}

// descendants are the processes below pid: an sshd's connections.
func descendants(pid int) []int {
	out, _ := exec.Command("pgrep", "-P", strconv.Itoa(pid)).Output()
	var all []int
	for _, f := range strings.Fields(string(out)) {
		if c, err := strconv.Atoi(f); err == nil {
			all = append(all, c)
			all = append(all, descendants(c)...)
		}
	}
	return all
}

// A hypervisor whose sshd stalls (its connection's processes stopped with SIGSTOP) does
// not keep a cancelled run stage alive: it exits within 5 s of the runner's SIGTERM.
func TestRemoteSSHStalledSIGTERM(t *testing.T) {
	t.Parallel()
	s, err := startSSHDRetry() // its own: stopping it stalls no other test
	require.NoError(t, err)
	j := newJob(t)
	j.env["LIBVIRT_GCI_URI"] = s.uri(s.known)
	j.prepare()

	cancelWhileStalled(t, j, "the hypervisor's sshd", func() func() {
		stopped := descendants(s.pid)
		require.NotEmpty(t, stopped, "the stage's SSH connection has its sshd process")
		for _, p := range stopped {
			require.NoError(t, syscall.Kill(p, syscall.SIGSTOP))
		}
		return func() {
			for _, p := range stopped {
				_ = syscall.Kill(p, syscall.SIGCONT)
			}
		}
	})
	r := j.stage("cleanup")
	assert.Equal(t, 0, r.code, r.stderr)
}

// Without ?keyfile=, the key comes from ssh-agent (SSH_AUTH_SOCK), as with ssh(1); an
// agent without the key authenticates no one.
func TestRemoteSSHAgentKey(t *testing.T) {
	t.Parallel()
	s := theSSHD(t)
	pem, err := os.ReadFile(s.keyfile)
	require.NoError(t, err)
	key, err := ssh.ParseRawPrivateKey(pem)
	require.NoError(t, err)
	serve := func(keys ...any) string {
		ring := agent.NewKeyring()
		for _, k := range keys {
			require.NoError(t, ring.Add(agent.AddedKey{PrivateKey: k}))
		}
		dir, err := os.MkdirTemp("", "gci-agent") // short: socket paths are limited
		require.NoError(t, err)
		t.Cleanup(func() { os.RemoveAll(dir) })
		ln, err := net.Listen("unix", filepath.Join(dir, "agent.sock"))
		require.NoError(t, err)
		t.Cleanup(func() { ln.Close() })
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				go func() { defer c.Close(); _ = agent.ServeAgent(ring, c) }()
			}
		}()
		return ln.Addr().String()
	}
	j := newJob(t)
	j.env["LIBVIRT_GCI_URI"] = fmt.Sprintf("qemu+ssh://root@127.0.0.1:%d/system?known_hosts=%s", s.port, url.QueryEscape(s.known))
	j.env["SSH_AUTH_SOCK"] = serve(key)
	r := j.stage("list")
	require.Equal(t, 0, r.code, r.stderr)

	j.env["SSH_AUTH_SOCK"] = serve()
	r = j.stage("list")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, "unable to authenticate")

	// An agent that accepts and never answers holds the handshake for the dial bound at
	// most.
	dir, err := os.MkdirTemp("", "gci-agent")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	ln, err := net.Listen("unix", filepath.Join(dir, "mute.sock"))
	require.NoError(t, err)
	mute(t, ln)
	j.env["SSH_AUTH_SOCK"] = ln.Addr().String()
	start := time.Now()
	r = j.stage("list")
	assert.Equal(t, 2, r.code, r.stderr)
	assert.Less(t, time.Since(start), 20*time.Second, "a stalled ssh-agent is given up on")
}
