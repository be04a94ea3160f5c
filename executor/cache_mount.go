package executor

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Each share is a file system of its own: an ext4 image beside it (SHARE.img, sparse,
// LIBVIRT_GCI_CACHE_SIZE), loop-mounted on it with nosuid,nodev. So a project's cache
// has a size (a full cache fails that project's cache archiving, not other jobs' disks),
// and what a job leaves in it cannot act on the host: a setuid program there runs
// without its owner's rights, a device node opens nothing. The mount stays until the
// host reboots (the next prepare mounts it again), the operator unmounts it, or gc
// removes the share (cache_gc.go).

// cacheMountOptions are the options a share's mount must have.
var cacheMountOptions = []string{"nosuid", "nodev"}

// cacheBytesPerInode: a share's file system has an inode per 64 KiB (163,840 in 10G;
// mkfs's default is 4 times as many). virtiofsd holds a file descriptor open for every
// file of the share the guest has looked up and not yet forgotten: measured, 1.85 KiB
// of host kernel memory each (its inode, dentry and file), which no limit of the job's
// counts. The inodes bound that, at about 300 MiB per job's share of 10G, whatever the
// open-files limit virtiofsd gets (libvirtd's, or a million where it raises it). A
// cache of the runner's archives needs few; a job that writes more files than that gets
// "No space left on device".
const cacheBytesPerInode = 64 << 10

// mountWait bounds mkfs and mount.
const mountWait = 30 * time.Second

// Mounter makes and mounts a share's file system; tests give a fake (mounting needs
// root and loop devices).
type Mounter interface {
	// Mounted says whether dir is a mount point, and with which options.
	Mounted(dir string) (bool, []string, error)
	// Mount makes the image img of size bytes if it is missing, and mounts it on dir.
	Mount(ctx context.Context, img, dir string, size uint64) error
	// Unmount unmounts dir; ErrShareBusy where its file system is in use.
	Unmount(ctx context.Context, dir string) error
}

// loopMounter is the Mounter of the host: mkfs.ext4 and mount -o loop.
type loopMounter struct{}

func (loopMounter) Mounted(dir string) (bool, []string, error) {
	return mountedIn("/proc/self/mountinfo", dir)
}

func (loopMounter) Mount(ctx context.Context, img, dir string, size uint64) error {
	if os.Geteuid() != 0 {
		return errors.New("LIBVIRT_GCI_CACHE_DIR needs the runner to run as root: each project's cache is a file system of its own, mounted nosuid,nodev")
	}
	ctx, cancel := context.WithTimeout(ctx, mountWait)
	defer cancel()
	fi, err := os.Lstat(img)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		f, err := os.OpenFile(img, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		err = f.Truncate(int64(size))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = run(ctx, "mkfs.ext4", "-q", "-F", "-m", "0", "-i", strconv.Itoa(cacheBytesPerInode), "-E", "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0", "-L", "gci-cache", img)
		}
		if err != nil {
			os.Remove(img)
			return err
		}
	case err != nil:
		return err
	case !fi.Mode().IsRegular():
		return fmt.Errorf("%s is a %s, not an image file; refusing to use it", img, kindOf(fi))
	}
	return run(ctx, "mount", "-t", "ext4", "-o", "loop,noatime,"+strings.Join(cacheMountOptions, ","), img, dir)
}

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", name, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// mountedIn reads a mountinfo file: whether dir is a mount point in it (the last mount
// on it counts), and its mount options.
func mountedIn(mountinfo, dir string) (bool, []string, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return false, nil, err
	}
	defer f.Close()
	found, opts := false, []string(nil)
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS ...; spaces in paths as \040.
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || unescapeMount(fields[4]) != dir {
			continue
		}
		found, opts = true, strings.Split(fields[5], ",")
	}
	return found, opts, sc.Err()
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var c byte
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &c); err == nil {
				b.WriteByte(c)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// mountShare makes sure the share dir is its own file system, mounted nosuid,nodev: it
// mounts it (making its image first) where it is not, under the project's lock, and
// refuses a mount of someone else's without those options. It marks the share used
// first, under that lock: gc removes no share used since it looked (gcCaches).
func mountShare(ctx context.Context, m Mounter, dir string, size uint64) error {
	unlock, err := flockDir(ctx, filepath.Dir(dir))
	if err != nil {
		return err
	}
	defer unlock()
	if err := markUsed(dir); err != nil {
		return err
	}
	mounted, opts, err := m.Mounted(dir)
	if err != nil {
		return fmt.Errorf("cache %s: %w", filepath.Base(dir), err)
	}
	if !mounted {
		if err := m.Mount(ctx, dir+".img", dir, size); err != nil {
			return fmt.Errorf("cache %s: mount its file system: %w", filepath.Base(dir), err)
		}
		if mounted, opts, err = m.Mounted(dir); err != nil || !mounted {
			return fmt.Errorf("cache %s: mounted, but not found mounted (%v)", filepath.Base(dir), err)
		}
	}
	for _, o := range cacheMountOptions {
		if !slices.Contains(opts, o) {
			return fmt.Errorf("cache %s is mounted without %s (%s); unmount it, and prepare mounts it as it should", filepath.Base(dir), o, strings.Join(opts, ","))
		}
	}
	return nil
}

// flockDir takes the lock file .lock in dir (flock: the kernel drops it with its
// process), trying until ctx ends.
func flockDir(ctx context.Context, dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cache lock: %w", err)
	}
	for {
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err == nil {
			return func() { f.Close() }, nil
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("cache lock: %w", context.Cause(ctx))
		case <-time.After(50 * time.Millisecond):
		}
	}
}
