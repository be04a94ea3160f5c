package provision

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

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
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
}

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

// admit waits until an instance of memKiB fits under the Limits (counted over the
// running instances with our prefix), or ctx ends. It returns holding a host-wide lock
// that the caller releases once its instance is defined and started: launches in other
// processes wait for it, so that none counts before another's instance shows. Without
// limits it does nothing.
func (h *Host) admit(ctx context.Context, conn *libvirt.Conn, memKiB uint64) (release func(), err error) {
	l := h.Limits
	if l.Instances == 0 && l.MemoryTotal == 0 {
		return func() {}, nil
	}
	if l.MemoryTotal > 0 && memKiB*1024 > l.MemoryTotal {
		return nil, fmt.Errorf("an instance of %s memory can never fit under LIBVIRT_GCI_MAX_MEMORY_TOTAL %s", FormatSize(memKiB*1024), FormatSize(l.MemoryTotal))
	}
	start := time.Now()
	said := ""
	for {
		unlock, err := h.lockCapacity(ctx)
		if err != nil {
			return nil, err
		}
		why, err := h.full(conn, memKiB)
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
		if !guest.Sleep(ctx, capacityPoll) {
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

// full says why one more instance of memKiB does not fit now, or "".
func (h *Host) full(conn *libvirt.Conn, memKiB uint64) (string, error) {
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
	case l.MemoryTotal > 0 && mem+memKiB*1024 > l.MemoryTotal:
		return fmt.Sprintf("%s of %s memory (LIBVIRT_GCI_MAX_MEMORY_TOTAL) in use, %s more wanted", FormatSize(mem), FormatSize(l.MemoryTotal), FormatSize(memKiB*1024)), nil
	}
	return "", nil
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
		if !guest.Sleep(ctx, 20*time.Millisecond) {
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
	} else if n, ok := conn.API().(interface{ NodeGetFreeMemory() (uint64, error) }); ok {
		if r.FreeBytes, err = n.NodeGetFreeMemory(); err != nil {
			return Headroom{}, fmt.Errorf("free memory: %w", err)
		}
	}
	return r, nil
}
