package executor

import (
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"
)

// Seed corpora: testdata/fuzz/<target>/ (committed), plus the f.Add calls below.

// Whatever the job response says, the identity read from it gives a valid name of at most
// 63 characters, the same every time, and other identities get other names.
func FuzzIdentityAndName(f *testing.F) {
	f.Add([]byte(`{"id": 4242, "job_info": {"project_id": 77, "project_full_path": "Group/My Project", "instance_uuid": "u"}, "runner_info": {"uuid": "r"}}`), "gci-", "1")
	f.Add([]byte(`{"id": 1, "job_info": {"project_id": 2, "project_name": "<x y='1'>&"}, "git_info": {"repo_url": "https://user:tok@h:1/p"}}`), "a", "12")
	f.Fuzz(func(t *testing.T, response []byte, prefix, otherJob string) {
		id, err := parseIdentity(response)
		o := id.Owner
		if err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error of more than one line: %q", err)
			}
			return
		}
		if !prefixRE.MatchString(prefix) {
			prefix = "gci-"
		}
		name, err := InstanceName(prefix, o)
		if err != nil {
			return // a prefix too long for the job id: a settings error
		}
		if !regexp.MustCompile(`^[a-z0-9][a-z0-9-]*[a-z0-9]$`).MatchString(name) || len(name) > MaxNameLen {
			t.Fatalf("invalid name %q for %+v", name, o)
		}
		if again, _ := InstanceName(prefix, o); again != name {
			t.Fatalf("not deterministic: %q, then %q", name, again)
		}
		other := o
		other.JobID = otherJob
		if otherJob != o.JobID && otherJob != "" {
			if n2, err := InstanceName(prefix, other); err == nil && n2 == name {
				t.Fatalf("jobs %q and %q share the name %q", o.JobID, otherJob, name)
			}
		}
		for _, part := range []string{o.Server, o.Runner, o.Project} {
			if !utf8.ValidString(part) || strings.ContainsAny(part, "\x00\n\r\t") {
				t.Fatalf("identity part %q is not printable", part)
			}
		}
	})
}

// A job's template choice is a valid name, or a one-line error; settings that validate
// never panic a choice.
func FuzzSelectTemplate(f *testing.F) {
	f.Add("", "debian-12", "", "debian-*,fedora-40", "")
	f.Add("x", "../etc", "alpine:3.20", "*", "tiny-bookworm")
	f.Add("", "", "", "[", "a b")
	f.Fuzz(func(t *testing.T, flag, distro, image, patterns, def string) {
		s := settings()
		s.Templates = SplitPatterns(patterns)
		s.DefaultTemplate = def
		if err := s.Validate(); err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error of more than one line: %q", err)
			}
			return
		}
		c, err := SelectTemplate(s, flag, Job{Distro: distro, Image: image})
		if err != nil {
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error of more than one line: %q", err)
			}
			return
		}
		if checkTemplateName(c.Name) != nil {
			t.Fatalf("invalid template name chosen: %q", c.Name)
		}
		if c.Name != flag && c.Name != distro && c.Name != image && c.Name != def {
			t.Fatalf("chose %q, which no one named", c.Name)
		}
	})
}
