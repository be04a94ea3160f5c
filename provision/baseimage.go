package provision

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt/dial"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// BaseImages are the Python libvirt-gci's templates: a directory (or a storage pool) of
// disk images named <distro>.qcow2, with no domains. Each is a template with a built-in
// domain definition; the operator offers it by putting it there.
type BaseImages struct {
	// Source is an absolute directory on the libvirt host, or the name of a storage pool.
	Source  string
	CPUs    int
	Memory  uint64 // bytes
	Network string // the libvirt network of its NIC; "" for none
	// Virt is the domain type: kvm, qemu (software emulation), or "" for kvm where the
	// host's capabilities offer it.
	Virt string
}

// IsDir tells whether the images are a directory rather than a pool.
func (b BaseImages) IsDir() bool { return filepath.IsAbs(b.Source) }

// Kernel files beside an image boot it directly: images without a bootloader (the
// project's test guest, say) need them. Their names: <distro> and these suffixes.
const (
	kernelSuffix  = ".vmlinuz"
	initrdSuffix  = ".initrd"
	cmdlineSuffix = ".cmdline" // the kernel command line; "console=ttyS0" if missing
)

// baseImageXML is the domain definition of the base image name, or ErrNoTemplate.
func (h *Host) baseImageXML(ctx context.Context, conn *libvirt.Conn, name string) (string, error) {
	b := h.BaseImages
	if err := h.checkBaseImages(conn); err != nil {
		return "", err
	}
	local := dial.IsLocal(h.URI)
	path, err := b.find(conn, local, name+".qcow2")
	if err != nil {
		return "", err
	}
	if path == "" {
		return "", fmt.Errorf("template %q: %w (no domain has that name, nor is there a base image %s.qcow2 in LIBVIRT_GCI_BASE_IMAGES)", name, libvirt.ErrNoTemplate, name)
	}
	kernel, err := b.find(conn, local, name+kernelSuffix)
	if err != nil {
		return "", err
	}
	var initrd, cmdline string
	if kernel != "" {
		if initrd, err = b.find(conn, local, name+initrdSuffix); err != nil {
			return "", err
		}
		cmdline = "console=ttyS0"
		if b.IsDir() && local {
			if c, err := os.ReadFile(filepath.Join(b.Source, name+cmdlineSuffix)); err == nil {
				cmdline = strings.TrimSpace(string(c))
			}
		}
	}
	virt := b.Virt
	if virt == "" {
		virt = h.virtType(ctx, conn)
	}
	return template.BaseXML(template.Base{Name: name, Disk: path, Kernel: kernel, Initrd: initrd, Cmdline: cmdline, Virt: virt,
		MemKiB: b.Memory >> 10, CPUs: b.CPUs, Network: b.Network})
}

// find is the path of the image file name on the libvirt host, or "" if there is none
// (local: the libvirt host is this one).
func (b BaseImages) find(conn *libvirt.Conn, local bool, name string) (string, error) {
	if b.IsDir() {
		p := filepath.Join(b.Source, name)
		if !local { // libvirt knows it only if a pool holds it
			if _, _, known := conn.VolumeAt(p); !known {
				return "", nil
			}
			return p, nil
		}
		if fi, err := os.Stat(p); err != nil || !fi.Mode().IsRegular() {
			return "", nil
		}
		return p, nil
	}
	pool, err := conn.Pool(b.Source)
	if err != nil {
		return "", fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES: %w", err)
	}
	p, err := pool.Path(name)
	if err != nil {
		return "", fmt.Errorf("base image %s: %w", name, err)
	}
	return p, nil
}

// virtType is kvm where libvirt offers it for x86_64 guests and, on a local libvirt, a
// guest ran under it (the probe), else qemu (software emulation).
func (h *Host) virtType(ctx context.Context, conn *libvirt.Conn) string {
	offered, _, err := h.kvm(ctx, conn, true)
	if !offered {
		return "qemu"
	}
	if err != nil {
		h.Log.Warn("base images run under software emulation: libvirt offers KVM, but " + err.Error() + " (set LIBVIRT_GCI_BASE_VIRT to choose)")
		return "qemu"
	}
	return "kvm"
}

// BaseImageNames are the names of the base images there are (for template list): the
// DISTRO of each DISTRO.qcow2. A directory on a remote libvirt is listed only if a pool
// has it.
func (h *Host) BaseImageNames(conn *libvirt.Conn) ([]string, error) {
	files, err := h.baseFiles(conn, false)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, f := range files {
		if n, ok := strings.CutSuffix(f.name, ".qcow2"); ok {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	return names, nil
}

// baseFile is a file where the base images are: its name, and with paths its path on
// the libvirt host.
type baseFile struct{ name, path string }

// baseFiles lists the files where the base images are (none for a directory on a remote
// libvirt), with their paths if paths is set.
func (h *Host) baseFiles(conn *libvirt.Conn, paths bool) ([]baseFile, error) {
	b := h.BaseImages
	var files []baseFile
	switch {
	case b.Source == "":
	case b.IsDir() && dial.IsLocal(h.URI):
		entries, err := os.ReadDir(b.Source)
		if err != nil {
			return nil, fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES: %w", err)
		}
		for _, e := range entries {
			files = append(files, baseFile{e.Name(), filepath.Join(b.Source, e.Name())})
		}
	case b.IsDir():
	default:
		pool, err := conn.Pool(b.Source)
		if err != nil {
			return nil, fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES: %w", err)
		}
		vols, err := pool.Volumes()
		if err != nil {
			return nil, err
		}
		for _, v := range vols {
			f := baseFile{name: v}
			if paths {
				if f.path, err = pool.Path(v); err != nil {
					return nil, fmt.Errorf("base image %s: %w", v, err)
				}
			}
			files = append(files, f)
		}
	}
	return files, nil
}

// checkBaseImages refuses base images that share their directory or pool with other
// disks: there every NAME.qcow2 is a template any job may clone, so the instance pool
// (its overlays, warm images and helper disks), our own volumes, and any defined
// domain's disk must not be there. The error names the file, not its directory.
func (h *Host) checkBaseImages(conn *libvirt.Conn) error {
	b := h.BaseImages
	const own = "; base images need a directory or pool of their own, where every NAME.qcow2 is a template any job may clone"
	if !b.IsDir() && b.Source == h.Pool {
		return fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES pool %q is the instance pool (LIBVIRT_GCI_POOL)%s", b.Source, own)
	}
	files, err := h.baseFiles(conn, true)
	if err != nil {
		return err
	}
	at := map[string]string{}
	for _, f := range files {
		if strings.HasPrefix(f.name, h.Prefix) || strings.HasPrefix(f.name, "libvirt-gci-") {
			return fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES holds %s, a volume of libvirt-gci's own%s", f.name, own)
		}
		if pool, _, known := conn.VolumeAt(f.path); known && pool == h.Pool {
			return fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES holds %s, in the instance pool %q (LIBVIRT_GCI_POOL)%s", f.name, h.Pool, own)
		}
		at[f.path] = f.name
	}
	doms, err := conn.DomainNames()
	if err != nil {
		return err
	}
	for _, d := range doms {
		x, err := conn.DomainXML(d, true)
		if err != nil {
			continue // gone meanwhile
		}
		for _, disk := range template.FileDisks(x) {
			if name, ok := at[disk]; ok {
				return fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES holds %s, a disk of the domain %q%s", name, d, own)
			}
		}
	}
	return nil
}
