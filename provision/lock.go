package provision

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
)

// Pool locks: the volume NAME.lock in the pool, which libvirt creates only if there is
// none. Every client of the libvirt sees it, whatever its user, configuration or host:
// what it guards (a warm image, a helper disk) is shared by all of them, where a lock
// file on one runner host would guard it from that host's processes only.

// lockStaleAfter is the age past which a lock whose holder shows no sign of life is
// taken for the leftover of a process that died.
const lockStaleAfter = 2 * time.Minute

// poolLock takes the pool lock name. With wait, it tries until ctx ends; without, it
// returns ok false at once if another holds it. alive tells whether its holder still
// works (a lock older than lockStaleAfter whose holder does not is removed); nil: only
// the age counts.
func (h *Host) poolLock(ctx context.Context, conn *libvirt.Conn, name string, wait bool, alive func() bool) (unlock func(), ok bool, err error) {
	pool, err := conn.API().StoragePoolLookupByName(h.Pool)
	if err != nil {
		return nil, false, fmt.Errorf("storage pool %q: %w", h.Pool, err)
	}
	x := fmt.Sprintf("<volume><name>%s.lock</name><capacity unit='bytes'>0</capacity><target><format type='raw'/></target></volume>", name)
	for {
		v, err := conn.API().StorageVolCreateXML(pool, x, 0)
		if err == nil {
			return func() { h.poolUnlock(conn, v) }, true, nil
		}
		if !libvirt.HasCode(err, golibvirt.ErrStorageVolExist) {
			return nil, false, fmt.Errorf("lock %s in pool %q: %w", name, h.Pool, err)
		}
		if h.staleLock(conn, pool, name, alive) {
			h.Log.Warn(fmt.Sprintf("removed the lock %s.lock, left by a process that is gone", name))
			continue
		}
		if !wait {
			return nil, false, nil
		}
		if !guest.Sleep(ctx, 250*time.Millisecond) {
			return nil, false, fmt.Errorf("lock %s in pool %q: %w", name, h.Pool, context.Cause(ctx))
		}
	}
}

// poolUnlock deletes the lock volume, on a new connection if conn is gone (a cancel).
func (h *Host) poolUnlock(conn *libvirt.Conn, v golibvirt.StorageVol) {
	if err := conn.API().StorageVolDelete(v, 0); err == nil || libvirt.HasCode(err, golibvirt.ErrNoStorageVol) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), AfterCancel)
	defer cancel()
	c, err := h.Connect(ctx)
	if err != nil {
		h.Log.Warn(fmt.Sprintf("could not remove the lock %s: %v; it goes once stale", v.Name, err))
		return
	}
	defer c.Close()
	if err := c.API().StorageVolDelete(v, 0); err != nil && !libvirt.HasCode(err, golibvirt.ErrNoStorageVol) {
		h.Log.Warn(fmt.Sprintf("could not remove the lock %s: %v; it goes once stale", v.Name, err))
	}
}

// staleLock tells whether the lock name is older than lockStaleAfter with its holder
// not alive, and if so removes it.
func (h *Host) staleLock(conn *libvirt.Conn, pool golibvirt.StoragePool, name string, alive func() bool) bool {
	v, err := conn.API().StorageVolLookupByName(pool, name+".lock")
	if err != nil {
		return libvirt.HasCode(err, golibvirt.ErrNoStorageVol) // gone meanwhile: try again
	}
	x, err := conn.API().StorageVolGetXMLDesc(v, 0)
	if err != nil {
		return false
	}
	var vol libvirtxml.StorageVolume
	if vol.Unmarshal(x) != nil || vol.Target == nil || vol.Target.Timestamps == nil {
		return false
	}
	sec, _, _ := strings.Cut(vol.Target.Timestamps.Ctime, ".")
	made, err := strconv.ParseInt(sec, 10, 64)
	if err != nil || time.Since(time.Unix(made, 0)) < lockStaleAfter || (alive != nil && alive()) {
		return false
	}
	err = conn.API().StorageVolDelete(v, 0)
	return err == nil || libvirt.HasCode(err, golibvirt.ErrNoStorageVol)
}
