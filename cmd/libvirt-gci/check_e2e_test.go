package main

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// template check, on the test template (every check passes, and a throwaway clone
// boots), and on a domain that fails three checks, each with its hint.
func TestTemplateCheck(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	r := j.stage("template", "check", "--boot", testTmpl)
	require.Equal(t, 0, r.code, r.stdout+r.stderr)
	for _, l := range strings.Split(strings.TrimSpace(r.stdout), "\n") {
		assert.True(t, strings.HasPrefix(l, "ok    "), l)
	}
	assert.Contains(t, r.stdout, "ok    the guest agent channel\n")
	assert.Regexp(t, `ok    a throwaway clone booted to a ready guest \(agent\) in \d+\.\d s`, r.stdout)
	assert.Contains(t, r.stderr, "guest agent ready after", "the boot's own progress lines")

	bad := "bad-" + j.jobID
	j.defineTemplate(bad, `(?s)<channel type='unix'>.*?</channel>`, "", `<source file='[^']+'/>`, "<source file='/nonexistent/root.qcow2'/>")
	r = j.stage("template", "check", bad)
	assert.Equal(t, 2, r.code, r.stdout+r.stderr)
	assert.Contains(t, r.stdout, "FAIL  offered to jobs (marked, or listed in LIBVIRT_GCI_TEMPLATES): libvirt-gci template mark "+bad+"\n")
	assert.Contains(t, r.stdout, "FAIL  the guest agent channel: add <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>")
	assert.Contains(t, r.stdout, "FAIL  disk vda (/nonexistent/root.qcow2, qcow2) readable by libvirt: libvirt cannot read it: ")
	assert.Contains(t, r.stdout, "ok    shut off\n")
	assert.Contains(t, r.stderr, bad+" is not usable as a template: 3 of ")
}
