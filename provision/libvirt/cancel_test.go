package libvirt

import (
	"context"
	"io/fs"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"

	"github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/libvirttest"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeConn is a Conn to f that is cancelled with ctx, as Connect's is.
func fakeConn(ctx context.Context, f *provisiontest.Libvirt, grace time.Duration) *Conn {
	c := &Conn{api: f, drop: f.Drop, grace: grace}
	c.stop = context.AfterFunc(ctx, c.cancel)
	return c
}

type createResult struct {
	err  error
	when time.Time
}

// heldCreate starts a Create on a fake whose method call is held at a gate, and returns
// once that call is in flight: the gate, the Create's cancel and its result.
func heldCreate(t *testing.T, f *provisiontest.Libvirt, method string, grace time.Duration) (chan struct{}, context.CancelFunc, chan createResult) {
	t.Helper()
	gate := f.Gate(method)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c := fakeConn(ctx, f, grace)
	done := make(chan createResult, 1)
	spec := instanceSpec(t, "ci")
	go func() {
		_, err := c.Create(ctx, spec)
		done <- createResult{err, time.Now()}
	}()
	require.Equal(t, method, <-f.Entered())
	return gate, cancel, done
}

// rollBack tears the instance down on a new connection, as prepare's rollback does, and
// checks that nothing is left.
func rollBack(t *testing.T, f *provisiontest.Libvirt) {
	t.Helper()
	f.Reconnect()
	_, err := (&Conn{api: f}).Teardown(t.Context(), inst, nil)
	require.NoError(t, err)
	assert.Empty(t, f.State())
}

// The runner's SIGTERM arrives while libvirtd is still working on the define (it was
// slow: re-probing QEMU, say). Create waits for libvirt's answer, so the domain it made
// is there for the rollback, which removes it. Before, the connection closed at once, the
// rollback found nothing, and the define completed afterwards: a leaked VM.
func TestCancelDuringDefineAwaitsItsOutcome(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	gate, cancel, done := heldCreate(t, f, "DomainDefineXMLFlags", time.Minute)
	cancel()
	select {
	case r := <-done:
		t.Fatalf("Create returned while its define was still in flight: %v", r.err)
	case <-time.After(100 * time.Millisecond):
	}
	opened := time.Now()
	close(gate) // libvirtd finishes the define after the cancel

	r := <-done
	require.ErrorIs(t, r.err, context.Canceled)
	assert.ErrorContains(t, r.err, `define "gci-r-1": done, but cancelled meanwhile`)
	assert.False(t, r.when.Before(opened))
	assert.Equal(t, "domain gci-r-1 running=false", f.State(), "no further call after the cancel")
	dropped := f.Dropped()
	select {
	case <-dropped:
	case <-time.After(5 * time.Second):
		t.Fatal("the cancelled connection was not dropped once the define returned")
	}

	// The rollback, on a connection of its own, finds the domain and removes it.
	rollBack(t, f)
}

// The same for an overlay being created: the volume that libvirt made after the cancel is
// in the metadata's list, and the rollback deletes it.
func TestCancelDuringOverlayAwaitsItsOutcome(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	gate, cancel, done := heldCreate(t, f, "StorageVolCreateXML", time.Minute)
	cancel()
	close(gate)
	r := <-done
	require.ErrorIs(t, r.err, context.Canceled)
	assert.Equal(t, "domain gci-r-1 running=false; volume ci/gci-r-1-vda.qcow2", f.State(), "the second overlay and the start never happen")
	rollBack(t, f)
}

// A libvirtd that never answers does not hold a cancelled Create for longer than the
// grace; its error says the outcome is unknown and how to remove what may appear.
func TestCancelDuringStalledDefineGivesUpAfterGrace(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	_, cancel, done := heldCreate(t, f, "DomainDefineXMLFlags", 200*time.Millisecond) // the gate never opens
	cancel()
	cancelled := time.Now()
	select {
	case r := <-done:
		took := r.when.Sub(cancelled)
		assert.GreaterOrEqual(t, took, 200*time.Millisecond, "gave up before the grace")
		assert.Less(t, took, 5*time.Second)
		require.ErrorIs(t, r.err, libvirt.ErrInterrupted)
		assert.ErrorContains(t, r.err, "outcome unknown")
		assert.ErrorContains(t, r.err, "libvirt-gci cleanup --machine gci-r-1")
	case <-time.After(10 * time.Second):
		t.Fatal("Create waited past its grace for a stalled libvirtd")
	}
}

// Cancelled before it starts, Create makes no call at all.
func TestCreateCancelledBeforeStartMakesNothing(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	ctx, cancel := context.WithCancel(context.Background())
	c := fakeConn(ctx, f, time.Minute)
	cancel()
	_, err := c.Create(ctx, instanceSpec(t, "ci"))
	require.ErrorIs(t, err, context.Canceled)
	assert.Empty(t, f.State())
}

// With the real go-libvirt client: a cancel drops the socket at once, so a call that a
// stalled libvirtd never answers returns (go-libvirt's own Disconnect would first wait for
// libvirtd's answer to its goodbye). An awaited call keeps the connection for its grace.
// libvirttest's mock answers the handshake and never answers DomainGetMetadata.
func TestCancelUnblocksCallsToAStalledLibvirtd(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		awaited bool
		grace   time.Duration
	}{{"plain call", false, time.Minute}, {"awaited call", true, 300 * time.Millisecond}} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			c, err := connect(ctx, &droppable{Dialer: libvirttest.New()}, "test:///default")
			require.NoError(t, err)
			c.grace = tc.grace
			call := func() error {
				_, err := c.lv.DomainGetMetadata(libvirt.Domain{Name: "x"}, 0, nil, 0)
				return err
			}
			if tc.awaited {
				inner := call
				call = func() error { return c.awaited(inner) }
			}
			done := make(chan error, 1)
			go func() { done <- call() }()
			time.Sleep(50 * time.Millisecond)
			select {
			case err := <-done:
				t.Fatalf("the mock answered: %v", err)
			default:
			}
			cancel()
			cancelled := time.Now()
			select {
			case err := <-done:
				assert.ErrorIs(t, err, libvirt.ErrInterrupted)
				if tc.awaited {
					assert.GreaterOrEqual(t, time.Since(cancelled), tc.grace)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the call in flight did not return after the cancel")
			}
			assert.NoError(t, c.Close())
		})
	}
}

// Connect gives up when its context ends, even if libvirtd accepted the connection and
// then never said a word.
func TestConnectToAStalledLibvirtdHonoursTheContext(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "libvirt-sock")
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			defer conn.Close() // accepted, never answered
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = Connect(ctx, "qemu:///system?socket="+sock)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Less(t, time.Since(start), 5*time.Second)
}

func TestSlowHint(t *testing.T) {
	t.Parallel()
	assert.Contains(t, SlowHint("qemu+ssh://h/system"), "Slow libvirt", "a remote host's /dev/kvm is not looked at")
	assert.Equal(t, "generic", kvmHint(fs.ModeDevice|fs.ModeCharDevice|0o660, "/dev/kvm", "generic"))
	assert.Equal(t, "generic", kvmHint(fs.ModeDevice|fs.ModeCharDevice|0o666, "/dev/kvm", "generic"))
	h := kvmHint(fs.ModeDevice|fs.ModeCharDevice|0o600, "/dev/kvm", "generic")
	assert.Contains(t, h, "/dev/kvm is mode -rw-------")
	assert.Contains(t, h, "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm")
}
