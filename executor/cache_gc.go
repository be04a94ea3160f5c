package executor

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

// A cache share lives until gc removes it: once it has not been used for
// LIBVIRT_GCI_CACHE_MAX_IDLE, or, while the shares together hold more than
// LIBVIRT_GCI_CACHE_TOTAL, the least recently used first. Its last use is the time of
// the last prepare that gave it to a job (SHARE.used; its image's before that file
// existed).

// cacheIdleFloor: a share used this recently is never removed. Its prepare mounts it
// before the VM whose virtiofsd holds it open starts (the unmount of a share in use
// fails, and gc leaves it), and a share removed in between would leave that VM the
// bare directory under it.
const cacheIdleFloor = 10 * time.Minute

// cacheShareInfo is a share on the host: its directory, its last use and the bytes its
// image holds.
type cacheShareInfo struct {
	Dir   string
	Used  time.Time
	Bytes uint64
}

// markUsed records that a prepare gave the share dir to a job now.
func markUsed(dir string) error {
	f, err := os.OpenFile(dir+".used", os.O_CREATE|os.O_WRONLY|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("cache %s: %w", filepath.Base(dir), err)
	}
	f.Close()
	now := time.Now()
	return os.Chtimes(dir+".used", now, now)
}

// cacheShares lists the shares under root (ROOT/p-*/{protected,unprotected}, each with
// its image), the least recently used first.
func cacheShares(root string) ([]cacheShareInfo, error) {
	projects, err := filepath.Glob(filepath.Join(root, "p-*"))
	if err != nil {
		return nil, err
	}
	var out []cacheShareInfo
	for _, p := range projects {
		for _, name := range []string{shareProtected, shareUnprotected} {
			dir := filepath.Join(p, name)
			img, err := os.Lstat(dir + ".img")
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				return nil, err
			}
			if !img.Mode().IsRegular() {
				continue // not ours: mountShare refuses it too
			}
			s := cacheShareInfo{Dir: dir, Used: img.ModTime()}
			if st, ok := img.Sys().(*syscall.Stat_t); ok {
				s.Bytes = uint64(st.Blocks) * 512
			}
			if u, err := os.Lstat(dir + ".used"); err == nil {
				s.Used = u.ModTime()
			}
			out = append(out, s)
		}
	}
	slices.SortFunc(out, func(a, b cacheShareInfo) int { return a.Used.Compare(b.Used) })
	return out, nil
}

// CacheGC is what gcCaches did (or, with dryRun, would do): the shares removed, with why,
// and those it had to leave (in use).
type CacheGC struct {
	Removed []string // "p-42-ab12cd34/unprotected: not used for 200h"
	InUse   int
}

// gcCaches removes the cache shares not used for maxIdle (if set), then, while the shares
// hold more than total bytes (if set), the least recently used; never one used within
// cacheIdleFloor, nor one in use (its unmount fails). Each goes under its project's
// lock, which prepare's mount takes too: its file system unmounted, its image, mark and
// mount point removed.
func (e *Executor) gcCaches(ctx context.Context, dryRun bool) (CacheGC, error) {
	var res CacheGC
	root, s := e.Settings.CacheDir, e.Settings
	if root == "" {
		return res, nil
	}
	if _, err := os.Lstat(root); errors.Is(err, fs.ErrNotExist) {
		return res, nil
	}
	if err := checkCacheRoot(root); err != nil {
		return res, err
	}
	shares, err := cacheShares(root)
	if err != nil {
		return res, fmt.Errorf("caches: %w", err)
	}
	var held uint64
	for _, sh := range shares {
		held += sh.Bytes
	}
	now := time.Now()
	for _, sh := range shares { // the least recently used first
		idle := now.Sub(sh.Used)
		why := ""
		switch {
		case idle < cacheIdleFloor:
			continue
		case s.CacheMaxIdle > 0 && idle > s.CacheMaxIdle:
			why = fmt.Sprintf("not used for %s (LIBVIRT_GCI_CACHE_MAX_IDLE %s)", idle.Round(time.Minute), s.CacheMaxIdle)
		case s.CacheTotal > 0 && held > s.CacheTotal:
			why = fmt.Sprintf("the least recently used (%s ago) while the caches hold %s, over LIBVIRT_GCI_CACHE_TOTAL %s",
				idle.Round(time.Minute), provision.HumanSize(held), provision.HumanSize(s.CacheTotal))
		default:
			continue
		}
		name := filepath.Base(filepath.Dir(sh.Dir)) + "/" + filepath.Base(sh.Dir)
		if dryRun {
			res.Removed = append(res.Removed, name+": "+why)
			held -= sh.Bytes
			continue
		}
		gone, err := e.removeShare(ctx, sh.Dir, sh.Used)
		if err != nil {
			return res, fmt.Errorf("cache %s: %w", name, err)
		}
		if !gone {
			res.InUse++
			continue
		}
		res.Removed = append(res.Removed, name+": "+why)
		held -= sh.Bytes
	}
	return res, nil
}

// removeShare removes the share dir if it is still as gcCaches found it (not used since
// used) and in use by no VM: its file system unmounted (a share a VM's virtiofsd holds
// does not unmount: gone is false), its image, its mark and its mount point removed.
func (e *Executor) removeShare(ctx context.Context, dir string, used time.Time) (gone bool, err error) {
	unlock, err := flockDir(ctx, filepath.Dir(dir))
	if err != nil {
		return false, err
	}
	defer unlock()
	if u, err := os.Lstat(dir + ".used"); err == nil && u.ModTime().After(used) {
		return false, nil // a prepare gave it to a job meanwhile
	}
	m := e.Mounter
	if m == nil {
		m = loopMounter{}
	}
	mounted, _, err := m.Mounted(dir)
	if err != nil {
		return false, err
	}
	if mounted {
		if err := m.Unmount(ctx, dir); err != nil {
			if errors.Is(err, ErrShareBusy) {
				return false, nil
			}
			return false, err
		}
	}
	for _, f := range []string{dir + ".img", dir + ".used"} {
		if err := os.Remove(f); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return false, err
		}
	}
	// The mount point is empty once unmounted; what a job wrote is in the image.
	if err := os.Remove(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("remove its mount point: %w", err)
	}
	return true, nil
}

// ErrShareBusy: a share's file system is in use (a VM's virtiofsd holds it) and does
// not unmount.
var ErrShareBusy = errors.New("in use")

// Unmount unmounts the share dir, unless a process was started to serve it (libvirt's
// virtiofsd, given it as -o source=DIR, or --shared-dir DIR for the Rust one: it holds
// it from a mount namespace of its own, so the unmount alone would not fail), and never
// lazily, so that one otherwise in use stays.
func (loopMounter) Unmount(ctx context.Context, dir string) error {
	if pid := servedBy("/proc", dir); pid != "" {
		return fmt.Errorf("%w: process %s serves it", ErrShareBusy, pid)
	}
	ctx, cancel := context.WithTimeout(ctx, mountWait)
	defer cancel()
	err := run(ctx, "umount", dir)
	if err != nil && strings.Contains(err.Error(), "busy") {
		return fmt.Errorf("%w: %v", ErrShareBusy, err)
	}
	return err
}

// servedBy is the pid of a process under proc that has dir as an argument of its own
// (--shared-dir DIR, --shared-dir=DIR, source=DIR), or "".
func servedBy(proc, dir string) string {
	cmdlines, _ := filepath.Glob(filepath.Join(proc, "[0-9]*", "cmdline"))
	for _, c := range cmdlines {
		b, err := os.ReadFile(c)
		if err != nil {
			continue // gone meanwhile
		}
		for _, arg := range strings.Split(string(b), "\x00") {
			if arg == dir || strings.HasSuffix(arg, "="+dir) {
				return filepath.Base(filepath.Dir(c))
			}
		}
	}
	return ""
}
