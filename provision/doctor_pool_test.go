package provision

import (
	"bytes"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// Doctor holds what the running jobs' disks may grow to, together, against the pool's
// free space (issue 36: it held one job's, and ignored LIBVIRT_GCI_MAX_DISK, while a
// full file system under the pool fails every VM that writes).
func TestDoctorPoolHoldsEveryJobsDisks(t *testing.T) {
	t.Parallel()
	f := provisiontest.New("ci")
	var log bytes.Buffer
	h := readyHost(t, f, &log, time.Minute)
	conn := libvirt.NewConn(f)
	tmpl := []doctorTemplate{{name: "tmpl", diskBytes: 4 << 30}}
	free := uint64(provisiontest.PoolCapacity)

	got := h.doctorPool(conn, tmpl, DoctorRequest{})
	assert.Equal(t, FindingOK, got[0].Status, got)
	assert.Contains(t, got[0].Detail, "a job's disks grow to 4 GiB at most (tmpl)")

	h.Limits.Instances = int(free/(4<<30)) + 1
	got = h.doctorPool(conn, tmpl, DoctorRequest{})
	assert.Equal(t, FindingProblem, got[0].Status, got)
	assert.Contains(t, got[0].Detail, "LIBVIRT_GCI_MAX_INSTANCES=")
	assert.Contains(t, got[0].Fix, "lower LIBVIRT_GCI_MAX_INSTANCES to")

	h.Limits.Instances = 1
	got = h.doctorPool(conn, tmpl, DoctorRequest{MaxDisk: free})
	assert.Equal(t, FindingProblem, got[0].Status, "a job asking for LIBVIRT_GCI_MAX_DISK outgrows the pool: %v", got)
	assert.Contains(t, got[0].Detail, "(LIBVIRT_GCI_MAX_DISK and tmpl)")
}
