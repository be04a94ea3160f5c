package libvirt

import (
	"fmt"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// Volumes in a pool: made empty or of a size, deleted by name, and images (a set of
// volumes with a done mark) removed once no domain uses them.

// volumeXML describes a raw volume of capacity bytes; mode, if not 0, is its file's.
func volumeXML(name string, capacity uint64, mode uint) (string, error) {
	v := libvirtxml.StorageVolume{
		Name:     name,
		Capacity: &libvirtxml.StorageVolumeSize{Unit: "bytes", Value: capacity},
		Target:   &libvirtxml.StorageVolumeTarget{Format: &libvirtxml.StorageVolumeTargetFormat{Type: "raw"}},
	}
	if mode != 0 {
		v.Target.Permissions = &libvirtxml.StorageVolumeTargetPermissions{Mode: fmt.Sprintf("%04o", mode)}
	}
	x, err := v.Marshal()
	if err != nil {
		return "", fmt.Errorf("volume %q XML: %w", name, err)
	}
	return x, nil
}

// CreateVolume creates the raw volume name in pool, of capacity bytes (0 for a mark or
// a file to fill), with the file mode mode (0: the pool's default).
func (c *Conn) CreateVolume(pool libvirt.StoragePool, name string, capacity uint64, mode uint) (libvirt.StorageVol, error) {
	x, err := volumeXML(name, capacity, mode)
	if err != nil {
		return libvirt.StorageVol{}, err
	}
	v, err := c.api.StorageVolCreateXML(pool, x, 0)
	if err != nil {
		return v, fmt.Errorf("create volume %q in pool %q: %w", name, pool.Name, err)
	}
	return v, nil
}

// DeleteVolumes deletes the volumes of pool whose names match.
func (conn *Conn) DeleteVolumes(pool libvirt.StoragePool, match func(string) bool) error {
	vols, _, err := conn.api.StoragePoolListAllVolumes(pool, 1, 0)
	if err != nil {
		return fmt.Errorf("list pool %q: %w", pool.Name, err)
	}
	for _, v := range vols {
		if match(v.Name) {
			if err := conn.api.StorageVolDelete(v, 0); err != nil && !HasCode(err, libvirt.ErrNoStorageVol) {
				return fmt.Errorf("delete %s: %w", v.Name, err)
			}
		}
	}
	return nil
}

// RemoveUnused removes the images in pool that no domain uses: image(v) says whether
// the volume v stands for an image to remove if unused, and its NAME; part(NAME, v)
// whether v is one of its volumes. A domain, running or not, uses an image whose volume
// one of its disks or their backing chains is, or the warm image its metadata names (a
// shut-off domain's XML has no backing chain: a kept VM restored from a warm image
// names it there alone). An image is whole once its mark, the volume NAME.done, is
// there; the mark goes first, so that a half-removed image is made again, never used.
// It says how many it removed.
func (conn *Conn) RemoveUnused(pool libvirt.StoragePool, image func(v string) (string, bool), part func(name, v string) bool) (int, error) {
	vols, _, err := conn.api.StoragePoolListAllVolumes(pool, 1, 0)
	if err != nil {
		return 0, fmt.Errorf("list pool %q: %w", pool.Name, err)
	}
	var names []string
	for _, v := range vols {
		if name, ok := image(v.Name); ok {
			names = append(names, name)
		}
	}
	if len(names) == 0 {
		return 0, nil
	}
	used, err := conn.usedVolumes()
	if err != nil {
		return 0, err
	}
	n := 0
	for _, name := range names {
		if inUse(used, name, part) {
			continue
		}
		if err := conn.removeImage(pool, name, part); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// inUse tells whether the image name is among what the domains use (usedVolumes): by
// its name (a warm image a domain's metadata names), or one of its volumes.
func inUse(used map[string]bool, name string, part func(name, v string) bool) bool {
	if used[name] {
		return true
	}
	for v := range used {
		if part(name, v) {
			return true
		}
	}
	return false
}

// removeImage deletes the image name of pool: its mark first, so that a half-removed
// image is made again, never used, then its volumes.
func (conn *Conn) removeImage(pool libvirt.StoragePool, name string, part func(name, v string) bool) error {
	if err := conn.DeleteVolumes(pool, func(v string) bool { return v == DoneMark(name) }); err != nil {
		return err
	}
	return conn.DeleteVolumes(pool, func(v string) bool { return part(name, v) })
}

// RemoveOldestUnused removes, of the images names (each whole once NAME.done is
// there; part(NAME, v) says whether v is one of its volumes), the one made longest ago
// (its mark's creation time, as the pool's file system keeps it) that no domain uses,
// as RemoveUnused removes it. It returns its name; "" where every one is in use.
func (conn *Conn) RemoveOldestUnused(pool libvirt.StoragePool, names []string, part func(name, v string) bool) (string, error) {
	used, err := conn.usedVolumes()
	if err != nil {
		return "", err
	}
	oldest, oldestMade := "", time.Time{}
	for _, name := range names {
		if inUse(used, name, part) {
			continue
		}
		var made time.Time // zero where libvirt does not say
		if v, err := conn.api.StorageVolLookupByName(pool, DoneMark(name)); err == nil {
			made, _ = conn.volumeMade(v)
		}
		if oldest == "" || made.Before(oldestMade) || made.Equal(oldestMade) && name < oldest {
			oldest, oldestMade = name, made
		}
	}
	if oldest == "" {
		return "", nil
	}
	return oldest, conn.removeImage(pool, oldest, part)
}

// volumeMade is when the volume v was made, as libvirt reads its file's change time
// (to the second); false where it does not say.
func (conn *Conn) volumeMade(v libvirt.StorageVol) (time.Time, bool) {
	x, err := conn.api.StorageVolGetXMLDesc(v, 0)
	if err != nil {
		return time.Time{}, false
	}
	var vol libvirtxml.StorageVolume
	if vol.Unmarshal(x) != nil || vol.Target == nil || vol.Target.Timestamps == nil {
		return time.Time{}, false
	}
	sec, _, _ := strings.Cut(vol.Target.Timestamps.Ctime, ".")
	made, err := strconv.ParseInt(sec, 10, 64)
	if err != nil {
		return time.Time{}, false
	}
	return time.Unix(made, 0), true
}

// usedVolumes is what the domains use: the file or volume name of each of their
// disks' sources and backing chains, and the warm image each one's metadata names.
func (conn *Conn) usedVolumes() (map[string]bool, error) {
	xmls, err := conn.domainXMLs()
	if err != nil {
		return nil, err
	}
	used := map[string]bool{}
	add := func(src *libvirtxml.DomainDiskSource) {
		switch {
		case src == nil:
		case src.File != nil && src.File.File != "":
			used[path.Base(src.File.File)] = true
		case src.Volume != nil && src.Volume.Volume != "":
			used[src.Volume.Volume] = true
		case src.Block != nil && src.Block.Dev != "":
			used[path.Base(src.Block.Dev)] = true
		}
	}
	for _, x := range xmls {
		var dom libvirtxml.Domain
		if err := dom.Unmarshal(x); err != nil {
			return nil, fmt.Errorf("domain XML: %w", err)
		}
		if dom.Metadata != nil {
			if m, ok := meta.FromDomain(dom.Metadata.XML); ok && m.Warm != "" {
				used[m.Warm] = true
			}
		}
		if dom.Devices == nil {
			continue
		}
		for _, d := range dom.Devices.Disks {
			add(d.Source)
			for b := d.BackingStore; b != nil; b = b.BackingStore {
				add(b.Source)
			}
		}
	}
	return used, nil
}

// domainXMLs returns the XML of every domain.
func (conn *Conn) domainXMLs() ([]string, error) {
	doms, _, err := conn.api.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	var xmls []string
	for _, d := range doms {
		x, err := conn.api.DomainGetXMLDesc(d, 0)
		if HasCode(err, libvirt.ErrNoDomain) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("XML of %q: %w", d.Name, err)
		}
		xmls = append(xmls, x)
	}
	return xmls, nil
}
