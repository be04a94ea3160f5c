package provision

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/libvirt-gci/libvirt-gci/guest"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt/dial"
)

// The checks of the files and programs on the runner's host: the secret, the helper's
// tools, virtiofsd.

// DoctorSecret checks the secret file the instances' ssh keys come from: missing is
// fine (the first prepare makes it), but one that others could read or plant is not.
func DoctorSecret(path string) Finding {
	const check = "secret file (LIBVIRT_GCI_SECRET_FILE)"
	_, err := guest.LoadSecret(path, false)
	switch {
	case err == nil:
		return Finding{Check: check, Status: FindingOK, Detail: path + ": this user's, mode 0600"}
	case errors.Is(err, fs.ErrNotExist):
		return Finding{Check: check, Status: FindingOK, Detail: path + " is not there yet: the first prepare makes it (0600)"}
	}
	return Finding{Check: check, Status: FindingProblem, Detail: err.Error(),
		Fix: fmt.Sprintf("chown %d %s && chmod 0600 %s", os.Geteuid(), path, path)}
}

// DoctorHelperTools checks for what puts the gitlab-runner helper on a disk for the
// guests (mkfs.ext4), as prepare finds it; nothing when it is there.
func DoctorHelperTools() []Finding {
	if _, err := findTool("mkfs.ext4"); err != nil {
		return []Finding{{Check: "mkfs.ext4 (puts gitlab-runner on a disk for the guests)", Status: FindingProblem,
			Detail: err.Error(), Fix: "apt install e2fsprogs"}}
	}
	return nil
}

// vhostUserDirs are where QEMU's vhost-user descriptors say which virtiofsd to run, in
// the order libvirt reads them.
var vhostUserDirs = []string{"/etc/qemu/vhost-user", "/usr/share/qemu/vhost-user"}

// DoctorVirtiofsd checks that libvirt on uri finds a virtiofsd for the cache share: a
// vhost-user descriptor of type fs whose binary is there. On a remote host, that host's.
func DoctorVirtiofsd(uri string) Finding {
	check := "virtiofsd (LIBVIRT_GCI_CACHE_DIR is set)"
	if !dial.IsLocal(uri) {
		return Finding{Check: check, Status: FindingNote, Detail: "on " + PublicURI(uri) + ": not checked from here",
			Fix: "install virtiofsd there (Debian 12: qemu-system-common has /usr/lib/qemu/virtiofsd)"}
	}
	var seen []string
	for _, dir := range vhostUserDirs {
		files, _ := filepath.Glob(filepath.Join(dir, "*.json"))
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			var d struct{ Type, Binary string }
			if json.Unmarshal(b, &d) != nil || d.Type != "fs" {
				continue
			}
			if fi, err := os.Stat(d.Binary); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
				return Finding{Check: check, Status: FindingOK, Detail: d.Binary + " (" + f + ")"}
			}
			seen = append(seen, fmt.Sprintf("%s names %s, which is not there", f, d.Binary))
		}
	}
	detail := "no vhost-user descriptor of type fs in " + strings.Join(vhostUserDirs, " or ")
	if len(seen) > 0 {
		detail = strings.Join(seen, "; ")
	}
	return Finding{Check: check, Status: FindingProblem, Detail: detail,
		Fix: "apt install qemu-system-common (QEMU 7.2's virtiofsd) or the virtiofsd package"}
}
