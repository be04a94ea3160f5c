package provision

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"
)

// Fleet is the hosts of LIBVIRT_GCI_URI, in its order: what is done on several libvirts
// is done here, with one policy for a host that is down.
type Fleet []*Host

// ProbeTime bounds how long a probe (placing a job, finding its instance) waits for one
// host of several: a host that is down or stalled is skipped after it.
var ProbeTime = 15 * time.Second

// Each runs f on each host in turn. With one host, its error is f's. With several, a
// host whose f fails is skipped with a warning line; Each fails if every host failed,
// or, with all, if any did (an action wanted on every host: gc, mark, warm).
func (fl Fleet) Each(ctx context.Context, log *slog.Logger, all bool, f func(h *Host) error) error {
	if len(fl) == 1 {
		return f(fl[0])
	}
	var errs []error
	for _, h := range fl {
		err := f(h)
		if err == nil {
			continue
		}
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		err = fmt.Errorf("%s: %w", PublicURI(h.URI), err)
		if !all {
			log.Warn(fmt.Sprintf("skipping %v", err), "uri", PublicURI(h.URI))
		}
		errs = append(errs, err)
	}
	switch {
	case len(errs) == len(fl):
		return fmt.Errorf("none of the %d hosts of LIBVIRT_GCI_URI answered: %w", len(fl), errors.Join(errs...))
	case all:
		return errors.Join(errs...)
	}
	return nil
}

// Probe runs f on every host at once, each with a connection of its own bounded by
// ProbeTime, and returns what each said, in the fleet's order. Once enough says that an
// answer settles it, it returns without waiting for the others (a stalled host among
// them); their slots stay empty, with errors saying so.
func Probe[T any](ctx context.Context, fl Fleet, f func(h *Host, conn *Conn) (T, error), enough func(i int, v T) bool) ([]T, []error) {
	ctx, cancel := context.WithTimeoutCause(ctx, ProbeTime, fmt.Errorf("no answer within %s", ProbeTime))
	defer cancel()
	type answer struct {
		i   int
		v   T
		err error
	}
	answers := make(chan answer, len(fl))
	for i, h := range fl {
		go func() {
			conn, err := h.Connect(ctx)
			if err != nil {
				answers <- answer{i: i, err: err}
				return
			}
			defer conn.Close()
			v, err := f(h, conn)
			if err != nil && ctx.Err() != nil && !strings.Contains(err.Error(), context.Cause(ctx).Error()) {
				err = fmt.Errorf("%w (%v)", err, context.Cause(ctx)) // why the call was cut short
			}
			answers <- answer{i, v, err}
		}()
	}
	out, errs := make([]T, len(fl)), make([]error, len(fl))
	for i := range errs {
		errs[i] = errors.New("not asked: another host settled it")
	}
	for range fl {
		a := <-answers
		out[a.i], errs[a.i] = a.v, a.err
		if a.err == nil && enough != nil && enough(a.i, a.v) {
			break
		}
	}
	return out, errs
}

// Place picks the host for a new instance: of those that answer, the one with the most
// room (Headroom). A host that is down is skipped, with a progress line.
func (hs Fleet) Place(ctx context.Context, log *slog.Logger) (*Host, error) {
	if len(hs) == 1 {
		return hs[0], nil
	}
	start := time.Now()
	rooms, errs := Probe(ctx, hs, func(h *Host, conn *Conn) (Headroom, error) {
		return h.Headroom(conn)
	}, nil)
	best := -1
	for i, h := range hs {
		if errs[i] != nil {
			if ctx.Err() != nil {
				return nil, context.Cause(ctx)
			}
			log.Warn(fmt.Sprintf("skipping %s: %v", PublicURI(h.URI), errs[i]), "uri", PublicURI(h.URI))
			continue
		}
		if best < 0 || rooms[i].Better(rooms[best]) {
			best = i
		}
	}
	if best < 0 {
		return nil, fmt.Errorf("none of the %d hosts of LIBVIRT_GCI_URI answered: %w", len(hs), errors.Join(errs...))
	}
	log.Info(fmt.Sprintf("placed on %s (%s) in %d ms", PublicURI(hs[best].URI), rooms[best], time.Since(start).Milliseconds()), "uri", PublicURI(hs[best].URI))
	return hs[best], nil
}

// Locate finds the host of the instance name: the one prepare placed it on, as its
// metadata records, where several hosts have it (two URIs of the same libvirt). A host
// that is down cannot have it found; if no host has it, the error names those down.
func (hs Fleet) Locate(ctx context.Context, name string) (*Host, error) {
	if len(hs) == 1 {
		return hs[0], nil
	}
	found, errs := Probe(ctx, hs, func(h *Host, conn *Conn) (*Instance, error) {
		inst, err := conn.Lookup(name)
		if err != nil {
			return nil, err
		}
		return &inst, nil
	}, func(i int, inst *Instance) bool { return inst.Metadata.URI == hs[i].URI })
	var at *Host
	var down []error
	for i, h := range hs {
		switch {
		case found[i] != nil && (at == nil || found[i].Metadata.URI == h.URI):
			at = h
		case errs[i] != nil && !errors.Is(errs[i], ErrNoInstance) && !errors.Is(errs[i], ErrNotManaged):
			down = append(down, fmt.Errorf("%s: %w", PublicURI(h.URI), errs[i]))
		}
	}
	if at != nil {
		return at, nil
	}
	if ctx.Err() != nil {
		return nil, context.Cause(ctx)
	}
	if len(down) > 0 {
		return nil, fmt.Errorf("instance %q is on none of the hosts that answered, and %d did not: %w", name, len(down), errors.Join(down...))
	}
	for i, h := range hs { // a domain of that name that is not ours: say so
		if errors.Is(errs[i], ErrNotManaged) {
			return h, nil
		}
	}
	return hs[0], nil // ErrNoInstance, from the first host, as with one host
}
