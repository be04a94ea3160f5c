package provision

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// makeWarm makes the warm image name for instances like the one src plans: it boots an
// instance of the template (named by the instances' prefix, so that gc sweeps it if this
// process dies), waits for its guest agent, and saves it: its overlays and its save
// image become the warm image, marked complete last. Whatever fails, it removes what it
// made. Then it removes the family's older images that no domain uses.
func (h *Host) makeWarm(ctx context.Context, conn *libvirt.Conn, src *plan, prof warmProfile, name string) (err error) {
	start := time.Now()
	after, cancelAfter := lingeringPast(ctx, conn, AfterCancel)
	defer cancelAfter()
	pool, err := conn.Pool(h.Pool)
	if err != nil {
		return err
	}
	p := h.warmPlan(src, prof, name)
	if err := h.clearWarmTry(ctx, conn, pool, p.Name, name); err != nil {
		return err
	}
	if _, err := h.planWith(ctx, conn, coldBoot{h}, p); err != nil {
		return err
	}
	_, undo, err := h.admitAndMake(ctx, after, conn, coldBoot{h}, p)
	if err != nil {
		return fmt.Errorf("warm image %s: %w", name, err)
	}
	defer func() {
		if err != nil {
			undo()
		}
	}()
	if err := h.quiesce(ctx, conn, p.Name, name); err != nil {
		return err
	}
	booted := time.Since(start)
	saveStart := time.Now()
	if err := h.saveWarm(ctx, conn, pool, p.Name, name); err != nil {
		return err
	}
	h.Log.Info(fmt.Sprintf("made the warm image %s of %s in %.1f s (booted in %.1f s, saved in %.1f s)", name, src.tmpl.Name,
		time.Since(start).Seconds(), booted.Seconds(), time.Since(saveStart).Seconds()),
		"warm", name, "warm_ms", time.Since(start).Milliseconds(), "save_ms", time.Since(saveStart).Milliseconds())
	if n, err := h.removeOldWarm(pool, name); err != nil {
		h.Log.Warn(fmt.Sprintf("removing old warm images: %v", err))
	} else if n > 0 {
		h.Log.Info(fmt.Sprintf("removed %d older warm images of %s", n, src.tmpl.Name))
	}
	return nil
}

// warmPlan is the plan of the instance the warm image name is saved from: by hand (no
// job's), this process's (if it dies, the next prepare's sweep, or gc, removes it as an
// orphan), with the devices of prof and its save volume listed in its metadata.
func (h *Host) warmPlan(src *plan, prof warmProfile, name string) *plan {
	p := &plan{Request: src.Request, tmplXML: src.tmplXML, tmpl: src.tmpl, prepareID: randomHex(8), helper: prof.Helper, warmImage: name, shareMemory: prof.Shares}
	p.Name = h.Prefix + "warm-" + name[strings.LastIndex(name, "-")+1:]
	p.Owner, p.Process, p.Replace = meta.Owner{Manual: true}, ProcessOf(os.Getpid()), nil
	p.Size, p.Cache, p.CacheMount = Size{CPUs: prof.CPUs, Memory: prof.Memory}, "", ""
	if !prof.SSHNIC {
		p.Transport = meta.TransportAgent
	}
	p.extra = []meta.Volume{{Pool: h.Pool, Name: name + ".save"}}
	return p
}

// clearWarmTry removes the leftovers of an earlier try at the warm image name (a
// crash): its domain, domName, and then its volumes.
func (h *Host) clearWarmTry(ctx context.Context, conn *libvirt.Conn, pool *libvirt.Pool, domName, name string) error {
	if _, err := conn.Teardown(ctx, domName, nil); err != nil {
		return fmt.Errorf("warm image %s: remove an earlier try: %w", name, err)
	}
	if err := pool.Delete(func(v string) bool { return warmPart(name, v) || v == libvirt.DoneMark(name) }); err != nil {
		return fmt.Errorf("warm image %s: remove an earlier try: %w", name, err)
	}
	return nil
}

// quiesce waits, within the boot timeout, for the guest agent of domName, then lets the
// guest finish its boot and makes its memory image small: free memory zeroed (QEMU
// saves a zero page in a few bytes).
func (h *Host) quiesce(ctx context.Context, conn *libvirt.Conn, domName, name string) error {
	agent, err := guest.NewAgent(conn.API(), domName)
	if err != nil {
		return err
	}
	bctx, cancel := h.bootTimeout(ctx)
	defer cancel()
	if err := agent.WaitReady(bctx); err != nil {
		return fmt.Errorf("warm image %s: %w", name, err)
	}
	system, err := agent.Quiesce(bctx)
	if err != nil {
		return &notSavedError{fmt.Errorf("warm image %s: %w", name, err)}
	}
	// The state goes into the image with the domain's metadata: a clone of a guest
	// whose systemd was running then is not waited for again.
	in, err := conn.Lookup(domName)
	if err != nil {
		return fmt.Errorf("warm image %s: %w", name, err)
	}
	in.Metadata.System = system
	if err := conn.SetMetadata(domName, in.Metadata); err != nil {
		return fmt.Errorf("warm image %s: %w", name, err)
	}
	return nil
}

// saveWarm saves domName into the warm image name's save volume, undefines it (its
// volumes stay, as the warm image) and marks the image complete.
func (h *Host) saveWarm(ctx context.Context, conn *libvirt.Conn, pool *libvirt.Pool, domName, name string) error {
	if err := pool.Create(name+".save", 0, 0); err != nil {
		return &notSavedError{fmt.Errorf("warm image %s: its save volume: %w", name, err)}
	}
	if err := pool.Save(ctx, domName, name+".save"); err != nil {
		return &notSavedError{fmt.Errorf("warm image %s: %w", name, err)}
	}
	if err := conn.Undefine(domName); err != nil {
		return fmt.Errorf("warm image %s: %w", name, err)
	}
	if err := pool.MarkWhole(name); err != nil {
		// No domain lists the image's volumes any more: a rollback would not find them.
		if derr := pool.Delete(func(v string) bool { return warmPart(name, v) }); derr != nil {
			err = errors.Join(err, derr)
		}
		return fmt.Errorf("warm image %s: mark it complete: %w", name, err)
	}
	return nil
}

// warmPart tells whether the volume v is one of the warm image name's, its mark aside.
func warmPart(name, v string) bool { return strings.HasPrefix(v, name+"-") || v == name+".save" }
