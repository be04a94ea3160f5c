package provision

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// Base images need a place of their own (issue 24): where every NAME.qcow2 is a template
// any job may clone, the instance pool (overlays, warm images), libvirt-gci's volumes
// and other domains' disks are refused, naming the file.
func TestBaseImagesOwnPlace(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci", "base", "mixed")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	conn := libvirt.NewConn(f)
	mkvol := func(pool, name string) {
		p, err := f.StoragePoolLookupByName(pool)
		require.NoError(t, err)
		_, err = f.StorageVolCreateXML(p, "<volume><name>"+name+"</name><capacity>1</capacity><target><format type='qcow2'/></target></volume>", 0)
		require.NoError(t, err)
	}
	mkvol("base", "debian-12.qcow2")
	h.BaseImages = BaseImages{Source: "base", CPUs: 1, Memory: 1 << 30}
	_, err := h.baseImageXML(context.Background(), conn, "debian-12")
	require.NoError(t, err, "a pool of base images alone")

	for source, want := range map[string]string{
		"ci": `LIBVIRT_GCI_BASE_IMAGES pool "ci" is the instance pool (LIBVIRT_GCI_POOL)`,
		"t":  `LIBVIRT_GCI_BASE_IMAGES holds root.qcow2, a disk of the domain "tmpl"`,
	} {
		h.BaseImages.Source = source
		_, err := h.baseImageXML(context.Background(), conn, "debian-12")
		assert.ErrorContains(t, err, want, source)
		assert.ErrorContains(t, err, "base images need a directory or pool of their own")
	}
	mkvol("mixed", "debian-12.qcow2")
	mkvol("mixed", "libvirt-gci-warm-0123-4567-vda.qcow2")
	h.BaseImages.Source = "mixed"
	_, err = h.baseImageXML(context.Background(), conn, "debian-12")
	assert.ErrorContains(t, err, "LIBVIRT_GCI_BASE_IMAGES holds libvirt-gci-warm-0123-4567-vda.qcow2, a volume of libvirt-gci's own")

	// A directory that holds a defined domain's disk.
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "debian-12.qcow2"), nil, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "build-vm.qcow2"), nil, 0o644))
	h.BaseImages.Source = dir
	_, err = h.baseImageXML(context.Background(), conn, "debian-12")
	require.NoError(t, err)
	x := `<domain type='qemu'><name>build-vm</name><memory>1024</memory><os><type>hvm</type></os><devices>` +
		`<disk type='file' device='disk'><source file='` + filepath.Join(dir, "build-vm.qcow2") + `'/><target dev='vda'/></disk></devices></domain>`
	_, err = f.DomainDefineXMLFlags(x, 0)
	require.NoError(t, err)
	_, err = h.baseImageXML(context.Background(), conn, "debian-12")
	assert.ErrorContains(t, err, `LIBVIRT_GCI_BASE_IMAGES holds build-vm.qcow2, a disk of the domain "build-vm"`)
	assert.NotContains(t, err.Error(), dir, "no host directory in a job's log")
}
