package main

import (
	"encoding/binary"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// silentLibvirtd listens on a unix socket, completes libvirt's RPC handshake (auth list,
// connect open) with each client, and then never answers again: a libvirtd that hangs
// after accepting a connection. It returns a libvirt URI for it.
func silentLibvirtd(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "gci-silent") // short: socket paths are limited
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "libvirt-sock")
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serveSilently(c)
		}
	}()
	return "qemu:///system?socket=" + sock
}

// libvirt's RPC procedures of the handshake, and its packet header's fields.
const (
	procConnectOpen = 1
	procAuthList    = 66
	rpcReply        = 1
)

func serveSilently(c net.Conn) {
	defer c.Close()
	for {
		var size uint32
		if err := binary.Read(c, binary.BigEndian, &size); err != nil || size < 28 {
			return
		}
		pkt := make([]byte, size-4)
		if _, err := io.ReadFull(c, pkt); err != nil {
			return
		}
		// program, version, procedure, type, serial, status: six big-endian uint32s.
		proc := binary.BigEndian.Uint32(pkt[8:12])
		var body []byte
		switch proc {
		case procAuthList:
			body = []byte{0, 0, 0, 1, 0, 0, 0, 0} // one method: none
		case procConnectOpen:
		default:
			continue // and never answer
		}
		reply := make([]byte, 28, 28+len(body))
		binary.BigEndian.PutUint32(reply[0:4], uint32(28+len(body)))
		copy(reply[4:16], pkt[0:12]) // program, version, procedure
		binary.BigEndian.PutUint32(reply[16:20], rpcReply)
		copy(reply[20:24], pkt[16:20]) // serial
		if _, err := c.Write(append(reply, body...)); err != nil {
			return
		}
	}
}

// Every stage exits within 5 s of the runner's SIGTERM with a system failure, whatever
// libvirtd does: here it accepts the connection and then never answers. (Before, cleanup
// ignored SIGTERM for its 2-minute bound, and prepare waited minutes for a create call.)
func TestStagesExitSoonAfterSIGTERMWhenLibvirtdHangs(t *testing.T) {
	t.Parallel()
	require.NoError(t, buildErr)
	uri := silentLibvirtd(t)
	for _, tc := range []struct {
		stage []string
		want  string // what it waited for
	}{
		{[]string{"prepare"}, `sweeping orphans: list domains`},
		{[]string{"run", "SCRIPT", "build_script"}, `look up instance "`},
		{[]string{"cleanup"}, `look up instance "`},
	} {
		t.Run(tc.stage[0], func(t *testing.T) {
			t.Parallel()
			j := &gitlabJob{t: t, dir: t.TempDir()}
			j.env = map[string]string{
				"LIBVIRT_GCI_URI":          uri,
				"LIBVIRT_GCI_TEMPLATES":    "tiny-*",
				"JOB_RESPONSE_FILE":        filepath.Join(j.dir, "response.json"),
				"SYSTEM_FAILURE_EXIT_CODE": "2",
				"CUSTOM_ENV_DISTRO":        "tiny-hang",
			}
			j.writeResponse("99", "77", "r")
			args := tc.stage
			if args[0] == "run" {
				args = []string{"run", j.script("b.sh", "echo never"), "build_script"}
			}
			cmd := exec.Command(binPath, args...)
			cmd.Env = j.environ()
			var stderr lockedBuffer
			cmd.Stderr = &stderr
			require.NoError(t, cmd.Start())
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			time.Sleep(time.Second) // now waiting on the silent libvirtd
			select {
			case err := <-exited:
				t.Fatalf("exited before the SIGTERM: %v\n%s", err, stderr.String())
			default:
			}
			require.NoError(t, cmd.Process.Signal(syscall.SIGTERM))
			sent := time.Now()
			select {
			case err := <-exited:
				took := time.Since(sent)
				ee, ok := err.(*exec.ExitError)
				require.True(t, ok, "want a failure exit, got %v; stderr:\n%s", err, stderr.String())
				assert.Equal(t, 2, ee.ExitCode(), "SYSTEM_FAILURE_EXIT_CODE")
				assert.Less(t, took, 5*time.Second)
				assert.Contains(t, stderr.String(), tc.want, "names what it waited for")
				assert.Contains(t, stderr.String(), "procedure interrupted while awaiting response (cancelled by SIGTERM)\n")
				t.Logf("%s exited %.1f s after SIGTERM: %s", tc.stage[0], took.Seconds(), stderr.String())
			case <-time.After(30 * time.Second):
				_ = cmd.Process.Kill()
				t.Fatalf("still running 30 s after SIGTERM; stderr:\n%s", stderr.String())
			}
		})
	}
}
