package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// LIBVIRT_GCI_GUEST_FORWARDS: while a stage runs, the guest reaches a service of the
// runner host's loopback at the same address, over either transport, through its ssh
// connection; a port not listed stays unreachable.
func TestGuestForwards(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the host, %s %s\n", r.Method, r.URL.Path)
	})}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close() })
	addr := ln.Addr().String()
	other, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer other.Close()

	overEachTransport(t, func(t *testing.T, j *gitlabJob) {
		j.env["LIBVIRT_GCI_GUEST_FORWARDS"] = addr
		r := j.stage("prepare")
		require.Equal(t, 0, r.code, r.stderr)
		t.Cleanup(func() { j.stage("cleanup") })
		assert.Contains(t, r.stderr, "forwards to "+addr)
		r = j.stage("list", "--json")
		require.Equal(t, 0, r.code, r.stderr)
		var list []struct{ Name, Transport string }
		require.NoError(t, json.Unmarshal([]byte(r.stdout), &list))
		name := j.instance()
		for _, in := range list {
			if in.Name == name {
				assert.Equal(t, j.transport, in.Transport, "ssh access for the forwards leaves the stages on their transport")
			}
		}
		r = j.run("build_script", fmt.Sprintf(`for i in 1 2 3; do busybox wget -qO- http://%s/try$i; done
busybox wget -qO- -T 3 http://%s/ 2>/dev/null && echo "reached the other port" || echo "other port blocked"`, addr, other.Addr()))
		require.Equal(t, 0, r.code, r.stderr)
		for i := 1; i <= 3; i++ {
			assert.Contains(t, r.stdout, fmt.Sprintf("hello from the host, GET /try%d\n", i))
		}
		assert.True(t, strings.HasSuffix(r.stdout, "other port blocked\n"), r.stdout)
		assert.Equal(t, 0, j.stage("cleanup").code)
	})
}
