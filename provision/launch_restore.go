package provision

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// restore restores the instance from its template's warm image (warm.go), made on first
// use: its own overlays on the image's, its own domain (name, UUID, metadata, MAC
// addresses) in a copy of the save image with the header rewritten, and, through the
// agent, its own clock, RNG state, host name, machine-id and MAC addresses in the guest
// before any job code runs (awaitReady).
type restore struct{ h *Host }

// StartRestore is LIBVIRT_GCI_START's value for a restore from the template's warm
// image, made on first use; where it does not fit, a cold boot.
const StartRestore = "restore"

func init() { registerStrategy(StartRestore, StartBoot, func(h *Host) Strategy { return restore{h} }) }

func (restore) Name() string  { return StartRestore }
func (restore) Doing() string { return "restoring" }

// Plan finds (or makes) the warm image for p's instance and lays the instance out on it:
// a warm image per size (CPUs and memory) asked, and one whose memory can be shared for
// a cache share, attached after the restore; a larger disk grows after the restore. It
// does not fit a request whose template's image cannot be made or read, nor a size past
// LIBVIRT_GCI_WARM_SIZES.
func (r restore) Plan(ctx context.Context, conn *libvirt.Conn, p *plan) (*Layout, *misfit, error) {
	h := r.h
	wctx, cancel := h.bootTimeout(ctx)
	wi, why, err := h.warmFor(wctx, conn, p)
	cancel()
	var notSaved *notSavedError
	switch {
	case errors.As(err, &notSaved) && ctx.Err() == nil:
		return nil, &misfit{why: fmt.Sprintf("no warm image of %s (%v)", p.Template, err), warn: true}, nil
	case err != nil:
		return nil, nil, err
	case wi == nil:
		return nil, &misfit{why: why}, nil
	}
	l := &Layout{MemKiB: wi.MemKiB}
	p.warmFrom = wi.Name
	macs, err := r.layout(conn, p, l, wi)
	if err != nil {
		return nil, nil, err
	}
	if p.Size.Disk > p.firstDisk {
		l.DiskGrow = p.Size.Disk - p.firstDisk
	}
	if p.Cache != "" {
		if l.Attach, err = template.ShareXML(template.Share{Source: p.Cache, Tag: CacheTag}); err != nil {
			return nil, nil, err
		}
	}
	l.Identity = &guest.Identity{MachineID: randomHex(16)}
	for _, m := range macs {
		l.Identity.MACs = append(l.Identity.MACs, [2]string{m.Old, m.New})
		if m.Link {
			l.Links = append(l.Links, m.New)
		} else if h.needsSSH(p.Request) {
			l.MAC = m.New // the ssh NIC
		}
	}
	if wi.System == "running" || wi.System == "none" {
		l.Booted = wi.System
	}
	l.Report = func(tm libvirt.Timings) { r.report(p, wi, tm) }
	return l, nil, nil
}

// layout lays out an instance restored from wi: its overlays on the warm image's, its
// copy of the save image, its metadata, and its domain XML, rewritten from the warm
// image's. It returns the MAC address changes the guest must make.
func (r restore) layout(conn *libvirt.Conn, p *plan, l *Layout, wi *WarmImage) ([]template.MACChange, error) {
	h := r.h
	im := h.newMetadata(p.Request, wi.Template, p.prepareID)
	im.Warm = wi.Name
	spec := libvirt.Spec{Name: p.Name, Warm: wi.Image}
	overlays := map[string]template.Overlay{}
	for target, vol := range wi.Overlays {
		path, err := wi.pool.Path(vol)
		if err == nil && path == "" {
			err = fmt.Errorf("no volume %s", vol)
		}
		if err != nil {
			return nil, fmt.Errorf("warm image %s: %w", wi.Name, err)
		}
		nv := libvirt.NewVolume{
			Volume:        meta.Volume{Pool: h.Pool, Name: p.Name + "-" + p.prepareID[:6] + "-" + target + ".qcow2"},
			BackingPath:   path,
			BackingFormat: "qcow2",
		}
		spec.Volumes = append(spec.Volumes, nv)
		im.Volumes = append(im.Volumes, nv.Volume)
		overlays[target] = template.Overlay{Pool: nv.Pool, Volume: nv.Name}
	}
	slices.SortFunc(spec.Volumes, func(a, b libvirt.NewVolume) int { return strings.Compare(a.Name, b.Name) })
	// The copy of the save image, listed before it is made, as every volume is, and
	// taken off the list once deleted, after the restore.
	after := im
	spec.Restored = &after
	spec.Image = meta.Volume{Pool: h.Pool, Name: p.Name + "-" + p.prepareID[:6] + ".save"}
	im.Volumes = append(slices.Clone(im.Volumes), spec.Image)
	md, err := im.MarshalElement()
	if err != nil {
		return nil, err
	}
	var macs []template.MACChange
	spec.DomainXML, macs, err = template.Restored(wi.Image.XML, template.Clone{Name: p.Name, UUID: template.NewUUID(), Metadata: md, Overlays: overlays}, template.NewMAC)
	l.Spec = spec
	return macs, err
}

// Make defines the domain, creates its overlays and restores the save image, then
// attaches the cache share (QEMU 7.2 cannot save a virtiofs device; the warm image's
// memory is shared for it, and the guest mounts it once it appears: guest.Setup).
func (r restore) Make(ctx context.Context, conn *libvirt.Conn, p *plan) (libvirt.Timings, error) {
	tm, err := conn.Restore(ctx, p.Spec)
	if err != nil && ctx.Err() == nil && !conn.IsLost() && damaged(err) {
		// Its save image was deleted or cut short on disk: the next prepare makes the
		// image again (it is no longer marked whole), this one boots.
		if derr := r.h.dropWarm(conn, p.warmFrom); derr != nil {
			r.h.Log.Warn(derr.Error())
		}
		return tm, &fallBackError{fmt.Errorf("the warm image %s of %s is damaged (%v); it is made again on the next prepare", p.warmFrom, p.Template, err)}
	}
	if err == nil && p.Attach != "" {
		err = conn.Attach(ctx, p.Name, "the cache share", p.Attach, &tm.Attach)
	}
	if err == nil && p.Size.Disk > 0 {
		err = conn.Grow(ctx, p.Name, p.tmpl.Disks[0].Target, p.Size.Disk, &tm.Grow)
	}
	return tm, err
}

func (r restore) report(p *plan, wi *WarmImage, tm libvirt.Timings) {
	image := fmt.Sprintf("memory image copy %d ms", tm.Image.Milliseconds())
	if tm.Streamed {
		image = "memory image read in place, no copy"
	}
	if p.Attach != "" {
		image += fmt.Sprintf(", cache share attached in %d ms", tm.Attach.Milliseconds())
	}
	if p.Size.Disk > 0 {
		image += fmt.Sprintf(", disk grown in %d ms", tm.Grow.Milliseconds())
	}
	if p.Size != (Size{}) {
		image += " (" + p.Size.String() + ")"
	}
	r.h.Log.Info(fmt.Sprintf("restored %s into %s from %s in %d ms (define %d ms, %d overlays %d ms, restore %d ms, %s%s)",
		p.Template, p.Name, wi.Name, (tm.Define+tm.Clone+tm.Image+tm.Start+tm.Attach+tm.Grow).Milliseconds(), tm.Define.Milliseconds(), len(p.Spec.Volumes), tm.Clone.Milliseconds(), tm.Start.Milliseconds(), image, reserved(tm)),
		"template", p.Template, "name", p.Name, "warm", wi.Name, "define_ms", tm.Define.Milliseconds(), "clone_ms", tm.Clone.Milliseconds(),
		"image_ms", tm.Image.Milliseconds(), "streamed", tm.Streamed, "restore_ms", tm.Start.Milliseconds(), "reserve_ms", tm.Reserve.Milliseconds())
}

// damaged says whether a restore failed for its save image's sake: the file gone, or
// QEMU unable to load the state it holds (cut short, or overwritten).
func damaged(err error) bool {
	msg := err.Error()
	for _, s := range []string{"load of migration failed", "error while loading state", "No such file or directory", "no storage vol with matching"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}
