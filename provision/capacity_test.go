package provision

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// lockedLog is a log buffer that a launch in another goroutine writes to.
type lockedLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// diskHost is readyHost on a pool of poolSize bytes, its log in log; the fake's template
// disk is 1 GiB.
func diskHost(t *testing.T, f *provisiontest.Libvirt, log *lockedLog, poolSize uint64, l Limits) *Host {
	t.Helper()
	var unused bytes.Buffer
	h := readyHost(t, f, &unused, time.Minute)
	h.Log = slog.New(slog.NewTextHandler(log, nil))
	h.Limits = l
	f.SetPoolCapacity(h.Pool, poolSize)
	return h
}

// Issue 36, finding 1: a job starts only where the pool holds what every instance's disks
// may still grow to, and its own; it waits for room and says for what, and starts once
// an instance has gone. Where no instance stands to free room it fails at once, and
// makes nothing.
func TestAdmitHoldsDisksAgainstThePool(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log lockedLog
	h := diskHost(t, f, &log, 5<<29, Limits{DiskFull: true}) // 2.5 GiB
	ctx := context.Background()
	require.NoError(t, h.Launch(ctx, launchReq("gci-a")))
	require.NoError(t, h.Launch(ctx, launchReq("gci-b")))

	done := make(chan error, 1)
	go func() { done <- h.Launch(ctx, launchReq("gci-c")) }()
	want := "waiting for capacity: storage pool ci has 2.5 GiB free; its instances may still write 2 GiB and this one's disks grow to 1 GiB (LIBVIRT_GCI_DISK_RESERVE=full)"
	require.Eventually(t, func() bool { return bytes.Contains([]byte(log.String()), []byte(want)) }, 10*time.Second, 20*time.Millisecond, log.String())
	select {
	case err := <-done:
		t.Fatalf("the third job started without room: %v", err)
	case <-time.After(300 * time.Millisecond):
	}
	require.NoError(t, h.Remove(ctx, "gci-a", nil))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("the third job did not start once an instance had gone")
	}
	assert.Contains(t, log.String(), "capacity free after")

	// A job whose disks alone are more than the pool has free, with nothing there to
	// end: no wait helps.
	require.NoError(t, h.Remove(ctx, "gci-b", nil))
	require.NoError(t, h.Remove(ctx, "gci-c", nil))
	f.SetPoolCapacity(h.Pool, 512<<20)
	start := time.Now()
	err := h.Launch(ctx, launchReq("gci-d"))
	var room *NoRoomError
	require.True(t, errors.As(err, &room), "%v", err)
	assert.EqualError(t, room, "storage pool ci has 512 MiB free; its instances may still write 0 bytes and this one's disks grow to 1 GiB (LIBVIRT_GCI_DISK_RESERVE=full); "+
		"no instance there will free room: free space under the pool, or give jobs smaller disks")
	assert.Less(t, time.Since(start), 2*time.Second)
	list, err := NewConn(f).Instances()
	require.NoError(t, err)
	assert.Empty(t, list, "nothing made")
}

// LIBVIRT_GCI_DISK_RESERVE=SIZE overcommits: jobs start while the pool has that much
// free, whatever their disks may grow to.
func TestAdmitKeepsTheReserve(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log lockedLog
	h := diskHost(t, f, &log, 2<<30, Limits{DiskReserve: 1 << 30})
	ctx := context.Background()
	for _, n := range []string{"gci-a", "gci-b", "gci-c"} { // 3 GiB of disks on 2 GiB
		require.NoError(t, h.Launch(ctx, launchReq(n)))
	}
	f.SetPoolCapacity(h.Pool, 768<<20)
	lctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	defer cancel()
	err := h.Launch(lctx, launchReq("gci-d"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "storage pool ci has 768 MiB free, under LIBVIRT_GCI_DISK_RESERVE 1 GiB")
	assert.Contains(t, log.String(), "waiting for capacity: storage pool ci has 768 MiB free, under LIBVIRT_GCI_DISK_RESERVE 1 GiB")
}
