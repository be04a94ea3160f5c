package guest

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The identity helper (run here by the host's perl, as the guest's runs it) waits for
// its requests, does each, says what failed and then "done", and ends.
func TestIdentityHelper(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("perl"); err != nil {
		t.Skip("no perl here")
	}
	d := t.TempDir()
	in, out := filepath.Join(d, "identity.in"), filepath.Join(d, "identity.out")
	require.NoError(t, syscall.Mkfifo(in, 0o600))
	require.NoError(t, syscall.Mkfifo(out, 0o600))
	require.NoError(t, os.Mkdir(filepath.Join(d, "old"), 0o700))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pid := filepath.Join(d, "identity.pid")
	require.NoError(t, os.WriteFile(pid, []byte("1\n"), 0o644))
	cmd := exec.CommandContext(ctx, "perl", "-e", identityHelper, in, out, pid)
	require.NoError(t, cmd.Start())
	// Waiting, as in a warm image, before it is asked.
	time.Sleep(100 * time.Millisecond)
	req := "reseed\n" + "rename " + filepath.Join(d, "old") + " " + filepath.Join(d, "new") + "\n" +
		"rename " + filepath.Join(d, "gone") + " " + filepath.Join(d, "x") + "\n" +
		"mac gci-no-such-nic 52:54:00:12:34:56\nbogus\n"
	require.NoError(t, os.WriteFile(in, []byte(req), 0o600))
	f, err := os.Open(out)
	require.NoError(t, err)
	defer f.Close()
	var lines []string
	for s := bufio.NewScanner(f); s.Scan(); {
		lines = append(lines, s.Text())
	}
	require.NoError(t, cmd.Wait(), "it ends once it has answered")
	require.Len(t, lines, 5, "%q", lines)
	if os.Geteuid() == 0 {
		assert.Equal(t, "gci-rng: reseeded", lines[0])
	} else {
		assert.True(t, strings.HasPrefix(lines[0], "gci-rng: cannot reseed: "), lines[0])
	}
	lines = lines[1:]
	assert.Contains(t, lines[0], "cannot rename "+filepath.Join(d, "gone"))
	assert.True(t, strings.HasPrefix(lines[1], "cannot set the MAC address of gci-no-such-nic to 52:54:00:12:34:56"), lines[1])
	assert.Equal(t, []string{"unknown request bogus", "done"}, lines[2:])
	assert.DirExists(t, filepath.Join(d, "new"))
	assert.NoDirExists(t, filepath.Join(d, "old"))
	for _, p := range []string{in, out, pid} {
		assert.NoFileExists(t, p, "it removes its files")
	}
	assert.Contains(t, quiesce, identityHelper, "quiesce starts it")
	assert.NotContains(t, identityHelper, "'", "it goes in single quotes")
}
