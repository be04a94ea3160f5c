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
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// A pool lock says who holds it (issue 24): one whose holder was killed (kill -9 of a
// prepare building a warm image) is taken at once, not after the two minutes a lock of
// unknown holder waits; one whose holder lives is not.
func TestPoolLockOfAKilledHolder(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat(machineIDFile); err != nil {
		t.Skip("no /etc/machine-id")
	}
	f := provisiontest.New("ci")
	conn := libvirt.NewConn(f)
	var log bytes.Buffer
	lg := slog.New(slog.NewTextHandler(&log, nil))
	ctx := context.Background()

	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	me := ProcessOf(os.Getpid())
	require.NotNil(t, me)
	dead := libvirt.LockHolder{ID: fmt.Sprintf("libvirt-gci lock %s %s %d %d deadbeef", me.MachineID, me.BootID, cmd.Process.Pid, me.Start), Gone: lockHolderGone}
	_, ok, err := conn.PoolLock(ctx, lg, "ci", "warm", false, nil, dead)
	require.NoError(t, err)
	require.True(t, ok)

	unlock, ok, err := conn.PoolLock(ctx, lg, "ci", "warm", false, func() bool { return false }, lockHolder())
	require.NoError(t, err)
	assert.True(t, ok, "the killed holder's lock is taken at once")
	assert.Contains(t, log.String(), "removed the lock warm.lock: its holder is gone")

	_, ok, err = conn.PoolLock(ctx, lg, "ci", "warm", false, func() bool { return false }, lockHolder())
	require.NoError(t, err)
	assert.False(t, ok, "a live holder's lock is not")
	unlock()
	_, ok, err = conn.PoolLock(ctx, lg, "ci", "warm", false, nil, lockHolder())
	require.NoError(t, err)
	assert.True(t, ok, "unlocked")
}

// Unlocking removes the lock only while it is the holder's: a holder taken for gone (it
// waited past the stale limit) does not remove the lock of the process that took over.
func TestPoolUnlockIsOwnerChecked(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	conn := libvirt.NewConn(f)
	var log bytes.Buffer
	lg := slog.New(slog.NewTextHandler(&log, nil))
	ctx := context.Background()
	first, ok, err := conn.PoolLock(ctx, lg, "ci", "warm", false, nil, lockHolder())
	require.NoError(t, err)
	require.True(t, ok)

	// Another process takes it for stale: it removes it and takes its own.
	pool, err := f.StoragePoolLookupByName("ci")
	require.NoError(t, err)
	v, err := f.StorageVolLookupByName(pool, "warm.lock")
	require.NoError(t, err)
	require.NoError(t, f.StorageVolDelete(v, golibvirt.StorageVolDeleteNormal))
	second, ok, err := conn.PoolLock(ctx, lg, "ci", "warm", false, nil, lockHolder())
	require.NoError(t, err)
	require.True(t, ok)

	first()
	assert.Contains(t, log.String(), "the lock warm.lock is no longer ours")
	_, ok, err = conn.PoolLock(ctx, lg, "ci", "warm", false, nil, lockHolder())
	require.NoError(t, err)
	assert.False(t, ok, "the second holder's lock stays")
	second()
	_, ok, err = conn.PoolLock(ctx, lg, "ci", "warm", false, nil, lockHolder())
	require.NoError(t, err)
	assert.True(t, ok)
}
