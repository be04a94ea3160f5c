package libvirt

import (
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
)

// A stage whose libvirtd went away says so, whatever call it was in; other errors are
// left as they are.
func TestExplainNamesLibvirtd(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	for _, err := range []error{
		fmt.Errorf("warm image w: start %q: %w", "d", libvirt.ErrInterrupted),
		fmt.Errorf("connect to qemu:///system: %w", refused),
		fmt.Errorf("look up: %w", &net.OpError{Op: "write", Net: "unix", Err: os.NewSyscallError("write", syscall.EPIPE)}),
		fmt.Errorf("read: %w", net.ErrClosed),
	} {
		got := Explain(err)
		assert.ErrorIs(t, got, ErrLost, "%v", err)
		assert.ErrorIs(t, got, err)
		assert.Contains(t, got.Error(), "libvirtd")
	}
	for _, err := range []error{
		nil,
		errors.New("domain not found"),
		fmt.Errorf("open: %w", os.ErrNotExist),
		&net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ETIMEDOUT)},
	} {
		assert.Equal(t, err, Explain(err))
	}
	already := fmt.Errorf("%w: x", ErrLost)
	assert.Equal(t, already, Explain(already), "said once")
}
