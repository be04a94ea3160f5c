package provision

import (
	"bytes"
	"context"
	"io"
	"strings"
	"syscall"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// launchedA is a fake libvirtd with the instance gci-a launched, its host, and the
// host's log.
func launchedA(t *testing.T) (*provisiontest.Libvirt, *Host, *bytes.Buffer) {
	t.Helper()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	return f, h, &log
}

// runInA runs script in gci-a as a stage does, on a session of its own; the stage's
// error.
func runInA(t *testing.T, h *Host, script string) error {
	t.Helper()
	s, err := h.Open(context.Background(), "gci-a", nil)
	require.NoError(t, err)
	defer s.Close()
	_, err = s.Run(context.Background(), []byte(script), io.Discard, io.Discard)
	return err
}

// Issue 38: a VM that dies under a stage (its QEMU killed) fails the stage with a line
// that says the VM is no longer running and why, where the transport alone said
// "guest agent guest-exec-status: domain is not running".
func TestStageSaysTheVMIsGone(t *testing.T) {
	t.Parallel()
	f, h, _ := launchedA(t)
	f.SetJob(func(j *provisiontest.Job) (int, int) {
		f.Crash(j.Domain)
		return 0, 9
	})
	err := runInA(t, h, "sleep 613")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "the VM is no longer running (shut off: its QEMU ended without a shutdown (killed, or the guest's kernel panicked)): ")
}

// Issue 38: the pool's file system full under a stage. QEMU pauses the VM on the write it
// cannot store; the stage fails at once saying so, where the guest would otherwise wait
// on its write until the job's timeout (measured on the real guest: a write hung for as
// long as the stage was let run).
func TestStageSaysThePoolIsFull(t *testing.T) {
	t.Parallel()
	for _, refused := range []bool{false, true} { // the agent still answering, or not
		f, h, _ := launchedA(t)
		f.SetJob(func(j *provisiontest.Job) (int, int) {
			if refused {
				f.FillPool(j.Domain)
			} else {
				go func() {
					time.Sleep(100 * time.Millisecond)
					f.FillPool(j.Domain)
					f.Resume(j.Domain)
					f.FillPool(j.Domain)
				}()
			}
			<-j.Killed()
			return 0, 15
		})
		start := time.Now()
		err := runInA(t, h, "head -c 64M /dev/urandom >/var/fill")
		require.Error(t, err)
		assert.Contains(t, err.Error(), "the VM paused: a write to its disks could not be stored, the file system under its storage pool is full")
		assert.Less(t, time.Since(start), 5*time.Second, "at once, not at the job's timeout")
	}
}

// Issue 38: libvirtd restarted under a cleanup's removal. The removal goes on, on a new
// connection, once libvirtd is back; before, the cleanup failed and left the VM to gc.
func TestRemoveOutlastsALibvirtdRestart(t *testing.T) {
	t.Parallel()
	f, h, log := launchedA(t)
	f.FailNth("DomainUndefineFlags", countCalls(f, "DomainUndefineFlags")+1, golibvirt.ErrInterrupted)
	require.NoError(t, h.Remove(context.Background(), "gci-a", nil))
	assert.Contains(t, log.String(), "lost libvirtd while removing gci-a")
	assert.Equal(t, "domain tmpl running=false", f.State(), "nothing of gci-a left")
}

// Issue 38: libvirtd restarted under a prepare. The prepare fails saying so in its
// first words, whichever call the restart cut short (later calls on the connection
// fail with go-libvirt's "invalid argument"), and rolls back once libvirtd is back.
func TestLaunchSaysLibvirtdWentAway(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	gate := f.Gate("DomainDefineXMLFlags")
	go func() {
		<-f.Entered()
		f.Drop() // libvirtd stops: the define in flight is cut short, never done
		f.Reconnect()
	}()
	t.Cleanup(func() { close(gate) }) // the fake's gated call ends, after the test
	err := h.Launch(context.Background(), launchReq("gci-a"))
	require.Error(t, err)
	assert.True(t, strings.HasPrefix(err.Error(), "lost the connection to libvirtd (was it stopped or restarted?): "), err.Error())
	assert.Equal(t, "domain tmpl running=false", f.State(), "rolled back once libvirtd was back")
}

// Issue 38 (the soak's piece D found it): libvirtd stopped under a stage over the agent.
// go-libvirt closes its socket first and says that the connection ended a moment later;
// a status call in that moment fails with the socket's bare EINVAL. The stage still
// says that it lost libvirtd; before, it failed with "guest agent guest-exec-status:
// invalid argument" alone.
func TestStageSaysLibvirtdWentAwayBeforeItsEndIsSaid(t *testing.T) {
	t.Parallel()
	f, h, _ := launchedA(t)
	f.SetJob(func(j *provisiontest.Job) (int, int) {
		go func() {
			time.Sleep(100 * time.Millisecond)
			f.Fail("QEMUDomainAgentCommand", syscall.EINVAL) // the socket is closed
			time.Sleep(300 * time.Millisecond)
			f.Drop() // and then the connection's end is said
		}()
		<-j.Killed()
		return 0, 15
	})
	err := runInA(t, h, "sleep 613")
	require.Error(t, err)
	assert.ErrorIs(t, err, libvirt.ErrLost)
	assert.Contains(t, err.Error(), "lost the connection to libvirtd")
	assert.Contains(t, err.Error(), "guest-exec-status: invalid argument", "what the call said stays in the line")
}
