package provision

import (
	"context"
	"encoding/xml"
	"errors"
	"io"
	"strings"
	"testing"
	"unicode"

	"libvirt.org/go/libvirtxml"

	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// Seed corpora: testdata/fuzz/<target>/ (committed), plus the f.Add calls below.

// The instance XML made from any template that parses is well-formed, and what the job
// response says (the project path, here) is data in the metadata, never markup.
func FuzzInstanceXML(f *testing.F) {
	f.Add(`<domain type='kvm'><name>t</name><devices><disk type='file' device='disk'><source file='/i/t.qcow2'/><target dev='vda'/><driver name='qemu' type='qcow2'/></disk></devices></domain>`, `Group/<b>"x"</b> & ]]>`, false)
	f.Add(`<domain type='kvm'><name>t</name><metadata><x:y xmlns:x="u"/></metadata><devices><graphics type='vnc' port='5900'/><serial type='file'><source path='/x'/></serial></devices></domain>`, `</gci:owner><gci:owner manual="yes">`, true)
	f.Fuzz(func(t *testing.T, domainXML, project string, ssh bool) {
		tmpl, err := template.Parse(domainXML)
		if err != nil {
			return
		}
		h := &Host{Config: Config{Pool: "default"}}
		// What the executor passes on: printable, as ReadIdentity makes it.
		project = strings.Map(func(r rune) rune {
			if !unicode.IsPrint(r) {
				return -1
			}
			return r
		}, strings.ToValidUTF8(project, ""))
		req := Request{Name: "gci-1-x-0123456789ab", Owner: meta.Owner{JobID: "1", ProjectID: "2", Project: project}, Transport: meta.TransportAgent}
		if ssh {
			req.Transport = meta.TransportSSH
		}
		p := &plan{Request: req, tmpl: tmpl, prepareID: "0123456789abcdef"}
		l, _, err := (coldBoot{h}).Plan(context.Background(), nil, p)
		if err != nil {
			return
		}
		spec := l.Spec
		dec := xml.NewDecoder(strings.NewReader(spec.DomainXML))
		for {
			_, err := dec.Token()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("instance XML is not well-formed: %v\n%s", err, spec.DomainXML)
			}
		}
		var dom libvirtxml.Domain
		if err := dom.Unmarshal(spec.DomainXML); err != nil {
			t.Fatalf("instance XML does not parse: %v", err)
		}
		if dom.Name != req.Name || dom.Metadata == nil {
			t.Fatalf("name %q, metadata %v", dom.Name, dom.Metadata)
		}
		var m struct {
			Owner meta.Owner `xml:"owner"`
		}
		if err := xml.Unmarshal([]byte(dom.Metadata.XML), &m); err != nil {
			t.Fatalf("metadata: %v\n%s", err, dom.Metadata.XML)
		}
		if m.Owner != req.Owner {
			t.Fatalf("owner read back as %+v, want %+v", m.Owner, req.Owner)
		}
	})
}
