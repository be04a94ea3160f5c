package guest

import (
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/crypto/ssh"
)

// secretSize is the length of the host secret that instance keys are derived from.
const secretSize = 32

// LoadSecret reads the host secret from path, a file only its owner may read. With
// create, a missing file is made (0600, in a 0700 directory if that is missing too);
// concurrent first uses agree on one secret.
func LoadSecret(path string, create bool) ([]byte, error) {
	if path == "" {
		return nil, errors.New("no secret file: set LIBVIRT_GCI_SECRET_FILE")
	}
	s, err := readSecret(path)
	if err == nil || !create || !errors.Is(err, fs.ErrNotExist) {
		return s, err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("secret file: %w", err)
	}
	var b [secretSize]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, fmt.Errorf("secret file: %w", err)
	}
	// Write a temporary file, then link it into place: the link fails if another process
	// got there first, and then its secret is the one.
	tmp, err := os.CreateTemp(filepath.Dir(path), ".secret-*")
	if err != nil {
		return nil, fmt.Errorf("secret file: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, werr := tmp.WriteString(hex.EncodeToString(b[:]) + "\n")
	if err := errors.Join(werr, tmp.Sync(), tmp.Close()); err != nil {
		return nil, fmt.Errorf("secret file %s: %w", path, err)
	}
	if err := os.Link(tmp.Name(), path); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("secret file: %w", err)
	}
	return readSecret(path)
}

func readSecret(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("secret file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("secret file: %w", err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("secret file %s has mode %04o: others can read it; it must be 0600 (chmod 600 %s)", path, perm, path)
	}
	if err := trustedOwner(path, fi, false); err != nil {
		return nil, err
	}
	dir, err := os.Stat(filepath.Dir(path))
	if err != nil {
		return nil, fmt.Errorf("secret file: %w", err)
	}
	if err := trustedOwner(filepath.Dir(path), dir, true); err != nil {
		return nil, err
	}
	buf := make([]byte, 2*secretSize+2)
	n, _ := f.Read(buf)
	s, err := hex.DecodeString(strings.TrimSpace(string(buf[:n])))
	if err != nil || len(s) != secretSize {
		return nil, fmt.Errorf("secret file %s: want %d hex-encoded bytes", path, secretSize)
	}
	return s, nil
}

// trustedOwner refuses a secret file, or its directory, that another user could have
// planted or replaced: the file must be ours; the directory ours or root's, and writable
// by no one else.
func trustedOwner(path string, fi fs.FileInfo, isDir bool) error {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	me := uint32(os.Geteuid())
	what := "secret file"
	if isDir {
		what = "directory of the secret file"
	}
	if st.Uid != me && !(isDir && st.Uid == 0) {
		return fmt.Errorf("%s %s belongs to uid %d, not to this user (uid %d); refusing a secret another user could have planted", what, path, st.Uid, me)
	}
	if isDir && fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%s %s has mode %04o: other users can replace the secret in it; make it 0700 (chmod 700 %s)", what, path, fi.Mode().Perm(), path)
	}
	return nil
}

// ClientKey derives an instance's SSH client key from the host secret and the instance's
// libvirt UUID: stable for one instance (every stage re-derives it, nothing is stored),
// different for every other, and unknown to anyone without the secret.
func ClientKey(secret []byte, uuid [16]byte) (ssh.Signer, error) {
	if len(secret) != secretSize {
		return nil, fmt.Errorf("client key: secret of %d bytes, want %d", len(secret), secretSize)
	}
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte("libvirt-gci ssh client key v1\x00"))
	mac.Write(uuid[:])
	signer, err := ssh.NewSignerFromKey(ed25519.NewKeyFromSeed(mac.Sum(nil)))
	if err != nil {
		return nil, fmt.Errorf("client key: %w", err)
	}
	return signer, nil
}

// AuthorizedKey is the authorized_keys line for a client key, with a comment.
func AuthorizedKey(pub ssh.PublicKey, comment string) string {
	return strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub))) + " " + comment
}

// NewHostKey makes a guest's SSH host key, an Ed25519 key from the host's randomness:
// its public key, and its private key in OpenSSH's format (the file sshd reads).
func NewHostKey() (ssh.PublicKey, []byte, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("host key: %w", err)
	}
	block, err := ssh.MarshalPrivateKey(priv, "libvirt-gci")
	if err != nil {
		return nil, nil, fmt.Errorf("host key: %w", err)
	}
	key, err := ssh.NewPublicKey(pub)
	if err != nil {
		return nil, nil, fmt.Errorf("host key: %w", err)
	}
	return key, pem.EncodeToMemory(block), nil
}
