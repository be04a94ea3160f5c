package executor

import (
	"context"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// cacheOf gives project's job its share through e (the fake mounter), its image holding
// n bytes, last used ago.
func cacheOf(t *testing.T, e *Executor, project string, n int, ago time.Duration) string {
	t.Helper()
	dir, err := e.cacheShare(context.Background(), Target{Owner: meta.Owner{Server: "s", ProjectID: project, JobID: "1"}})
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(dir+".img", make([]byte, n), 0o600))
	when := time.Now().Add(-ago)
	require.NoError(t, os.Chtimes(dir+".used", when, when))
	return dir
}

// Issue 36, finding 1: caches are not kept for ever. gc removes a share no job has used
// for LIBVIRT_GCI_CACHE_MAX_IDLE, and, while the shares hold more than
// LIBVIRT_GCI_CACHE_TOTAL, the least recently used; never one used in the last minutes,
// nor one a VM holds (its unmount fails), nor one a prepare gave a job since gc looked.
func TestGCCaches(t *testing.T) {
	t.Parallel()
	m := newFakeMounter()
	m.busy = map[string]bool{}
	e := &Executor{Mounter: m, Log: slog.New(slog.DiscardHandler),
		Settings: Settings{CacheDir: t.TempDir(), CacheSize: 64 << 20, CacheMaxIdle: 7 * 24 * time.Hour, CacheTotal: 4 << 20}}
	old := cacheOf(t, e, "1", 1<<20, 8*24*time.Hour)  // idle past a week
	lru := cacheOf(t, e, "2", 2<<20, 48*time.Hour)    // the least recently used of the rest
	busy := cacheOf(t, e, "3", 1<<20, 72*time.Hour)   // older still, but a VM holds it
	recent := cacheOf(t, e, "4", 1<<20, time.Hour)    // kept: under the budget then
	fresh := cacheOf(t, e, "5", 2<<20, 5*time.Minute) // just given to a job
	m.busy[busy] = true

	dry, err := e.gcCaches(context.Background(), true)
	require.NoError(t, err)
	assert.Len(t, dry.Removed, 3, "%v", dry.Removed)
	for _, d := range []string{old, lru, busy, recent, fresh} {
		assert.FileExists(t, d+".img", "a dry run removes nothing")
	}

	res, err := e.gcCaches(context.Background(), false)
	require.NoError(t, err)
	require.Len(t, res.Removed, 2, "%v", res.Removed)
	assert.Regexp(t, `^p-1-[0-9a-f]+/unprotected: not used for 192h0m0s \(LIBVIRT_GCI_CACHE_MAX_IDLE 168h0m0s\)$`, res.Removed[0])
	assert.Regexp(t, `^p-2-[0-9a-f]+/unprotected: the least recently used \(48h0m0s ago\) while the caches hold [0-9.]+ MiB, over LIBVIRT_GCI_CACHE_TOTAL 4 MiB$`, res.Removed[1])
	assert.Equal(t, 1, res.InUse)
	for _, d := range []string{old, lru} {
		assert.NoFileExists(t, d+".img")
		assert.NoFileExists(t, d+".used")
		assert.NoDirExists(t, d)
		assert.NotContains(t, m.mounts, d, "unmounted")
	}
	for _, d := range []string{busy, recent, fresh} {
		assert.FileExists(t, d+".img")
		assert.Contains(t, m.mounts, d)
	}

	// A prepare that gives the share to a job after gc listed it wins.
	listed, err := cacheShares(e.Settings.CacheDir)
	require.NoError(t, err)
	require.NotEmpty(t, listed)
	_, err = e.cacheShare(context.Background(), Target{Owner: meta.Owner{Server: "s", ProjectID: "4", JobID: "2"}})
	require.NoError(t, err)
	var was cacheShareInfo
	for _, l := range listed {
		if l.Dir == recent {
			was = l
		}
	}
	gone, err := e.removeShare(context.Background(), recent, was.Used)
	require.NoError(t, err)
	assert.False(t, gone, "used since gc looked")
	assert.FileExists(t, recent+".img")

	// The next job of a removed share's project gets a new one.
	again, err := e.cacheShare(context.Background(), Target{Owner: meta.Owner{Server: "s", ProjectID: "1", JobID: "3"}})
	require.NoError(t, err)
	assert.Equal(t, old, again)
	fi, err := os.Stat(again)
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o700), fi.Mode().Perm())
	assert.Contains(t, m.images, filepath.Clean(again)+".img")
}

// A share that libvirt's virtiofsd serves is in use, whichever way its argument is
// spelt; another directory's is not.
func TestServedBy(t *testing.T) {
	t.Parallel()
	proc := t.TempDir()
	for pid, args := range map[string]string{
		"16":  "/usr/lib/qemu/virtiofsd\x00--fd=27\x00-o\x00source=/var/cache/gci/p-3-ab/unprotected\x00",
		"17":  "/usr/libexec/virtiofsd\x00--fd=33\x00--shared-dir\x00/var/cache/gci/p-1-ab/unprotected\x00",
		"18":  "/usr/libexec/virtiofsd\x00--shared-dir=/var/cache/gci/p-2-ab/protected\x00",
		"190": "sleep\x00613\x00",
	} {
		require.NoError(t, os.Mkdir(filepath.Join(proc, pid), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(proc, pid, "cmdline"), []byte(args), 0o644))
	}
	assert.Equal(t, "16", servedBy(proc, "/var/cache/gci/p-3-ab/unprotected"), "QEMU 7.2's, as libvirt 9 starts it")
	assert.Equal(t, "17", servedBy(proc, "/var/cache/gci/p-1-ab/unprotected"))
	assert.Equal(t, "18", servedBy(proc, "/var/cache/gci/p-2-ab/protected"))
	assert.Empty(t, servedBy(proc, "/var/cache/gci/p-1-ab/protected"))
	assert.Empty(t, servedBy(proc, "/var/cache/gci/p-1-ab"))
}

// doctor holds the caches' bound against the file system under them: a note without
// one, a problem where the bound is more than it can hold.
func TestDoctorCacheRoom(t *testing.T) {
	t.Parallel()
	m := newFakeMounter()
	e := &Executor{Mounter: m, Settings: Settings{CacheDir: t.TempDir(), CacheSize: 64 << 20, CacheMaxIdle: 168 * time.Hour}}
	cacheOf(t, e, "1", 1<<20, time.Hour)
	f := doctorCacheRoom(e.Settings)
	assert.Equal(t, "note", f.Status)
	assert.Regexp(t, `^1 shares hold 1 MiB, .* free; each removed after 168h0m0s unused \(LIBVIRT_GCI_CACHE_MAX_IDLE\); no bound in all: each project, and each fork, may fill 2 × 64 MiB \(LIBVIRT_GCI_CACHE_SIZE\)$`, f.Detail)
	e.Settings.CacheTotal = 1 << 50
	f = doctorCacheRoom(e.Settings)
	assert.Equal(t, "problem", f.Status)
	assert.Contains(t, f.Detail, "LIBVIRT_GCI_CACHE_TOTAL 1024 TiB is more than that file system can hold")
	e.Settings.CacheTotal = 2 << 20
	f = doctorCacheRoom(e.Settings)
	assert.Equal(t, "ok", f.Status)
	assert.Contains(t, f.Detail, "gc keeps them under 2 MiB")
}
