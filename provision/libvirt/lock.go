package libvirt

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/digitalocean/go-libvirt"
)

// Pool locks: the volume NAME.lock in the pool, which libvirt creates only if there is
// none. Every client of the libvirt sees it, whatever its user, configuration or host:
// what it guards (a warm image, a helper disk) is shared by all of them, where a lock
// file on one runner host would guard it from that host's processes only.

// lockStaleAfter is the age past which a lock whose holder shows no sign of life is
// taken for the leftover of a process that died.
const lockStaleAfter = 2 * time.Minute

// unlockTime bounds the removal of a lock after a cancel.
const unlockTime = 4 * time.Second

// PoolLock takes the pool lock name in the pool poolName. With wait, it tries until ctx
// ends; without, it returns ok false at once if another holds it. alive tells whether
// its holder still works (a lock older than lockStaleAfter whose holder does not is
// removed, and log says so); nil: only the age counts.
func (c *Conn) PoolLock(ctx context.Context, log *slog.Logger, poolName, name string, wait bool, alive func() bool) (unlock func(), ok bool, err error) {
	pool, err := c.api.StoragePoolLookupByName(poolName)
	if err != nil {
		return nil, false, fmt.Errorf("storage pool %q: %w", poolName, err)
	}
	x, err := volumeXML(name+".lock", 0, 0)
	if err != nil {
		return nil, false, err
	}
	for {
		v, err := c.api.StorageVolCreateXML(pool, x, 0)
		if err == nil {
			return func() { c.poolUnlock(log, v) }, true, nil
		}
		if !HasCode(err, libvirt.ErrStorageVolExist) {
			return nil, false, fmt.Errorf("lock %s in pool %q: %w", name, poolName, err)
		}
		if c.staleLock(pool, name, alive) {
			log.Warn(fmt.Sprintf("removed the lock %s.lock, left by a process that is gone", name))
			continue
		}
		if !wait {
			return nil, false, nil
		}
		select {
		case <-ctx.Done():
			return nil, false, fmt.Errorf("lock %s in pool %q: %w", name, poolName, context.Cause(ctx))
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// poolUnlock deletes the lock volume, on a new connection if c is gone (a cancel).
func (c *Conn) poolUnlock(log *slog.Logger, v libvirt.StorageVol) {
	if err := c.api.StorageVolDelete(v, 0); err == nil || HasCode(err, libvirt.ErrNoStorageVol) {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), unlockTime)
	defer cancel()
	side, err := c.redial(ctx)
	if err != nil {
		log.Warn(fmt.Sprintf("could not remove the lock %s: %v; it goes once stale", v.Name, err))
		return
	}
	defer side.Close()
	if err := side.api.StorageVolDelete(v, 0); err != nil && !HasCode(err, libvirt.ErrNoStorageVol) {
		log.Warn(fmt.Sprintf("could not remove the lock %s: %v; it goes once stale", v.Name, err))
	}
}

// staleLock tells whether the lock name is older than lockStaleAfter with its holder
// not alive, and if so removes it.
func (c *Conn) staleLock(pool libvirt.StoragePool, name string, alive func() bool) bool {
	v, err := c.api.StorageVolLookupByName(pool, name+".lock")
	if err != nil {
		return HasCode(err, libvirt.ErrNoStorageVol) // gone meanwhile: try again
	}
	x, err := c.api.StorageVolGetXMLDesc(v, 0)
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
	err = c.api.StorageVolDelete(v, 0)
	return err == nil || HasCode(err, libvirt.ErrNoStorageVol)
}
