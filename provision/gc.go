package provision

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// This host's identity and a process's, for telling whether an instance's runner is gone.
var (
	machineIDFile = "/etc/machine-id"
	bootIDFile    = "/proc/sys/kernel/random/boot_id"
)

func readTrimmed(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}

// processStart is a process's start time (clock ticks after boot), or 0 if it is gone.
func processStart(pid int) uint64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// pid (comm) state ppid ...: comm may hold spaces and parentheses; the fields after
	// the last ')' are fixed. starttime is field 22, the 20th after comm.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 20 {
		return 0
	}
	n, _ := strconv.ParseUint(f[19], 10, 64)
	return n
}

// ProcessOf identifies the process pid on this host (for a job: GitLab Runner, which
// started the stage), so that gc can tell later whether it is gone.
func ProcessOf(pid int) *meta.Process {
	r := &meta.Process{MachineID: readTrimmed(machineIDFile), BootID: readTrimmed(bootIDFile), PID: pid}
	r.Start = processStart(r.PID)
	if r.MachineID == "" || r.BootID == "" || r.Start == 0 {
		return nil // no way to tell later; gc goes by age alone
	}
	return r
}

// lockHolder is this process, as a pool lock's holder: its identity and a token of
// this taking (so that neither a reused PID nor another lock of this process matches).
func lockHolder() libvirt.LockHolder {
	p := ProcessOf(os.Getpid())
	if p == nil {
		return libvirt.LockHolder{}
	}
	return libvirt.LockHolder{
		ID:   fmt.Sprintf("libvirt-gci lock %s %s %d %d %s", p.MachineID, p.BootID, p.PID, p.Start, randomHex(8)),
		Gone: lockHolderGone,
	}
}

// lockHolderGone tells from a lock's holder ID whether its process is certainly gone: a
// process of this host that died, or of one of its earlier boots.
func lockHolderGone(id string) bool {
	var p meta.Process
	var token string
	if n, _ := fmt.Sscanf(id, "libvirt-gci lock %s %s %d %d %s", &p.MachineID, &p.BootID, &p.PID, &p.Start, &token); n != 5 {
		return false
	}
	return gone(&p, "its holder") != ""
}

// orphaned says why no cleanup stage will come for an instance, or "".
func orphaned(m meta.Metadata) string {
	if m.ReadyAt == "" {
		if why := gone(m.Prepare, "its prepare"); why != "" {
			return why + " before the instance was ready"
		}
	}
	return gone(m.Process, "the runner that prepared it")
}

// gone says why the process r (who, for the message) will do nothing more, or "".
func gone(r *meta.Process, who string) string {
	if r == nil || r.MachineID != readTrimmed(machineIDFile) {
		return "" // made by hand, or by a runner on another host: not ours to judge
	}
	if r.BootID != readTrimmed(bootIDFile) {
		return "the host rebooted after its prepare"
	}
	if processStart(r.PID) != r.Start {
		return fmt.Sprintf("%s (pid %d) is gone", who, r.PID)
	}
	return ""
}

// Sweep is what gc found and did.
type Sweep struct {
	Removed, Kept int
	Addresses     int // host entries of gone instances given back
	Warm          int // warm images removed: of gone templates, or unfinished
}

// GC removes orphaned instances with our prefix: those whose runner process is gone or whose host
// rebooted since their prepare, and those older than olderThan (if set) or
// LIBVIRT_GCI_MAX_AGE. Domains without our metadata are never touched, nor instances
// whose runner is alive and that are not too old. dryRun says what it would remove.
func (h *Host) GC(ctx context.Context, dryRun bool, olderThan time.Duration) (Sweep, error) {
	conn, err := h.Connect(ctx)
	if err != nil {
		return Sweep{}, err
	}
	defer conn.Close()
	return h.gc(ctx, conn, dryRun, olderThan, 0)
}

// sweepTime bounds the removals of the sweep every launch makes first (a var for tests).
var sweepTime = 2 * time.Second

// sweep is gc's work done by a launch, within sweepTime. Its failures are warnings;
// the launch goes on unless it was cancelled meanwhile.
func (h *Host) sweep(ctx context.Context, conn *libvirt.Conn) error {
	start := time.Now()
	sw, err := h.gc(ctx, conn, false, 0, sweepTime)
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("sweeping orphans: %w", err)
	}
	if err != nil {
		h.Log.Warn(fmt.Sprintf("sweeping orphans: %v", err))
	}
	if sw.Removed > 0 {
		h.Log.Info(fmt.Sprintf("swept %d orphaned instances in %d ms", sw.Removed, time.Since(start).Milliseconds()),
			"removed", sw.Removed, "ms", time.Since(start).Milliseconds())
	}
	return nil
}

// gc is GC on conn. With a budget (a launch's sweep), it starts no removal once the
// budget, counted from the end of the listing, is spent, but it always makes one: on a
// busy host the listing alone may take longer, and a sweep that never removes anything
// would leave every orphan to the operator's gc.
func (h *Host) gc(ctx context.Context, conn *libvirt.Conn, dryRun bool, olderThan, budget time.Duration) (Sweep, error) {
	var sw Sweep
	list, err := conn.Instances()
	if err != nil {
		return sw, err
	}
	var deadline time.Time
	tried := 0
	if budget > 0 {
		deadline = time.Now().Add(budget)
	}
	var errs []error
	for _, in := range list {
		if !strings.HasPrefix(in.Name, h.Prefix) {
			continue // another runner configuration's
		}
		why := h.verdict(in, olderThan)
		if why == "" || (!deadline.IsZero() && tried > 0 && time.Now().After(deadline)) {
			sw.Kept++
			continue
		}
		if dryRun {
			fmt.Fprintf(h.Out, "would remove %s: %s\n", in.Name, why)
			sw.Removed++
			continue
		}
		// Only the instance that was listed: not a new one of the same name.
		tried++
		_, err := conn.Teardown(ctx, in.Name, func(m meta.Metadata) error {
			if m.PrepareID != in.Metadata.PrepareID {
				return fmt.Errorf("instance %q was replaced meanwhile; leaving it alone", in.Name)
			}
			return nil
		})
		if err != nil {
			errs = append(errs, fmt.Errorf("gc %s: %w", in.Name, err))
			continue
		}
		sw.Removed++
		// A launch's sweep runs in some job's log, which is not the place for other
		// projects' instances: their names go to --debug only (sweep counts them).
		level := slog.LevelInfo
		if !deadline.IsZero() {
			level = slog.LevelDebug
		}
		h.Log.Log(ctx, level, fmt.Sprintf("gc: removed %s: %s", in.Name, why), "name", in.Name)
	}
	if err := h.gcReservations(ctx, conn, dryRun, &sw); err != nil {
		errs = append(errs, err)
	}
	if budget == 0 { // gc's own work, not a launch's sweep: it reads each image's header
		if err := h.gcWarm(ctx, conn, dryRun, &sw); err != nil {
			errs = append(errs, err)
		}
	}
	return sw, errors.Join(errs...)
}

// gcReservations gives back what networks still hold for instances that are gone
// (libvirt.Strays): removed by hand, not by a teardown.
func (h *Host) gcReservations(ctx context.Context, conn *libvirt.Conn, dryRun bool, sw *Sweep) error {
	strays, err := conn.Strays(h.Prefix)
	if err != nil {
		return fmt.Errorf("gc: %w", err)
	}
	var errs []error
	for name, rs := range strays {
		var on []string
		for _, r := range rs {
			on = append(on, r.IP+" on "+r.Network)
		}
		if dryRun {
			fmt.Fprintf(h.Out, "would give back %s's address %s: it is gone\n", name, strings.Join(on, ", "))
			continue
		}
		if err := conn.Unreserved(name, rs); err != nil {
			errs = append(errs, fmt.Errorf("gc: %s's addresses: %w", name, err))
			continue
		}
		sw.Addresses += len(rs)
		h.Log.Debug(fmt.Sprintf("gc: gave back %s's address %s: it is gone", name, strings.Join(on, ", ")), "name", name)
	}
	return errors.Join(errs...)
}

// verdict says why an instance is to go, or "" to keep it.
func (h *Host) verdict(in libvirt.Instance, olderThan time.Duration) string {
	m := in.Metadata
	created, cerr := time.Parse(time.RFC3339, m.CreatedAt)
	age := time.Since(created)
	switch {
	case cerr != nil:
	case olderThan > 0 && age > olderThan:
		return fmt.Sprintf("it is %s old, older than --older-than %s", age.Round(time.Second), olderThan)
	case h.MaxAge > 0 && age > h.MaxAge: // kept or not
		return fmt.Sprintf("it is %s old, older than LIBVIRT_GCI_MAX_AGE %s", age.Round(time.Second), h.MaxAge)
	}
	if ended, why := ending(m, time.Now()); ended {
		return why
	}
	if until, err := time.Parse(time.RFC3339, m.KeepUntil); err == nil {
		if time.Now().After(until) {
			return "kept after its failed job until " + m.KeepUntil + ", which has passed"
		}
		return "" // kept after a failed job: its time decides, under MAX_AGE
	}
	if d, err := time.Parse(time.RFC3339, m.JobDeadline); err == nil && h.JobGrace > 0 && time.Since(d) > h.JobGrace {
		// The runner ends a job at its timeout and runs its cleanup at once; this one's
		// never came (killed, or the runner lost the job), and its runner lives on.
		return fmt.Sprintf("its job's timeout ended %s ago (LIBVIRT_GCI_JOB_GRACE %s): its cleanup never came", time.Since(d).Round(time.Second), h.JobGrace)
	}
	if cerr == nil {
		switch {
		case in.State == "shut off" && h.BootTimeout > 0 && age > h.BootTimeout:
			// A launch starts its instance milliseconds after the define. One still shut
			// off this long after is a define that landed after its prepare was killed
			// (and after the cleanup that followed), or a guest that powered itself off,
			// whose job has failed: no stage will start it.
			return fmt.Sprintf("it is shut off and %s old, older than the boot timeout %s", age.Round(time.Second), h.BootTimeout)
		}
	}
	return orphaned(m)
}
