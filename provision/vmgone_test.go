package provision

import (
	"bytes"
	"context"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// Issue 38: a VM that dies under a stage (its QEMU killed) fails the stage with a line
// that says the VM is no longer running and why, where the transport alone said
// "guest agent guest-exec-status: domain is not running".
func TestStageSaysTheVMIsGone(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	f.SetJob(func(j *provisiontest.Job) (int, int) {
		f.Crash(j.Domain)
		return 0, 9
	})
	s, err := h.Open(context.Background(), "gci-a", nil)
	require.NoError(t, err)
	defer s.Close()
	_, err = s.Run(context.Background(), []byte("sleep 613"), io.Discard, io.Discard)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "the VM is no longer running (shut off: its QEMU ended without a shutdown (killed, or the guest's kernel panicked)): ")
}
