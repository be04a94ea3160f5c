package provision

import (
	"context"
	"fmt"
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
	return conn.End(name, allow, time.Now())
}

// Finish removes the instance name that End paused, if it is still the same instance
// (its prepare ID) and marked ending.
func (h *Host) Finish(ctx context.Context, name, prepareID string) error {
	return h.Remove(ctx, name, func(m meta.Metadata) error {
		if m.PrepareID != prepareID || m.EndingAt == "" {
			return fmt.Errorf("instance %q is not the one its cleanup ended; leaving it alone", name)
		}
		return nil
	})
}

// ending is gc's verdict on an instance its cleanup ended: ended says it was, why why
// gc removes it now ("": its finisher is at work, and gc leaves it alone).
func ending(m meta.Metadata, now time.Time) (ended bool, why string) {
	at, err := time.Parse(time.RFC3339, m.EndingAt)
	if err != nil {
		return false, ""
	}
	if now.Sub(at) < endingGrace {
		return true, ""
	}
	return true, fmt.Sprintf("its cleanup stopped it at %s and its removal did not finish", m.EndingAt)
}
