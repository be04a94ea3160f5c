package executor

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var validName = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*[a-z0-9]$`)

func TestInstanceName(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		job  Job
		want string
	}{
		{"plain", Job{ID: "42", RunnerToken: "abcd1234", ProjectPath: "group/app"}, "gci-abcd1234-42-group-app"},
		{"no project", Job{ID: "42", RunnerToken: "abcd1234"}, "gci-abcd1234-42"},
		{"hostile project", Job{ID: "7", RunnerToken: "r1", ProjectPath: "../../etc/passwd; rm -rf / $(reboot)"}, "gci-r1-7-etc-passwd-rm-rf-reboot"},
		{"unicode project", Job{ID: "7", RunnerToken: "r1", ProjectName: "Ünïcødé Prøject 🚀"}, "gci-r1-7-n-c-d-pr-ject"},
		{"only punctuation", Job{ID: "7", RunnerToken: "r1", ProjectPath: "!!!///"}, "gci-r1-7"},
		{"long project", Job{ID: "123456789", RunnerToken: "abcd1234", ProjectPath: strings.Repeat("very-long-name/", 10)},
			"gci-abcd1234-123456789-very-long-name-very-long-name-very-long"},
		{"no token", Job{ID: "5"}, "gci-local-5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := InstanceName("gci-", tc.job)
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
			assert.LessOrEqual(t, len(got), MaxNameLen)
			assert.Regexp(t, validName, got)
		})
	}
}

func TestInstanceNameIsUniquePerRunnerAndJob(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("p", 200)
	seen := map[string]string{}
	for _, token := range []string{"abcd1234", "ABCD1234", "abcd_1234", "abcd-1234", "glrt-AbCdEfGhIjKlMnOpQ", "glrt-AbCdEfGhIjKlMnOpq"} {
		for _, id := range []string{"1", "12", "123456789012"} {
			name, err := InstanceName("gci-", Job{ID: id, RunnerToken: token, ProjectPath: long})
			require.NoError(t, err)
			assert.LessOrEqual(t, len(name), MaxNameLen)
			assert.Regexp(t, validName, name)
			key := token + "/" + id
			if prev, dup := seen[name]; dup {
				t.Errorf("%s and %s both map to %s", prev, key, name)
			}
			seen[name] = key
			again, _ := InstanceName("gci-", Job{ID: id, RunnerToken: token, ProjectPath: long})
			assert.Equal(t, name, again, "deterministic")
		}
	}
}

func TestInstanceNameRejects(t *testing.T) {
	t.Parallel()
	for _, id := range []string{"", "abc", "-1", "1 2", "1;reboot", "123456789012345678901", "../1"} {
		_, err := InstanceName("gci-", Job{ID: id, RunnerToken: "r"})
		var ie *InputError
		require.ErrorAs(t, err, &ie, "job id %q", id)
		assert.Contains(t, err.Error(), fmt.Sprintf("CUSTOM_ENV_CI_JOB_ID %q is invalid", id))
	}
	_, err := InstanceName(strings.Repeat("p", 32), Job{ID: "12345678901234567890", RunnerToken: strings.Repeat("x", 40)})
	assert.ErrorContains(t, err, "use a shorter LIBVIRT_GCI_PREFIX")
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
	return Settings{URI: "qemu:///system", Pool: "default", Templates: []string{"debian-*", "fedora-40"}, Prefix: "gci-", BootTimeout: time.Minute,
		Transport: TransportAgent, SSHUser: "root", SecretFile: "/etc/libvirt-gci/secret"}
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
		want    string
		wantErr string
	}{
		{"distro", settings(), "", Job{Distro: "debian-12"}, "debian-12", ""},
		{"image", settings(), "", Job{Image: "fedora-40"}, "fedora-40", ""},
		{"distro beats image", settings(), "", Job{Distro: "debian-11", Image: "fedora-40"}, "debian-11", ""},
		{"flag beats job", settings(), "fedora-40", Job{Distro: "debian-11"}, "fedora-40", ""},
		{"default", withDefault, "", Job{}, "debian-12", ""},
		{"none", settings(), "", Job{}, "", "no template chosen"},
		{"not allowed", settings(), "", Job{Distro: "windows-11"}, "", `template "windows-11" (from CUSTOM_ENV_DISTRO) is not allowed on this runner; allowed: debian-*,fedora-40`},
		{"default does not widen the allowlist", withDefault, "", Job{Image: "fedora-41"}, "", `template "fedora-41"`},
		{"glob metacharacters", settings(), "", Job{Distro: "debian-*"}, "", `template name "debian-*" is invalid`},
		{"path", settings(), "", Job{Image: "../debian-12"}, "", `template name "../debian-12" is invalid`},
		{"slash", settings(), "", Job{Image: "registry.example.com/debian:12"}, "", "is invalid"},
		{"shell", settings(), "", Job{Distro: "debian-12;reboot"}, "", "is invalid"},
		{"newline", settings(), "", Job{Distro: "debian-12\nx"}, "", "is invalid"},
		{"too long", settings(), "", Job{Distro: "debian-" + strings.Repeat("x", 100)}, "", "is invalid"},
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
	for _, tc := range []struct {
		mut  func(*Settings)
		want string
	}{
		{func(s *Settings) { s.Prefix = "GCI_" }, `LIBVIRT_GCI_PREFIX "GCI_" is invalid`},
		{func(s *Settings) { s.Prefix = "" }, `LIBVIRT_GCI_PREFIX "" is invalid`},
		{func(s *Settings) { s.Templates = []string{"[abc"} }, `LIBVIRT_GCI_TEMPLATES pattern "[abc" is invalid`},
		{func(s *Settings) { s.Templates = nil }, "LIBVIRT_GCI_TEMPLATES is empty"},
		{func(s *Settings) { s.DefaultTemplate = "a b" }, "LIBVIRT_GCI_DEFAULT_TEMPLATE"},
		{func(s *Settings) { s.BootTimeout = 0 }, "LIBVIRT_GCI_BOOT_TIMEOUT"},
		{func(s *Settings) { s.Pool = "" }, "LIBVIRT_GCI_POOL"},
		{func(s *Settings) { s.URI = "" }, "LIBVIRT_GCI_URI"},
		{func(s *Settings) { s.Transport = "telnet" }, `LIBVIRT_GCI_TRANSPORT "telnet" is invalid; want agent or ssh`},
		{func(s *Settings) { s.Transport = TransportSSH; s.SSHUser = "root;id" }, `LIBVIRT_GCI_SSH_USER "root;id" is invalid`},
		{func(s *Settings) { s.Transport = TransportSSH; s.SSHUser = "-oProxyCommand" }, `LIBVIRT_GCI_SSH_USER "-oProxyCommand" is invalid`},
		{func(s *Settings) { s.Transport = TransportSSH; s.SecretFile = "secret" }, `LIBVIRT_GCI_SECRET_FILE "secret" is invalid; want an absolute path`},
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
	tg, err := e.TargetFor("", Job{ID: "9", RunnerToken: "tok"})
	require.NoError(t, err)
	assert.Equal(t, "gci-tok-9", tg.Name)
	tg, err = e.TargetFor("my-vm", Job{ID: "9"})
	require.NoError(t, err)
	assert.Equal(t, "my-vm", tg.Name, "--machine wins")
	_, err = e.TargetFor("", Job{})
	assert.ErrorContains(t, err, "use --machine NAME")
}

func TestLingeringEndsAfterItsParent(t *testing.T) {
	t.Parallel()
	parent, cancelParent := context.WithCancel(context.Background())
	ctx, cancel := lingering(parent, 100*time.Millisecond)
	defer cancel()
	cancelParent()
	ended := time.Now()
	select {
	case <-ctx.Done():
		t.Fatal("ended with its parent")
	case <-time.After(50 * time.Millisecond):
	}
	select {
	case <-ctx.Done():
		assert.GreaterOrEqual(t, time.Since(ended), 100*time.Millisecond)
		assert.ErrorIs(t, context.Cause(ctx), context.Canceled)
		assert.ErrorContains(t, context.Cause(ctx), "and 100ms more passed")
	case <-time.After(5 * time.Second):
		t.Fatal("did not end after its parent")
	}
}
