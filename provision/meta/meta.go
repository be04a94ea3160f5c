// Package meta is the schema of what libvirt-gci writes into libvirt: an instance's
// <metadata> (whose it is, what it is made of, how to reach it), and the operator's
// template mark. It is pure: no libvirt, no I/O.
package meta

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"strings"
)

// NS is the XML namespace of the <metadata> element libvirt-gci puts on every
// instance it creates. Only domains that carry it are ever torn down.
const NS = "https://gitlab.com/libvirt-gci/xmlns/instance/1"

// Prefix is the XML prefix of NS in a domain's XML.
const Prefix = "gci"

// TemplateNS is the namespace of the <metadata> element that makes a domain a template.
// Only the operator puts it there (`libvirt-gci template mark`): a job can clone a domain
// only if it carries the mark or the operator's LIBVIRT_GCI_TEMPLATES names it.
const TemplateNS = "https://gitlab.com/libvirt-gci/xmlns/template/1"

// TemplatePrefix is the XML prefix of TemplateNS in a domain's XML.
const TemplatePrefix = "gcitmpl"

// TemplateMark is the content of the template mark's element.
type TemplateMark struct {
	XMLName  xml.Name `xml:"template"`
	MarkedAt string   `xml:"marked-at"` // RFC 3339
}

// Metadata is what later stages and cleanup need to know about an instance. It lives in
// the domain's own <metadata>, so the host keeps no state of ours. It is readable by
// read-only libvirt clients: never put secrets here.
type Metadata struct {
	Template  string   `xml:"template"`
	Owner     Owner    `xml:"owner"`
	PrepareID string   `xml:"prepare-id"` // random, one per prepare: a rollback removes only its own
	CreatedAt string   `xml:"created-at"` // RFC 3339
	Volumes   []Volume `xml:"volume"`
	Process   *Process `xml:"runner,omitempty"` // the process that ran prepare, for gc
	// Prepare is the prepare process itself, and ReadyAt (RFC 3339) when it had the
	// instance ready: an instance whose prepare died before that (kill -9, a define that
	// landed after its cleanup looked) will never be used, whatever its runner does.
	Prepare *Process `xml:"prepare,omitempty"`
	ReadyAt string   `xml:"ready-at,omitempty"`
	// PrepareMS is how long its prepare took, from its start to the ready guest (for
	// `metrics`).
	PrepareMS int64  `xml:"prepare-ms,omitempty"`
	FailedAt  string `xml:"failed-at,omitempty"`  // RFC 3339: a stage's script failed (LIBVIRT_GCI_KEEP_FAILED)
	KeepUntil string `xml:"keep-until,omitempty"` // RFC 3339: kept after its failed job; gc removes it then
	// JobDeadline (RFC 3339): its prepare's time plus its job's timeout, from the runner's
	// job response: the job is over by then, whatever became of its cleanup.
	JobDeadline string `xml:"job-deadline,omitempty"`
	// EndingAt (RFC 3339): its job's cleanup paused it for good and left its removal to a
	// process of its own (Host.End); gc removes it if that has not happened in a while.
	EndingAt string `xml:"ending-at,omitempty"`
	// Ender is the process removing an ending instance: its cleanup, then the finisher
	// it started, once that has begun. gc removes an ending instance whose ender is gone.
	Ender *Process `xml:"ender,omitempty"`
	SSH   *SSH     `xml:"ssh,omitempty"` // set when the instance is reached over SSH, or its forwards are
	// Transport is how stages reach the guest: TransportAgent, TransportSSH, or "" (the
	// agent, or ssh where SSH is set: instances made before this field).
	Transport string `xml:"transport,omitempty"`
	// Warm is the warm image the instance was restored from; "" for a cold boot. Its
	// overlays back the instance's: it stays while the instance does.
	Warm string `xml:"warm,omitempty"`
	// URI is the libvirt URI prepare placed the instance by: where LIBVIRT_GCI_URI lists
	// several that reach the same libvirt, run and cleanup take this one.
	URI string `xml:"host,omitempty"`
	// System is systemd's state ("running", "degraded", ...; "none" without systemd)
	// when the guest's memory was saved: set on the domain a warm image is saved from,
	// so that it is in the image. Its restored clones have finished their boot.
	System string `xml:"system,omitempty"`
}

// Owner is whose an instance is: a job's, as GitLab Runner's job response names it, or
// the operator's (made by hand). Stages act only on an instance whose owner is theirs.
type Owner struct {
	Manual    bool   `xml:"manual,attr,omitempty" json:"manual,omitempty"`         // made by hand (prepare --machine)
	Server    string `xml:"server,attr,omitempty" json:"server,omitempty"`         // the GitLab instance
	Runner    string `xml:"runner,attr,omitempty" json:"runner,omitempty"`         // the runner's UUID
	ProjectID string `xml:"project-id,attr,omitempty" json:"project_id,omitempty"` // GitLab's project id
	JobID     string `xml:"job-id,attr,omitempty" json:"job_id,omitempty"`         // GitLab's job id
	Project   string `xml:"project,attr,omitempty" json:"project,omitempty"`       // the project's path, for people; not identity
}

// Process is the process that ran an instance's prepare (GitLab Runner, for a job) on
// its host: once it is gone, or the host rebooted, no cleanup stage will come. (Its XML
// element is <runner>, as instances made before the name was changed have it.)
type Process struct {
	MachineID string `xml:"machine-id,attr"` // /etc/machine-id of the host it ran on
	BootID    string `xml:"boot-id,attr"`    // that host's boot
	PID       int    `xml:"pid,attr"`
	Start     uint64 `xml:"start,attr"` // its start time in clock ticks after boot (/proc/PID/stat), against PID reuse
}

// SSH is how to reach an instance over SSH. Only public data: the client key is derived
// again at every stage, never stored.
type SSH struct {
	Host    string `xml:"host,attr"`
	Port    int    `xml:"port,attr"`
	User    string `xml:"user,attr"`
	HostKey string `xml:"host-key"` // the guest's host public key (authorized_keys format), pinned at prepare
}

// Transports: how stages reach an instance's guest.
const (
	TransportAgent = "agent"
	TransportSSH   = "ssh"
)

// An instance's phase in its job's life, from its metadata alone.
const (
	PhasePreparing = "preparing" // its prepare has not made it ready (or died before)
	PhaseReady     = "ready"     // its job's stages may run
	PhaseKept      = "kept"      // stopped after its job failed, kept to be looked at
	PhaseEnding    = "ending"    // its job's cleanup paused it; its finisher removes it
)

// Phase is where the instance is in its job's life.
func (m Metadata) Phase() string {
	switch {
	case m.EndingAt != "":
		return PhaseEnding
	case m.KeepUntil != "":
		return PhaseKept
	case m.ReadyAt == "":
		return PhasePreparing
	}
	return PhaseReady
}

// StageTransport is how stages reach the instance: TransportSSH where its launch set up
// ssh for them, else TransportAgent (ssh access may be there for the forwards alone).
func (m Metadata) StageTransport() string {
	if m.SSH != nil && m.Transport != TransportAgent {
		return TransportSSH
	}
	return TransportAgent
}

// Volume is a storage volume created for an instance, deleted with it.
type Volume struct {
	Pool string `xml:"pool,attr"`
	Name string `xml:"name,attr"`
}

// MarshalElement renders m as a namespaced element for a domain's <metadata>.
func (m Metadata) MarshalElement() (string, error) {
	var b bytes.Buffer
	enc := xml.NewEncoder(&b)
	enc.Indent("", "  ")
	start := xml.StartElement{
		Name: xml.Name{Local: Prefix + ":instance"},
		Attr: []xml.Attr{{Name: xml.Name{Local: "xmlns:" + Prefix}, Value: NS}},
	}
	if err := enc.EncodeElement(m, start); err != nil {
		return "", fmt.Errorf("encode instance metadata: %w", err)
	}
	return b.String(), nil
}

// MarshalPlain renders m without a namespace, as DomainSetMetadata wants it.
func (m Metadata) MarshalPlain() (string, error) {
	b, err := xml.Marshal(struct {
		XMLName xml.Name `xml:"instance"`
		Metadata
	}{Metadata: m})
	if err != nil {
		return "", fmt.Errorf("encode instance metadata: %w", err)
	}
	return string(b), nil
}

// FromDomain finds the metadata of ours among the elements of a domain's <metadata>
// (inner, as libvirtxml.DomainMetadata.XML holds it); false if there is none.
func FromDomain(inner string) (Metadata, bool) {
	d := xml.NewDecoder(strings.NewReader(inner))
	for {
		tok, err := d.Token()
		if err != nil {
			return Metadata{}, false
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Space == NS {
			var m Metadata
			if d.DecodeElement(&m, &se) != nil {
				return Metadata{}, false
			}
			return m, true
		}
	}
}

// Parse reads the element libvirt returns for NS.
func Parse(s string) (Metadata, error) {
	var m Metadata
	if err := xml.Unmarshal([]byte(s), &m); err != nil {
		return Metadata{}, fmt.Errorf("parse instance metadata: %w", err)
	}
	return m, nil
}
