package provision

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// A job ends as soon as its VM can no longer run. The removal itself (libvirt's destroy
// waits for QEMU to exit, then the volumes and the definition) takes a quarter of a
// second or more, and the job need not wait for it: End pauses the instance for good
// and marks it, and Finish, in a process of its own, removes it. gc removes an instance
// marked ending longer ago than endingGrace (a finisher that was killed, or never ran).

// endingGrace is how long gc leaves an ending instance to its finisher: longer than a
// finisher's removal may take.
const endingGrace = teardownTime + time.Minute

// End marks the instance name ending and pauses it (its vCPUs stop at once: nothing of
// the job runs from then on), if allow agrees. It returns the instance's prepare ID, for
// Finish; "" if there is no such instance.
func (h *Host) End(ctx context.Context, name string, allow func(meta.Metadata) error) (string, error) {
	after, cancel := lingering(ctx, AfterCancel)
	defer cancel()
	conn, err := h.reconnect(after)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	return conn.End(name, allow, time.Now(), ProcessOf(os.Getpid()))
}

// Finish removes the instance name that End paused, if it is still the same instance
// (its prepare ID) and marked ending.
func (h *Host) Finish(ctx context.Context, name, prepareID string) error {
	h.takeOver(ctx, name, prepareID)
	return h.Remove(ctx, name, func(m meta.Metadata) error {
		if m.PrepareID != prepareID || m.EndingAt == "" {
			return fmt.Errorf("instance %q is not the one its cleanup ended; leaving it alone", name)
		}
		return nil
	})
}

// takeOver records this process (the finisher) as the ender of the instance name, if it
// is still the one its cleanup ended: its cleanup, which recorded itself, is over. A
// failure here leaves the record as it was: gc then waits out endingGrace.
func (h *Host) takeOver(ctx context.Context, name, prepareID string) {
	conn, err := h.Connect(ctx)
	if err != nil {
		return
	}
	defer conn.Close()
	in, err := conn.Lookup(name)
	if err != nil || in.Metadata.PrepareID != prepareID || in.Metadata.EndingAt == "" {
		return
	}
	m := in.Metadata
	m.Ender = ProcessOf(os.Getpid())
	_ = conn.SetMetadata(name, m)
}

// enderWait is how long after its cleanup paused an instance gc trusts its ender's
// record: a finisher records itself within a moment of its start.
const enderWait = 15 * time.Second

// ending is gc's verdict on an instance its cleanup ended: ended says it was, why why
// gc removes it now ("": its finisher is at work, and gc leaves it alone). One whose
// ender (its cleanup, then its finisher) is gone goes at once: a cleanup killed between
// the pause and the finisher's start left it to no one.
func ending(m meta.Metadata, now time.Time) (ended bool, why string) {
	at, err := time.Parse(time.RFC3339, m.EndingAt)
	if err != nil {
		return false, ""
	}
	if now.Sub(at) < endingGrace {
		if now.Sub(at) > enderWait {
			if why := gone(m.Ender, "the process removing it"); why != "" {
				return true, fmt.Sprintf("its cleanup stopped it at %s, and %s before its removal finished", m.EndingAt, why)
			}
		}
		return true, ""
	}
	return true, fmt.Sprintf("its cleanup stopped it at %s and its removal did not finish", m.EndingAt)
}
