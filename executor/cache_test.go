package executor

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// Each project's cache is its own: by project id and GitLab instance, from the job
// response; an id that is not a number gets none. Protected and unprotected jobs of one
// project get separate shares, below a directory of the project's that is not shared.
func TestProjectCache(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	gl := meta.Owner{Server: "https://gitlab.example.com", ProjectID: "42", JobID: "1"}
	a, err := projectCache(root, gl, false)
	require.NoError(t, err)
	again, err := projectCache(root, meta.Owner{Server: "https://gitlab.example.com", ProjectID: "42", JobID: "2", Project: "renamed"}, false)
	require.NoError(t, err)
	assert.Equal(t, a, again, "the same project, whatever the job")
	prot, err := projectCache(root, gl, true)
	require.NoError(t, err)
	assert.NotEqual(t, a, prot, "protected jobs get a share of their own")
	assert.Equal(t, filepath.Dir(a), filepath.Dir(prot), "in the same project directory")
	assert.False(t, isWithin(a, prot) || isWithin(prot, a), "neither share holds the other")
	for _, o := range []meta.Owner{{Server: "https://gitlab.example.com", ProjectID: "43"}, {Server: "https://other.example.com", ProjectID: "42"}} {
		b, err := projectCache(root, o, false)
		require.NoError(t, err)
		assert.NotEqual(t, filepath.Dir(a), filepath.Dir(b), "%+v", o)
	}
	for _, d := range []string{a, prot, filepath.Dir(a)} {
		fi, err := os.Lstat(d)
		require.NoError(t, err)
		assert.True(t, fi.IsDir())
		assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm(), d)
	}
	assert.Equal(t, filepath.Dir(filepath.Dir(a)), root)
	for _, bad := range []string{"../42", "", "4 2", "42/.."} {
		_, err := projectCache(root, meta.Owner{ProjectID: bad}, false)
		assert.ErrorContains(t, err, "is not a number", bad)
	}

	// A job made its share world-writable (chmod 777 /cache): the next prepare takes it back.
	require.NoError(t, os.Chmod(a, 0o777))
	_, err = projectCache(root, gl, false)
	require.NoError(t, err)
	fi, err := os.Lstat(a)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
}

func isWithin(dir, p string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != ".." && !filepath.IsAbs(rel) && (rel == "." || rel[:min(3, len(rel))] != "../")
}

// The cache root must be ours and written by us alone, and nothing below it is followed
// through a symlink: an old layout shared the whole project directory, so a job may have
// left a symlink where a share now goes.
func TestCacheRootChecks(t *testing.T) {
	t.Parallel()
	gl := meta.Owner{Server: "s", ProjectID: "42", JobID: "1"}

	open := filepath.Join(t.TempDir(), "c")
	require.NoError(t, os.Mkdir(open, 0o777))
	require.NoError(t, os.Chmod(open, 0o777))
	_, err := projectCache(open, gl, false)
	assert.ErrorContains(t, err, "writable by its group or others (mode 0777)")
	require.NoError(t, os.Chmod(open, 0o775))
	_, err = projectCache(open, gl, false)
	assert.ErrorContains(t, err, "mode 0775")

	base := t.TempDir()
	link := filepath.Join(base, "link")
	require.NoError(t, os.Symlink(t.TempDir(), link))
	_, err = projectCache(link, gl, false)
	assert.ErrorContains(t, err, "is a symlink; want a directory")

	if os.Geteuid() == 0 {
		other := filepath.Join(t.TempDir(), "other")
		require.NoError(t, os.Mkdir(other, 0o755))
		require.NoError(t, os.Chown(other, 65534, 65534))
		_, err = projectCache(other, gl, false)
		assert.ErrorContains(t, err, "belongs to uid 65534")
	}

	root := t.TempDir()
	share, err := projectCache(root, gl, false)
	require.NoError(t, err)
	project := filepath.Dir(share)
	victim := t.TempDir()
	require.NoError(t, os.Symlink(victim, filepath.Join(project, shareProtected)))
	_, err = projectCache(root, gl, true)
	assert.ErrorContains(t, err, "is a symlink, not a directory; refusing to follow it")
	require.NoError(t, os.Chmod(victim, 0o755))
	fi, err := os.Stat(victim)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o755), fi.Mode().Perm(), "the symlink's target was not touched")

	fresh := filepath.Join(t.TempDir(), "new", "cache")
	_, err = projectCache(fresh, gl, false)
	require.NoError(t, err, "a missing root is made")
}
