package provision

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/guest"
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
	Dial func(ctx context.Context, uri string) (*Conn, error)
	// Launcher makes instances; nil is a cold boot (ColdBoot).
	Launcher Launcher
	Pool     string // the storage pool of the overlays
	// Prefix names the instances of this configuration: capacity counts them, gc sweeps them.
	Prefix          string
	Limits          Limits
	MaxAge          time.Duration // gc removes instances older than this; 0: no limit
	BootTimeout     time.Duration // bounds a launch's waits: for capacity, for the guest
	AllowHostAccess bool          // templates may give instances host devices and shares
	SSHUser         string        // the guest user of the ssh transport
	// SecretFile is the host secret instances' SSH client keys derive from; the capacity
	// lock lives beside it.
	SecretFile string
	// Helper is the gitlab-runner binary every instance gets, read-only on its PATH; ""
	// for none.
	Helper string
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
	// Version is this tool's: a new version makes new warm images.
	Version string
	Log     *slog.Logger
	Out     io.Writer // what gc --dry-run would remove
}

// Connect connects to the hypervisor.
func (h *Host) Connect(ctx context.Context) (*Conn, error) {
	if h.Dial != nil {
		return h.Dial(ctx, h.URI)
	}
	return Connect(ctx, h.URI)
}

// reconnect connects, trying for reconnectTime: libvirtd may be restarting (that may be
// why a launch failed).
func (h *Host) reconnect(ctx context.Context) (*Conn, error) {
	start := time.Now()
	conn, err := h.Connect(ctx)
	for err != nil && time.Since(start) < reconnectTime && guest.Sleep(ctx, 250*time.Millisecond) {
		conn, err = h.Connect(ctx)
	}
	return conn, err
}

// lingering returns a context that ends d after ctx does.
func lingering(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	lctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
	stop := context.AfterFunc(ctx, func() {
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

	mac    string // of the ssh NIC
	helper string // the helper's volume
	// warmImage: the instance is the one a warm image of this name is saved from
	// (makeWarm): its volumes are named by the image.
	warmImage string
	// identity makes a restored instance's guest its own; links are the MAC addresses of
	// its NICs whose link comes up once it has.
	identity *guest.Identity
	links    []string
}

// ErrNotOffered: the template is neither marked nor offered by the operator. The same
// answer whether or not a domain of that name exists.
var ErrNotOffered = errors.New("template not offered")

// DiskTooSmallError: a request for a disk smaller than its template's.
type DiskTooSmallError struct{ Asked, Have uint64 }

func (e *DiskTooSmallError) Error() string {
	return fmt.Sprintf("disk of %s asked, smaller than the template's (%s); a disk can only grow", FormatSize(e.Asked), FormatSize(e.Have))
}

// Launch makes the instance req asks for, starts it and waits until its transport
// answers. Whatever fails, it removes what it made, and only that: after a cancel too,
// for up to AfterCancel.
func (h *Host) Launch(ctx context.Context, req Request) (err error) {
	begin := time.Now()
	after, cancelAfter := lingering(ctx, AfterCancel)
	defer cancelAfter()
	conn, err := h.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()

	// Orphans of crashed runners go first: they may hold the room this one needs.
	if err := h.sweep(ctx, conn); err != nil {
		return err
	}
	tx, tmpl, err := h.template(conn, req)
	if err != nil {
		return err
	}

	// A crash can leave an instance of this name behind: the caller's is removed, anyone
	// else's left alone.
	removed, err := conn.Teardown(ctx, req.Name, req.Replace)
	if errors.Is(err, ErrNotManaged) {
		return fmt.Errorf("a domain named %q exists and was not created by libvirt-gci; refusing to replace it", req.Name)
	}
	if err != nil {
		return fmt.Errorf("remove leftover instance %q: %w", req.Name, err)
	}
	if removed.Domain {
		h.Log.Info(fmt.Sprintf("removed leftover instance %s", req.Name))
	}

	if req.Size.Disk > 0 && len(tmpl.Disks) > 0 {
		if have, known, err := conn.BackingCapacity(tmpl.Disks[0].Path); err != nil {
			return err
		} else if known && req.Size.Disk < have {
			return &DiskTooSmallError{Asked: req.Size.Disk, Have: have}
		}
	}
	if h.Helper != "" {
		// Bounded like the other waits: another prepare may be building it.
		hctx, cancel := h.bootTimeout(ctx)
		req.helper, err = h.helperVolume(hctx, conn, h.Helper)
		cancel()
		if err != nil {
			return err
		}
	}
	var wi *WarmImage
	if h.Start == StartRestore {
		wctx, cancel := h.bootTimeout(ctx)
		var why string
		wi, why, err = h.warmFor(wctx, conn, req, tx, tmpl)
		cancel()
		var notSaved *notSavedError
		switch {
		case errors.As(err, &notSaved) && ctx.Err() == nil:
			h.Log.Warn(fmt.Sprintf("no warm image of %s (%v); booting %s instead (LIBVIRT_GCI_START=boot says so at once)", req.Template, err, req.Name))
		case err != nil:
			return err
		case wi == nil:
			h.Log.Info(fmt.Sprintf("booting %s: %s", req.Name, why))
		}
	}
	prepareID := randomHex(8)
	var spec Spec
	memKiB := tmpl.MemoryKiB()
	if wi != nil {
		var macs []template.MACChange
		if spec, macs, err = h.restoredSpec(conn, req, wi, prepareID); err != nil {
			return err
		}
		memKiB = wi.MemKiB
		req.identity = &guest.Identity{MachineID: randomHex(16)}
		for _, m := range macs {
			req.identity.MACs = append(req.identity.MACs, [2]string{m.Old, m.New})
			if m.Link {
				req.links = append(req.links, m.New)
			} else if h.needsSSH(req) {
				req.mac = m.New // the ssh NIC
			}
		}
	} else {
		if h.needsSSH(req) {
			req.mac = sshMAC()
		}
		if spec, err = h.spec(req, tmpl, prepareID); err != nil {
			return err
		}
		if req.Size.Memory > 0 {
			memKiB = req.Size.Memory / 1024
		}
	}
	actx, cancelAdmit := h.bootTimeout(ctx)
	release, err := h.admit(actx, conn, memKiB)
	cancelAdmit()
	if err != nil {
		return err
	}
	// From here on, a failure leaves something to remove: what this launch made, and
	// nothing another launch of the same name made meanwhile.
	defer func() {
		if err != nil {
			h.rollback(after, req.Name, prepareID)
		}
	}()
	var launcher Launcher = ColdBoot{}
	if h.Launcher != nil {
		launcher = h.Launcher
	}
	if wi != nil {
		launcher = restore{}
	}
	tm, err := launcher.Launch(ctx, conn, spec)
	release()
	h.warnIfSlow("define", req.Name, tm.Define)
	if err != nil {
		return err
	}
	if wi != nil {
		h.Log.Info(fmt.Sprintf("restored %s into %s from %s in %d ms (define %d ms, %d overlays %d ms, memory image copy %d ms, restore %d ms)",
			req.Template, req.Name, wi.Name, (tm.Define+tm.Clone+tm.Image+tm.Start).Milliseconds(), tm.Define.Milliseconds(), len(spec.Volumes), tm.Clone.Milliseconds(), tm.Image.Milliseconds(), tm.Start.Milliseconds()),
			"template", req.Template, "name", req.Name, "warm", wi.Name, "define_ms", tm.Define.Milliseconds(), "clone_ms", tm.Clone.Milliseconds(),
			"image_ms", tm.Image.Milliseconds(), "restore_ms", tm.Start.Milliseconds())
	} else {
		sized := ""
		if req.Size != (Size{}) {
			sized = " (" + req.Size.String() + ")"
		}
		h.Log.Info(fmt.Sprintf("cloned %s into %s%s in %d ms (define %d ms, %d overlays %d ms), started in %d ms",
			req.Template, req.Name, sized, (tm.Define+tm.Clone).Milliseconds(), tm.Define.Milliseconds(), len(spec.Volumes), tm.Clone.Milliseconds(), tm.Start.Milliseconds()),
			"template", req.Template, "name", req.Name, "define_ms", tm.Define.Milliseconds(), "clone_ms", tm.Clone.Milliseconds(), "start_ms", tm.Start.Milliseconds(),
			"cpus", req.Size.CPUs, "memory", req.Size.Memory, "disk", req.Size.Disk)
	}

	if err := h.awaitReady(ctx, conn, req, begin); err != nil {
		return fmt.Errorf("instance %q: %w", req.Name, err)
	}
	return nil
}

// template finds the template req names and checks that an instance can be made of it.
// It returns the template's XML, too.
func (h *Host) template(conn *Conn, req Request) (string, *template.Template, error) {
	lookupStart := time.Now()
	tx, marked, err := conn.TemplateXML(req.Template)
	if errors.Is(err, ErrNoTemplate) && h.BaseImages.Source != "" {
		// A base image: offered by being where the operator put it.
		if tx, err = h.baseImageXML(conn, req.Template); err == nil {
			marked = true
		}
	}
	h.warnIfSlow("template lookup", req.Template, time.Since(lookupStart))
	if !req.Offered && !marked && (err == nil || errors.Is(err, ErrNoTemplate) || errors.Is(err, ErrNotTemplate)) {
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
	if access := tmpl.HostAccess(); len(access) > 0 && !h.AllowHostAccess {
		return "", nil, fmt.Errorf("template %q has %s: through it a job's VM reaches the host or other VMs; remove it from the template, or allow it with LIBVIRT_GCI_ALLOW_HOST_ACCESS=true",
			req.Template, strings.Join(access, ", "))
	}
	if !tmpl.HasAgent {
		return "", nil, fmt.Errorf("template %q has no guest agent channel; add <channel type='unix'><target type='virtio' name='%s'/></channel> to its devices", req.Template, template.AgentChannel)
	}
	return tx, tmpl, nil
}

// awaitReady waits, within the boot timeout, until the guest is ready for the job (see
// ready.go): its agent answers, systemd (where it runs) has finished booting, the guest
// is set up, each NIC of the template's has its address, and SSH answers if that is the
// transport. Its last line says how long the launch that began then took.
func (h *Host) awaitReady(ctx context.Context, conn *Conn, req Request, begin time.Time) error {
	agent, err := guest.NewAgent(conn.API(), req.Name)
	if err != nil {
		return err
	}
	bootStart := time.Now()
	bctx, cancel := h.bootTimeout(ctx)
	defer cancel()
	bctx, cancelLoss := conn.WithLoss(bctx)
	defer cancelLoss()
	if err := agent.WaitReady(bctx); err != nil {
		if errors.Is(context.Cause(bctx), ErrLost) {
			return fmt.Errorf("waiting for its guest agent: %w", ErrLost)
		}
		return err
	}
	agentReady := time.Since(bootStart)
	h.Log.Info(fmt.Sprintf("guest agent ready after %.1f s", agentReady.Seconds()), "agent_ready_ms", agentReady.Milliseconds(), "ready_ms", time.Since(begin).Milliseconds())

	// Where systemd runs, its boot ends first: what the set-up changes (host keys, host
	// name) is not raced by the units that make them at boot.
	if err := h.awaitSystem(bctx, agent); err != nil {
		return err
	}

	// What the guest needs before a stage runs, through the agent, in one command.
	setupStart := time.Now()
	setup := guest.Setup{Identity: req.identity, Hostname: req.Name, HostKeys: true}
	if req.helper != "" {
		setup.Helper = &guest.Helper{Serial: HelperSerial, Dir: HelperDir, Name: "gitlab-runner"}
	}
	if req.Cache != "" {
		setup.Share = &guest.Share{Tag: CacheTag, Dir: req.CacheMount}
	}
	var access sshAccess
	if h.needsSSH(req) {
		if access, err = h.sshAccess(conn, req.Name); err != nil {
			return err
		}
		setup.NIC = &guest.NIC{MAC: req.mac, Addr: SSHGuestAddr + "/" + strings.SplitN(SSHNet, "/", 2)[1]}
		setup.SSH = &guest.SSHAccess{User: h.SSHUser, AuthorizedKey: guest.AuthorizedKey(access.key.PublicKey(), "libvirt-gci@"+req.Name)}
		for _, f := range h.Forwards {
			if host, _, err := net.SplitHostPort(f); err == nil && net.ParseIP(host) == nil {
				setup.Hosts = append(setup.Hosts, host)
			}
		}
	}
	hostKey, err := agent.Setup(bctx, setup)
	if err != nil {
		return err
	}
	did := []string{"host name " + req.Name, "its own SSH host key"}
	if id := setup.Identity; id != nil {
		rng := "its RNG reseeded"
		if !id.Reseeded {
			rng = "host randomness mixed into its RNG (no perl or python3 to reseed it at once)"
		}
		did = append(did, fmt.Sprintf("its own clock, %s, machine-id and %d MAC addresses", rng, len(id.MACs)))
		if err := conn.linksUp(req.Name, req.links); err != nil {
			return err
		}
	}
	if setup.Helper != nil {
		did = append(did, "gitlab-runner helper on its PATH")
	}
	if setup.Share != nil {
		did = append(did, fmt.Sprintf("cache %s at %s over virtiofs", req.Cache, req.CacheMount))
	}
	if setup.SSH != nil {
		did = append(did, "its NIC and user key for ssh")
	}
	if len(h.Forwards) > 0 {
		did = append(did, "forwards to "+strings.Join(h.Forwards, ", "))
	}
	h.Log.Info(fmt.Sprintf("set up the guest (%s) in %d ms", strings.Join(did, "; "), time.Since(setupStart).Milliseconds()), "setup_ms", time.Since(setupStart).Milliseconds())
	if err := h.awaitAddresses(bctx, conn, agent, req.Name); err != nil {
		return err
	}
	if setup.SSH != nil {
		sshStart := time.Now()
		if err := h.finishSSH(bctx, conn, agent, access, hostKey, req.Transport); err != nil {
			return err
		}
		h.Log.Info(fmt.Sprintf("ssh ready after %.1f s more", time.Since(sshStart).Seconds()), "ssh_ready_ms", time.Since(sshStart).Milliseconds())
	}
	h.Log.Info(fmt.Sprintf("prepared %s in %.1f s", req.Name, time.Since(begin).Seconds()), "prepare_ms", time.Since(begin).Milliseconds())
	return nil
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
	if took < SlowCall {
		return
	}
	h.Log.Warn(fmt.Sprintf("libvirt took %.1f s for the %s of %s: %s", took.Seconds(), call, name, SlowHint(h.URI)),
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
		URI:       h.URI,
	}
}

// spec lays out the instance: one overlay per writable template disk, the metadata that
// records them, and the domain XML.
func (h *Host) spec(req Request, tmpl *template.Template, prepareID string, extra ...meta.Volume) (Spec, error) {
	im := h.newMetadata(req, tmpl.Name, prepareID)
	spec := Spec{Name: req.Name}
	overlays := map[string]template.Overlay{}
	for _, d := range tmpl.Disks {
		// The prepare's id in the volume's name: no other launch's volume can be in the way.
		v := NewVolume{
			Volume:        meta.Volume{Pool: h.Pool, Name: req.Name + "-" + prepareID[:6] + "-" + d.Target + ".qcow2"},
			BackingPath:   d.Path,
			BackingFormat: d.Format,
		}
		if len(spec.Volumes) == 0 {
			v.Capacity = req.Size.Disk // the first disk: the one a job may grow
		}
		if req.warmImage != "" {
			v.Name = req.warmImage + "-" + d.Target + ".qcow2"
		}
		spec.Volumes = append(spec.Volumes, v)
		im.Volumes = append(im.Volumes, v.Volume)
		overlays[d.Target] = template.Overlay{Pool: v.Pool, Volume: v.Name}
	}
	im.Volumes = append(im.Volumes, extra...)
	md, err := im.MarshalElement()
	if err != nil {
		return spec, err
	}
	inst := template.Instance{Name: req.Name, Overlays: overlays, Metadata: md, CPUs: req.Size.CPUs, MemoryKiB: req.Size.Memory / 1024, Warm: req.warmImage != ""}
	if req.helper != "" {
		inst.ReadOnly = []template.ReadOnlyDisk{{Pool: h.Pool, Volume: req.helper, Serial: HelperSerial}}
	}
	if req.Cache != "" {
		inst.Shares = []template.Share{{Source: req.Cache, Tag: CacheTag}}
	}
	if h.needsSSH(req) {
		slot, err := tmpl.FreePCISlot()
		if err != nil {
			return spec, err
		}
		inst.QEMUArgs = sshNetArgs(slot, req.mac)
	}
	spec.DomainXML, err = tmpl.Render(inst)
	return spec, err
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

// sshMAC is a random locally administered unicast MAC address (the 52:54:00 prefix of
// QEMU's own), for the NIC of one ssh instance.
func sshMAC() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2])
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
	conn, err := h.reconnect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	r, err := conn.Teardown(ctx, name, allow)
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

// List lists every instance of ours, whatever its name or prefix.
func (h *Host) List(ctx context.Context) ([]InstanceInfo, error) {
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
