package libvirt

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/digitalocean/go-libvirt"

	"github.com/libvirt-gci/libvirt-gci/template"
)

// Save saves the running domain name into the volume vol (libvirt's save: its memory
// and device state; the domain stops), and refreshes what libvirt knows of the volume.
// Like a create, the call is awaited after a cancel (step).
func (c *Conn) Save(ctx context.Context, name string, vol libvirt.StorageVol) error {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("look up %q: %w", name, err)
	}
	path, err := c.api.StorageVolGetPath(vol)
	if err != nil {
		return fmt.Errorf("save %q: %w", name, err)
	}
	var took time.Duration
	if err := c.step(ctx, name, "save "+name, &took, func() error {
		return c.api.DomainSaveFlags(dom, path, libvirt.OptString{}, uint32(libvirt.DomainSaveRunning))
	}); err != nil {
		return err
	}
	// libvirt refreshes what it knows of the volume (made empty): its size is the image's.
	if _, _, _, err := c.api.StorageVolGetInfo(vol); err != nil {
		return fmt.Errorf("save %q: %w", name, err)
	}
	return nil
}

// Restore makes the instance spec as Create does, but from the save image spec.Warm:
// it defines the domain, creates its overlays and restores the save image with its
// header rewritten for this domain (libvirt restores a save image only into the domain
// its header describes), then sets the metadata spec.Restored. On a local libvirt the
// restore reads the warm image's own file through a pipe (restore_pipe.go); elsewhere
// it reads a copy in spec.Image, deleted once QEMU has read it.
func (c *Conn) Restore(ctx context.Context, spec Spec) (Timings, error) {
	var t Timings
	header, err := rewriteHeader(spec.Warm.Header, spec.DomainXML)
	if err != nil {
		return t, fmt.Errorf("restore %q: %w", spec.Name, err)
	}
	dom, err := c.defineWithOverlays(ctx, spec, &t)
	if err != nil {
		return t, err
	}
	// Its addresses while libvirt restores it (a network update takes libvirtd as long as
	// a small restore): its NICs' links stay down until its guest has its own MAC
	// addresses, after this.
	var rt Timings
	reserved := make(chan error, 1)
	go func() { reserved <- c.reserveTimed(ctx, dom, spec, &rt) }()
	if f := c.openWarmFile(spec.Warm); f != nil {
		defer f.Close()
		err = c.restorePiped(ctx, spec, header, f, &t)
	} else {
		err = c.restoreCopy(ctx, spec, header, &t)
	}
	rerr := <-reserved
	t.Reserve, t.Addresses = rt.Reserve, rt.Addresses
	if err == nil {
		err = rerr
	}
	if err == nil && spec.Restored != nil {
		err = c.SetMetadata(spec.Name, *spec.Restored)
	}
	return t, err
}

// restorePiped restores spec from a pipe fed with header and the warm image's body.
func (c *Conn) restorePiped(ctx context.Context, spec Spec, header []byte, body *os.File, t *Timings) error {
	pipe, err := feedMemory(ctx, header, body)
	if err != nil {
		return fmt.Errorf("restore %q: %w", spec.Name, err)
	}
	t.Streamed = true
	err = c.step(ctx, spec.Name, fmt.Sprintf("restore %q", spec.Name), &t.Start, func() error {
		return c.api.DomainRestoreFlags(pipe.Path, libvirt.OptString{}, uint32(libvirt.DomainSaveRunning))
	})
	if ferr := pipe.finish(); ferr != nil && err == nil {
		return fmt.Errorf("restore %q: its memory image: %w", spec.Name, ferr)
	}
	return err
}

// restoreCopy restores spec from a copy of the warm image with the header rewritten.
func (c *Conn) restoreCopy(ctx context.Context, spec Spec, header []byte, t *Timings) error {
	pool, err := c.api.StoragePoolLookupByName(spec.Image.Pool)
	if err != nil {
		return fmt.Errorf("storage pool %q: %w", spec.Image.Pool, err)
	}
	var img libvirt.StorageVol
	x, err := volumeXML(spec.Image.Name, 0, 0o600)
	if err != nil {
		return err
	}
	err = c.step(ctx, spec.Name, fmt.Sprintf("copy the save image %s", spec.Warm.Vol.Name), &t.Image, func() (err error) {
		img, err = c.api.StorageVolCreateXMLFrom(pool, x, spec.Warm.Vol, 0)
		if err != nil {
			return err
		}
		return c.upload(ctx, img, header)
	})
	if err != nil {
		return err
	}
	path, err := c.api.StorageVolGetPath(img)
	if err != nil {
		return fmt.Errorf("restore %q: %w", spec.Name, err)
	}
	err = c.step(ctx, spec.Name, fmt.Sprintf("restore %q", spec.Name), &t.Start, func() error {
		return c.api.DomainRestoreFlags(path, libvirt.OptString{}, uint32(libvirt.DomainSaveRunning))
	})
	// QEMU has read it: the copy goes now, not at cleanup (the teardown would, too).
	if derr := c.api.StorageVolDelete(img, 0); derr != nil && err == nil {
		return fmt.Errorf("restore %q: delete the copy of its memory image: %w", spec.Name, derr)
	}
	return err
}

// Attach adds the device x to the running instance name and to its definition, as part
// of its making (awaited after a cancel, like a create), adding the time it took to took.
func (c *Conn) Attach(ctx context.Context, name, what, x string, took *time.Duration) error {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("look up instance %q: %w", name, err)
	}
	return c.step(ctx, name, fmt.Sprintf("attach %s to %q", what, name), took, func() error {
		return c.api.DomainAttachDeviceFlags(dom, x, uint32(libvirt.DomainDeviceModifyLive|libvirt.DomainDeviceModifyConfig))
	})
}

// Grow makes the disk target of the running instance name size bytes, which its guest
// sees at once (a restored instance whose job asks for a larger disk). Like a create, the
// call is awaited after a cancel.
func (c *Conn) Grow(ctx context.Context, name, target string, size uint64, took *time.Duration) error {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("look up instance %q: %w", name, err)
	}
	return c.step(ctx, name, fmt.Sprintf("grow the disk %s of %q", target, name), took, func() error {
		return c.api.DomainBlockResize(dom, target, size, libvirt.DomainBlockResizeBytes)
	})
}

// LinksUp brings up the link of each NIC of the instance name with one of the MAC
// addresses macs, under the job filter where the NIC has a reserved address.
func (c *Conn) LinksUp(name string, macs []string) error {
	if len(macs) == 0 {
		return nil
	}
	dom, x, rs, err := c.running(name)
	if err != nil {
		return err
	}
	for _, mac := range macs {
		ix, err := template.LinkUp(x, mac)
		if err != nil {
			return fmt.Errorf("instance %q: %w", name, err)
		}
		if ix, err = filteredNIC(ix, rs); err != nil {
			return fmt.Errorf("instance %q: %w", name, err)
		}
		if err := c.api.DomainUpdateDeviceFlags(dom, ix, libvirt.DomainDeviceModifyLive); err != nil {
			return fmt.Errorf("instance %q: bring up the link of its NIC %s: %w", name, mac, err)
		}
	}
	return nil
}

// Undefine undefines the stopped domain name (a saved one), leaving its volumes.
func (c *Conn) Undefine(name string) error {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("look up %q: %w", name, err)
	}
	x, err := c.api.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if err != nil {
		return fmt.Errorf("definition of %q: %w", name, err)
	}
	if err := c.Unreserve(name, x); err != nil {
		return err
	}
	if err := c.api.DomainUndefineFlags(dom, libvirt.DomainUndefineManagedSave); err != nil {
		return fmt.Errorf("undefine %q: %w", name, err)
	}
	return nil
}
