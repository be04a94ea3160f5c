package provision

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// Adding a launch strategy is one file and one registration (README, Development). This
// test's two follow that recipe: "twice", a cold boot that says so in its own line, and
// "forgetful", which lays out no progress line.
func init() {
	registerStrategy("twice", StartBoot, func(h *Host) Strategy { return twice{coldBoot{h}} })
	registerStrategy("forgetful", "", func(h *Host) Strategy { return forgetful{coldBoot{h}} })
}

type twice struct{ coldBoot }

func (twice) Name() string { return "twice" }
func (t twice) Plan(ctx context.Context, conn *libvirt.Conn, p *plan) (*Layout, *misfit, error) {
	l, m, err := t.coldBoot.Plan(ctx, conn, p)
	if l != nil {
		l.Report = func(libvirt.Timings) { t.h.Log.Info("booted " + p.Name + " the twice way") }
	}
	return l, m, err
}

type forgetful struct{ coldBoot }

func (forgetful) Name() string { return "forgetful" }
func (f forgetful) Plan(ctx context.Context, conn *libvirt.Conn, p *plan) (*Layout, *misfit, error) {
	l, m, err := f.coldBoot.Plan(ctx, conn, p)
	if l != nil {
		l.Report = nil
	}
	return l, m, err
}

// A registered strategy is a value of LIBVIRT_GCI_START and launches; one whose layout
// is not whole fails its launch with a line that names it, having made nothing, where
// it would have panicked at the progress line.
func TestRegisteredStrategies(t *testing.T) {
	t.Parallel()
	assert.Subset(t, StartValues(), []string{StartBoot, StartRestore, "twice", "forgetful"})
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	h.Start = "twice"
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	assert.Contains(t, log.String(), "booted gci-a the twice way")
	assert.Equal(t, []string{"twice", StartBoot}, names(h.strategies()), "then what it names next")

	h.Start = "forgetful"
	err := h.Launch(context.Background(), launchReq("gci-b"))
	require.Error(t, err)
	assert.Equal(t, "launch strategy forgetful: laid out no progress line (Report)", err.Error())
	_, err = NewConn(f).Lookup("gci-b")
	assert.ErrorIs(t, err, libvirt.ErrNoInstance, "nothing made")
}

func names(ss []Strategy) []string {
	var out []string
	for _, s := range ss {
		out = append(out, s.Name())
	}
	return out
}

// Each layout part a launch needs is checked.
func TestCheckLayout(t *testing.T) {
	t.Parallel()
	whole := Layout{Spec: libvirt.Spec{Name: "gci-a", DomainXML: "<domain/>"}, MemKiB: 1, Report: func(libvirt.Timings) {}}
	require.NoError(t, checkLayout(&whole, "gci-a"))
	for want, edit := range map[string]func(l *Layout){
		"laid out the domain \"gci-b\"":      func(l *Layout) { l.Spec.Name = "gci-b" },
		"laid out no domain XML":             func(l *Layout) { l.Spec.DomainXML = "" },
		"laid out no memory size":            func(l *Layout) { l.MemKiB = 0 },
		"laid out no progress line (Report)": func(l *Layout) { l.Report = nil },
	} {
		l := whole
		edit(&l)
		assert.EqualError(t, checkLayout(&l, "gci-a"), want)
	}
	assert.EqualError(t, checkLayout(nil, "gci-a"), "laid out nothing")
}
