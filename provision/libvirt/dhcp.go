package libvirt

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"time"
)

// A DHCPRELEASE sent on a NIC's behalf to the network's dnsmasq, from this host, as
// dnsmasq's own dhcp_release does (RFC 2131 4.4.6): the lease of a NIC whose instance is
// gone frees its address at once instead of at the lease's end. The packet goes out
// bound to the network's bridge, so that dnsmasq takes it as coming from that network.

// releasePacket is a DHCPRELEASE of the lease of ip held by mac (and clientID, where
// the client gave one: colon-separated hex, as libvirt lists leases) from server.
func releasePacket(server, ip net.IP, mac, clientID string) ([]byte, error) {
	hw, err := net.ParseMAC(mac)
	if err != nil || len(hw) != 6 {
		return nil, fmt.Errorf("MAC address %q: not an Ethernet address", mac)
	}
	ip4, srv4 := ip.To4(), server.To4()
	if ip4 == nil || srv4 == nil {
		return nil, fmt.Errorf("DHCPRELEASE: %v from %v: not IPv4 addresses", ip, server)
	}
	var id []byte
	if clientID != "" {
		if id, err = hex.DecodeString(strings.ReplaceAll(clientID, ":", "")); err != nil || len(id) == 0 || len(id) > 255 {
			return nil, fmt.Errorf("DHCP client id %q: not colon-separated hex", clientID)
		}
	}
	p := make([]byte, 240, 240+3+6+2+len(id)+1)
	p[0], p[1], p[2] = 1, 1, 6 // BOOTREQUEST, Ethernet, 6 bytes
	if _, err := rand.Read(p[4:8]); err != nil {
		return nil, err
	}
	copy(p[12:16], ip4) // ciaddr
	copy(p[28:34], hw)  // chaddr
	copy(p[236:240], []byte{99, 130, 83, 99})
	p = append(p, 53, 1, 7) // DHCP message type: DHCPRELEASE
	p = append(p, 54, 4)    // server identifier
	p = append(p, srv4...)
	if len(id) > 0 {
		p = append(p, 61, byte(len(id))) // client identifier
		p = append(p, id...)
	}
	return append(p, 255), nil
}

// releaseLease sends that DHCPRELEASE to server's port 67 through bridge. It needs root
// (or CAP_NET_RAW) to bind to the bridge. dnsmasq answers nothing: the caller looks at the
// leases again to see it gone.
func releaseLease(bridge string, server, ip net.IP, mac, clientID string) error {
	pkt, err := releasePacket(server, ip, mac, clientID)
	if err != nil {
		return err
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, syscall.IPPROTO_UDP)
	if err != nil {
		return fmt.Errorf("DHCPRELEASE: %w", err)
	}
	defer syscall.Close(fd)
	if err := syscall.SetsockoptString(fd, syscall.SOL_SOCKET, syscall.SO_BINDTODEVICE, bridge); err != nil {
		return fmt.Errorf("DHCPRELEASE: bind to bridge %s: %w", bridge, err)
	}
	// A send to a local address does not block; bounded all the same.
	tv := syscall.NsecToTimeval(int64(time.Second))
	_ = syscall.SetsockoptTimeval(fd, syscall.SOL_SOCKET, syscall.SO_SNDTIMEO, &tv)
	to := &syscall.SockaddrInet4{Port: 67}
	copy(to.Addr[:], server.To4())
	if err := syscall.Sendto(fd, pkt, 0, to); err != nil {
		if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EACCES) {
			return fmt.Errorf("DHCPRELEASE through %s: %w (the lease stays until it ends)", bridge, err)
		}
		return fmt.Errorf("DHCPRELEASE through %s: %w", bridge, err)
	}
	return nil
}
