package executor

import (
	"fmt"
	"regexp"
	"strconv"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

// The job: what its variables ask for (CUSTOM_ENV_*, never trusted), checked against the
// operator's settings: the template to clone and the size of its VM.

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

// Size is what a job asked for; zero fields keep the template's.
type Size = provision.Size

// ParseSize and FormatSize read and write sizes such as 2G.
var (
	ParseSize  = provision.ParseSize
	FormatSize = provision.FormatSize
)

// JobSize reads the size a job asks for (CUSTOM_ENV_LIBVIRT_GCI_CPUS, _MEMORY, _DISK)
// and checks it against the operator's maximums. A job may ask only where the operator
// set a maximum. Nothing is created before this passes.
func JobSize(s Settings, job Job) (Size, error) {
	var z Size
	if job.CPUs != "" {
		n, err := strconv.Atoi(job.CPUs)
		if err != nil || n < 1 {
			return z, &InputError{fmt.Sprintf("CUSTOM_ENV_LIBVIRT_GCI_CPUS %q is invalid; want a whole number of CPUs, 1 or more", job.CPUs)}
		}
		if s.MaxCPUs == 0 || n > s.MaxCPUs {
			return z, &InputError{fmt.Sprintf("CUSTOM_ENV_LIBVIRT_GCI_CPUS %d is more than this runner allows (LIBVIRT_GCI_MAX_CPUS %s)", n, orUnset(s.MaxCPUs > 0, strconv.Itoa(s.MaxCPUs)))}
		}
		z.CPUs = n
	}
	for _, f := range []struct {
		name, val, max string
		limit          uint64
		min            uint64
		dst            *uint64
	}{
		{"MEMORY", job.Memory, "LIBVIRT_GCI_MAX_MEMORY", s.MaxMemory, 64 << 20, &z.Memory},
		{"DISK", job.Disk, "LIBVIRT_GCI_MAX_DISK", s.MaxDisk, 1 << 20, &z.Disk},
	} {
		if f.val == "" {
			continue
		}
		n, err := ParseSize(f.val)
		if err == nil && n < f.min {
			err = fmt.Errorf("want at least %s", FormatSize(f.min))
		}
		if err != nil {
			return z, &InputError{fmt.Sprintf("CUSTOM_ENV_LIBVIRT_GCI_%s %q is invalid; %v", f.name, f.val, err)}
		}
		if f.limit == 0 || n > f.limit {
			return z, &InputError{fmt.Sprintf("CUSTOM_ENV_LIBVIRT_GCI_%s %s is more than this runner allows (%s %s)", f.name, f.val, f.max, orUnset(f.limit > 0, FormatSize(f.limit)))}
		}
		*f.dst = n
	}
	return z, nil
}

func orUnset(set bool, v string) string {
	if set {
		return v
	}
	return "is not set: jobs keep the template's size"
}
