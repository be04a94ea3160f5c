package provision

import (
	"errors"
	"slices"
	"strings"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
)

// Inventory is what one host holds of ours, read in one go: its instances, its warm
// images, its pool, and the capacity in use against the limits. `metrics` and `doctor`
// read it; nothing here changes anything.
type Inventory struct {
	URI       string
	Instances []libvirt.Instance // every domain with our metadata, whatever its prefix
	Warm      []WarmInfo         // the complete warm images in the pool, by name
	Pool      PoolInfo
	// InUse is what counts against Limits now (running instances of this prefix, not
	// ending), as prepare counts it.
	InUse  Usage
	Limits Limits
}

// PoolInfo is the instance pool (LIBVIRT_GCI_POOL) as libvirt sees it.
type PoolInfo struct {
	Name                            string
	Found, Active                   bool
	Capacity, Allocation, Available uint64 // bytes
}

// WarmInfo is one warm image: its volumes' bytes on disk and the instances standing on it.
type WarmInfo struct {
	Name      string
	Bytes     uint64   // the allocation of its volumes (overlays, memory image, marks)
	Volumes   int      // how many
	Users     int      // instances restored from it that are still there
	Templates []string // of those instances
}

// Inventory reads the host's inventory over conn. A pool that is missing or inactive is
// said so in Pool, not as an error: the instances are there all the same.
func (h *Host) Inventory(conn *libvirt.Conn) (Inventory, error) {
	inv := Inventory{URI: h.URI, Limits: h.Limits, Pool: PoolInfo{Name: h.Pool}}
	var err error
	if inv.Instances, err = conn.Instances(); err != nil {
		return inv, err
	}
	inv.InUse = h.usage(inv.Instances)
	var pool *libvirt.Pool
	if inv.Pool, pool, err = h.poolInfo(conn); err != nil || !inv.Pool.Active {
		return inv, err // an inactive pool lists no volumes
	}
	inv.Warm, err = warmImages(pool, inv.Instances)
	return inv, err
}

// poolInfo reads the instance pool's state and space; a pool that is not there is not
// Found, without an error.
func (h *Host) poolInfo(conn *libvirt.Conn) (PoolInfo, *libvirt.Pool, error) {
	info := PoolInfo{Name: h.Pool}
	pool, err := conn.Pool(h.Pool)
	if errors.Is(err, libvirt.ErrNoPool) {
		return info, nil, nil
	}
	if err != nil {
		return info, nil, err
	}
	info.Found = true
	st, err := pool.State()
	if err != nil {
		return info, pool, err
	}
	info.Active = st.Active
	info.Capacity, info.Allocation, info.Available = st.Capacity, st.Allocation, st.Available
	return info, pool, nil
}

// warmImages are the complete warm images in pool (those with their done mark), with the
// instances of list that stand on them.
func warmImages(pool *libvirt.Pool, list []libvirt.Instance) ([]WarmInfo, error) {
	vols, err := pool.Volumes()
	if err != nil {
		return nil, err
	}
	byName := map[string]*WarmInfo{}
	for _, v := range vols {
		if base, ok := libvirt.MarkOf(v); ok && strings.HasPrefix(base, warmPrefix) {
			byName[base] = &WarmInfo{Name: base}
		}
	}
	for _, v := range vols {
		for name, w := range byName {
			if !warmPart(name, v) && v != libvirt.DoneMark(name) {
				continue
			}
			alloc, gone, err := pool.Held(v)
			if gone {
				break // removed meanwhile
			}
			if err != nil {
				return nil, err
			}
			w.Bytes += alloc
			w.Volumes++
		}
	}
	for _, in := range list {
		if w := byName[in.Metadata.Warm]; w != nil {
			w.Users++
			if !slices.Contains(w.Templates, in.Metadata.Template) {
				w.Templates = append(w.Templates, in.Metadata.Template)
			}
		}
	}
	out := make([]WarmInfo, 0, len(byName))
	for _, w := range byName {
		out = append(out, *w)
	}
	slices.SortFunc(out, func(a, b WarmInfo) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}
