package provision

import (
	"bytes"
	"context"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// restoreHost is a Host on f that starts instances from warm images, as by default.
func restoreHost(t *testing.T, f *provisiontest.Libvirt, log *bytes.Buffer) *Host {
	h := readyHost(t, f, log, time.Minute)
	h.Start = StartRestore
	return h
}

// firstRestore launches gci-a on a new fake, which makes the warm image, and returns
// the fake, the log, the host and the image's name.
func firstRestore(t *testing.T) (*provisiontest.Libvirt, *bytes.Buffer, *Host, string) {
	t.Helper()
	f := provisiontest.New("ci")
	log := &bytes.Buffer{}
	h := restoreHost(t, f, log)
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	return f, log, h, completeWarm(t, f)
}

// completeWarm is the name of the one complete warm image in f's pool ci.
func completeWarm(t *testing.T, f *provisiontest.Libvirt) string {
	t.Helper()
	m := regexp.MustCompile(`volume ci/(libvirt-gci-warm-[0-9a-f-]+)\.done`).FindAllStringSubmatch(f.State(), -1)
	require.Len(t, m, 1, f.State())
	return m[0][1]
}

// The first launch makes the warm image (boot, quiesce, save, mark) and restores from
// it; the next restores at once. A restored instance is its own domain: its name, a new
// UUID and MAC addresses in the save image's header, overlays on the image's, the copy
// of the save image gone and no longer in its metadata, and a new machine-id.
func TestLaunchRestoresFromTheWarmImage(t *testing.T) {
	t.Parallel()
	f, log, h, warm := firstRestore(t)
	assert.Contains(t, log.String(), "made the warm image "+warm+" of tmpl")
	assert.Contains(t, log.String(), "restored tmpl into gci-a from "+warm)
	assert.NotContains(t, log.String(), "booting")

	log.Reset()
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-b")))
	assert.NotContains(t, log.String(), "made the warm image", "made once")
	assert.Contains(t, log.String(), "restored tmpl into gci-b from "+warm)
	assert.Contains(t, log.String(), "machine-id and 1 MAC addresses")
	assert.Equal(t, 1, countCalls(f, "DomainSaveFlags"))

	conn := libvirt.NewConn(f)
	for _, name := range []string{"gci-a", "gci-b"} {
		in, err := conn.Lookup(name)
		require.NoError(t, err)
		assert.Equal(t, warm, in.Metadata.Warm)
		for _, v := range in.Metadata.Volumes {
			assert.False(t, strings.HasSuffix(v.Name, ".save"), "the copy of the save image is deleted, and off the list: %v", v)
		}
	}
	assert.NotRegexp(t, `gci-[ab]-\w+\.save`, f.State(), "no copy of the save image left")
	xa, xb := domainXML(t, f, "gci-a"), domainXML(t, f, "gci-b")
	mac := regexp.MustCompile(`<mac address=["']([0-9a-f:]+)["']`)
	uuid := regexp.MustCompile(`<uuid>([^<]+)</uuid>`)
	assert.NotEqual(t, mac.FindStringSubmatch(xa)[1], mac.FindStringSubmatch(xb)[1])
	assert.NotEqual(t, uuid.FindStringSubmatch(xa)[1], uuid.FindStringSubmatch(xb)[1])
	assert.Contains(t, xb, "<name>gci-b</name>")

	require.NoError(t, h.Remove(context.Background(), "gci-a", nil))
	require.NoError(t, h.Remove(context.Background(), "gci-b", nil))
	assert.Equal(t, []string{"domain tmpl running=false"}, nonWarm(f), "only the warm image stays")
}

// A failure at any call of a restore (from a warm image already made) fails the launch
// or leaves it whole; either way, removing the instance leaves nothing but the warm
// image, and a failed launch removed its instance itself.
func TestRestoreFailureAtEachCall(t *testing.T) {
	t.Parallel()
	// The calls of a restore, counted on a clean run.
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := restoreHost(t, f, &log)
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-warmup")))
	require.NoError(t, h.Remove(context.Background(), "gci-warmup", nil))
	before := len(f.Calls())
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	calls := f.Calls()[before:]
	for _, want := range []string{"StorageVolCreateXMLFrom", "StorageVolUpload", "DomainRestoreFlags", "DomainSetMetadata", "DomainUpdateDeviceFlags"} {
		require.Contains(t, calls, want, "a restore calls it")
	}
	seen := map[string]int{}
	for _, method := range calls {
		seen[method]++
		n := seen[method]
		t.Run(fmt.Sprintf("%s#%d", method, n), func(t *testing.T) {
			t.Parallel()
			f := provisiontest.New("ci")
			var log bytes.Buffer
			h := restoreHost(t, f, &log)
			require.NoError(t, h.Launch(context.Background(), launchReq("gci-warmup")))
			require.NoError(t, h.Remove(context.Background(), "gci-warmup", nil))
			f.FailNth(method, countCalls(f, method)+n, golibvirt.Error{Code: uint32(golibvirt.ErrInternalError), Message: "injected fault"})
			err := h.Launch(context.Background(), launchReq("gci-a"))
			if err != nil {
				assert.ErrorContains(t, err, "injected fault")
				assert.NotContains(t, strings.Join(nonWarm(f), "; "), "gci-a", "the rollback removed it: %v\n%s", err, log.String())
			}
			require.NoError(t, h.Remove(context.Background(), "gci-a", nil))
			assert.Equal(t, []string{"domain tmpl running=false"}, nonWarm(f), "after %v", err)
		})
	}
}

// A save image the tool cannot read boots the instance, and says why.
func TestRestoreUnreadableImageBoots(t *testing.T) {
	t.Parallel()
	f, log, h, warm := firstRestore(t)
	vol := golibvirt.StorageVol{Pool: "ci", Name: warm + ".save"}
	require.NoError(t, f.StorageVolUpload(vol, bytes.NewReader(make([]byte, 16)), 0, 16, 0)) // no magic
	log.Reset()
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-b")))
	assert.Contains(t, log.String(), "warm image "+warm+": not a complete libvirt save image")
	assert.Contains(t, log.String(), "booting gci-b instead (LIBVIRT_GCI_START=boot says so at once)")
	assert.Contains(t, log.String(), "cloned tmpl into gci-b")
}

// Issue 38: a warm image whose save image was cut short or deleted on disk under a
// restore. The restore fails in QEMU; the launch boots instead and says why, the image
// is no longer marked whole, and the next launch makes it again and restores. (Before,
// every restore of the image failed the same way, each job a system failure.)
func TestRestoreDamagedImageBootsAndIsMadeAgain(t *testing.T) {
	t.Parallel()
	f, log, h, warm := firstRestore(t)
	f.FailNth("DomainRestoreFlags", countCalls(f, "DomainRestoreFlags")+1, golibvirt.Error{Code: uint32(golibvirt.ErrInternalError),
		Message: "qemu unexpectedly closed the monitor: qemu-system-x86_64: error while loading state section id 3(ram)\nload of migration failed: Input/output error"})
	log.Reset()
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-b")))
	assert.Contains(t, log.String(), "the warm image "+warm+" of tmpl is damaged")
	assert.Contains(t, log.String(), "booting gci-b instead")
	assert.Contains(t, log.String(), "cloned tmpl into gci-b")
	assert.NotContains(t, f.State(), warm+".done", "no longer marked whole")

	log.Reset()
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-c")))
	assert.Contains(t, log.String(), "made the warm image "+warm+" of tmpl")
	assert.Contains(t, log.String(), "restored tmpl into gci-c from "+warm)
	for _, n := range []string{"gci-a", "gci-b", "gci-c"} {
		require.NoError(t, h.Remove(context.Background(), n, nil))
	}
	assert.Equal(t, []string{"domain tmpl running=false"}, nonWarm(f), "only the warm image stays")
}

// A job that asks for a size is restored too (issue 25): from a warm image of that
// CPUs and memory, made on its first ask, and its disk grown after the restore. Past
// LIBVIRT_GCI_WARM_SIZES other sizes of the template, or with none allowed, it boots
// and says why.
func TestRestoreSized(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := restoreHost(t, f, &log)
	h.Limits.WarmSizes = 2
	sized := func(name string, cpus int) Request {
		r := launchReq(name)
		r.Size = Size{CPUs: cpus, Memory: 512 << 20, Disk: 20 << 30}
		return r
	}
	require.NoError(t, h.Launch(context.Background(), sized("gci-a", 2)))
	require.NoError(t, h.Launch(context.Background(), sized("gci-b", 2)))
	assert.Equal(t, 1, strings.Count(log.String(), "made the warm image"), log.String())
	assert.Regexp(t, `restored tmpl into gci-b from libvirt-gci-warm-[0-9a-f]+s[0-9a-f]+-[0-9a-f]+ .*disk grown in \d+ ms \(2 CPUs`, log.String())
	assert.NotContains(t, log.String(), "booting")
	xb := domainXML(t, f, "gci-b")
	assert.Regexp(t, `<vcpu[^>]*>2</vcpu>`, xb)
	assert.Regexp(t, `<memory unit=["']KiB["']>524288</memory>`, xb)
	assert.Equal(t, uint64(20<<30), f.BlockSize("gci-b", "vda"))

	require.NoError(t, h.Launch(context.Background(), sized("gci-c", 3)))
	assert.Equal(t, 2, strings.Count(log.String(), "made the warm image"))
	log.Reset()
	require.NoError(t, h.Launch(context.Background(), sized("gci-d", 4)))
	assert.Contains(t, log.String(), "booting gci-d: tmpl has warm images for 2 other sizes already, each in use (LIBVIRT_GCI_WARM_SIZES=2)")
	assert.Regexp(t, `<vcpu[^>]*>4</vcpu>`, domainXML(t, f, "gci-d"), "booted at its size")

	// A size no domain uses gives way to a new one (issue 36: the first sizes asked held
	// their places for good); one in use never does.
	three := regexp.MustCompile(`made the warm image (libvirt-gci-warm-\S+) of tmpl`)
	require.NoError(t, h.Remove(context.Background(), "gci-c", nil))
	log.Reset()
	require.NoError(t, h.Launch(context.Background(), sized("gci-g", 5)))
	assert.Regexp(t, `removed the warm image libvirt-gci-warm-\S+ of tmpl, of another size and unused, to make room \(LIBVIRT_GCI_WARM_SIZES=2\)`, log.String())
	assert.Regexp(t, `restored tmpl into gci-g from .*\(5 CPUs`, log.String())
	made := three.FindAllStringSubmatch(log.String(), -1)
	require.Len(t, made, 1)
	assert.Regexp(t, `<vcpu[^>]*>5</vcpu>`, domainXML(t, f, "gci-g"))
	log.Reset()
	require.NoError(t, h.Launch(context.Background(), sized("gci-h", 2)))
	assert.Contains(t, log.String(), "restored tmpl into gci-h", "the size in use kept its image")

	log.Reset()
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-e")))
	assert.Contains(t, log.String(), "restored tmpl into gci-e", "the plain image is not one of the sized")

	h.Limits.WarmSizes = 0
	log.Reset()
	require.NoError(t, h.Launch(context.Background(), sized("gci-f", 2)))
	assert.Contains(t, log.String(), "booting gci-f: no warm images for sizes jobs ask for (LIBVIRT_GCI_WARM_SIZES=0)")
}

// A guest that cannot reseed its RNG at once is never restored (issue 24): its clones
// would make their keys from randomness they share. Making its warm image finds that out
// before the save, marks the image as one never to be made, and the instance boots; the
// next launch boots at once, with the same reason, making nothing.
func TestNoReseedNoRestore(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	f.NoReseed()
	var log bytes.Buffer
	h := restoreHost(t, f, &log)
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
	assert.Contains(t, log.String(), "booting gci-a: the guest cannot reseed its RNG at once (no vmgenid driver, perl or python3)")
	assert.Contains(t, log.String(), "cloned tmpl into gci-a")
	assert.NotContains(t, f.State(), ".save", "no memory image of it kept")
	assert.NotContains(t, f.State(), ".done")
	assert.Regexp(t, `volume ci/libvirt-gci-warm-[0-9a-f-]+\.norestore`, f.State())

	log.Reset()
	before := countCalls(f, "DomainSave")
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-b")))
	assert.Contains(t, log.String(), "booting gci-b: the guest cannot reseed its RNG at once")
	assert.NotContains(t, log.String(), "warm image")
	assert.Equal(t, before, countCalls(f, "DomainSave"), "no second try at the warm image")
}

// A restored clone whose guest set-up cannot reseed (a warm image made before the check)
// stops before anything makes its keys, and prepare fails rather than going on.
func TestSetupRefusesWithoutReseed(t *testing.T) {
	t.Parallel()
	f, _, h, _ := firstRestore(t)
	f.NoReseed()
	err := h.Launch(context.Background(), launchReq("gci-b"))
	require.ErrorIs(t, err, guest.ErrCannotReseed)
	assert.NotContains(t, strings.Join(nonWarm(f), "; "), "gci-b", "nothing of it left")
}

func countCalls(f *provisiontest.Libvirt, method string) int {
	n := 0
	for _, c := range f.Calls() {
		if c == method {
			n++
		}
	}
	return n
}

// nonWarm is f's state but for the complete warm images.
func nonWarm(f *provisiontest.Libvirt) []string {
	state := f.State()
	done := regexp.MustCompile(`volume ci/(libvirt-gci-warm-[0-9a-f-]+)\.done`).FindAllStringSubmatch(state, -1)
	var out []string
	for _, part := range strings.Split(state, "; ") {
		if !slices.ContainsFunc(done, func(m []string) bool { return strings.HasPrefix(part, "volume ci/"+m[1]) }) {
			out = append(out, part)
		}
	}
	return out
}

func domainXML(t *testing.T, f *provisiontest.Libvirt, name string) string {
	t.Helper()
	x, err := f.DomainGetXMLDesc(golibvirt.Domain{Name: name}, 0)
	require.NoError(t, err)
	return x
}

// A job with a cache share is restored too (issue 25): its warm image's memory is shared
// (memfd), as virtiofs needs, and the share is attached after the restore. The image is
// not the plain one's; a failed attach leaves nothing but the warm images.
func TestRestoreWithCacheShare(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := restoreHost(t, f, &log)
	cached := func(name string) Request {
		r := launchReq(name)
		r.Cache, r.CacheMount = "/srv/cache/p-1/unprotected", "/cache"
		return r
	}
	require.NoError(t, h.Launch(context.Background(), cached("gci-a")))
	require.NoError(t, h.Launch(context.Background(), cached("gci-b")))
	assert.Contains(t, log.String(), "restored tmpl into gci-b")
	assert.Regexp(t, `cache share attached in \d+ ms`, log.String())
	assert.Contains(t, log.String(), "its cache at /cache over virtiofs")
	assert.NotContains(t, log.String(), "booting")
	xb := domainXML(t, f, "gci-b")
	assert.Regexp(t, `<source type=["']memfd["']`, xb)
	assert.Regexp(t, `<access mode=["']shared["']`, xb)
	assert.Regexp(t, `(?s)<filesystem .*virtiofs.*/srv/cache/p-1/unprotected.*gci-cache`, xb)
	cacheWarm := completeWarm(t, f)

	// A job without a cache gets the plain image, made apart.
	require.NoError(t, h.Launch(context.Background(), launchReq("gci-c")))
	assert.NotRegexp(t, `<filesystem`, domainXML(t, f, "gci-c"))
	assert.NotContains(t, domainXML(t, f, "gci-c"), "memfd")
	assert.Equal(t, 2, strings.Count(f.State(), ".done"), "two warm images: %s", f.State())
	assert.Contains(t, f.State(), cacheWarm+".done", "the cache image stays")

	f.FailNth("DomainAttachDeviceFlags", countCalls(f, "DomainAttachDeviceFlags")+1, golibvirt.Error{Code: uint32(golibvirt.ErrInternalError), Message: "injected fault"})
	require.ErrorContains(t, h.Launch(context.Background(), cached("gci-d")), "injected fault")
	for _, name := range []string{"gci-a", "gci-b", "gci-c"} {
		require.NoError(t, h.Remove(context.Background(), name, nil))
	}
	assert.Equal(t, []string{"domain tmpl running=false"}, nonWarm(f), "only the warm images stay")
}

// A warm image saved with systemd running says so (its domain's metadata, in the
// image): its clones are not waited for again. One saved degraded is: its clones say
// which units failed, as a boot does.
func TestRestoredCloneOfARunningSystemIsNotWaitedFor(t *testing.T) {
	t.Parallel()
	for _, state := range []string{"running", "degraded"} {
		f := provisiontest.New("ci")
		log := &bytes.Buffer{}
		h := restoreHost(t, f, log)
		f.SetSystem(state, "foo.service")
		require.NoError(t, h.Launch(context.Background(), launchReq("gci-a")))
		log.Reset()
		require.NoError(t, h.Launch(context.Background(), launchReq("gci-b")))
		if state == "running" {
			assert.Contains(t, log.String(), "systemd running since the warm image's save; not waited for again")
			assert.NotContains(t, log.String(), "systemd running after")
		} else {
			assert.Contains(t, log.String(), "systemd finished booting degraded after")
			assert.Contains(t, log.String(), "foo.service failed")
		}
	}
}
