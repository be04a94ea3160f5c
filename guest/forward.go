package guest

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"
)

// Forwards are TCP services (host:port, as the runner host reaches them) that the guest
// reaches at 127.0.0.1 and the same port, through the instance's SSH connection while
// a stage runs: sshd listens on the guest's loopback (a remote forward, as ssh -R does),
// and each connection to it is dialled from this host. The guest needs no network of
// its own for them, and reaches nothing else through them.
type Forwards struct {
	c       *ssh.Client
	unbind  func() bool // stops closing c at the end of Forward's context
	lns     []net.Listener
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   map[net.Conn]bool
	open    int // the guest's connections open now
	stopped bool
}

// MaxForwardConns bounds the connections a guest has open through its forwards at once:
// each holds a socket and two goroutines on the runner host, and a job must not exhaust
// them (or the service behind) for the other jobs. Past it, the guest's connection is
// closed at once, as a refused one.
const MaxForwardConns = 64

// Forward opens the forwards over a connection of its own; Close ends them, and so
// does the end of ctx (their connection is closed then, whatever the guest answers).
func (s *SSH) Forward(ctx context.Context, targets []string) (*Forwards, error) {
	c, err := s.dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("forwards: %w", err)
	}
	f := &Forwards{c: c, conns: map[net.Conn]bool{}}
	f.unbind = context.AfterFunc(ctx, func() { _ = c.Close() })
	for _, t := range targets {
		_, port, err := net.SplitHostPort(t)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("forward %q: %w", t, err)
		}
		if _, err := strconv.Atoi(port); err != nil {
			f.Close()
			return nil, fmt.Errorf("forward %q: port %q is not a number", t, port)
		}
		ln, err := c.Listen("tcp", net.JoinHostPort("127.0.0.1", port))
		if err != nil {
			f.Close()
			if ctx.Err() != nil {
				return nil, fmt.Errorf("forward %s: %w", t, context.Cause(ctx))
			}
			return nil, fmt.Errorf("forward %s: the guest's sshd refused to listen on 127.0.0.1:%s (AllowTcpForwarding? a port below 1024 needs the ssh user to be root): %w", t, port, err)
		}
		f.lns = append(f.lns, ln)
		f.wg.Add(1)
		go f.serve(ln, t)
	}
	return f, nil
}

func (f *Forwards) serve(ln net.Listener, target string) {
	defer f.wg.Done()
	for {
		in, err := ln.Accept()
		if err != nil {
			return
		}
		ok, stopped := f.admit(in)
		if stopped {
			in.Close()
			return
		}
		if !ok {
			in.Close()
			continue
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer f.release(in)
			defer in.Close()
			out, err := net.DialTimeout("tcp", target, 30*time.Second)
			if err != nil {
				return // the guest sees the connection closed, as with a refused one
			}
			defer out.Close()
			if !f.track(out, true) {
				return
			}
			defer f.track(out, false)
			done := make(chan struct{}, 2)
			go func() { _, _ = io.Copy(out, in); closeWrite(out); done <- struct{}{} }()
			go func() { _, _ = io.Copy(in, out); closeWrite(in); done <- struct{}{} }()
			<-done
			<-done
		}()
	}
}

// closeWrite half-closes c where it can, so that the other side sees the end of the data.
func closeWrite(c net.Conn) {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
}

// admit tracks the guest's connection in, unless the forwards are stopped or it has
// MaxForwardConns open already.
func (f *Forwards) admit(in net.Conn) (ok, stopped bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.stopped {
		return false, true
	}
	if f.open >= MaxForwardConns {
		return false, false
	}
	f.open++
	f.conns[in] = true
	return true, false
}

// release ends admit's tracking of in.
func (f *Forwards) release(in net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.open--
	delete(f.conns, in)
}

func (f *Forwards) track(c net.Conn, add bool) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if add {
		if f.stopped {
			return false
		}
		f.conns[c] = true
		return true
	}
	delete(f.conns, c)
	return true
}

// Close ends the forwards and every connection through them, and waits for them. It
// closes their SSH connection first: the guest is not asked to cancel its listeners (a
// request that waits for the guest's answer, which a stalled sshd never gives), it
// loses them with the connection.
func (f *Forwards) Close() error {
	f.mu.Lock()
	f.stopped = true
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	var err error
	if f.c != nil {
		if f.unbind != nil {
			f.unbind()
		}
		err = f.c.Close()
	}
	for _, ln := range f.lns {
		ln.Close() // at once: the connection is closed
	}
	f.wg.Wait()
	return err
}
