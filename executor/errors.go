package executor

import (
	"errors"
	"fmt"
	"strconv"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

// BuildFailure: the job's script ran and exited non-zero. Every other error is a system
// failure (libvirt, the guest or its transport, timeouts, bad settings, bad job input).
type BuildFailure struct{ Code int }

func (e *BuildFailure) Error() string { return fmt.Sprintf("job script exited with code %d", e.Code) }

// InputError is bad input from the job or the command line. It is a system failure (the
// job never ran), reported as the one-line message it carries.
type InputError struct{ Msg string }

func (e *InputError) Error() string { return e.Msg }

// Explain is err as the stage reports it: where libvirtd went away under it (stopped,
// restarted), it says so first.
func Explain(err error) error { return provision.Explain(err) }

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

// RunnerEnv is what GitLab Runner gives every stage about itself. These are set by the
// runner, not by the job.
type RunnerEnv struct {
	BuildFailureExitCode  string `envconfig:"BUILD_FAILURE_EXIT_CODE"`
	SystemFailureExitCode string `envconfig:"SYSTEM_FAILURE_EXIT_CODE"`
	BuildExitCodeFile     string `envconfig:"BUILD_EXIT_CODE_FILE"`
}

// ExitCodes GitLab wants for the two failure classes.
type ExitCodes struct{ Build, System int }

// Codes reads the exit codes, defaulting to the runner's usual 1 and 2 (manual use).
func (r RunnerEnv) Codes() ExitCodes {
	c := ExitCodes{Build: 1, System: 2}
	if n, err := strconv.Atoi(r.BuildFailureExitCode); err == nil && n > 0 && n < 256 {
		c.Build = n
	}
	if n, err := strconv.Atoi(r.SystemFailureExitCode); err == nil && n > 0 && n < 256 {
		c.System = n
	}
	return c
}
