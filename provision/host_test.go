package provision

import (
	"context"
	"testing"
	"time"

	"github.com/libvirt-gci/libvirt-gci/template"
	"github.com/stretchr/testify/assert"
)

func TestLingeringEndsAfterItsParent(t *testing.T) {
	t.Parallel()
	parent, cancelParent := context.WithCancel(context.Background())
	ctx, cancel := lingering(parent, 100*time.Millisecond)
	defer cancel()
	cancelParent()
	ended := time.Now()
	select {
	case <-ctx.Done():
		t.Fatal("ended with its parent")
	case <-time.After(50 * time.Millisecond):
	}
	select {
	case <-ctx.Done():
		assert.GreaterOrEqual(t, time.Since(ended), 100*time.Millisecond)
		assert.ErrorIs(t, context.Cause(ctx), context.Canceled)
		assert.ErrorContains(t, context.Cause(ctx), "and 100ms more passed")
	case <-time.After(5 * time.Second):
		t.Fatal("did not end after its parent")
	}
}

// The ssh NIC: its own subnet, a forward bound to the host's loopback only, and a MAC
// address of its own per instance.
func TestSSHNetArgs(t *testing.T) {
	t.Parallel()
	macs := map[string]bool{}
	for range 64 {
		m := template.NewMAC()
		assert.Regexp(t, `^52:54:00(:[0-9a-f]{2}){3}$`, m)
		macs[m] = true
	}
	assert.Greater(t, len(macs), 60, "random")
	args := sshNetArgs(0x1e, "52:54:00:01:02:03")
	assert.Equal(t, []string{
		"-netdev", "user,id=gcissh,restrict=on,net=10.213.213.0/24,dhcpstart=10.213.213.15,hostfwd=tcp:127.0.0.1:0-10.213.213.15:22",
		"-device", "virtio-net-pci,netdev=gcissh,addr=0x1e,mac=52:54:00:01:02:03",
	}, args)
}
