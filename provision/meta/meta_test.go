package meta

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMetadataRoundTrip(t *testing.T) {
	t.Parallel()
	m := Metadata{Template: "debian-12", Owner: Owner{Server: "https://gitlab.example.com", Runner: "r-uuid", ProjectID: "7", JobID: "42", Project: "g/p <&>\""}, PrepareID: "0123456789abcdef", CreatedAt: "2026-11-22T10:00:00Z",
		Volumes: []Volume{{Pool: "default", Name: "x-vda.qcow2"}}}
	s, err := m.MarshalElement()
	require.NoError(t, err)
	assert.Contains(t, s, `<gci:instance xmlns:gci="`+NS+`">`)
	assert.Contains(t, s, `project="g/p &lt;&amp;&gt;&#34;"`)
	// libvirt hands the element back with the prefix it was stored with.
	got, err := Parse(s)
	require.NoError(t, err)
	assert.Equal(t, m, got)
}

// The transport of the stages: ssh only where the launch set it up for them; ssh access
// for the forwards alone leaves them on the agent; instances from before the field
// go by their ssh access.
func TestStageTransport(t *testing.T) {
	t.Parallel()
	ssh := &SSH{Host: "127.0.0.1", Port: 2222}
	assert.Equal(t, TransportAgent, Metadata{}.StageTransport())
	assert.Equal(t, TransportSSH, Metadata{SSH: ssh, Transport: TransportSSH}.StageTransport())
	assert.Equal(t, TransportAgent, Metadata{SSH: ssh, Transport: TransportAgent}.StageTransport())
	assert.Equal(t, TransportSSH, Metadata{SSH: ssh}.StageTransport())
}

// A warm image's domain XML carries the metadata of the domain it was saved from,
// perhaps beside another application's.
func TestFromDomain(t *testing.T) {
	t.Parallel()
	inner := `<other:x xmlns:other="urn:other"><other:system>no</other:system></other:x>` +
		`<gci:instance xmlns:gci="` + NS + `"><gci:template>t</gci:template><gci:system>running</gci:system></gci:instance>`
	m, ok := FromDomain(inner)
	require.True(t, ok)
	assert.Equal(t, "running", m.System)
	assert.Equal(t, "t", m.Template)
	_, ok = FromDomain(`<other:x xmlns:other="urn:other"/>`)
	assert.False(t, ok)
	_, ok = FromDomain("")
	assert.False(t, ok)
}
