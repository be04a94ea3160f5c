package executor

import (
	"context"

	"github.com/libvirt-gci/libvirt-gci/provision"
)

// hostAt is the lifecycle of instances on the libvirt at uri, as the settings configure it.
func (e *Executor) hostAt(uri string) *provision.Host {
	return &provision.Host{URI: uri, Dial: e.Dial, Config: e.Settings.Config, Version: e.Version, Log: e.Log, Out: e.Stdout}
}

// host is the first host of LIBVIRT_GCI_URI: the one the template commands act on.
func (e *Executor) host() *provision.Host { return e.hostAt(e.Settings.URIs()[0]) }

// hosts are all of them.
func (e *Executor) hosts() provision.Fleet {
	var hs provision.Fleet
	for _, u := range e.Settings.URIs() {
		hs = append(hs, e.hostAt(u))
	}
	return hs
}

// place picks the host for a new instance (Fleet.Place).
func (e *Executor) place(ctx context.Context) (*provision.Host, error) {
	return e.hosts().Place(ctx, e.Log)
}

// locate finds the host of the instance name (Fleet.Locate).
func (e *Executor) locate(ctx context.Context, name string) (*provision.Host, error) {
	return e.hosts().Locate(ctx, name)
}
