package provision

import (
	"context"

	"github.com/libvirt-gci/libvirt-gci/provision/libvirt"
	"github.com/libvirt-gci/libvirt-gci/provision/libvirt/dial"
)

// What front ends (the executor, the command) see of the libvirt room: a connection to
// hand to Host's methods or to test with provisiontest's fake, the instance and
// template records it lists, and the errors they act on. They do not import the room
// itself (the import rule).
type (
	Conn         = libvirt.Conn
	Instance     = libvirt.Instance
	TemplateInfo = libvirt.TemplateInfo
)

var (
	ErrNoTemplate = libvirt.ErrNoTemplate
	ErrNoInstance = libvirt.ErrNoInstance
	ErrNotManaged = libvirt.ErrNotManaged
)

// Explain says that err came of libvirtd going away, where it did (libvirt.Explain).
func Explain(err error) error { return libvirt.Explain(err) }

// CancelGrace: see libvirt.CancelGrace.
const CancelGrace = libvirt.CancelGrace

// Connect dials libvirt at uri (libvirt.Connect).
func Connect(ctx context.Context, uri string) (*Conn, error) { return libvirt.Connect(ctx, uri) }

// NewConn is a Conn over a as it is (provisiontest's fake, say).
func NewConn(a libvirt.API) *Conn { return libvirt.NewConn(a) }

// ReachesHost tells whether a connection to the libvirt URI uri reaches TCP addresses on
// libvirtd's host, as guests' forwarded SSH ports want (dial.ReachesHost).
func ReachesHost(uri string) bool { return dial.ReachesHost(uri) }

// IsLocal tells whether the libvirt URI uri names this host's libvirt (dial.IsLocal).
func IsLocal(uri string) bool { return dial.IsLocal(uri) }

// CheckURI refuses a libvirt URI this tool does not speak or will not (dial.Check).
func CheckURI(uri string) error { return dial.Check(uri) }

// PublicURI is a libvirt URI as a job's log may show it (dial.Public).
func PublicURI(uri string) string { return dial.Public(uri) }
