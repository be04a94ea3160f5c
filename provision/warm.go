package provision

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt/dial"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// Warm images: a template's instance booted once, to a ready guest agent, and saved
// (libvirt's save: its memory and device state, and the overlays it ran on). Each
// instance of the template is then restored from it rather than booted: its own overlays
// on the warm image's, its own domain (name, UUID, metadata, MAC addresses) in a copy of
// the save image with the header rewritten, and, through the agent, its own clock, RNG
// state, host name, machine-id and MAC addresses in the guest before any job code runs.

// warmProfile is what of an instance, besides its template, lives in its warm image:
// devices cannot be added to a restored VM.
type warmProfile struct {
	SSHNIC bool   // the NIC of the ssh transport and the forwards
	Helper string // the gitlab-runner helper's volume; "" for none
	// Shares: the guest's memory is shared, as the cache share (virtiofs) needs, which
	// each instance gets after its restore.
	Shares bool
	// CPUs and Memory (bytes) a job asked for instead of the template's; 0 keeps them.
	CPUs   int
	Memory uint64
}

func (p warmProfile) sized() bool { return p.CPUs > 0 || p.Memory > 0 }

// unsized is the profile with the template's own size: the base of a sized one's family.
func (p warmProfile) unsized() warmProfile {
	p.CPUs, p.Memory = 0, 0
	return p
}

// String is what of the profile names its images (nothing for the plain one's new
// fields: an upgrade keeps their names).
func (p warmProfile) String() string {
	s := fmt.Sprintf("%t\x00%s", p.SSHNIC, p.Helper)
	if p.Shares {
		s += "\x00shares"
	}
	if p.sized() {
		s += fmt.Sprintf("\x00size=%d/%d", p.CPUs, p.Memory)
	}
	return s
}

// WarmImage is a template's warm image, complete (its mark volume exists).
type WarmImage struct {
	Name     string            // of its volumes: NAME-TARGET.qcow2, NAME.save, NAME.done
	Template string            // the template's name
	Overlays map[string]string // the overlay volume of each writable disk, by target
	MemKiB   uint64
	Image    *libvirt.SaveImage // its save image
	// System: systemd's state when the image was saved (meta.Metadata.System); "" for
	// an image made before it was recorded.
	System string
	pool   *libvirt.Pool
}

// warmPrefix begins the names of warm images' volumes. They are not named by the
// instances' prefix: every configuration on the host shares them.
const warmPrefix = "libvirt-gci-warm-"

// warmFamily names the warm images of one template and profile: a new image of the
// family replaces the older ones. A sized profile's family name is the unsized one's,
// then "s" and its own hash: the sized images of a template can be counted.
func (h *Host) warmFamily(tmplName string, p warmProfile) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "%s\x00%s", tmplName, p.unsized()))
	name := warmPrefix + hex.EncodeToString(sum[:4])
	if p.sized() {
		sum := sha256.Sum256(fmt.Appendf(nil, "%s\x00%s", tmplName, p))
		name += "s" + hex.EncodeToString(sum[:3])
	}
	return name
}

// warmName is the name of the warm image of the template, as it is now (its XML, the
// identity of its disks), this tool's version and the profile: any change of these
// names another image, so a stale one is never used.
func (h *Host) warmName(conn *libvirt.Conn, tmplXML string, tmpl *template.Template, p warmProfile) (string, error) {
	s := sha256.New()
	fmt.Fprintf(s, "%s\x00%s\x00%s\x00%s\x00", h.Version, toolIdentity(), tmplXML, p)
	for _, d := range tmpl.Disks {
		id, err := h.diskIdentity(conn, d.Path)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(s, "%s\x00%s\x00", d.Path, id)
	}
	return h.warmFamily(tmpl.Name, p) + "-" + hex.EncodeToString(s.Sum(nil)[:6]), nil
}

// toolIdentity names this very binary (fileIdentity): a rebuild with the same version
// string makes new warm images too.
func toolIdentity() string {
	exe, err := os.Executable()
	if err != nil {
		return "unknown"
	}
	fi, err := os.Stat(exe)
	if err != nil {
		return "unknown"
	}
	return fileIdentity(fi)
}

// fileIdentity says which content a file has without reading it: its device, inode,
// size and change times, which any rewrite or replacement changes (hashing a 60 MB
// binary or a disk at every prepare would cost more than the launch).
func fileIdentity(fi os.FileInfo) string {
	st := fi.Sys().(*syscall.Stat_t)
	return fmt.Sprintf("%d/%d/%d/%d/%d", st.Dev, st.Ino, st.Size, st.Mtim.Nano(), st.Ctim.Nano())
}

// diskIdentity says which content a template disk has: its volume's size and times,
// from libvirt, where a pool holds it; else, on a local libvirt, its file's identity.
func (h *Host) diskIdentity(conn *libvirt.Conn, path string) (string, error) {
	if _, stamp, known := conn.VolumeAt(path); known && stamp != "" {
		return stamp, nil
	}
	if !dial.IsLocal(h.URI) {
		// The file's name only: this says why a job boots, in the job's log.
		return "", fmt.Errorf("template disk %s is in no storage pool of the remote libvirt, so a warm image could not tell when it changed (put it in a pool for warm images)", filepath.Base(path))
	}
	fi, err := os.Stat(path)
	if pe := (*fs.PathError)(nil); errors.As(err, &pe) {
		return "", fmt.Errorf("template disk %s: %w", filepath.Base(path), pe.Err)
	}
	if err != nil {
		return "", fmt.Errorf("template disk %s: %w", filepath.Base(path), err)
	}
	return "file/" + fileIdentity(fi), nil
}

// openWarm returns the warm image name, if it is complete; nil if not.
func (h *Host) openWarm(ctx context.Context, conn *libvirt.Conn, name, tmplName string) (*WarmImage, error) {
	pool, err := conn.Pool(h.Pool)
	if err != nil {
		return nil, err
	}
	if done, err := pool.Whole(name); err != nil {
		return nil, fmt.Errorf("warm image %s: %w", name, err)
	} else if !done {
		return nil, nil
	}
	// An image this tool cannot read (another libvirt's format, say) boots the job, with
	// a warning: a template that boots is no reason to fail a job.
	img, gone, err := pool.ReadSaveImage(ctx, name+".save")
	if gone {
		return nil, nil // marked, but half removed: it is made again
	}
	if errors.Is(err, libvirt.ErrNotSaveImage) {
		return nil, &notSavedError{fmt.Errorf("warm image %s: %w", name, err)}
	}
	if err != nil {
		return nil, &notSavedError{fmt.Errorf("warm image %s: read its header: %w", name, err)}
	}
	saved, err := template.ParseSaved(img.XML, name+"-")
	if err != nil {
		return nil, &notSavedError{fmt.Errorf("warm image %s: its domain XML: %w", name, err)}
	}
	wi := &WarmImage{Name: name, Template: tmplName, Overlays: saved.Volumes, MemKiB: saved.MemKiB, Image: img, pool: pool}
	if m, ok := meta.FromDomain(saved.Metadata); ok {
		wi.System = m.System
	}
	return wi, nil
}

// warmFor returns the warm image for the instance p plans, making it first if there is
// none; or nil, and why, where the instance is to be booted instead.
func (h *Host) warmFor(ctx context.Context, conn *libvirt.Conn, p *plan) (*WarmImage, string, error) {
	tmpl := p.tmpl
	prof := warmProfile{SSHNIC: h.needsSSH(p.Request), Helper: p.helper, Shares: p.Cache != "", CPUs: p.Size.CPUs, Memory: p.Size.Memory}
	if prof.sized() && h.Limits.WarmSizes <= 0 {
		return nil, "no warm images for sizes jobs ask for (LIBVIRT_GCI_WARM_SIZES=0)", nil
	}
	ws, err := h.warmState(ctx, conn, p.tmplXML, tmpl, prof)
	if err != nil || ws.image != nil || ws.never != "" {
		return ws.image, ws.never, err
	}
	name := ws.name
	if prof.sized() {
		if why, err := h.warmSizesFull(conn, tmpl.Name, prof); why != "" || err != nil {
			return nil, why, err
		}
	}
	// Made by one process at a time; a prepare that finds another making it boots.
	unlock, ok, err := conn.PoolLock(ctx, h.Log, h.Pool, name, false, h.warmBuilding(conn, name), lockHolder())
	if err != nil {
		return nil, "", err
	}
	if !ok {
		return nil, "another prepare is making the warm image of " + tmpl.Name, nil
	}
	defer unlock()
	if wi, err := h.openWarm(ctx, conn, name, tmpl.Name); err != nil || wi != nil {
		return wi, "", err
	}
	if err := h.makeWarm(ctx, conn, p, prof, name); err != nil {
		if errors.Is(err, guest.ErrCannotReseed) && ctx.Err() == nil {
			return nil, guest.ErrCannotReseed.Error(), h.markNoRestore(conn, name)
		}
		return nil, "", err
	}
	wi, err := h.openWarm(ctx, conn, name, tmpl.Name)
	if err == nil && wi == nil {
		err = fmt.Errorf("warm image %s: made, but not found", name)
	}
	return wi, "", err
}

// warmStand is where the warm image of a template and profile stands: its name, the
// image where it is whole, or why none will be (never: a template disk whose changes
// cannot be told, so that no image could be trusted, or the image marked never to be
// made).
type warmStand struct {
	name  string
	image *WarmImage
	never string
}

// warmState finds where the warm image of the template (tmplXML, tmpl) for prof stands:
// its identity (warmName), its no-restore mark, and the image itself (openWarm, whose
// error is an image that is there and cannot be read). Prepare, template warm and
// doctor all ask it this way.
func (h *Host) warmState(ctx context.Context, conn *libvirt.Conn, tmplXML string, tmpl *template.Template, prof warmProfile) (warmStand, error) {
	name, err := h.warmName(conn, tmplXML, tmpl, prof)
	if err != nil {
		return warmStand{never: err.Error()}, nil
	}
	if why := h.noRestore(conn, name); why != "" {
		return warmStand{name: name, never: why}, nil
	}
	wi, err := h.openWarm(ctx, conn, name, tmpl.Name)
	return warmStand{name: name, image: wi}, err
}

// warmBuilding tells whether a domain is booting or being saved for the warm image
// name (under any prefix): whether its lock's holder is at work.
func (h *Host) warmBuilding(conn *libvirt.Conn, name string) func() bool {
	suffix := "warm-" + name[strings.LastIndex(name, "-")+1:]
	return func() bool {
		names, err := conn.DomainNames()
		if err != nil {
			return true // cannot tell: not stale
		}
		return slices.ContainsFunc(names, func(n string) bool { return strings.HasSuffix(n, suffix) })
	}
}

// Warm makes the warm image of the template for instances with the transport given and
// the helper (a gitlab-runner binary; "" for none), and with the memory a cache share
// needs (shares), if it has none that is up to date, and says which it is.
func (h *Host) Warm(ctx context.Context, tmplName, transport, helper string, shares bool) (string, error) {
	conn, err := h.Connect(ctx)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	req := Request{Name: "warm", Template: tmplName, Offered: true, Transport: transport, Helper: helper}
	tx, tmpl, err := h.template(ctx, conn, req)
	if err != nil {
		return "", err
	}
	p := &plan{Request: req, tmplXML: tx, tmpl: tmpl}
	if helper != "" {
		hctx, cancel := h.bootTimeout(ctx)
		p.helper, err = h.helperVolume(hctx, conn, helper)
		cancel()
		if err != nil {
			return "", err
		}
	}
	prof := warmProfile{SSHNIC: h.needsSSH(req), Helper: p.helper, Shares: shares}
	ws, err := h.warmState(ctx, conn, tx, tmpl, prof)
	switch {
	case ws.never != "":
		return "", fmt.Errorf("no warm image of %s can be made: %s", tmplName, ws.never)
	case ws.image != nil:
		h.Log.Info(fmt.Sprintf("the warm image %s of %s is up to date", ws.name, tmplName))
		return ws.name, nil
	}
	name := ws.name // an image that cannot be read (err) fails below, under the lock, as before
	bctx, cancel := h.bootTimeout(ctx)
	defer cancel()
	unlock, _, err := conn.PoolLock(bctx, h.Log, h.Pool, name, true, h.warmBuilding(conn, name), lockHolder())
	if err != nil {
		return "", err
	}
	defer unlock()
	if wi, err := h.openWarm(ctx, conn, name, tmplName); err != nil {
		return "", err
	} else if wi != nil {
		h.Log.Info(fmt.Sprintf("the warm image %s of %s is up to date", name, tmplName))
		return name, nil
	}
	return name, h.makeWarm(ctx, conn, p, prof, name)
}

// warmSizesFull says why no warm image is made for the sized profile prof of the
// template: the template has Limits.WarmSizes sized images of other sizes already, each
// in use by a domain; "" if there is room. Where there is none, the image of another
// size made longest ago that no domain uses gives way (issue 36: sizes made first held
// their places for good, and one project asking for four odd sizes made every other
// project's sized jobs boot from then on). Made longest ago rather than used longest
// ago: nothing of a use is kept on the host; a size jobs keep asking for is in use most
// of the time, and a size that gave way is made again on its next ask, at the cost of
// one boot.
func (h *Host) warmSizesFull(conn *libvirt.Conn, tmplName string, prof warmProfile) (string, error) {
	max := h.Limits.WarmSizes
	family := h.warmFamily(tmplName, prof)
	sizedPrefix := h.warmFamily(tmplName, prof.unsized()) + "s"
	pool, err := conn.Pool(h.Pool)
	if err != nil {
		return "", err
	}
	vols, err := pool.Volumes()
	if err != nil {
		return "", err
	}
	others := map[string][]string{} // by size (family): its images
	for _, v := range vols {
		base, ok := libvirt.MarkOf(v)
		if ok && strings.HasPrefix(base, sizedPrefix) && !strings.HasPrefix(base, family+"-") {
			size := base[:strings.LastIndex(base, "-")]
			others[size] = append(others[size], base)
		}
	}
	for len(others) >= max {
		var images []string
		for _, names := range others {
			images = append(images, names...)
		}
		gone, err := pool.RemoveOldestUnused(images, warmPart)
		if err != nil {
			return "", fmt.Errorf("make room for another size's warm image of %s: %w", tmplName, err)
		}
		if gone == "" {
			return fmt.Sprintf("%s has warm images for %d other sizes already, each in use (LIBVIRT_GCI_WARM_SIZES=%d)", tmplName, len(others), max), nil
		}
		h.Log.Info(fmt.Sprintf("removed the warm image %s of %s, of another size and unused, to make room (LIBVIRT_GCI_WARM_SIZES=%d)", gone, tmplName, max))
		size := gone[:strings.LastIndex(gone, "-")]
		if others[size] = slices.DeleteFunc(others[size], func(n string) bool { return n == gone }); len(others[size]) == 0 {
			delete(others, size)
		}
	}
	return "", nil
}

// dropWarm unmarks the warm image name, whose save image is damaged: the next prepare
// makes it again (clearWarmTry removes its volumes first), and no restore uses it
// meanwhile. Instances restored from it before run on: their QEMUs hold the files
// their disks stand on open.
func (h *Host) dropWarm(conn *libvirt.Conn, name string) error {
	pool, err := conn.Pool(h.Pool)
	if err != nil {
		return err
	}
	if err := pool.Delete(func(v string) bool { return v == libvirt.DoneMark(name) }); err != nil {
		return fmt.Errorf("warm image %s: unmark it: %w", name, err)
	}
	return nil
}

// noRestoreMark is the volume that says the warm image name is never to be made: its
// guest cannot reseed its RNG (guest.ErrCannotReseed). It goes with its family's old
// images.
func noRestoreMark(name string) string { return name + ".norestore" }

// noRestore says why instances of the warm image name are booted, not restored: its
// mark; "" if it has none.
func (h *Host) noRestore(conn *libvirt.Conn, name string) string {
	pool, err := conn.Pool(h.Pool)
	if err != nil {
		return ""
	}
	if marked, err := pool.Has(noRestoreMark(name)); err != nil || !marked {
		return ""
	}
	return guest.ErrCannotReseed.Error()
}

// markNoRestore marks the warm image name as one never to be made.
func (h *Host) markNoRestore(conn *libvirt.Conn, name string) error {
	pool, err := conn.Pool(h.Pool)
	if err != nil {
		return err
	}
	if err := pool.Mark(noRestoreMark(name)); err != nil {
		return fmt.Errorf("warm image %s: mark it never to be made: %w", name, err)
	}
	return nil
}

// notSavedError: the template's instance booted, but could not be saved (a device QEMU
// cannot migrate, say): its instances can still be booted.
type notSavedError struct{ err error }

func (e *notSavedError) Error() string { return e.err.Error() }
func (e *notSavedError) Unwrap() error { return e.err }

// removeOldWarm removes the warm images of keep's family other than keep that no
// domain uses (a restored instance's disks stand on its image's). It says how many.
func (h *Host) removeOldWarm(pool *libvirt.Pool, keep string) (int, error) {
	family := keep[:strings.LastIndex(keep, "-")+1]
	if err := pool.Delete(func(v string) bool {
		base, ok := strings.CutSuffix(v, ".norestore")
		return ok && strings.HasPrefix(base, family) && base != keep
	}); err != nil {
		return 0, err
	}
	return pool.RemoveUnused(func(v string) (string, bool) {
		base, ok := libvirt.MarkOf(v)
		return base, ok && strings.HasPrefix(base, family) && base != keep
	}, warmPart)
}
