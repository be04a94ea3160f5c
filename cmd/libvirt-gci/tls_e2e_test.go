package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testCA is a certificate authority of the test's own.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "libvirt-gci test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	cert, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	return &testCA{cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue makes a certificate and its key (PEM), for a server at 127.0.0.1 or a client.
func (ca *testCA) issue(t *testing.T, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: "libvirt-gci test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature}
	if server {
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	require.NoError(t, err)
	kder, err := x509.MarshalECPrivateKey(key)
	require.NoError(t, err)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// pkiDir is a directory as libvirt's pkipath wants it: cacert.pem, clientcert.pem,
// clientkey.pem.
func pkiDir(t *testing.T, trust, client *testCA) string {
	t.Helper()
	dir := t.TempDir()
	cert, key := client.issue(t, false)
	for n, b := range map[string][]byte{"cacert.pem": trust.pem, "clientcert.pem": cert, "clientkey.pem": key} {
		require.NoError(t, os.WriteFile(filepath.Join(dir, n), b, 0o600))
	}
	return dir
}

// tlsLibvirt is libvirtd's TLS endpoint, as libvirtd --listen gives it (a certificate
// from ca, clients' certificates checked against ca, the one-byte verdict), in front of
// the local libvirt's socket. It returns its port.
func tlsLibvirt(t *testing.T, ca *testCA) int {
	t.Helper()
	certPEM, keyPEM := ca.issue(t, true)
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert})
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if err := c.(*tls.Conn).Handshake(); err != nil {
					return
				}
				if _, err := c.Write([]byte{1}); err != nil {
					return
				}
				up, err := net.Dial("unix", "/var/run/libvirt/libvirt-sock")
				if err != nil {
					return
				}
				defer up.Close()
				go func() { _, _ = io.Copy(up, c); up.Close() }()
				_, _ = io.Copy(c, up)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

// A job on a libvirt reached over qemu+tls with libvirt's PKI files; a server whose
// certificate another CA signed is refused, and one that stalls after the handshake is
// given up on.
func TestRemoteQemuTLS(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t)
	port := tlsLibvirt(t, ca)
	j := newJob(t)
	j.env["LIBVIRT_GCI_URI"] = fmt.Sprintf("qemu+tls://127.0.0.1:%d/system?pkipath=%s", port, pkiDir(t, ca, ca))
	j.prepare()
	r := j.run("build_script", "echo over-tls")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Contains(t, r.stdout, "over-tls")
	r = j.stage("cleanup")
	require.Equal(t, 0, r.code, r.stderr)
	assert.Empty(t, leftovers(t, j.l, j.prefix))

	other := newTestCA(t)
	j = newJob(t)
	j.env["LIBVIRT_GCI_URI"] = fmt.Sprintf("qemu+tls://127.0.0.1:%d/system?pkipath=%s", port, pkiDir(t, other, ca))
	r = j.stage("prepare")
	assert.Equal(t, 2, r.code, r.stderr)
	assert.Contains(t, r.stderr, "certificate signed by unknown authority")
	assert.Empty(t, leftovers(t, j.l, j.prefix))

	// Accepts, and says nothing: a stalled libvirtd's host.
	j.env["LIBVIRT_GCI_URI"] = fmt.Sprintf("qemu+tls://127.0.0.1:%d/system?pkipath=%s", mutePort(t), pkiDir(t, ca, ca))
	start := time.Now()
	r = j.stage("list")
	assert.NotEqual(t, 0, r.code)
	assert.Contains(t, r.stderr, "context deadline exceeded")
	assert.Less(t, time.Since(start), 20*time.Second)
}
