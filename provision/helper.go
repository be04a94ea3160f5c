package provision

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
)

// The gitlab-runner helper: the runner's own binary, given to every instance read-only
// on a small ext4 disk of its own, so that the stages that call it in the guest (artifacts,
// caches) always find the very version that drives the job. The disk is a volume in the
// pool, built once per binary (its device, inode, size and times say which), shared by
// every instance: prepare only attaches it and mounts it (guest.MountHelper).

// helperPrefix begins the names of the helper volumes.
const helperPrefix = "libvirt-gci-runner-"

// HelperSerial is the helper disk's serial: how the guest finds it. HelperDir is where
// the guest mounts it.
const (
	HelperSerial = "gci-runner"
	HelperDir    = guest.HelperDir
)

// helperVolume returns the volume that holds the helper binary at path, building it first
// if this binary has none yet.
func (h *Host) helperVolume(ctx context.Context, conn *libvirt.Conn, path string) (string, error) {
	f, fi, err := openHelper(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	name := helperPrefix + helperID(fi) + ".img"
	done := libvirt.DoneMark(name) // made once the image is whole
	pool, err := conn.Pool(h.Pool)
	if err != nil {
		return "", err
	}
	// Whole: its mark and the image are there (an operator may have deleted the image).
	whole := func() (bool, error) {
		for _, v := range []string{done, name} {
			has, err := pool.Has(v)
			if err != nil {
				return false, fmt.Errorf("gitlab-runner helper volume: %w", err)
			}
			if !has {
				return false, nil
			}
		}
		return true, nil
	}
	if ok, err := whole(); ok || err != nil {
		return name, err
	}

	// Built by one process at a time; the others wait, and find it made.
	unlock, _, err := conn.PoolLock(ctx, h.Log, h.Pool, name, true, nil, lockHolder())
	if err != nil {
		return "", err
	}
	defer unlock()
	if ok, err := whole(); ok || err != nil {
		return name, err
	}
	start := time.Now()
	img, err := buildHelperImage(ctx, f, fi.Size())
	if err != nil {
		return "", err
	}
	defer os.Remove(img)
	// What an earlier try left (a half-made image, or a mark whose image went) goes first.
	if err := pool.Delete(func(v string) bool { return v == name || v == done }); err != nil {
		return "", fmt.Errorf("gitlab-runner helper: remove what an earlier try left: %w", err)
	}
	if err := uploadVolume(pool, name, img); err != nil {
		return "", err
	}
	if err := pool.Mark(done); err != nil {
		return "", fmt.Errorf("gitlab-runner helper: mark %s whole: %w", name, err)
	}
	h.Log.Info(fmt.Sprintf("made the gitlab-runner helper disk %s (%d MB) in %d ms, once for this binary", name, fi.Size()>>20, time.Since(start).Milliseconds()),
		"volume", name, "helper_build_ms", time.Since(start).Milliseconds())
	// A new binary (an upgraded runner): the disks of the old ones go, where no domain
	// uses them any more.
	if n, err := removeOldHelpers(pool, name); err != nil {
		h.Log.Warn(fmt.Sprintf("removing old gitlab-runner helper disks: %v", err))
	} else if n > 0 {
		h.Log.Info(fmt.Sprintf("removed %d old gitlab-runner helper disks", n))
	}
	return name, nil
}

// openHelper opens the gitlab-runner binary at path, which must be a regular file.
func openHelper(path string) (*os.File, os.FileInfo, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("gitlab-runner helper: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("gitlab-runner helper: %w", err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, nil, fmt.Errorf("gitlab-runner helper %s is not a regular file", path)
	}
	return f, fi, nil
}

// helperVolumeName is the name of the helper volume of the binary at path (made or not).
func helperVolumeName(path string) (string, error) {
	f, fi, err := openHelper(path)
	if err != nil {
		return "", err
	}
	f.Close()
	return helperPrefix + helperID(fi) + ".img", nil
}

// removeOldHelpers deletes the helper volumes (and their marks) in pool other than keep
// that no defined domain's XML names. It says how many it deleted.
func removeOldHelpers(pool *libvirt.Pool, keep string) (int, error) {
	return pool.RemoveUnused(func(v string) (string, bool) { // marked or not
		return v, strings.HasPrefix(v, helperPrefix) && strings.HasSuffix(v, ".img") && v != keep
	}, func(name, v string) bool { return v == name })
}

// helperID names a version of the binary by its file identity, which any upgrade
// changes (hashing 60 MB at every prepare would cost more than a tenth of a second).
func helperID(fi os.FileInfo) string {
	sum := sha256.Sum256([]byte(fileIdentity(fi)))
	return hex.EncodeToString(sum[:6])
}

// buildHelperImage makes a read-only ext4 image holding bin as gitlab-runner, and returns
// its path (a temporary file).
func buildHelperImage(ctx context.Context, bin *os.File, size int64) (string, error) {
	mkfs, err := findTool("mkfs.ext4")
	if err != nil {
		return "", fmt.Errorf("gitlab-runner helper: %w; install e2fsprogs, or set LIBVIRT_GCI_RUNNER_BINARY=none", err)
	}
	dir, err := os.MkdirTemp("", "libvirt-gci-helper-")
	if err != nil {
		return "", fmt.Errorf("gitlab-runner helper: %w", err)
	}
	defer os.RemoveAll(dir)
	root := filepath.Join(dir, "root")
	if err := os.Mkdir(root, 0o755); err != nil {
		return "", fmt.Errorf("gitlab-runner helper: %w", err)
	}
	dst, err := os.OpenFile(filepath.Join(root, "gitlab-runner"), os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		return "", fmt.Errorf("gitlab-runner helper: %w", err)
	}
	if _, err := io.Copy(dst, io.NewSectionReader(bin, 0, size)); err != nil {
		dst.Close()
		return "", fmt.Errorf("gitlab-runner helper: copy the binary: %w", err)
	}
	if err := dst.Close(); err != nil {
		return "", fmt.Errorf("gitlab-runner helper: %w", err)
	}
	img, err := os.CreateTemp("", "libvirt-gci-helper-*.img")
	if err != nil {
		return "", fmt.Errorf("gitlab-runner helper: %w", err)
	}
	img.Close()
	// Room for the file and ext4's own blocks; no journal: it is never written.
	kib := (size*11/10)>>10 + 4096
	out, err := exec.CommandContext(ctx, mkfs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", HelperSerial,
		"-E", "root_owner=0:0", "-d", root, img.Name(), fmt.Sprintf("%dk", kib)).CombinedOutput()
	if err != nil {
		os.Remove(img.Name())
		return "", fmt.Errorf("gitlab-runner helper: mkfs.ext4: %v: %s", err, out)
	}
	return img.Name(), nil
}

// findTool finds a system tool, in /sbin and /usr/sbin too (not on every user's PATH).
func findTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin"} {
		if p := filepath.Join(d, name); isExecutable(p) {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s not found", name)
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// uploadVolume creates the raw volume name in pool with the content of the file img.
func uploadVolume(pool *libvirt.Pool, name, img string) error {
	f, err := os.Open(img)
	if err != nil {
		return fmt.Errorf("gitlab-runner helper: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("gitlab-runner helper: %w", err)
	}
	if err := pool.Create(name, uint64(fi.Size()), 0o644); err != nil {
		return fmt.Errorf("gitlab-runner helper: %w", err)
	}
	if err := pool.Upload(name, f, uint64(fi.Size())); err != nil {
		return fmt.Errorf("gitlab-runner helper: %w", err)
	}
	return nil
}
