package executor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// fakeMounter mounts nothing: it records mounts, with the options a test gives.
type fakeMounter struct {
	mounts map[string][]string // dir -> options
	images map[string]uint64
	opts   []string
	fail   error
	busy   map[string]bool // Unmount fails: a VM's virtiofsd holds it
}

func (f *fakeMounter) Mounted(dir string) (bool, []string, error) {
	o, ok := f.mounts[dir]
	return ok, o, nil
}

func (f *fakeMounter) Mount(_ context.Context, img, dir string, size uint64) error {
	if f.fail != nil {
		return f.fail
	}
	f.images[img] = size
	f.mounts[dir] = f.opts
	return nil
}

func (f *fakeMounter) Unmount(_ context.Context, dir string) error {
	if f.busy[dir] {
		return fmt.Errorf("%w: umount: %s: target is busy", ErrShareBusy, dir)
	}
	delete(f.mounts, dir)
	return nil
}

func newFakeMounter() *fakeMounter {
	return &fakeMounter{mounts: map[string][]string{}, images: map[string]uint64{}, opts: []string{"rw", "nosuid", "nodev", "noatime"}}
}

// A job's cache share is a file system of its own, of LIBVIRT_GCI_CACHE_SIZE, mounted
// nosuid,nodev (issue 24): mounted once, then found mounted; one mounted without those
// options (not by us) is refused.
func TestCacheShareMounted(t *testing.T) {
	t.Parallel()
	m := newFakeMounter()
	e := &Executor{Mounter: m, Settings: Settings{CacheDir: t.TempDir(), CacheSize: 64 << 20}}
	tg := Target{Owner: meta.Owner{Server: "s", ProjectID: "42", JobID: "1"}}
	dir, err := e.cacheShare(context.Background(), tg)
	require.NoError(t, err)
	assert.Equal(t, map[string]uint64{dir + ".img": 64 << 20}, m.images)
	_, err = e.cacheShare(context.Background(), tg)
	require.NoError(t, err)
	assert.Len(t, m.images, 1, "mounted once")

	tg.Protected = true
	prot, err := e.cacheShare(context.Background(), tg)
	require.NoError(t, err)
	assert.Contains(t, m.images, prot+".img", "the protected share is a file system of its own")

	m.mounts[prot] = []string{"rw", "relatime"}
	_, err = e.cacheShare(context.Background(), tg)
	assert.ErrorContains(t, err, "cache protected is mounted without nosuid (rw,relatime)")

	m.fail = errors.New("mount: only root can do that")
	_, err = e.cacheShare(context.Background(), Target{Owner: meta.Owner{Server: "s", ProjectID: "43", JobID: "1"}})
	assert.ErrorContains(t, err, "cache unprotected: mount its file system: mount: only root can do that")
	assert.NotContains(t, err.Error(), e.Settings.CacheDir, "no host path in the job's log")
}

func TestMountedIn(t *testing.T) {
	t.Parallel()
	info := filepath.Join(t.TempDir(), "mountinfo")
	require.NoError(t, os.WriteFile(info, []byte(strings.Join([]string{
		`22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw`,
		`90 22 7:0 / /var/cache/gci/p-42-ab/unprotected rw,nosuid,nodev,noatime shared:50 - ext4 /dev/loop0 rw`,
		`91 22 7:1 / /srv/my\040cache/p-1-cd/protected rw,relatime shared:51 - ext4 /dev/loop1 rw`,
		`92 22 7:2 / /srv/my\040cache/p-1-cd/protected rw,nosuid,nodev shared:52 - ext4 /dev/loop2 rw`,
	}, "\n")+"\n"), 0o644))
	ok, opts, err := mountedIn(info, "/var/cache/gci/p-42-ab/unprotected")
	require.NoError(t, err)
	assert.True(t, ok)
	assert.Equal(t, []string{"rw", "nosuid", "nodev", "noatime"}, opts)
	ok, opts, err = mountedIn(info, "/srv/my cache/p-1-cd/protected")
	require.NoError(t, err)
	assert.True(t, ok)
	assert.Equal(t, []string{"rw", "nosuid", "nodev"}, opts, "the last mount on it")
	ok, _, err = mountedIn(info, "/var/cache/gci/p-42-ab")
	require.NoError(t, err)
	assert.False(t, ok)
}
