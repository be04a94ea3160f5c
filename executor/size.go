package executor

import (
	"fmt"
	"strconv"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

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
