package provision

import (
	"context"
	"fmt"
	"strings"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// StartBoot is LIBVIRT_GCI_START's value for a cold boot, every time.
const StartBoot = "boot"

func init() { registerStrategy(StartBoot, "", func(h *Host) Strategy { return coldBoot{h} }) }

// coldBoot clones the template into overlays and a new domain and boots it: the
// strategy that fits every request.
type coldBoot struct{ h *Host }

func (coldBoot) Name() string  { return StartBoot }
func (coldBoot) Doing() string { return "booting" }

// Plan lays out one overlay per writable template disk, the metadata that records them,
// and the domain XML.
func (b coldBoot) Plan(_ context.Context, _ *libvirt.Conn, p *plan) (*Layout, *misfit, error) {
	h := b.h
	l := &Layout{}
	if h.needsSSH(p.Request) {
		l.MAC = template.NewMAC()
	}
	im := h.newMetadata(p.Request, p.tmpl.Name, p.prepareID)
	spec := libvirt.Spec{Name: p.Name}
	overlays := map[string]template.Overlay{}
	for _, d := range p.tmpl.Disks {
		// The prepare's id in the volume's name: no other launch's volume can be in the way.
		v := libvirt.NewVolume{
			Volume:        meta.Volume{Pool: h.Pool, Name: p.Name + "-" + p.prepareID[:6] + "-" + d.Target + ".qcow2"},
			BackingPath:   d.Path,
			BackingFormat: d.Format,
		}
		if len(spec.Volumes) == 0 {
			v.Capacity = p.Size.Disk // the first disk: the one a job may grow
		}
		if p.warmImage != "" {
			v.Name = p.warmImage + "-" + d.Target + ".qcow2"
		}
		spec.Volumes = append(spec.Volumes, v)
		im.Volumes = append(im.Volumes, v.Volume)
		overlays[d.Target] = template.Overlay{Pool: v.Pool, Volume: v.Name}
	}
	im.Volumes = append(im.Volumes, p.extra...)
	md, err := im.MarshalElement()
	if err != nil {
		return nil, nil, err
	}
	inst := template.Instance{Name: p.Name, Overlays: overlays, Metadata: md, CPUs: p.Size.CPUs, MemoryKiB: p.Size.Memory / 1024, Warm: p.warmImage != "", SharedMemory: p.shareMemory}
	if p.helper != "" {
		inst.ReadOnly = []template.ReadOnlyDisk{{Pool: h.Pool, Volume: p.helper, Serial: HelperSerial}}
	}
	if p.Cache != "" {
		inst.Shares = []template.Share{{Source: p.Cache, Tag: CacheTag}}
	}
	if l.MAC != "" {
		slot, err := p.tmpl.FreePCISlot()
		if err != nil {
			return nil, nil, err
		}
		inst.QEMUArgs = sshNetArgs(slot, l.MAC)
	}
	if spec.DomainXML, err = p.tmpl.Render(inst); err != nil {
		return nil, nil, err
	}
	l.Spec = spec
	l.MemKiB = p.tmpl.MemoryKiB()
	if p.Size.Memory > 0 {
		l.MemKiB = p.Size.Memory / 1024
	}
	l.Report = func(tm libvirt.Timings) { b.report(p, tm) }
	return l, nil, nil
}

// Make defines the domain, creates its overlays and boots it.
func (coldBoot) Make(ctx context.Context, conn *libvirt.Conn, p *plan) (libvirt.Timings, error) {
	return conn.Create(ctx, p.Spec)
}

func (b coldBoot) report(p *plan, tm libvirt.Timings) {
	sized := ""
	if p.Size != (Size{}) {
		sized = " (" + p.Size.String() + ")"
	}
	b.h.Log.Info(fmt.Sprintf("cloned %s into %s%s in %d ms (define %d ms, %d overlays %d ms%s), started in %d ms",
		p.Template, p.Name, sized, (tm.Define+tm.Clone+tm.Reserve).Milliseconds(), tm.Define.Milliseconds(), len(p.Spec.Volumes), tm.Clone.Milliseconds(), reserved(tm), tm.Start.Milliseconds()),
		"template", p.Template, "name", p.Name, "define_ms", tm.Define.Milliseconds(), "clone_ms", tm.Clone.Milliseconds(), "start_ms", tm.Start.Milliseconds(),
		"reserve_ms", tm.Reserve.Milliseconds(),
		"cpus", p.Size.CPUs, "memory", p.Size.Memory, "disk", p.Size.Disk)
}

// reserved says, for a launch's line, which addresses its NICs were given on their
// networks (libvirt.Reserve), and how long that took; "" where none were.
func reserved(tm libvirt.Timings) string {
	if len(tm.Addresses) == 0 {
		return ""
	}
	var on []string
	for _, a := range tm.Addresses {
		on = append(on, a.IP+" on "+a.Network)
	}
	return fmt.Sprintf(", address %s reserved in %d ms", strings.Join(on, ", "), tm.Reserve.Milliseconds())
}
