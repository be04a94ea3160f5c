package main

import (
	"encoding/json"
	"os/exec"
	"regexp"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// list shows a job's instance with its owner, template, state and size; a domain that
// only has an instance-like name is not listed (instances are found by metadata).
func TestList(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.prepare()
	impostor := j.prefix + "not-ours"
	dom, err := j.l.DomainDefineXMLFlags(templateVariant(t, j.l, impostor), 0)
	require.NoError(t, err)
	t.Cleanup(func() { _ = j.l.DomainUndefine(dom) })

	r := j.stage("list", "--json")
	require.Equal(t, 0, r.code, r.stderr)
	var list []struct {
		Name, State, Template, Transport string
		Owner                            struct {
			JobID     string `json:"job_id"`
			ProjectID string `json:"project_id"`
		} `json:"owner"`
		CPUs      int `json:"cpus"`
		MemoryMiB int `json:"memory_mib"`
		Volumes   int
	}
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &list), r.stdout)
	var mine []string
	for _, l := range list {
		assert.NotEqual(t, impostor, l.Name, "a domain without our metadata is listed")
		if l.Name != j.instance() {
			continue
		}
		mine = append(mine, l.Name)
		assert.Equal(t, "running", l.State)
		assert.Equal(t, testTmpl, l.Template)
		assert.Equal(t, "agent", l.Transport)
		assert.Positive(t, l.CPUs)
		assert.Positive(t, l.MemoryMiB)
		assert.Equal(t, 1, l.Volumes)
		assert.Equal(t, j.jobID, l.Owner.JobID)
		assert.Equal(t, "77", l.Owner.ProjectID)
	}
	assert.Len(t, mine, 1, r.stdout)
	r = j.stage("list")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, j.instance())
	assert.Contains(t, r.stdout, "job "+j.jobID+" of project 77 on e2e-gitlab")
	r = j.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
}

// gc removes an instance whose runner is gone (here: prepare run by a shell that then
// exits, as a crashed gitlab-runner would), keeps one whose runner is alive, and never
// touches a domain without our metadata.
func TestGC(t *testing.T) {
	t.Parallel()
	orphan, alive := newJob(t), newJob(t)
	cmd := exec.Command("sh", "-c", `"$0" prepare; true`, binPath)
	cmd.Env = orphan.environ()
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	alive.prepare()
	impostor := alive.prefix + "not-ours"
	dom, err := alive.l.DomainDefineXMLFlags(templateVariant(t, alive.l, impostor), 0)
	require.NoError(t, err)
	t.Cleanup(func() { _ = alive.l.DomainUndefine(dom) })
	gone, kept := orphan.instance(), alive.instance()

	r := alive.stage("gc", "--dry-run")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `(?m)^would remove `+regexp.QuoteMeta(gone)+`: the runner that prepared it \(pid \d+\) is gone$`, r.stdout)
	assert.NotContains(t, r.stdout, kept)
	assert.NotContains(t, r.stdout, impostor)
	_, err = alive.l.DomainLookupByName(gone)
	require.NoError(t, err, "a dry run removed it")

	r = alive.stage("gc", "--older-than", "1h")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stderr, "gc: removed "+gone+": the runner that prepared it")
	assert.Empty(t, leftovers(t, orphan.l, orphan.prefix), "the orphan's domain and volumes")
	_, err = alive.l.DomainLookupByName(kept)
	assert.NoError(t, err, "an instance whose runner is alive (and younger than 1h) was removed")
	_, err = alive.l.DomainLookupByName(impostor)
	assert.NoError(t, err, "a domain without our metadata was touched")

	r = alive.run("build_script", "echo still mine")
	assert.Equal(t, 0, r.code, r.stderr)
	r = alive.stage("cleanup")
	assert.Equal(t, 0, r.code, r.stderr)
}
