package executor

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

// Size is what a job asked for; zero fields keep the template's.
type Size struct {
	CPUs   int
	Memory uint64 // bytes
	Disk   uint64 // bytes: the first disk's overlay capacity
}

func (z Size) String() string {
	var parts []string
	if z.CPUs > 0 {
		parts = append(parts, strconv.Itoa(z.CPUs)+" CPUs")
	}
	if z.Memory > 0 {
		parts = append(parts, FormatSize(z.Memory)+" memory")
	}
	if z.Disk > 0 {
		parts = append(parts, FormatSize(z.Disk)+" disk")
	}
	return strings.Join(parts, ", ")
}

// JobSize reads the size a job asks for (CUSTOM_ENV_LIBVIRT_GCI_CPUS, _MEMORY, _DISK)
// and checks it against the operator's maximums. A job may ask only where the operator
// set a maximum. Nothing is created before this passes.
func JobSize(s Settings, job Job) (Size, error) {
	var z Size
	if job.CPUs != "" {
		n, err := strconv.Atoi(job.CPUs)
		if err != nil || n < 1 {
			return z, &InputError{fmt.Sprintf("CUSTOM_ENV_LIBVIRT_GCI_CPUS %q is invalid; want a whole number of CPUs, 1 or more", job.CPUs)}
		}
		if s.MaxCPUs == 0 || n > s.MaxCPUs {
			return z, &InputError{fmt.Sprintf("CUSTOM_ENV_LIBVIRT_GCI_CPUS %d is more than this runner allows (LIBVIRT_GCI_MAX_CPUS %s)", n, orUnset(s.MaxCPUs > 0, strconv.Itoa(s.MaxCPUs)))}
		}
		z.CPUs = n
	}
	for _, f := range []struct {
		name, val, max string
		limit          uint64
		min            uint64
		dst            *uint64
	}{
		{"MEMORY", job.Memory, "LIBVIRT_GCI_MAX_MEMORY", s.MaxMemory, 64 << 20, &z.Memory},
		{"DISK", job.Disk, "LIBVIRT_GCI_MAX_DISK", s.MaxDisk, 1 << 20, &z.Disk},
	} {
		if f.val == "" {
			continue
		}
		n, err := ParseSize(f.val)
		if err == nil && n < f.min {
			err = fmt.Errorf("want at least %s", FormatSize(f.min))
		}
		if err != nil {
			return z, &InputError{fmt.Sprintf("CUSTOM_ENV_LIBVIRT_GCI_%s %q is invalid; %v", f.name, f.val, err)}
		}
		if f.limit == 0 || n > f.limit {
			return z, &InputError{fmt.Sprintf("CUSTOM_ENV_LIBVIRT_GCI_%s %s is more than this runner allows (%s %s)", f.name, f.val, f.max, orUnset(f.limit > 0, FormatSize(f.limit)))}
		}
		*f.dst = n
	}
	return z, nil
}

func orUnset(set bool, v string) string {
	if set {
		return v
	}
	return "is not set: jobs keep the template's size"
}

// capacityPoll is how often a prepare that waits for capacity looks again.
var capacityPoll = time.Second

// admit waits until an instance of memKiB fits under LIBVIRT_GCI_MAX_INSTANCES and
// LIBVIRT_GCI_MAX_MEMORY_TOTAL (counted over the running instances with our prefix), or
// ctx ends. It returns holding a host-wide lock that the caller releases once its
// instance is defined and started: prepares in other processes wait for it, so that
// none counts before another's instance shows. Without limits it does nothing.
func (e *Executor) admit(ctx context.Context, conn *provision.Conn, memKiB uint64) (release func(), err error) {
	s := e.Settings
	if s.MaxInstances == 0 && s.MaxMemoryTotal == 0 {
		return func() {}, nil
	}
	if s.MaxMemoryTotal > 0 && memKiB*1024 > s.MaxMemoryTotal {
		return nil, fmt.Errorf("an instance of %s memory can never fit under LIBVIRT_GCI_MAX_MEMORY_TOTAL %s", FormatSize(memKiB*1024), FormatSize(s.MaxMemoryTotal))
	}
	start := time.Now()
	said := ""
	for {
		unlock, err := e.lockCapacity(ctx)
		if err != nil {
			return nil, err
		}
		why, err := e.full(conn, memKiB)
		if err != nil {
			unlock()
			return nil, err
		}
		if why == "" {
			if said != "" {
				e.Log.Info(fmt.Sprintf("capacity free after %.1f s", time.Since(start).Seconds()), "ms", time.Since(start).Milliseconds())
			}
			return unlock, nil
		}
		unlock()
		if why != said {
			e.Log.Info("waiting for capacity: " + why)
			said = why
		}
		if !sleepCtx(ctx, capacityPoll) {
			return nil, fmt.Errorf("no capacity within %.0f s (%v): %s", time.Since(start).Seconds(), context.Cause(ctx), why)
		}
	}
}

// full says why one more instance of memKiB does not fit now, or "".
func (e *Executor) full(conn *provision.Conn, memKiB uint64) (string, error) {
	list, err := conn.Instances()
	if err != nil {
		return "", err
	}
	n, mem := 0, uint64(0)
	for _, in := range list {
		if !strings.HasPrefix(in.Name, e.Settings.Prefix) || in.State == "shut off" {
			continue
		}
		n++
		mem += in.MemoryKiB * 1024
	}
	s := e.Settings
	switch {
	case s.MaxInstances > 0 && n+1 > s.MaxInstances:
		return fmt.Sprintf("%d of %d instances (LIBVIRT_GCI_MAX_INSTANCES) in use", n, s.MaxInstances), nil
	case s.MaxMemoryTotal > 0 && mem+memKiB*1024 > s.MaxMemoryTotal:
		return fmt.Sprintf("%s of %s memory (LIBVIRT_GCI_MAX_MEMORY_TOTAL) in use, %s more wanted", FormatSize(mem), FormatSize(s.MaxMemoryTotal), FormatSize(memKiB*1024)), nil
	}
	return "", nil
}

// lockCapacity takes the host-wide capacity lock of this libvirt and prefix: a file
// beside the secret file (the runner user's own directory), locked with flock, which
// the kernel releases if the process dies.
func (e *Executor) lockCapacity(ctx context.Context) (func(), error) {
	dir := filepath.Dir(e.Settings.SecretFile)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("capacity lock: %w", err)
	}
	h := sha256.Sum256([]byte(e.Settings.URI + "\x00" + e.Settings.Prefix))
	path := filepath.Join(dir, "capacity-"+hex.EncodeToString(h[:6])+".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("capacity lock: %w", err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("capacity lock %s: %w", path, err)
		}
		if !sleepCtx(ctx, 20*time.Millisecond) {
			f.Close()
			return nil, fmt.Errorf("capacity lock %s: %w", path, context.Cause(ctx))
		}
	}
}

// sleepCtx waits d or until ctx ends; it reports whether it slept the whole time.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
