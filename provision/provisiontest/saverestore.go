package provisiontest

import (
	"bytes"
	"encoding/binary"
	"io"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Volumes' content, streams, and save and restore: a volume's bytes are kept (data);
// a save writes a save image as libvirt's QEMU driver lays it out (its header and
// domain XML, then a stand-in for QEMU's stream), and a restore reads the domain XML
// from the header and starts the domain it names.

// volPath is where the fake says a volume's file is.
func volPath(pool, name string) string { return "/" + pool + "/" + name }

// volAt finds the volume whose file is path.
func (f *Libvirt) volAt(path string) (pool, name string, ok bool) {
	rest, found := strings.CutPrefix(path, "/")
	if !found {
		return "", "", false
	}
	pool, name, _ = strings.Cut(rest, "/")
	_, ok = f.pools[pool][name]
	return pool, name, ok
}

func (f *Libvirt) StorageVolGetPath(v libvirt.StorageVol) (string, error) {
	if err := f.enter("StorageVolGetPath"); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.pools[v.Pool][v.Name]; !ok {
		return "", lverr(libvirt.ErrNoStorageVol, "Storage volume not found: '%s'", v.Name)
	}
	return volPath(v.Pool, v.Name), nil
}

func (f *Libvirt) StorageVolGetXMLDesc(v libvirt.StorageVol, _ uint32) (string, error) {
	if err := f.enter("StorageVolGetXMLDesc"); err != nil {
		return "", err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	x, ok := f.pools[v.Pool][v.Name]
	if !ok {
		return "", lverr(libvirt.ErrNoStorageVol, "Storage volume not found: '%s'", v.Name)
	}
	return x, nil
}

// StorageVolCreateXMLFrom creates a volume with the content of clone.
func (f *Libvirt) StorageVolCreateXMLFrom(p libvirt.StoragePool, x string, clone libvirt.StorageVol, fl libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error) {
	if err := f.enter("StorageVolCreateXMLFrom"); err != nil {
		return libvirt.StorageVol{}, err
	}
	return callFor(f, "StorageVolCreateXMLFrom", func() (libvirt.StorageVol, error) {
		f.mu.Lock()
		_, ok := f.pools[clone.Pool][clone.Name]
		src := bytes.Clone(f.data[clone.Pool+"/"+clone.Name])
		f.mu.Unlock()
		if !ok {
			return libvirt.StorageVol{}, lverr(libvirt.ErrNoStorageVol, "Storage volume not found: '%s'", clone.Name)
		}
		v, err := f.createVol(p, x, fl)
		if err != nil {
			return libvirt.StorageVol{}, err
		}
		f.mu.Lock()
		f.data[v.Pool+"/"+v.Name] = src
		f.mu.Unlock()
		return v, nil
	})
}

// StorageVolDownload writes the volume's content from offset, length bytes of it (0:
// all).
func (f *Libvirt) StorageVolDownload(v libvirt.StorageVol, w io.Writer, offset, length uint64, _ libvirt.StorageVolDownloadFlags) error {
	if err := f.enter("StorageVolDownload"); err != nil {
		return err
	}
	f.mu.Lock()
	_, ok := f.pools[v.Pool][v.Name]
	b := f.data[v.Pool+"/"+v.Name]
	f.mu.Unlock()
	if !ok {
		return lverr(libvirt.ErrNoStorageVol, "Storage volume not found: '%s'", v.Name)
	}
	b = b[min(offset, uint64(len(b))):]
	if length > 0 {
		b = b[:min(length, uint64(len(b)))]
	}
	_, err := w.Write(b)
	return err
}

func (f *Libvirt) StorageVolGetInfo(v libvirt.StorageVol) (int8, uint64, uint64, error) {
	if err := f.enter("StorageVolGetInfo"); err != nil {
		return 0, 0, 0, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	x, ok := f.pools[v.Pool][v.Name]
	if !ok {
		return 0, 0, 0, lverr(libvirt.ErrNoStorageVol, "Storage volume not found: '%s'", v.Name)
	}
	return 0, f.volCapacity(v.Pool, v.Name, x, 0), uint64(len(f.data[v.Pool+"/"+v.Name])), nil
}

// volCapacity is a volume's size as libvirt gives it: its XML's capacity, or else (an
// overlay) its backing volume's, and at least what it holds.
func (f *Libvirt) volCapacity(pool, name, x string, depth int) uint64 {
	var vol libvirtxml.StorageVolume
	_ = vol.Unmarshal(x)
	capacity := uint64(len(f.data[pool+"/"+name]))
	switch {
	case vol.Capacity != nil:
		capacity = max(capacity, vol.Capacity.Value)
	case vol.BackingStore != nil && depth < 8:
		if bp, bn, ok := f.volAt(vol.BackingStore.Path); ok {
			capacity = max(capacity, f.volCapacity(bp, bn, f.pools[bp][bn], depth+1))
		}
	}
	return capacity
}

// saveMagic and saveHeaderSize are libvirt's (src/qemu/qemu_saveimage.h).
const (
	saveMagic      = "LibvirtQemudSave"
	saveHeaderSize = 16 + 19*4
)

// DomainSaveFlags saves the running domain into the volume whose file is path: its
// header with the domain's XML, then a stand-in for QEMU's stream. The domain stops.
func (f *Libvirt) DomainSaveFlags(d libvirt.Domain, path string, _ libvirt.OptString, _ uint32) error {
	if err := f.enter("DomainSaveFlags"); err != nil {
		return err
	}
	return f.call("DomainSaveFlags", func() error {
		f.mu.Lock()
		defer f.mu.Unlock()
		fd, err := f.running(d)
		if err != nil {
			return err
		}
		pool, name, ok := f.volAt(path)
		if !ok {
			return lverr(libvirt.ErrSystemError, "Failed to create file '%s': No such file or directory", path)
		}
		dataLen := len(fd.xml) + 1 + 64*1024
		hd := make([]byte, saveHeaderSize+dataLen)
		copy(hd, saveMagic)
		binary.NativeEndian.PutUint32(hd[16:], 2)
		binary.NativeEndian.PutUint32(hd[20:], uint32(dataLen))
		binary.NativeEndian.PutUint32(hd[24:], 1)
		copy(hd[saveHeaderSize:], fd.xml)
		f.data[pool+"/"+name] = append(hd, "QEMU migration stream of "+d.Name...)
		fd.running, fd.paused, fd.guest = false, false, nil
		return nil
	})
}

// DomainRestoreFlags restores the save image whose file is path into the domain its
// header names (defined, and not running), and starts it.
func (f *Libvirt) DomainRestoreFlags(path string, _ libvirt.OptString, _ uint32) error {
	if err := f.enter("DomainRestoreFlags"); err != nil {
		return err
	}
	return f.call("DomainRestoreFlags", func() error {
		f.mu.Lock()
		pool, name, ok := f.volAt(path)
		b := f.data[pool+"/"+name]
		f.mu.Unlock()
		if !ok {
			return lverr(libvirt.ErrSystemError, "Failed to open file '%s': No such file or directory", path)
		}
		if len(b) < saveHeaderSize || string(b[:16]) != saveMagic {
			return lverr(libvirt.ErrOperationFailed, "image magic is incorrect")
		}
		n := binary.NativeEndian.Uint32(b[20:24])
		var dom libvirtxml.Domain
		if err := dom.Unmarshal(string(bytes.TrimRight(b[saveHeaderSize:saveHeaderSize+int(n)], "\x00"))); err != nil {
			return lverr(libvirt.ErrXMLError, "%v", err)
		}
		f.mu.Lock()
		fd, defined := f.domains[dom.Name]
		f.mu.Unlock()
		if !defined {
			return lverr(libvirt.ErrNoDomain, "Domain not found: '%s'", dom.Name)
		}
		if fd.running {
			return lverr(libvirt.ErrOperationInvalid, "domain '%s' is already active", dom.Name)
		}
		return f.start(libvirt.Domain{Name: dom.Name})
	})
}

// Content is the content of the volume pool/name.
func (f *Libvirt) Content(pool, name string) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return bytes.Clone(f.data[pool+"/"+name])
}

func (f *Libvirt) DomainUpdateDeviceFlags(d libvirt.Domain, x string, _ libvirt.DomainDeviceModifyFlags) error {
	return f.call("DomainUpdateDeviceFlags", func() error { return f.updateDevice(d, x) })
}

func (f *Libvirt) updateDevice(d libvirt.Domain, x string) error {
	return f.withDom("DomainUpdateDeviceFlags", d, func(fd *domain) error {
		var iface libvirtxml.DomainInterface
		if err := iface.Unmarshal(x); err != nil {
			return lverr(libvirt.ErrXMLError, "%v", err)
		}
		var dom libvirtxml.Domain
		if err := dom.Unmarshal(fd.xml); err != nil || dom.Devices == nil || iface.MAC == nil {
			return lverr(libvirt.ErrOperationFailed, "no such NIC")
		}
		for i, o := range dom.Devices.Interfaces {
			if o.MAC != nil && strings.EqualFold(o.MAC.Address, iface.MAC.Address) {
				dom.Devices.Interfaces[i].Link = iface.Link // the link and filter, as the updates here change
				dom.Devices.Interfaces[i].FilterRef = iface.FilterRef
				out, err := dom.Marshal()
				fd.xml = out
				return err
			}
		}
		return lverr(libvirt.ErrOperationFailed, "no NIC with the MAC address %s", iface.MAC.Address)
	})
}

// DomainAttachDeviceFlags attaches a virtiofs share to a running domain whose memory is
// shared, as QEMU needs; it refuses other devices.
func (f *Libvirt) DomainAttachDeviceFlags(d libvirt.Domain, x string, _ uint32) error {
	return f.withDom("DomainAttachDeviceFlags", d, func(fd *domain) error {
		var fs libvirtxml.DomainFilesystem
		if err := fs.Unmarshal(x); err != nil || fs.Driver == nil || fs.Driver.Type != "virtiofs" {
			return lverr(libvirt.ErrOperationUnsupported, "the fake attaches virtiofs shares only: %s", x)
		}
		if !fd.running {
			return lverr(libvirt.ErrOperationInvalid, "domain is not running")
		}
		var dom libvirtxml.Domain
		if err := dom.Unmarshal(fd.xml); err != nil {
			return lverr(libvirt.ErrXMLError, "%v", err)
		}
		if mb := dom.MemoryBacking; mb == nil || mb.MemoryAccess == nil || mb.MemoryAccess.Mode != "shared" {
			return lverr(libvirt.ErrConfigUnsupported, "unsupported configuration: 'virtiofs' requires shared memory")
		}
		if dom.Devices == nil {
			dom.Devices = &libvirtxml.DomainDeviceList{}
		}
		dom.Devices.Filesystems = append(dom.Devices.Filesystems, fs)
		nx, err := dom.Marshal()
		if err != nil {
			return lverr(libvirt.ErrXMLError, "%v", err)
		}
		fd.xml = nx
		return nil
	})
}

// DomainBlockResize grows a running domain's disk: the size is kept per domain and disk
// (BlockSize says it).
func (f *Libvirt) DomainBlockResize(d libvirt.Domain, disk string, size uint64, _ libvirt.DomainBlockResizeFlags) error {
	return f.withDom("DomainBlockResize", d, func(fd *domain) error {
		if !fd.running {
			return lverr(libvirt.ErrOperationInvalid, "domain is not running")
		}
		if !strings.Contains(fd.xml, "dev=\""+disk+"\"") && !strings.Contains(fd.xml, "dev='"+disk+"'") {
			return lverr(libvirt.ErrInvalidArg, "invalid argument: disk '%s' was not found in the domain config", disk)
		}
		if f.blockSizes == nil {
			f.blockSizes = map[string]uint64{}
		}
		f.blockSizes[d.Name+"/"+disk] = size
		return nil
	})
}

// BlockSize is the size DomainBlockResize gave the disk of the domain name; 0 if none.
func (f *Libvirt) BlockSize(name, disk string) uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.blockSizes[name+"/"+disk]
}

func (f *Libvirt) DomainShutdownFlags(d libvirt.Domain, _ libvirt.DomainShutdownFlagValues) error {
	return f.stop("DomainShutdownFlags", d)
}

// DomainGetBlockInfo says every disk is a 1 GiB file.
func (f *Libvirt) DomainGetBlockInfo(d libvirt.Domain, path string, _ uint32) (uint64, uint64, uint64, error) {
	if err := f.enter("DomainGetBlockInfo"); err != nil {
		return 0, 0, 0, err
	}
	return 1 << 30, 1 << 20, 1 << 30, nil
}

// ConnectGetCapabilities offers x86_64 guests under software emulation (qemu).
func (f *Libvirt) ConnectGetCapabilities() (string, error) {
	if err := f.enter("ConnectGetCapabilities"); err != nil {
		return "", err
	}
	f.mu.Lock()
	kvm := ""
	if f.kvmEmulator != "" {
		kvm = "<domain type='kvm'><emulator>" + f.kvmEmulator + "</emulator></domain>"
	}
	f.mu.Unlock()
	return `<capabilities><host><cpu><arch>x86_64</arch></cpu></host><guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/>` + kvm + `</arch></guest></capabilities>`, nil
}

// SetKVM has the fake offer KVM, its guests run by the QEMU binary emulator.
func (f *Libvirt) SetKVM(emulator string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.kvmEmulator = emulator
}

// NodeGetInfo says the host has 32 GiB of memory and 8 CPUs.
func (f *Libvirt) NodeGetInfo() ([32]int8, uint64, int32, int32, int32, int32, int32, int32, error) {
	if err := f.enter("NodeGetInfo"); err != nil {
		return [32]int8{}, 0, 0, 0, 0, 0, 0, 0, err
	}
	return [32]int8{}, 32 << 20, 8, 2000, 1, 1, 8, 1, nil
}

// NodeGetFreeMemory says the host has 16 GiB free.
func (f *Libvirt) NodeGetFreeMemory() (uint64, error) {
	if err := f.enter("NodeGetFreeMemory"); err != nil {
		return 0, err
	}
	return 16 << 30, nil
}
