package executor

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

// URIs are the libvirt hosts of LIBVIRT_GCI_URI: one or more, separated by spaces or
// commas.
func (s Settings) URIs() []string {
	return strings.FieldsFunc(s.URI, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' })
}

// hostAt is the lifecycle of instances on the libvirt at uri, as the settings configure it.
func (e *Executor) hostAt(uri string) *provision.Host {
	return &provision.Host{URI: uri, Dial: e.Dial, Config: e.Settings.Config, Version: e.Version, Log: e.Log, Out: e.Stdout}
}

// host is the first host of LIBVIRT_GCI_URI: the one the template commands act on.
func (e *Executor) host() *provision.Host { return e.hostAt(e.Settings.URIs()[0]) }

// hosts are all of them.
func (e *Executor) hosts() provision.Fleet {
	var hs provision.Fleet
	for _, u := range e.Settings.URIs() {
		hs = append(hs, e.hostAt(u))
	}
	return hs
}

// place picks the host for a new instance: of those that answer, the one with the most
// room (provision.Headroom). A host that is down is skipped, with a progress line.
func (e *Executor) place(ctx context.Context) (*provision.Host, error) {
	hs := e.hosts()
	if len(hs) == 1 {
		return hs[0], nil
	}
	start := time.Now()
	rooms, errs := provision.Probe(ctx, hs, func(h *provision.Host, conn *provision.Conn) (provision.Headroom, error) {
		return h.Headroom(conn)
	}, nil)
	best := -1
	for i, h := range hs {
		if errs[i] != nil {
			if ctx.Err() != nil {
				return nil, context.Cause(ctx)
			}
			e.Log.Warn(fmt.Sprintf("skipping %s: %v", provision.PublicURI(h.URI), errs[i]), "uri", provision.PublicURI(h.URI))
			continue
		}
		if best < 0 || rooms[i].Better(rooms[best]) {
			best = i
		}
	}
	if best < 0 {
		return nil, fmt.Errorf("none of the %d hosts of LIBVIRT_GCI_URI answered: %w", len(hs), errors.Join(errs...))
	}
	e.Log.Info(fmt.Sprintf("placed on %s (%s) in %d ms", provision.PublicURI(hs[best].URI), rooms[best], time.Since(start).Milliseconds()), "uri", provision.PublicURI(hs[best].URI))
	return hs[best], nil
}

// locate finds the host of the instance name: the one prepare placed it on, as its
// metadata records, where several hosts have it (two URIs of the same libvirt). A host
// that is down cannot have it found; if no host has it, the error names those down.
func (e *Executor) locate(ctx context.Context, name string) (*provision.Host, error) {
	hs := e.hosts()
	if len(hs) == 1 {
		return hs[0], nil
	}
	found, errs := provision.Probe(ctx, hs, func(h *provision.Host, conn *provision.Conn) (*provision.Instance, error) {
		inst, err := conn.Lookup(name)
		if err != nil {
			return nil, err
		}
		return &inst, nil
	}, func(i int, inst *provision.Instance) bool { return inst.Metadata.URI == hs[i].URI })
	var at *provision.Host
	var down []error
	for i, h := range hs {
		switch {
		case found[i] != nil && (at == nil || found[i].Metadata.URI == h.URI):
			at = h
		case errs[i] != nil && !errors.Is(errs[i], provision.ErrNoInstance) && !errors.Is(errs[i], provision.ErrNotManaged):
			down = append(down, fmt.Errorf("%s: %w", provision.PublicURI(h.URI), errs[i]))
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
		if errors.Is(errs[i], provision.ErrNotManaged) {
			return h, nil
		}
	}
	return hs[0], nil // ErrNoInstance, from the first host, as with one host
}
