package libvirt

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

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

// LockHolder is who takes a pool lock: ID, written into the lock (unique to this
// taking: a process's identity and a random token), and Gone, which tells from the ID a
// lock carries whether its holder is certainly gone (a process of this host that has
// died). Either may be zero: then only the lock's age and alive count.
type LockHolder struct {
	ID   string
	Gone func(id string) bool
}

// lockSize is the size of a lock volume: room for its holder's ID.
const lockSize = 512

// holderReadEvery is how often a waiting PoolLock reads a remote lock's holder.
const holderReadEvery = 5 * time.Second

// PoolLock takes the pool lock name in the pool poolName for holder. With wait, it tries
// until ctx ends; without, it returns ok false at once if another holds it. A lock whose
// holder is gone (holder.Gone) is removed at once; one older than lockStaleAfter whose
// holder does not work (alive; nil: only the age counts) too; log says so. unlock
// removes the lock only while it is still this holder's.
func (c *Conn) PoolLock(ctx context.Context, log *slog.Logger, poolName, name string, wait bool, alive func() bool, holder LockHolder) (unlock func(), ok bool, err error) {
	pool, err := c.api.StoragePoolLookupByName(poolName)
	if err != nil {
		return nil, false, fmt.Errorf("storage pool %q: %w", poolName, err)
	}
	x, err := volumeXML(name+".lock", lockSize, 0)
	if err != nil {
		return nil, false, err
	}
	var nextRead time.Time // a remote lock's holder is read through a stream: not at every try
	for {
		v, err := c.api.StorageVolCreateXML(pool, x, 0)
		if err == nil {
			if holder.ID != "" {
				if err := c.upload(ctx, v, []byte(holder.ID+"\n")); err != nil {
					log.Debug(fmt.Sprintf("lock %s: could not write its holder: %v", name, err))
				}
			}
			return func() { c.poolUnlock(log, v, holder.ID) }, true, nil
		}
		if !HasCode(err, libvirt.ErrStorageVolExist) {
			return nil, false, fmt.Errorf("lock %s in pool %q: %w", name, poolName, err)
		}
		gone := holder.Gone
		if !c.local && time.Now().Before(nextRead) {
			gone = nil
		} else if !c.local {
			nextRead = time.Now().Add(holderReadEvery)
		}
		if why := c.staleLock(ctx, pool, name, alive, gone); why != "" {
			if why != goneMeanwhile {
				log.Warn(fmt.Sprintf("removed the lock %s.lock: %s", name, why))
			}
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

// lockHolderOf reads the holder's ID from the lock volume v; "" if it has none (an older
// tool's lock, or one whose holder has not written it yet).
func (c *Conn) lockHolderOf(ctx context.Context, v libvirt.StorageVol) string {
	b, err := c.readLocal(v, lockSize)
	if err != nil {
		if b, err = c.readPrefix(ctx, v, lockSize); err != nil {
			return ""
		}
	}
	return strings.TrimSpace(strings.TrimRight(string(b), "\x00"))
}

// poolUnlock deletes the lock volume, on a new connection if c is gone (a cancel), if
// it is still id's: a holder taken for gone (a process that waited past lockStaleAfter)
// must not delete the lock of the process that took its place.
func (c *Conn) poolUnlock(log *slog.Logger, v libvirt.StorageVol, id string) {
	ctx, cancel := context.WithTimeout(context.Background(), unlockTime)
	defer cancel()
	conn := c
	if _, _, _, err := c.api.StorageVolGetInfo(v); err != nil && !HasCode(err, libvirt.ErrNoStorageVol) {
		side, err := c.redial(ctx)
		if err != nil {
			log.Warn(fmt.Sprintf("could not remove the lock %s: %v; it goes once stale", v.Name, err))
			return
		}
		defer side.Close()
		conn = side
	}
	if id != "" {
		if got := conn.lockHolderOf(ctx, v); got != "" && got != id {
			log.Warn(fmt.Sprintf("the lock %s is no longer ours (another process took it for stale); leaving it", v.Name))
			return
		}
	}
	if err := conn.api.StorageVolDelete(v, 0); err != nil && !HasCode(err, libvirt.ErrNoStorageVol) {
		log.Warn(fmt.Sprintf("could not remove the lock %s: %v; it goes once stale", v.Name, err))
	}
}

// goneMeanwhile: the lock went before staleLock looked at it.
const goneMeanwhile = "gone meanwhile"

// staleLock says why the lock name is stale, and removes it, or says "": its holder is
// gone (gone), or it is older than lockStaleAfter with its holder not alive.
func (c *Conn) staleLock(ctx context.Context, pool libvirt.StoragePool, name string, alive func() bool, gone func(string) bool) string {
	v, err := c.api.StorageVolLookupByName(pool, name+".lock")
	if err != nil {
		if HasCode(err, libvirt.ErrNoStorageVol) {
			return goneMeanwhile // try again
		}
		return ""
	}
	why := ""
	if gone != nil {
		if id := c.lockHolderOf(ctx, v); id != "" && gone(id) {
			why = "its holder is gone"
		}
	}
	if why == "" {
		made, ok := c.volumeMade(v)
		if !ok || time.Since(made) < lockStaleAfter || (alive != nil && alive()) {
			return ""
		}
		why = fmt.Sprintf("older than %s, left by a process that is gone", lockStaleAfter)
	}
	err = c.api.StorageVolDelete(v, 0)
	if err == nil || HasCode(err, libvirt.ErrNoStorageVol) {
		return why
	}
	return ""
}

// ClearLocks removes the pool's locks whose holder is certainly gone (gone, as
// LockHolder.Gone), which the next taker of each would otherwise remove: gc leaves none
// of a killed process behind. It returns the names of those it removed.
func (p *Pool) ClearLocks(ctx context.Context, gone func(id string) bool) ([]string, error) {
	vols, err := p.Volumes()
	if err != nil {
		return nil, err
	}
	var removed []string
	for _, v := range vols {
		name, ok := strings.CutSuffix(v, ".lock")
		if !ok {
			continue
		}
		if why := p.c.staleLock(ctx, p.p, name, func() bool { return true }, gone); why != "" && why != goneMeanwhile {
			removed = append(removed, v)
		}
	}
	return removed, nil
}
