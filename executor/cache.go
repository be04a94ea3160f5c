package executor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"syscall"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// The cache share (LIBVIRT_GCI_CACHE_DIR). Its layout on the host:
//
//	DIR/                       the operator's: ours, writable by us alone (checkCacheRoot)
//	  p-ID-HASH/               a project of a GitLab instance: 0700, never shared
//	    protected/             what its protected jobs get as /cache
//	    unprotected/           what its other jobs get as /cache
//
// A job is root in its guest, and so owns what it can write through the share: it may
// leave setuid programs, world-writable directories or symlinks to / there. The project
// directory above the share is not shared and is 0700, so no user of the host reaches
// any of that; the share's own root is made 0700 again at every prepare and cleanup.
// Protected and unprotected jobs get separate shares, as GitLab keeps their caches
// apart: an unprotected branch must not plant what a protected pipeline extracts.

var digits = regexp.MustCompile(`^[0-9]{1,20}$`)

// cacheShares are the names of the shares in a project's directory.
const (
	shareProtected   = "protected"
	shareUnprotected = "unprotected"
)

// checkCacheRoot refuses a cache root another user could change: it must be a directory
// (not a symlink to one) that this process's user owns and no one else may write.
func checkCacheRoot(root string) error {
	fi, err := os.Lstat(root)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(root, 0o700); err != nil {
			return fmt.Errorf("LIBVIRT_GCI_CACHE_DIR: %w", err)
		}
		fi, err = os.Lstat(root)
	}
	if err != nil {
		return fmt.Errorf("LIBVIRT_GCI_CACHE_DIR: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("LIBVIRT_GCI_CACHE_DIR %s is a %s; want a directory (not a symlink to one)", root, kindOf(fi))
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("LIBVIRT_GCI_CACHE_DIR %s belongs to uid %d; want a directory of this runner's user (uid %d), which another user cannot change", root, st.Uid, os.Geteuid())
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("LIBVIRT_GCI_CACHE_DIR %s is writable by its group or others (mode %04o); want one only its owner writes (chmod go-w)", root, fi.Mode().Perm())
	}
	return nil
}

// ownDir makes dir (mode 0700) if missing and checks that it is a directory of ours,
// not a symlink: it is never followed.
func ownDir(dir string) error {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is a %s, not a directory; refusing to follow it", dir, kindOf(fi))
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s belongs to uid %d, not to this runner's user", dir, st.Uid)
	}
	// A job may have changed the share's root (chmod 777 /cache): it gets ours back.
	return os.Chmod(dir, 0o700)
}

func kindOf(fi fs.FileInfo) string {
	switch {
	case fi.Mode()&fs.ModeSymlink != 0:
		return "symlink"
	case fi.Mode().IsRegular():
		return "file"
	}
	return "special file"
}

// projectCache is the share a job gets as its cache, under root (LIBVIRT_GCI_CACHE_DIR),
// made if missing: named by the project's id and its GitLab instance, as the runner's job
// response says (never by a job variable), so that no project reaches another's, and
// apart for protected jobs (protected, from the job response too).
func projectCache(root string, o meta.Owner, protected bool) (string, error) {
	if !digits.MatchString(o.ProjectID) {
		return "", fmt.Errorf("project id %q in the job response is not a number; no cache directory for it", o.ProjectID)
	}
	if err := checkCacheRoot(root); err != nil {
		return "", err
	}
	sum := sha256.Sum256([]byte(o.Server))
	project := filepath.Join(root, "p-"+o.ProjectID+"-"+hex.EncodeToString(sum[:4]))
	share := filepath.Join(project, shareUnprotected)
	if protected {
		share = filepath.Join(project, shareProtected)
	}
	for _, d := range []string{project, share} {
		if err := ownDir(d); err != nil {
			return "", fmt.Errorf("cache directory: %w", err)
		}
	}
	return share, nil
}

// cacheShare is the share t's job gets as its cache (projectCache), mounted as a file
// system of its own (mountShare), its root 0700.
func (e *Executor) cacheShare(ctx context.Context, t Target) (string, error) {
	dir, err := projectCache(e.Settings.CacheDir, t.Owner, t.Protected)
	if err != nil {
		return "", err
	}
	m := e.Mounter
	if m == nil {
		m = loopMounter{}
	}
	if err := mountShare(ctx, m, dir, e.Settings.CacheSize); err != nil {
		return "", err
	}
	if err := ownDir(dir); err != nil { // the file system's root, now
		return "", fmt.Errorf("cache directory: %w", err)
	}
	return dir, nil
}
