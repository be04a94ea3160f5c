package executor

import (
	"errors"
	"fmt"
)

// BuildFailure: the job's script ran and exited non-zero. Every other error is a system
// failure (libvirt, the guest or its transport, timeouts, bad settings, bad job input).
type BuildFailure struct{ Code int }

func (e *BuildFailure) Error() string { return fmt.Sprintf("job script exited with code %d", e.Code) }

// InputError is bad input from the job or the command line. It is a system failure (the
// job never ran), reported as the one-line message it carries.
type InputError struct{ Msg string }

func (e *InputError) Error() string { return e.Msg }

// ExitCode maps the outcome of a stage to GitLab's exit code contract. It is the one place
// that does.
func ExitCode(err error, codes ExitCodes) int {
	if err == nil {
		return 0
	}
	var bf *BuildFailure
	if errors.As(err, &bf) {
		return codes.Build
	}
	return codes.System
}
