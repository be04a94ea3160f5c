package provision

import "context"

// Launcher is a launch strategy: how a Spec becomes a running instance. Whatever it
// makes must be listed in the Spec's metadata before it makes it, so that a Teardown can
// remove it after any failure. A Launcher that ends early (ctx) awaits the call in
// flight, as Create does.
type Launcher interface {
	Launch(ctx context.Context, c *Conn, spec Spec) (Timings, error)
}

// ColdBoot defines the domain, creates its overlays and boots it: Create.
type ColdBoot struct{}

// Launch implements Launcher.
func (ColdBoot) Launch(ctx context.Context, c *Conn, spec Spec) (Timings, error) {
	return c.Create(ctx, spec)
}
