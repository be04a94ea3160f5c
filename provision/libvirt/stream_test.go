package libvirt

import (
	"context"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// stallingStreams is the fake whose first stream calls (downloads and uploads) never
// end, as go-libvirt's did once over a loaded qemu+ssh.
type stallingStreams struct {
	*provisiontest.Libvirt
	stalls  atomic.Int32 // how many more calls stall
	release chan struct{}
}

func (s *stallingStreams) StorageVolDownload(v libvirt.StorageVol, w io.Writer, offset, length uint64, fl libvirt.StorageVolDownloadFlags) error {
	if s.stalls.Add(-1) >= 0 {
		<-s.release
		return io.ErrClosedPipe
	}
	return s.Libvirt.StorageVolDownload(v, w, offset, length, fl)
}

func (s *stallingStreams) StorageVolUpload(v libvirt.StorageVol, r io.Reader, offset, length uint64, fl libvirt.StorageVolUploadFlags) error {
	if s.stalls.Add(-1) >= 0 {
		<-s.release
		return io.ErrClosedPipe
	}
	return s.Libvirt.StorageVolUpload(v, r, offset, length, fl)
}

// A stream call that stalls is given up after its try's time and started again on a
// new connection; past its tries it fails, within its bound.
func TestStreamStallIsTriedAgain(t *testing.T) {
	f := provisiontest.New("ci")
	s := &stallingStreams{Libvirt: f, release: make(chan struct{})}
	defer close(s.release)
	was := streamAttempt
	streamAttempt = 200 * time.Millisecond
	defer func() { streamAttempt = was }()
	c := NewConn(s)
	pool, err := f.StoragePoolLookupByName("ci")
	require.NoError(t, err)
	vol, err := c.CreateVolume(pool, "v", 4096, 0)
	require.NoError(t, err)
	ctx := context.Background()

	s.stalls.Store(1)
	require.NoError(t, c.upload(ctx, vol, []byte("header")), "the second try writes it")
	s.stalls.Store(2)
	b, err := c.readPrefix(ctx, vol, 6)
	require.NoError(t, err, "the third try reads it")
	assert.Equal(t, "header", string(b[:6]))

	s.stalls.Store(3)
	start := time.Now()
	_, err = c.readPrefix(ctx, vol, 6)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	assert.ErrorContains(t, err, "(3 tries of 200ms)")
	assert.Less(t, time.Since(start), 2*time.Second)
}
