package provision

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// Every instance gets the helper binary on a read-only disk built once per binary, and
// mounted in the guest; a changed binary gets a disk of its own.
func TestLaunchGivesTheHelper(t *testing.T) {
	t.Parallel()
	if _, err := findTool("mkfs.ext4"); err != nil {
		t.Skip("no mkfs.ext4 (e2fsprogs) here")
	}
	f := provisiontest.New("ci")
	_, err := f.DomainDefineXMLFlags(provisiontest.Template, 0)
	require.NoError(t, err)
	dir := t.TempDir()
	bin := filepath.Join(dir, "gitlab-runner")
	require.NoError(t, os.WriteFile(bin, []byte(strings.Repeat("runner", 200000)), 0o755))
	h := &Host{Config: Config{Pool: "ci", Prefix: "gci-", BootTimeout: time.Minute, SecretFile: filepath.Join(dir, "secret")},
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Dial: func(context.Context, string) (*libvirt.Conn, error) { return libvirt.NewConn(f), nil }}
	launch := func(name string) {
		t.Helper()
		require.NoError(t, h.Launch(context.Background(), Request{Name: name, Template: "tmpl", Offered: true, Transport: meta.TransportAgent, Helper: bin}))
	}
	helperVolumes := func() []string {
		var vols []string
		for _, part := range strings.Split(f.State(), "; ") {
			if strings.Contains(part, "libvirt-gci-runner-") {
				vols = append(vols, part)
			}
		}
		return vols
	}

	launch("gci-a")
	launch("gci-b")
	uploads := 0
	for _, c := range f.Calls() {
		if c == "StorageVolUpload" {
			uploads++
		}
	}
	assert.Equal(t, 2, uploads, "built once, for both instances: its lock's holder, and the image")
	vols := helperVolumes()

	// An image whose mark is there but which is gone (an operator's vol-delete, say) is
	// made again, not attached in vain.
	img := strings.TrimSuffix(strings.TrimPrefix(vols[0], "volume ci/"), ".done")
	require.NoError(t, f.StorageVolDelete(golibvirt.StorageVol{Pool: "ci", Name: img}, 0))
	launch("gci-e")
	assert.Equal(t, vols, helperVolumes(), "made again: %s", f.State())
	_, err = libvirt.NewConn(f).Teardown(t.Context(), "gci-e", nil)
	require.NoError(t, err)
	require.NotEmpty(t, vols, f.State())
	for _, name := range []string{"gci-a", "gci-b"} {
		x, err := f.DomainGetXMLDesc(mustLookup(t, f, name), 0)
		require.NoError(t, err)
		assert.Contains(t, x, "<serial>"+HelperSerial+"</serial>")
		assert.Contains(t, x, "<readonly></readonly>")
		assert.True(t, slices.Contains(f.Guest(name).Files, HelperDir+"/gitlab-runner"), "mounted in the guest: %v", f.Guest(name).Files)
	}

	// An upgraded binary (another file in its place) gets its own disk; the old one
	// stays while instances use it.
	upgrade := func(content string) {
		t.Helper()
		require.NoError(t, os.Remove(bin))
		require.NoError(t, os.WriteFile(bin, []byte(content), 0o755))
	}
	upgrade("new runner")
	launch("gci-c")
	assert.Len(t, helperVolumes(), 2*len(vols), "both disks (with their marks): %s", f.State())

	// Once no instance uses it, the next new binary's disk replaces it.
	for _, name := range []string{"gci-a", "gci-b"} {
		_, err := libvirt.NewConn(f).Teardown(t.Context(), name, nil)
		require.NoError(t, err)
	}
	upgrade("newer runner")
	launch("gci-d")
	left := helperVolumes()
	assert.Len(t, left, 2*len(vols), "the disks of the binaries gci-c and gci-d use: %s", f.State())
	for _, v := range vols {
		assert.NotContains(t, left, v, "the first binary's disk, which no instance uses")
	}
}

func mustLookup(t *testing.T, f *provisiontest.Libvirt, name string) golibvirt.Domain {
	t.Helper()
	d, err := f.DomainLookupByName(name)
	require.NoError(t, err)
	return d
}

// A prepare that waits for another's helper build waits no longer than the boot timeout,
// and says why; it has made nothing.
func TestHelperWaitIsBounded(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	_, err := f.DomainDefineXMLFlags(provisiontest.Template, 0)
	require.NoError(t, err)
	dir := t.TempDir()
	bin := filepath.Join(dir, "gitlab-runner")
	require.NoError(t, os.WriteFile(bin, []byte("runner"), 0o755))
	h := &Host{Config: Config{Pool: "ci", Prefix: "gci-", BootTimeout: 300 * time.Millisecond, SecretFile: filepath.Join(dir, "secret")},
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Dial: func(context.Context, string) (*libvirt.Conn, error) { return libvirt.NewConn(f), nil }}
	fi, err := os.Stat(bin)
	require.NoError(t, err)
	unlock, ok, err := libvirt.NewConn(f).PoolLock(context.Background(), h.Log, h.Pool, helperPrefix+helperID(fi)+".img", false, nil, libvirt.LockHolder{}) // another prepare, building
	require.NoError(t, err)
	require.True(t, ok)
	_, ok, err = libvirt.NewConn(f).PoolLock(context.Background(), h.Log, h.Pool, helperPrefix+helperID(fi)+".img", false, nil, libvirt.LockHolder{})
	require.NoError(t, err)
	assert.False(t, ok, "held")
	start := time.Now()
	err = h.Launch(context.Background(), Request{Name: "gci-a", Template: "tmpl", Offered: true, Transport: meta.TransportAgent, Helper: bin})
	assert.ErrorContains(t, err, "boot timeout 300ms (LIBVIRT_GCI_BOOT_TIMEOUT) passed")
	assert.Less(t, time.Since(start), 5*time.Second)
	assert.Equal(t, "domain tmpl running=false; volume ci/"+helperPrefix+helperID(fi)+".img.lock", f.State(), "nothing made")
	unlock()
	assert.Equal(t, "domain tmpl running=false", f.State(), "the lock is gone")
}
