package executor

import (
	"fmt"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
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

// URIs are the libvirt hosts of LIBVIRT_GCI_URI: one or more, separated by spaces or
// commas.
func (s Settings) URIs() []string {
	return strings.FieldsFunc(s.URI, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' })
}

// listed tells whether LIBVIRT_GCI_TEMPLATES matches name.
func (s Settings) listed(name string) bool {
	for _, p := range s.Templates {
		if ok, _ := path.Match(p, name); ok {
			return true
		}
	}
	return false
}

// hostRunnerBinary is the gitlab-runner outside a job that LIBVIRT_GCI_RUNNER_BINARY
// names: auto is the one on PATH (as the runner's service has it), "" for none; err
// says why auto found none.
func (s Settings) hostRunnerBinary() (string, error) {
	switch s.RunnerBinary {
	case "none":
		return "", nil
	case "auto":
		return exec.LookPath("gitlab-runner")
	}
	return s.RunnerBinary, nil
}
