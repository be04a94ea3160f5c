package provision

import (
	"cmp"
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt/dial"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// Doctor's findings: each is one line, ok, a note (worth knowing, not in the way), or a
// problem with its fix.
const (
	FindingOK      = "ok"
	FindingNote    = "note"
	FindingProblem = "problem"
)

// Finding is one line of `doctor`.
type Finding struct {
	Check  string `json:"check"`
	Status string `json:"status"`
	Detail string `json:"detail,omitempty"` // what was found
	Fix    string `json:"fix,omitempty"`    // what to do about a problem, or a note
}

// DoctorRequest is what the host's checks need of the operator's settings.
type DoctorRequest struct {
	Offered   func(name string, marked bool) bool // whether jobs may clone the template name
	Boot      bool                                // boot a throwaway clone of each template
	Transport string
	Helper    string // the gitlab-runner helper's path; "" for none
	Shares    bool   // a cache share is set: warm images share the guest's memory
	MaxCPUs   int    // the most CPUs a job may ask for; 0: the template's
	MaxMemory uint64 // bytes; 0: the template's
	MaxDisk   uint64 // bytes: the first disk a job may ask for (LIBVIRT_GCI_MAX_DISK); 0: the template's
}

// Doctor checks the host for jobs, without changing anything of the jobs' (a define
// probe comes and goes): libvirt reachable and fast, KVM, the instance pool and its room,
// each template offered, its warm image, and the capacity settings against the host.
//
// Each part is bounded: the checks by ProbeTime, each clone's boot by BootTimeout; a
// libvirtd that stops answering is a problem found, not a doctor that hangs.
func (h *Host) Doctor(ctx context.Context, req DoctorRequest) []Finding {
	out, good := h.doctorChecks(ctx, req)
	if req.Boot {
		for i, t := range good {
			bctx, cancel := context.WithTimeout(ctx, h.BootTimeout+teardownTime)
			took, err := h.TryBoot(bctx, t.name, req.Transport)
			cancel()
			if err != nil {
				out = append(out, Finding{Check: "a clone of " + t.name + " boots", Status: FindingProblem, Detail: err.Error(),
					Fix: "libvirt-gci template check --boot " + t.name + " says more; see Templates in README.rst"})
				continue
			}
			good[i].boot = took
			out = append(out, Finding{Check: "a clone of " + t.name + " boots", Status: FindingOK, Detail: fmt.Sprintf("to a ready guest in %.1f s", took.Seconds())})
		}
	}
	if h.Start != StartRestore || len(good) == 0 {
		return out
	}
	wctx, cancel := context.WithTimeoutCause(ctx, ProbeTime, fmt.Errorf("no answer within %s", ProbeTime))
	defer cancel()
	conn, err := h.Connect(wctx)
	if err != nil {
		return append(out, Finding{Check: "warm images", Status: FindingProblem, Detail: err.Error(), Fix: "check libvirtd's log"})
	}
	defer conn.Close()
	for _, t := range good {
		out = append(out, h.doctorWarm(wctx, conn, t.name, req, t.boot))
	}
	return out
}

// doctorState is what the host's checks share: the connection, the request, and what
// earlier checks found that later ones need.
type doctorState struct {
	conn         *libvirt.Conn
	req          DoctorRequest
	kvmBroken    bool             // libvirt offers KVM, and no guest ran under it
	templates    []doctorTemplate // the templates that passed their checks
	tmplFindings []Finding        // theirs, said after the pool's
}

// doctorCheck is one named check of a host: what it finds, given what the checks
// before it found. Adding one is an entry in hostChecks.
type doctorCheck struct {
	name string
	run  func(h *Host, ctx context.Context, st *doctorState) []Finding
}

// hostChecks are a host's checks, in order, after its libvirt answered; each is bounded
// by ProbeTime with the rest (a libvirtd that stops answering ends them, said once).
var hostChecks = []doctorCheck{
	{"a define and undefine", func(h *Host, _ context.Context, st *doctorState) []Finding {
		const check = "a define and undefine"
		took, err := h.probeDefine(st.conn)
		switch {
		case err != nil:
			return []Finding{{Check: check, Status: FindingProblem, Detail: err.Error(), Fix: "libvirtd must be able to define domains for this user: check its log"}}
		case took >= libvirt.SlowCall:
			return []Finding{{Check: check, Status: FindingProblem, Detail: fmt.Sprintf("took %.1f s; want milliseconds", took.Seconds()), Fix: libvirt.SlowHint(h.URI)}}
		}
		return []Finding{{Check: check, Status: FindingOK, Detail: fmt.Sprintf("%d ms", took.Milliseconds())}}
	}},
	{"KVM", func(h *Host, ctx context.Context, st *doctorState) []Finding {
		out, broken := h.doctorKVM(ctx, st.conn)
		st.kvmBroken = broken
		return out
	}},
	{"templates", func(h *Host, ctx context.Context, st *doctorState) []Finding {
		st.templates, st.tmplFindings = h.doctorTemplates(ctx, st.conn, st.req)
		for _, t := range st.templates {
			if st.kvmBroken && t.kvm {
				st.tmplFindings = append(st.tmplFindings, Finding{Check: "template " + t.name, Status: FindingProblem,
					Detail: "<domain type='kvm'>, and no guest runs under KVM here: its clones would wait out the boot timeout",
					Fix:    "virsh edit " + t.name + ": <domain type='qemu'>"})
			}
		}
		return nil // said after the pool's
	}},
	{"instance pool", func(h *Host, _ context.Context, st *doctorState) []Finding {
		return h.doctorPool(st.conn, st.templates, st.req)
	}},
	{"templates' findings", func(_ *Host, _ context.Context, st *doctorState) []Finding { return st.tmplFindings }},
	{"capacity", func(h *Host, _ context.Context, st *doctorState) []Finding {
		return h.doctorCapacity(st.conn, st.templates, st.req)
	}},
	{"networks", func(h *Host, _ context.Context, st *doctorState) []Finding {
		return h.doctorNetworks(st.conn, st.templates)
	}},
}

// doctorChecks are the host's checks but the boots and the warm images, bounded by
// ProbeTime: libvirt answers, then hostChecks one by one. It returns the templates that
// passed theirs.
func (h *Host) doctorChecks(ctx context.Context, req DoctorRequest) ([]Finding, []doctorTemplate) {
	where := PublicURI(h.URI)
	ctx, cancel := context.WithTimeoutCause(ctx, ProbeTime, fmt.Errorf("no answer within %s", ProbeTime))
	defer cancel()
	start := time.Now()
	conn, err := h.Connect(ctx)
	if err != nil {
		return []Finding{{Check: "libvirt at " + where, Status: FindingProblem, Detail: err.Error(),
			Fix: "start libvirtd (systemctl start libvirtd) or correct LIBVIRT_GCI_URI"}}, nil
	}
	defer conn.Close()
	out := []Finding{{Check: "libvirt at " + where, Status: FindingOK, Detail: fmt.Sprintf("answered in %d ms", time.Since(start).Milliseconds())}}
	st := &doctorState{conn: conn, req: req}
	for _, c := range hostChecks {
		out = append(out, c.run(h, ctx, st)...)
		if ctx.Err() != nil {
			// A libvirtd that stops answering is said once, in place of what it answered
			// so far, not as a problem of every check.
			return []Finding{{Check: "libvirt at " + where, Status: FindingProblem, Detail: context.Cause(ctx).Error(),
				Fix: "check libvirtd (is it stopped, or overloaded?) and its log"}}, nil
		}
	}
	return out, st.templates
}

// probeDefine defines and undefines a throwaway domain, as prepare's define does, and
// says how long that took: a healthy libvirtd takes milliseconds.
func (h *Host) probeDefine(conn *libvirt.Conn) (time.Duration, error) {
	name := "libvirt-gci-doctor-" + randomHex(4)
	x := fmt.Sprintf("<domain type='qemu'><name>%s</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>", name)
	start := time.Now()
	if err := conn.DefineAndUndefine(x); err != nil {
		return 0, fmt.Errorf("%s: %w", name, err)
	}
	return time.Since(start), nil
}

// doctorTemplate is a template doctor found offered, and what it needs of the host.
type doctorTemplate struct {
	name      string
	memKiB    uint64
	diskBytes uint64        // what its writable disks can grow to, where libvirt knows
	boot      time.Duration // a clone's boot to a ready guest, where doctor --boot measured it
	kvm       bool          // its domain type is kvm
}

// doctorTemplates checks each template jobs may clone (CheckTemplate).
func (h *Host) doctorTemplates(ctx context.Context, conn *libvirt.Conn, req DoctorRequest) ([]doctorTemplate, []Finding) {
	var out []Finding
	list, err := conn.Templates()
	if err != nil {
		return nil, []Finding{{Check: "templates", Status: FindingProblem, Detail: err.Error(), Fix: "check libvirtd's log"}}
	}
	var names []string
	for _, t := range list {
		if req.Offered(t.Name, t.Marked) {
			names = append(names, t.Name)
		}
	}
	if bases, err := h.BaseImageNames(conn); err == nil {
		names = append(names, bases...)
	}
	if len(names) == 0 {
		return nil, []Finding{{Check: "templates", Status: FindingProblem, Detail: "jobs may clone no domain",
			Fix: "libvirt-gci template mark NAME (a shut-off VM with the guest agent), or list it in LIBVIRT_GCI_TEMPLATES"}}
	}
	var good []doctorTemplate
	for _, name := range names {
		checks, err := h.CheckTemplate(ctx, name, true)
		if err != nil {
			out = append(out, Finding{Check: "template " + name, Status: FindingProblem, Detail: err.Error(), Fix: "libvirt-gci template check " + name})
			continue
		}
		var failed, fixes []string
		for _, c := range checks {
			if c.Status != FindingOK {
				failed = append(failed, c.Check)
				fixes = append(fixes, c.Fix)
			}
		}
		if len(failed) > 0 {
			out = append(out, Finding{Check: "template " + name, Status: FindingProblem, Detail: "checks failed: " + strings.Join(failed, "; "), Fix: strings.Join(fixes, "; ")})
			continue
		}
		t := doctorTemplate{name: name}
		if tx, _, err := conn.TemplateXML(name); err == nil {
			if tmpl, err := template.Parse(tx); err == nil {
				t.memKiB, t.kvm = tmpl.MemoryKiB(), tmpl.VirtType() == "kvm"
				for _, d := range tmpl.Disks {
					if c, ok, err := conn.BackingCapacity(d.Path); err == nil && ok {
						t.diskBytes += c
					}
				}
			}
		}
		good = append(good, t)
		out = append(out, Finding{Check: "template " + name, Status: FindingOK, Detail: fmt.Sprintf("%d checks pass", len(checks))})
	}
	return good, out
}

// doctorWarm says whether the template's warm image is there, or how long the first job
// of it will wait for it to be made.
func (h *Host) doctorWarm(ctx context.Context, conn *libvirt.Conn, name string, req DoctorRequest, boot time.Duration) Finding {
	check := "warm image of " + name
	wreq := Request{Name: "warm", Template: name, Offered: true, Transport: req.Transport}
	tx, tmpl, err := h.template(ctx, conn, wreq)
	if err != nil {
		return Finding{Check: check, Status: FindingProblem, Detail: err.Error(), Fix: "libvirt-gci template check " + name}
	}
	prof := warmProfile{SSHNIC: h.needsSSH(wreq), Shares: req.Shares}
	if req.Helper != "" {
		if prof.Helper, err = helperVolumeName(req.Helper); err != nil {
			return Finding{Check: check, Status: FindingProblem, Detail: err.Error(), Fix: "set LIBVIRT_GCI_RUNNER_BINARY to a gitlab-runner binary, or none"}
		}
	}
	ws, err := h.warmState(ctx, conn, tx, tmpl, prof)
	switch {
	case ws.never != "":
		return Finding{Check: check, Status: FindingNote, Detail: "its jobs boot: " + ws.never}
	case err != nil:
		return Finding{Check: check, Status: FindingNote, Detail: err.Error() + "; its jobs boot until it is made again", Fix: "libvirt-gci template warm " + name}
	case ws.image != nil:
		return Finding{Check: check, Status: FindingOK, Detail: ws.name + " is up to date"}
	}
	wait := "a cold boot (doctor --boot measures it) and a save"
	if boot > 0 {
		wait = fmt.Sprintf("about %.0f s: a cold boot (%.1f s here) and a save", boot.Seconds()*1.3+1, boot.Seconds())
	}
	return Finding{Check: check, Status: FindingNote, Detail: "not made yet: the first job of " + name + " waits " + wait,
		Fix: "make it now: libvirt-gci template warm " + name}
}

// doctorPool checks the instance pool: there, active, and with room for a job's disks
// to grow to their full size on the largest template.
func (h *Host) doctorPool(conn *libvirt.Conn, templates []doctorTemplate, req DoctorRequest) []Finding {
	check := "instance pool " + h.Pool
	info, _, err := h.poolInfo(conn)
	switch {
	case err != nil:
		return []Finding{{Check: check, Status: FindingProblem, Detail: err.Error(), Fix: "check libvirtd's log"}}
	case !info.Found:
		return []Finding{{Check: check, Status: FindingProblem, Detail: "no such storage pool (LIBVIRT_GCI_POOL)",
			Fix: fmt.Sprintf("virsh pool-define-as %[1]s dir --target /var/lib/libvirt/images/%[1]s && virsh pool-build %[1]s && virsh pool-start %[1]s && virsh pool-autostart %[1]s", h.Pool)}}
	}
	capacity, avail := info.Capacity, info.Available
	if !info.Active {
		return []Finding{{Check: check, Status: FindingProblem, Detail: "not active",
			Fix: fmt.Sprintf("virsh pool-start %[1]s && virsh pool-autostart %[1]s", h.Pool)}}
	}
	var largest doctorTemplate
	for _, t := range templates {
		if t.diskBytes > largest.diskBytes {
			largest = t
		}
	}
	detail := fmt.Sprintf("active, %s free of %s", HumanSize(avail), HumanSize(capacity))
	// A job's disks may grow to its template's, or to the first disk it may ask for
	// (LIBVIRT_GCI_MAX_DISK) with the template's others beside it.
	grow, on := largest.diskBytes, largest.name
	if req.MaxDisk > grow {
		grow, on = req.MaxDisk+largest.diskBytes, "LIBVIRT_GCI_MAX_DISK and "+cmp.Or(largest.name, "the templates")
	}
	if grow > avail {
		return []Finding{{Check: check, Status: FindingProblem,
			Detail: fmt.Sprintf("%s; a job can grow its disks to %s (%s)", detail, HumanSize(grow), on),
			Fix:    "free space where the pool lives, or put the pool on a larger file system"}}
	}
	if grow > 0 {
		detail += fmt.Sprintf("; a job's disks grow to %s at most (%s)", HumanSize(grow), on)
	}
	// The running jobs together: when the file system under the pool fills, every VM
	// that writes gets an I/O error (their disks' error policy), another project's too.
	if n := h.Limits.Instances; n > 0 && grow > 0 && uint64(n)*grow > avail {
		return []Finding{{Check: check, Status: FindingProblem,
			Detail: fmt.Sprintf("%s; LIBVIRT_GCI_MAX_INSTANCES=%d jobs can grow their disks to %s together", detail, n, HumanSize(uint64(n)*grow)),
			Fix:    fmt.Sprintf("lower LIBVIRT_GCI_MAX_INSTANCES to %d, or LIBVIRT_GCI_MAX_DISK, or give the pool more room", avail/grow)}}
	}
	return []Finding{{Check: check, Status: FindingOK, Detail: detail}}
}

// doctorCapacity holds the capacity settings to the host's memory and CPUs.
func (h *Host) doctorCapacity(conn *libvirt.Conn, templates []doctorTemplate, req DoctorRequest) []Finding {
	memKiB, cpus, err := conn.NodeInfo()
	if err != nil {
		return []Finding{{Check: "capacity", Status: FindingProblem, Detail: err.Error(), Fix: "check libvirtd's log"}}
	}
	hostMem := memKiB * 1024
	var out []Finding
	add := func(check, status, detail, fix string) {
		out = append(out, Finding{Check: check, Status: status, Detail: detail, Fix: fix})
	}
	l := h.Limits
	var smallest uint64
	for _, t := range templates {
		if smallest == 0 || t.memKiB*1024 < smallest {
			smallest = t.memKiB * 1024
		}
	}
	switch {
	case l.MemoryTotal > hostMem:
		add("capacity", FindingProblem, fmt.Sprintf("LIBVIRT_GCI_MAX_MEMORY_TOTAL %s is more than the host's memory, %s", HumanSize(l.MemoryTotal), HumanSize(hostMem)),
			"set it below the host's memory, leaving room for the host itself")
	case l.MemoryTotal == 0 && l.Instances > 0 && smallest > 0 && uint64(l.Instances)*smallest > hostMem:
		add("capacity", FindingProblem, fmt.Sprintf("LIBVIRT_GCI_MAX_INSTANCES=%d instances of even the smallest template (%s) need %s; the host has %s",
			l.Instances, HumanSize(smallest), HumanSize(uint64(l.Instances)*smallest), HumanSize(hostMem)),
			"lower LIBVIRT_GCI_MAX_INSTANCES, or set LIBVIRT_GCI_MAX_MEMORY_TOTAL")
	case l.MemoryTotal == 0 && l.Instances == 0:
		add("capacity", FindingNote, fmt.Sprintf("no limit: as many jobs start as the runner's concurrent and limit allow (host: %s, %d CPUs)", HumanSize(hostMem), cpus),
			"set LIBVIRT_GCI_MAX_INSTANCES or LIBVIRT_GCI_MAX_MEMORY_TOTAL")
	default:
		add("capacity", FindingOK, fmt.Sprintf("limits fit the host (%s, %d CPUs)", HumanSize(hostMem), cpus), "")
	}
	if req.MaxMemory > hostMem {
		add("job sizes", FindingProblem, fmt.Sprintf("LIBVIRT_GCI_MAX_MEMORY %s is more than the host's memory, %s", HumanSize(req.MaxMemory), HumanSize(hostMem)), "lower it")
	}
	if req.MaxCPUs > int(cpus) {
		add("job sizes", FindingProblem, fmt.Sprintf("LIBVIRT_GCI_MAX_CPUS=%d is more than the host's %d CPUs", req.MaxCPUs, cpus), "lower it")
	}
	return out
}

// doctorNetworks looks at the libvirt networks the templates' NICs are on: one with a
// DHCP range gets an address reserved per instance, under the job filter; its range
// must hold MAX_INSTANCES of them. A network without one is the guests' to configure.
func (h *Host) doctorNetworks(conn *libvirt.Conn, templates []doctorTemplate) []Finding {
	var out []Finding
	seen := map[string]bool{}
	filterChecked := false
	for _, t := range templates {
		tx, _, err := conn.TemplateXML(t.name)
		if err != nil {
			continue
		}
		nets, err := libvirt.NetworksOf(tx)
		if err != nil {
			continue
		}
		for _, n := range nets {
			if seen[n] {
				continue
			}
			seen[n] = true
			check := "network " + n
			size, held, err := conn.NetworkRange(n)
			switch {
			case err != nil:
				out = append(out, Finding{Check: check, Status: FindingProblem, Detail: err.Error(), Fix: "virsh net-start " + n + " (and net-autostart), or give the template another network"})
				continue
			case size == 0:
				out = append(out, Finding{Check: check, Status: FindingNote, Detail: "no IPv4 DHCP range: no address is reserved for a job, and no network filter holds it to one",
					Fix: "the guest configures its NIC itself; for addresses at once and the filter, give the network a DHCP range"})
				continue
			case h.Limits.Instances > size:
				out = append(out, Finding{Check: check, Status: FindingProblem,
					Detail: fmt.Sprintf("its DHCP range holds %d addresses, fewer than LIBVIRT_GCI_MAX_INSTANCES %d: the jobs past it fail at prepare", size, h.Limits.Instances),
					Fix:    "widen the range (virsh net-edit " + n + "), or lower LIBVIRT_GCI_MAX_INSTANCES"})
				continue
			}
			if !filterChecked {
				filterChecked = true
				if err := conn.CanFilter(); err != nil {
					out = append(out, Finding{Check: "network filters", Status: FindingProblem, Detail: err.Error(),
						Fix: "install libvirt's nwfilter driver (libvirt-daemon-driver-nwfilter) and ebtables, and restart libvirtd: prepare fails without them"})
				}
			}
			detail := fmt.Sprintf("%d addresses in its DHCP range, %d held now; each job gets one reserved, under the network filter %s", size, held, libvirt.JobFilter)
			if !dial.IsLocal(h.URI) {
				out = append(out, Finding{Check: check, Status: FindingNote, Detail: detail + "; a gone job's lease cannot be released from here (a remote libvirt)",
					Fix: fmt.Sprintf("none needed: it ends %d minutes after its job at most", libvirt.LeaseTime)})
				continue
			}
			out = append(out, Finding{Check: check, Status: FindingOK, Detail: detail})
		}
	}
	return out
}
