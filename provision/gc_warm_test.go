package provision

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"testing"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
)

// Issue 38: gc leaves nothing that nothing will use. A warm image whose template is
// gone goes once no domain uses it (before, it stayed for ever); one whose template is
// there stays. A pool lock whose holder was killed goes (before, it stayed until the
// next taker of that lock came).
func TestGCWarmOfGoneTemplatesAndDeadLocks(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat(machineIDFile); err != nil {
		t.Skip("no /etc/machine-id")
	}
	f, log, h, warm := firstRestore(t)
	ctx := context.Background()

	// A lock of a killed process, and one of a live one (this test).
	conn := libvirt.NewConn(f)
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	me := ProcessOf(os.Getpid())
	dead := libvirt.LockHolder{ID: fmt.Sprintf("libvirt-gci lock %s %s %d %d deadbeef", me.MachineID, me.BootID, cmd.Process.Pid, me.Start), Gone: lockHolderGone}
	lg := slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil))
	_, ok, err := conn.PoolLock(ctx, lg, "ci", "killed", false, nil, dead)
	require.True(t, ok, err)
	unlock, ok, err := conn.PoolLock(ctx, lg, "ci", "alive", false, nil, lockHolder())
	require.True(t, ok, err)
	defer unlock()

	sw, err := h.GC(ctx, false, 0)
	require.NoError(t, err)
	assert.Zero(t, sw.Warm, "its template is there")
	assert.Contains(t, f.State(), warm+".done")
	assert.NotContains(t, f.State(), "killed.lock", "its holder is gone")
	assert.Contains(t, f.State(), "alive.lock", "its holder lives")
	assert.Contains(t, log.String(), "gc: removed the lock killed.lock: its holder is gone")

	require.NoError(t, f.DomainUndefineFlags(golibvirt.Domain{Name: "tmpl"}, 0))
	sw, err = h.GC(ctx, false, 0)
	require.NoError(t, err)
	assert.Zero(t, sw.Warm, "gci-a stands on it")
	assert.Contains(t, f.State(), warm+".done")

	require.NoError(t, h.Remove(ctx, "gci-a", nil))
	log.Reset()
	sw, err = h.GC(ctx, false, 0)
	require.NoError(t, err)
	assert.Equal(t, 1, sw.Warm)
	assert.NotContains(t, f.State(), warm, "none of its volumes left")
	assert.Contains(t, log.String(), "gc: removed the warm image "+warm+": its template tmpl is gone")
}

// Issue 38 (the soak's piece C left one): a warm image that is not marked whole and that
// nobody makes (its restore found it damaged and unmarked it, and no job of its template
// came again; or its template went meanwhile) is removed by gc once no domain uses it;
// before, gc left every unmarked image to a maker that would never come. One that a
// maker holds the lock of stays, and so does one a domain stands on.
func TestGCUnfinishedWarmImages(t *testing.T) {
	t.Parallel()
	f, log, h, warm := firstRestore(t)
	ctx := context.Background()
	conn := libvirt.NewConn(f)
	require.NoError(t, h.dropWarm(conn, warm))
	require.Contains(t, f.State(), warm+".save")

	sw, err := h.GC(ctx, false, 0)
	require.NoError(t, err)
	assert.Zero(t, sw.Warm, "gci-a stands on it")
	assert.Contains(t, f.State(), warm+".save")

	require.NoError(t, h.Remove(ctx, "gci-a", nil))
	lg := slog.New(slog.NewTextHandler(&bytes.Buffer{}, nil))
	unlock, ok, err := conn.PoolLock(ctx, lg, "ci", warm, false, nil, lockHolder())
	require.True(t, ok, err)
	sw, err = h.GC(ctx, false, 0)
	require.NoError(t, err)
	assert.Zero(t, sw.Warm, "its maker holds its lock")
	assert.Contains(t, f.State(), warm+".save")
	unlock()

	log.Reset()
	sw, err = h.GC(ctx, false, 0)
	require.NoError(t, err)
	assert.Equal(t, 1, sw.Warm)
	assert.NotContains(t, f.State(), warm, "none of its volumes left, nor its lock")
	assert.Contains(t, log.String(), "gc: removed the unfinished warm image "+warm+": not marked whole, and nobody makes it")

	// The next launch makes the image again and restores from it.
	log.Reset()
	require.NoError(t, h.Launch(ctx, launchReq("gci-b")))
	assert.Contains(t, log.String(), "made the warm image "+warm)
	assert.Contains(t, log.String(), "restored tmpl into gci-b from "+warm)
}
