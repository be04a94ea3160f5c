package provision

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// gcWarm removes the pool's locks whose holder is gone, the warm images of templates
// that are gone (undefined, or a base image removed) where no domain uses them, and the
// unfinished ones (gcUnfinishedWarm): nothing would ever restore from them again. Each
// image says its template in its save image's header (the saved domain's metadata).
func (h *Host) gcWarm(ctx context.Context, conn *libvirt.Conn, dryRun bool, sw *Sweep) error {
	pool, err := conn.Pool(h.Pool)
	if err != nil {
		return fmt.Errorf("gc: warm images: %w", err)
	}
	var errs []error
	if !dryRun {
		locks, err := pool.ClearLocks(ctx, lockHolderGone)
		if err != nil {
			errs = append(errs, fmt.Errorf("gc: locks: %w", err))
		}
		for _, l := range locks {
			h.Log.Info(fmt.Sprintf("gc: removed the lock %s: its holder is gone", l), "lock", l)
		}
	}
	vols, err := pool.Volumes()
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("gc: warm images: %w", err))...)
	}
	for _, v := range vols {
		name, ok := libvirt.MarkOf(v)
		if !ok || !strings.HasPrefix(name, warmPrefix) {
			continue
		}
		tmpl, err := h.warmTemplate(ctx, pool, name)
		if err != nil || tmpl == "" || !h.templateGone(ctx, conn, tmpl) {
			continue // unreadable images are openWarm's to judge; a template there keeps its image
		}
		if dryRun {
			fmt.Fprintf(h.Out, "would remove the warm image %s: its template %s is gone\n", name, tmpl)
			continue
		}
		n, err := pool.RemoveUnused(func(v string) (string, bool) {
			base, ok := libvirt.MarkOf(v)
			return base, ok && base == name
		}, warmPart)
		if err != nil {
			errs = append(errs, fmt.Errorf("gc: warm image %s: %w", name, err))
			continue
		}
		if n > 0 {
			sw.Warm += n
			h.Log.Info(fmt.Sprintf("gc: removed the warm image %s: its template %s is gone", name, tmpl), "image", name, "template", tmpl)
		}
	}
	if err := h.gcUnfinishedWarm(ctx, conn, pool, vols, dryRun, sw); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// warmVolume names the warm image a volume of the pool is part of (its overlays,
// NAME-DISK.qcow2, and its save image, NAME.save); not its mark or its lock.
var warmVolume = regexp.MustCompile(`^(` + regexp.QuoteMeta(warmPrefix) + `[0-9a-f]{8}(?:s[0-9a-f]{6})?-[0-9a-f]{12})(?:\.save|-.+)$`)

// gcUnfinishedWarm removes the warm images that are not marked whole and that nobody
// makes, where no domain uses them: one whose restore found it damaged (unmarked
// then, and made again only if a job of its template and profile comes), or one
// whose save was cut short. Nothing restores from an unmarked image; where its
// template is still there, the next prepare that wants it makes it again. Each is
// removed under its lock, taken only if free, so that no maker starts on it meanwhile.
func (h *Host) gcUnfinishedWarm(ctx context.Context, conn *libvirt.Conn, pool *libvirt.Pool, vols []string, dryRun bool, sw *Sweep) error {
	have := map[string]bool{}
	for _, v := range vols {
		have[v] = true
	}
	var names []string
	for _, v := range vols {
		m := warmVolume.FindStringSubmatch(v)
		if m == nil || have[libvirt.DoneMark(m[1])] || have[m[1]+".lock"] || slices.Contains(names, m[1]) {
			continue
		}
		names = append(names, m[1])
	}
	var errs []error
	for _, name := range names {
		if dryRun {
			fmt.Fprintf(h.Out, "would remove the unfinished warm image %s: not marked whole, and nobody makes it\n", name)
			continue
		}
		unlock, ok, err := conn.PoolLock(ctx, h.Log, h.Pool, name, false, h.warmBuilding(conn, name), lockHolder())
		if err != nil || !ok {
			if err != nil {
				errs = append(errs, fmt.Errorf("gc: warm image %s: %w", name, err))
			}
			continue // made just now
		}
		n, err := h.removeUnfinished(pool, name)
		unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("gc: warm image %s: %w", name, err))
			continue
		}
		if n > 0 {
			sw.Warm += n
			h.Log.Info(fmt.Sprintf("gc: removed the unfinished warm image %s: not marked whole, and nobody makes it", name), "image", name)
		}
	}
	return errors.Join(errs...)
}

// removeUnfinished removes the warm image name, under its lock, if it is still not
// marked whole and no domain uses it; it says whether it did (0 or 1).
func (h *Host) removeUnfinished(pool *libvirt.Pool, name string) (int, error) {
	if whole, err := pool.Whole(name); err != nil || whole {
		return 0, err
	}
	once := false // the image once, whichever of its volumes comes first
	return pool.RemoveUnused(func(v string) (string, bool) {
		if m := warmVolume.FindStringSubmatch(v); m != nil && m[1] == name && !once {
			once = true
			return name, true
		}
		return "", false
	}, warmPart)
}

// warmTemplate is the name of the template the warm image name was made of, as its save
// image's header says; "" where it does not say.
func (h *Host) warmTemplate(ctx context.Context, pool *libvirt.Pool, name string) (string, error) {
	img, gone, err := pool.ReadSaveImage(ctx, name+".save")
	if err != nil || gone {
		return "", err
	}
	saved, err := template.ParseSaved(img.XML, name+"-")
	if err != nil {
		return "", err
	}
	m, ok := meta.FromDomain(saved.Metadata)
	if !ok {
		return "", nil
	}
	return m.Template, nil
}

// templateGone says whether the template name is certainly gone: no domain of that
// name, and no base image either where base images are offered.
func (h *Host) templateGone(ctx context.Context, conn *libvirt.Conn, name string) bool {
	_, _, err := conn.TemplateXML(name)
	if !errors.Is(err, libvirt.ErrNoTemplate) {
		return false // there (a template, or a domain that no longer is one), or cannot tell
	}
	if h.BaseImages.Source != "" {
		_, err := h.baseImageXML(ctx, conn, name)
		return errors.Is(err, libvirt.ErrNoTemplate)
	}
	return true
}
