package executor

import (
	"flag"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

var updateREADME = flag.Bool("update-readme", false, "rewrite README.rst's settings table from SettingList")

// README.rst's settings table is SettingList's: a setting added, renamed or changed
// shows there, or this fails (go test ./executor -run README -update-readme rewrites it).
func TestREADMESettingsTable(t *testing.T) {
	const readme = "../README.rst"
	b, err := os.ReadFile(readme)
	require.NoError(t, err)
	doc := string(b)
	const head = "Settings (the operator's; never read from the job)\n---------------------------------------------------\n\n"
	start := strings.Index(doc, head)
	require.NotEqual(t, -1, start, "no settings section in README.rst")
	start += len(head)
	end := strings.Index(doc[start:], "\n\n")
	require.NotEqual(t, -1, end)
	end += start + 1
	want := SettingsTable()
	if *updateREADME {
		require.NoError(t, os.WriteFile(readme, []byte(doc[:start]+want+doc[end:]), 0o644))
		return
	}
	assert.Equal(t, want, doc[start:end], "README.rst's settings table is stale: go test ./executor -run README -update-readme")
}

func TestSettingsParse(t *testing.T) {
	t.Parallel()
	var s Settings
	for _, d := range SettingList {
		require.NoError(t, d.Set(&s, d.DefaultValue()), d.Flag)
		assert.True(t, strings.HasPrefix(d.Env(), "LIBVIRT_GCI_"))
	}
	assert.Equal(t, Settings{URI: "qemu:///system", Transport: "agent", RunnerBinary: "auto", LogFormat: "text", CacheSize: 10 << 30, CacheMaxIdle: 7 * 24 * time.Hour,
		Config: provision.Config{Pool: "default", Prefix: "gci-", Limits: provision.Limits{Kept: 4, KeptPerProject: 1, WarmSizes: 4, DiskFull: true}, JobGrace: 10 * time.Minute, BootTimeout: 5 * time.Minute, Start: "restore", SSHUser: "root", SecretFile: defaultSecretFile(),
			BaseImages: provision.BaseImages{CPUs: 2, Memory: 2 << 30, Network: "default"}}}, s)
	require.NoError(t, s.Validate(), "the defaults are valid")

	find := func(flag string) Setting {
		for _, d := range SettingList {
			if d.Flag == flag {
				return d
			}
		}
		t.Fatalf("no setting %s", flag)
		return Setting{}
	}
	assert.EqualError(t, find("boot-timeout").Set(&s, "soon"), `LIBVIRT_GCI_BOOT_TIMEOUT "soon" is invalid; want a duration such as 90s or 5m`)
	assert.EqualError(t, find("disk-reserve").Set(&s, "lots"), `LIBVIRT_GCI_DISK_RESERVE "lots" is invalid; want full, a size such as 50G, or 0`)
	require.NoError(t, find("disk-reserve").Set(&s, "50G"))
	assert.Equal(t, provision.Limits{DiskReserve: 50 << 30}, provision.Limits{DiskFull: s.Limits.DiskFull, DiskReserve: s.Limits.DiskReserve})
	require.NoError(t, find("disk-reserve").Set(&s, "0"))
	assert.False(t, s.Limits.DiskFull || s.Limits.DiskReserve > 0, "0: no check")
	require.NoError(t, find("disk-reserve").Set(&s, "full"))
	assert.Equal(t, provision.Limits{DiskFull: true}, provision.Limits{DiskFull: s.Limits.DiskFull, DiskReserve: s.Limits.DiskReserve})
	assert.EqualError(t, find("allow-host-access").Set(&s, "maybe"), `LIBVIRT_GCI_ALLOW_HOST_ACCESS "maybe" is invalid; want true or false`)
	assert.EqualError(t, find("runner-binary").Set(&s, "bin/gitlab-runner"), `LIBVIRT_GCI_RUNNER_BINARY "bin/gitlab-runner" is invalid; want auto (the gitlab-runner that drives the job), an absolute path, or none`)
	require.NoError(t, find("templates").Set(&s, " a-* ,b"))
	assert.Equal(t, []string{"a-*", "b"}, s.Templates)
}

func TestParseSize(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]uint64{"2G": 2 << 30, "512M": 512 << 20, "2GiB": 2 << 30, "1073741824": 1 << 30, "16k": 16 << 10, " 1T ": 1 << 40} {
		got, err := ParseSize(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, bad := range []string{"", "G", "-1G", "1.5G", "2X", "1G;reboot", "99999999999999999999", "9999999999T"} {
		_, err := ParseSize(bad)
		assert.Error(t, err, bad)
	}
	assert.Equal(t, "2G", FormatSize(2<<30))
	assert.Equal(t, "1536M", FormatSize(1536<<20))
	assert.Equal(t, "1000", FormatSize(1000))
}

func TestJobSize(t *testing.T) {
	t.Parallel()
	s := settings()
	z, err := JobSize(s, Job{})
	require.NoError(t, err)
	assert.Equal(t, Size{}, z, "nothing asked: the template's size")
	_, err = JobSize(s, Job{CPUs: "2"})
	assert.EqualError(t, err, "CUSTOM_ENV_LIBVIRT_GCI_CPUS 2 is more than this runner allows (LIBVIRT_GCI_MAX_CPUS is not set: jobs keep the template's size)")

	s.MaxCPUs, s.MaxMemory, s.MaxDisk = 4, 8<<30, 50<<30
	z, err = JobSize(s, Job{CPUs: "4", Memory: "2G", Disk: "20G"})
	require.NoError(t, err)
	assert.Equal(t, Size{CPUs: 4, Memory: 2 << 30, Disk: 20 << 30}, z)
	assert.Equal(t, "4 CPUs, 2G memory, 20G disk", z.String())
	for job, want := range map[Job]string{
		{CPUs: "5"}:          "CUSTOM_ENV_LIBVIRT_GCI_CPUS 5 is more than this runner allows (LIBVIRT_GCI_MAX_CPUS 4)",
		{CPUs: "0"}:          `CUSTOM_ENV_LIBVIRT_GCI_CPUS "0" is invalid; want a whole number of CPUs, 1 or more`,
		{CPUs: "two"}:        `CUSTOM_ENV_LIBVIRT_GCI_CPUS "two" is invalid`,
		{Memory: "9G"}:       "CUSTOM_ENV_LIBVIRT_GCI_MEMORY 9G is more than this runner allows (LIBVIRT_GCI_MAX_MEMORY 8G)",
		{Memory: "1M"}:       `CUSTOM_ENV_LIBVIRT_GCI_MEMORY "1M" is invalid; want at least 64M`,
		{Memory: "lots"}:     `CUSTOM_ENV_LIBVIRT_GCI_MEMORY "lots" is invalid; want a size such as 512M or 2G`,
		{Disk: "1T"}:         "CUSTOM_ENV_LIBVIRT_GCI_DISK 1T is more than this runner allows (LIBVIRT_GCI_MAX_DISK 50G)",
		{Disk: "20G;reboot"}: `CUSTOM_ENV_LIBVIRT_GCI_DISK "20G;reboot" is invalid`,
	} {
		_, err := JobSize(s, job)
		var ie *InputError
		require.ErrorAs(t, err, &ie, "%+v", job)
		assert.Contains(t, err.Error(), want)
	}
}

// The package's settings file names every setting once, commented out, at a value its
// setting accepts: uncommenting a line never breaks the runner.
func TestEnvironmentFile(t *testing.T) {
	t.Parallel()
	f := EnvironmentFile()
	for _, d := range SettingList {
		re := regexp.MustCompile(`(?m)^#` + d.Env() + `=(.*)$`)
		m := re.FindAllStringSubmatch(f, -1)
		require.Len(t, m, 1, d.Env())
		v := strings.Trim(m[0][1], `"`)
		if d.Compute != nil {
			assert.Empty(t, v, "%s: a per-user default is not written", d.Env())
			continue
		}
		var s Settings
		assert.NoError(t, d.Set(&s, v), "%s=%s", d.Env(), v)
	}
	for _, l := range strings.Split(f, "\n") {
		assert.True(t, l == "" || strings.HasPrefix(l, "#"), "nothing is set by default: %q", l)
		assert.LessOrEqual(t, len(l), 100, "%q", l)
	}
}
