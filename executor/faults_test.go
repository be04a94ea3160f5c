package executor

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// fakeJob is one job's stages against provisiontest's fake libvirt.
type fakeJob struct {
	f      *provisiontest.Libvirt
	e      *Executor
	t      Target
	script string
	out    bytes.Buffer
}

func newFakeJob(t *testing.T) *fakeJob {
	t.Helper()
	f := provisiontest.New("ci")
	_, err := f.DomainDefineXMLFlags(provisiontest.Template, 0)
	require.NoError(t, err)
	f.SetScript(func(_, script string) (string, string, int) {
		if strings.Contains(script, "exit 3") {
			return "", "failing\n", 3
		}
		return "ran\n", "", 0
	})
	j := &fakeJob{f: f, script: filepath.Join(t.TempDir(), "build.sh")}
	require.NoError(t, os.WriteFile(j.script, []byte("echo ran\n"), 0o600))
	s := settings()
	s.Pool, s.Templates = "ci", []string{"tmpl"}
	j.e = &Executor{Settings: s, Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Stdout: &j.out, Stderr: &j.out,
		Dial: func(context.Context, string) (*provision.Conn, error) { return provision.NewConn(f), nil }}
	o := meta.Owner{Server: "s", Runner: "r", ProjectID: "1", JobID: "9"}
	name, err := InstanceName(s.Prefix, o)
	require.NoError(t, err)
	j.t = Target{Name: name, Owner: o}
	return j
}

// stages runs prepare, run and cleanup as the runner does (cleanup whatever happened),
// and returns the first error.
func (j *fakeJob) stages() error {
	ctx := context.Background()
	err := j.e.Prepare(ctx, j.t, Choice{Name: "tmpl", From: "test", Listed: true}, Size{})
	if err == nil {
		err = j.e.Run(ctx, j.t, j.script, "build_script", "")
	}
	if cerr := j.e.Cleanup(ctx, j.t); err == nil {
		err = cerr
	}
	return err
}

func (j *fakeJob) leftovers() string {
	state := j.f.State()
	// A complete warm image stays for the next job: it is what restores them.
	done := regexp.MustCompile(`volume ci/(libvirt-gci-warm-[0-9a-f-]+)\.done`).FindAllStringSubmatch(state, -1)
	var left []string
	for _, part := range strings.Split(state, "; ") {
		if part == "" || strings.HasPrefix(part, "domain tmpl ") ||
			slices.ContainsFunc(done, func(m []string) bool { return strings.HasPrefix(part, "volume ci/"+m[1]) }) {
			continue
		}
		left = append(left, part)
	}
	return strings.Join(left, "; ")
}

// A job's stages against the fake: all succeed, the script's output comes through, and
// nothing is left.
func TestFakeJob(t *testing.T) {
	t.Parallel()
	j := newFakeJob(t)
	require.NoError(t, j.stages())
	assert.Equal(t, "ran\n", j.out.String())
	assert.Empty(t, j.leftovers())
}

// A failure injected at every libvirt call that prepare, run and cleanup make, one call
// at a time: the stage that meets it fails as a system failure (never a build failure),
// and the next cleanup (the runner's, once libvirt behaves) leaves no domain or volume.
func TestFaultAtEveryCall(t *testing.T) {
	t.Parallel()
	good := newFakeJob(t)
	require.NoError(t, good.stages())
	calls := good.f.Calls()[1:] // not the test's own define of the template
	seen := map[string]int{}
	for _, method := range calls {
		seen[method]++
		n := seen[method]
		t.Run(fmt.Sprintf("%s#%d", method, n), func(t *testing.T) {
			t.Parallel()
			j := newFakeJob(t)
			j.f.FailNth(method, n, libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "injected fault"})
			err := j.stages()
			if err != nil {
				assert.Equal(t, 2, ExitCode(err, ExitCodes{Build: 1, System: 2}), "%v", err)
			}
			require.NoError(t, j.e.Cleanup(context.Background(), j.t), "the runner's next cleanup")
			assert.Empty(t, j.leftovers(), "after %v", err)
		})
	}
	assert.Greater(t, len(calls), 20, "calls: %v", calls)
}
