// Package provision is the lifecycle façade: a Host per libvirt (a Fleet of them)
// launches an instance with a strategy (restore from a warm image, or a cold boot),
// waits until its guest is ready, opens sessions to run stages in it, and ends,
// keeps or collects it; and it checks a host (doctor) and reads its inventory. It asks
// libvirt through provision/libvirt and the guest through guest.
package provision

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// CacheTag is the virtiofs tag of the cache share.
const CacheTag = "gci-cache"

// AfterCancel bounds what the lifecycle still does after its context ends (the runner's
// SIGTERM): a rollback removes what a launch made, a session kills its script and reads
// the last of its output, a removal goes on. Well under a second on a healthy host; a
// stalled libvirtd or guest gets no more than this, so that every stage exits within 5 s.
const AfterCancel = 4 * time.Second

// teardownTime bounds a removal or a rollback.
const teardownTime = 2 * time.Minute

// reconnectTime is how long a removal or a rollback tries to reach libvirtd.
const reconnectTime = 10 * time.Second

// Host is the lifecycle of instances on one libvirt: launching them (with the rollback
// of a failed launch), reaching them (Open), removing them, listing and sweeping them,
// and admitting new ones under the host's capacity. The executor says which instance,
// of which template, for whom; Host knows how.
type Host struct {
	URI string
	// Dial connects to libvirt; nil is Connect. Tests give provisiontest's fake here.
	Dial func(ctx context.Context, uri string) (*libvirt.Conn, error)
	Config
	// Version is this tool's: a new version makes new warm images.
	Version string
	Log     *slog.Logger
	Out     io.Writer // what gc --dry-run would remove
}

// Config is how the operator set up the lifecycle (LIBVIRT_GCI_*), the same for every
// host: the executor's settings embed it.
type Config struct {
	Pool string // the storage pool of the overlays
	// Prefix names the instances of this configuration: capacity counts them, gc sweeps them.
	Prefix string
	Limits Limits
	MaxAge time.Duration // gc removes instances older than this; 0: no limit
	// JobGrace: gc removes a job's instance this long after its job's timeout has passed
	// (meta.Metadata.JobDeadline): its cleanup never came. 0: not by this rule.
	JobGrace        time.Duration
	BootTimeout     time.Duration // bounds a launch's waits: for capacity, for the guest
	AllowHostAccess bool          // templates may give instances host devices and shares
	SSHUser         string        // the guest user of the ssh transport
	// SecretFile is the host secret instances' SSH client keys derive from; the capacity
	// lock lives beside it.
	SecretFile string
	// Forwards are TCP services (host:port) the guest reaches at 127.0.0.1 and the same
	// port (a host name resolves to 127.0.0.1 in the guest) while a stage runs, through
	// its SSH connection (guest.Forwards): then every instance gets ssh access, whatever
	// its transport.
	Forwards []string
	// Start is how instances start: StartBoot, or StartRestore (from warm images).
	Start string
	// BaseImages are the Python libvirt-gci's templates (LIBVIRT_GCI_BASE_IMAGES); zero:
	// none.
	BaseImages BaseImages
}

// Connect connects to the hypervisor.
func (h *Host) Connect(ctx context.Context) (*libvirt.Conn, error) {
	if h.Dial != nil {
		return h.Dial(ctx, h.URI)
	}
	return libvirt.Connect(ctx, h.URI)
}

// reconnect connects, trying for reconnectTime: libvirtd may be restarting (that may be
// why a launch failed).
func (h *Host) reconnect(ctx context.Context) (*libvirt.Conn, error) {
	start := time.Now()
	conn, err := h.Connect(ctx)
	for err != nil && time.Since(start) < reconnectTime && sleep(ctx, 250*time.Millisecond) {
		conn, err = h.Connect(ctx)
	}
	return conn, err
}

// lingering returns a context that ends d after ctx does.
func lingering(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return lingeringPast(ctx, nil, d)
}

// lingeringPast returns a context that ends d after ctx does and conn (if not nil) has
// settled (no call that creates something in flight; see libvirt.CancelGrace, which
// bounds that wait): a rollback after a cancel gets its d once it knows what the calls
// made.
func lingeringPast(ctx context.Context, conn *libvirt.Conn, d time.Duration) (context.Context, context.CancelFunc) {
	lctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
		if conn != nil {
			t := time.NewTimer(CancelGrace)
			defer t.Stop()
			select {
			case <-conn.Settled():
			case <-t.C:
			case <-lctx.Done():
				return
			}
		}
		time.AfterFunc(d, func() { cancel(fmt.Errorf("%w, and %s more passed", context.Cause(ctx), d)) })
	})
	return lctx, func() { stop(); cancel(context.Canceled) }
}

// Request is an instance to launch.
type Request struct {
	Name     string
	Template string
	// Offered: the operator offers the template by name or pattern. Otherwise it must
	// carry the template mark.
	Offered bool
	Owner   meta.Owner
	Process *meta.Process // the process whose cleanup stage will come; nil: by hand
	// Replace says whether a leftover instance of Name may be removed first; an error
	// says whose it is.
	Replace   func(meta.Metadata) error
	Size      Size
	Transport string // meta.TransportAgent or meta.TransportSSH
	// Cache is a host directory the guest gets, writable, at CacheMount (the job's cache
	// directory); "" for none.
	Cache, CacheMount string
	// Helper is the gitlab-runner binary the instance gets, read-only on its PATH; ""
	// for none.
	Helper string
	// JobTimeout is the job's timeout, from the runner's job response: the job is over
	// by the time it has passed since prepare. 0: unknown (by hand).
	JobTimeout time.Duration
}

// ErrNotOffered: the template is neither marked nor offered by the operator. The same
// answer whether or not a domain of that name exists.
var ErrNotOffered = errors.New("template not offered")

// DiskTooSmallError: a request for a disk smaller than its template's.
type DiskTooSmallError struct{ Asked, Have uint64 }

func (e *DiskTooSmallError) Error() string {
	return fmt.Sprintf("disk of %s asked, smaller than the template's (%s); a disk can only grow", FormatSize(e.Asked), FormatSize(e.Have))
}

// template finds the template req names and checks that an instance can be made of it.
// It returns the template's XML, too.
func (h *Host) template(ctx context.Context, conn *libvirt.Conn, req Request) (string, *template.Template, error) {
	lookupStart := time.Now()
	tx, marked, err := conn.TemplateXML(req.Template)
	if errors.Is(err, libvirt.ErrNoTemplate) && h.BaseImages.Source != "" {
		// A base image: offered by being where the operator put it.
		if tx, err = h.baseImageXML(ctx, conn, req.Template); err == nil {
			marked = true
		}
	}
	h.warnIfSlow("template lookup", req.Template, time.Since(lookupStart))
	if !req.Offered && !marked && (err == nil || errors.Is(err, libvirt.ErrNoTemplate) || errors.Is(err, libvirt.ErrNotTemplate)) {
		// Whether or not such a domain exists: a job learns nothing of the host's other VMs.
		return "", nil, fmt.Errorf("template %q: %w", req.Template, ErrNotOffered)
	}
	if err != nil {
		return "", nil, err
	}
	tmpl, err := template.Parse(tx)
	if err != nil {
		return "", nil, err
	}
	access := tmpl.HostAccess()
	if !h.AllowHostAccess {
		nets, err := conn.NetworkHostAccess(tx)
		if err != nil {
			return "", nil, fmt.Errorf("template %q: %w", req.Template, err)
		}
		access = append(access, nets...)
	}
	if len(access) > 0 && !h.AllowHostAccess {
		return "", nil, fmt.Errorf("template %q has %s: through it a job's VM reaches the host or other VMs; remove it from the template, or allow it with LIBVIRT_GCI_ALLOW_HOST_ACCESS=true",
			req.Template, strings.Join(access, ", "))
	}
	if !tmpl.HasAgent {
		return "", nil, fmt.Errorf("template %q has no guest agent channel; add <channel type='unix'><target type='virtio' name='%s'/></channel> to its devices", req.Template, template.AgentChannel)
	}
	return tx, tmpl, nil
}

// needsSSH tells whether the instance gets ssh access: for its transport, or for the
// forwards.
func (h *Host) needsSSH(req Request) bool {
	return req.Transport == meta.TransportSSH || len(h.Forwards) > 0
}

// bootTimeout bounds a wait of a launch's (for capacity, for the guest) by BootTimeout,
// and says so when it ends.
func (h *Host) bootTimeout(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeoutCause(ctx, h.BootTimeout, fmt.Errorf("boot timeout %s (LIBVIRT_GCI_BOOT_TIMEOUT) passed", h.BootTimeout))
}

// warnIfSlow says so when a libvirt call that takes milliseconds on a healthy host took
// seconds, and why that usually is.
func (h *Host) warnIfSlow(call, name string, took time.Duration) {
	if took < libvirt.SlowCall {
		return
	}
	h.Log.Warn(fmt.Sprintf("libvirt took %.1f s for the %s of %s: %s", took.Seconds(), call, name, libvirt.SlowHint(h.URI)),
		"call", call, "ms", took.Milliseconds())
}

// newMetadata is a new instance's metadata, before its volumes.
func (h *Host) newMetadata(req Request, tmpl, prepareID string) meta.Metadata {
	return meta.Metadata{
		Template:  tmpl,
		Owner:     req.Owner,
		PrepareID: prepareID,
		CreatedAt: time.Now().UTC().Format(time.RFC3339),
		Process:   req.Process,
		JobDeadline: func() string {
			if req.JobTimeout <= 0 {
				return ""
			}
			return time.Now().Add(req.JobTimeout).UTC().Format(time.RFC3339)
		}(),
		Prepare: ProcessOf(os.Getpid()),
		URI:     h.URI,
	}
}

// The network of the NIC an ssh instance gets: QEMU user-mode networking on a subnet of
// its own, away from 10.0.2.0/24, which a template's own user-mode NIC has (two NICs on
// one subnet would send the forward's replies out of the wrong one).
const (
	SSHNet       = "10.213.213.0/24"
	SSHGuestAddr = "10.213.213.15" // the guest's address on it (QEMU's DHCP hands out the same)
)

// sshNetArgs give an ssh instance a NIC (with the MAC address mac) on QEMU's user-mode
// network that reaches nothing but the host (restrict=on), and forward a free port on
// the host's 127.0.0.1 (port 0: the kernel picks one, so concurrent launches cannot
// collide) to the guest's sshd. The NIC goes in a PCI slot the template leaves free:
// libvirt does not place devices it did not make. The guest need not configure it:
// the launch does, through the agent, found by its MAC (SetupSSH).
func sshNetArgs(slot int, mac string) []string {
	return []string{
		"-netdev", fmt.Sprintf("user,id=gcissh,restrict=on,net=%s,dhcpstart=%s,hostfwd=tcp:127.0.0.1:0-%s:22", SSHNet, SSHGuestAddr, SSHGuestAddr),
		"-device", fmt.Sprintf("virtio-net-pci,netdev=gcissh,addr=0x%x,mac=%s", slot, mac),
	}
}

// rollback removes a half-made instance: only the one this launch (prepareID) made. It
// runs on a connection of its own (the launch's closes with the cancel), with ctx ending
// AfterCancel after the cancel.
func (h *Host) rollback(ctx context.Context, name, prepareID string) {
	err := h.teardown(ctx, name, func(m meta.Metadata) error {
		if m.PrepareID != prepareID {
			return fmt.Errorf("instance %q was made by another prepare (%s), not this one (%s); leaving it alone", name, m.PrepareID, prepareID)
		}
		return nil
	})
	if err != nil {
		h.Log.Error(fmt.Sprintf("could not remove %s after the failed prepare: %v", name, err))
	}
}

// Remove destroys the instance name and deletes its volumes, if allow agrees (nil: any
// instance of ours). It is idempotent (no instance is fine), goes on for AfterCancel
// after a cancel, waits up to 10 s for libvirtd to come back, and refuses a domain
// without our metadata (ErrNotManaged).
func (h *Host) Remove(ctx context.Context, name string, allow func(meta.Metadata) error) error {
	after, cancel := lingering(ctx, AfterCancel)
	defer cancel()
	return h.teardown(after, name, allow)
}

func (h *Host) teardown(ctx context.Context, name string, allow func(meta.Metadata) error) error {
	ctx, cancel := context.WithTimeoutCause(ctx, teardownTime, fmt.Errorf("teardown took longer than %s", teardownTime))
	defer cancel()
	start := time.Now()
	r, err := h.teardownOnce(ctx, name, allow)
	// libvirtd restarted under the removal: again on a new connection, once it is back
	// (each try's connect waits reconnectTime for it), within teardownTime.
	for errors.Is(libvirt.Explain(err), libvirt.ErrLost) && ctx.Err() == nil && sleep(ctx, 250*time.Millisecond) {
		h.Log.Info(fmt.Sprintf("lost libvirtd while removing %s (%v); again on a new connection", name, err))
		r, err = h.teardownOnce(ctx, name, allow)
	}
	if err != nil {
		return err
	}
	if r.Domain {
		h.Log.Info(fmt.Sprintf("removed %s and %d volumes in %d ms", name, len(r.Volumes), time.Since(start).Milliseconds()))
	} else {
		h.Log.Info(fmt.Sprintf("no instance %s; nothing to remove", name))
	}
	return nil
}

// teardownOnce is one try of teardown, on a connection of its own.
func (h *Host) teardownOnce(ctx context.Context, name string, allow func(meta.Metadata) error) (libvirt.Removed, error) {
	conn, err := h.reconnect(ctx)
	if err != nil {
		return libvirt.Removed{}, err
	}
	defer conn.Close()
	return conn.Teardown(ctx, name, allow)
}

// List lists every instance of ours, whatever its name or prefix.
func (h *Host) List(ctx context.Context) ([]libvirt.Instance, error) {
	conn, err := h.Connect(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return conn.Instances()
}

// randomHex is n random bytes in hex.
func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// sleep waits d or until ctx ends; it reports whether it slept the whole time.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
