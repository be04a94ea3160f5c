package libvirt

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

var (
	// ErrNoTemplate: no domain has the template's name.
	ErrNoTemplate = errors.New("no such template")
	// ErrNotManaged: the domain exists but was not created by libvirt-gci; it is never touched.
	ErrNotManaged = errors.New("not a libvirt-gci instance")
	// ErrNoInstance: no domain has the instance's name.
	ErrNoInstance = errors.New("no such instance")
	// ErrNotTemplate: the domain exists but cannot be a template (it runs, or is an instance).
	ErrNotTemplate = errors.New("not usable as a template")
)

// NewVolume is an overlay volume to create: a qcow2 file whose backing file is a template disk.
type NewVolume struct {
	meta.Volume
	BackingPath   string
	BackingFormat string // stated, or libvirt writes "raw" into the overlay
	Capacity      uint64 // bytes; 0: the backing file's size
}

// Spec is an instance to create. DomainXML must carry Metadata listing every volume in
// Volumes, so that a crash at any point leaves a domain whose metadata says what to delete.
type Spec struct {
	Name      string
	DomainXML string
	Volumes   []NewVolume
	// A restored instance (Restore): Warm is the save image it is restored from, Image
	// its copy of it, and Restored its metadata once the copy is deleted.
	Warm     *SaveImage
	Image    meta.Volume
	Restored *meta.Metadata
	// Made, if set, is called once the domain is defined and its overlays made: from then
	// on a listing of the instances shows it with its volumes.
	Made func()
}

// Timings of one Create, for progress lines and benchmarks.
type Timings struct {
	Define, Clone, Start time.Duration
	Image                time.Duration // a restore's own copy of the memory image (Start: the restore)
	Streamed             bool          // the restore read the shared memory image through a pipe: no copy
	Attach               time.Duration // devices attached after a restore
	Grow                 time.Duration // the disk grown after a restore
	Reserve              time.Duration // its addresses reserved on its networks
	Addresses            []Reservation // what Reserve gave it
}

// Create defines the domain, creates its overlay volumes and starts it, in that order: the
// domain (and its metadata) exists before anything else does. On error the caller must
// Teardown the name; Create leaves whatever it made for that.
//
// When ctx ends, Create makes no further call, and it returns only once libvirt has
// answered the call in flight (within CancelGrace): what that call made is then in
// libvirt for the Teardown to find. It returns an error wrapping the cancel's cause.
func (c *Conn) Create(ctx context.Context, spec Spec) (Timings, error) {
	var t Timings
	dom, err := c.defineWithOverlays(ctx, spec, &t)
	if err != nil {
		return t, err
	}
	// Its addresses, before the guest asks for one, and the filter that holds its NICs to
	// them.
	if err := c.reserveTimed(ctx, dom, spec, &t); err != nil {
		return t, err
	}
	if len(t.Addresses) > 0 {
		if err := c.filter(ctx, dom, spec.Name, t.Addresses, &t); err != nil {
			return t, err
		}
	}
	err = c.step(ctx, spec.Name, fmt.Sprintf("start %q", spec.Name), &t.Start, func() error { return c.api.DomainCreate(dom) })
	return t, err
}

// defineWithOverlays defines spec's domain and creates its overlays, as Create does.
func (c *Conn) defineWithOverlays(ctx context.Context, spec Spec, t *Timings) (libvirt.Domain, error) {
	var dom libvirt.Domain
	pools := map[string]libvirt.StoragePool{}
	for _, v := range spec.Volumes {
		if _, ok := pools[v.Pool]; ok {
			continue
		}
		p, err := c.api.StoragePoolLookupByName(v.Pool)
		if err != nil {
			return dom, fmt.Errorf("storage pool %q: %w", v.Pool, err)
		}
		pools[v.Pool] = p
	}
	err := c.step(ctx, spec.Name, fmt.Sprintf("define %q", spec.Name), &t.Define, func() (err error) {
		dom, err = c.api.DomainDefineXMLFlags(spec.DomainXML, libvirt.DomainDefineValidate)
		return err
	})
	if err != nil {
		return dom, err
	}
	for _, v := range spec.Volumes {
		x, err := overlayXML(v)
		if err != nil {
			return dom, err
		}
		err = c.step(ctx, spec.Name, fmt.Sprintf("create overlay %q on %q in pool %q", v.Name, v.BackingPath, v.Pool), &t.Clone, func() error {
			_, err := c.api.StorageVolCreateXML(pools[v.Pool], x, 0)
			return err
		})
		if err != nil {
			return dom, err
		}
	}
	if spec.Made != nil {
		spec.Made()
	}
	return dom, nil
}

// filter puts the job filter on the NICs of the defined (not running) domain dom that
// have the reservations rs.
func (c *Conn) filter(ctx context.Context, dom libvirt.Domain, name string, rs []Reservation, t *Timings) error {
	x, err := c.api.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if err != nil {
		return fmt.Errorf("definition of %q: %w", name, err)
	}
	if x, err = filtered(x, rs); err != nil {
		return fmt.Errorf("definition of %q: %w", name, err)
	}
	return c.step(ctx, name, fmt.Sprintf("define %q with its network filter", name), &t.Reserve, func() error {
		_, err := c.api.DomainDefineXMLFlags(x, libvirt.DomainDefineValidate)
		return err
	})
}

// reserveTimed reserves the addresses of dom's NICs (Reserve), timed in t.
func (c *Conn) reserveTimed(ctx context.Context, dom libvirt.Domain, spec Spec, t *Timings) error {
	start := time.Now()
	addrs, err := c.Reserve(ctx, dom, spec.Name)
	t.Reserve, t.Addresses = time.Since(start), addrs
	return err
}

// step runs one call of the making of the instance name that creates something,
// awaited even if ctx ends meanwhile, and adds the time it took to took.
func (c *Conn) step(ctx context.Context, name, what string, took *time.Duration, call func() error) error {
	if ctx.Err() != nil {
		return fmt.Errorf("%s: not started: %w", what, context.Cause(ctx))
	}
	start := time.Now()
	err := c.awaited(call)
	*took += time.Since(start)
	if err != nil && ctx.Err() != nil && errors.Is(err, libvirt.ErrInterrupted) {
		return fmt.Errorf("%s: outcome unknown: libvirt did not answer within %s of the cancel; "+
			"if the call completes later, `libvirt-gci cleanup --machine %s` removes what it made: %w", what, c.grace, name, err)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	if ctx.Err() != nil {
		return fmt.Errorf("%s: done, but cancelled meanwhile: %w", what, context.Cause(ctx))
	}
	return nil
}

func overlayXML(v NewVolume) (string, error) {
	vol := libvirtxml.StorageVolume{
		Name: v.Name,
		// No capacity: the overlay takes its backing file's size.
		Target: &libvirtxml.StorageVolumeTarget{
			Format: &libvirtxml.StorageVolumeTargetFormat{Type: "qcow2"},
			Compat: "1.1",
		},
		BackingStore: &libvirtxml.StorageVolumeBackingStore{
			Path:   v.BackingPath,
			Format: &libvirtxml.StorageVolumeTargetFormat{Type: v.BackingFormat},
		},
	}
	if v.Capacity > 0 {
		vol.Capacity = &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: v.Capacity}
	}
	x, err := vol.Marshal()
	if err != nil {
		return "", fmt.Errorf("overlay %q XML: %w", v.Name, err)
	}
	return x, nil
}

// monitorHMP is VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP (libvirt-qemu.h), which go-libvirt lacks.
const monitorHMP = 1

// ForwardedPort asks QEMU which host port its user-mode network forwards to the guest's
// port guestPort (the host side is bound with port 0, so the kernel picks a free one).
func (c *Conn) ForwardedPort(name string, guestPort int) (int, error) {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return 0, fmt.Errorf("look up instance %q: %w", name, err)
	}
	out, err := c.api.QEMUDomainMonitorCommand(dom, "info usernet", monitorHMP)
	if err != nil {
		return 0, fmt.Errorf("instance %q: info usernet: %w", name, err)
	}
	return parseForward(out, guestPort)
}

// parseForward finds a host forward to guestPort in the output of QEMU's `info usernet`:
//
//	TCP[HOST_FORWARD]   3       127.0.0.1 41639       10.0.2.15    22     0     0
func parseForward(usernet string, guestPort int) (int, error) {
	for _, line := range strings.Split(usernet, "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || f[0] != "TCP[HOST_FORWARD]" || f[2] != "127.0.0.1" || f[5] != strconv.Itoa(guestPort) {
			continue
		}
		if port, err := strconv.Atoi(f[3]); err == nil && port > 0 && port < 65536 {
			return port, nil
		}
	}
	return 0, fmt.Errorf("no forward from 127.0.0.1 to guest port %d in QEMU's user network: %q", guestPort, usernet)
}

// Removed says what a Teardown removed.
type Removed struct {
	Domain    bool // the domain existed and was undefined
	Destroyed bool // it was running
	Volumes   []string
}

// Teardown destroys the instance name, deletes the volumes its metadata lists and
// undefines it. It is idempotent: an absent domain, a stopped one and volumes already gone
// are fine. It refuses domains without libvirt-gci metadata, and any whose metadata allow
// (if not nil) refuses: then it touches nothing and returns allow's error. If a volume
// cannot be deleted the domain stays defined, so a later Teardown still knows about it.
// ctx bounds its wait for a volume libvirtd is still creating.
func (c *Conn) Teardown(ctx context.Context, name string, allow func(meta.Metadata) error) (Removed, error) {
	var r Removed
	dom, im, ok, err := c.owned(name, "tear down", allow)
	if !ok {
		return r, err
	}
	err = c.api.DomainDestroyFlags(dom, libvirt.DomainDestroyDefault)
	switch {
	case err == nil:
		r.Destroyed = true
	case HasCode(err, libvirt.ErrOperationInvalid): // not running
	case HasCode(err, libvirt.ErrNoDomain):
		return r, nil // removed by someone else meanwhile
	default:
		return r, fmt.Errorf("destroy %q: %w", name, err)
	}

	var errs []error
	// What it holds on its networks, read from its definition: kept until that is given
	// back, so that a later Teardown still knows it.
	x, err := c.api.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if HasCode(err, libvirt.ErrNoDomain) {
		return r, nil
	}
	if err != nil {
		return r, fmt.Errorf("definition of %q: %w", name, err)
	}
	if err := c.Unreserve(name, x); err != nil {
		errs = append(errs, err)
	}
	for _, v := range im.Volumes {
		deleted, err := c.deleteVolume(ctx, v)
		if err != nil {
			errs = append(errs, err)
		} else if deleted {
			r.Volumes = append(r.Volumes, v.Name)
		}
	}
	if len(errs) > 0 {
		return r, fmt.Errorf("tear down %q: %w", name, errors.Join(errs...))
	}

	flags := libvirt.DomainUndefineNvram | libvirt.DomainUndefineManagedSave |
		libvirt.DomainUndefineSnapshotsMetadata | libvirt.DomainUndefineCheckpointsMetadata
	if err := c.api.DomainUndefineFlags(dom, flags); err != nil && !HasCode(err, libvirt.ErrNoDomain) {
		return r, fmt.Errorf("undefine %q: %w", name, err)
	}
	r.Domain = true
	return r, nil
}

// End marks the instance name ending (at now) and pauses it, if allow agrees; it returns
// its prepare ID, or "" if there is no such domain. An instance that is not running
// (shut off, crashed) is marked only.
func (c *Conn) End(name string, allow func(meta.Metadata) error, now time.Time, ender *meta.Process) (string, error) {
	dom, m, ok, err := c.owned(name, "end", allow)
	if !ok {
		return "", err
	}
	m.EndingAt, m.Ender = now.UTC().Format(time.RFC3339), ender
	if err := c.setMetadata(dom, m); err != nil {
		return "", err
	}
	if err := c.api.DomainSuspend(dom); err != nil && !HasCode(err, libvirt.ErrOperationInvalid) {
		return "", fmt.Errorf("pause %q: %w", name, err)
	}
	return m.PrepareID, nil
}

// volumeBusyTime bounds how long deleteVolume waits for a volume libvirtd is still
// creating.
var volumeBusyTime = 15 * time.Second

// deleteVolume deletes v; a volume or pool that is already gone is not an error.
func (c *Conn) deleteVolume(ctx context.Context, v meta.Volume) (bool, error) {
	pool, err := c.api.StoragePoolLookupByName(v.Pool)
	if HasCode(err, libvirt.ErrNoStoragePool) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("storage pool %q: %w", v.Pool, err)
	}
	vol, err := c.api.StorageVolLookupByName(pool, v.Name)
	if HasCode(err, libvirt.ErrNoStorageVol) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up volume %q in pool %q: %w", v.Name, v.Pool, err)
	}
	err = c.api.StorageVolDelete(vol, libvirt.StorageVolDeleteNormal)
	// A volume libvirtd is still creating (for a prepare that was killed meanwhile) cannot
	// be deleted yet: wait for it, a while, or until ctx ends.
	for start := time.Now(); HasCode(err, libvirt.ErrOperationInvalid) && time.Since(start) < volumeBusyTime; {
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("delete volume %q in pool %q: still busy: %w", v.Name, v.Pool, context.Cause(ctx))
		case <-time.After(200 * time.Millisecond):
		}
		err = c.api.StorageVolDelete(vol, libvirt.StorageVolDeleteNormal)
	}
	if err != nil && !HasCode(err, libvirt.ErrNoStorageVol) {
		return false, fmt.Errorf("delete volume %q in pool %q: %w", v.Name, v.Pool, err)
	}
	return true, nil
}

// BackingCapacity is the size of the template disk at path, if a storage pool knows the
// file (known is false if none does).
func (c *Conn) BackingCapacity(path string) (capacity uint64, known bool, err error) {
	vol, err := c.api.StorageVolLookupByPath(path)
	if HasCode(err, libvirt.ErrNoStorageVol) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("look up volume %s: %w", path, err)
	}
	_, capacity, _, err = c.api.StorageVolGetInfo(vol)
	if err != nil {
		return 0, false, fmt.Errorf("size of volume %s: %w", path, err)
	}
	return capacity, true, nil
}

// Disarm stops the instance name at once (its disks and definition stay, for a look) and
// takes from its definition what would reach out if it were started again: its shares
// (the cache) go, its NICs' links are down. What a job left running in it stops; its
// memory no longer counts.
func (c *Conn) Disarm(name string) error {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("look up instance %q: %w", name, err)
	}
	if err := c.api.DomainDestroyFlags(dom, libvirt.DomainDestroyDefault); err != nil && !HasCode(err, libvirt.ErrOperationInvalid) {
		return fmt.Errorf("stop %q: %w", name, err)
	}
	x, err := c.api.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if err != nil {
		return fmt.Errorf("definition of %q: %w", name, err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(x); err != nil {
		return fmt.Errorf("definition of %q: %w", name, err)
	}
	if d.Devices != nil {
		d.Devices.Filesystems = nil
		for i := range d.Devices.Interfaces {
			d.Devices.Interfaces[i].Link = &libvirtxml.DomainInterfaceLink{State: "down"}
		}
	}
	d.QEMUCommandline = nil // the ssh NIC and its forward
	if x, err = d.Marshal(); err != nil {
		return fmt.Errorf("definition of %q: %w", name, err)
	}
	if _, err := c.api.DomainDefineXMLFlags(x, 0); err != nil {
		return fmt.Errorf("redefine %q without its cache and network: %w", name, err)
	}
	return nil
}
