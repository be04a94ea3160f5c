package libvirt

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// streamTime bounds a libvirt stream call (a volume's upload or download of a header or
// a mark: a MiB at most), in streamAttempts tries of a third of it each, each on a
// connection of its own: a stream that stalls (go-libvirt's, over a loaded qemu+ssh,
// once stayed silent 30 s where it takes a fraction of a second) is given up and
// started again rather than waited out.
const (
	streamTime     = 30 * time.Second
	streamAttempts = 3
)

// streamAttempt is how long one try of a stream call may take.
var streamAttempt = streamTime / streamAttempts

// retryStream runs try (one stream call on a connection of its own) until it ends
// within streamAttempt, at most streamAttempts times, or ctx ends.
func retryStream(ctx context.Context, try func(ctx context.Context) error) error {
	var err error
	for range streamAttempts {
		actx, cancel := context.WithTimeout(ctx, streamAttempt)
		err = try(actx)
		stalled := errors.Is(err, context.DeadlineExceeded) && actx.Err() != nil && ctx.Err() == nil
		cancel()
		if !stalled {
			return err
		}
	}
	return fmt.Errorf("%w (%d tries of %s)", err, streamAttempts, streamAttempt)
}

// ReadSaveImage reads the header of the save image in the volume vol: from its file
// where this process can (a local libvirt, a user allowed to read it), else through
// libvirt (readPrefix).
func (c *Conn) ReadSaveImage(ctx context.Context, vol libvirt.StorageVol) (*SaveImage, error) {
	b, err := c.readLocal(vol, headerRead)
	if err != nil {
		// libvirt knows the volume by the size it had when made (empty, before the save)
		// until something refreshes it: a download would stop there.
		if _, _, _, err := c.api.StorageVolGetInfo(vol); err != nil {
			return nil, err
		}
		if b, err = c.readPrefix(ctx, vol, headerRead); err != nil {
			return nil, err
		}
	}
	return ParseSaveImage(vol, b)
}

// readLocal reads up to n bytes of the start of vol's file, on a local libvirt.
func (c *Conn) readLocal(vol libvirt.StorageVol, n int) ([]byte, error) {
	if !c.local {
		return nil, errors.New("not a local libvirt")
	}
	path, err := c.api.StorageVolGetPath(vol)
	if err != nil {
		return nil, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, n)
	n, err = io.ReadFull(f, b)
	if err != nil && !errors.Is(err, io.ErrUnexpectedEOF) {
		return nil, err
	}
	return b[:n], nil
}

// readPrefix reads the first n bytes of the volume vol. go-libvirt's streams can
// deadlock when libvirtd's last packet of a download comes late (its router holds a
// lock while it hands the packet to a caller that is gone): the download runs on a
// connection of its own, which is dropped once the bytes are in.
func (c *Conn) readPrefix(ctx context.Context, vol libvirt.StorageVol, n uint64) ([]byte, error) {
	var got []byte
	err := retryStream(ctx, func(ctx context.Context) error {
		side, err := c.redial(ctx)
		if err != nil {
			return err
		}
		defer side.dropNow()
		pw := &prefixWriter{want: int(n), full: make(chan struct{})}
		errc := make(chan error, 1)
		go func() { errc <- side.api.StorageVolDownload(vol, pw, 0, n, 0) }()
		select {
		case err := <-errc:
			if err != nil {
				return fmt.Errorf("download of %s: %w", vol.Name, err)
			}
		case <-pw.full:
		case <-ctx.Done():
			return fmt.Errorf("download of %s: %w", vol.Name, context.Cause(ctx))
		}
		got = pw.bytes()
		return nil
	})
	return got, err
}

// prefixWriter keeps what is written to it, and says when it has want bytes.
type prefixWriter struct {
	mu   sync.Mutex
	buf  []byte
	want int
	full chan struct{}
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	had := len(p.buf)
	p.buf = append(p.buf, b...)
	if had < p.want && len(p.buf) >= p.want {
		close(p.full)
	}
	return len(b), nil
}

func (p *prefixWriter) bytes() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.buf)
}

// upload writes data at the start of the volume vol: into its file where this process
// can (a local libvirt, a user allowed to write it), else through libvirt on a
// connection of its own (see readPrefix), within streamTime.
func (c *Conn) upload(ctx context.Context, vol libvirt.StorageVol, data []byte) error {
	if c.local {
		if f, err := os.OpenFile(vol.Key, os.O_WRONLY, 0); err == nil {
			_, err := f.WriteAt(data, 0)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err == nil {
				return nil
			}
		}
	}
	// Writing the same bytes at the same place again is harmless: a stalled try is
	// tried again.
	return retryStream(ctx, func(ctx context.Context) error {
		side, err := c.redial(ctx)
		if err != nil {
			return err
		}
		defer side.dropNow()
		errc := make(chan error, 1)
		go func() { errc <- side.api.StorageVolUpload(vol, bytes.NewReader(data), 0, uint64(len(data)), 0) }()
		select {
		case err := <-errc:
			if err != nil {
				return fmt.Errorf("upload to %s: %w", vol.Name, err)
			}
			return nil
		case <-ctx.Done():
			return fmt.Errorf("upload to %s: %w", vol.Name, context.Cause(ctx))
		}
	})
}
