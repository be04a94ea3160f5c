package provision

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestLingeringEndsAfterItsParent(t *testing.T) {
	t.Parallel()
	parent, cancelParent := context.WithCancel(context.Background())
	ctx, cancel := lingering(parent, 100*time.Millisecond)
	defer cancel()
	cancelParent()
	ended := time.Now()
	select {
	case <-ctx.Done():
		t.Fatal("ended with its parent")
	case <-time.After(50 * time.Millisecond):
	}
	select {
	case <-ctx.Done():
		assert.GreaterOrEqual(t, time.Since(ended), 100*time.Millisecond)
		assert.ErrorIs(t, context.Cause(ctx), context.Canceled)
		assert.ErrorContains(t, context.Cause(ctx), "and 100ms more passed")
	case <-time.After(5 * time.Second):
		t.Fatal("did not end after its parent")
	}
}
