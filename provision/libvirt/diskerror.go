package libvirt

import (
	"context"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// DiskFullError: the VM paused because a write of its to one of its disks could not be
// stored on the host, for want of room in the file system under its storage pool. The
// instance's disks pause on that (error_policy 'enospc', see template.Render): a guest
// told of the failed write would fail its writes, or wait on them, for ever, and the
// job's result would be the host's failure passed off as the job's.
type DiskFullError struct{ Name string }

func (e *DiskFullError) Error() string {
	return "the VM paused: a write to its disks could not be stored, the file system under its storage pool is full"
}

// DiskFull says whether the domain name is paused on a failed write to its disks: a
// *DiskFullError, or nil (also where libvirt cannot tell).
func (c *Conn) DiskFull(name string) error {
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return nil
	}
	state, reason, err := c.api.DomainGetState(dom, 0)
	if err != nil || libvirt.DomainState(state) != libvirt.DomainPaused || libvirt.DomainPausedReason(reason) != libvirt.DomainPausedIoerror {
		return nil
	}
	return &DiskFullError{Name: name}
}

// diskWatch is how often WatchDisks looks whether the VM paused on a full pool.
const diskWatch = time.Second

// WatchDisks returns a context that ends, with a *DiskFullError as its cause, once the
// domain name is paused on a write its host could not store; a stage or a prepare
// waiting on its guest then fails at once, not at its timeout.
func (c *Conn) WatchDisks(ctx context.Context, name string) (context.Context, context.CancelFunc) {
	wctx, cancel := context.WithCancelCause(ctx)
	go func() {
		t := time.NewTicker(diskWatch)
		defer t.Stop()
		for {
			select {
			case <-wctx.Done():
				return
			case <-t.C:
				if err := c.DiskFull(name); err != nil {
					cancel(err)
					return
				}
			}
		}
	}()
	return wctx, func() { cancel(context.Canceled) }
}
