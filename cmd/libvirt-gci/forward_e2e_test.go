package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

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

// A stage whose guest stops its own sshd still ends within a few seconds of the runner's
// SIGTERM, over either transport, with forwards (issue 36): the forwards' connection is
// not left waiting for the stopped sshd to answer the cancel of its listeners, nor the
// ssh transport's kill session for its channel.
func TestSIGTERMWithTheGuestSSHDStopped(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	overEachTransport(t, func(t *testing.T, j *gitlabJob) {
		j.env["LIBVIRT_GCI_GUEST_FORWARDS"] = ln.Addr().String()
		j.prepare()
		cmd := exec.Command(binPath, "run", j.script("build.sh", `echo started
sleep 1
for p in /proc/[0-9]*; do
  c=; read -r c <"$p/comm" 2>/dev/null || true
  if [ "$c" = sshd ]; then kill -STOP "${p#/proc/}"; fi
done
sleep 613`), "build_script")
		cmd.Env = j.environ()
		var stdout, stderr lockedBuffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		require.NoError(t, cmd.Start())
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		require.Eventually(t, func() bool { return strings.Contains(stdout.String(), "started") }, 60*time.Second, 20*time.Millisecond, "the stage started: %s", stderr.String())
		time.Sleep(3 * time.Second) // the guest's sshd stopped meanwhile
		sent := time.Now()
		require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
		select {
		case err := <-exited:
			var ee *exec.ExitError
			require.ErrorAs(t, err, &ee)
			assert.Equal(t, 2, ee.ExitCode(), "a cancelled stage is a system failure")
			took := time.Since(sent)
			t.Logf("run exited %.1f s after SIGTERM", took.Seconds())
			assert.Less(t, took, 8*time.Second, "README: every stage exits within 5 s of SIGTERM, whatever the guest does")
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatalf("run did not exit within 30 s of SIGTERM; stderr:\n%s", stderr.String())
		}
		assert.Equal(t, 0, j.stage("cleanup").code)
	})
}
