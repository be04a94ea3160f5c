package fakegitlab

// The fake GitLab's project repository (git's smart HTTP protocol, served by
// git http-backend) and job artifacts (GitLab's job artifacts API: upload with the job's
// token, download by a later job with its own).

import (
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/cgi"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

var artifactsPath = regexp.MustCompile(`^/api/v4/jobs/(\d+)/artifacts$`)

// repo is the project group/hello: a bare repository with one commit, made on first use.
type Repository struct {
	root    string // GIT_PROJECT_ROOT
	sha     string // the commit of main
	Content string // src/greeting.txt in it
}

// gitRepo makes the project's repository, once.
func (g *GitLab) GitRepo(t testing.TB) *Repository {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.repo != nil {
		return g.repo
	}
	root := t.TempDir()
	work := filepath.Join(root, "work")
	r := &Repository{root: root, Content: "hello from the repository " + strings.ToLower(rand.Text()) + "\n"}
	git := func(dir string, args ...string) string {
		cmd := exec.Command("git", args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GIT_AUTHOR_NAME=t", "GIT_AUTHOR_EMAIL=t@example.com", "GIT_COMMITTER_NAME=t", "GIT_COMMITTER_EMAIL=t@example.com")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("git %v: %v: %s", args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if err := os.MkdirAll(filepath.Join(work, "src"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(work, "src", "greeting.txt"), []byte(r.Content), 0o644); err != nil {
		t.Fatal(err)
	}
	git(work, "init", "-q", "-b", "main")
	git(work, "add", ".")
	git(work, "commit", "-q", "-m", "first")
	r.sha = git(work, "rev-parse", "HEAD")
	if err := os.MkdirAll(filepath.Join(root, "group"), 0o755); err != nil {
		t.Fatal(err)
	}
	git(root, "clone", "-q", "--bare", work, filepath.Join(root, "group", "hello.git"))
	g.repo = r
	return r
}

// serveGit answers git's smart HTTP protocol for the project, with git http-backend.
func (g *GitLab) serveGit(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	rp := g.repo
	g.mu.Unlock()
	gitPath, err := exec.LookPath("git")
	if rp == nil || err != nil {
		g.problem("git request %s without a repository", r.URL.Path)
		http.NotFound(w, r)
		return
	}
	g.mu.Lock()
	g.gitRequests++
	g.mu.Unlock()
	h := &cgi.Handler{Path: gitPath, Args: []string{"http-backend"},
		Env: []string{"GIT_PROJECT_ROOT=" + rp.root, "GIT_HTTP_EXPORT_ALL=1"}}
	h.ServeHTTP(w, r)
}

// uploadArtifacts takes POST /api/v4/jobs/:id/artifacts (multipart, field "file").
func (g *GitLab) uploadArtifacts(w http.ResponseWriter, r *http.Request, id string) {
	j := g.job(w, r, id, r.Header.Get("Job-Token"))
	if j == nil {
		return
	}
	f, _, err := r.FormFile("file")
	if err != nil {
		g.problem("artifacts upload of job %s: %v", id, err)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	b, err := io.ReadAll(f)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	g.mu.Lock()
	j.artifacts = b
	g.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	_, _ = io.WriteString(w, "{}")
}

// downloadArtifacts answers GET /api/v4/jobs/:id/artifacts for a job whose token is that
// of any job of the project (a later job downloads with its own).
func (g *GitLab) downloadArtifacts(w http.ResponseWriter, r *http.Request, id string) {
	n, _ := strconv.ParseInt(id, 10, 64)
	token := r.Header.Get("Job-Token")
	g.mu.Lock()
	j := g.jobs[n]
	known := false
	for _, o := range g.jobs {
		known = known || o.Token == token
	}
	var b []byte
	if j != nil {
		b = j.artifacts
	}
	g.mu.Unlock()
	switch {
	case !known:
		g.problem("artifacts download of job %s with an unknown token", id)
		w.WriteHeader(http.StatusForbidden)
	case b == nil:
		http.NotFound(w, r)
	default:
		w.Header().Set("Content-Type", "application/zip")
		w.Header().Set("Content-Length", fmt.Sprint(len(b)))
		_, _ = w.Write(b)
	}
}

// Artifacts is the archive the job uploaded, if any.
func (g *GitLab) Artifacts(j *Job) []byte {
	g.mu.Lock()
	defer g.mu.Unlock()
	return j.artifacts
}
