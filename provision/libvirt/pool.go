package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Pool is a storage pool, looked up once: what the façade asks of a pool goes through
// it, so that the façade speaks to libvirt through this package alone.
type Pool struct {
	c *Conn
	p libvirt.StoragePool
}

// ErrNoPool: libvirt has no storage pool of that name.
var ErrNoPool = errors.New("no such storage pool")

// Pool looks up the storage pool name; an error wrapping ErrNoPool where there is none.
func (c *Conn) Pool(name string) (*Pool, error) {
	p, err := c.api.StoragePoolLookupByName(name)
	if HasCode(err, libvirt.ErrNoStoragePool) {
		return nil, fmt.Errorf("storage pool %q: %w", name, ErrNoPool)
	}
	if err != nil {
		return nil, fmt.Errorf("storage pool %q: %w", name, err)
	}
	return &Pool{c: c, p: p}, nil
}

// Name is the pool's name.
func (p *Pool) Name() string { return p.p.Name }

// Has says whether the pool holds the volume name.
func (p *Pool) Has(name string) (bool, error) {
	_, err := p.c.api.StorageVolLookupByName(p.p, name)
	if HasCode(err, libvirt.ErrNoStorageVol) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("volume %q in pool %q: %w", name, p.p.Name, err)
	}
	return true, nil
}

// Path is the file of the volume name on the libvirt host; "" where the pool has none.
func (p *Pool) Path(name string) (string, error) {
	v, err := p.c.api.StorageVolLookupByName(p.p, name)
	if HasCode(err, libvirt.ErrNoStorageVol) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("volume %q in pool %q: %w", name, p.p.Name, err)
	}
	path, err := p.c.api.StorageVolGetPath(v)
	if err != nil {
		return "", fmt.Errorf("volume %q in pool %q: %w", name, p.p.Name, err)
	}
	return path, nil
}

// Volumes are the names of the pool's volumes.
func (p *Pool) Volumes() ([]string, error) {
	vols, _, err := p.c.api.StoragePoolListAllVolumes(p.p, 1, 0)
	if err != nil {
		return nil, fmt.Errorf("list pool %q: %w", p.p.Name, err)
	}
	names := make([]string, len(vols))
	for i, v := range vols {
		names[i] = v.Name
	}
	return names, nil
}

// Held is how many bytes the volume name holds; gone says it is not there (any more).
func (p *Pool) Held(name string) (bytes uint64, gone bool, err error) {
	v, err := p.c.api.StorageVolLookupByName(p.p, name)
	if err == nil {
		_, _, bytes, err = p.c.api.StorageVolGetInfo(v)
	}
	if HasCode(err, libvirt.ErrNoStorageVol) {
		return 0, true, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("volume %q: %w", name, err)
	}
	return bytes, false, nil
}

// PoolState is a pool's state and space, in bytes.
type PoolState struct {
	Active                          bool
	Capacity, Allocation, Available uint64
}

// State reads the pool's state and space.
func (p *Pool) State() (PoolState, error) {
	state, capacity, alloc, avail, err := p.c.api.StoragePoolGetInfo(p.p)
	if err != nil {
		return PoolState{}, fmt.Errorf("storage pool %q: %w", p.p.Name, err)
	}
	return PoolState{Active: libvirt.StoragePoolState(state) == libvirt.StoragePoolRunning, Capacity: capacity, Allocation: alloc, Available: avail}, nil
}

// Mark creates the empty volume name: a mark whose presence says something.
func (p *Pool) Mark(name string) error {
	_, err := p.c.CreateVolume(p.p, name, 0, 0)
	return err
}

// Create creates the raw volume name of capacity bytes, with the file mode mode (0: the
// pool's default).
func (p *Pool) Create(name string, capacity uint64, mode uint) error {
	_, err := p.c.CreateVolume(p.p, name, capacity, mode)
	return err
}

// Upload writes size bytes of r into the volume name, from its start.
func (p *Pool) Upload(name string, r io.Reader, size uint64) error {
	v, err := p.c.api.StorageVolLookupByName(p.p, name)
	if err != nil {
		return fmt.Errorf("volume %q in pool %q: %w", name, p.p.Name, err)
	}
	if err := p.c.api.StorageVolUpload(v, r, 0, size, 0); err != nil {
		return fmt.Errorf("upload %s: %w", name, err)
	}
	return nil
}

// Delete deletes the volumes whose names match.
func (p *Pool) Delete(match func(string) bool) error { return p.c.DeleteVolumes(p.p, match) }

// RemoveUnused is Conn.RemoveUnused in this pool.
func (p *Pool) RemoveUnused(image func(v string) (string, bool), part func(name, v string) bool) (int, error) {
	return p.c.RemoveUnused(p.p, image, part)
}

// RemoveOldestUnused is Conn.RemoveOldestUnused in this pool.
func (p *Pool) RemoveOldestUnused(names []string, part func(name, v string) bool) (string, error) {
	return p.c.RemoveOldestUnused(p.p, names, part)
}

// VolumeAt says which pool knows the file path, and the volume's identity there: its
// capacity and, where libvirt gives it, its file's modification time; known is false
// where no pool does.
func (c *Conn) VolumeAt(path string) (pool, stamp string, known bool) {
	v, err := c.api.StorageVolLookupByPath(path)
	if err != nil {
		return "", "", false
	}
	x, err := c.api.StorageVolGetXMLDesc(v, 0)
	if err != nil {
		return v.Pool, "", true
	}
	var vol libvirtxml.StorageVolume
	if vol.Unmarshal(x) == nil && vol.Target != nil && vol.Target.Timestamps != nil && vol.Capacity != nil {
		stamp = fmt.Sprintf("vol/%d/%s", vol.Capacity.Value, vol.Target.Timestamps.Mtime)
	}
	return v.Pool, stamp, true
}

// ReadSaveImage reads the header of the save image name in the pool; gone says there is
// none.
func (p *Pool) ReadSaveImage(ctx context.Context, name string) (img *SaveImage, gone bool, err error) {
	v, err := p.c.api.StorageVolLookupByName(p.p, name)
	if HasCode(err, libvirt.ErrNoStorageVol) {
		return nil, true, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("volume %q in pool %q: %w", name, p.p.Name, err)
	}
	img, err = p.c.ReadSaveImage(ctx, v)
	return img, false, err
}

// DomainNames are the names of libvirt's domains, running or not.
func (c *Conn) DomainNames() ([]string, error) {
	doms, _, err := c.api.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	names := make([]string, len(doms))
	for i, d := range doms {
		names[i] = d.Name
	}
	return names, nil
}

// DomainXML is the definition of the domain name (inactive: as it starts next, not as
// it runs); an error with ErrNoInstance where there is no such domain.
func (c *Conn) DomainXML(name string, inactive bool) (string, error) {
	dom, err := c.api.DomainLookupByName(name)
	if HasCode(err, libvirt.ErrNoDomain) {
		return "", fmt.Errorf("no domain %q: %w", name, ErrNoInstance)
	}
	if err != nil {
		return "", fmt.Errorf("look up %q: %w", name, err)
	}
	var fl libvirt.DomainXMLFlags
	if inactive {
		fl = libvirt.DomainXMLInactive
	}
	x, err := c.api.DomainGetXMLDesc(dom, fl)
	if HasCode(err, libvirt.ErrNoDomain) {
		return "", fmt.Errorf("no domain %q: %w", name, ErrNoInstance)
	}
	if err != nil {
		return "", fmt.Errorf("definition of %q: %w", name, err)
	}
	return x, nil
}

// Save saves the running domain domName into the pool's volume name (made empty before).
func (p *Pool) Save(ctx context.Context, domName, name string) error {
	v, err := p.c.api.StorageVolLookupByName(p.p, name)
	if err != nil {
		return fmt.Errorf("volume %q in pool %q: %w", name, p.p.Name, err)
	}
	return p.c.Save(ctx, domName, v)
}

// An image made once in a pool (a warm image, a helper disk) is whole once its mark,
// the empty volume NAME.done, is there: made last, removed first, so that a half-made
// or half-removed image is never used (RemoveUnused).

// DoneMark is the volume that marks the image name whole.
func DoneMark(name string) string { return name + ".done" }

// MarkOf says whether the volume v is an image's mark, and the image's name.
func MarkOf(v string) (name string, ok bool) { return strings.CutSuffix(v, ".done") }

// Whole says whether the image name has its mark.
func (p *Pool) Whole(name string) (bool, error) { return p.Has(DoneMark(name)) }

// MarkWhole marks the image name whole.
func (p *Pool) MarkWhole(name string) error { return p.Mark(DoneMark(name)) }
