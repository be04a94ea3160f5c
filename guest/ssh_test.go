package guest

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"
)

func TestSecretFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "secret")

	_, err := LoadSecret(path, false)
	assert.ErrorContains(t, err, "secret file", "missing, and not to be created")

	// Concurrent first uses agree on one secret.
	var wg sync.WaitGroup
	got := make([][]byte, 8)
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := LoadSecret(path, true)
			assert.NoError(t, err)
			got[i] = s
		}()
	}
	wg.Wait()
	for _, s := range got {
		assert.Equal(t, got[0], s)
	}
	assert.Len(t, got[0], secretSize)
	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())
	di, err := os.Stat(filepath.Dir(path))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), di.Mode().Perm())
	left, _ := filepath.Glob(filepath.Join(dir, "sub", ".secret-*"))
	assert.Empty(t, left, "temporary files removed")

	again, err := LoadSecret(path, true)
	require.NoError(t, err)
	assert.Equal(t, got[0], again, "the secret is stable")

	require.NoError(t, os.Chmod(path, 0o640))
	_, err = LoadSecret(path, false)
	assert.ErrorContains(t, err, "has mode 0640: others can read it; it must be 0600")

	bad := filepath.Join(dir, "bad")
	require.NoError(t, os.WriteFile(bad, []byte("not hex\n"), 0o600))
	_, err = LoadSecret(bad, true)
	assert.ErrorContains(t, err, "want 32 hex-encoded bytes")
}

// A secret another user could have planted is refused: a file not ours, or one in a
// directory others can write to.
func TestSecretFileOwner(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "secret")
	_, err := LoadSecret(path, true)
	require.NoError(t, err)

	require.NoError(t, os.Chmod(filepath.Dir(path), 0o777))
	_, err = LoadSecret(path, false)
	assert.ErrorContains(t, err, "has mode 0777: other users can replace the secret in it")
	require.NoError(t, os.Chmod(filepath.Dir(path), 0o700))

	if os.Geteuid() != 0 {
		t.Skip("giving the file to another user needs root")
	}
	require.NoError(t, os.Chown(path, 4242, 4242))
	_, err = LoadSecret(path, false)
	assert.ErrorContains(t, err, "belongs to uid 4242, not to this user (uid 0); refusing a secret another user could have planted")
}

func TestClientKeyDerivation(t *testing.T) {
	t.Parallel()
	secret := bytes.Repeat([]byte{7}, secretSize)
	u1 := [16]byte{1}
	u2 := [16]byte{2}
	k1, err := ClientKey(secret, u1)
	require.NoError(t, err)
	k1again, err := ClientKey(secret, u1)
	require.NoError(t, err)
	k2, err := ClientKey(secret, u2)
	require.NoError(t, err)
	other, err := ClientKey(bytes.Repeat([]byte{8}, secretSize), u1)
	require.NoError(t, err)

	pub := func(s ssh.Signer) string { return string(s.PublicKey().Marshal()) }
	assert.Equal(t, pub(k1), pub(k1again), "stable for one instance")
	assert.NotEqual(t, pub(k1), pub(k2), "different for another instance")
	assert.NotEqual(t, pub(k1), pub(other), "different with another secret")
	assert.Equal(t, ssh.KeyAlgoED25519, k1.PublicKey().Type())
	_, err = ClientKey([]byte("short"), u1)
	assert.Error(t, err)
}

// testServer is an in-process SSH server with the given host key, accepting one client
// key, that runs every command with /bin/sh on this machine.
func testServer(t *testing.T, hostKey ssh.Signer, client ssh.PublicKey) string {
	t.Helper()
	cfg := serverConfig(hostKey, client)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				_, chans, reqs, err := ssh.NewServerConn(c, cfg)
				if err != nil {
					return
				}
				go ssh.DiscardRequests(reqs)
				for nc := range chans {
					ch, creqs, _ := nc.Accept()
					go func() {
						for r := range creqs {
							if r.Type != "exec" {
								_ = r.Reply(false, nil)
								continue
							}
							_ = r.Reply(true, nil)
							ch.SendRequest("exit-status", false, ssh.Marshal(struct{ Status uint32 }{0}))
							ch.Close()
						}
					}()
				}
			}()
		}
	}()
	return ln.Addr().String()
}

// serverConfig is a test server's: the host key, and the one client key it accepts.
func serverConfig(hostKey ssh.Signer, client ssh.PublicKey) *ssh.ServerConfig {
	cfg := &ssh.ServerConfig{PublicKeyCallback: func(_ ssh.ConnMetadata, k ssh.PublicKey) (*ssh.Permissions, error) {
		if bytes.Equal(k.Marshal(), client.Marshal()) {
			return nil, nil
		}
		return nil, errors.New("unknown key")
	}}
	cfg.AddHostKey(hostKey)
	return cfg
}

func newSigner(t *testing.T) ssh.Signer {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	require.NoError(t, err)
	s, err := ssh.NewSignerFromKey(priv)
	require.NoError(t, err)
	return s
}

func TestSSHHostKeyPinned(t *testing.T) {
	t.Parallel()
	host, impostor, client := newSigner(t), newSigner(t), newSigner(t)
	good := &SSH{Addr: testServer(t, host, client.PublicKey()), User: "root", Key: client, HostKey: host.PublicKey()}
	require.NoError(t, good.WaitReady(context.Background()), "the pinned key is accepted")

	bad := &SSH{Addr: testServer(t, impostor, client.PublicKey()), User: "root", Key: client, HostKey: host.PublicKey()}
	_, err := bad.Run(context.Background(), []byte("echo hi"), &bytes.Buffer{}, &bytes.Buffer{})
	var hk *HostKeyError
	require.ErrorAs(t, err, &hk, "another host key is refused")
	assert.Equal(t, ssh.FingerprintSHA256(host.PublicKey()), hk.Want)
	assert.Equal(t, ssh.FingerprintSHA256(impostor.PublicKey()), hk.Got)
	assert.Contains(t, err.Error(), "refusing to connect")

	// At prepare, WaitReady asks the guest to reload sshd, and keeps trying until the end.
	rekeys := 0
	bad.Rekey = func(context.Context) error { rekeys++; return nil }
	// (6 s: time for a handshake on a host loaded by the real-VM tests beside this one;
	// 3 s once saw no handshake at all, with -race and builds beside it.)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Second)
	defer cancel()
	start := time.Now()
	err = bad.WaitReady(ctx)
	assert.ErrorIs(t, err, ErrNotReady)
	assert.ErrorContains(t, err, "host key mismatch")
	assert.True(t, rekeys >= 1 && rekeys <= int(time.Since(start)/time.Second)+1, "at most one reload a second: %d", rekeys)

	// A client key the guest does not know is refused too.
	stranger := &SSH{Addr: good.Addr, User: "root", Key: newSigner(t), HostKey: host.PublicKey()}
	_, err = stranger.Run(context.Background(), []byte("true"), &bytes.Buffer{}, &bytes.Buffer{})
	assert.ErrorContains(t, err, "unable to authenticate")
}

// When the wait ends in the middle of an attempt, the error still names what the
// attempts before it found, not only the deadline.
func TestSSHWaitReadyKeepsTheTellingError(t *testing.T) {
	t.Parallel()
	host, impostor, client := newSigner(t), newSigner(t), newSigner(t)
	real := testServer(t, impostor, client.PublicKey())
	// The first connection reaches a server with another host key; every later one
	// is accepted and never answered, so the deadline ends the wait inside an attempt.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	var held []net.Conn
	var mu sync.Mutex
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	})
	go func() {
		for n := 0; ; n++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			if n > 0 {
				mu.Lock()
				held = append(held, c)
				mu.Unlock()
				continue
			}
			go func() {
				defer c.Close()
				up, err := net.Dial("tcp", real)
				if err != nil {
					return
				}
				defer up.Close()
				go func() { _, _ = io.Copy(up, c) }()
				_, _ = io.Copy(c, up)
			}()
		}
	}()
	s := &SSH{Addr: ln.Addr().String(), User: "root", Key: client, HostKey: host.PublicKey()}
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	err = s.WaitReady(ctx)
	assert.ErrorIs(t, err, ErrNotReady)
	assert.ErrorContains(t, err, "host key mismatch")
	assert.ErrorContains(t, err, "deadline exceeded", "and why the wait ended")
}

func TestSSHStatus(t *testing.T) {
	t.Parallel()
	st, err := sshStatus(nil)
	require.NoError(t, err)
	assert.Equal(t, ExitStatus{}, st)
	_, err = sshStatus(fmt.Errorf("wrapped: %w", errors.New("EOF")))
	assert.ErrorContains(t, err, "ssh session lost")
	_, err = sshStatus(&ssh.ExitMissingError{})
	assert.ErrorContains(t, err, "ssh session lost")
}

// The ssh stage's wrapper, run by the host's bash as sshd's login shell would: the
// script sees what a script file run by bash would ($0 a path, no arguments, stdin
// /dev/null), none of the wrapper's variables, and its status is the stage's; the PID
// file sshKill needs goes once the stage is over.
func TestSSHWrapperRunsTheScript(t *testing.T) {
	t.Parallel()
	tmp := t.TempDir()
	script := `printf '%s|%s|' "$0" "$#"; printf '%s|' "${__gci_script-unset}" "${f-unset}"; cat; echo; exit 7`
	cmd := exec.Command("sh", "-c", shellCommand("bash", sshWrapper, "abc123"))
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	cmd.Stdin = strings.NewReader(script)
	out, err := cmd.Output()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 7, ee.ExitCode())
	assert.Equal(t, filepath.Join(tmp, "libvirt-gci.abc123")+"|0|unset|unset|\n", string(out))
	assert.Eventually(t, func() bool {
		_, err := os.Stat(filepath.Join(tmp, "libvirt-gci.abc123.pid"))
		return os.IsNotExist(err)
	}, 5*time.Second, 10*time.Millisecond, "the PID file is removed")
	// A file planted where the PID goes is not written through.
	require.NoError(t, os.Symlink(filepath.Join(tmp, "target"), filepath.Join(tmp, "libvirt-gci.def456.pid")))
	cmd = exec.Command("sh", "-c", shellCommand("bash", sshWrapper, "def456"))
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	cmd.Stdin = strings.NewReader("echo ran")
	out, err = cmd.Output()
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, "signal: user defined signal 1", ee.String())
	assert.Empty(t, string(out))
	assert.NoFileExists(t, filepath.Join(tmp, "target"))
}
