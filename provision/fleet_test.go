package provision

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"testing"

	"github.com/stretchr/testify/assert"
)

// The down-host policy: one host's error is its own; of several, a failing host is
// skipped with a line, unless every one failed or the action was wanted on all.
func TestFleetEach(t *testing.T) {
	t.Parallel()
	down := errors.New("connection refused")
	fl := Fleet{{URI: "qemu+ssh://a/system"}, {URI: "qemu+ssh://b/system"}}
	failA := func(h *Host) error {
		if h.URI == "qemu+ssh://a/system" {
			return down
		}
		return nil
	}
	var log bytes.Buffer
	l := slog.New(slog.NewTextHandler(&log, nil))

	assert.Equal(t, down, Fleet{fl[0]}.Each(context.Background(), l, false, failA), "one host: its error, as it is")
	assert.NoError(t, fl.Each(context.Background(), l, false, failA))
	assert.Contains(t, log.String(), "skipping qemu+ssh://a/system: connection refused")
	err := fl.Each(context.Background(), l, true, failA)
	assert.ErrorIs(t, err, down)
	assert.ErrorContains(t, err, "qemu+ssh://a/system: connection refused")
	err = fl.Each(context.Background(), l, false, func(*Host) error { return down })
	assert.ErrorContains(t, err, "none of the 2 hosts of LIBVIRT_GCI_URI answered")
}
