package executor

import (
	"fmt"
	"path"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Settings are the operator's: from LIBVIRT_GCI_* variables or flags, never from the job.
type Settings struct {
	URI             string
	Pool            string
	Templates       []string // glob patterns of template names a job may pick
	DefaultTemplate string
	Prefix          string
	BootTimeout     time.Duration
	Transport       string // how stages reach the guest: "agent" or "ssh"
	SSHUser         string // the guest user jobs run as with the ssh transport
	SecretFile      string // the host secret instance SSH keys are derived from (0600)
}

// Transports.
const (
	TransportAgent = "agent"
	TransportSSH   = "ssh"
)

var userRE = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

var prefixRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,31}$`)

// Validate checks operator settings; its errors name the setting and what is allowed.
func (s Settings) Validate() error {
	if s.URI == "" {
		return fmt.Errorf("LIBVIRT_GCI_URI is empty; want a libvirt URI such as qemu:///system")
	}
	if s.Pool == "" {
		return fmt.Errorf("LIBVIRT_GCI_POOL is empty; want the name of a libvirt storage pool")
	}
	if !prefixRE.MatchString(s.Prefix) {
		return fmt.Errorf("LIBVIRT_GCI_PREFIX %q is invalid; want 1 to 32 of [a-z0-9-], not starting with '-'", s.Prefix)
	}
	if len(s.Templates) == 0 {
		return fmt.Errorf("LIBVIRT_GCI_TEMPLATES is empty; want comma-separated glob patterns, or * for any template")
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
	if s.BootTimeout <= 0 {
		return fmt.Errorf("LIBVIRT_GCI_BOOT_TIMEOUT %s is invalid; want a positive duration such as 5m", s.BootTimeout)
	}
	switch s.Transport {
	case TransportAgent:
	case TransportSSH:
		if !userRE.MatchString(s.SSHUser) {
			return fmt.Errorf("LIBVIRT_GCI_SSH_USER %q is invalid; want a user name: 1 to 32 of [a-z0-9_-], starting with a letter or _", s.SSHUser)
		}
		if !filepath.IsAbs(s.SecretFile) {
			return fmt.Errorf("LIBVIRT_GCI_SECRET_FILE %q is invalid; want an absolute path", s.SecretFile)
		}
	default:
		return fmt.Errorf("LIBVIRT_GCI_TRANSPORT %q is invalid; want agent or ssh", s.Transport)
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
// these: everything here is validated before use and never reaches a shell or a path.
type Job struct {
	ID          string `envconfig:"CI_JOB_ID"`
	ProjectPath string `envconfig:"CI_PROJECT_PATH"`
	ProjectName string `envconfig:"CI_PROJECT_NAME"`
	RunnerToken string `envconfig:"CI_RUNNER_SHORT_TOKEN"`
	Distro      string `envconfig:"DISTRO"` // the Python libvirt-gci's variable
	Image       string `envconfig:"CI_JOB_IMAGE"`
}

// InJob tells whether we run under GitLab Runner (rather than by hand).
func (j Job) InJob() bool { return j.ID != "" }

// Project is the most readable project name there is.
func (j Job) Project() string {
	if j.ProjectPath != "" {
		return j.ProjectPath
	}
	return j.ProjectName
}

var templateNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._+:-]{0,99}$`)

func checkTemplateName(name string) error {
	if !templateNameRE.MatchString(name) {
		return &InputError{fmt.Sprintf("template name %q is invalid; want 1 to 100 of [A-Za-z0-9._+:-], starting with a letter or digit", name)}
	}
	return nil
}

// SelectTemplate picks the template: the operator's --distro flag, else the job's DISTRO,
// else its image:, else the default. The choice must be a valid name that the operator's
// allowlist matches. Nothing is looked up here: this runs before anything is created.
func SelectTemplate(s Settings, flagDistro string, job Job) (string, error) {
	name, from := flagDistro, "--distro"
	for _, c := range []struct{ v, from string }{
		{job.Distro, "CUSTOM_ENV_DISTRO"},
		{job.Image, "CUSTOM_ENV_CI_JOB_IMAGE (the job's image:)"},
		{s.DefaultTemplate, "LIBVIRT_GCI_DEFAULT_TEMPLATE"},
	} {
		if name == "" {
			name, from = c.v, c.from
		}
	}
	if name == "" {
		return "", &InputError{"no template chosen: set DISTRO or image: in the job, or LIBVIRT_GCI_DEFAULT_TEMPLATE on the runner"}
	}
	if err := checkTemplateName(name); err != nil {
		return "", fmt.Errorf("%s: %w", from, err)
	}
	for _, p := range s.Templates {
		if ok, _ := path.Match(p, name); ok {
			return name, nil
		}
	}
	return "", &InputError{fmt.Sprintf("template %q (from %s) is not allowed on this runner; allowed: %s", name, from, strings.Join(s.Templates, ","))}
}
