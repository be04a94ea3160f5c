// Package fakegitlab is a small fake of GitLab's job API, enough for a real
// gitlab-runner to fetch jobs, clone the project, stream their traces, move artifacts
// and report how the jobs ended. It listens on 127.0.0.1 only and is strict the way
// GitLab is: wrong tokens get 403 and a trace chunk at the wrong offset gets 416.
package fakegitlab

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

type GitLab struct {
	t           testing.TB
	srv         *httptest.Server
	RunnerToken string

	mu          sync.Mutex
	queue       []*Job
	jobs        map[int64]*Job
	problems    []string    // protocol violations by the runner
	repo        *Repository // the project's repository, once a job fetches it
	gitRequests int
}

// Job is one job on the fake GitLab: what the runner is given and what it reported.
type Job struct {
	ID      int64
	Token   string
	Payload map[string]any

	trace     []byte
	artifacts []byte // the archive it uploaded
	updates   []Update
	remote    string // Job-Status sent back: "" (running), "canceling" or "canceled"
	taken     time.Time
	finished  time.Time
	done      chan struct{}
	closeOnce sync.Once
}

// Update is the body of PUT /api/v4/jobs/:id.
type Update struct {
	State         string `json:"state"`
	FailureReason string `json:"failure_reason"`
	ExitCode      *int   `json:"exit_code"`
	Output        struct {
		Checksum string `json:"checksum"`
		Bytesize int    `json:"bytesize"`
	} `json:"output"`
}

func New(t testing.TB) *GitLab {
	g := &GitLab{t: t, RunnerToken: "glrt-fake-" + strings.ToLower(rand.Text()), jobs: map[int64]*Job{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("fake GitLab: %v", err)
	}
	g.srv = &httptest.Server{Listener: ln, Config: &http.Server{Handler: g}}
	g.srv.Start()
	t.Cleanup(func() {
		g.srv.Close()
		g.mu.Lock()
		defer g.mu.Unlock()
		for _, p := range g.problems {
			t.Errorf("fake GitLab: %s", p)
		}
	})
	return g
}

func (g *GitLab) URL() string { return g.srv.URL }

// Done is closed once the job's final state is reported.
func (j *Job) Done() <-chan struct{} { return j.done }

// JobSpec is what a test asks for; add turns it into the JSON GitLab would send.
type JobSpec struct {
	Script      []string
	AfterScript []string
	Variables   map[string]string
	Timeout     int // seconds, the job's timeout (runner_info.timeout)
	ProjectID   int // 42 unless set
	Cache       []map[string]any
	Artifacts   []map[string]any
	// Fetch clones the project (GIT_STRATEGY fetch) instead of none.
	Fetch bool
	// Needs are earlier jobs whose artifacts this one downloads.
	Needs []*Job
	// Protected is git_info.protected (GitLab 18.3+): nil leaves it out.
	Protected *bool
}

var jobIDs struct {
	sync.Mutex
	last int64
}

// add queues a job and returns it. Job IDs are unique across tests and runs, as instance
// names contain them.
func (g *GitLab) Add(s JobSpec) *Job {
	jobIDs.Lock()
	id := time.Now().UnixMilli() % 1e10 * 10
	if id <= jobIDs.last {
		id = jobIDs.last + 1
	}
	jobIDs.last = id
	jobIDs.Unlock()
	if s.Timeout == 0 {
		s.Timeout = 600
	}
	if s.ProjectID == 0 {
		s.ProjectID = 42
	}
	token := "glcbt-" + strings.ToLower(rand.Text())
	vars := []map[string]any{
		{"key": "CI_JOB_ID", "value": fmt.Sprint(id), "public": true},
		{"key": "CI_JOB_TOKEN", "value": token, "public": false, "masked": true},
		{"key": "CI_PROJECT_ID", "value": fmt.Sprint(s.ProjectID), "public": true},
		{"key": "CI_PROJECT_NAME", "value": "hello", "public": true},
		{"key": "CI_PROJECT_PATH", "value": "group/hello", "public": true},
		{"key": "CI_SERVER_URL", "value": g.URL(), "public": true},
	}
	gitInfo := map[string]any{"repo_url": g.URL() + "/group/hello.git", "ref": "main", "sha": strings.Repeat("a", 40), "before_sha": strings.Repeat("0", 40)}
	if s.Protected != nil {
		gitInfo["protected"] = *s.Protected
	}
	if s.Fetch {
		rp := g.GitRepo(g.t)
		vars = append(vars, map[string]any{"key": "GIT_STRATEGY", "value": "fetch", "public": true})
		gitInfo["sha"], gitInfo["ref_type"], gitInfo["depth"] = rp.sha, "branch", 0
		gitInfo["refspecs"] = []string{"+refs/heads/*:refs/remotes/origin/*"}
	} else {
		vars = append(vars, map[string]any{"key": "GIT_STRATEGY", "value": "none", "public": true})
	}
	var deps []map[string]any
	for _, d := range s.Needs {
		g.mu.Lock()
		size := len(d.artifacts)
		g.mu.Unlock()
		deps = append(deps, map[string]any{"id": d.ID, "token": d.Token, "name": "build",
			"artifacts_file": map[string]any{"filename": "artifacts.zip", "size": size}})
	}
	for k, v := range s.Variables {
		vars = append(vars, map[string]any{"key": k, "value": v, "public": true})
	}
	steps := []map[string]any{{"name": "script", "script": s.Script, "timeout": s.Timeout, "when": "on_success"}}
	if len(s.AfterScript) > 0 {
		steps = append(steps, map[string]any{"name": "after_script", "script": s.AfterScript, "timeout": s.Timeout, "when": "always"})
	}
	j := &Job{ID: id, Token: token, done: make(chan struct{}), Payload: map[string]any{
		"id":           id,
		"token":        token,
		"job_info":     map[string]any{"name": "test", "stage": "test", "project_id": s.ProjectID, "project_name": "hello", "project_full_path": "group/hello", "instance_uuid": "fake-gitlab"},
		"git_info":     gitInfo,
		"runner_info":  map[string]any{"timeout": s.Timeout, "uuid": "fake-runner"},
		"variables":    vars,
		"steps":        steps,
		"cache":        s.Cache,
		"artifacts":    s.Artifacts,
		"dependencies": deps,
		"features": map[string]any{
			"failure_reasons": []string{"script_failure", "runner_system_failure", "job_execution_timeout", "job_canceled"},
			"trace_sections":  true,
		},
	}}
	g.mu.Lock()
	g.queue = append(g.queue, j)
	g.jobs[id] = j
	g.mu.Unlock()
	return j
}

// cancel makes GitLab answer the runner's next trace or update call with Job-Status
// "canceling" (a graceful cancel: after_script still runs) or "canceled" (abort).
func (g *GitLab) Cancel(j *Job, status string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	j.remote = status
}

func (g *GitLab) problem(format string, args ...any) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.problems = append(g.problems, fmt.Sprintf(format, args...))
}

var (
	jobPath   = regexp.MustCompile(`^/api/v4/jobs/(\d+)$`)
	tracePath = regexp.MustCompile(`^/api/v4/jobs/(\d+)/trace$`)
	rangeHdr  = regexp.MustCompile(`^(\d+)-(\d+)$`)
)

func (g *GitLab) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case strings.HasPrefix(r.URL.Path, "/group/hello.git/"):
		g.serveGit(w, r)
		return
	case r.Method == http.MethodPost && artifactsPath.MatchString(r.URL.Path):
		g.uploadArtifacts(w, r, artifactsPath.FindStringSubmatch(r.URL.Path)[1])
		return
	case r.Method == http.MethodGet && artifactsPath.MatchString(r.URL.Path):
		g.downloadArtifacts(w, r, artifactsPath.FindStringSubmatch(r.URL.Path)[1])
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	switch {
	case r.Method == http.MethodPost && r.URL.Path == "/api/v4/jobs/request":
		g.request(w, body)
	case r.Method == http.MethodPut && jobPath.MatchString(r.URL.Path):
		g.update(w, r, jobPath.FindStringSubmatch(r.URL.Path)[1], body)
	case r.Method == http.MethodPatch && tracePath.MatchString(r.URL.Path):
		g.patchTrace(w, r, tracePath.FindStringSubmatch(r.URL.Path)[1], body)
	default:
		g.problem("unexpected %s %s", r.Method, r.URL.Path)
		http.NotFound(w, r)
	}
}

func (g *GitLab) request(w http.ResponseWriter, body []byte) {
	var req struct {
		Token string `json:"token"`
	}
	if json.Unmarshal(body, &req) != nil || req.Token != g.RunnerToken {
		g.problem("job request with a wrong runner token")
		w.WriteHeader(http.StatusForbidden)
		return
	}
	g.mu.Lock()
	if len(g.queue) == 0 {
		g.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
		return
	}
	j := g.queue[0]
	g.queue = g.queue[1:]
	j.taken = time.Now()
	g.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	_ = json.NewEncoder(w).Encode(j.Payload)
}

// job finds the job of a request and checks its job token; nil means answered already.
func (g *GitLab) job(w http.ResponseWriter, r *http.Request, id string, token string) *Job {
	n, _ := strconv.ParseInt(id, 10, 64)
	g.mu.Lock()
	j := g.jobs[n]
	g.mu.Unlock()
	if j == nil {
		g.problem("%s %s: no such job", r.Method, r.URL.Path)
		http.NotFound(w, r)
		return nil
	}
	if token != j.Token {
		g.problem("%s %s: wrong job token", r.Method, r.URL.Path)
		w.WriteHeader(http.StatusForbidden)
		return nil
	}
	return j
}

func (g *GitLab) update(w http.ResponseWriter, r *http.Request, id string, body []byte) {
	var u struct {
		Update
		Token string `json:"token"`
	}
	if err := json.Unmarshal(body, &u); err != nil {
		g.problem("PUT %s: %v", r.URL.Path, err)
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	j := g.job(w, r, id, u.Token)
	if j == nil {
		return
	}
	g.mu.Lock()
	j.updates = append(j.updates, u.Update)
	remote := j.remote
	final := u.State == "success" || u.State == "failed"
	if final && j.finished.IsZero() {
		j.finished = time.Now()
		sum := fmt.Sprintf("crc32:%08x", crc32.ChecksumIEEE(j.trace))
		// After an abort ("canceled") GitLab refuses further trace, so only then may they differ.
		if j.remote != "canceled" && (u.Output.Checksum != sum || u.Output.Bytesize != len(j.trace)) {
			g.problems = append(g.problems, fmt.Sprintf("job %d: final output %s/%d bytes, but the trace received is %s/%d bytes",
				j.ID, u.Output.Checksum, u.Output.Bytesize, sum, len(j.trace)))
		}
	}
	g.mu.Unlock()
	if remote != "" {
		w.Header().Set("Job-Status", remote)
	}
	w.WriteHeader(http.StatusOK)
	if final || remote == "canceled" {
		j.closeOnce.Do(func() { close(j.done) })
	}
}

func (g *GitLab) patchTrace(w http.ResponseWriter, r *http.Request, id string, body []byte) {
	j := g.job(w, r, id, r.Header.Get("Job-Token"))
	if j == nil {
		return
	}
	m := rangeHdr.FindStringSubmatch(r.Header.Get("Content-Range"))
	g.mu.Lock()
	defer g.mu.Unlock()
	w.Header().Set("X-GitLab-Trace-Update-Interval", "1")
	if j.remote != "" {
		w.Header().Set("Job-Status", j.remote)
	}
	if m == nil {
		g.problems = append(g.problems, fmt.Sprintf("trace patch without a Content-Range: %q", r.Header.Get("Content-Range")))
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	start, _ := strconv.Atoi(m[1])
	end, _ := strconv.Atoi(m[2])
	if start != len(j.trace) || end != start+len(body)-1 {
		w.Header().Set("Range", fmt.Sprintf("0-%d", len(j.trace)))
		w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
		return
	}
	j.trace = append(j.trace, body...)
	w.Header().Set("Range", fmt.Sprintf("0-%d", len(j.trace)))
	w.WriteHeader(http.StatusAccepted)
}

// Trace is the job's log as GitLab has it so far.
func (g *GitLab) Trace(j *Job) string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return string(j.trace)
}

// Final is the job's last state update.
func (g *GitLab) Final(j *Job) Update {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(j.updates) == 0 {
		return Update{}
	}
	return j.updates[len(j.updates)-1]
}

// times is when the runner took the job and when it reported it finished.
func (g *GitLab) Times(j *Job) (taken, finished time.Time) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return j.taken, j.finished
}

// wait blocks until the runner reported the job finished (or it was aborted).
func (g *GitLab) Wait(j *Job, limit time.Duration) bool {
	select {
	case <-j.done:
		return true
	case <-time.After(limit):
		return false
	}
}

// TraceLine is one line of a job log: GitLab Runner prefixes each with a timestamp, a
// stream number and O or E (stdout or stderr), and "+" when it continues the previous one.
type TraceLine struct {
	At     time.Time
	Stderr bool
	Text   string
}

var traceLineRE = regexp.MustCompile(`^(\S+) [0-9a-f]{2}([OE])\+? ?(.*)$`)

// ParseTrace splits a job log into lines, without the runner's ANSI colours.
func ParseTrace(trace string) []TraceLine {
	var lines []TraceLine
	ansi := regexp.MustCompile(`\x1b\[[0-9;]*[A-Za-z]`)
	for _, l := range strings.Split(trace, "\n") {
		m := traceLineRE.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, m[1])
		if err != nil {
			continue
		}
		lines = append(lines, TraceLine{At: at, Stderr: m[2] == "E", Text: ansi.ReplaceAllString(m[3], "")})
	}
	return lines
}

// FindLine is the job log's first line that is exactly text, or nil.
func FindLine(trace, text string) *TraceLine {
	for _, l := range ParseTrace(trace) {
		if l.Text == text {
			return &l
		}
	}
	return nil
}

func HasLine(trace, text string) bool { return FindLine(trace, text) != nil }
