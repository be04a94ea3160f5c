package provision

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// gcWarm removes the pool's locks whose holder is gone, and the warm images of
// templates that are gone (undefined, or a base image removed) where no domain uses
// them: nothing would ever restore from them again. Each image says its template in
// its save image's header (the saved domain's metadata). Images being made (not yet
// marked whole) are left to their maker.
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
	return errors.Join(errs...)
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
