package provision

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// Limits bound the host's running instances with the Host's prefix; zero: no limit.
type Limits struct {
	Instances   int    // LIBVIRT_GCI_MAX_INSTANCES
	MemoryTotal uint64 // LIBVIRT_GCI_MAX_MEMORY_TOTAL, bytes
	// Kept bounds the failed jobs' VMs kept (LIBVIRT_GCI_KEEP_FAILED), in all and per
	// project: they are counted apart from the running instances.
	Kept, KeptPerProject int
	// WarmSizes bounds the warm images per template and profile for sizes jobs ask
	// for (LIBVIRT_GCI_WARM_SIZES): a job asking for yet another size boots.
	WarmSizes int
	// DiskFull: a job starts only where the instance pool has room for what every
	// instance's disks may still grow by, and for its own disks at their full size
	// (LIBVIRT_GCI_DISK_RESERVE=full). Else DiskReserve, if not zero: a job starts only
	// while the pool has that many bytes free (overcommit).
	DiskFull    bool
	DiskReserve uint64
}

// demand is what one more instance takes: its memory and what its disks may grow to.
type demand struct {
	memKiB uint64
	disk   uint64 // bytes
}

// checksDisk says whether admissions hold disks against the instance pool's room.
func (l Limits) checksDisk() bool { return l.DiskFull || l.DiskReserve > 0 }

// Size is what an instance is given instead of its template's; zero fields keep the
// template's.
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

// capacityPoll is how often a launch that waits for capacity looks again.
var capacityPoll = time.Second

// admit waits until an instance of demand d fits under the Limits (memory and
// instances counted over the running instances with our prefix, disk room over every
// instance in the pool), or ctx ends; it fails at once where waiting cannot help. It
// returns holding a host-wide lock that the caller releases once its instance shows in
// a listing as what counts: launches in other processes wait for it, so that none
// counts before another's instance shows. Without limits it does nothing.
func (h *Host) admit(ctx context.Context, conn *libvirt.Conn, d demand) (release func(), err error) {
	l := h.Limits
	if l.Instances == 0 && l.MemoryTotal == 0 && !l.checksDisk() {
		return func() {}, nil
	}
	if l.MemoryTotal > 0 && d.memKiB*1024 > l.MemoryTotal {
		return nil, fmt.Errorf("an instance of %s memory can never fit under LIBVIRT_GCI_MAX_MEMORY_TOTAL %s", FormatSize(d.memKiB*1024), FormatSize(l.MemoryTotal))
	}
	start := time.Now()
	said := ""
	for {
		unlock, err := h.lockCapacity(ctx)
		if err != nil {
			return nil, err
		}
		why, err := h.full(conn, d)
		if err != nil {
			unlock()
			return nil, err
		}
		if why == "" {
			if said != "" {
				h.Log.Info(fmt.Sprintf("capacity free after %.1f s", time.Since(start).Seconds()), "ms", time.Since(start).Milliseconds())
			}
			return unlock, nil
		}
		unlock()
		if why != said {
			h.Log.Info("waiting for capacity: " + why)
			said = why
		}
		if !sleep(ctx, capacityPoll) {
			return nil, fmt.Errorf("no capacity within %.0f s (%v): %s", time.Since(start).Seconds(), context.Cause(ctx), why)
		}
	}
}

// counts says whether the instance in counts against the Limits: one of ours that is
// neither shut off nor ending (its job is over, it is paused, and its finisher frees its
// memory within a second: the next job need not wait for that).
func (h *Host) counts(in libvirt.Instance) bool {
	return strings.HasPrefix(in.Name, h.Prefix) && in.State != "shut off" && in.Metadata.EndingAt == ""
}

// Usage is the instances and their memory that count against the capacity limits.
type Usage struct {
	Instances   int
	MemoryBytes uint64
}

// usage is what of list counts against the Limits.
func (h *Host) usage(list []libvirt.Instance) Usage {
	var u Usage
	for _, in := range list {
		if h.counts(in) {
			u.Instances++
			u.MemoryBytes += in.MemoryKiB * 1024
		}
	}
	return u
}

// full says why one more instance of demand d does not fit now, or "". Where no wait
// can make it fit it fails with a *NoRoomError.
func (h *Host) full(conn *libvirt.Conn, d demand) (string, error) {
	list, err := conn.Instances()
	if err != nil {
		return "", err
	}
	u := h.usage(list)
	n, mem := u.Instances, u.MemoryBytes
	l := h.Limits
	switch {
	case l.Instances > 0 && n+1 > l.Instances:
		return fmt.Sprintf("%d of %d instances (LIBVIRT_GCI_MAX_INSTANCES) in use", n, l.Instances), nil
	case l.MemoryTotal > 0 && mem+d.memKiB*1024 > l.MemoryTotal:
		return fmt.Sprintf("%s of %s memory (LIBVIRT_GCI_MAX_MEMORY_TOTAL) in use, %s more wanted", FormatSize(mem), FormatSize(l.MemoryTotal), FormatSize(d.memKiB*1024)), nil
	}
	if !l.checksDisk() {
		return "", nil
	}
	return h.diskFull(conn, list, d.disk)
}

// diskFull says why the instance pool has no room now for one more instance whose disks
// grow to disk bytes, or "" (see Limits.DiskFull). Every instance with volumes in the
// pool counts, whoever made it, but a kept one (stopped) and an ending one (paused for
// good): an instance being made counts once its volumes are (Spec.Made).
func (h *Host) diskFull(conn *libvirt.Conn, list []libvirt.Instance, disk uint64) (string, error) {
	free, err := conn.PoolFree(h.Pool)
	if err != nil {
		return "", err
	}
	var vols []meta.Volume
	others := 0 // instances whose end frees room
	for _, in := range list {
		has := slices.ContainsFunc(in.Metadata.Volumes, func(v meta.Volume) bool { return v.Pool == h.Pool })
		if !has {
			continue
		}
		others++
		if in.Metadata.KeepUntil == "" && in.Metadata.EndingAt == "" {
			vols = append(vols, in.Metadata.Volumes...)
		}
	}
	l := h.Limits
	if !l.DiskFull {
		if free >= l.DiskReserve {
			return "", nil
		}
		e := &NoRoomError{Pool: h.Pool, Free: free, Reserve: l.DiskReserve, Never: others == 0}
		if e.Never {
			return "", e
		}
		return e.Error(), nil
	}
	growth, err := conn.Growth(h.Pool, vols)
	if err != nil {
		return "", err
	}
	if growth+disk <= free {
		return "", nil
	}
	e := &NoRoomError{Pool: h.Pool, Free: free, Growth: growth, Disk: disk, Never: others == 0}
	if e.Never {
		return "", e
	}
	return e.Error(), nil
}

// NoRoomError: the instance pool has no room for one more instance's disks
// (LIBVIRT_GCI_DISK_RESERVE).
type NoRoomError struct {
	Pool    string
	Free    uint64 // bytes free in the pool
	Growth  uint64 // what the instances there may still write (DISK_RESERVE=full)
	Disk    uint64 // what the new instance's disks grow to (DISK_RESERVE=full)
	Reserve uint64 // the room kept free (DISK_RESERVE=SIZE)
	// Never: no instance stands in the pool, so no wait frees room.
	Never bool
}

func (e *NoRoomError) Error() string {
	var s string
	if e.Reserve > 0 {
		s = fmt.Sprintf("storage pool %s has %s free, under LIBVIRT_GCI_DISK_RESERVE %s", e.Pool, HumanSize(e.Free), HumanSize(e.Reserve))
	} else {
		s = fmt.Sprintf("storage pool %s has %s free; its instances may still write %s and this one's disks grow to %s (LIBVIRT_GCI_DISK_RESERVE=full)",
			e.Pool, HumanSize(e.Free), HumanSize(e.Growth), HumanSize(e.Disk))
	}
	if e.Never {
		s += "; no instance there will free room: free space under the pool, or give jobs smaller disks"
	}
	return s
}

// lockCapacity takes the host-wide capacity lock of this libvirt and prefix.
func (h *Host) lockCapacity(ctx context.Context) (func(), error) {
	sum := sha256.Sum256([]byte(h.URI + "\x00" + h.Prefix))
	return h.lockFile(ctx, "capacity-"+hex.EncodeToString(sum[:6]))
}

// lockFile takes a host-wide lock: the file NAME.lock beside the secret file (the runner
// user's own directory), locked with flock, which the kernel releases if the process
// dies. It waits until ctx ends.
func (h *Host) lockFile(ctx context.Context, name string) (func(), error) {
	dir := filepath.Dir(h.SecretFile)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("lock %s: %w", name, err)
	}
	path := filepath.Join(dir, name+".lock")
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", name, err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if !sleep(ctx, 20*time.Millisecond) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, context.Cause(ctx))
		}
	}
}

// Headroom is how much room a host has for one more instance, by the capacity rules of
// its Limits: where the job goes when LIBVIRT_GCI_URI lists several hosts.
type Headroom struct {
	Fits      bool   // one more instance of the smallest size fits under the limits now
	Instances int    // running instances with our prefix
	FreeBytes uint64 // memory left under LIBVIRT_GCI_MAX_MEMORY_TOTAL, else the host's free memory
}

// Better tells whether a is the better place for a job than b.
func (a Headroom) Better(b Headroom) bool {
	if a.Fits != b.Fits {
		return a.Fits
	}
	if a.FreeBytes != b.FreeBytes {
		return a.FreeBytes > b.FreeBytes
	}
	return a.Instances < b.Instances
}

func (r Headroom) String() string {
	s := fmt.Sprintf("%d instances, %d MiB memory free", r.Instances, r.FreeBytes>>20)
	if !r.Fits {
		s += ", full"
	}
	return s
}

// Headroom measures the host's room for another instance.
func (h *Host) Headroom(conn *libvirt.Conn) (Headroom, error) {
	list, err := conn.Instances()
	if err != nil {
		return Headroom{}, err
	}
	u := h.usage(list)
	r := Headroom{Instances: u.Instances}
	mem := u.MemoryBytes
	l := h.Limits
	r.Fits = l.Instances == 0 || r.Instances < l.Instances
	if l.MemoryTotal > 0 {
		r.FreeBytes = l.MemoryTotal - min(mem, l.MemoryTotal)
		r.Fits = r.Fits && r.FreeBytes > 0
	} else if r.FreeBytes, _, err = conn.FreeMemory(); err != nil {
		return Headroom{}, err
	}
	return r, nil
}
