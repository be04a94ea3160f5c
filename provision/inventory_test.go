package provision

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// The inventory has every instance with its phase, the warm image with its bytes and
// the instances standing on it, the pool, and what counts against the limits: a ready
// instance does, an ending one does not.
func TestInventory(t *testing.T) {
	t.Parallel()
	f, _, h, warm := firstRestore(t)
	h.Limits = Limits{Instances: 4, MemoryTotal: 8 << 30}
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-b")))
	_, err := h.End(context.Background(), "gci-b", nil)
	require.NoError(t, err)

	inv, err := h.Inventory(NewConn(f))
	require.NoError(t, err)
	require.Len(t, inv.Instances, 2)
	assert.Equal(t, meta.PhaseReady, inv.Instances[0].Metadata.Phase())
	assert.Equal(t, meta.PhaseEnding, inv.Instances[1].Metadata.Phase())
	assert.Positive(t, inv.Instances[0].Metadata.PrepareMS, "the launch recorded how long it took")
	assert.Equal(t, Usage{Instances: 1, MemoryBytes: inv.Instances[0].MemoryKiB * 1024}, inv.InUse)
	assert.Equal(t, h.Limits, inv.Limits)

	require.Len(t, inv.Warm, 1)
	w := inv.Warm[0]
	assert.Equal(t, warm, w.Name)
	assert.Equal(t, 2, w.Users)
	assert.Equal(t, []string{"tmpl"}, w.Templates)
	assert.GreaterOrEqual(t, w.Volumes, 3, "overlay, memory image, mark")
	assert.Positive(t, w.Bytes, "the memory image's bytes")

	assert.Equal(t, PoolInfo{Name: "ci", Found: true, Active: true, Capacity: provisiontest.PoolCapacity,
		Allocation: inv.Pool.Allocation, Available: provisiontest.PoolCapacity - inv.Pool.Allocation}, inv.Pool)
	assert.GreaterOrEqual(t, inv.Pool.Allocation, w.Bytes)

	// A pool that is not there is said so, with the instances all the same.
	h.Pool = "nowhere"
	inv, err = h.Inventory(NewConn(f))
	require.NoError(t, err)
	assert.False(t, inv.Pool.Found)
	assert.Len(t, inv.Instances, 2)
	assert.Empty(t, inv.Warm)
}

func TestPhase(t *testing.T) {
	t.Parallel()
	now := time.Now().UTC().Format(time.RFC3339)
	assert.Equal(t, meta.PhasePreparing, meta.Metadata{}.Phase())
	assert.Equal(t, meta.PhaseReady, meta.Metadata{ReadyAt: now}.Phase())
	assert.Equal(t, meta.PhaseKept, meta.Metadata{ReadyAt: now, KeepUntil: now}.Phase())
	assert.Equal(t, meta.PhaseEnding, meta.Metadata{ReadyAt: now, KeepUntil: now, EndingAt: now}.Phase())
}

func TestHumanSize(t *testing.T) {
	t.Parallel()
	for b, want := range map[uint64]string{
		0: "0 bytes", 1023: "1023 bytes", 1 << 10: "1 KiB", 256 << 20: "256 MiB", 1536 << 20: "1.5 GiB",
		100<<30 - 1: "100 GiB", 235*(1<<30) + 400<<20: "235 GiB", 3 << 40: "3 TiB",
	} {
		assert.Equal(t, want, HumanSize(b), "%d", b)
	}
}
