// Package libvirt is libvirt-gci's one user of go-libvirt (beside the guest agent's
// calls): a connection whose calls end with a context (Conn, and the cancel rules that
// keep a cancelled create knowable), and the building blocks of an instance in libvirt's
// terms: define it with its overlays, start or restore it, read and write its
// <metadata>, tear it down, list instances and templates, move bytes in and out of
// volumes. It knows nothing of GitLab, of guests or of what a launch means: the
// provision package puts these blocks together.
package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt/dial"
)

// The go-libvirt calls libvirt-gci makes, by role. provisiontest's fake implements
// them all (its test says so at compile time): every feature runs on it as on libvirt.

// Domains defines, starts, stops, inspects and changes domains.
type Domains interface {
	DomainLookupByName(name string) (libvirt.Domain, error)
	DomainGetXMLDesc(dom libvirt.Domain, flags libvirt.DomainXMLFlags) (string, error)
	DomainGetState(dom libvirt.Domain, flags uint32) (int32, int32, error)
	DomainGetInfo(dom libvirt.Domain) (state uint8, maxMem uint64, memory uint64, nrVirtCPU uint16, cpuTime uint64, err error)
	DomainGetBlockInfo(dom libvirt.Domain, path string, flags uint32) (uint64, uint64, uint64, error)
	DomainGetMetadata(dom libvirt.Domain, typ int32, uri libvirt.OptString, flags libvirt.DomainModificationImpact) (string, error)
	DomainSetMetadata(dom libvirt.Domain, typ int32, metadata libvirt.OptString, key libvirt.OptString, uri libvirt.OptString, flags libvirt.DomainModificationImpact) error
	DomainDefineXMLFlags(xml string, flags libvirt.DomainDefineFlags) (libvirt.Domain, error)
	DomainCreate(dom libvirt.Domain) error
	DomainShutdownFlags(dom libvirt.Domain, flags libvirt.DomainShutdownFlagValues) error
	DomainDestroyFlags(dom libvirt.Domain, flags libvirt.DomainDestroyFlagsValues) error
	DomainSuspend(dom libvirt.Domain) error
	DomainUndefineFlags(dom libvirt.Domain, flags libvirt.DomainUndefineFlagsValues) error
	DomainUpdateDeviceFlags(dom libvirt.Domain, xml string, flags libvirt.DomainDeviceModifyFlags) error
	DomainAttachDeviceFlags(dom libvirt.Domain, xml string, flags uint32) error
	DomainBlockResize(dom libvirt.Domain, disk string, size uint64, flags libvirt.DomainBlockResizeFlags) error
	ConnectListAllDomains(needResults int32, flags libvirt.ConnectListAllDomainsFlags) ([]libvirt.Domain, uint32, error)
}

// Storage makes, finds and deletes pools' volumes.
type Storage interface {
	StoragePoolLookupByName(name string) (libvirt.StoragePool, error)
	StoragePoolGetInfo(pool libvirt.StoragePool) (rState uint8, rCapacity uint64, rAllocation uint64, rAvailable uint64, err error)
	StoragePoolListAllVolumes(pool libvirt.StoragePool, needResults int32, flags uint32) ([]libvirt.StorageVol, uint32, error)
	StorageVolCreateXML(pool libvirt.StoragePool, xml string, flags libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error)
	StorageVolCreateXMLFrom(pool libvirt.StoragePool, xml string, clone libvirt.StorageVol, flags libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error)
	StorageVolLookupByName(pool libvirt.StoragePool, name string) (libvirt.StorageVol, error)
	StorageVolLookupByPath(path string) (libvirt.StorageVol, error)
	StorageVolGetInfo(vol libvirt.StorageVol) (rType int8, rCapacity uint64, rAllocation uint64, err error)
	StorageVolGetPath(vol libvirt.StorageVol) (string, error)
	StorageVolGetXMLDesc(vol libvirt.StorageVol, flags uint32) (string, error)
	StorageVolDelete(vol libvirt.StorageVol, flags libvirt.StorageVolDeleteFlags) error
}

// Streams move a volume's bytes.
type Streams interface {
	StorageVolUpload(vol libvirt.StorageVol, r io.Reader, offset, length uint64, flags libvirt.StorageVolUploadFlags) error
	StorageVolDownload(vol libvirt.StorageVol, w io.Writer, offset, length uint64, flags libvirt.StorageVolDownloadFlags) error
}

// SaveRestore saves a running domain to a file and restores it.
type SaveRestore interface {
	DomainSaveFlags(dom libvirt.Domain, to string, dxml libvirt.OptString, flags uint32) error
	DomainRestoreFlags(from string, dxml libvirt.OptString, flags uint32) error
}

// Node tells what the host offers.
type Node interface {
	ConnectGetCapabilities() (string, error)
	NodeGetFreeMemory() (uint64, error)
	NodeGetInfo() (rModel [32]int8, rMemory uint64, rCpus int32, rMhz int32, rNodes int32, rSockets int32, rCores int32, rThreads int32, err error)
}

// QEMU passes commands to a domain's QEMU monitor and guest agent.
type QEMU interface {
	QEMUDomainMonitorCommand(dom libvirt.Domain, cmd string, flags uint32) (string, error)
	QEMUDomainAgentCommand(dom libvirt.Domain, cmd string, timeout int32, flags uint32) (libvirt.OptString, error)
}

// API is the part of go-libvirt a Conn uses (*libvirt.Libvirt, or provisiontest's fake).
type API interface {
	Domains
	Storage
	Streams
	SaveRestore
	Node
	QEMU
	Networks
}

// CancelGrace bounds how long a cancelled Conn waits for the answer to a call that
// creates something (a define, an overlay, a start) before it drops the connection.
// libvirtd carries out a call it has received whether or not the client is still there,
// so dropping the connection at once would leave the caller unable to know, and undo,
// what the call made. A healthy libvirtd answers in milliseconds, a busy one in seconds
// (CI saw a define take 4.2 s and 5.5 s while other jobs' network filters were being
// instantiated; with 3 s the define landed after prepare had given up, and after the
// runner's cleanup had looked). The runner waits graceful_kill_timeout (10 min by
// default) after its SIGTERM before it kills, so a few more seconds cost a cancelled
// job nothing, and a stalled libvirtd still cannot hold prepare longer than this.
const CancelGrace = 15 * time.Second

// Conn is a connection to libvirtd.
type Conn struct {
	lv    *libvirt.Libvirt // nil for a fake
	api   API
	drop  func()        // closes the socket at once: calls in flight fail with ErrInterrupted
	grace time.Duration // CancelGrace, shorter in tests

	mu        sync.Mutex
	inflight  int             // calls in flight whose outcome must be known
	settled   []chan struct{} // closed when inflight is next 0 (Settled)
	cancelled bool            // ctx ended; drop the connection once inflight is 0 (or after grace)
	dropped   atomic.Bool
	ended     <-chan struct{} // a fake client's end (disconnecter); go-libvirt's is lv's
	stop      func() bool
	closeOnce sync.Once

	// dialHost reaches an address on libvirtd's host: directly for a local libvirt,
	// through the SSH connection for qemu+ssh; nil for other transports.
	dialHost func(ctx context.Context, addr string) (net.Conn, error)
	// local: libvirtd runs on this host, so its volumes' files may be this process's to
	// read and write. redial opens another connection to the same libvirt (for a stream).
	local  bool
	redial func(ctx context.Context) (*Conn, error)
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
	d, err := dial.For(ctx, u)
	if err != nil {
		return nil, fmt.Errorf("libvirt URI %q: %w", uri, err)
	}
	c, err := connect(ctx, &droppable{Dialer: d}, libvirt.RemoteURI(u))
	if err != nil {
		return nil, fmt.Errorf("connect to libvirt at %s: %w", dial.Public(uri), err)
	}
	if hd, ok := d.(dial.HostDialer); ok {
		c.dialHost = hd.DialHost
	}
	c.local = dial.IsLocal(uri)
	c.redial = func(ctx context.Context) (*Conn, error) { return Connect(ctx, uri) }
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

// ErrLost: the connection to libvirtd ended (libvirtd stopped or restarted).
var ErrLost = errors.New("lost the connection to libvirtd (was it stopped or restarted?)")

// WithLoss returns a context that ends, with ErrLost, when the connection to libvirtd
// does: calls on it fail from then on, so waiting for anything it could tell is in vain.
func (c *Conn) WithLoss(ctx context.Context) (context.Context, context.CancelFunc) {
	lctx, cancel := context.WithCancelCause(ctx)
	lost := c.disconnected()
	if lost == nil {
		return lctx, func() { cancel(context.Canceled) }
	}
	go func() {
		select {
		case <-lost:
			cancel(ErrLost)
		case <-lctx.Done():
		}
	}()
	return lctx, func() { cancel(context.Canceled) }
}

// Explain says that err came of libvirtd going away, where it did: a call cut short by
// the connection's end, a connection refused by a libvirtd that is not running. Such an
// error is ErrLost's, with err after it; any other err is returned as it is.
func Explain(err error) error {
	if err == nil || errors.Is(err, ErrLost) {
		return err
	}
	var op *net.OpError
	refused := errors.As(err, &op) && op.Op == "dial" && (errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT))
	if refused || errors.Is(err, libvirt.ErrInterrupted) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
		return fmt.Errorf("%w: %w", ErrLost, err)
	}
	return err
}

// disconnecter is a client that says when its connection ended: go-libvirt's, and
// provisiontest's fake (Drop).
type disconnecter interface{ Disconnected() <-chan struct{} }

// disconnected is closed once the connection has ended; nil where the client cannot
// tell.
func (c *Conn) disconnected() <-chan struct{} {
	if c.lv != nil {
		return c.lv.Disconnected()
	}
	return c.ended
}

// IsLost tells whether the connection to libvirtd has ended, other than by this Conn's
// own drop (a cancel's).
func (c *Conn) IsLost() bool {
	lost := c.disconnected()
	if lost == nil || c.dropped.Load() {
		return false
	}
	select {
	case <-lost:
		return true
	default:
		return false
	}
}

// lossSeen bounds how long LostBy waits for go-libvirt to say that the connection ended.
const lossSeen = time.Second

// LostBy tells whether err, a call's failure, came of the connection's end (IsLost).
// go-libvirt closes its socket first and says that the connection ended a moment later;
// a call in that moment fails with the socket's EINVAL ("invalid argument"), for which
// LostBy waits up to lossSeen for the end to be said (the soak found a stage's status
// call over the agent failing so, its connection not yet lost).
func (c *Conn) LostBy(err error) bool {
	if c.IsLost() {
		return true
	}
	lost := c.disconnected()
	if err == nil || !errors.Is(err, syscall.EINVAL) || lost == nil {
		return false
	}
	t := time.NewTimer(lossSeen)
	defer t.Stop()
	select {
	case <-lost:
		return !c.dropped.Load()
	case <-t.C:
		return false
	}
}

// API is the client, for the guest package's agent transport.
func (c *Conn) API() API { return c.api }

// NewConn is a Conn over a as it is (provisiontest's fake, say): no socket, nothing to
// drop on a cancel.
func NewConn(a API) *Conn {
	c := &Conn{api: a, grace: CancelGrace}
	c.redial = func(context.Context) (*Conn, error) { return NewConn(a), nil }
	if d, ok := a.(disconnecter); ok {
		c.ended = d.Disconnected() // this connection's end, not a later one's
	}
	return c
}

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
	if c.inflight == 0 {
		for _, ch := range c.settled {
			close(ch)
		}
		c.settled = nil
	}
	c.mu.Unlock()
	if idle {
		c.dropNow()
	}
	return err
}

// Settled returns a channel that is closed once no call that creates something is in
// flight: at once if none is, or when the last one returns. A cancelled launch's
// rollback counts its time from then, not from the cancel: what such a call made is
// known only once it has returned.
func (c *Conn) Settled() <-chan struct{} {
	ch := make(chan struct{})
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.inflight == 0 {
		close(ch)
		return ch
	}
	c.settled = append(c.settled, ch)
	return ch
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

// HasCode tells whether err carries a libvirt error with one of codes.
func HasCode(err error, codes ...libvirt.ErrorNumber) bool {
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
