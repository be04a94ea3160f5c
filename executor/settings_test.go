package executor

import (
	"flag"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
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
	assert.Equal(t, Settings{URI: "qemu:///system", Pool: "default", Prefix: "gci-", BootTimeout: 5 * time.Minute, Transport: "agent",
		SSHUser: "root", SecretFile: defaultSecretFile()}, s)
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
	assert.EqualError(t, find("allow-host-access").Set(&s, "maybe"), `LIBVIRT_GCI_ALLOW_HOST_ACCESS "maybe" is invalid; want true or false`)
	require.NoError(t, find("templates").Set(&s, " a-* ,b"))
	assert.Equal(t, []string{"a-*", "b"}, s.Templates)
}
