package executor

import (
	"context"
	"errors"
	"fmt"
	"text/tabwriter"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

// MarkTemplates marks the named domains as templates jobs may clone, or takes the mark
// away. This is the operator's: it is never run by a stage. With several hosts it marks
// the domain on each host that has it; a name no host has is an error.
func (e *Executor) MarkTemplates(ctx context.Context, names []string, mark bool) error {
	if len(names) == 0 {
		return &InputError{"no domain named: usage: libvirt-gci template mark|unmark NAME..."}
	}
	for _, n := range names {
		if err := checkTemplateName(n); err != nil {
			return err
		}
	}
	hs := e.hosts()
	found := map[string]bool{}
	err := hs.Each(ctx, e.Log, true, func(h *provision.Host) error {
		return e.markOn(ctx, h, names, mark, len(hs) > 1, found)
	})
	errs := []error{err}
	for _, n := range names {
		if !found[n] && len(hs) > 1 {
			errs = append(errs, fmt.Errorf("no host of LIBVIRT_GCI_URI has a domain named %q", n))
		}
	}
	return errors.Join(errs...)
}

// markOn marks (or unmarks) names on h; with several hosts, a domain a host lacks is
// skipped. found records the names it marked.
func (e *Executor) markOn(ctx context.Context, h *provision.Host, names []string, mark, several bool, found map[string]bool) error {
	conn, err := h.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	on := ""
	if several {
		on = " on " + h.URI
	}
	for _, n := range names {
		err := conn.MarkTemplate(n, mark)
		if several && errors.Is(err, provision.ErrNoTemplate) {
			continue
		}
		if err != nil {
			return err
		}
		found[n] = true
		if mark {
			e.Log.Info(fmt.Sprintf("marked %s as a template%s: jobs may clone it", n, on))
		} else {
			e.Log.Info(fmt.Sprintf("unmarked %s%s", n, on))
		}
	}
	return nil
}

// ListTemplates prints every defined domain that is not an instance, and whether jobs
// may clone it.
// With several hosts, each host's list follows a line naming it; a host that is down is
// skipped with a line saying so, as list does.
func (e *Executor) ListTemplates(ctx context.Context) error {
	hs := e.hosts()
	return hs.Each(ctx, e.Log, false, func(h *provision.Host) error {
		if len(hs) == 1 {
			return e.listOn(ctx, h)
		}
		fmt.Fprintf(e.Stdout, "# %s\n", h.URI)
		pctx, cancel := context.WithTimeout(ctx, provision.ProbeTime)
		defer cancel()
		return e.listOn(pctx, h)
	})
}

func (e *Executor) listOn(ctx context.Context, h *provision.Host) error {
	conn, err := h.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	list, err := conn.Templates()
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(e.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tSTATE\tJOBS MAY CLONE IT")
	for _, t := range list {
		state := "shut off"
		if !t.Shutoff {
			state = "running"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\n", t.Name, state, e.offered(t))
	}
	bases, err := h.BaseImageNames(conn)
	if err != nil {
		return err
	}
	for _, n := range bases {
		fmt.Fprintf(w, "%s\t%s\t%s\n", n, "base image", "yes (in LIBVIRT_GCI_BASE_IMAGES)")
	}
	return w.Flush()
}

func (e *Executor) offered(t provision.TemplateInfo) string {
	why := ""
	switch {
	case t.Marked:
		why = "yes (marked)"
	case e.Settings.listed(t.Name):
		why = "yes (LIBVIRT_GCI_TEMPLATES)"
	default:
		return "no"
	}
	if !t.Shutoff {
		why += ", once shut off"
	}
	return why
}

// WarmTemplate makes the warm image of the template name that prepare restores
// instances from (LIBVIRT_GCI_START=restore), for the transport and forwards set, if it
// has none that is up to date. The runner's gitlab-runner helper (auto) is the one on
// PATH, as the runner's own would be.
func (e *Executor) WarmTemplate(ctx context.Context, name string) error {
	if err := checkTemplateName(name); err != nil {
		return err
	}
	helper, _ := e.Settings.hostRunnerBinary()
	// Every host's own image, one after the other.
	return e.hosts().Each(ctx, e.Log, true, func(h *provision.Host) error {
		_, err := h.Warm(ctx, name, e.Settings.Transport, helper, e.Settings.CacheDir != "")
		return err
	})
}

// CheckTemplate prints, check by check, whether the domain name is usable as a
// template, with a hint for each failure; with boot, it then boots a throwaway clone to
// a ready guest (and ssh, with that transport) and says how long that took. It fails if
// any check does. With several hosts, it checks on the first.
func (e *Executor) CheckTemplate(ctx context.Context, name string, boot bool) error {
	if err := checkTemplateName(name); err != nil {
		return err
	}
	h := e.host()
	checks, err := h.CheckTemplate(ctx, name, e.Settings.listed(name))
	if err != nil {
		return err
	}
	failed := 0
	for _, c := range checks {
		if c.Status == provision.FindingOK {
			fmt.Fprintf(e.Stdout, "ok    %s\n", c.Check)
			continue
		}
		failed++
		fmt.Fprintf(e.Stdout, "FAIL  %s: %s\n", c.Check, c.Fix)
	}
	if failed > 0 {
		return &InputError{fmt.Sprintf("%s is not usable as a template: %d of %d checks failed", name, failed, len(checks))}
	}
	if boot {
		took, err := h.TryBoot(ctx, name, e.Settings.Transport)
		if err != nil {
			fmt.Fprintf(e.Stdout, "FAIL  a throwaway clone boots to a ready guest (%s): %v\n", e.Settings.Transport, err)
			return &InputError{fmt.Sprintf("%s is not usable as a template: a clone did not boot: %v", name, err)}
		}
		fmt.Fprintf(e.Stdout, "ok    a throwaway clone booted to a ready guest (%s) in %.1f s\n", e.Settings.Transport, took.Seconds())
	}
	return nil
}

// MakeTemplate turns the domain name, a VM prepared by hand, into a template (its
// identity reset, shut down, marked): the operator's, never a stage's.
func (e *Executor) MakeTemplate(ctx context.Context, name string) error {
	if err := checkTemplateName(name); err != nil {
		return err
	}
	return e.host().MakeTemplate(ctx, name)
}
