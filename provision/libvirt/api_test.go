package libvirt

import (
	"github.com/digitalocean/go-libvirt"

	"github.com/libvirt-gci/libvirt-gci/provision/provisiontest"
)

// go-libvirt's client and the fake both have every role: no feature is left out on the
// fake, and none is asked of libvirt without the fake having it too.
var (
	_ API = (*libvirt.Libvirt)(nil)
	_ API = (*provisiontest.Libvirt)(nil)
)
