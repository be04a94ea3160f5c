package libvirt

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/digitalocean/go-libvirt"
)

// libvirt's QEMU save image header (src/qemu/qemu_saveimage.h): a magic string, then
// uint32 version, data_len, was_running, compressed, cookieOffset (at 32) and 14 unused,
// in the host's byte order; data_len bytes of domain XML, cookie and padding follow,
// then QEMU's migration stream.
const (
	saveMagic      = "LibvirtQemudSave"
	saveHeaderSize = 16 + 19*4
)

// headerRead is how much of a save image is read for its header (libvirt's XML region
// is the XML, its cookie and 64 KiB of room).
const headerRead = 1 << 20

// SaveImage is a save image (libvirt's save of a running domain) as a restore needs it.
type SaveImage struct {
	Vol    libvirt.StorageVol
	Header []byte // the header and the XML region after it
	XML    string // the domain XML in it
}

// ErrNotSaveImage: the bytes are not the start of a save image this tool can read.
var ErrNotSaveImage = errors.New("not a complete libvirt save image")

// ParseSaveImage reads the header at the start of a save image (b, up to headerRead
// bytes of it).
func ParseSaveImage(vol libvirt.StorageVol, b []byte) (*SaveImage, error) {
	if len(b) < saveHeaderSize || string(b[:16]) != saveMagic {
		return nil, ErrNotSaveImage
	}
	dataLen := binary.NativeEndian.Uint32(b[20:24])
	if dataLen == 0 || saveHeaderSize+int(dataLen) > len(b) {
		return nil, fmt.Errorf("%w: its header says %d bytes of XML, more than the %d read", ErrNotSaveImage, dataLen, len(b))
	}
	hd := b[:saveHeaderSize+int(dataLen)]
	xmlLen := dataLen
	if off := binary.NativeEndian.Uint32(hd[32:36]); off > 0 && off < dataLen {
		xmlLen = off
	}
	x := string(bytes.TrimRight(hd[saveHeaderSize:saveHeaderSize+xmlLen], "\x00"))
	return &SaveImage{Vol: vol, Header: hd, XML: x}, nil
}

// rewriteHeader returns the save image header hd with the domain XML x in place of its
// own, and the rest of its XML region (the cookie) kept.
func rewriteHeader(hd []byte, x string) ([]byte, error) {
	dataLen := binary.NativeEndian.Uint32(hd[20:24])
	cookieOff := binary.NativeEndian.Uint32(hd[32:36])
	region := hd[saveHeaderSize:]
	var cookie []byte
	if cookieOff > 0 && cookieOff < dataLen {
		cookie = bytes.TrimRight(region[cookieOff:], "\x00")
	}
	xb := append([]byte(x), 0)
	n := len(xb)
	if len(cookie) > 0 {
		n += len(cookie) + 1
	}
	if n > int(dataLen) {
		return nil, fmt.Errorf("the domain XML (%d bytes) does not fit in the save image's header (%d)", n, dataLen)
	}
	out := make([]byte, saveHeaderSize+int(dataLen))
	copy(out, hd[:saveHeaderSize])
	copy(out[saveHeaderSize:], xb)
	off := uint32(0)
	if len(cookie) > 0 {
		off = uint32(len(xb))
		copy(out[saveHeaderSize+len(xb):], cookie)
	}
	binary.NativeEndian.PutUint32(out[32:36], off)
	return out, nil
}
