package guest

import (
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A guest gets at most MaxForwardConns connections through its forwards at once (issue
// 24): past it, its connection is closed at once and nothing is dialled for it; once
// one ends, the next is served again.
func TestForwardConnectionCap(t *testing.T) {
	t.Parallel()
	svc, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer svc.Close()
	accepted := make(chan net.Conn, 2*MaxForwardConns)
	go func() {
		for {
			c, err := svc.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	guestSide, err := net.Listen("tcp", "127.0.0.1:0") // stands for sshd's remote listener
	require.NoError(t, err)
	f := &Forwards{conns: map[net.Conn]bool{}, lns: []net.Listener{guestSide}}
	f.wg.Add(1)
	go f.serve(guestSide, svc.Addr().String())
	defer f.Close()

	var held, served []net.Conn
	for range MaxForwardConns {
		c, err := net.Dial("tcp", guestSide.Addr().String())
		require.NoError(t, err)
		held = append(held, c)
		select {
		case s := <-accepted:
			served = append(served, s)
		case <-time.After(5 * time.Second):
			t.Fatal("a connection under the cap was not forwarded")
		}
	}
	over, err := net.Dial("tcp", guestSide.Addr().String())
	require.NoError(t, err)
	require.NoError(t, over.SetReadDeadline(time.Now().Add(5*time.Second)))
	_, err = over.Read(make([]byte, 1))
	assert.ErrorIs(t, err, io.EOF, "the one past the cap is closed at once")
	select {
	case <-accepted:
		t.Fatal("the service got a connection past the cap")
	case <-time.After(200 * time.Millisecond):
	}

	held[0].Close()
	served[0].Close()
	require.Eventually(t, func() bool {
		c, err := net.Dial("tcp", guestSide.Addr().String())
		if err != nil {
			return false
		}
		defer c.Close()
		select {
		case <-accepted:
			return true
		case <-time.After(300 * time.Millisecond):
			return false
		}
	}, 5*time.Second, 50*time.Millisecond, "served again once one ended")
	for _, c := range append(held, served...) {
		c.Close()
	}
}
