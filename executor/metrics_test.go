package executor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// parseMetrics parses text exposition with Prometheus's own parser.
func parseMetrics(t *testing.T, b []byte) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(bytes.NewReader(b))
	require.NoError(t, err, "%s", b)
	return mfs
}

// sample is the value of the sample of family name whose labels include want, and
// whether there is one.
func sample(mfs map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	mf := mfs[name]
	if mf == nil {
		return 0, false
	}
	for _, m := range mf.Metric {
		ok := true
		for k, v := range want {
			found := false
			for _, l := range m.Label {
				found = found || (l.GetName() == k && l.GetValue() == v)
			}
			ok = ok && found
		}
		if ok {
			return m.GetGauge().GetValue(), true
		}
	}
	return 0, false
}

// total is the sum of family name's samples.
func total(mfs map[string]*dto.MetricFamily, name string) float64 {
	s := 0.0
	if mf := mfs[name]; mf != nil {
		for _, m := range mf.Metric {
			s += m.GetGauge().GetValue()
		}
	}
	return s
}

// The metrics of two instances, one ready and one ending, parse with Prometheus's
// parser; their instance count is what `list --json` lists; the capacity counts only
// the ready one; the warm image is there with its users; to a file, they are written
// whole.
func TestMetrics(t *testing.T) {
	ctx := context.Background()
	j := newFakeJob(t)
	j.e.Settings.Limits.Instances = 3
	j.e.Detach = func(string, string) error { return nil }
	var err error
	j.t.Owner.Project = "Secret Group/private-app"
	j.t.Name, err = InstanceName(j.e.Settings.Prefix, j.t.Owner)
	require.NoError(t, err)
	require.NoError(t, j.e.Prepare(ctx, j.t, Choice{Name: "tmpl", From: "test", Listed: true}, Size{}))
	other := j.t
	other.Owner.JobID = "10"
	other.Name, err = InstanceName(j.e.Settings.Prefix, other.Owner)
	require.NoError(t, err)
	require.NoError(t, j.e.Prepare(ctx, other, Choice{Name: "tmpl", From: "test", Listed: true}, Size{}))
	require.NoError(t, j.e.Cleanup(ctx, other)) // ending: its finisher (none here) would remove it

	j.out.Reset()
	require.NoError(t, j.e.List(ctx, true))
	var listed []Listed
	require.NoError(t, json.Unmarshal(j.out.Bytes(), &listed))
	require.Len(t, listed, 2)

	j.out.Reset()
	require.NoError(t, j.e.Metrics(ctx, ""))
	mfs := parseMetrics(t, j.out.Bytes())
	assert.Equal(t, float64(len(listed)), total(mfs, "libvirt_gci_instances"))
	v, ok := sample(mfs, "libvirt_gci_instances", map[string]string{"phase": meta.PhaseEnding, "state": "paused", "template": "tmpl"})
	assert.True(t, ok && v == 1, "one ending instance, paused: %s", j.out.String())
	v, ok = sample(mfs, "libvirt_gci_instances", map[string]string{"phase": meta.PhaseReady, "state": "running"})
	assert.True(t, ok && v == 1, "one ready instance, running")
	v, _ = sample(mfs, "libvirt_gci_up", nil)
	assert.Equal(t, 1.0, v)
	v, _ = sample(mfs, "libvirt_gci_capacity_instances", nil)
	assert.Equal(t, 1.0, v, "the ending instance does not count")
	v, _ = sample(mfs, "libvirt_gci_capacity_instances_limit", nil)
	assert.Equal(t, 3.0, v)
	_, ok = sample(mfs, "libvirt_gci_capacity_memory_limit_bytes", nil)
	assert.False(t, ok, "no limit set, none written")
	// Instances by their names less their project's path, which may be private: the
	// metrics file is node_exporter's to serve to whoever reaches the host.
	short := func(name string) string {
		return strings.Replace(name, "-"+slug(j.t.Owner.Project), "", 1)
	}
	require.Contains(t, j.t.Name, slug(j.t.Owner.Project))
	assert.NotContains(t, j.out.String(), slug(j.t.Owner.Project))
	v, ok = sample(mfs, "libvirt_gci_instance_prepare_seconds", map[string]string{"instance": short(j.t.Name), "start": provision.StartRestore})
	assert.True(t, ok && v > 0, "the prepare's time, restored: %v\n%s", v, j.out.String())
	_, ok = sample(mfs, "libvirt_gci_instance_ending_seconds", map[string]string{"instance": short(other.Name)})
	assert.True(t, ok)
	assert.Equal(t, 1.0, total(mfs, "libvirt_gci_warm_images"))
	assert.Equal(t, 2.0, total(mfs, "libvirt_gci_warm_image_instances"))
	assert.Positive(t, total(mfs, "libvirt_gci_warm_image_bytes"))
	v, _ = sample(mfs, "libvirt_gci_pool_active", map[string]string{"pool": "ci"})
	assert.Equal(t, 1.0, v)
	assert.Len(t, mfs["libvirt_gci_instance_age_seconds"].GetMetric(), 2)

	// To a file for node_exporter: the same, written whole.
	out := filepath.Join(t.TempDir(), "libvirt-gci.prom")
	require.NoError(t, j.e.Metrics(ctx, out))
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, 2.0, total(parseMetrics(t, b), "libvirt_gci_instances"))
	assert.Error(t, j.e.Metrics(ctx, filepath.Join(t.TempDir(), "no", "such", "dir.prom")))

	// Two URIs that reach one libvirt: its instances count once, in list and metrics.
	j.e.Settings.URI = "qemu:///system qemu+ssh://localhost/system"
	j.out.Reset()
	require.NoError(t, j.e.List(ctx, true))
	require.NoError(t, json.Unmarshal(j.out.Bytes(), &listed))
	assert.Len(t, listed, 2)
	j.out.Reset()
	require.NoError(t, j.e.Metrics(ctx, ""))
	assert.Equal(t, 2.0, total(parseMetrics(t, j.out.Bytes()), "libvirt_gci_instances"))
}

// A host of LIBVIRT_GCI_URI that does not answer is written as down, the others as
// ever, and metrics fails after writing, naming it.
func TestMetricsHostDown(t *testing.T) {
	ctx := context.Background()
	j := newFakeJob(t)
	require.NoError(t, j.e.Prepare(ctx, j.t, Choice{Name: "tmpl", From: "test", Listed: true}, Size{}))
	dial := j.e.Dial
	j.e.Settings.URI = "test:///up test:///down"
	j.e.Dial = func(ctx context.Context, uri string) (*provision.Conn, error) {
		if uri == "test:///down" {
			return nil, errors.New("connection refused")
		}
		return dial(ctx, uri)
	}
	j.out.Reset()
	err := j.e.Metrics(ctx, "")
	assert.ErrorContains(t, err, "test:///down: connection refused")
	mfs := parseMetrics(t, j.out.Bytes())
	v, _ := sample(mfs, "libvirt_gci_up", map[string]string{"host": "test:///down"})
	assert.Equal(t, 0.0, v)
	v, _ = sample(mfs, "libvirt_gci_up", map[string]string{"host": "test:///up"})
	assert.Equal(t, 1.0, v)
	assert.Equal(t, 1.0, total(mfs, "libvirt_gci_instances"))
}
