// Package guest is how commands reach a VM: a Transport, over the QEMU guest agent
// (through libvirt) or SSH (with forwards of the host's services), and the guest's own
// set-up through the agent (a clone made itself, a warm image's quiesce).
package guest

import (
	"context"
	"errors"
	"fmt"
	"io"
)

// Transport runs job scripts in one guest.
type Transport interface {
	// WaitReady returns once the guest accepts commands, or ctx ends.
	WaitReady(ctx context.Context) error
	// Run runs script with bash in the guest and copies its stdout and stderr to the given
	// writers as they are produced. It returns the script's exit status; err is for
	// failures of the transport or the guest, never for a script that exited non-zero.
	// When ctx ends, the script's processes are killed before Run returns.
	Run(ctx context.Context, script []byte, stdout, stderr io.Writer) (ExitStatus, error)
}

// ExitStatus is how a guest process ended.
type ExitStatus struct {
	Code   int // exit code; 128+signal when Signal is set, as shells report it
	Signal int // the signal that killed it, or 0
}

func (s ExitStatus) String() string {
	if s.Signal != 0 {
		return fmt.Sprintf("killed by signal %d", s.Signal)
	}
	return fmt.Sprintf("exit status %d", s.Code)
}

// Dir is the directory inside the guest that holds a stage's script and output while
// it runs: root-only, because scripts carry the job's secrets.
const Dir = "/run/libvirt-gci"

// HelperDir is where prepare mounts the gitlab-runner helper's disk in the guest.
const HelperDir = "/run/libvirt-gci-runner"

// ErrNotReady: the guest did not become ready in time.
var ErrNotReady = errors.New("guest not ready")

// Interrupted is returned by Run when its context ended; the guest processes are gone.
type Interrupted struct{ Cause error }

func (e *Interrupted) Error() string { return fmt.Sprintf("interrupted: %v", e.Cause) }
func (e *Interrupted) Unwrap() error { return e.Cause }
