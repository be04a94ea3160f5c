package provision

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// A launch makes the instance a Request asks for, in named steps: sweep the orphans,
// find the template, remove a leftover of the name, plan the instance with the first
// strategy (in the order LIBVIRT_GCI_START gives) that fits the request, admit it under
// the host's capacity, make it, and wait until the guest is ready for the job. What a
// failed launch made, it removes (rollback); nothing else.

// A Strategy is one way of making an instance: a cold boot (coldBoot), a restore from
// the template's warm image (restore). Adding one (a hot-plug, a memory-sharing
// restore) is a file with a type that implements this and one registerStrategy call
// (its value of LIBVIRT_GCI_START, and the one tried where it does not fit).
type Strategy interface {
	// Name is its value of LIBVIRT_GCI_START; Doing says it in a progress line.
	Name() string
	Doing() string
	// Plan lays the instance p asks for out (Layout: what Make makes and what the waits
	// after it need), or says why the strategy does not fit p's request. It reads p and
	// does not change it.
	Plan(ctx context.Context, conn *libvirt.Conn, p *plan) (*Layout, *misfit, error)
	// Make makes the planned instance (p.Layout) in libvirt and starts it. Whatever it
	// makes is listed in p.Spec's metadata first, so that a rollback finds it.
	Make(ctx context.Context, conn *libvirt.Conn, p *plan) (libvirt.Timings, error)
}

// Layout is what a strategy decided for one instance: its domain and volumes (Spec), its
// memory (for the capacity), its progress line, and what the guest's set-up and the
// waits after Make need. checkLayout holds a strategy to it.
type Layout struct {
	Spec   libvirt.Spec
	MemKiB uint64
	Report func(tm libvirt.Timings) // the progress line of the made instance
	// MAC is the ssh NIC's MAC address; "" for none.
	MAC string
	// Identity makes a restored instance's guest its own; Links are the MAC addresses of
	// its NICs whose link comes up once it has.
	Identity *guest.Identity
	Links    []string
	// Booted: the guest has finished its boot already (restored from a warm image saved
	// with systemd running, or without systemd): its state is not waited for.
	Booted string
	// Attach is the cache share's device XML, attached once the instance is restored.
	Attach string
	// DiskGrow is what a restored instance's first disk grows by after the restore (its
	// overlay is made at the warm image's size).
	DiskGrow uint64
}

// fallBackError: the strategy could not make the instance for a reason of its own (a
// warm image damaged on disk), which the next strategy does not share: the launch goes
// on with that one.
type fallBackError struct{ err error }

func (e *fallBackError) Error() string { return e.err.Error() }
func (e *fallBackError) Unwrap() error { return e.err }

// checkLayout says what of a whole layout l for the instance name lacks.
func checkLayout(l *Layout, name string) error {
	switch {
	case l == nil:
		return errors.New("laid out nothing")
	case l.Spec.Name != name:
		return fmt.Errorf("laid out the domain %q", l.Spec.Name)
	case l.Spec.DomainXML == "":
		return errors.New("laid out no domain XML")
	case l.MemKiB == 0:
		return errors.New("laid out no memory size")
	case l.Report == nil:
		return errors.New("laid out no progress line (Report)")
	}
	return nil
}

// misfit says why a strategy does not fit a request; warn: it was meant to (the
// operator should look), not merely unable to (a size, a cache share).
type misfit struct {
	why  string
	warn bool
}

// registration is a strategy known by its value of LIBVIRT_GCI_START: how to make it
// for a host, and the value of the one tried where it does not fit ("": none).
type registration struct {
	make func(h *Host) Strategy
	next string
}

var (
	registered = map[string]registration{}
	startOrder []string
)

// registerStrategy makes the strategy mk makes the value name of LIBVIRT_GCI_START, next
// the one tried where it does not fit a request. Each strategy's file registers it.
func registerStrategy(name, next string, mk func(h *Host) Strategy) {
	if _, dup := registered[name]; dup {
		panic("launch strategy " + name + " registered twice")
	}
	registered[name] = registration{make: mk, next: next}
	startOrder = append(startOrder, name)
}

// StartValues are the valid values of LIBVIRT_GCI_START: the registered strategies.
func StartValues() []string { return slices.Clone(startOrder) }

// strategies are the ways this host starts instances, the preferred first; a cold boot
// where Start names none (a Host made without settings).
func (h *Host) strategies() []Strategy {
	var out []Strategy
	first := h.Start
	if _, ok := registered[first]; !ok {
		first = StartBoot
	}
	for n := first; n != "" && len(out) < len(registered); n = registered[n].next {
		r, ok := registered[n]
		if !ok {
			break
		}
		out = append(out, r.make(h))
	}
	return out
}

// planWith lays p's instance out with s, into p.Layout; a layout that is not whole is
// the strategy's error, not the job's.
func (h *Host) planWith(ctx context.Context, conn *libvirt.Conn, s Strategy, p *plan) (*misfit, error) {
	l, m, err := s.Plan(ctx, conn, p)
	if err != nil || m != nil {
		return m, err
	}
	if err := checkLayout(l, p.Name); err != nil {
		return nil, fmt.Errorf("launch strategy %s: %w", s.Name(), err)
	}
	p.Layout = *l
	return nil, nil
}

// plan is one launch's own data: the request, and what its steps found and laid out.
type plan struct {
	Request
	tmplXML   string
	tmpl      *template.Template
	prepareID string // random, in the metadata: a rollback removes only this launch's
	helper    string // the helper's volume; "" for none
	// warmImage: the instance is the one a warm image of this name is saved from
	// (makeWarm): its volumes are named by the image, and extra lists its save volume.
	warmImage string
	extra     []meta.Volume
	// warmFrom: the warm image the instance is restored from.
	warmFrom string
	// shareMemory: the guest's memory is shared even without a share (a warm image's
	// whose instances get their cache share after the restore).
	shareMemory bool
	// firstDisk is the capacity of the template's first disk where the job asks a size
	// of its own.
	firstDisk uint64
	// Layout is what the chosen strategy laid out (planWith).
	Layout
}

// Launch makes the instance req asks for, starts it and waits until the guest is ready
// for the job. Whatever fails, it removes what it made, and only that: after a cancel
// too, for up to AfterCancel once libvirt has answered the call in flight.
func (h *Host) Launch(ctx context.Context, req Request) (err error) {
	begin := time.Now()
	conn, err := h.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	defer func() {
		if err != nil && ctx.Err() == nil && !errors.Is(err, libvirt.ErrLost) && conn.LostBy(err) {
			// Whichever call libvirtd's restart cut short (a look-up, a define, the
			// agent's, the set-up's): that is why. Later calls on the connection fail
			// with go-libvirt's "invalid argument".
			err = fmt.Errorf("%w: %v", libvirt.ErrLost, err)
		}
	}()
	after, cancelAfter := lingeringPast(ctx, conn, AfterCancel)
	defer cancelAfter()
	p, err := h.begin(ctx, conn, req)
	if err != nil {
		return err
	}
	tm, undo, err := h.chooseAndMake(ctx, after, conn, p)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			undo()
		}
	}()
	p.Report(tm)
	if err := h.awaitReady(ctx, conn, p, begin); err != nil {
		return fmt.Errorf("instance %q: %w", req.Name, err)
	}
	return h.markReady(conn, p, time.Since(begin))
}

// markReady records in p's instance's metadata that its prepare made it ready: from
// then on only its runner's end, or its age, makes it an orphan. It records how long
// the launch took, too.
func (h *Host) markReady(conn *libvirt.Conn, p *plan, took time.Duration) error {
	in, err := conn.Lookup(p.Name)
	if err != nil {
		return fmt.Errorf("instance %q: %w", p.Name, err)
	}
	if in.Metadata.PrepareID != p.prepareID {
		return fmt.Errorf("instance %q was replaced meanwhile", p.Name)
	}
	in.Metadata.ReadyAt = time.Now().UTC().Format(time.RFC3339)
	in.Metadata.PrepareMS = max(1, took.Milliseconds())
	return conn.SetMetadata(p.Name, in.Metadata)
}

// begin takes the steps every strategy needs first: orphans of crashed runners swept
// (they may hold the room this one needs), the template found and checked, a leftover
// of the name removed if it is the caller's, the disk size checked, the helper's volume
// made.
func (h *Host) begin(ctx context.Context, conn *libvirt.Conn, req Request) (*plan, error) {
	if err := h.sweep(ctx, conn); err != nil {
		return nil, err
	}
	tx, tmpl, err := h.template(ctx, conn, req)
	if err != nil {
		return nil, err
	}
	p := &plan{Request: req, tmplXML: tx, tmpl: tmpl, prepareID: randomHex(8)}
	// A crash can leave an instance of this name behind: the caller's is removed, anyone
	// else's left alone.
	removed, err := conn.Teardown(ctx, req.Name, req.Replace)
	if errors.Is(err, libvirt.ErrNotManaged) {
		return nil, fmt.Errorf("a domain named %q exists and was not created by libvirt-gci; refusing to replace it", req.Name)
	}
	if err != nil {
		return nil, fmt.Errorf("remove leftover instance %q: %w", req.Name, err)
	}
	if removed.Domain {
		h.Log.Info(fmt.Sprintf("removed leftover instance %s", req.Name))
	}
	if req.Size.Disk > 0 && len(tmpl.Disks) > 0 {
		if have, known, err := conn.BackingCapacity(tmpl.Disks[0].Path); err != nil {
			return nil, err
		} else if known && req.Size.Disk < have {
			return nil, &DiskTooSmallError{Asked: req.Size.Disk, Have: have}
		} else {
			p.firstDisk = have
		}
	}
	if req.Helper != "" {
		// Bounded like the other waits: another prepare may be building it.
		hctx, cancel := h.bootTimeout(ctx)
		p.helper, err = h.helperVolume(hctx, conn, req.Helper)
		cancel()
		if err != nil {
			return nil, err
		}
	}
	return p, nil
}

// choose plans p with the first strategy that fits it, and says why each one before it
// did not.
func (h *Host) choose(ctx context.Context, conn *libvirt.Conn, p *plan) (Strategy, error) {
	ss := h.strategies()
	for i, s := range ss {
		m, err := h.planWith(ctx, conn, s, p)
		if err != nil {
			return nil, err
		}
		if m == nil {
			return s, nil
		}
		if i+1 == len(ss) {
			return nil, fmt.Errorf("no way to start %s: %s", p.Name, m.why)
		}
		next := ss[i+1]
		if m.warn {
			h.Log.Warn(fmt.Sprintf("%s; %s %s instead (LIBVIRT_GCI_START=%s says so at once)", m.why, next.Doing(), p.Name, next.Name()))
		} else {
			h.Log.Info(fmt.Sprintf("%s %s: %s", next.Doing(), p.Name, m.why))
		}
	}
	return nil, errors.New("no launch strategy configured")
}

// chooseAndMake makes p's instance with the first strategy that can (choose,
// admitAndMake); where that one's make fails for a reason of its own (fallBackError),
// with the next.
func (h *Host) chooseAndMake(ctx, after context.Context, conn *libvirt.Conn, p *plan) (libvirt.Timings, func(), error) {
	s, err := h.choose(ctx, conn, p)
	if err != nil {
		return libvirt.Timings{}, nil, err
	}
	tm, undo, err := h.admitAndMake(ctx, after, conn, s, p)
	var fb *fallBackError
	if !errors.As(err, &fb) || ctx.Err() != nil {
		return tm, undo, err
	}
	ss := h.strategies()
	i := slices.IndexFunc(ss, func(o Strategy) bool { return o.Name() == s.Name() })
	if i < 0 || i+1 == len(ss) {
		return tm, undo, err
	}
	next := ss[i+1]
	h.Log.Warn(fmt.Sprintf("%v; %s %s instead", err, next.Doing(), p.Name))
	p.Layout = Layout{}
	if m, err := h.planWith(ctx, conn, next, p); err != nil || m != nil {
		if m != nil {
			err = fmt.Errorf("no way to start %s: %s", p.Name, m.why)
		}
		return libvirt.Timings{}, nil, err
	}
	return h.admitAndMake(ctx, after, conn, next, p)
}

// admitAndMake admits p's instance under the host's capacity (waiting for room within
// the boot timeout) and makes it with s. From then on a failure leaves something to
// remove: undo removes what this launch made, and nothing another launch of the same
// name made meanwhile, on a connection of its own, within after. admitAndMake undoes a
// make that fails itself; its caller undoes one whose later steps fail.
func (h *Host) admitAndMake(ctx, after context.Context, conn *libvirt.Conn, s Strategy, p *plan) (libvirt.Timings, func(), error) {
	d := demand{memKiB: p.MemKiB}
	if h.Limits.checksDisk() {
		disk, err := conn.Capacity(p.Spec.Volumes)
		if err != nil {
			return libvirt.Timings{}, nil, err
		}
		d.disk = disk + p.DiskGrow
	}
	actx, cancel := h.bootTimeout(ctx)
	release, err := h.admit(actx, conn, d)
	cancel()
	if err != nil {
		return libvirt.Timings{}, nil, err
	}
	var once sync.Once
	unlock := release
	release = func() { once.Do(unlock) }
	if h.Limits.Instances == 0 && h.Limits.MemoryTotal == 0 {
		// The disk room alone counts an instance once its volumes are made, running or
		// not: the next launch need not wait for this one's start (a restore's second).
		p.Spec.Made = release
	}
	undo := func() { h.rollback(after, p.Name, p.prepareID) }
	tm, err := s.Make(ctx, conn, p)
	release()
	h.warnIfSlow("define", p.Name, tm.Define)
	if err != nil {
		undo()
		return tm, nil, err
	}
	return tm, undo, nil
}
