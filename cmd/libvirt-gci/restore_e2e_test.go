package main

// Restored instances (LIBVIRT_GCI_START=restore): made from a template's warm image, each
// must still be its own machine, and a changed template is never restored from an image
// of what it was.

import (
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// identityScript prints what two clones of one memory image would share unless prepare
// made each its own.
const identityScript = `echo "host=$(hostname)"
echo "etc-hostname=$(cat /etc/hostname)"
echo "machine-id=$(cat /etc/machine-id)"
echo "random=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
echo "clock=$(date +%s)"
echo "hostkey=$(cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub)"
for d in /sys/class/net/eth*; do echo "${d##*/}=$(cat "$d/address") carrier=$(cat "$d/carrier")"; done`

func keyValues(out string) map[string]string {
	m := map[string]string{}
	for _, l := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			m[k] = strings.TrimSpace(v)
		}
	}
	return m
}

// Two clones restored at once from one warm image of the template with a NIC of its own,
// over ssh: each has its own host name, machine-id, RNG output, SSH host key and MAC
// addresses (none the warm image's), the host's time, and its NIC's link up.
func TestRestoredClonesDiffer(t *testing.T) {
	t.Parallel()
	jobs := []*gitlabJob{newJobOver(t, "ssh"), newJobOver(t, "ssh")}
	for _, j := range jobs {
		j.env["CUSTOM_ENV_DISTRO"] = testNICTmpl
		j.env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	}
	w := jobs[0].stage("template", "warm", testNICTmpl)
	require.Equal(t, 0, w.code, w.stderr)
	warm := regexp.MustCompile(`warm image (libvirt-gci-warm-\S+) of`).FindStringSubmatch(w.stderr)
	require.NotNil(t, warm, w.stderr)

	var wg sync.WaitGroup
	prepared := make([]result, len(jobs))
	for i, j := range jobs {
		wg.Add(1)
		go func() { defer wg.Done(); prepared[i] = j.stage("prepare") }()
	}
	wg.Wait()
	got := make([]map[string]string, len(jobs))
	ran := make([][2]int64, len(jobs)) // the host's clock before and after each identityScript
	for i, j := range jobs {
		j.t.Cleanup(func() { j.stage("cleanup") })
		require.Equal(t, 0, prepared[i].code, prepared[i].stderr)
		assert.Contains(t, prepared[i].stderr, "restored "+testNICTmpl+" into "+j.instance()+" from "+warm[1])
		assert.Contains(t, prepared[i].stderr, "its RNG reseeded")
		ran[i][0] = time.Now().Unix()
		r := j.run("build_script", identityScript)
		ran[i][1] = time.Now().Unix()
		require.Equal(t, 0, r.code, r.stderr)
		got[i] = keyValues(r.stdout)
		t.Logf("%s:\n%s", j.instance(), r.stdout)
	}
	// The warm image's own MAC addresses, which no clone may keep.
	pool, err := jobs[0].l.StoragePoolLookupByName(testPool)
	require.NoError(t, err)
	save, err := jobs[0].l.StorageVolLookupByName(pool, warm[1]+".save")
	require.NoError(t, err)
	savePath, err := jobs[0].l.StorageVolGetPath(save)
	require.NoError(t, err)
	warmXML, err := jobs[0].l.DomainSaveImageGetXMLDesc(savePath, 0)
	require.NoError(t, err)
	warmMACs := regexp.MustCompile(`(?i)(?:address='|mac=)([0-9a-f:]{17})`).FindAllStringSubmatch(warmXML, -1)
	require.Len(t, warmMACs, 2, "the warm image's NIC and the ssh NIC:\n%s", warmXML)
	assert.Contains(t, warmXML, "<link state='down'/>", "the warm image never had its link up")

	for i, j := range jobs {
		g := got[i]
		name := j.instance()
		assert.Equal(t, name, g["host"])
		assert.Equal(t, name, g["etc-hostname"])
		assert.Regexp(t, `^[0-9a-f]{32}$`, g["machine-id"])
		assert.Regexp(t, `^[0-9a-f]{64}$`, g["random"])
		clock, err := strconv.ParseInt(g["clock"], 10, 64)
		if assert.NoError(t, err) {
			// Within the stage's run, a second either side (whole seconds, and the clocks'
			// own drift); a clock kept from the warm image was 25 s and more behind.
			assert.True(t, clock >= ran[i][0]-1 && clock <= ran[i][1]+1,
				"the guest's clock (%d) is the host's (%d to %d during the stage), not the warm image's", clock, ran[i][0], ran[i][1])
		}
		assert.NotEmpty(t, g["hostkey"])
		// Its NIC's MAC address is the one libvirt gave it, and the link is up.
		dom, err := j.l.DomainLookupByName(name)
		require.NoError(t, err)
		x, err := j.l.DomainGetXMLDesc(dom, 0)
		require.NoError(t, err)
		m := regexp.MustCompile(`<mac address='([0-9a-f:]{17})'/>`).FindStringSubmatch(x)
		require.NotNil(t, m, x)
		assert.Equal(t, m[1]+" carrier=1", g["eth0"], "the guest's NIC has libvirt's MAC address, and its link is up")
		assert.Contains(t, x, "<link state='up'/>")
		for _, eth := range []string{"eth0", "eth1"} {
			mac, _, _ := strings.Cut(g[eth], " ")
			assert.Regexp(t, `^52:54:00:`, mac)
			for _, wm := range warmMACs {
				assert.NotEqual(t, strings.ToLower(wm[1]), mac, "%s of %s kept the warm image's MAC address", eth, name)
			}
		}
	}
	for _, k := range []string{"host", "machine-id", "random", "hostkey", "eth0", "eth1"} {
		assert.NotEqual(t, got[0][k], got[1][k], "two restored clones share their %s", k)
	}
}

// A template that changes, in its disk or its XML, gets a new warm image: a job never
// runs in a restored image of what the template was. The old image goes once unused.
func TestRestoreNeverStale(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	disk := ownTemplateDisk(t, j)
	pool, err := j.l.StoragePoolLookupByName(testPool)
	require.NoError(t, err)
	tmplName := j.prefix + "tmpl"
	x := templateVariant(t, j.l, tmplName, `<source file='[^']+'/>`, "<source file='"+disk+"'/>",
		`<title>`, "<description>one</description><title>")
	_, err = j.l.DomainDefineXMLFlags(x, 0)
	require.NoError(t, err)
	t.Cleanup(func() {
		if d, err := j.l.DomainLookupByName(tmplName); err == nil {
			_ = j.l.DomainUndefine(d)
		}
	})
	j.env["CUSTOM_ENV_DISTRO"] = tmplName
	j.env["LIBVIRT_GCI_TEMPLATES"] = "tiny-*," + tmplName
	warmRE := regexp.MustCompile(`made the warm image (libvirt-gci-warm-[0-9a-f]+-)([0-9a-f]+) of`)
	var family string
	t.Cleanup(func() { // the template is gone: so are its warm images
		if family == "" {
			return
		}
		vols, _, err := j.l.StoragePoolListAllVolumes(pool, 1, 0)
		if err == nil {
			for _, v := range vols {
				if strings.HasPrefix(v.Name, family) {
					_ = j.l.StorageVolDelete(v, 0)
				}
			}
		}
	})
	job := func(body string) (prepare string, out string) {
		t.Helper()
		r := j.stage("prepare")
		require.Equal(t, 0, r.code, r.stderr)
		run := j.run("build_script", body)
		require.Equal(t, 0, run.code, run.stderr)
		c := j.stage("cleanup")
		require.Equal(t, 0, c.code, c.stderr)
		return r.stderr, run.stdout
	}
	stamp := `cat /etc/gci-stamp 2>/dev/null || echo none`

	p1, out := job(stamp)
	w1 := warmRE.FindStringSubmatch(p1)
	require.NotNil(t, w1, p1)
	family = w1[1]
	assert.Contains(t, p1, "restored "+tmplName)
	assert.Equal(t, "none\n", out)

	// The operator changes the template's disk: boots an instance of it, changes a file,
	// and commits the instance's overlay into the template's disk.
	j.env["LIBVIRT_GCI_START"] = "boot"
	r := j.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	require.NotContains(t, r.stderr, "restored")
	run := j.run("build_script", `echo v2 >/etc/gci-stamp; sync`)
	require.Equal(t, 0, run.code, run.stderr)
	dom, err := j.l.DomainLookupByName(j.instance())
	require.NoError(t, err)
	x, err = j.l.DomainGetXMLDesc(dom, 0)
	require.NoError(t, err)
	ov := regexp.MustCompile(`<source pool='[^']+' volume='([^']+)'`).FindStringSubmatch(x)
	require.NotNil(t, ov, x)
	ovVol, err := j.l.StorageVolLookupByName(pool, ov[1])
	require.NoError(t, err)
	ovPath, err := j.l.StorageVolGetPath(ovVol)
	require.NoError(t, err)
	require.NoError(t, j.l.DomainDestroy(dom))
	out2, err := exec.Command("qemu-img", "commit", "-q", ovPath).CombinedOutput()
	require.NoError(t, err, "%s", out2)
	c := j.stage("cleanup")
	require.Equal(t, 0, c.code, c.stderr)
	delete(j.env, "LIBVIRT_GCI_START")

	p2, out := job(stamp)
	w2 := warmRE.FindStringSubmatch(p2)
	require.NotNil(t, w2, "a changed disk makes a new warm image:\n%s", p2)
	assert.Equal(t, family, w2[1], "of the same template")
	assert.NotEqual(t, w1[2], w2[2])
	assert.Contains(t, p2, "removed 1 older warm images of "+tmplName)
	assert.Equal(t, "v2\n", out, "the job sees the template as it is now")

	// A change of the template's XML alone.
	tdom, err := j.l.DomainLookupByName(tmplName)
	require.NoError(t, err)
	x, err = j.l.DomainGetXMLDesc(tdom, libvirt.DomainXMLInactive)
	require.NoError(t, err)
	_, err = j.l.DomainDefineXMLFlags(strings.Replace(x, "<description>one</description>", "<description>two</description>", 1), 0)
	require.NoError(t, err)
	p3, out := job(`echo restored; ` + stamp)
	w3 := warmRE.FindStringSubmatch(p3)
	require.NotNil(t, w3, "a changed XML makes a new warm image:\n%s", p3)
	assert.NotEqual(t, w2[2], w3[2])
	assert.Equal(t, "restored\nv2\n", out)

	// Unchanged: the image is used as it is.
	p4, _ := job(`true`)
	assert.NotContains(t, p4, "made the warm image")
	assert.Contains(t, p4, "restored "+tmplName+" into "+j.instance()+" from "+w3[1]+w3[2])
}

// ownTemplateDisk makes a disk for a template of the test's own: a volume in the test
// pool (an overlay on the test image), which the test may change; it is deleted after
// the test. It returns its path.
func ownTemplateDisk(t *testing.T, j *gitlabJob, of ...string) string {
	t.Helper()
	tmpl := testTmpl
	if len(of) > 0 {
		tmpl = of[0]
	}
	base, err := j.l.DomainLookupByName(tmpl)
	require.NoError(t, err)
	bx, err := j.l.DomainGetXMLDesc(base, libvirt.DomainXMLInactive)
	require.NoError(t, err)
	root := regexp.MustCompile(`<source file='([^']+)'/>`).FindStringSubmatch(bx)
	require.NotNil(t, root, bx)
	pool, err := j.l.StoragePoolLookupByName(testPool)
	require.NoError(t, err)
	vol, err := j.l.StorageVolCreateXML(pool, fmt.Sprintf(`<volume><name>%s</name><capacity unit='bytes'>0</capacity><target><format type='qcow2'/></target>
<backingStore><path>%s</path><format type='qcow2'/></backingStore></volume>`, j.prefix+"template.qcow2", root[1]), 0)
	require.NoError(t, err)
	t.Cleanup(func() { _ = j.l.StorageVolDelete(vol, 0) })
	disk, err := j.l.StorageVolGetPath(vol)
	require.NoError(t, err)
	return disk
}

// A warm image whose header this tool cannot read boots the job, with a warning,
// instead of failing it.
func TestRestoreUnreadableImageBoots(t *testing.T) {
	t.Parallel()
	j := newJob(t)
	j.env["LIBVIRT_GCI_RUNNER_BINARY"] = "none"
	tmplName := j.prefix + "bad"
	j.defineTemplate(tmplName, `<title>`, "<description>unreadable warm image</description><title>")
	j.env["LIBVIRT_GCI_TEMPLATES"] = "tiny-*," + tmplName
	r := j.stage("template", "warm", tmplName)
	require.Equal(t, 0, r.code, r.stderr)
	m := regexp.MustCompile(`(libvirt-gci-warm-[0-9a-f]+-[0-9a-f]+)`).FindStringSubmatch(r.stderr + r.stdout)
	require.NotNil(t, m, r.stderr)
	pool, err := j.l.StoragePoolLookupByName(testPool)
	require.NoError(t, err)
	t.Cleanup(func() { // the template is gone: so is its warm image
		vols, _, _ := j.l.StoragePoolListAllVolumes(pool, 1, 0)
		for _, v := range vols {
			if strings.HasPrefix(v.Name, m[1]) {
				_ = j.l.StorageVolDelete(v, 0)
			}
		}
	})
	save, err := j.l.StorageVolLookupByName(pool, m[1]+".save")
	require.NoError(t, err)
	path, err := j.l.StorageVolGetPath(save)
	require.NoError(t, err)
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = f.WriteAt(make([]byte, 16), 0) // no magic
	require.NoError(t, err)
	require.NoError(t, f.Close())

	r = j.stage("prepare")
	require.Equal(t, 0, r.code, r.stderr)
	t.Cleanup(func() { j.stage("cleanup") })
	assert.Contains(t, r.stderr, "warm image "+m[1]+": not a complete libvirt save image")
	assert.Contains(t, r.stderr, "booting "+j.instance()+" instead")
	r = j.run("build_script", "echo booted-ok")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "booted-ok")
}
