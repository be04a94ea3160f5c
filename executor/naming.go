package executor

import (
	"crypto/rand"
	"fmt"
	"regexp"
	"strings"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// MaxNameLen bounds instance names: a DNS label, which also keeps file names sane.
const MaxNameLen = 63

var (
	machineRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)
	notSlug   = regexp.MustCompile(`[^a-z0-9]+`)
)

// InstanceName derives the instance of a job from its owner (what GitLab Runner wrote, not
// what the job says): the prefix, the job id and as much of the project path as fits, for
// people reading `virsh list`, then a hash of every identity part, which makes the name
// unique per owner however the readable parts look. Only [a-z0-9-], at most 63.
func InstanceName(prefix string, o meta.Owner) (string, error) {
	if o.Manual || o.JobID == "" {
		return "", fmt.Errorf("instance name: no job to name it after")
	}
	hash := "-" + identityHash(o)
	head := prefix + slug(o.JobID)
	if len(head)+len(hash) > MaxNameLen {
		return "", fmt.Errorf("instance name %q is longer than %d characters; use a shorter LIBVIRT_GCI_PREFIX", head+hash, MaxNameLen)
	}
	if p := slug(o.Project); p != "" {
		room := MaxNameLen - len(head) - len(hash) - 1
		if p = strings.TrimRight(p[:min(len(p), max(room, 0))], "-"); p != "" {
			head += "-" + p
		}
	}
	return head + hash, nil
}

// slug lowercases s and turns every run of other characters into one '-'.
func slug(s string) string {
	return strings.Trim(notSlug.ReplaceAllString(strings.ToLower(s), "-"), "-")
}

// CheckMachineName validates a name given with --machine.
func CheckMachineName(name string) error {
	if !machineRE.MatchString(name) {
		return &InputError{fmt.Sprintf("machine name %q is invalid; want 1 to 63 of [A-Za-z0-9._-], starting with a letter or digit", name)}
	}
	return nil
}

// ManualName is a new name for an instance made by hand without --machine: the prefix,
// "manual-" and 8 random letters and digits.
func ManualName(prefix string) string {
	return prefix + "manual-" + strings.ToLower(rand.Text()[:8])
}
