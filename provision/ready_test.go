package provision

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// nicTemplate is the fake's template with a NIC of its own on a libvirt network.
var nicTemplate = strings.Replace(provisiontest.Template, "</devices>",
	"<interface type='network'><source network='ci-net'/><model type='virtio'/></interface></devices>", 1)

func readyHost(t *testing.T, f *provisiontest.Libvirt, log *bytes.Buffer, boot time.Duration) *Host {
	t.Helper()
	_, err := f.DomainDefineXMLFlags(nicTemplate, 0)
	require.NoError(t, err)
	f.AddNetwork(provisiontest.DHCPNetwork("ci-net", 64))
	return &Host{Config: Config{Pool: "ci", Prefix: "gci-", BootTimeout: boot, SecretFile: filepath.Join(t.TempDir(), "secret")},
		Log: slog.New(slog.NewTextHandler(log, nil)), Dial: func(context.Context, string) (*libvirt.Conn, error) { return libvirt.NewConn(f), nil }}
}

func launchReq(name string) Request {
	return Request{Name: name, Template: "tmpl", Offered: true, Transport: meta.TransportAgent}
}

// Ready means ready for the job: systemd's boot over, the template's NIC addressed; the
// prepare's lines say what it waited for.
func TestLaunchWaitsForSystemdAndAddresses(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	f.SetSystem("running")
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	recs := records(t, log.String())
	assert.NotNil(t, record(recs, map[string]string{"state": "running", "system_ms": "*"}), "waited for systemd's boot:\n%s", log.String())
	assert.NotNil(t, record(recs, map[string]string{"network_ms": "*"}), "waited for the network")
	assert.Regexp(t, `eth0 10\.9\.8\.[0-9]+/24 on network ci-net`, log.String(), "says which address it waited for")
	assert.Contains(t, log.String(), "host name gci-a", "a cold boot gets the instance's host name too")
}

// A degraded system is usable: the job runs, and one line names the failed units.
func TestLaunchDegradedSystemSaysSo(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	f.SetSystem("degraded", "ssh.service", "foo.mount")
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	assert.Contains(t, log.String(), "systemd finished booting degraded after")
	assert.Contains(t, log.String(), "ssh.service, foo.mount failed; the job runs all the same")
}

// A guest whose systemd never finishes booting, or whose NIC never gets an address, is
// a system failure that names what it waited for, within the boot timeout, and leaves
// nothing behind.
func TestLaunchNotReadyFails(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name  string
		setup func(f *provisiontest.Libvirt)
		want  string
	}{
		{"starting", func(f *provisiontest.Libvirt) { f.SetSystem("starting") },
			"systemd had not finished booting (is-system-running: starting) when the boot timeout passed"},
		{"maintenance", func(f *provisiontest.Libvirt) { f.SetSystem("maintenance") },
			"systemd's boot ended maintenance (is-system-running), not running or degraded"},
		{"no address", func(f *provisiontest.Libvirt) { f.SetNoAddress("52:54:00:fa:00:02") },
			// (A loaded host may be in the middle of an agent call at the timeout: the
			// message then names that call's error too, between the two parts.)
			"waiting for the template's NICs to get their addresses: NIC 52:54:00:fa:00:02 had no address\x00" +
				"when boot timeout 1s (LIBVIRT_GCI_BOOT_TIMEOUT) passed; does the guest configure them (DHCP on their network, or a static address)? (the instance's NICs: 52:54:00:fa:00:02 on network ci-net)"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			f := provisiontest.New("ci")
			var log bytes.Buffer
			h := readyHost(t, f, &log, time.Second)
			c.setup(f)
			start := time.Now()
			err := h.Launch(context.Background(), launchReq("gci-a"))
			require.Error(t, err)
			assert.ErrorIs(t, err, guest.ErrNotReady)
			for _, part := range strings.Split(c.want, "\x00") {
				assert.Contains(t, err.Error(), part)
			}
			assert.Less(t, time.Since(start), 5*time.Second)
			assert.Equal(t, "domain tmpl running=false", f.State(), "the instance is rolled back")
		})
	}
}

// A SIGTERM during a define that libvirt answers only after AfterCancel (a busy
// libvirtd): the rollback gets its AfterCancel from the answer, not from the cancel, so
// it removes the domain the define made. (With AfterCancel counted from the cancel, the
// rollback was over before it began and the domain was left for gc.)
func TestCancelDuringSlowDefineRollsBack(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	h.Dial = func(ctx context.Context, _ string) (*libvirt.Conn, error) {
		if ctx.Err() != nil { // as a real connect does
			return nil, fmt.Errorf("connect: %w", context.Cause(ctx))
		}
		return libvirt.NewConn(f), nil
	}
	f.SetSystem("running")
	gate := f.Gate("DomainDefineXMLFlags")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Launch(ctx, launchReq("gci-a")) }()
	require.Equal(t, "DomainDefineXMLFlags", <-f.Entered())
	cancel()
	time.Sleep(AfterCancel + 500*time.Millisecond)
	close(gate)
	select {
	case err := <-done:
		require.ErrorIs(t, err, context.Canceled)
	case <-time.After(time.Minute):
		t.Fatal("Launch did not return")
	}
	assert.NotContains(t, f.State(), "gci-a", "the rollback left something:\n%s", log.String())
}

// Issue 38: the pool's file system full while the guest boots. QEMU pauses the VM on the
// write it cannot store; the prepare fails within a second or two saying so, rolled
// back, not at the boot timeout.
func TestLaunchSaysThePoolIsFull(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	f.SetNoAddress("52:54:00:fa:00:02") // the wait goes on, as it would until the timeout
	go func() {
		for !strings.Contains(f.State(), "gci-a running=true") {
			time.Sleep(10 * time.Millisecond)
		}
		f.FillPool("gci-a")
	}()
	start := time.Now()
	err := h.Launch(context.Background(), launchReq("gci-a"))
	require.Error(t, err)
	assert.Contains(t, err.Error(), "the VM paused: a write to its disks could not be stored, the file system under its storage pool is full")
	assert.Less(t, time.Since(start), 5*time.Second, "at once, not at the boot timeout")
	assert.Equal(t, "domain tmpl running=false", f.State(), "the instance is rolled back")
}
