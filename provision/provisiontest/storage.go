package provisiontest

import (
	"io"
	"slices"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Storage: pools of volumes, their XML, and (saverestore.go) their content.

func (f *Libvirt) StoragePoolLookupByName(name string) (libvirt.StoragePool, error) {
	if err := f.enter("StoragePoolLookupByName"); err != nil {
		return libvirt.StoragePool{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[name]; !ok {
		return libvirt.StoragePool{}, lverr(libvirt.ErrNoStoragePool, "Storage pool not found: no storage pool with matching name '%s'", name)
	}
	return libvirt.StoragePool{Name: name}, nil
}

func (f *Libvirt) StorageVolCreateXML(p libvirt.StoragePool, x string, fl libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error) {
	if err := f.enter("StorageVolCreateXML"); err != nil {
		return libvirt.StorageVol{}, err
	}
	return callFor(f, "StorageVolCreateXML", func() (libvirt.StorageVol, error) { return f.createVol(p, x, fl) })
}

func (f *Libvirt) createVol(p libvirt.StoragePool, x string, _ libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var v libvirtxml.StorageVolume
	if err := v.Unmarshal(x); err != nil {
		return libvirt.StorageVol{}, lverr(libvirt.ErrXMLError, "%v", err)
	}
	if _, ok := f.pools[p.Name][v.Name]; ok {
		return libvirt.StorageVol{}, lverr(libvirt.ErrStorageVolExist, "storage volume '%s' exists already", v.Name)
	}
	f.pools[p.Name][v.Name] = x
	return libvirt.StorageVol{Pool: p.Name, Name: v.Name}, nil
}

// StorageVolUpload writes length bytes of r into the volume at offset.
func (f *Libvirt) StorageVolUpload(v libvirt.StorageVol, r io.Reader, offset, length uint64, _ libvirt.StorageVolUploadFlags) error {
	if err := f.enter("StorageVolUpload"); err != nil {
		return err
	}
	b, err := io.ReadAll(io.LimitReader(r, int64(length)))
	if err != nil {
		return lverr(libvirt.ErrInternalError, "upload: %v", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[v.Pool][v.Name]; !ok {
		return lverr(libvirt.ErrNoStorageVol, "Storage volume not found: '%s'", v.Name)
	}
	key := v.Pool + "/" + v.Name
	d := f.data[key]
	if end := int(offset) + len(b); end > len(d) {
		d = append(d, make([]byte, end-len(d))...)
	}
	copy(d[offset:], b)
	f.data[key] = d
	return nil
}

// StoragePoolListAllVolumes lists the pool's volumes, by name.
func (f *Libvirt) StoragePoolListAllVolumes(p libvirt.StoragePool, _ int32, _ uint32) ([]libvirt.StorageVol, uint32, error) {
	if err := f.enter("StoragePoolListAllVolumes"); err != nil {
		return nil, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	vols, ok := f.pools[p.Name]
	if !ok {
		return nil, 0, lverr(libvirt.ErrNoStoragePool, "Storage pool not found: no storage pool with matching name '%s'", p.Name)
	}
	var out []libvirt.StorageVol
	for n := range vols {
		out = append(out, libvirt.StorageVol{Pool: p.Name, Name: n})
	}
	slices.SortFunc(out, func(a, b libvirt.StorageVol) int { return strings.Compare(a.Name, b.Name) })
	return out, uint32(len(out)), nil
}

func (f *Libvirt) StorageVolLookupByName(p libvirt.StoragePool, name string) (libvirt.StorageVol, error) {
	if err := f.enter("StorageVolLookupByName"); err != nil {
		return libvirt.StorageVol{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[p.Name][name]; !ok {
		return libvirt.StorageVol{}, lverr(libvirt.ErrNoStorageVol, "Storage volume not found: no storage vol with matching name '%s'", name)
	}
	return libvirt.StorageVol{Pool: p.Name, Name: name}, nil
}

func (f *Libvirt) StorageVolDelete(v libvirt.StorageVol, _ libvirt.StorageVolDeleteFlags) error {
	if err := f.enter("StorageVolDelete"); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[v.Pool][v.Name]; !ok {
		return lverr(libvirt.ErrNoStorageVol, "Storage volume not found: '%s'", v.Name)
	}
	delete(f.pools[v.Pool], v.Name)
	delete(f.data, v.Pool+"/"+v.Name)
	return nil
}

// StorageVolLookupByPath finds a volume by its file's path (/POOL/NAME): the template
// disk /t/root.qcow2 in the pool TemplatePool, an overlay in its pool.
func (f *Libvirt) StorageVolLookupByPath(path string) (libvirt.StorageVol, error) {
	if err := f.enter("StorageVolLookupByPath"); err != nil {
		return libvirt.StorageVol{}, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	pool, name, ok := f.volAt(path)
	if !ok {
		return libvirt.StorageVol{}, lverr(libvirt.ErrNoStorageVol, "Storage volume not found: no storage vol with matching path '%s'", path)
	}
	return libvirt.StorageVol{Pool: pool, Name: name}, nil
}

// VolumeXML is the XML a volume was created with, or "".
func (f *Libvirt) VolumeXML(pool, name string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pools[pool][name]
}

// DeleteVolumes deletes every volume of pool behind the client's back.
func (f *Libvirt) DeleteVolumes(pool string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pools[pool] = map[string]string{}
}

// RemovePool removes pool and its volumes behind the client's back.
func (f *Libvirt) RemovePool(pool string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.pools, pool)
}

// PoolCapacity is the size every fake pool reports.
const PoolCapacity = 100 << 30

// StoragePoolGetInfo says every pool is running, of PoolCapacity bytes (or
// SetPoolCapacity's), with its volumes' content allocated.
func (f *Libvirt) StoragePoolGetInfo(p libvirt.StoragePool) (uint8, uint64, uint64, uint64, error) {
	if err := f.enter("StoragePoolGetInfo"); err != nil {
		return 0, 0, 0, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	vols, ok := f.pools[p.Name]
	if !ok {
		return 0, 0, 0, 0, lverr(libvirt.ErrNoStoragePool, "Storage pool not found: no storage pool with matching name '%s'", p.Name)
	}
	var used uint64
	for n := range vols {
		used += uint64(len(f.data[p.Name+"/"+n]))
	}
	size := uint64(PoolCapacity)
	if n, ok := f.poolSizes[p.Name]; ok {
		size = n
	}
	return uint8(libvirt.StoragePoolRunning), size, used, size - min(used, size), nil
}

// SetPoolCapacity makes pool report a size of bytes (PoolCapacity before).
func (f *Libvirt) SetPoolCapacity(pool string, bytes uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.poolSizes == nil {
		f.poolSizes = map[string]uint64{}
	}
	f.poolSizes[pool] = bytes
}
