// Package provision is everything libvirt: connect, clone a template into overlay volumes
// and a domain, start it, read its metadata, tear it down.
package provision

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"sync"

	"github.com/digitalocean/go-libvirt"
)

// The go-libvirt calls this package makes, split by concern so a test fake stays small.
type domainAPI interface {
	DomainLookupByName(name string) (libvirt.Domain, error)
	DomainGetXMLDesc(dom libvirt.Domain, flags libvirt.DomainXMLFlags) (string, error)
	DomainGetState(dom libvirt.Domain, flags uint32) (int32, int32, error)
	DomainGetMetadata(dom libvirt.Domain, typ int32, uri libvirt.OptString, flags libvirt.DomainModificationImpact) (string, error)
	DomainDefineXMLFlags(xml string, flags libvirt.DomainDefineFlags) (libvirt.Domain, error)
	DomainCreate(dom libvirt.Domain) error
	DomainDestroyFlags(dom libvirt.Domain, flags libvirt.DomainDestroyFlagsValues) error
	DomainUndefineFlags(dom libvirt.Domain, flags libvirt.DomainUndefineFlagsValues) error
	DomainSetMetadata(dom libvirt.Domain, typ int32, metadata libvirt.OptString, key libvirt.OptString, uri libvirt.OptString, flags libvirt.DomainModificationImpact) error
	QEMUDomainMonitorCommand(dom libvirt.Domain, cmd string, flags uint32) (string, error)
}

type storageAPI interface {
	StoragePoolLookupByName(name string) (libvirt.StoragePool, error)
	StorageVolCreateXML(pool libvirt.StoragePool, xml string, flags libvirt.StorageVolCreateFlags) (libvirt.StorageVol, error)
	StorageVolLookupByName(pool libvirt.StoragePool, name string) (libvirt.StorageVol, error)
	StorageVolDelete(vol libvirt.StorageVol, flags libvirt.StorageVolDeleteFlags) error
}

type api interface {
	domainAPI
	storageAPI
}

// Conn is a connection to libvirtd.
type Conn struct {
	lv   *libvirt.Libvirt // nil for a fake
	api  api
	stop func() bool
	once sync.Once
}

// Connect dials libvirt at uri (qemu:///system, qemu+ssh://host/system, test:///default, ...).
// go-libvirt takes no contexts, so the connection is closed when ctx ends: calls in flight
// then return at once with an error.
func Connect(ctx context.Context, uri string) (*Conn, error) {
	u, err := url.Parse(uri)
	if err != nil {
		return nil, fmt.Errorf("libvirt URI %q: %w", uri, err)
	}
	type result struct {
		lv  *libvirt.Libvirt
		err error
	}
	done := make(chan result, 1)
	go func() {
		lv, err := libvirt.ConnectToURI(u)
		done <- result{lv, err}
	}()
	var r result
	select {
	case r = <-done:
	case <-ctx.Done():
		go func() { // do not leak a connection that completes after we gave up
			if r := <-done; r.err == nil {
				_ = r.lv.Disconnect()
			}
		}()
		return nil, fmt.Errorf("connect to libvirt at %s: %w", uri, context.Cause(ctx))
	}
	if r.err != nil {
		return nil, fmt.Errorf("connect to libvirt at %s: %w", uri, r.err)
	}
	c := &Conn{lv: r.lv, api: r.lv}
	c.stop = context.AfterFunc(ctx, func() { _ = c.Close() })
	return c, nil
}

// Libvirt is the raw client, for the guest package's agent transport.
func (c *Conn) Libvirt() *libvirt.Libvirt { return c.lv }

// Close disconnects. It is safe to call more than once.
func (c *Conn) Close() error {
	var err error
	c.once.Do(func() {
		if c.stop != nil {
			c.stop()
		}
		if c.lv != nil {
			err = c.lv.Disconnect()
		}
	})
	return err
}

// hasCode tells whether err carries a libvirt error with one of codes.
func hasCode(err error, codes ...libvirt.ErrorNumber) bool {
	var lerr libvirt.Error
	if !errors.As(err, &lerr) {
		return false
	}
	for _, c := range codes {
		if lerr.Code == uint32(c) {
			return true
		}
	}
	return false
}
