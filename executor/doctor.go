package executor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

// DoctorFailed is doctor's verdict when a check found a problem: a system failure (exit
// 2 outside the runner), after every finding has been printed.
type DoctorFailed struct{ Problems int }

func (e *DoctorFailed) Error() string {
	return fmt.Sprintf("doctor: %d problem(s) found; each line above says how to fix it", e.Problems)
}

// Doctor checks the host with the runner's own settings, one line per finding: the
// settings' files (the secret, the cache directory, the runner's helper binary), then
// each libvirt of LIBVIRT_GCI_URI (reachable, fast, KVM, the pool, the templates offered
// and their warm images, the capacity). With boot, each template boots a throwaway
// clone. It fails with DoctorFailed if any finding is a problem.
func (e *Executor) Doctor(ctx context.Context, boot, asJSON bool) error {
	s := e.Settings
	findings := doctorEnviron(os.Environ())
	findings = append(findings, provision.DoctorSecret(s.SecretFile))
	helper, f := e.doctorHelper()
	findings = append(findings, f...)
	if s.CacheDir != "" {
		findings = append(findings, doctorCache(s.CacheDir), doctorCacheRoom(s))
		for _, uri := range s.URIs() {
			findings = append(findings, provision.DoctorVirtiofsd(uri))
		}
	}
	req := provision.DoctorRequest{
		Offered:   func(name string, marked bool) bool { return marked || s.listed(name) },
		Boot:      boot,
		Transport: s.Transport,
		Helper:    helper,
		Shares:    s.CacheDir != "",
		MaxCPUs:   s.MaxCPUs,
		MaxMemory: s.MaxMemory,
		MaxDisk:   s.MaxDisk,
	}
	hs := e.hosts()
	for _, h := range hs {
		fs := h.Doctor(ctx, req)
		if len(hs) > 1 { // whose each line is
			for i := range fs {
				fs[i].Check = provision.PublicURI(h.URI) + ": " + fs[i].Check
			}
		}
		findings = append(findings, fs...)
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
	}
	problems := 0
	for _, f := range findings {
		if f.Status == provision.FindingProblem {
			problems++
		}
	}
	if asJSON {
		enc := json.NewEncoder(e.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(findings); err != nil {
			return err
		}
	} else {
		for _, f := range findings {
			fmt.Fprintln(e.Stdout, findingLine(f))
		}
	}
	if problems > 0 {
		return &DoctorFailed{Problems: problems}
	}
	return nil
}

// findingLine is a finding as one line: "ok      CHECK: DETAIL", "note    CHECK: DETAIL
// (FIX)", "PROBLEM CHECK: DETAIL; fix: FIX".
func findingLine(f provision.Finding) string {
	line := fmt.Sprintf("%-7s %s", strings.ToUpper(f.Status), f.Check)
	if f.Status == provision.FindingOK {
		line = fmt.Sprintf("%-7s %s", f.Status, f.Check)
	}
	if f.Detail != "" {
		line += ": " + f.Detail
	}
	switch {
	case f.Fix == "":
	case f.Status == provision.FindingProblem:
		line += "; fix: " + f.Fix
	default:
		line += " (" + f.Fix + ")"
	}
	return line
}

// doctorHelper says which gitlab-runner the guests get (LIBVIRT_GCI_RUNNER_BINARY), and
// whether mkfs.ext4, which puts it on a disk, is there; it returns the binary's path, or
// "" for none.
func (e *Executor) doctorHelper() (string, []provision.Finding) {
	const check = "gitlab-runner for the guests (LIBVIRT_GCI_RUNNER_BINARY)"
	path, err := e.Settings.hostRunnerBinary()
	switch {
	case err != nil:
		return "", []provision.Finding{{Check: check, Status: provision.FindingProblem,
			Detail: "auto, but no gitlab-runner on PATH (" + os.Getenv("PATH") + ")",
			Fix:    "install gitlab-runner, or set LIBVIRT_GCI_RUNNER_BINARY to its path (or none)"}}
	case path == "":
		return "", []provision.Finding{{Check: check, Status: provision.FindingNote,
			Detail: "none: the artifact and cache stages need a gitlab-runner in each template"}}
	}
	fi, err := os.Stat(path)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		detail := "not an executable file"
		if err != nil {
			detail = err.Error()
		}
		return "", []provision.Finding{{Check: check, Status: provision.FindingProblem, Detail: path + ": " + detail,
			Fix: "set LIBVIRT_GCI_RUNNER_BINARY to a gitlab-runner binary, or none"}}
	}
	out := []provision.Finding{{Check: check, Status: provision.FindingOK, Detail: path}}
	return path, append(out, provision.DoctorHelperTools()...)
}

// doctorCache checks LIBVIRT_GCI_CACHE_DIR as prepare will, without making it: this
// runner's user's directory that no one else may write, and the runner run as root.
func doctorCache(dir string) provision.Finding {
	const check = "cache directory (LIBVIRT_GCI_CACHE_DIR)"
	if os.Geteuid() != 0 {
		return provision.Finding{Check: check, Status: provision.FindingProblem, Detail: fmt.Sprintf("this runs as uid %d; the caches' file systems need root to mount", os.Geteuid()),
			Fix: "run gitlab-runner as root, or unset LIBVIRT_GCI_CACHE_DIR"}
	}
	if _, err := os.Lstat(dir); errors.Is(err, fs.ErrNotExist) {
		return provision.Finding{Check: check, Status: provision.FindingOK, Detail: dir + " is not there yet: the first prepare with a cache makes it (0700)"}
	}
	if err := checkCacheRoot(dir); err != nil {
		return provision.Finding{Check: check, Status: provision.FindingProblem, Detail: err.Error(),
			Fix: fmt.Sprintf("chown %d %s && chmod 0700 %s (a real directory, not a symlink)", os.Geteuid(), dir, dir)}
	}
	return provision.Finding{Check: check, Status: provision.FindingOK, Detail: dir + ": this user's, written by no one else"}
}

// doctorCacheRoom holds what the caches may hold (LIBVIRT_GCI_CACHE_TOTAL) against the
// file system under LIBVIRT_GCI_CACHE_DIR: what they hold now and what is free.
func doctorCacheRoom(s Settings) provision.Finding {
	const check = "cache room (LIBVIRT_GCI_CACHE_TOTAL)"
	shares, err := cacheShares(s.CacheDir)
	if err != nil {
		return provision.Finding{Check: check, Status: provision.FindingProblem, Detail: err.Error(), Fix: "check LIBVIRT_GCI_CACHE_DIR"}
	}
	var held uint64
	for _, sh := range shares {
		held += sh.Bytes
	}
	var st syscall.Statfs_t
	dir := s.CacheDir
	for {
		if err := syscall.Statfs(dir, &st); err == nil || dir == "/" {
			break
		}
		dir = filepath.Dir(dir) // not made yet: the file system it will be on
	}
	free := st.Bavail * uint64(st.Bsize)
	idle := "never removed when idle"
	if s.CacheMaxIdle > 0 {
		idle = fmt.Sprintf("each removed after %s unused (LIBVIRT_GCI_CACHE_MAX_IDLE)", s.CacheMaxIdle)
	}
	detail := fmt.Sprintf("%d shares hold %s, %s free; %s", len(shares), provision.HumanSize(held), provision.HumanSize(free), idle)
	switch {
	case s.CacheTotal == 0:
		return provision.Finding{Check: check, Status: provision.FindingNote,
			Detail: detail + fmt.Sprintf("; no bound in all: each project, and each fork, may fill 2 × %s (LIBVIRT_GCI_CACHE_SIZE)", provision.HumanSize(s.CacheSize)),
			Fix:    "set LIBVIRT_GCI_CACHE_TOTAL, say to half the free space"}
	case s.CacheTotal > held+free:
		return provision.Finding{Check: check, Status: provision.FindingProblem,
			Detail: detail + fmt.Sprintf("; LIBVIRT_GCI_CACHE_TOTAL %s is more than that file system can hold", provision.HumanSize(s.CacheTotal)),
			Fix:    fmt.Sprintf("lower LIBVIRT_GCI_CACHE_TOTAL to %s or less, or give the caches more room", provision.HumanSize(held+free))}
	}
	return provision.Finding{Check: check, Status: provision.FindingOK, Detail: detail + fmt.Sprintf("; gc keeps them under %s", provision.HumanSize(s.CacheTotal))}
}

// knownVariables are the LIBVIRT_GCI_* variables that are not settings but are read:
// the package's gc service's.
var knownVariables = []string{"LIBVIRT_GCI_METRICS_FILE"}

// doctorEnviron finds the LIBVIRT_GCI_* variables of env that are no setting: a setting's
// name misspelt (a problem: the setting keeps its default, silently), or another's.
func doctorEnviron(env []string) []provision.Finding {
	var names []string
	for _, d := range SettingList {
		names = append(names, d.Env())
	}
	var out []provision.Finding
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(k, "LIBVIRT_GCI_") || slices.Contains(names, k) || slices.Contains(knownVariables, k) {
			continue
		}
		best, dist := "", 3
		for _, n := range names {
			if d := editDistance(k, n); d < dist {
				best, dist = n, d
			}
		}
		if best != "" {
			out = append(out, provision.Finding{Check: "settings", Status: provision.FindingProblem,
				Detail: k + " is not a setting, so " + best + " keeps its default", Fix: "rename it " + best})
			continue
		}
		out = append(out, provision.Finding{Check: "settings", Status: provision.FindingNote,
			Detail: k + " is not a setting of this version: ignored", Fix: "libvirt-gci --help lists them"})
	}
	return out
}

// editDistance is the Levenshtein distance of a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}
