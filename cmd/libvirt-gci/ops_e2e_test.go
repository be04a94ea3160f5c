package main

import (
	"encoding/json"
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
