package executor

import (
	"context"
	"errors"
	"testing"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// A job's cleanup returns once its instance is paused and marked ending; the removal is
// the finisher's, which removes only that instance. A finisher that cannot start leaves
// the removal to the cleanup itself.
func TestCleanupLeavesRemovalToFinisher(t *testing.T) {
	ctx := context.Background()
	j := newFakeJob(t)
	var name, id string
	j.e.Detach = func(n, p string) error { name, id = n, p; return nil }
	require.NoError(t, j.e.Prepare(ctx, j.t, Choice{Name: "tmpl", From: "test", Listed: true}, Size{}))
	require.NoError(t, j.e.Cleanup(ctx, j.t))
	require.Equal(t, j.t.Name, name)
	in, err := provision.NewConn(j.f).Lookup(name)
	require.NoError(t, err, "the cleanup removed it itself")
	assert.Equal(t, libvirt.DomainPaused, state(t, j, name))
	assert.NotEmpty(t, in.Metadata.EndingAt)
	assert.Equal(t, in.Metadata.PrepareID, id)

	err = j.e.Finish(ctx, name, "another-prepare")
	assert.ErrorContains(t, err, "is not the one its cleanup ended")
	require.NoError(t, j.e.Finish(ctx, name, id))
	assert.Empty(t, j.leftovers())
	require.NoError(t, j.e.Finish(ctx, name, id), "once gone, there is nothing to do")

	// By hand, cleanup --machine removes at once.
	j = newFakeJob(t)
	j.e.Detach = func(string, string) error { t.Fatal("by hand, nothing is detached"); return nil }
	require.NoError(t, j.e.Prepare(ctx, j.t, Choice{Name: "tmpl", From: "test", Listed: true}, Size{}))
	require.NoError(t, j.e.Cleanup(ctx, Target{Name: j.t.Name, Owner: meta.Owner{Manual: true}, ByHand: true}))
	assert.Empty(t, j.leftovers())

	// A finisher that does not start: the cleanup removes the instance.
	j = newFakeJob(t)
	j.e.Detach = func(string, string) error { return errors.New("no fork today") }
	require.NoError(t, j.e.Prepare(ctx, j.t, Choice{Name: "tmpl", From: "test", Listed: true}, Size{}))
	require.NoError(t, j.e.Cleanup(ctx, j.t))
	assert.Empty(t, j.leftovers())
}

// Another job's cleanup cannot end an instance that is not its own.
func TestCleanupEndsOnlyItsOwn(t *testing.T) {
	ctx := context.Background()
	j := newFakeJob(t)
	j.e.Detach = func(string, string) error { t.Fatal("detached for another job's instance"); return nil }
	require.NoError(t, j.e.Prepare(ctx, j.t, Choice{Name: "tmpl", From: "test", Listed: true}, Size{}))
	other := j.t
	other.Owner.JobID = "10"
	assert.ErrorContains(t, j.e.Cleanup(ctx, other), "leaving it alone")
	in, err := provision.NewConn(j.f).Lookup(j.t.Name)
	require.NoError(t, err)
	assert.Equal(t, libvirt.DomainRunning, state(t, j, j.t.Name))
	assert.Empty(t, in.Metadata.EndingAt)
}

func state(t *testing.T, j *fakeJob, name string) libvirt.DomainState {
	t.Helper()
	d, err := j.f.DomainLookupByName(name)
	require.NoError(t, err)
	st, _, err := j.f.DomainGetState(d, 0)
	require.NoError(t, err)
	return libvirt.DomainState(st)
}

// The runner's second cleanup (a retry) may find the instance that its finisher removes
// meanwhile, gone between the look-up and the metadata: nothing to do, no error.
func TestCleanupRacesItsFinisher(t *testing.T) {
	ctx := context.Background()
	j := newFakeJob(t)
	j.e.Detach = func(string, string) error { return nil }
	require.NoError(t, j.e.Prepare(ctx, j.t, Choice{Name: "tmpl", From: "test", Listed: true}, Size{}))
	require.NoError(t, j.e.Cleanup(ctx, j.t))
	gone := libvirt.Error{Code: uint32(libvirt.ErrNoDomain), Message: "Domain not found: no domain with matching uuid"}
	j.f.Fail("DomainGetMetadata", gone)
	assert.NoError(t, j.e.Cleanup(ctx, j.t), "detached")
	j.e.Detach = nil
	assert.NoError(t, j.e.Cleanup(ctx, j.t), "at once")
}
