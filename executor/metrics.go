package executor

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// Metrics writes the hosts' state in Prometheus's text format: to the file output for
// node_exporter's textfile collector (written whole, then renamed into place, so the
// collector never reads half of it), or to stdout. A host that does not answer is
// written as libvirt_gci_up 0, and Metrics fails after writing, naming it.
func (e *Executor) Metrics(ctx context.Context, output string) error {
	// Every host at once, each bounded (ProbeTime): a libvirtd that stops answering is a
	// host down, not a timer that hangs.
	hs := e.hosts()
	got, errs := provision.Probe(ctx, hs, func(h *provision.Host, conn *provision.Conn) (provision.Inventory, error) {
		return h.Inventory(conn)
	}, nil)
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	var invs []hostInventory
	var down []error
	for i, h := range hs {
		got[i].URI = h.URI
		invs = append(invs, hostInventory{Inventory: got[i], Up: errs[i] == nil})
		if errs[i] != nil {
			down = append(down, fmt.Errorf("%s: %w", provision.PublicURI(h.URI), errs[i]))
		}
	}
	reg := metricsOf(invs, time.Now())
	if output != "" {
		if err := prometheus.WriteToTextfile(output, reg); err != nil {
			return fmt.Errorf("write metrics to %s: %w", output, err)
		}
	} else {
		mfs, err := reg.Gather()
		if err != nil {
			return fmt.Errorf("gather metrics: %w", err)
		}
		enc := expfmt.NewEncoder(e.Stdout, expfmt.NewFormat(expfmt.TypeTextPlain))
		for _, mf := range mfs {
			if err := enc.Encode(mf); err != nil {
				return fmt.Errorf("write metrics: %w", err)
			}
		}
	}
	if len(down) > 0 {
		return fmt.Errorf("metrics: %w", errors.Join(down...))
	}
	return nil
}

// hostInventory is a host's inventory, if it answered (Up).
type hostInventory struct {
	provision.Inventory
	Up bool
}

// metricName is an instance's name in the metrics: its name without its project's path
// (the prefix, the job id and the hash), as node_exporter serves the file to whoever
// reaches the host, guests at their gateway included, and a project's path may be
// private. A manual instance's name is its own.
func metricName(in provision.Instance) string {
	o := in.Metadata.Owner
	job := slug(o.JobID)
	i, h := strings.Index(in.Name, job), strings.LastIndex(in.Name, "-")
	if o.Manual || job == "" || i < 0 || h < i+len(job) {
		return in.Name
	}
	return in.Name[:i+len(job)] + in.Name[h:]
}

// metricsOf is the registry of the hosts' inventories at now. An instance two URIs reach
// (one libvirt twice) is counted once, as `list` shows it.
func metricsOf(invs []hostInventory, now time.Time) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	g := newGauges(reg)
	first := firstSeen()
	for _, inv := range invs {
		host := provision.PublicURI(inv.URI)
		if !inv.Up {
			g.up.WithLabelValues(host).Set(0)
			continue
		}
		g.up.WithLabelValues(host).Set(1)
		nkept := 0
		for _, in := range inv.Instances {
			if first(in) && g.instance(host, in, now) {
				nkept++
			}
		}
		g.host(host, inv, nkept)
	}
	return reg
}

// gauges are the metrics' gauges, registered.
type gauges struct {
	up, instances, age, prepare, ending, kept, keptLimit, warm, warmBytes, warmUsers *prometheus.GaugeVec
	inUse, inUseLimit, mem, memLimit, poolActive, poolCap, poolAvail                 *prometheus.GaugeVec
}

func newGauges(reg *prometheus.Registry) *gauges {
	gauge := func(name, help string, labels ...string) *prometheus.GaugeVec {
		g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "libvirt_gci_" + name, Help: help}, labels)
		reg.MustRegister(g)
		return g
	}
	return &gauges{
		up: gauge("up", "1 if the libvirt of LIBVIRT_GCI_URI answered, else 0.", "host"),
		instances: gauge("instances", "Managed instances (domains with libvirt-gci's metadata), by libvirt state, phase in their job's life and template; they add up to what `libvirt-gci list` shows.",
			"host", "state", "phase", "template"),
		age: gauge("instance_age_seconds", "Seconds since each instance's prepare made it.", "host", "instance", "template", "phase"),
		prepare: gauge("instance_prepare_seconds", "How long each instance's prepare took, from its start to a ready guest, as its metadata recorded it.",
			"host", "instance", "template", "start"),
		ending: gauge("instance_ending_seconds", "Seconds since its job's cleanup paused each ending instance and left its removal to its finisher (gc removes it after 3 minutes).",
			"host", "instance"),
		kept:       gauge("kept_instances", "VMs kept after their job failed (LIBVIRT_GCI_KEEP_FAILED).", "host"),
		keptLimit:  gauge("kept_instances_limit", "LIBVIRT_GCI_KEEP_FAILED_MAX: kept VMs at most.", "host"),
		warm:       gauge("warm_images", "Complete warm images in the instance pool.", "host"),
		warmBytes:  gauge("warm_image_bytes", "Bytes on disk of each warm image's volumes (overlays, memory image, mark).", "host", "image"),
		warmUsers:  gauge("warm_image_instances", "Instances restored from each warm image that are still there.", "host", "image"),
		inUse:      gauge("capacity_instances", "Running instances of LIBVIRT_GCI_PREFIX that count against LIBVIRT_GCI_MAX_INSTANCES (ending ones do not).", "host"),
		inUseLimit: gauge("capacity_instances_limit", "LIBVIRT_GCI_MAX_INSTANCES, where set.", "host"),
		mem:        gauge("capacity_memory_bytes", "Memory of the instances that count against LIBVIRT_GCI_MAX_MEMORY_TOTAL.", "host"),
		memLimit:   gauge("capacity_memory_limit_bytes", "LIBVIRT_GCI_MAX_MEMORY_TOTAL, where set.", "host"),
		poolActive: gauge("pool_active", "1 if the instance pool (LIBVIRT_GCI_POOL) is there and active, else 0.", "host", "pool"),
		poolCap:    gauge("pool_capacity_bytes", "The instance pool's capacity.", "host", "pool"),
		poolAvail:  gauge("pool_available_bytes", "Bytes free in the instance pool.", "host", "pool"),
	}
}

// instance sets the gauges of the instance in on host; it says whether in is kept.
func (g *gauges) instance(host string, in provision.Instance, now time.Time) (kept bool) {
	m := in.Metadata
	phase := m.Phase()
	g.instances.WithLabelValues(host, in.State, phase, m.Template).Inc()
	if t, err := time.Parse(time.RFC3339, m.CreatedAt); err == nil {
		g.age.WithLabelValues(host, metricName(in), m.Template, phase).Set(now.Sub(t).Seconds())
	}
	if m.PrepareMS > 0 {
		start := provision.StartBoot
		if m.Warm != "" {
			start = provision.StartRestore
		}
		g.prepare.WithLabelValues(host, metricName(in), m.Template, start).Set(float64(m.PrepareMS) / 1000)
	}
	if t, err := time.Parse(time.RFC3339, m.EndingAt); err == nil {
		g.ending.WithLabelValues(host, metricName(in)).Set(now.Sub(t).Seconds())
	}
	return phase == meta.PhaseKept
}

// host sets the host's own gauges: kept VMs, warm images, capacity and the pool.
func (g *gauges) host(host string, inv hostInventory, nkept int) {
	g.kept.WithLabelValues(host).Set(float64(nkept))
	if inv.Limits.Kept > 0 {
		g.keptLimit.WithLabelValues(host).Set(float64(inv.Limits.Kept))
	}
	g.warm.WithLabelValues(host).Set(float64(len(inv.Warm)))
	for _, w := range inv.Warm {
		g.warmBytes.WithLabelValues(host, w.Name).Set(float64(w.Bytes))
		g.warmUsers.WithLabelValues(host, w.Name).Set(float64(w.Users))
	}
	g.inUse.WithLabelValues(host).Set(float64(inv.InUse.Instances))
	g.mem.WithLabelValues(host).Set(float64(inv.InUse.MemoryBytes))
	if inv.Limits.Instances > 0 {
		g.inUseLimit.WithLabelValues(host).Set(float64(inv.Limits.Instances))
	}
	if inv.Limits.MemoryTotal > 0 {
		g.memLimit.WithLabelValues(host).Set(float64(inv.Limits.MemoryTotal))
	}
	active := 0.0
	if inv.Pool.Found && inv.Pool.Active {
		active = 1
		g.poolCap.WithLabelValues(host, inv.Pool.Name).Set(float64(inv.Pool.Capacity))
		g.poolAvail.WithLabelValues(host, inv.Pool.Name).Set(float64(inv.Pool.Available))
	}
	g.poolActive.WithLabelValues(host, inv.Pool.Name).Set(active)
}
