package libvirt

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func warmFile(t *testing.T, b []byte) *os.File {
	t.Helper()
	p := filepath.Join(t.TempDir(), "warm.save")
	require.NoError(t, os.WriteFile(p, b, 0o600))
	f, err := os.Open(p)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

// The reader gets the new header, then the file's bytes after the old one: the file
// itself is not written, and the pipe goes once finished.
func TestFeedMemory(t *testing.T) {
	body := bytes.Repeat([]byte("0123456789abcdef"), 300000) // more than a pipe holds
	old := bytes.Repeat([]byte{'H'}, 4096)
	f := warmFile(t, append(append([]byte{}, old...), body...))
	header := bytes.Repeat([]byte{'N'}, len(old))

	p, err := feedMemory(context.Background(), header, f)
	require.NoError(t, err)
	fi, err := os.Stat(p.Path)
	require.NoError(t, err)
	require.Equal(t, os.ModeNamedPipe, fi.Mode().Type())
	r, err := os.Open(p.Path)
	require.NoError(t, err)
	got, err := io.ReadAll(r)
	require.NoError(t, err)
	r.Close()
	require.Equal(t, append(header, body...), got)
	require.NoError(t, p.finish())
	_, err = os.Stat(filepath.Dir(p.Path))
	require.True(t, os.IsNotExist(err), "the pipe's directory is removed")
}

// A reader that never comes (libvirtd failed first) or one that stops early does not
// keep the feeder: finish returns at once with its error.
func TestFeedMemoryReaderGone(t *testing.T) {
	f := warmFile(t, bytes.Repeat([]byte{'x'}, 4<<20))
	header := make([]byte, 512)

	p, err := feedMemory(context.Background(), header, f)
	require.NoError(t, err)
	start := time.Now()
	require.Error(t, p.finish(), "nothing was read")
	require.Less(t, time.Since(start), time.Second)

	p, err = feedMemory(context.Background(), header, f)
	require.NoError(t, err)
	r, err := os.Open(p.Path)
	require.NoError(t, err)
	_, err = io.ReadFull(r, make([]byte, 1000))
	require.NoError(t, err)
	r.Close()
	start = time.Now()
	require.Error(t, p.finish())
	require.Less(t, time.Since(start), time.Second)
}

// A cancel closes the pipe under the reader: it sees the stream end early.
func TestFeedMemoryCancel(t *testing.T) {
	f := warmFile(t, bytes.Repeat([]byte{'x'}, 8<<20))
	ctx, cancel := context.WithCancelCause(context.Background())
	p, err := feedMemory(ctx, make([]byte, 512), f)
	require.NoError(t, err)
	r, err := os.Open(p.Path)
	require.NoError(t, err)
	defer r.Close()
	_, err = io.ReadFull(r, make([]byte, 1000))
	require.NoError(t, err)
	stop := errors.New("stop")
	cancel(stop)
	n, _ := io.Copy(io.Discard, r)
	require.Less(t, n, int64(8<<20), "the stream ended early")
	require.ErrorIs(t, p.finish(), stop)
}
