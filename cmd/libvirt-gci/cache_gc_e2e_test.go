package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Issue 36, finding 1: gc removes a project's cache share that no job has used for
// LIBVIRT_GCI_CACHE_MAX_IDLE (here made to look 8 days old), unmounted, its image
// deleted; but never one a running job's VM holds (libvirt's virtiofsd serves it from a
// mount namespace of its own, where the unmount alone would not fail): that job keeps
// its cache. The next job of the project gets a fresh, empty one.
func TestCacheGC(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	root := cacheDir(t)
	j.env["LIBVIRT_GCI_CACHE_DIR"] = root
	r := j.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { j.stage("cleanup") })
	r = j.run("build_script", `echo kept >/cache/a && stat -f -c %c /cache`)
	require.Equal(t, 0, r.code, r.stderr)
	// An inode per 64 KiB of the share's 10G bounds what virtiofsd may hold open for it.
	var inodes int
	_, err := fmt.Sscanf(r.stdout, "%d", &inodes)
	require.NoError(t, err, r.stdout)
	assert.InDelta(t, 10<<30/(64<<10), inodes, 2048, "inodes of the share's file system")
	shares, err := filepath.Glob(filepath.Join(root, "p-*", "unprotected"))
	require.NoError(t, err)
	require.Len(t, shares, 1)
	share := shares[0]
	backdate := func() {
		old := time.Now().Add(-8 * 24 * time.Hour)
		require.NoError(t, os.Chtimes(share+".used", old, old))
	}

	backdate()
	r = j.stage("gc")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stderr, "0 cache shares removed (1 in use left)")
	assert.Contains(t, mountsBelow(t, root), share, "still mounted")
	r = j.run("build_script", `cat /cache/a && echo more >/cache/b`)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "kept\n", r.stdout)

	require.Equal(t, 0, j.stage("cleanup").code)
	finished(t, j.l, j.prefix) // its VM, and so its virtiofsd, gone
	backdate()
	r = j.stage("gc")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `removed cache p-[0-9]+-[0-9a-f]+/unprotected: not used for 192h0m0s \(LIBVIRT_GCI_CACHE_MAX_IDLE 168h0m0s\)`, r.stderr)
	assert.NotContains(t, mountsBelow(t, root), share, "unmounted")
	assert.NoFileExists(t, share+".img")
	assert.NoDirExists(t, share)

	r = j.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	r = j.run("build_script", `ls -A /cache`)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "lost+found\n", r.stdout, "a fresh cache")
}
