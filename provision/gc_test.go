package provision

import (
	"os"
	"os/exec"
	"testing"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestOrphaned(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat(machineIDFile); err != nil {
		t.Skip("no /etc/machine-id")
	}
	me := &meta.Process{MachineID: readTrimmed(machineIDFile), BootID: readTrimmed(bootIDFile), PID: os.Getpid(), Start: processStart(os.Getpid())}
	require.NotZero(t, me.Start)
	assert.Empty(t, orphaned(me), "a live process")
	assert.Empty(t, orphaned(nil), "made by hand: age alone decides")

	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	gone := *me
	gone.PID = cmd.Process.Pid
	assert.Contains(t, orphaned(&gone), "is gone")
	reused := *me
	reused.Start++
	assert.Contains(t, orphaned(&reused), "is gone", "a PID taken by another process")
	rebooted := *me
	rebooted.BootID = "another-boot"
	assert.Equal(t, "the host rebooted after its prepare", orphaned(&rebooted))
	elsewhere := gone
	elsewhere.MachineID = "another-host"
	assert.Empty(t, orphaned(&elsewhere), "another host's runner is not ours to judge")
}
