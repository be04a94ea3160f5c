package template

import (
	"crypto/rand"
	"fmt"
)

// NewUUID is a random (version 4) UUID, for a new domain.
func NewUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// NewMAC is a random MAC address with QEMU's 52:54:00 prefix (locally administered,
// unicast), for a new NIC.
func NewMAC() string {
	b := make([]byte, 3)
	_, _ = rand.Read(b)
	return fmt.Sprintf("52:54:00:%02x:%02x:%02x", b[0], b[1], b[2])
}
