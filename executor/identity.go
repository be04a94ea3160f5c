package executor

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// maxResponseSize bounds what we read of JOB_RESPONSE_FILE. A job's response carries its
// variables and steps; 64 MiB is far beyond any real one.
const maxResponseSize = 64 << 20

// jobResponse is the part of the job response (JOB_RESPONSE_FILE) that says whose job it
// is. GitLab writes these fields and the runner copies them to the file; unlike the job's
// variables, no .gitlab-ci.yml can change them.
type jobResponse struct {
	ID      int64 `json:"id"`
	JobInfo struct {
		ProjectID       int64  `json:"project_id"`
		ProjectFullPath string `json:"project_full_path"`
		ProjectName     string `json:"project_name"`
		InstanceUUID    string `json:"instance_uuid"`
	} `json:"job_info"`
	GitInfo struct {
		RepoURL   string `json:"repo_url"`
		Protected *bool  `json:"protected"` // GitLab 18.3 and later
	} `json:"git_info"`
	RunnerInfo struct {
		UUID    string `json:"uuid"`
		Timeout int64  `json:"timeout"` // seconds
	} `json:"runner_info"`
}

// Identity is what the job response says of the job: whose it is, and whether it runs
// for a protected ref.
type Identity struct {
	Owner     meta.Owner
	Protected bool // false where GitLab does not say (before 18.3): never from a variable
	// Timeout is the job's timeout (runner_info.timeout); 0 where the response has none.
	Timeout time.Duration
}

// ReadIdentity reads whose job this is from the job response GitLab Runner wrote.
func ReadIdentity(path string) (Identity, error) {
	f, err := os.Open(path)
	if err != nil {
		return Identity{}, fmt.Errorf("JOB_RESPONSE_FILE: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxResponseSize+1))
	if err != nil {
		return Identity{}, fmt.Errorf("JOB_RESPONSE_FILE %s: %w", path, err)
	}
	if len(b) > maxResponseSize {
		return Identity{}, fmt.Errorf("JOB_RESPONSE_FILE %s is larger than %d MiB", path, maxResponseSize>>20)
	}
	return parseIdentity(b)
}

func parseIdentity(b []byte) (Identity, error) {
	var r jobResponse
	if err := json.Unmarshal(b, &r); err != nil {
		return Identity{}, fmt.Errorf("JOB_RESPONSE_FILE is not a job response: %w", err)
	}
	if r.ID <= 0 {
		return Identity{}, fmt.Errorf("JOB_RESPONSE_FILE has no job id (id is %d)", r.ID)
	}
	if r.JobInfo.ProjectID <= 0 {
		return Identity{}, fmt.Errorf("JOB_RESPONSE_FILE has no project id (job_info.project_id is %d)", r.JobInfo.ProjectID)
	}
	o := meta.Owner{
		Server:    serverOf(r.JobInfo.InstanceUUID, r.GitInfo.RepoURL),
		Runner:    printable(r.RunnerInfo.UUID, 100),
		ProjectID: strconv.FormatInt(r.JobInfo.ProjectID, 10),
		JobID:     strconv.FormatInt(r.ID, 10),
		Project:   printable(r.JobInfo.ProjectFullPath, 255),
	}
	if o.Project == "" {
		o.Project = printable(r.JobInfo.ProjectName, 255)
	}
	id := Identity{Owner: o, Protected: r.GitInfo.Protected != nil && *r.GitInfo.Protected}
	if t := r.RunnerInfo.Timeout; t > 0 && t < 1<<31 {
		id.Timeout = time.Duration(t) * time.Second
	}
	return id, nil
}

// serverOf names the GitLab instance: its UUID, or else the scheme and host of the
// repository URL (never its user part, which carries the job token).
func serverOf(uuid, repoURL string) string {
	if u := printable(uuid, 100); u != "" {
		return u
	}
	if u, err := url.Parse(repoURL); err == nil && u.Host != "" {
		return printable(u.Scheme+"://"+u.Host, 255)
	}
	return ""
}

var notPrintable = regexp.MustCompile(`[^\x20-\x7e]`)

// printable keeps what may go into metadata and logs: at most n printable ASCII characters.
func printable(s string, n int) string {
	s = notPrintable.ReplaceAllString(s, "_")
	return s[:min(len(s), n)]
}

// identityHash is a digest of every part of an owner's identity, each length-prefixed,
// so that no two identities share it however their parts are split.
func identityHash(o meta.Owner) string {
	h := sha256.New()
	h.Write([]byte("libvirt-gci owner v1"))
	for _, part := range []string{o.Server, o.Runner, o.ProjectID, o.JobID} {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(part)))
		h.Write(n[:])
		h.Write([]byte(part))
	}
	return hex.EncodeToString(h.Sum(nil))[:hashLen]
}

// hashLen is how many hex digits of the identity hash a name carries (48 bits).
const hashLen = 12

// ownerString is an owner as error messages show it.
func ownerString(o meta.Owner) string {
	if o.Manual {
		return "the operator (made by hand)"
	}
	s := "job " + o.JobID + " of project " + o.ProjectID
	if o.Server != "" {
		s += " on " + o.Server
	}
	return s
}

// sameOwner tells whether two owners are one: every identity part equal.
func sameOwner(a, b meta.Owner) bool {
	return a.Manual == b.Manual && a.Server == b.Server && a.Runner == b.Runner &&
		a.ProjectID == b.ProjectID && a.JobID == b.JobID
}
