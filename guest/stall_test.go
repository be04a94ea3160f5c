package guest

import (
	"bytes"
	"context"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/crypto/ssh"
)

// stall is what a stalled guest sshd leaves unanswered; it answers keepalives always,
// so that only the end of the caller's context can end the wait.
type stall struct {
	cancelForward bool // cancel-tcpip-forward (tcpip-forward itself is granted)
	forward       bool // tcpip-forward
	channelOpen   bool // session channels
	exec          bool // the exec request on a session
}

// stallServer is an sshd that authenticates client and then leaves what s says
// unanswered for as long as its connection lasts.
func stallServer(t *testing.T, hostKey ssh.Signer, client ssh.PublicKey, s stall) string {
	t.Helper()
	cfg := serverConfig(hostKey, client)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	t.Cleanup(func() { close(done); ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc, chans, reqs, err := ssh.NewServerConn(c, cfg)
				if err != nil {
					return
				}
				defer sc.Close()
				go func() {
					for r := range reqs {
						switch {
						case r.Type == "tcpip-forward" && s.forward, r.Type == "cancel-tcpip-forward" && s.cancelForward:
							// never answered
						case r.Type == "tcpip-forward":
							_ = r.Reply(true, ssh.Marshal(struct{ Port uint32 }{0}))
						default:
							_ = r.Reply(r.Type == "keepalive@openssh.com" || r.Type == "cancel-tcpip-forward", nil)
						}
					}
				}()
				go func() {
					for nc := range chans {
						if s.channelOpen {
							continue // never answered
						}
						ch, creqs, err := nc.Accept()
						if err != nil {
							continue
						}
						go func() {
							defer ch.Close()
							for r := range creqs {
								if r.Type == "exec" && s.exec {
									continue // never answered
								}
								_ = r.Reply(r.Type == "exec", nil)
								if r.Type == "exec" {
									_, _ = ch.SendRequest("exit-status", false, ssh.Marshal(struct{ Status uint32 }{0}))
									return
								}
							}
						}()
					}
				}()
				<-done
			}()
		}
	}()
	return ln.Addr().String()
}

// within runs f and fails the test unless it returns within d.
func within(t *testing.T, d time.Duration, what string, f func()) {
	t.Helper()
	ended := make(chan struct{})
	go func() { f(); close(ended) }()
	select {
	case <-ended:
	case <-time.After(d):
		t.Fatalf("%s: still blocked %s after its context ended", what, d)
	}
}

// Every guest SSH connection ends with its context, whatever the guest's sshd leaves
// unanswered: a stage, its forwards, and the wait for readiness.
func TestSSHEndsWithItsContextWhateverTheGuest(t *testing.T) {
	t.Parallel()
	for name, s := range map[string]stall{
		"session never opened":  {channelOpen: true},
		"script never started":  {exec: true},
		"forward never granted": {forward: true},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			host, client := newSigner(t), newSigner(t)
			g := &SSH{Addr: stallServer(t, host, client.PublicKey(), s), User: "root", Key: client, HostKey: host.PublicKey()}
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(500*time.Millisecond, cancel)
			var err error
			if s.forward {
				within(t, 2*time.Second, "Forward", func() { _, err = g.Forward(ctx, []string{"127.0.0.1:9"}) })
				assert.ErrorIs(t, err, context.Canceled)
				return
			}
			within(t, 2*time.Second, "Run", func() { _, err = g.Run(ctx, []byte("true"), &bytes.Buffer{}, &bytes.Buffer{}) })
			var in *Interrupted
			assert.ErrorAs(t, err, &in)

			ctx, cancel = context.WithCancel(context.Background())
			time.AfterFunc(500*time.Millisecond, cancel)
			within(t, 2*time.Second, "WaitReady", func() { err = g.WaitReady(ctx) })
			assert.ErrorIs(t, err, ErrNotReady)
		})
	}
}

// Forwards end at once when the stage does, even where the guest never answers the
// cancel of its forwards.
func TestForwardsCloseDoesNotWaitForTheGuest(t *testing.T) {
	t.Parallel()
	host, client := newSigner(t), newSigner(t)
	g := &SSH{Addr: stallServer(t, host, client.PublicKey(), stall{cancelForward: true}), User: "root", Key: client, HostKey: host.PublicKey()}
	ctx, cancel := context.WithCancel(context.Background())
	f, err := g.Forward(ctx, []string{"127.0.0.1:9"})
	require.NoError(t, err)
	cancel()
	within(t, 2*time.Second, "Forwards.Close", func() { _ = f.Close() })

	f, err = g.Forward(context.Background(), []string{"127.0.0.1:9"})
	require.NoError(t, err)
	within(t, 2*time.Second, "Forwards.Close without a cancel", func() { _ = f.Close() })
}
