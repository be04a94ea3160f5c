package executor

import (
	"fmt"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// Settings are the operator's: from LIBVIRT_GCI_* variables or flags, never from the job.
type Settings struct {
	// Config is what the lifecycle takes as it is: pool, prefix, boot timeout, start mode,
	// base images, the ssh user and secret, host access, capacity limits, max age and the
	// guest's forwards.
	provision.Config
	URI             string
	Templates       []string // glob patterns of domains a job may pick besides the marked templates
	DefaultTemplate string
	Transport       string        // how stages reach the guest: "agent" or "ssh"
	MaxCPUs         int           // what a job may ask for; 0: it may not
	MaxMemory       uint64        // bytes
	MaxDisk         uint64        // bytes
	KeepFailed      time.Duration // cleanup keeps a failed job's VM this long; 0: not at all
	RunnerBinary    string        // gitlab-runner for the guest: "auto" (the runner driving the job), a path, or "none"
	CacheDir        string        // host directory of the projects' caches; "": none
	CacheSize       uint64        // bytes: the file system of each project's cache share
	CacheMaxIdle    time.Duration // gc removes a cache share not used this long; 0: never
	CacheTotal      uint64        // bytes: gc removes the least recently used shares past it; 0: no bound
	LogFormat       string        // "text" or "json"
	Debug           bool
}

// Transports.
const (
	TransportAgent = meta.TransportAgent
	TransportSSH   = meta.TransportSSH
)

var userRE = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

var prefixRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,31}$`)

// Validate checks operator settings; its errors name the setting and what is allowed.
func (s Settings) Validate() error {
	if len(s.URIs()) == 0 {
		return fmt.Errorf("LIBVIRT_GCI_URI is empty; want a libvirt URI such as qemu:///system, or several separated by spaces")
	}
	for _, uri := range s.URIs() {
		if err := provision.CheckURI(uri); err != nil {
			return fmt.Errorf("LIBVIRT_GCI_URI %w", err)
		}
		if s.CacheDir != "" && !provision.IsLocal(uri) {
			return fmt.Errorf("LIBVIRT_GCI_CACHE_DIR is a directory on this host, which the remote libvirt %s cannot share with its guests; unset it (GitLab's distributed cache works everywhere)", uri)
		}
	}
	if s.Pool == "" {
		return fmt.Errorf("LIBVIRT_GCI_POOL is empty; want the name of a libvirt storage pool")
	}
	if !prefixRE.MatchString(s.Prefix) {
		return fmt.Errorf("LIBVIRT_GCI_PREFIX %q is invalid; want 1 to 32 of [a-z0-9-], not starting with '-'", s.Prefix)
	}
	for _, p := range s.Templates {
		if _, err := path.Match(p, ""); err != nil || p == "" {
			return fmt.Errorf("LIBVIRT_GCI_TEMPLATES pattern %q is invalid; want a glob such as debian-* ", p)
		}
	}
	if s.DefaultTemplate != "" {
		if err := checkTemplateName(s.DefaultTemplate); err != nil {
			return fmt.Errorf("LIBVIRT_GCI_DEFAULT_TEMPLATE: %w", err)
		}
	}
	if s.BaseImages.Source != "" {
		if strings.ContainsAny(s.BaseImages.Source, "/") && !filepath.IsAbs(s.BaseImages.Source) {
			return fmt.Errorf("LIBVIRT_GCI_BASE_IMAGES %q is invalid; want an absolute directory or the name of a storage pool", s.BaseImages.Source)
		}
		if s.BaseImages.CPUs < 1 || s.BaseImages.Memory < 64<<20 {
			return fmt.Errorf("LIBVIRT_GCI_BASE_CPUS %d / LIBVIRT_GCI_BASE_MEMORY %s is too small; want at least 1 CPU and 64M", s.BaseImages.CPUs, FormatSize(s.BaseImages.Memory))
		}
	}
	if s.BootTimeout <= 0 {
		return fmt.Errorf("LIBVIRT_GCI_BOOT_TIMEOUT %s is invalid; want a positive duration such as 5m", s.BootTimeout)
	}
	switch s.Transport {
	case TransportAgent:
		if len(s.Forwards) > 0 {
			if err := s.checkSSH("LIBVIRT_GCI_GUEST_FORWARDS"); err != nil {
				return err
			}
		}
	case TransportSSH:
		if err := s.checkSSH("LIBVIRT_GCI_TRANSPORT ssh"); err != nil {
			return err
		}
	default:
		return fmt.Errorf("LIBVIRT_GCI_TRANSPORT %q is invalid; want agent or ssh", s.Transport)
	}
	return nil
}

// checkSSH checks the settings ssh access to the guests needs (what, for the message).
func (s Settings) checkSSH(what string) error {
	if !userRE.MatchString(s.SSHUser) {
		return fmt.Errorf("LIBVIRT_GCI_SSH_USER %q is invalid; want a user name: 1 to 32 of [a-z0-9_-], starting with a letter or _", s.SSHUser)
	}
	if !filepath.IsAbs(s.SecretFile) {
		return fmt.Errorf("LIBVIRT_GCI_SECRET_FILE %q is invalid; want an absolute path", s.SecretFile)
	}
	for _, uri := range s.URIs() {
		// A guest's SSH port is forwarded on its host's 127.0.0.1: reached directly on a
		// local libvirt, through the SSH connection on qemu+ssh.
		if !provision.ReachesHost(uri) {
			return fmt.Errorf("%s cannot reach guests on the libvirt %s: their SSH ports are forwarded on that host's 127.0.0.1, which only a qemu+ssh:// connection reaches; use qemu+ssh://, or LIBVIRT_GCI_TRANSPORT=agent", what, uri)
		}
	}
	return nil
}

// SplitPatterns parses LIBVIRT_GCI_TEMPLATES.
func SplitPatterns(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// RunnerEnv is what GitLab Runner gives every stage about itself. These are set by the
// runner, not by the job.
type RunnerEnv struct {
	BuildFailureExitCode  string `envconfig:"BUILD_FAILURE_EXIT_CODE"`
	SystemFailureExitCode string `envconfig:"SYSTEM_FAILURE_EXIT_CODE"`
	BuildExitCodeFile     string `envconfig:"BUILD_EXIT_CODE_FILE"`
}

// ExitCodes GitLab wants for the two failure classes.
type ExitCodes struct{ Build, System int }

// Codes reads the exit codes, defaulting to the runner's usual 1 and 2 (manual use).
func (r RunnerEnv) Codes() ExitCodes {
	c := ExitCodes{Build: 1, System: 2}
	if n, err := strconv.Atoi(r.BuildFailureExitCode); err == nil && n > 0 && n < 256 {
		c.Build = n
	}
	if n, err := strconv.Atoi(r.SystemFailureExitCode); err == nil && n > 0 && n < 256 {
		c.System = n
	}
	return c
}

// Job is what the job tells us, from CUSTOM_ENV_* variables. Any project member can set
// these: they choose a template among those the operator offers, and nothing else.
// Whose job it is comes from the runner's job response (ReadIdentity), never from here.
type Job struct {
	Distro string // CUSTOM_ENV_DISTRO, the Python libvirt-gci's variable
	Image  string // CUSTOM_ENV_CI_JOB_IMAGE, the job's image:
	// The size it asks for (CUSTOM_ENV_LIBVIRT_GCI_CPUS, _MEMORY, _DISK): see JobSize.
	CPUs, Memory, Disk string
}

// JobFromEnv reads the job's variables through lookup (os.LookupEnv). It reads only the
// CUSTOM_ENV_ names: a DISTRO in the runner's own environment is not the job's.
func JobFromEnv(lookup func(string) (string, bool)) Job {
	get := func(k string) string { v, _ := lookup("CUSTOM_ENV_" + k); return v }
	return Job{Distro: get("DISTRO"), Image: get("CI_JOB_IMAGE"),
		CPUs: get("LIBVIRT_GCI_CPUS"), Memory: get("LIBVIRT_GCI_MEMORY"), Disk: get("LIBVIRT_GCI_DISK")}
}

var templateNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+:-]{0,99}$`)

func checkTemplateName(name string) error {
	if !templateNameRE.MatchString(name) {
		return &InputError{fmt.Sprintf("template name %q is invalid; want 1 to 100 of [A-Za-z0-9._+:-], starting with a letter or digit", name)}
	}
	return nil
}

// Choice is the template a stage is to clone, and what chose it.
type Choice struct {
	Name   string
	From   string // the flag or variable that named it, for error messages
	Listed bool   // named by the operator or matched by LIBVIRT_GCI_TEMPLATES; else it must carry the template mark
}

// SelectTemplate picks the template: the operator's --distro flag, else the job's DISTRO,
// else its image:, else the default. The choice must be a valid name. Whether the
// operator offers it is known only once it is looked up: it must be matched by
// LIBVIRT_GCI_TEMPLATES or marked as a template. Nothing is looked up here: this runs
// before anything is created.
func SelectTemplate(s Settings, flagDistro string, job Job) (Choice, error) {
	c := Choice{Name: flagDistro, From: "--distro"}
	for _, alt := range []Choice{
		{Name: job.Distro, From: "CUSTOM_ENV_DISTRO"},
		{Name: job.Image, From: "CUSTOM_ENV_CI_JOB_IMAGE (the job's image:)"},
		{Name: s.DefaultTemplate, From: "LIBVIRT_GCI_DEFAULT_TEMPLATE"},
	} {
		if c.Name == "" {
			c = alt
		}
	}
	if c.Name == "" {
		return c, &InputError{"no template chosen: set DISTRO or image: in the job, or LIBVIRT_GCI_DEFAULT_TEMPLATE on the runner"}
	}
	if err := checkTemplateName(c.Name); err != nil {
		return c, fmt.Errorf("%s: %w", c.From, err)
	}
	// A name the operator gave (--distro, the default) is offered by that alone.
	c.Listed = c.From == "--distro" || c.From == "LIBVIRT_GCI_DEFAULT_TEMPLATE" || s.listed(c.Name)
	return c, nil
}
