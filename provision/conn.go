// Package provision is everything libvirt: connect, clone a template into overlay volumes
// and a domain, start it, read its metadata, tear it down.
package provision

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// The go-libvirt calls this package makes, split by concern so a test fake stays small.
type domainAPI interface {
	DomainLookupByName(name string) (libvirt.Domain, error)
	DomainGetXMLDesc(dom libvirt.Domain, flags libvirt.DomainXMLFlags) (string, error)
	DomainGetState(dom libvirt.Domain, flags uint32) (int32, int32, error)
	DomainGetMetadata(dom libvirt.Domain, typ int32, uri libvirt.OptString, flags libvirt.DomainModificationImpact) (string, error)
	DomainDefineXMLFlags(xml string, flags libvirt.DomainDefineFlags) (libvirt.Domain, error)
	DomainCreate(dom libvirt.Domain) error
	DomainDestroyFlags(dom libvirt.Domain, flags libvirt.DomainDestroyFlagsValues) error
	DomainUndefineFlags(dom libvirt.Domain, flags libvirt.DomainUndefineFlagsValues) error
	DomainSetMetadata(dom libvirt.Domain, typ int32, metadata libvirt.OptString, key libvirt.OptString, uri libvirt.OptString, flags libvirt.DomainModificationImpact) error
	QEMUDomainMonitorCommand(dom libvirt.Domain, cmd string, flags uint32) (string, error)
	ConnectListAllDomains(needResults int32, flags libvirt.ConnectListAllDomainsFlags) ([]libvirt.Domain, uint32, error)
	DomainGetInfo(dom libvirt.Domain) (state uint8, maxMem uint64, memory uint64, nrVirtCPU uint16, cpuTime uint64, err error)
}

type storageAPI interface {
	StoragePoolLookupByName(name string) (libvirt.StoragePool, error)
	StorageVolCreateXML(pool libvirt.StoragePool, xml string, flags libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error)
	StorageVolLookupByName(pool libvirt.StoragePool, name string) (libvirt.StorageVol, error)
	StorageVolDelete(vol libvirt.StorageVol, flags libvirt.StorageVolDeleteFlags) error
	StorageVolLookupByPath(path string) (libvirt.StorageVol, error)
	StorageVolGetInfo(vol libvirt.StorageVol) (rType int8, rCapacity uint64, rAllocation uint64, err error)
	StorageVolUpload(vol libvirt.StorageVol, r io.Reader, offset, length uint64, flags libvirt.StorageVolUploadFlags) error
	StoragePoolListAllVolumes(pool libvirt.StoragePool, needResults int32, flags uint32) ([]libvirt.StorageVol, uint32, error)
}

// API is the part of go-libvirt a Conn uses (*libvirt.Libvirt, or provisiontest's fake).
type API interface {
	domainAPI
	storageAPI
	QEMUDomainAgentCommand(dom libvirt.Domain, cmd string, timeout int32, flags uint32) (libvirt.OptString, error)
}

// CancelGrace bounds how long a cancelled Conn waits for the answer to a call that
// creates something (a define, an overlay, a start) before it drops the connection.
// libvirtd carries out a call it has received whether or not the client is still there,
// so dropping the connection at once would leave the caller unable to know, and undo,
// what the call made. A healthy libvirtd answers in milliseconds; the bound is short
// because the runner wants a cancelled stage gone within seconds.
const CancelGrace = 3 * time.Second

// Conn is a connection to libvirtd.
type Conn struct {
	lv    *libvirt.Libvirt // nil for a fake
	api   API
	drop  func()        // closes the socket at once: calls in flight fail with ErrInterrupted
	grace time.Duration // CancelGrace, shorter in tests

	mu        sync.Mutex
	inflight  int  // calls in flight whose outcome must be known
	cancelled bool // ctx ended; drop the connection once inflight is 0 (or after grace)
	dropped   atomic.Bool
	stop      func() bool
	closeOnce sync.Once

	// dialHost reaches an address on libvirtd's host: directly for a local libvirt,
	// through the SSH connection for qemu+ssh; nil for other transports.
	dialHost func(ctx context.Context, addr string) (net.Conn, error)
}

// DialHost opens a TCP connection to addr as libvirtd's host sees it.
func (c *Conn) DialHost(ctx context.Context, addr string) (net.Conn, error) {
	if c.dialHost == nil {
		return nil, fmt.Errorf("cannot reach %s on a libvirt host over this transport; only qemu+ssh:// and a local libvirt can", addr)
	}
	return c.dialHost(ctx, addr)
}

// Connect dials libvirt at uri (qemu:///system, qemu+ssh://host/system, test:///default,
// ...). go-libvirt takes no contexts, so when ctx ends the connection's socket is closed,
// and calls in flight return at once, even if libvirtd is stalled. Calls that create
// something are the exception: see CancelGrace.
func Connect(ctx context.Context, uri string) (*Conn, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return nil, fmt.Errorf("libvirt URI %q: %w", uri, err)
	}
	d, err := dialerFor(ctx, u)
	if err != nil {
		return nil, fmt.Errorf("libvirt URI %q: %w", uri, err)
	}
	c, err := connect(ctx, d, libvirt.RemoteURI(u))
	if err != nil {
		return nil, fmt.Errorf("connect to libvirt at %s: %w", uri, err)
	}
	switch sd := d.Dialer.(type) {
	case *sshDialer:
		c.dialHost = sd.DialHost
	case *dialers.Local:
		var nd net.Dialer
		c.dialHost = func(ctx context.Context, addr string) (net.Conn, error) { return nd.DialContext(ctx, "tcp", addr) }
	}
	return c, nil
}

// connect opens a connection through d, giving up (and closing the socket) when ctx ends.
func connect(ctx context.Context, d *droppable, uri libvirt.ConnectURI) (*Conn, error) {
	lv := libvirt.NewWithDialer(d)
	done := make(chan error, 1)
	go func() { done <- lv.ConnectToURI(uri) }()
	select {
	case err := <-done:
		if err != nil {
			return nil, err
		}
	case <-ctx.Done():
		d.drop() // the handshake in flight fails at once
		return nil, context.Cause(ctx)
	}
	c := &Conn{lv: lv, api: lv, drop: d.drop, grace: CancelGrace}
	c.stop = context.AfterFunc(ctx, c.cancel)
	return c, nil
}

// droppable is a socket.Dialer whose connection can be closed under go-libvirt's feet.
// go-libvirt's own Disconnect first sends an RPC and waits for its answer, which never
// comes from a stalled libvirtd.
type droppable struct {
	socket.Dialer
	mu      sync.Mutex
	conn    net.Conn
	dropped bool
}

func (d *droppable) Dial() (net.Conn, error) {
	conn, err := d.Dialer.Dial()
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.dropped {
		conn.Close()
		return nil, net.ErrClosed
	}
	d.conn = conn
	return conn, nil
}

func (d *droppable) drop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dropped = true
	if d.conn != nil {
		_ = d.conn.Close()
	}
}

// dialerFor picks go-libvirt's dialer for a URI's transport: the local socket (the
// default, with ?socket=) or tcp; ssh and tls are ours (sshDialer, tlsDialer).
func dialerFor(ctx context.Context, u *url.URL) (*droppable, error) {
	transport := "unix"
	if s := strings.SplitN(u.Scheme, "+", 2); len(s) == 2 {
		transport = s[1]
	} else if u.Host != "" {
		transport = "tls"
	}
	switch transport {
	case "unix":
		var opts []dialers.LocalOption
		if s := u.Query().Get("socket"); s != "" {
			opts = append(opts, dialers.WithSocket(s))
		}
		return &droppable{Dialer: dialers.NewLocal(opts...)}, nil
	case "tcp":
		var opts []dialers.RemoteOption
		if p := u.Port(); p != "" {
			opts = append(opts, dialers.UsePort(p))
		}
		return &droppable{Dialer: dialers.NewRemote(u.Hostname(), opts...)}, nil
	case "tls":
		d, err := newTLSDialer(ctx, u)
		if err != nil {
			return nil, err
		}
		return &droppable{Dialer: d}, nil
	case "ssh":
		d, err := newSSHDialer(ctx, u)
		if err != nil {
			return nil, err
		}
		return &droppable{Dialer: d}, nil
	}
	return nil, fmt.Errorf("transport %q is not supported; want a local socket (qemu:///system), qemu+ssh://, qemu+tcp:// or qemu+tls://", transport)
}

// ErrLost: the connection to libvirtd ended (libvirtd stopped or restarted).
var ErrLost = errors.New("lost the connection to libvirtd (was it stopped or restarted?)")

// WithLoss returns a context that ends, with ErrLost, when the connection to libvirtd
// does: calls on it fail from then on, so waiting for anything it could tell is in vain.
func (c *Conn) WithLoss(ctx context.Context) (context.Context, context.CancelFunc) {
	lctx, cancel := context.WithCancelCause(ctx)
	if c.lv == nil {
		return lctx, func() { cancel(context.Canceled) }
	}
	lost := c.lv.Disconnected()
	go func() {
		select {
		case <-lost:
			cancel(ErrLost)
		case <-lctx.Done():
		}
	}()
	return lctx, func() { cancel(context.Canceled) }
}

// IsLost tells whether the connection to libvirtd has ended.
func (c *Conn) IsLost() bool { return c.lv != nil && !c.lv.IsConnected() }

// API is the client, for the guest package's agent transport.
func (c *Conn) API() API { return c.api }

// NewConn is a Conn over a as it is (provisiontest's fake, say): no socket, nothing to
// drop on a cancel.
func NewConn(a API) *Conn { return &Conn{api: a, grace: CancelGrace} }

// cancel runs when the Conn's context ends: it drops the connection now, or, while a call
// that creates something is in flight, when that call returns or the grace has passed.
func (c *Conn) cancel() {
	c.mu.Lock()
	c.cancelled = true
	busy := c.inflight > 0
	c.mu.Unlock()
	if !busy {
		c.dropNow()
		return
	}
	time.AfterFunc(c.grace, c.dropNow)
}

func (c *Conn) dropNow() {
	if c.dropped.CompareAndSwap(false, true) && c.drop != nil {
		c.drop()
	}
}

// awaited runs call, a call whose outcome the caller must know even after a cancel:
// the connection stays up until it returns (or CancelGrace passes).
func (c *Conn) awaited(call func() error) error {
	c.mu.Lock()
	c.inflight++
	c.mu.Unlock()
	err := call()
	c.mu.Lock()
	c.inflight--
	idle := c.inflight == 0 && c.cancelled
	c.mu.Unlock()
	if idle {
		c.dropNow()
	}
	return err
}

// Close disconnects. It is safe to call more than once. A stalled libvirtd cannot hold it
// up for more than a few seconds.
func (c *Conn) Close() error {
	var err error
	c.closeOnce.Do(func() {
		if c.stop != nil {
			c.stop()
		}
		if c.lv == nil || c.dropped.Load() { // no one to say goodbye to
			c.dropNow()
			return
		}
		done := make(chan error, 1)
		go func() { done <- c.lv.Disconnect() }()
		select {
		case err = <-done:
		case <-time.After(closeTime):
			c.dropNow()
			err = <-done
		}
	})
	return err
}

// closeTime bounds a polite disconnect.
const closeTime = 3 * time.Second

// hasCode tells whether err carries a libvirt error with one of codes.
func hasCode(err error, codes ...libvirt.ErrorNumber) bool {
	var lerr libvirt.Error
	if !errors.As(err, &lerr) {
		return false
	}
	for _, c := range codes {
		if lerr.Code == uint32(c) {
			return true
		}
	}
	return false
}
