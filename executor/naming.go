package executor

import (
	"fmt"
	"hash/fnv"
	"regexp"
	"strings"
)

// MaxNameLen bounds instance names: a DNS label, which also keeps file names sane.
const MaxNameLen = 63

var (
	jobIDRE   = regexp.MustCompile(`^[0-9]{1,20}$`)
	machineRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)
	notSlug   = regexp.MustCompile(`[^a-z0-9]+`)
)

// InstanceName derives the instance of a job: the prefix, the runner's short token and the
// job id (unique per runner and job, so every stage finds the same VM), then as much of
// the project name as fits, for people reading `virsh list`. Only [a-z0-9-], at most 63.
func InstanceName(prefix string, job Job) (string, error) {
	if !jobIDRE.MatchString(job.ID) {
		return "", &InputError{fmt.Sprintf("CUSTOM_ENV_CI_JOB_ID %q is invalid; want a decimal job id", job.ID)}
	}
	base := prefix + runnerPart(job.RunnerToken) + "-" + job.ID
	if len(base) > MaxNameLen {
		return "", fmt.Errorf("instance name %q is longer than %d characters; use a shorter LIBVIRT_GCI_PREFIX", base, MaxNameLen)
	}
	name := base
	if p := slug(job.Project()); p != "" {
		name = strings.TrimRight((base + "-" + p)[:min(len(base)+1+len(p), MaxNameLen)], "-")
	}
	return name, nil
}

// runnerPart is the runner's short token as a name part. A token that is not already
// lowercase alphanumeric is shortened and given a hash of the original, so two tokens
// that differ only in case or punctuation still give different names.
func runnerPart(token string) string {
	s := slug(token)
	if s == "" {
		return "local"
	}
	if s == token && len(s) <= 20 {
		return s
	}
	h := fnv.New32a()
	h.Write([]byte(token))
	return fmt.Sprintf("%s%08x", s[:min(len(s), 8)], h.Sum32())
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
