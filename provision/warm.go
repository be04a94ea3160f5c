package provision

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
	"github.com/libvirt-gci/libvirt-gci/template"
)

// Warm images: a template's instance booted once, to a ready guest agent, and saved
// (libvirt's save: its memory and device state, and the overlays it ran on). Each
// instance of the template is then restored from it rather than booted: its own overlays
// on the warm image's, its own domain (name, UUID, metadata, MAC addresses) in a copy of
// the save image with the header rewritten, and, through the agent, its own clock, RNG
// state, host name, machine-id and MAC addresses in the guest before any job code runs.

// How prepare starts an instance (LIBVIRT_GCI_START).
const (
	StartBoot    = "boot"    // a cold boot, every time
	StartRestore = "restore" // restored from the template's warm image, made on first use
)

// warmAPI is the part of go-libvirt that warm images need besides API.
type warmAPI interface {
	DomainSaveFlags(dom libvirt.Domain, to string, dxml libvirt.OptString, flags uint32) error
	DomainRestoreFlags(from string, dxml libvirt.OptString, flags uint32) error
	StorageVolUpload(vol libvirt.StorageVol, r io.Reader, offset, length uint64, flags libvirt.StorageVolUploadFlags) error
	StorageVolCreateXMLFrom(pool libvirt.StoragePool, xml string, clone libvirt.StorageVol, flags libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error)
	StorageVolDownload(vol libvirt.StorageVol, w io.Writer, offset, length uint64, flags libvirt.StorageVolDownloadFlags) error
	StorageVolGetPath(vol libvirt.StorageVol) (string, error)
	StorageVolGetXMLDesc(vol libvirt.StorageVol, flags uint32) (string, error)
	DomainUpdateDeviceFlags(dom libvirt.Domain, xml string, flags libvirt.DomainDeviceModifyFlags) error
}

func (c *Conn) warm() (warmAPI, error) {
	w, ok := c.api.(warmAPI)
	if !ok {
		return nil, errors.New("this libvirt connection cannot save and restore domains")
	}
	return w, nil
}

// warmProfile is what of an instance, besides its template, lives in its warm image:
// devices cannot be added to a restored VM.
type warmProfile struct {
	SSHNIC bool   // the NIC of the ssh transport and the forwards
	Helper string // the gitlab-runner helper's volume; "" for none
}

// WarmImage is a template's warm image, complete (its mark volume exists).
type WarmImage struct {
	Name     string            // of its volumes: NAME-TARGET.qcow2, NAME.save, NAME.done
	Template string            // the template's name
	Overlays map[string]string // the overlay volume of each writable disk, by target
	XML      string            // the domain XML in the save image
	MemKiB   uint64
	pool     libvirt.StoragePool
	save     libvirt.StorageVol
	header   []byte // the save image's header and the XML region after it
	host     *Host
}

// headerRead is how much of a save image is read for its header (libvirt's XML region
// is the XML, its cookie and 64 KiB of room).
const headerRead = 1 << 20

// streamTime bounds a libvirt stream call (a volume's upload or download).
const streamTime = 30 * time.Second

// readHeader reads the start of the save image vol: from its file where this process can
// (a local libvirt, a user allowed to read it), else through libvirt (readPrefix).
func (h *Host) readHeader(ctx context.Context, conn *Conn, vol libvirt.StorageVol) ([]byte, error) {
	if localURI(h.URI) {
		if w, err := conn.warm(); err == nil {
			if path, err := w.StorageVolGetPath(vol); err == nil {
				if f, err := os.Open(path); err == nil {
					defer f.Close()
					b := make([]byte, headerRead)
					n, err := io.ReadFull(f, b)
					if err == nil || errors.Is(err, io.ErrUnexpectedEOF) {
						return b[:n], nil
					}
				}
			}
		}
	}
	// libvirt knows the volume by the size it had when made (empty, before the save)
	// until something refreshes it: a download would stop there.
	if _, _, _, err := conn.api.StorageVolGetInfo(vol); err != nil {
		return nil, err
	}
	return h.readPrefix(ctx, vol, headerRead)
}

// readPrefix reads the first n bytes of the volume vol. go-libvirt's streams can
// deadlock when libvirtd's last packet of a download comes late (its router holds a
// lock while it hands the packet to a caller that is gone): the download runs on a
// connection of its own, which is dropped once the bytes are in.
func (h *Host) readPrefix(ctx context.Context, vol libvirt.StorageVol, n uint64) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, streamTime)
	defer cancel()
	conn, err := h.Connect(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.dropNow()
	w, err := conn.warm()
	if err != nil {
		return nil, err
	}
	pw := &prefixWriter{want: int(n), full: make(chan struct{})}
	errc := make(chan error, 1)
	go func() { errc <- w.StorageVolDownload(vol, pw, 0, n, 0) }()
	select {
	case err := <-errc:
		if err != nil {
			return nil, err
		}
	case <-pw.full:
	case <-ctx.Done():
		return nil, fmt.Errorf("download of %s: %w", vol.Name, context.Cause(ctx))
	}
	return pw.bytes(), nil
}

// prefixWriter keeps what is written to it, and says when it has want bytes.
type prefixWriter struct {
	mu   sync.Mutex
	buf  []byte
	want int
	full chan struct{}
}

func (p *prefixWriter) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	had := len(p.buf)
	p.buf = append(p.buf, b...)
	if had < p.want && len(p.buf) >= p.want {
		close(p.full)
	}
	return len(b), nil
}

func (p *prefixWriter) bytes() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.buf)
}

// upload writes data at the start of the volume vol: into its file where this process
// can (a local libvirt, a user allowed to write it), else through libvirt on a
// connection of its own (see readPrefix), within streamTime.
func (h *Host) upload(ctx context.Context, vol libvirt.StorageVol, data []byte) error {
	if localURI(h.URI) {
		if f, err := os.OpenFile(vol.Key, os.O_WRONLY, 0); err == nil {
			_, err := f.WriteAt(data, 0)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err == nil {
				return nil
			}
		}
	}
	ctx, cancel := context.WithTimeout(ctx, streamTime)
	defer cancel()
	conn, err := h.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.dropNow()
	w, err := conn.warm()
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- w.StorageVolUpload(vol, bytes.NewReader(data), 0, uint64(len(data)), 0) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
		return fmt.Errorf("upload to %s: %w", vol.Name, context.Cause(ctx))
	}
}

// libvirt's QEMU save image header (src/qemu/qemu_saveimage.h): a magic string, then
// uint32 version, data_len, was_running, compressed, cookieOffset (at 32) and 14 unused, in the
// host's byte order; data_len bytes of domain XML, cookie and padding follow, then
// QEMU's migration stream.
const (
	saveMagic      = "LibvirtQemudSave"
	saveHeaderSize = 16 + 19*4
)

// warmPrefix begins the names of warm images' volumes. They are not named by the
// instances' prefix: every configuration on the host shares them.
const warmPrefix = "libvirt-gci-warm-"

// warmFamily names the warm images of one template and profile: a new image of the
// family replaces the older ones.
func (h *Host) warmFamily(tmplName string, p warmProfile) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "%s\x00%t\x00%s", tmplName, p.SSHNIC, p.Helper))
	return warmPrefix + hex.EncodeToString(sum[:4])
}

// warmName is the name of the warm image of the template, as it is now (its XML, the
// identity of its disks), this tool's version and the profile: any change of these
// names another image, so a stale one is never used.
func (h *Host) warmName(conn *Conn, tmplXML string, tmpl *template.Template, p warmProfile) (string, error) {
	s := sha256.New()
	fmt.Fprintf(s, "%s\x00%s\x00%s\x00%t\x00%s\x00", h.Version, toolIdentity(), tmplXML, p.SSHNIC, p.Helper)
	for _, d := range tmpl.Disks {
		id, err := h.diskIdentity(conn, d.Path)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(s, "%s\x00%s\x00", d.Path, id)
	}
	return h.warmFamily(tmpl.Name, p) + "-" + hex.EncodeToString(s.Sum(nil)[:6]), nil
}

// toolIdentity names this very binary (its file's device, inode, size and times): a
// rebuild with the same version string makes new warm images too.
func toolIdentity() string {
	exe, err := os.Executable()
	if err != nil {
		return "unknown"
	}
	fi, err := os.Stat(exe)
	if err != nil {
		return "unknown"
	}
	st := fi.Sys().(*syscall.Stat_t)
	return fmt.Sprintf("%d/%d/%d/%d", st.Dev, st.Ino, st.Size, st.Mtim.Nano())
}

// diskIdentity says which content a template disk has: its volume's size and times,
// from libvirt, where a pool holds it; else, on a local libvirt, its file's device,
// inode, size and modification time.
func (h *Host) diskIdentity(conn *Conn, path string) (string, error) {
	if v, err := conn.api.StorageVolLookupByPath(path); err == nil {
		w, err := conn.warm()
		if err != nil {
			return "", err
		}
		x, err := w.StorageVolGetXMLDesc(v, 0)
		if err != nil {
			return "", fmt.Errorf("template disk %s: %w", path, err)
		}
		var vol libvirtxml.StorageVolume
		if err := vol.Unmarshal(x); err != nil {
			return "", fmt.Errorf("template disk %s: %w", path, err)
		}
		if vol.Target != nil && vol.Target.Timestamps != nil && vol.Capacity != nil {
			return fmt.Sprintf("vol/%d/%s", vol.Capacity.Value, vol.Target.Timestamps.Mtime), nil
		}
	}
	if !localURI(h.URI) {
		return "", fmt.Errorf("template disk %s is in no storage pool of the remote libvirt, so a warm image could not tell when it changed (put it in a pool for warm images)", path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("template disk: %w", err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	return fmt.Sprintf("file/%d/%d/%d/%d", st.Dev, st.Ino, st.Size, st.Mtim.Nano()), nil
}

// localURI tells whether a libvirt URI names this host's libvirt.
func localURI(uri string) bool {
	u, err := url.Parse(uri)
	return err == nil && u.Host == "" && (!strings.Contains(u.Scheme, "+") || strings.HasSuffix(u.Scheme, "+unix"))
}

// openWarm returns the warm image name, if it is complete; nil if not.
func (h *Host) openWarm(ctx context.Context, conn *Conn, name, tmplName string) (*WarmImage, error) {
	if _, err := conn.warm(); err != nil {
		return nil, err
	}
	pool, err := conn.api.StoragePoolLookupByName(h.Pool)
	if err != nil {
		return nil, fmt.Errorf("storage pool %q: %w", h.Pool, err)
	}
	if _, err := conn.api.StorageVolLookupByName(pool, name+".done"); hasCode(err, libvirt.ErrNoStorageVol) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("warm image %s: %w", name, err)
	}
	save, err := conn.api.StorageVolLookupByName(pool, name+".save")
	if hasCode(err, libvirt.ErrNoStorageVol) {
		return nil, nil // marked, but half removed: it is made again
	}
	if err != nil {
		return nil, fmt.Errorf("warm image %s: %w", name, err)
	}
	all, err := h.readHeader(ctx, conn, save)
	if err != nil {
		return nil, &notSavedError{fmt.Errorf("warm image %s: read its header: %w", name, err)}
	}
	// An image this tool cannot read (another libvirt's format, say) boots the job, with
	// a warning: a template that boots is no reason to fail a job.
	if len(all) < saveHeaderSize || string(all[:16]) != saveMagic {
		return nil, &notSavedError{fmt.Errorf("warm image %s: not a complete libvirt save image", name)}
	}
	dataLen := binary.NativeEndian.Uint32(all[20:24])
	if dataLen == 0 || saveHeaderSize+int(dataLen) > len(all) {
		return nil, &notSavedError{fmt.Errorf("warm image %s: its header says %d bytes of XML, more than the %d read", name, dataLen, headerRead)}
	}
	all = all[:saveHeaderSize+int(dataLen)]
	wi := &WarmImage{Name: name, Template: tmplName, Overlays: map[string]string{}, pool: pool, save: save, header: all, host: h}
	xmlLen := dataLen
	if off := binary.NativeEndian.Uint32(all[32:36]); off > 0 && off < dataLen {
		xmlLen = off
	}
	wi.XML = string(bytes.TrimRight(wi.header[saveHeaderSize:saveHeaderSize+xmlLen], "\x00"))
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(wi.XML); err != nil {
		return nil, &notSavedError{fmt.Errorf("warm image %s: its domain XML: %w", name, err)}
	}
	if dom.Memory != nil {
		wi.MemKiB = template.KiB(dom.Memory.Value, dom.Memory.Unit)
	}
	if dom.Devices != nil {
		for _, d := range dom.Devices.Disks {
			if d.Source != nil && d.Source.Volume != nil && d.Target != nil && strings.HasPrefix(d.Source.Volume.Volume, name+"-") {
				wi.Overlays[d.Target.Dev] = d.Source.Volume.Volume
			}
		}
	}
	return wi, nil
}

// warmFor returns the warm image for req's instance of tmpl (tmplXML), making it first
// if there is none; or nil, and why, where the instance is to be booted instead.
func (h *Host) warmFor(ctx context.Context, conn *Conn, req Request, tmplXML string, tmpl *template.Template) (*WarmImage, string, error) {
	if req.Size != (Size{}) {
		return nil, "a restored VM has its warm image's size, and the job asks for " + req.Size.String(), nil
	}
	if req.Cache != "" {
		return nil, "a cache share (virtiofs) cannot be restored by this QEMU", nil
	}
	if _, err := conn.warm(); err != nil {
		return nil, err.Error(), nil
	}
	p := warmProfile{SSHNIC: h.needsSSH(req), Helper: req.helper}
	name, err := h.warmName(conn, tmplXML, tmpl, p)
	if err != nil { // a disk whose changes cannot be told: no image could be trusted
		return nil, err.Error(), nil
	}
	if wi, err := h.openWarm(ctx, conn, name, tmpl.Name); err != nil || wi != nil {
		return wi, "", err
	}
	// Made by one process at a time; a prepare that finds another making it boots.
	unlock, ok, err := h.poolLock(ctx, conn, name, false, h.warmBuilding(conn, name))
	if err != nil {
		return nil, "", err
	}
	if !ok {
		return nil, "another prepare is making the warm image of " + tmpl.Name, nil
	}
	defer unlock()
	if wi, err := h.openWarm(ctx, conn, name, tmpl.Name); err != nil || wi != nil {
		return wi, "", err
	}
	if err := h.makeWarm(ctx, conn, req, tmpl, p, name); err != nil {
		return nil, "", err
	}
	wi, err := h.openWarm(ctx, conn, name, tmpl.Name)
	if err == nil && wi == nil {
		err = fmt.Errorf("warm image %s: made, but not found", name)
	}
	return wi, "", err
}

// warmBuilding tells whether a domain is booting or being saved for the warm image
// name (under any prefix): whether its lock's holder is at work.
func (h *Host) warmBuilding(conn *Conn, name string) func() bool {
	suffix := "warm-" + name[strings.LastIndex(name, "-")+1:]
	return func() bool {
		doms, _, err := conn.api.ConnectListAllDomains(1, 0)
		if err != nil {
			return true // cannot tell: not stale
		}
		return slices.ContainsFunc(doms, func(d libvirt.Domain) bool { return strings.HasSuffix(d.Name, suffix) })
	}
}

// Warm makes the warm image of the template for instances with the transport given, if
// it has none that is up to date, and says which it is.
func (h *Host) Warm(ctx context.Context, tmplName, transport string) (string, error) {
	conn, err := h.Connect(ctx)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	req := Request{Name: "warm", Template: tmplName, Offered: true, Transport: transport}
	tx, tmpl, err := h.template(conn, req)
	if err != nil {
		return "", err
	}
	if h.Helper != "" {
		hctx, cancel := h.bootTimeout(ctx)
		req.helper, err = h.helperVolume(hctx, conn, h.Helper)
		cancel()
		if err != nil {
			return "", err
		}
	}
	p := warmProfile{SSHNIC: h.needsSSH(req), Helper: req.helper}
	name, err := h.warmName(conn, tx, tmpl, p)
	if err != nil {
		return "", err
	}
	bctx, cancel := h.bootTimeout(ctx)
	defer cancel()
	unlock, _, err := h.poolLock(bctx, conn, name, true, h.warmBuilding(conn, name))
	if err != nil {
		return "", err
	}
	defer unlock()
	if wi, err := h.openWarm(ctx, conn, name, tmplName); err != nil {
		return "", err
	} else if wi != nil {
		h.Log.Info(fmt.Sprintf("the warm image %s of %s is up to date", name, tmplName))
		return name, nil
	}
	return name, h.makeWarm(ctx, conn, req, tmpl, p, name)
}

// makeWarm boots an instance of tmpl named name, waits for its guest agent and saves
// it: its overlays and its save image become the warm image name, marked complete last.
// Whatever fails, it removes what it made. Then it removes the family's older images
// that no domain uses.
func (h *Host) makeWarm(ctx context.Context, conn *Conn, req Request, tmpl *template.Template, p warmProfile, name string) (err error) {
	w, err := conn.warm()
	if err != nil {
		return err
	}
	start := time.Now()
	after, cancelAfter := lingering(ctx, AfterCancel)
	defer cancelAfter()
	pool, err := conn.api.StoragePoolLookupByName(h.Pool)
	if err != nil {
		return fmt.Errorf("storage pool %q: %w", h.Pool, err)
	}
	// The domain that boots to be saved: named by the instances' prefix, so that gc
	// sweeps it if this process dies.
	domName := h.Prefix + "warm-" + name[strings.LastIndex(name, "-")+1:]
	// Leftovers of an earlier try (a crash): its domain, and then its volumes.
	if _, err := conn.Teardown(ctx, domName, nil); err != nil {
		return fmt.Errorf("warm image %s: remove an earlier try: %w", name, err)
	}
	if err := deleteVolumes(conn, pool, func(v string) bool {
		return strings.HasPrefix(v, name+"-") || v == name+".save" || v == name+".done"
	}); err != nil {
		return fmt.Errorf("warm image %s: remove an earlier try: %w", name, err)
	}
	prepareID := randomHex(8)
	wreq := req
	wreq.Name, wreq.warmImage, wreq.helper, wreq.Owner = domName, name, p.Helper, meta.Owner{Manual: true}
	// It is this process's: if this process dies, the next prepare's sweep (or gc)
	// removes it as an orphan.
	wreq.Process = RunnerOf(os.Getpid())
	if p.SSHNIC {
		wreq.mac = sshMAC()
	} else {
		wreq.Transport, wreq.mac = meta.TransportAgent, ""
	}
	spec, err := h.spec(wreq, tmpl, prepareID, meta.Volume{Pool: h.Pool, Name: name + ".save"})
	if err != nil {
		return err
	}
	release, err := h.admit(ctx, conn, tmpl.MemoryKiB())
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			h.rollback(after, domName, prepareID)
		}
	}()
	_, err = conn.Create(ctx, spec)
	release()
	if err != nil {
		return fmt.Errorf("warm image %s: %w", name, err)
	}
	dom, err := conn.api.DomainLookupByName(domName)
	if err != nil {
		return fmt.Errorf("warm image %s: %w", name, err)
	}
	agent, err := guest.NewAgent(conn.API(), domName)
	if err != nil {
		return err
	}
	bctx, cancel := h.bootTimeout(ctx)
	defer cancel()
	if err := agent.WaitReady(bctx); err != nil {
		return fmt.Errorf("warm image %s: %w", name, err)
	}
	booted := time.Since(start)
	// Let the guest finish its boot, and make the memory image small: free memory
	// zeroed (QEMU saves a zero page in a few bytes).
	if err := agent.Quiesce(bctx); err != nil {
		return &notSavedError{fmt.Errorf("warm image %s: %w", name, err)}
	}
	x := fmt.Sprintf("<volume><name>%s.save</name><capacity unit='bytes'>0</capacity><target><format type='raw'/></target></volume>", name)
	saveVol, err := conn.api.StorageVolCreateXML(pool, x, 0)
	if err != nil {
		return &notSavedError{fmt.Errorf("warm image %s: create its save volume: %w", name, err)}
	}
	path, err := w.StorageVolGetPath(saveVol)
	if err != nil {
		return &notSavedError{fmt.Errorf("warm image %s: %w", name, err)}
	}
	saveStart := time.Now()
	var t time.Duration
	if err := conn.step(ctx, domName, "save "+domName, &t, func() error {
		return w.DomainSaveFlags(dom, path, libvirt.OptString{}, uint32(libvirt.DomainSaveRunning))
	}); err != nil {
		return &notSavedError{fmt.Errorf("warm image %s: %w", name, err)}
	}
	// libvirt refreshes what it knows of the volume (made empty): its size is the image's.
	if _, _, _, err := conn.api.StorageVolGetInfo(saveVol); err != nil {
		return &notSavedError{fmt.Errorf("warm image %s: %w", name, err)}
	}
	// The domain goes; its volumes stay, as the warm image.
	if err := conn.api.DomainUndefineFlags(dom, libvirt.DomainUndefineManagedSave); err != nil {
		return fmt.Errorf("warm image %s: undefine: %w", name, err)
	}
	x = fmt.Sprintf("<volume><name>%s.done</name><capacity unit='bytes'>0</capacity><target><format type='raw'/></target></volume>", name)
	if _, err := conn.api.StorageVolCreateXML(pool, x, 0); err != nil {
		return fmt.Errorf("warm image %s: mark it complete: %w", name, err)
	}
	h.Log.Info(fmt.Sprintf("made the warm image %s of %s in %.1f s (booted in %.1f s, saved in %.1f s)", name, tmpl.Name,
		time.Since(start).Seconds(), booted.Seconds(), time.Since(saveStart).Seconds()),
		"warm", name, "warm_ms", time.Since(start).Milliseconds(), "save_ms", time.Since(saveStart).Milliseconds())
	if n, err := h.removeOldWarm(conn, pool, name); err != nil {
		h.Log.Warn(fmt.Sprintf("removing old warm images: %v", err))
	} else if n > 0 {
		h.Log.Info(fmt.Sprintf("removed %d older warm images of %s", n, tmpl.Name))
	}
	return nil
}

// notSavedError: the template's instance booted, but could not be saved (a device QEMU
// cannot migrate, say): its instances can still be booted.
type notSavedError struct{ err error }

func (e *notSavedError) Error() string { return e.err.Error() }
func (e *notSavedError) Unwrap() error { return e.err }

// deleteVolumes deletes the volumes of pool whose names match.
func deleteVolumes(conn *Conn, pool libvirt.StoragePool, match func(string) bool) error {
	vols, _, err := conn.api.StoragePoolListAllVolumes(pool, 1, 0)
	if err != nil {
		return fmt.Errorf("list pool %q: %w", pool.Name, err)
	}
	for _, v := range vols {
		if match(v.Name) {
			if err := conn.api.StorageVolDelete(v, 0); err != nil && !hasCode(err, libvirt.ErrNoStorageVol) {
				return fmt.Errorf("delete %s: %w", v.Name, err)
			}
		}
	}
	return nil
}

// removeOldWarm removes the warm images of keep's family other than keep that no
// domain uses (a restored instance's disks stand on its image's). It says how many.
func (h *Host) removeOldWarm(conn *Conn, pool libvirt.StoragePool, keep string) (int, error) {
	family := keep[:strings.LastIndex(keep, "-")+1]
	return removeUnused(conn, pool, func(v string) (string, bool) {
		base, ok := strings.CutSuffix(v, ".done")
		return base, ok && strings.HasPrefix(base, family) && base != keep
	}, func(base, v string) bool { return strings.HasPrefix(v, base+"-") || v == base+".save" })
}

// removeUnused removes the images in pool that no domain's XML names: image(v) says
// whether the volume v stands for an image to remove if unused, and its NAME; part(NAME,
// v) whether v is one of its volumes. An image is whole once its mark, the volume
// NAME.done, is there; the mark goes first, so that a half-removed image is made again,
// never used. It says how many it removed.
func removeUnused(conn *Conn, pool libvirt.StoragePool, image func(v string) (string, bool), part func(name, v string) bool) (int, error) {
	vols, _, err := conn.api.StoragePoolListAllVolumes(pool, 1, 0)
	if err != nil {
		return 0, fmt.Errorf("list pool %q: %w", pool.Name, err)
	}
	var names []string
	for _, v := range vols {
		if name, ok := image(v.Name); ok {
			names = append(names, name)
		}
	}
	if len(names) == 0 {
		return 0, nil
	}
	xmls, err := domainXMLs(conn)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, name := range names {
		// By volume name or by path: the name starts a quoted value or a path's file name.
		if slices.ContainsFunc(xmls, func(x string) bool {
			return strings.Contains(x, "'"+name) || strings.Contains(x, `"`+name) || strings.Contains(x, "/"+name)
		}) {
			continue
		}
		if err := deleteVolumes(conn, pool, func(v string) bool { return v == name+".done" }); err != nil {
			return n, err
		}
		if err := deleteVolumes(conn, pool, func(v string) bool { return part(name, v) }); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// domainXMLs returns the XML of every domain.
func domainXMLs(conn *Conn) ([]string, error) {
	doms, _, err := conn.api.ConnectListAllDomains(1, 0)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	var xmls []string
	for _, d := range doms {
		x, err := conn.api.DomainGetXMLDesc(d, 0)
		if hasCode(err, libvirt.ErrNoDomain) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("XML of %q: %w", d.Name, err)
		}
		xmls = append(xmls, x)
	}
	return xmls, nil
}

// restoredSpec lays out an instance restored from wi: its overlays on the warm image's,
// its copy of the save image, its metadata, and its domain XML, rewritten from the warm
// image's. It returns the MAC address changes the guest must make.
func (h *Host) restoredSpec(conn *Conn, req Request, wi *WarmImage, prepareID string) (Spec, []template.MACChange, error) {
	im := h.newMetadata(req, wi.Template, prepareID)
	im.Warm = wi.Name
	spec := Spec{Name: req.Name}
	overlays := map[string]template.Overlay{}
	for target, vol := range wi.Overlays {
		v, err := conn.api.StorageVolLookupByName(wi.pool, vol)
		if err != nil {
			return spec, nil, fmt.Errorf("warm image %s: %w", wi.Name, err)
		}
		w, _ := conn.warm()
		path, err := w.StorageVolGetPath(v)
		if err != nil {
			return spec, nil, fmt.Errorf("warm image %s: %w", wi.Name, err)
		}
		nv := NewVolume{
			Volume:        meta.Volume{Pool: h.Pool, Name: req.Name + "-" + prepareID[:6] + "-" + target + ".qcow2"},
			BackingPath:   path,
			BackingFormat: "qcow2",
		}
		spec.Volumes = append(spec.Volumes, nv)
		im.Volumes = append(im.Volumes, nv.Volume)
		overlays[target] = template.Overlay{Pool: nv.Pool, Volume: nv.Name}
	}
	slices.SortFunc(spec.Volumes, func(a, b NewVolume) int { return strings.Compare(a.Name, b.Name) })
	// The copy of the save image, listed before it is made, as every volume is, and
	// taken off the list once deleted, after the restore.
	after := im
	spec.restored = &after
	spec.Image = meta.Volume{Pool: h.Pool, Name: req.Name + "-" + prepareID[:6] + ".save"}
	im.Volumes = append(slices.Clone(im.Volumes), spec.Image)
	md, err := im.MarshalElement()
	if err != nil {
		return spec, nil, err
	}
	var macs []template.MACChange
	spec.DomainXML, macs, err = template.Restored(wi.XML, template.Clone{Name: req.Name, UUID: newUUID(), Metadata: md, Overlays: overlays}, sshMAC)
	spec.warm = wi
	return spec, macs, err
}

// newUUID is a random (version 4) UUID.
func newUUID() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}

// Restore makes the instance spec (restoredSpec) as Create does, but from its warm
// image: it defines the domain, creates its overlays, copies the save image with its
// header rewritten for this domain (libvirt restores a save image only into the domain
// its header describes), restores it and deletes the copy.
func (c *Conn) Restore(ctx context.Context, spec Spec) (Timings, error) {
	var t Timings
	w, err := c.warm()
	if err != nil {
		return t, err
	}
	wi := spec.warm
	header, err := rewriteHeader(wi.header, spec.DomainXML)
	if err != nil {
		return t, fmt.Errorf("restore %q: %w", spec.Name, err)
	}
	if _, err := c.defineWithOverlays(ctx, spec, &t); err != nil {
		return t, err
	}
	pool, err := c.api.StoragePoolLookupByName(spec.Image.Pool)
	if err != nil {
		return t, fmt.Errorf("storage pool %q: %w", spec.Image.Pool, err)
	}
	var img libvirt.StorageVol
	x := fmt.Sprintf("<volume><name>%s</name><capacity unit='bytes'>0</capacity><target><format type='raw'/><permissions><mode>0600</mode></permissions></target></volume>", spec.Image.Name)
	err = c.step(ctx, spec.Name, fmt.Sprintf("copy the warm image %s", wi.Name), &t.Image, func() (err error) {
		img, err = w.StorageVolCreateXMLFrom(pool, x, wi.save, 0)
		if err != nil {
			return err
		}
		return wi.host.upload(ctx, img, header)
	})
	if err != nil {
		return t, err
	}
	path, err := w.StorageVolGetPath(img)
	if err != nil {
		return t, fmt.Errorf("restore %q: %w", spec.Name, err)
	}
	err = c.step(ctx, spec.Name, fmt.Sprintf("restore %q", spec.Name), &t.Start, func() error {
		return w.DomainRestoreFlags(path, libvirt.OptString{}, uint32(libvirt.DomainSaveRunning))
	})
	// QEMU has read it: the copy goes now, not at cleanup (the teardown would, too).
	if derr := c.api.StorageVolDelete(img, 0); derr != nil && err == nil {
		return t, fmt.Errorf("restore %q: delete the copy of its memory image: %w", spec.Name, derr)
	}
	if err == nil && spec.restored != nil {
		err = c.SetMetadata(spec.Name, *spec.restored)
	}
	return t, err
}

// rewriteHeader returns the save image header hd with the domain XML x in place of its
// own, and the rest of its XML region (the cookie) kept.
func rewriteHeader(hd []byte, x string) ([]byte, error) {
	dataLen := binary.NativeEndian.Uint32(hd[20:24])
	cookieOff := binary.NativeEndian.Uint32(hd[32:36])
	region := hd[saveHeaderSize:]
	var cookie []byte
	if cookieOff > 0 && cookieOff < dataLen {
		cookie = bytes.TrimRight(region[cookieOff:], "\x00")
	}
	xb := append([]byte(x), 0)
	n := len(xb)
	if len(cookie) > 0 {
		n += len(cookie) + 1
	}
	if n > int(dataLen) {
		return nil, fmt.Errorf("the domain XML (%d bytes) does not fit in the save image's header (%d)", n, dataLen)
	}
	out := make([]byte, saveHeaderSize+int(dataLen))
	copy(out, hd[:saveHeaderSize])
	copy(out[saveHeaderSize:], xb)
	off := uint32(0)
	if len(cookie) > 0 {
		off = uint32(len(xb))
		copy(out[saveHeaderSize+len(xb):], cookie)
	}
	binary.NativeEndian.PutUint32(out[32:36], off)
	return out, nil
}

// restore is the Launcher of a restored instance (Restore).
type restore struct{}

func (restore) Launch(ctx context.Context, c *Conn, spec Spec) (Timings, error) {
	return c.Restore(ctx, spec)
}

// linksUp brings up the link of each NIC of the instance name with one of the MAC
// addresses macs.
func (c *Conn) linksUp(name string, macs []string) error {
	if len(macs) == 0 {
		return nil
	}
	w, err := c.warm()
	if err != nil {
		return err
	}
	dom, err := c.api.DomainLookupByName(name)
	if err != nil {
		return fmt.Errorf("look up instance %q: %w", name, err)
	}
	x, err := c.api.DomainGetXMLDesc(dom, 0)
	if err != nil {
		return fmt.Errorf("XML of %q: %w", name, err)
	}
	for _, mac := range macs {
		ix, err := template.LinkUp(x, mac)
		if err != nil {
			return fmt.Errorf("instance %q: %w", name, err)
		}
		if err := w.DomainUpdateDeviceFlags(dom, ix, libvirt.DomainDeviceModifyLive); err != nil {
			return fmt.Errorf("instance %q: bring up the link of its NIC %s: %w", name, mac, err)
		}
	}
	return nil
}
