package executor

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

var validName = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*[a-z0-9]$`)

func owner(job, project string) meta.Owner {
	return meta.Owner{Server: "a1b2c3d4-uuid", Runner: "runner-uuid", ProjectID: "77", JobID: job, Project: project}
}

func TestInstanceName(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		o    meta.Owner
		want string // without the hash
	}{
		{"plain", owner("42", "group/app"), "gci-42-group-app"},
		{"no project", owner("42", ""), "gci-42"},
		{"hostile project", owner("7", "../../etc/passwd; rm -rf / $(reboot)"), "gci-7-etc-passwd-rm-rf-reboot"},
		{"unicode project", owner("7", "Ünïcødé Prøject 🚀"), "gci-7-n-c-d-pr-ject"},
		{"only punctuation", owner("7", "!!!///"), "gci-7"},
		{"long project", owner("123456789", strings.Repeat("very-long-name/", 10)), "gci-123456789-very-long-name-very-long-name-very-l"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := InstanceName("gci-", tc.o)
			require.NoError(t, err)
			assert.Equal(t, tc.want+"-"+identityHash(tc.o), got)
			assert.LessOrEqual(t, len(got), MaxNameLen)
			assert.Regexp(t, validName, got)
		})
	}
}

// Names are unique per owner: identities whose readable parts look alike (the old
// scheme's token ab-12, job 345, project foo against token ab, job 12, project 345-foo)
// and identities that differ in a single part all get names of their own.
func TestInstanceNameIsUniquePerOwner(t *testing.T) {
	t.Parallel()
	seen := map[string]meta.Owner{}
	long := strings.Repeat("p", 200)
	for _, server := range []string{"", "uuid-1", "uuid-12", "https://gitlab.example.com"} {
		for _, runner := range []string{"", "ab", "ab-12", "r1"} {
			for _, project := range []string{"1", "12", "345"} {
				for _, job := range []string{"1", "12", "345", "123456789012"} {
					for _, path := range []string{"foo", "345-foo", long} {
						o := meta.Owner{Server: server, Runner: runner, ProjectID: project, JobID: job, Project: path}
						name, err := InstanceName("gci-", o)
						require.NoError(t, err)
						assert.LessOrEqual(t, len(name), MaxNameLen)
						assert.Regexp(t, validName, name)
						if prev, dup := seen[name]; dup && !sameOwner(prev, o) {
							t.Errorf("%+v and %+v both map to %s", prev, o, name)
						}
						seen[name] = o
						again, _ := InstanceName("gci-", o)
						assert.Equal(t, name, again, "deterministic")
					}
				}
			}
		}
	}
}

func TestInstanceNameRejects(t *testing.T) {
	t.Parallel()
	_, err := InstanceName(strings.Repeat("p", 32), owner("12345678901234567890", ""))
	assert.ErrorContains(t, err, "use a shorter LIBVIRT_GCI_PREFIX")
	_, err = InstanceName("gci-", meta.Owner{Manual: true})
	assert.Error(t, err)
}

func TestReadIdentity(t *testing.T) {
	t.Parallel()
	write := func(s string) string {
		p := filepath.Join(t.TempDir(), "response.json")
		require.NoError(t, os.WriteFile(p, []byte(s), 0o600))
		return p
	}
	id, err := ReadIdentity(write(`{"id": 4242, "token": "glcbt-SECRET", "job_info": {"project_id": 77, "project_full_path": "Group/My Project",
		"instance_uuid": "", "project_name": "My Project"}, "git_info": {"repo_url": "https://gitlab-ci-token:glcbt-SECRET@gitlab.example.com:8443/group/p.git"},
		"runner_info": {"uuid": "r-uuid", "timeout": 3600}, "variables": [{"key": "CI_JOB_ID", "value": "1"}, {"key": "CI_PROJECT_ID", "value": "1"}]}`))
	require.NoError(t, err)
	assert.Equal(t, meta.Owner{Server: "https://gitlab.example.com:8443", Runner: "r-uuid", ProjectID: "77", JobID: "4242", Project: "Group/My Project"}, id.Owner,
		"from the response's own fields, never its variables; the repo URL's credentials dropped")
	assert.False(t, id.Protected, "GitLab did not say: unprotected")
	assert.Equal(t, time.Hour, id.Timeout, "the job's timeout, from runner_info")
	id, err = ReadIdentity(write(`{"id": 1, "job_info": {"project_id": 2, "project_name": "p", "instance_uuid": "inst-uuid"}}`))
	require.NoError(t, err)
	assert.Equal(t, meta.Owner{Server: "inst-uuid", ProjectID: "2", JobID: "1", Project: "p"}, id.Owner)
	assert.Zero(t, id.Timeout, "none said: none")

	// Protected only where the response's git_info says so; no variable makes a job so.
	for body, want := range map[string]bool{
		`{"id": 1, "job_info": {"project_id": 2}, "git_info": {"protected": true}}`:                                                  true,
		`{"id": 1, "job_info": {"project_id": 2}, "git_info": {"protected": false}}`:                                                 false,
		`{"id": 1, "job_info": {"project_id": 2}, "git_info": {"protected": null}}`:                                                  false,
		`{"id": 1, "job_info": {"project_id": 2}, "variables": [{"key": "CI_COMMIT_REF_PROTECTED", "value": "true"}]}`:               false,
		`{"id": 1, "job_info": {"project_id": 2}, "git_info": {}, "variables": [{"key": "LIBVIRT_GCI_PROTECTED", "value": "true"}]}`: false,
	} {
		id, err := ReadIdentity(write(body))
		require.NoError(t, err, body)
		assert.Equal(t, want, id.Protected, body)
	}

	for _, tc := range []struct{ body, want string }{
		{`{"job_info": {"project_id": 2}}`, "has no job id"},
		{`{"id": -3, "job_info": {"project_id": 2}}`, "has no job id"},
		{`{"id": 3}`, "has no project id"},
		{`{"id": "3"}`, "is not a job response"},
		{`not json`, "is not a job response"},
	} {
		_, err := ReadIdentity(write(tc.body))
		assert.ErrorContains(t, err, tc.want, tc.body)
	}
	_, err = ReadIdentity(filepath.Join(t.TempDir(), "missing.json"))
	assert.ErrorContains(t, err, "JOB_RESPONSE_FILE")
}

// Job values come only from CUSTOM_ENV_*: the runner's own environment is not the job's.
func TestJobFromEnv(t *testing.T) {
	t.Parallel()
	env := map[string]string{"DISTRO": "runner-distro", "CI_JOB_IMAGE": "runner-image", "CUSTOM_ENV_DISTRO": "job-distro"}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	assert.Equal(t, Job{Distro: "job-distro"}, JobFromEnv(lookup))
	delete(env, "CUSTOM_ENV_DISTRO")
	assert.Equal(t, Job{}, JobFromEnv(lookup))
}

func TestCheckMachineName(t *testing.T) {
	t.Parallel()
	for _, ok := range []string{"vm1", "gci-manual-abc", "My.VM_2"} {
		assert.NoError(t, CheckMachineName(ok), ok)
	}
	for _, bad := range []string{"", "-x", ".hidden", "a/b", "a b", "x;y", strings.Repeat("a", 64)} {
		assert.Error(t, CheckMachineName(bad), bad)
	}
}

func settings() Settings {
	return Settings{URI: "qemu:///system", Templates: []string{"debian-*", "fedora-40"}, Transport: TransportAgent,
		Config: provision.Config{Pool: "default", Prefix: "gci-", BootTimeout: time.Minute, SSHUser: "root", SecretFile: "/etc/libvirt-gci/secret", Start: provision.StartRestore}}
}

func TestSelectTemplate(t *testing.T) {
	t.Parallel()
	withDefault := settings()
	withDefault.DefaultTemplate = "debian-12"
	for _, tc := range []struct {
		name    string
		s       Settings
		flag    string
		job     Job
		want    Choice
		wantErr string
	}{
		{"distro", settings(), "", Job{Distro: "debian-12"}, Choice{"debian-12", "CUSTOM_ENV_DISTRO", true}, ""},
		{"image", settings(), "", Job{Image: "fedora-40"}, Choice{"fedora-40", "CUSTOM_ENV_CI_JOB_IMAGE (the job's image:)", true}, ""},
		{"distro beats image", settings(), "", Job{Distro: "debian-11", Image: "fedora-40"}, Choice{"debian-11", "CUSTOM_ENV_DISTRO", true}, ""},
		{"flag beats job", settings(), "fedora-40", Job{Distro: "debian-11"}, Choice{"fedora-40", "--distro", true}, ""},
		{"default", withDefault, "", Job{}, Choice{"debian-12", "LIBVIRT_GCI_DEFAULT_TEMPLATE", true}, ""},
		{"not listed: must be marked", settings(), "", Job{Distro: "windows-11"}, Choice{"windows-11", "CUSTOM_ENV_DISTRO", false}, ""},
		{"the operator's flag offers it", settings(), "windows-11", Job{Distro: "debian-11"}, Choice{"windows-11", "--distro", true}, ""},
		{"the operator's default offers it", Settings{DefaultTemplate: "w"}, "", Job{}, Choice{"w", "LIBVIRT_GCI_DEFAULT_TEMPLATE", true}, ""},
		{"default does not widen the list", withDefault, "", Job{Image: "fedora-41"}, Choice{"fedora-41", "CUSTOM_ENV_CI_JOB_IMAGE (the job's image:)", false}, ""},
		{"none", settings(), "", Job{}, Choice{}, "no template chosen"},
		{"glob metacharacters", settings(), "", Job{Distro: "debian-*"}, Choice{}, `template name "debian-*" is invalid`},
		{"path", settings(), "", Job{Image: "../debian-12"}, Choice{}, `template name "../debian-12" is invalid`},
		{"slash", settings(), "", Job{Image: "registry.example.com/debian:12"}, Choice{}, "is invalid"},
		{"shell", settings(), "", Job{Distro: "debian-12;reboot"}, Choice{}, "is invalid"},
		{"newline", settings(), "", Job{Distro: "debian-12\nx"}, Choice{}, "is invalid"},
		{"too long", settings(), "", Job{Distro: "debian-" + strings.Repeat("x", 100)}, Choice{}, "is invalid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := SelectTemplate(tc.s, tc.flag, tc.job)
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantErr)
				assert.NotContains(t, err.Error(), "\n")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestSettingsValidate(t *testing.T) {
	t.Parallel()
	require.NoError(t, settings().Validate())
	ssh := settings()
	ssh.Transport = TransportSSH
	require.NoError(t, ssh.Validate())
	ssh.URI = "qemu+ssh://localhost/system"
	require.NoError(t, ssh.Validate(), "a local host by another way")
	remote := settings()
	remote.URI = "qemu+tls://hv1.example.com/system"
	require.NoError(t, remote.Validate(), "the agent reaches guests on any libvirt")
	ssh.URI = "qemu:///system, qemu+ssh://root@hv1.example.com:2222/system?keyfile=/k&known_hosts=/kh"
	require.NoError(t, ssh.Validate(), "ssh reaches guests through the SSH connection to their host")
	assert.Equal(t, []string{"qemu:///system", "qemu+ssh://root@hv1.example.com:2222/system?keyfile=/k&known_hosts=/kh"}, ssh.URIs())
	for _, tc := range []struct {
		mut  func(*Settings)
		want string
	}{
		{func(s *Settings) { s.Prefix = "GCI_" }, `LIBVIRT_GCI_PREFIX "GCI_" is invalid`},
		{func(s *Settings) { s.Prefix = "" }, `LIBVIRT_GCI_PREFIX "" is invalid`},
		{func(s *Settings) { s.Templates = []string{"[abc"} }, `LIBVIRT_GCI_TEMPLATES pattern "[abc" is invalid`},
		{func(s *Settings) { s.DefaultTemplate = "a b" }, "LIBVIRT_GCI_DEFAULT_TEMPLATE"},
		{func(s *Settings) { s.BootTimeout = 0 }, "LIBVIRT_GCI_BOOT_TIMEOUT"},
		{func(s *Settings) { s.Pool = "" }, "LIBVIRT_GCI_POOL"},
		{func(s *Settings) { s.URI = "" }, "LIBVIRT_GCI_URI"},
		{func(s *Settings) { s.Transport = "telnet" }, `LIBVIRT_GCI_TRANSPORT "telnet" is invalid; want agent or ssh`},
		{func(s *Settings) { s.Transport = TransportSSH; s.SSHUser = "root;id" }, `LIBVIRT_GCI_SSH_USER "root;id" is invalid`},
		{func(s *Settings) { s.Transport = TransportSSH; s.SSHUser = "-oProxyCommand" }, `LIBVIRT_GCI_SSH_USER "-oProxyCommand" is invalid`},
		{func(s *Settings) { s.Transport = TransportSSH; s.SecretFile = "secret" }, `LIBVIRT_GCI_SECRET_FILE "secret" is invalid; want an absolute path`},
		{func(s *Settings) {
			s.Transport = TransportSSH
			s.URI = "qemu:///system qemu+tls://hv1.example.com/system"
		},
			"LIBVIRT_GCI_TRANSPORT ssh cannot reach guests on the libvirt qemu+tls://hv1.example.com/system: their SSH ports are forwarded on that host's 127.0.0.1, which only a qemu+ssh:// connection reaches"},
		{func(s *Settings) { s.URI = "qemu:///system ,hv1" }, `LIBVIRT_GCI_URI "hv1" is not a URI`},
		{func(s *Settings) { s.URI = " , " }, "LIBVIRT_GCI_URI is empty"},
		{func(s *Settings) { s.URI = "qemu+ssh://hv1/system"; s.CacheDir = "/var/cache/gci" },
			"LIBVIRT_GCI_CACHE_DIR is a directory on this host, which the remote libvirt qemu+ssh://hv1/system cannot share"},
	} {
		s := settings()
		tc.mut(&s)
		assert.ErrorContains(t, s.Validate(), tc.want)
	}
	assert.Equal(t, []string{"debian-*", "fedora-40"}, SplitPatterns(" debian-* ,, fedora-40 ,"))
}

func TestExitCode(t *testing.T) {
	t.Parallel()
	codes := ExitCodes{Build: 11, System: 22}
	assert.Equal(t, 0, ExitCode(nil, codes))
	assert.Equal(t, 11, ExitCode(&BuildFailure{Code: 7}, codes))
	assert.Equal(t, 11, ExitCode(fmt.Errorf("run build_script: %w", &BuildFailure{Code: 7}), codes))
	assert.Equal(t, 22, ExitCode(errors.New("libvirt: connection reset"), codes))
	assert.Equal(t, 22, ExitCode(&InputError{"bad"}, codes))

	assert.Equal(t, ExitCodes{Build: 1, System: 2}, RunnerEnv{}.Codes(), "defaults for manual use")
	assert.Equal(t, ExitCodes{Build: 3, System: 4}, RunnerEnv{BuildFailureExitCode: "3", SystemFailureExitCode: "4"}.Codes())
	assert.Equal(t, ExitCodes{Build: 1, System: 2}, RunnerEnv{BuildFailureExitCode: "0", SystemFailureExitCode: "x"}.Codes(), "nonsense falls back")
}

func TestTargetFor(t *testing.T) {
	t.Parallel()
	e := &Executor{Settings: settings()}
	resp := filepath.Join(t.TempDir(), "response.json")
	require.NoError(t, os.WriteFile(resp, []byte(`{"id": 9, "job_info": {"project_id": 5, "project_full_path": "g/p"}, "runner_info": {"uuid": "r"}}`), 0o600))
	tg, err := e.TargetFor("", resp)
	require.NoError(t, err)
	o := meta.Owner{Runner: "r", ProjectID: "5", JobID: "9", Project: "g/p"}
	assert.Equal(t, Target{Name: "gci-9-g-p-" + identityHash(o), Owner: o}, tg)
	tg, err = e.TargetFor("my-vm", resp)
	require.NoError(t, err)
	assert.Equal(t, Target{Name: "my-vm", Owner: meta.Owner{Manual: true}, ByHand: true}, tg, "--machine wins")
	_, err = e.TargetFor("", "")
	assert.ErrorContains(t, err, "use --machine NAME")
}

func TestTargetMine(t *testing.T) {
	t.Parallel()
	me := Target{Name: "x", Owner: owner("1", "g/p")}
	assert.NoError(t, me.mine(meta.Metadata{Owner: owner("1", "renamed/project")}), "the project path is for people, not identity")
	for _, other := range []meta.Owner{owner("2", "g/p"), {Manual: true}, {Server: "other", Runner: "runner-uuid", ProjectID: "77", JobID: "1"}} {
		err := me.mine(meta.Metadata{Owner: other})
		assert.ErrorContains(t, err, `instance "x" belongs to`, "%+v", other)
		assert.ErrorContains(t, err, "leaving it alone")
	}
	assert.NoError(t, Target{Name: "x", ByHand: true}.mine(meta.Metadata{Owner: owner("2", "")}), "the operator may act on any")
}
