package libvirt

import (
	"fmt"

	"github.com/digitalocean/go-libvirt"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// PoolFree is how many bytes the storage pool has free.
func (c *Conn) PoolFree(pool string) (uint64, error) {
	p, err := c.api.StoragePoolLookupByName(pool)
	if err != nil {
		return 0, fmt.Errorf("storage pool %q: %w", pool, err)
	}
	_, _, _, avail, err := c.api.StoragePoolGetInfo(p)
	if err != nil {
		return 0, fmt.Errorf("storage pool %q: %w", pool, err)
	}
	return avail, nil
}

// Growth is how much the volumes of vols in pool may still grow: each one's capacity
// (what its guest sees) less what it holds now. Volumes in other pools, and volumes
// gone or not made yet, count nothing.
func (c *Conn) Growth(pool string, vols []meta.Volume) (uint64, error) {
	var n uint64
	var p libvirt.StoragePool
	for _, v := range vols {
		if v.Pool != pool {
			continue
		}
		if p.Name == "" {
			var err error
			if p, err = c.api.StoragePoolLookupByName(pool); err != nil {
				return 0, fmt.Errorf("storage pool %q: %w", pool, err)
			}
		}
		vol, err := c.api.StorageVolLookupByName(p, v.Name)
		if HasCode(err, libvirt.ErrNoStorageVol) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("volume %q: %w", v.Name, err)
		}
		_, capacity, alloc, err := c.api.StorageVolGetInfo(vol)
		if HasCode(err, libvirt.ErrNoStorageVol) {
			continue // removed meanwhile
		}
		if err != nil {
			return 0, fmt.Errorf("volume %q: %w", v.Name, err)
		}
		if capacity > alloc {
			n += capacity - alloc
		}
	}
	return n, nil
}

// Capacity is what the new volumes vols may grow to together: each one's capacity, or
// its backing file's where it takes that (a backing file no pool knows counts nothing).
func (c *Conn) Capacity(vols []NewVolume) (uint64, error) {
	var n uint64
	for _, v := range vols {
		if v.Capacity > 0 {
			n += v.Capacity
			continue
		}
		have, _, err := c.BackingCapacity(v.BackingPath)
		if err != nil {
			return 0, err
		}
		n += have
	}
	return n, nil
}
