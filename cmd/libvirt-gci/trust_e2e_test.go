package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"libvirt.org/go/libvirtxml"
)

// bootID is a run stage that prints the guest's boot id: it tells VMs apart.
const bootID = `cat /proc/sys/kernel/random/boot_id`

// A job that sets another job's CI_JOB_ID, project and runner token in its own variables
// gets a VM of its own: the victim's VM, and what its later stages run in, stay the
// victim's. (Before, the forged variables gave the attacker the victim's instance name,
// and its prepare replaced the victim's VM.)
func TestJobCannotTakeOverAnotherJobsVM(t *testing.T) {
	t.Parallel()
	victim := newJob(t)
	victim.prepare()
	r := victim.run("build_script", `echo secret-of-the-victim > /root/mark; `+bootID)
	require.Equal(t, 0, r.code, r.stderr)
	victimBoot := r.stdout

	attacker := newJob(t)
	attacker.prefix = victim.prefix // one runner: same settings
	attacker.env["LIBVIRT_GCI_PREFIX"] = victim.prefix
	for k, v := range map[string]string{
		"CUSTOM_ENV_CI_JOB_ID":             victim.jobID,
		"CUSTOM_ENV_CI_PROJECT_PATH":       "Group/My Project!",
		"CUSTOM_ENV_CI_PROJECT_ID":         "77",
		"CUSTOM_ENV_CI_RUNNER_SHORT_TOKEN": "t3stRunner",
		"CI_JOB_ID":                        victim.jobID, // not even the unprefixed names count
	} {
		attacker.env[k] = v
	}
	require.NotEqual(t, victim.instance(), attacker.instance())
	attacker.prepare()
	r = attacker.run("build_script", `cat /root/mark 2>/dev/null || echo no mark; `+bootID)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "no mark")
	assert.NotContains(t, r.stdout, victimBoot)
	r = attacker.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)

	r = victim.run("after_script", `cat /root/mark; `+bootID)
	require.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "secret-of-the-victim\n"+victimBoot, r.stdout, "the victim's later stages run in the victim's VM")
}

// A domain that has the job's instance name but another owner (here: one made by hand
// under that name) is a system failure for every stage of the job, and is left alone.
func TestInstanceOfAnotherOwnerIsLeftAlone(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	name := j.instance()
	r := j.stage("prepare", "--machine", name, "--distro", testTmpl)
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { j.stage("cleanup", "--machine", name) })
	dom, err := j.l.DomainLookupByName(name)
	require.NoError(t, err)

	want := fmt.Sprintf(`instance %q belongs to the operator (made by hand), not to job %s of project 77 on e2e-gitlab; leaving it alone`, name, j.jobID)
	for _, stage := range [][]string{{"prepare"}, {"run", j.script("x.sh", "echo ran"), "build_script"}, {"cleanup"}} {
		r = j.stage(stage...)
		assert.Equal(t, 2, r.code, "%s: SYSTEM_FAILURE_EXIT_CODE", stage[0])
		assert.Contains(t, r.stderr, want, stage[0])
		assert.NotContains(t, r.stdout, "ran")
		again, err := j.l.DomainLookupByName(name)
		require.NoError(t, err, "%s removed the other owner's domain", stage[0])
		assert.Equal(t, dom.UUID, again.UUID, "%s replaced the other owner's domain", stage[0])
	}
	r = j.stage("cleanup", "--machine", name)
	assert.Equal(t, 0, r.code, "the operator may remove it: %s", r.stderr)
}

// Two prepares of one job at once: whichever loses, its rollback removes only what it
// made, so the VM a successful prepare reported is there for the next stage.
func TestConcurrentPreparesOfOneJob(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	var wg sync.WaitGroup
	results := make([]result, 2)
	for i := range results {
		wg.Add(1)
		go func() { defer wg.Done(); results[i] = j.stage("prepare") }()
	}
	wg.Wait()
	t.Cleanup(func() { j.stage("cleanup") })
	ok := 0
	for _, r := range results {
		if r.code == 0 {
			ok++
		}
	}
	require.NotZero(t, ok, "neither prepare succeeded:\n%s\n---\n%s", results[0].stderr, results[1].stderr)
	r := j.run("build_script", "echo still here")
	assert.Equal(t, 0, r.code, "a prepare succeeded, but its VM is gone:\n%s\n---\n%s\n---\n%s", results[0].stderr, results[1].stderr, r.stderr)
	assert.Equal(t, "still here\n", r.stdout)
}

// A domain is a template only when the operator says so: marked with `template mark`,
// or matched by LIBVIRT_GCI_TEMPLATES. Without either, which is now the default, a job
// cannot clone any shut-off VM on the host, and cannot tell whether one exists.
func TestTemplatesMustBeMarked(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	delete(j.env, "LIBVIRT_GCI_TEMPLATES")
	// A shut-off VM that happens to be on the host (a variant of the test template
	// without the agent channel, so that prepare stops at a harmless error once allowed).
	name := "prod-db-" + j.jobID
	j.defineTemplate(name, `(?s)<channel type='unix'>.*?</channel>`, "")

	notOffered := func(tmpl string) string {
		return fmt.Sprintf(`template %q (from CUSTOM_ENV_DISTRO) is not offered on this runner: no template of that name is marked (libvirt-gci template mark) or matched by LIBVIRT_GCI_TEMPLATES`, tmpl)
	}
	r := j.stage("prepare")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, notOffered(name))
	j.env["CUSTOM_ENV_DISTRO"] = "no-such-vm-" + j.jobID
	r = j.stage("prepare")
	assert.Contains(t, r.stderr, notOffered("no-such-vm-"+j.jobID), "the same answer for a domain that does not exist")
	j.env["CUSTOM_ENV_DISTRO"] = name

	r = j.stage("template", "mark", name)
	require.Equal(t, 0, r.code, r.stderr)
	r = j.stage("template", "list")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Regexp(t, `(?m)^`+name+`\s+shut off\s+yes \(marked\)$`, r.stdout)
	r = j.stage("prepare")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, fmt.Sprintf("template %q has no guest agent channel", name), "marked: prepare goes on")

	r = j.stage("template", "unmark", name)
	require.Equal(t, 0, r.code, r.stderr)
	r = j.stage("prepare")
	assert.Contains(t, r.stderr, notOffered(name))

	j.env["LIBVIRT_GCI_TEMPLATES"] = "prod-db-*"
	r = j.stage("template", "list")
	assert.Regexp(t, `(?m)^`+name+`\s+shut off\s+yes \(LIBVIRT_GCI_TEMPLATES\)$`, r.stdout)
	r = j.stage("prepare")
	assert.Contains(t, r.stderr, fmt.Sprintf("template %q has no guest agent channel", name), "listed: prepare goes on")
	assert.Empty(t, leftovers(t, j.l, j.prefix))
	assert.False(t, strings.Contains(r.stderr, "prod-db-*"), "the operator's settings stay out of the job log")
}

// A template with a fixed VNC port and a serial log file: every clone gets its own
// automatic port and a pty. (Before, a second VM on the port could not start: here the
// test holds the port, as a concurrent job's VM would.)
func TestTemplateDevicesBecomeTheInstances(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer taken.Close()
	port := taken.Addr().(*net.TCPAddr).Port
	logFile := filepath.Join(os.TempDir(), "gci-e2e-serial-"+j.jobID+".log")
	j.defineTemplate("tiny-devices-"+j.jobID, `</devices>`, fmt.Sprintf(
		`<graphics type='vnc' port='%d' autoport='no' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics>`+
			`<serial type='file'><source path='%s'/><target port='1'/></serial></devices>`, port, logFile))
	j.prepare()
	dom, err := j.l.DomainLookupByName(j.instance())
	require.NoError(t, err)
	x, err := j.l.DomainGetXMLDesc(dom, 0)
	require.NoError(t, err)
	assert.NotContains(t, x, fmt.Sprintf("port='%d'", port))
	assert.Regexp(t, `<graphics type='vnc' port='\d+' autoport='yes' listen='127.0.0.1'>`, x)
	assert.NotContains(t, x, logFile)
	_, err = os.Stat(logFile)
	assert.True(t, os.IsNotExist(err), "the template's serial log file was written")
	r := j.stage("cleanup")
	assert.Equal(t, 0, r.code, r.stderr)
}

// libvirt itself accepts what isolate makes of a template full of fixed ports and paths
// (the golden file of the template package's test), with the domain type this libvirt
// offers (the golden file asks for kvm, which a host without /dev/kvm has not).
func TestIsolatedDevicesValidate(t *testing.T) {
	t.Parallel()
	l := lv(t)
	b, err := os.ReadFile("../../testdata/template/devices.instance.xml")
	require.NoError(t, err)
	prefix, _ := testPrefix(t)
	x := strings.Replace(string(b), "<name>gci-1-x</name>", "<name>"+prefix+"devices</name>", 1)
	require.Contains(t, x, `<domain type="kvm">`)
	x = strings.Replace(x, `<domain type="kvm">`, `<domain type="`+offeredVirtType(t, l)+`">`, 1)
	dom, err := l.DomainDefineXMLFlags(x, libvirt.DomainDefineValidate)
	require.NoError(t, err)
	require.NoError(t, l.DomainUndefine(dom))
}

// offeredVirtType is kvm where this libvirt's capabilities offer it for x86_64 guests,
// else qemu (software emulation): what a define validates against.
func offeredVirtType(t testing.TB, l *libvirt.Libvirt) string {
	t.Helper()
	x, err := l.ConnectGetCapabilities()
	require.NoError(t, err)
	var caps libvirtxml.Caps
	require.NoError(t, caps.Unmarshal(x))
	for _, g := range caps.Guests {
		for _, d := range g.Arch.Domains {
			if g.Arch.Name == "x86_64" && d.Type == "kvm" {
				return "kvm"
			}
		}
	}
	return "qemu"
}

// A template that would hand a job a host directory is refused before anything is made,
// unless the operator allows host access.
func TestHostAccessRefused(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	name := "tiny-hostdir-" + j.jobID
	j.defineTemplate(name, `</devices>`, `<filesystem type='mount' accessmode='mapped'><source dir='/etc'/><target dir='hostetc'/></filesystem></devices>`)
	r := j.stage("prepare")
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, fmt.Sprintf(`template %q has a <filesystem> (a host directory or image shared in): through it a job's VM reaches the host or other VMs; `+
		`remove it from the template, or allow it with LIBVIRT_GCI_ALLOW_HOST_ACCESS=true`, name))
	assert.NotContains(t, r.stderr, "/etc")
	assert.Empty(t, leftovers(t, j.l, j.prefix))
}

// A template's user-mode NIC would reach the host's 127.0.0.1 through its gateway
// (10.0.2.2), where host-local services and other instances' forwarded ports listen:
// prepare refuses it unless the operator allows host access (issue 24). (Prepare's own
// user-mode NIC, restricted, reaches nothing: TestSSHGuestHasNoRouteOut.)
func TestUserNICRefused(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	name := "tiny-usernic-" + j.jobID
	j.defineTemplate(name, `</devices>`, `<interface type='user'><model type='virtio'/></interface></devices>`)
	r := j.stage("prepare")
	assert.Equal(t, 2, r.code, r.stderr)
	assert.Contains(t, r.stderr, fmt.Sprintf(`template %q has an <interface type='user'> (QEMU's user network reaches the host's 127.0.0.1 as its gateway; use a libvirt network)`, name))
	assert.Empty(t, leftovers(t, j.l, j.prefix))
}

// The job token and a masked variable, which the runner hands the tool in the job
// response, its environment and the stage scripts, appear nowhere the tool writes:
// its output, the domain's XML (live and inactive) or its metadata.
func TestSecretsStayOut(t *testing.T) {
	t.Parallel()
	overEachTransport(t, func(t *testing.T, j *gitlabJob) {
		const token, masked = "glcbt-64_SeCrEtJoBtOkEn0123456789", "m4sked-Pa55word-value"
		j.env["LIBVIRT_GCI_DEBUG"] = "1"
		j.env["CUSTOM_ENV_CI_JOB_TOKEN"] = token
		j.env["CUSTOM_ENV_DEPLOY_PASSWORD"] = masked
		resp, err := os.ReadFile(j.env["JOB_RESPONSE_FILE"])
		require.NoError(t, err)
		resp = []byte(strings.Replace(string(resp), `"glcbt-test-job-token"`, `"`+token+`"`, 1))
		resp = []byte(strings.Replace(string(resp), `"variables": []`, `"variables": [{"key": "CI_JOB_TOKEN", "value": "`+token+
			`", "masked": true}, {"key": "DEPLOY_PASSWORD", "value": "`+masked+`", "masked": true}]`, 1))
		require.NoError(t, os.WriteFile(j.env["JOB_RESPONSE_FILE"], resp, 0o600))

		var printed strings.Builder
		keep := func(r result) result { printed.WriteString(r.stdout + r.stderr); return r }
		keep(j.stage("config"))
		r := keep(j.stage("prepare"))
		require.Equal(t, 0, r.code, r.stderr)
		t.Cleanup(func() { j.stage("cleanup") })
		script := "export CI_JOB_TOKEN=" + token + " DEPLOY_PASSWORD=" + masked + `
test "$DEPLOY_PASSWORD" = ` + masked + ` && echo "the script has its secrets"`
		r = keep(j.run("build_script", script))
		assert.Equal(t, 0, r.code, r.stderr)
		assert.Contains(t, r.stdout, "the script has its secrets")
		r = keep(j.run("after_script", script+"; exit 3"))
		assert.Equal(t, 1, r.code)

		dom, err := j.l.DomainLookupByName(j.instance())
		require.NoError(t, err)
		var seen strings.Builder
		for _, flags := range []libvirt.DomainXMLFlags{0, libvirt.DomainXMLInactive, libvirt.DomainXMLSecure} {
			x, err := j.l.DomainGetXMLDesc(dom, flags)
			require.NoError(t, err)
			seen.WriteString(x)
		}
		r = keep(j.stage("cleanup"))
		assert.Equal(t, 0, r.code, r.stderr)
		out := strings.ReplaceAll(printed.String(), "the script has its secrets", "")
		for _, secret := range []string{token, masked, "SeCrEtJoBtOkEn", "Pa55word"} {
			assert.NotContains(t, out, secret, "printed by the tool")
			assert.NotContains(t, seen.String(), secret, "in the domain XML or metadata")
		}
	})
}

// The operator's prepare --machine never replaces a job's instance (a typo must not
// kill a running job); run and cleanup --machine may act on it.
func TestManualPrepareLeavesJobInstancesAlone(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.prepare()
	name := j.instance()
	dom, err := j.l.DomainLookupByName(name)
	require.NoError(t, err)
	r := j.stage("prepare", "--machine", name, "--distro", testTmpl)
	assert.Equal(t, 2, r.code)
	assert.Contains(t, r.stderr, fmt.Sprintf("instance %q belongs to job %s of project 77 on e2e-gitlab, not to the operator (made by hand); leaving it alone", name, j.jobID))
	again, err := j.l.DomainLookupByName(name)
	require.NoError(t, err)
	assert.Equal(t, dom.UUID, again.UUID)
	r = j.stage("run", "--machine", name, j.script("x.sh", "echo by hand"))
	assert.Equal(t, 0, r.code, r.stderr)
	assert.Equal(t, "by hand\n", r.stdout)
	r = j.stage("cleanup", "--machine", name)
	assert.Equal(t, 0, r.code, r.stderr)
	assert.Empty(t, leftovers(t, j.l, j.prefix))
}

// Devices that would give every clone something of the host's or shared with other jobs
// are refused before anything is made (issue 36): a LUN, QEMU arguments of the
// template's own, a NIC on a network of host plumbing (macvtap onto a host NIC); a
// writable floppy is made the instance's own, an overlay like any disk.
func TestSharedDevicesRefusedOrMadeOwn(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	macvtap := "gci-e2e-macvtap-" + j.jobID
	n, err := j.l.NetworkDefineXML(`<network><name>` + macvtap + `</name><forward mode='bridge'><interface dev='lo'/></forward></network>`)
	require.NoError(t, err)
	t.Cleanup(func() { _ = j.l.NetworkUndefine(n) })
	for _, tc := range []struct{ name, from, to, want string }{
		{"lun", `</devices>`, `<disk type='block' device='lun'><source dev='/dev/null'/><target dev='sdz' bus='scsi'/><readonly/></disk></devices>`,
			`a <disk device='lun'> (sdz: SCSI commands to a host device)`},
		{"qemuargs", `</domain>`, `<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-no-reboot'/></qemu:commandline></domain>`,
			`a <qemu:commandline> (QEMU arguments of its own: anything the QEMU process reaches)`},
		{"macvtap", `</devices>`, `<interface type='network'><source network='` + macvtap + `'/><model type='virtio'/></interface></devices>`,
			`an <interface> on network "` + macvtap + `", forward mode bridge`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			j := newJob(t)
			name := "tiny-" + tc.name + "-" + j.jobID
			j.defineTemplate(name, tc.from, tc.to)
			r := j.stage("prepare")
			assert.Equal(t, 2, r.code, r.stderr)
			assert.Contains(t, r.stderr, fmt.Sprintf("template %q has %s", name, tc.want))
			assert.Contains(t, r.stderr, "LIBVIRT_GCI_ALLOW_HOST_ACCESS")
			assert.Empty(t, leftovers(t, j.l, j.prefix))
			r = j.stage("template", "check", name)
			assert.NotEqual(t, 0, r.code)
			assert.Contains(t, r.stdout+r.stderr, tc.want)
		})
	}

	t.Run("floppy", func(t *testing.T) {
		j := newJob(t)
		pool, err := j.l.StoragePoolLookupByName(testPool)
		require.NoError(t, err)
		img := j.prefix + "floppy.img"
		v, err := j.l.StorageVolCreateXML(pool, `<volume><name>`+img+`</name><capacity unit='bytes'>1474560</capacity><target><format type='raw'/></target></volume>`, 0)
		require.NoError(t, err)
		t.Cleanup(func() { _ = j.l.StorageVolDelete(v, 0) })
		path, err := j.l.StorageVolGetPath(v)
		require.NoError(t, err)
		name := "tiny-floppy-" + j.jobID
		j.defineTemplate(name, `</devices>`, `<disk type='file' device='floppy'><driver name='qemu' type='raw'/><source file='`+path+`'/><target dev='fda' bus='fdc'/></disk></devices>`)
		j.prepare()
		d, err := j.l.DomainLookupByName(j.instance())
		require.NoError(t, err)
		x, err := j.l.DomainGetXMLDesc(d, libvirt.DomainXMLInactive)
		require.NoError(t, err)
		fd := regexp.MustCompile(`(?s)<disk type='volume' device='floppy'>.*?</disk>`).FindString(x)
		require.NotEmpty(t, fd, "the floppy is an overlay volume of the instance's:\n%s", x)
		assert.Contains(t, fd, "<target dev='fda'")
		assert.NotContains(t, x, path, "no clone gets the template's floppy image to write")
		require.Equal(t, 0, j.stage("cleanup").code)
	})
}
