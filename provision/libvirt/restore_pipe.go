package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// A restore reads the save image once, from start to end, and never seeks: libvirtd
// opens the path it is given, reads the header, and hands the rest to QEMU as an
// incoming migration stream. So on a local libvirt the restore reads from a pipe
// (a FIFO) that this process fills with the instance's own header and then the shared
// warm image's body, read from its file: nothing is written to disk per instance, and
// the warm image's pages are read from the host's page cache that every restore of it
// shares. A remote libvirt, or a warm image file this process cannot read, gets a copy
// (Restore).

// pipeFeedGrace bounds the wait for the feeder once the restore has returned: by then
// libvirtd has closed the pipe, so its writes fail at once.
const pipeFeedGrace = 5 * time.Second

// memoryPipe is a FIFO being filled with a save image: header, then body.
type memoryPipe struct {
	Path   string
	dir    string
	opened chan struct{} // closed once the feeder has its end open
	done   chan error
}

// feedMemory makes a FIFO in a directory of its own (mode 0700) and starts filling it
// with header and then body's bytes from offset len(header), once a reader opens it.
// When ctx ends the feeder closes the pipe: the reader sees it end early.
func feedMemory(ctx context.Context, header []byte, body *os.File) (*memoryPipe, error) {
	dir, err := os.MkdirTemp("", "libvirt-gci-restore-")
	if err != nil {
		return nil, err
	}
	p := &memoryPipe{Path: filepath.Join(dir, "memory"), dir: dir, opened: make(chan struct{}), done: make(chan error, 1)}
	if err := syscall.Mkfifo(p.Path, 0o600); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("make a pipe for the memory image: %w", err)
	}
	go func() {
		// Blocks until the reader opens it (or finish opens it to let this end).
		w, err := os.OpenFile(p.Path, os.O_WRONLY, 0)
		close(p.opened)
		if err != nil {
			p.done <- err
			return
		}
		stop := context.AfterFunc(ctx, func() { w.Close() })
		defer stop()
		if _, err = w.Write(header); err == nil {
			_, err = io.Copy(w, io.NewSectionReader(body, int64(len(header)), 1<<62))
		}
		if cerr := w.Close(); err == nil && !errors.Is(cerr, os.ErrClosed) {
			err = cerr
		}
		if ctx.Err() != nil {
			err = context.Cause(ctx)
		}
		p.done <- err
	}()
	return p, nil
}

// finish ends the feeder (whose reader is gone: the restore returned) and removes the
// pipe. It returns the feeder's error: nil if it wrote everything.
func (p *memoryPipe) finish() error {
	defer os.RemoveAll(p.dir)
	// A feeder still waiting for a reader (libvirtd failed before opening the pipe)
	// opens its end once this one is open, and then finds the pipe closed.
	if r, err := os.OpenFile(p.Path, os.O_RDONLY|syscall.O_NONBLOCK, 0); err == nil {
		select {
		case <-p.opened:
		case <-time.After(pipeFeedGrace):
		}
		r.Close()
	}
	select {
	case err := <-p.done:
		return err
	case <-time.After(pipeFeedGrace):
		return errors.New("the memory image's feeder did not end")
	}
}

// openWarmFile opens the warm image's save file for this process to read, where
// libvirt is local and the file is this process's to read; nil if not.
func (c *Conn) openWarmFile(img *SaveImage) *os.File {
	if !c.local || c.lv == nil {
		return nil
	}
	path, err := c.api.StorageVolGetPath(img.Vol)
	if err != nil {
		return nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() || fi.Size() < int64(len(img.Header)) {
		f.Close()
		return nil
	}
	return f
}
