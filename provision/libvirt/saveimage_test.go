package libvirt

import (
	"bytes"
	"encoding/binary"
	"strings"
	"testing"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// saveHeader builds a libvirt save image header as libvirt writes it: the XML, the
// cookie, and room.
func saveHeader(x, cookie string, room int) []byte {
	dataLen := len(x) + 1 + len(cookie) + 1 + room
	hd := make([]byte, saveHeaderSize+dataLen)
	copy(hd, saveMagic)
	binary.NativeEndian.PutUint32(hd[16:], 2)
	binary.NativeEndian.PutUint32(hd[20:], uint32(dataLen))
	binary.NativeEndian.PutUint32(hd[24:], 1)
	binary.NativeEndian.PutUint32(hd[32:], uint32(len(x)+1))
	copy(hd[saveHeaderSize:], x)
	copy(hd[saveHeaderSize+len(x)+1:], cookie)
	return hd
}

func TestRewriteHeader(t *testing.T) {
	hd := saveHeader("<domain><name>warm</name></domain>", "<cookie><cpu/></cookie>", 4096)
	x := "<domain><name>a-much-longer-name-for-the-clone</name></domain>"
	out, err := rewriteHeader(hd, x)
	require.NoError(t, err)
	require.Len(t, out, len(hd), "the stream after it stays where it is")
	assert.Equal(t, hd[:32], out[:32], "magic, version, length, running, format")
	off := binary.NativeEndian.Uint32(out[32:])
	assert.Equal(t, uint32(len(x)+1), off, "the cookie follows the new XML")
	region := out[saveHeaderSize:]
	assert.Equal(t, x+"\x00", string(region[:off]))
	assert.Equal(t, "<cookie><cpu/></cookie>", string(bytes.TrimRight(region[off:], "\x00")))

	_, err = rewriteHeader(hd, "<domain>"+strings.Repeat("x", 5000)+"</domain>")
	assert.ErrorContains(t, err, "does not fit")

	// No cookie (older images).
	plain := saveHeader("<domain/>", "", 100)
	binary.NativeEndian.PutUint32(plain[32:], 0)
	out, err = rewriteHeader(plain, "<domain><name>b</name></domain>")
	require.NoError(t, err)
	assert.Zero(t, binary.NativeEndian.Uint32(out[32:]))
}

func TestParseSaveImage(t *testing.T) {
	hd := saveHeader("<domain><name>warm</name></domain>", "<cookie/>", 100)
	img, err := ParseSaveImage(libvirt.StorageVol{Name: "w.save"}, append(hd, "QEMU stream"...))
	require.NoError(t, err)
	assert.Equal(t, "<domain><name>warm</name></domain>", img.XML)
	assert.Equal(t, hd, img.Header, "the header and its XML region, not the stream")

	for name, b := range map[string][]byte{
		"empty":     nil,
		"not ours":  bytes.Repeat([]byte("x"), 200),
		"truncated": hd[:len(hd)-10],
	} {
		_, err := ParseSaveImage(libvirt.StorageVol{}, b)
		assert.ErrorIs(t, err, ErrNotSaveImage, name)
	}
}
