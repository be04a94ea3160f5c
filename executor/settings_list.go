package executor

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

// Setting is one operator setting, declared once: the command line's global flags, the
// LIBVIRT_GCI_* variables, their parsing and README.rst's settings table all come from
// SettingList.
type Setting struct {
	Flag    string        // the global flag, without dashes
	Default string        // as the flag's text; "" for none
	Compute func() string // the default, when it depends on the host; then Default is how README shows it
	Help    string        // one line: what it is
	Bool    bool          // a switch: a flag without a value
	set     func(s *Settings, v string) error
}

// Env is the setting's environment variable.
func (d Setting) Env() string {
	return "LIBVIRT_GCI_" + strings.ToUpper(strings.ReplaceAll(d.Flag, "-", "_"))
}

// Set parses v into s; its error names the variable and what is allowed.
func (d Setting) Set(s *Settings, v string) error {
	if err := d.set(s, v); err != nil {
		return fmt.Errorf("%s %q is invalid; %w", d.Env(), v, err)
	}
	return nil
}

func text(f func(*Settings) *string) func(*Settings, string) error {
	return func(s *Settings, v string) error { *f(s) = v; return nil }
}

func duration(f func(*Settings) *time.Duration) func(*Settings, string) error {
	return func(s *Settings, v string) error {
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("want a duration such as 90s or 5m")
		}
		*f(s) = d
		return nil
	}
}

// optDuration is a duration that may be left unset (0).
func optDuration(f func(*Settings) *time.Duration) func(*Settings, string) error {
	return func(s *Settings, v string) error {
		if v == "" {
			*f(s) = 0
			return nil
		}
		return duration(f)(s, v)
	}
}

func count(f func(*Settings) *int) func(*Settings, string) error {
	return func(s *Settings, v string) error {
		if v == "" {
			*f(s) = 0
			return nil
		}
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return fmt.Errorf("want a whole number, 1 or more")
		}
		*f(s) = n
		return nil
	}
}

func size(f func(*Settings) *uint64) func(*Settings, string) error {
	return func(s *Settings, v string) error {
		if v == "" {
			*f(s) = 0
			return nil
		}
		n, err := ParseSize(v)
		if err != nil {
			return err
		}
		*f(s) = n
		return nil
	}
}

func boolean(f func(*Settings) *bool) func(*Settings, string) error {
	return func(s *Settings, v string) error {
		if v == "" {
			*f(s) = false
			return nil
		}
		b, err := strconv.ParseBool(v)
		if err != nil {
			return fmt.Errorf("want true or false")
		}
		*f(s) = b
		return nil
	}
}

// SettingList is every operator setting. Validate checks how they go together.
var SettingList = []Setting{
	{Flag: "uri", Default: "qemu:///system", Help: "libvirt connection URI: the local one, or qemu+ssh:// (keyfile=, known_hosts= checked strictly) or qemu+tls:// (qemu+tcp is refused: no authentication); several, space-separated: each job goes to the one with most room",
		set: text(func(s *Settings) *string { return &s.URI })},
	{Flag: "pool", Default: "default", Help: "storage pool that receives instance overlays",
		set: text(func(s *Settings) *string { return &s.Pool })},
	{Flag: "templates", Help: "comma-separated glob patterns of domains a job may clone besides the marked templates",
		set: func(s *Settings, v string) error { s.Templates = SplitPatterns(v); return nil }},
	{Flag: "default-template", Help: "template used when the job names none",
		set: text(func(s *Settings) *string { return &s.DefaultTemplate })},
	{Flag: "prefix", Default: "gci-", Help: "name prefix of managed instances",
		set: text(func(s *Settings) *string { return &s.Prefix })},
	{Flag: "boot-timeout", Default: "5m", Help: "how long prepare waits for the guest",
		set: duration(func(s *Settings) *time.Duration { return &s.BootTimeout })},
	{Flag: "transport", Default: TransportAgent, Help: "how stages reach the guest: agent or ssh",
		set: text(func(s *Settings) *string { return &s.Transport })},
	{Flag: "start", Default: provision.StartRestore, Help: "how prepare starts a VM: restore (from the template's warm image, made on first use) or boot",
		set: func(s *Settings, v string) error {
			if !slices.Contains(provision.StartValues(), v) {
				return fmt.Errorf("want %s", strings.Join(provision.StartValues(), " or "))
			}
			s.Start = v
			return nil
		}},
	{Flag: "base-images", Help: "the Python libvirt-gci's base images: a directory (absolute path) or a storage pool of DISTRO.qcow2 files, each a template with a built-in definition",
		set: text(func(s *Settings) *string { return &s.BaseImages.Source })},
	{Flag: "base-cpus", Default: "2", Help: "CPUs of a base image's VMs",
		set: count(func(s *Settings) *int { return &s.BaseImages.CPUs })},
	{Flag: "base-memory", Default: "2G", Help: "memory of a base image's VMs",
		set: size(func(s *Settings) *uint64 { return &s.BaseImages.Memory })},
	{Flag: "base-network", Default: "default", Help: "libvirt network of a base image's VMs' NIC; none: no NIC",
		set: func(s *Settings, v string) error {
			if v == "none" {
				v = ""
			}
			s.BaseImages.Network = v
			return nil
		}},
	{Flag: "base-virt", Default: "auto", Help: "domain type of a base image's VMs: kvm, qemu (software emulation), or auto (kvm where libvirt offers it)",
		set: func(s *Settings, v string) error {
			switch v {
			case "auto", "":
				s.BaseImages.Virt = ""
			case "kvm", "qemu":
				s.BaseImages.Virt = v
			default:
				return fmt.Errorf("want kvm, qemu or auto")
			}
			return nil
		}},
	{Flag: "ssh-user", Default: "root", Help: "the guest user jobs run as over ssh",
		set: text(func(s *Settings) *string { return &s.SSHUser })},
	{Flag: "secret-file", Default: "~/.config/libvirt-gci/secret", Compute: defaultSecretFile, Help: "host secret the per-instance ssh keys are derived from; made 0600 on first use",
		set: text(func(s *Settings) *string { return &s.SecretFile })},
	{Flag: "allow-host-access", Bool: true, Help: "let templates hand jobs host devices, host directory shares, writable shareable disks and the like",
		set: boolean(func(s *Settings) *bool { return &s.AllowHostAccess })},
	{Flag: "max-age", Help: "gc removes instances older than this, whoever owns them (say 6h: longer than any job)",
		set: optDuration(func(s *Settings) *time.Duration { return &s.MaxAge })},
	{Flag: "job-grace", Default: "10m", Help: "gc removes a job's VM this long after the job's timeout (from the runner's job response) has passed since its prepare: its cleanup never came (killed, or the runner lost the job); 0: not by this rule",
		set: optDuration(func(s *Settings) *time.Duration { return &s.JobGrace })},
	{Flag: "max-instances", Help: "running instances (with this prefix) at most; prepare waits for room",
		set: count(func(s *Settings) *int { return &s.Limits.Instances })},
	{Flag: "max-memory-total", Help: "memory of the running instances at most, such as 48G; prepare waits for room",
		set: size(func(s *Settings) *uint64 { return &s.Limits.MemoryTotal })},
	{Flag: "disk-reserve", Default: "full", Help: "disk room prepare holds in the instance pool before it starts a job, waiting for it: full (room for every instance's disks to grow to their full size, and for the new job's), a size such as 50G (at least that much free: overcommit), or 0 (no check)",
		set: func(s *Settings, v string) error {
			s.Limits.DiskFull, s.Limits.DiskReserve = false, 0
			if v == "full" {
				s.Limits.DiskFull = true
				return nil
			}
			n, err := ParseSize(v)
			if err != nil {
				return fmt.Errorf("want full, a size such as 50G, or 0")
			}
			s.Limits.DiskReserve = n
			return nil
		}},
	{Flag: "max-cpus", Help: "CPUs a job may ask for (CUSTOM_ENV_LIBVIRT_GCI_CPUS)",
		set: count(func(s *Settings) *int { return &s.MaxCPUs })},
	{Flag: "max-memory", Help: "memory a job may ask for (CUSTOM_ENV_LIBVIRT_GCI_MEMORY), such as 8G",
		set: size(func(s *Settings) *uint64 { return &s.MaxMemory })},
	{Flag: "max-disk", Help: "first-disk size a job may ask for (CUSTOM_ENV_LIBVIRT_GCI_DISK), such as 50G",
		set: size(func(s *Settings) *uint64 { return &s.MaxDisk })},
	{Flag: "keep-failed", Help: "cleanup keeps the VM of a failed job this long (say 2h), stopped and without its cache and network, for a look at its disks; gc removes it afterwards, or at LIBVIRT_GCI_MAX_AGE",
		set: optDuration(func(s *Settings) *time.Duration { return &s.KeepFailed })},
	{Flag: "keep-failed-max", Default: "4", Help: "failed jobs' VMs kept at most, in all (stopped: they count apart from running instances); past it, a failed job's VM is removed as ever",
		set: count(func(s *Settings) *int { return &s.Limits.Kept })},
	{Flag: "keep-failed-per-project", Default: "1", Help: "failed jobs' VMs kept at most per project",
		set: count(func(s *Settings) *int { return &s.Limits.KeptPerProject })},
	{Flag: "warm-sizes", Default: "4", Help: "warm images per template for the sizes jobs ask for (CPUs and memory), each made on a job's first ask; past it, the one made first that no VM uses gives way, and with all in use another size boots (0: every sized job boots)",
		set: count(func(s *Settings) *int { return &s.Limits.WarmSizes })},
	{Flag: "runner-binary", Default: "auto", Help: "gitlab-runner put on every guest's PATH (artifacts, caches): auto (the one driving the job), a path, or none",
		set: func(s *Settings, v string) error {
			if v != "auto" && v != "none" && !filepath.IsAbs(v) {
				return fmt.Errorf("want auto (the gitlab-runner that drives the job), an absolute path, or none")
			}
			s.RunnerBinary = v
			return nil
		}},
	{Flag: "cache-dir", Help: "host directory of job caches (the runner must run as root): each project gets a file system of its own there, mounted nosuid,nodev, shared at /cache (virtiofs) with its jobs, protected apart; unset: caches die with the VM",
		set: func(s *Settings, v string) error {
			if v != "" && !filepath.IsAbs(v) {
				return fmt.Errorf("want an absolute path")
			}
			s.CacheDir = v
			return nil
		}},
	{Flag: "cache-size", Default: "10G", Help: "size of each project's cache (a file system of its own, for its protected jobs and another for the others); a full cache fails that project's cache archiving",
		set: func(s *Settings, v string) error {
			n, err := ParseSize(v)
			if err != nil || n < 16<<20 {
				return fmt.Errorf("want a size of 16M or more, such as 10G")
			}
			s.CacheSize = n
			return nil
		}},
	{Flag: "cache-max-idle", Default: "168h", Help: "gc removes a project's cache share (unmounted, its image deleted) once no job has used it this long; 0: never",
		set: optDuration(func(s *Settings) *time.Duration { return &s.CacheMaxIdle })},
	{Flag: "cache-total", Help: "the bytes all cache shares may hold together, such as 200G; past it gc removes the least recently used (never one in use); unset: no bound",
		set: size(func(s *Settings) *uint64 { return &s.CacheTotal })},
	{Flag: "guest-forwards", Help: "comma-separated HOST:PORT services (your GitLab) the guest reaches at the same address through ssh while a stage runs",
		set: func(s *Settings, v string) error {
			s.Forwards = nil
			for _, f := range SplitPatterns(v) {
				host, port, err := net.SplitHostPort(f)
				if n, perr := strconv.Atoi(port); err != nil || perr != nil || n < 1 || n > 65535 || host == "" || strings.ContainsAny(host, " /") {
					return fmt.Errorf("%q is not HOST:PORT", f)
				}
				s.Forwards = append(s.Forwards, f)
			}
			return nil
		}},
	{Flag: "log-format", Default: "text", Help: "the tool's own lines on stderr: text (short lines), or json (slog records with their fields)",
		set: func(s *Settings, v string) error {
			if v != "text" && v != "json" {
				return fmt.Errorf("want text or json")
			}
			s.LogFormat = v
			return nil
		}},
	{Flag: "debug", Bool: true, Help: "debug logging on stderr",
		set: boolean(func(s *Settings) *bool { return &s.Debug })},
}

// SettingsTable is README.rst's table of SettingList.
func SettingsTable() string {
	rows := [][3]string{{"variable (flag)", "meaning", "default"}}
	for _, d := range SettingList {
		def := "``" + d.Default + "``"
		switch {
		case d.Bool:
			def = "off"
		case d.Default == "":
			def = "(none)"
		}
		rows = append(rows, [3]string{"``" + d.Env() + "`` (``--" + d.Flag + "``)", d.Help, def})
	}
	var w [3]int
	for _, r := range rows {
		for i, c := range r {
			w[i] = max(w[i], len(c))
		}
	}
	rule := strings.Repeat("=", w[0]) + " " + strings.Repeat("=", w[1]) + " " + strings.Repeat("=", w[2])
	var b strings.Builder
	b.WriteString(rule + "\n")
	for i, r := range rows {
		fmt.Fprintf(&b, "%-*s %-*s %s\n", w[0], r[0], w[1], r[1], r[2])
		if i == 0 {
			b.WriteString(rule + "\n")
		}
	}
	b.WriteString(rule + "\n")
	return b.String()
}

// DefaultValue is the flag's default on this host.
func (d Setting) DefaultValue() string {
	if d.Compute != nil {
		return d.Compute()
	}
	return d.Default
}

// defaultSecretFile is in the user's configuration directory: ~/.config/libvirt-gci/secret.
func defaultSecretFile() string {
	dir, err := os.UserConfigDir()
	if err != nil {
		return ""
	}
	return filepath.Join(dir, "libvirt-gci", "secret")
}

// EnvironmentFile is the operator's settings file the package installs as
// /etc/default/libvirt-gci: every setting, commented out at its default, with its help.
// GitLab Runner's service (through the package's drop-in) and the gc timer's read it,
// so that the stages and gc see the same settings.
func EnvironmentFile() string {
	var b strings.Builder
	b.WriteString(`# libvirt-gci's settings: the operator's, never a job's. gitlab-runner.service (through
# the drop-in gitlab-runner.service.d/libvirt-gci.conf) and libvirt-gci-gc.service read
# this file, so that the stages, gc and the metrics see the same settings. Set one by
# removing its '#'; then restart gitlab-runner between jobs, and check the host with
#   libvirt-gci doctor
# (run it with these settings: set -a; . /etc/default/libvirt-gci; set +a).
#
# A value with spaces goes in double quotes. See libvirt-gci(1) and README.rst.

# Where libvirt-gci-gc.service writes libvirt-gci metrics after each gc, for
# node_exporter's textfile collector (unset: no metrics file).
#LIBVIRT_GCI_METRICS_FILE=/var/lib/prometheus/node-exporter/libvirt-gci.prom
`)
	for _, d := range SettingList {
		b.WriteString("\n")
		for _, line := range wrap(d.Help, 86) {
			b.WriteString("# " + line + "\n")
		}
		def := d.Default
		switch {
		case d.Bool:
			def = "false"
		case d.Compute != nil: // a path of the service user's: the file names none
			b.WriteString("# (default: " + d.Default + ", of the user the service runs as)\n")
			def = ""
		}
		if strings.ContainsAny(def, " \t") {
			def = `"` + def + `"`
		}
		fmt.Fprintf(&b, "#%s=%s\n", d.Env(), def)
	}
	return b.String()
}

// wrap breaks s into lines of at most width bytes, at spaces.
func wrap(s string, width int) []string {
	var lines []string
	line := ""
	for _, w := range strings.Fields(s) {
		if line != "" && len(line)+1+len(w) > width {
			lines = append(lines, line)
			line = ""
		}
		if line != "" {
			line += " "
		}
		line += w
	}
	return append(lines, line)
}
