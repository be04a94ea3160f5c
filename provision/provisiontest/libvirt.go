// Package provisiontest is a stateful in-memory libvirt for tests, in the manner of
// net/http/httptest: domains and volumes in maps, the XML it is given parsed, the error
// values real libvirt returns, failures injected at any call, and a guest agent in every
// running domain whose scripts are Go functions.
package provisiontest

import (
	"fmt"
	"slices"
	"strings"
	"sync"

	"github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"
)

// Template is a template domain to define in the fake: "tmpl", with one qcow2 disk
// (vda, /t/root.qcow2) and the guest agent channel.
const Template = `<domain type='qemu'><name>tmpl</name><memory unit='KiB'>262144</memory><vcpu>1</vcpu>
<os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/t/root.qcow2'/><target dev='vda' bus='virtio'/></disk>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>`

// TemplatePool holds the template's disk, /t/root.qcow2, as a pool that knows its size
// and change time (what a warm image's name depends on). State leaves it out.
const TemplatePool = "t"

const templateDisk = `<volume><name>root.qcow2</name><capacity unit='bytes'>1073741824</capacity>
<target><path>/t/root.qcow2</path><format type='qcow2'/><timestamps><mtime>1764000000.0</mtime></timestamps></target></volume>`

// Libvirt is a stateful in-memory libvirt: domains and volumes in maps, the XML it is
// given parsed, and the error values real libvirt returns.
type Libvirt struct {
	mu      sync.Mutex
	domains map[string]*domain
	pools   map[string]map[string]string // pool -> volume -> volume XML
	// failures to inject, by method name
	fail     map[string]error
	nth      map[string]nth
	count    map[string]int
	calls    []string
	agentLog []string          // guest agent commands, by name
	data     map[string][]byte // pool/volume -> its content, where something wrote it
	job      JobFunc
	// system is what the guests' systemd says of their boot ("" for no systemd); nics
	// the guests' NICs that have no address.
	system, failed string
	noAddress      map[string]bool
	macs           int               // MAC addresses given out
	noReseed       bool              // the guests have no way to reseed their RNG at once
	kvmEmulator    string            // offered KVM with this QEMU (SetKVM); "": none
	blockSizes     map[string]uint64 // DomainBlockResize's, by domain/disk
	poolSizes      map[string]uint64 // SetPoolCapacity's, by pool
	networks       map[string]*libvirtxml.Network
	filters        map[string]string // nwfilters defined, by name
	// gates hold a call, by method name, until the channel is closed; entered gets the
	// method's name when such a call arrives. The call then completes in the fake libvirtd
	// whatever became of the client, as in libvirtd.
	gates   map[string]chan struct{}
	entered chan string
	dropped chan struct{} // closed when the client drops its connection
	drop    func()
}

type domain struct {
	xml     string
	running bool
	paused  bool
	ioError bool   // paused by FillPool: on a write its host could not store
	guest   *guest // while it runs
	crashed bool   // shut off by Crash: its QEMU ended without a shutdown
}

// Crash ends the running domain name as a killed QEMU does: shut off, reason crashed,
// its guest gone.
func (f *Libvirt) Crash(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if fd := f.domains[name]; fd != nil {
		fd.running, fd.paused, fd.guest, fd.crashed = false, false, nil, true
	}
}

// NoReseed makes the guests ones that cannot reseed their RNG at once (no vmgenid
// driver, perl or python3).
func (f *Libvirt) NoReseed() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.noReseed = true
}

func New(pools ...string) *Libvirt {
	f := &Libvirt{domains: map[string]*domain{}, pools: map[string]map[string]string{}, fail: map[string]error{},
		gates: map[string]chan struct{}{}, data: map[string][]byte{}, nth: map[string]nth{}, count: map[string]int{}, entered: make(chan string, 16)}
	f.Reconnect()
	f.pools[TemplatePool] = map[string]string{"root.qcow2": templateDisk}
	for _, p := range pools {
		f.pools[p] = map[string]string{}
	}
	return f
}

func lverr(code libvirt.ErrorNumber, format string, args ...any) error {
	return libvirt.Error{Code: uint32(code), Message: fmt.Sprintf(format, args...)}
}

// enter records a call and returns the failure injected for it, if any.
func (f *Libvirt) enter(method string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, method)
	f.count[method]++
	if n, ok := f.nth[method]; ok && n.n == f.count[method] {
		return n.err
	}
	return f.fail[method]
}

type nth struct {
	n   int
	err error
}

// FailNth makes only the nth call (from 1) of method fail with err.
func (f *Libvirt) FailNth(method string, n int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.nth[method] = nth{n, err}
}

// Fail makes every call of method fail with err from now on (nil: succeed again).
func (f *Libvirt) Fail(method string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		delete(f.fail, method)
		return
	}
	f.fail[method] = err
}

// Calls lists the calls made so far, by method name, in order.
func (f *Libvirt) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

// Gate holds every call of method until the returned channel is closed; Entered reports
// each such call as it arrives. The call still completes in the fake libvirtd when the
// gate opens, whatever became of the client, as in libvirtd.
func (f *Libvirt) Gate(method string) chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	g := make(chan struct{})
	f.gates[method] = g
	return g
}

// Entered receives the method name of each gated call as it arrives.
func (f *Libvirt) Entered() <-chan string { return f.entered }

// Drop is the client dropping its connection: calls in flight return ErrInterrupted.
func (f *Libvirt) Drop() {
	f.mu.Lock()
	drop := f.drop
	f.mu.Unlock()
	drop()
}

// Dropped is closed once the client has dropped its connection.
func (f *Libvirt) Dropped() <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.dropped
}

// call runs op, a call to the fake libvirtd. A client that has dropped its connection
// gets libvirt.ErrInterrupted, as from go-libvirt. A gated call waits for its gate in
// libvirtd; a client that drops meanwhile gets ErrInterrupted at once, and op still runs
// when the gate opens.
func (f *Libvirt) call(method string, op func() error) error {
	f.mu.Lock()
	gate, dropped := f.gates[method], f.dropped
	f.mu.Unlock()
	select {
	case <-dropped:
		return libvirt.ErrInterrupted
	default:
	}
	if gate == nil {
		return op()
	}
	f.entered <- method
	done := make(chan error, 1)
	go func() {
		<-gate
		done <- op()
	}()
	select {
	case err := <-done:
		return err
	case <-dropped:
		return libvirt.ErrInterrupted
	}
}

// callFor is call for an op with a result. The result comes back over a channel, never
// through the caller's variables: a client that drops gets ErrInterrupted at once, while
// a gated op still runs, later, when its gate opens.
func callFor[T any](f *Libvirt, method string, op func() (T, error)) (T, error) {
	out := make(chan T, 1)
	err := f.call(method, func() error {
		v, err := op()
		out <- v
		return err
	})
	if err != nil {
		var zero T
		return zero, err
	}
	return <-out, nil
}

// Disconnected is Dropped, as go-libvirt's client says it: the connection ended.
func (f *Libvirt) Disconnected() <-chan struct{} { return f.Dropped() }

// Reconnect is a new client connection to the same fake libvirtd.
func (f *Libvirt) Reconnect() {
	f.mu.Lock()
	defer f.mu.Unlock()
	dropped := make(chan struct{})
	f.dropped, f.drop = dropped, sync.OnceFunc(func() { close(dropped) })
}

// State summarises what exists, for assertions on end state.
func (f *Libvirt) State() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var parts []string
	for n, d := range f.domains {
		parts = append(parts, fmt.Sprintf("domain %s running=%v", n, d.running))
	}
	for p, vols := range f.pools {
		if p == TemplatePool {
			continue // the templates' disks, not what a test makes
		}
		for v := range vols {
			parts = append(parts, "volume "+p+"/"+v)
		}
	}
	for n, net := range f.networks {
		for _, ip := range net.IPs {
			if ip.DHCP == nil {
				continue
			}
			for _, h := range ip.DHCP.Hosts {
				parts = append(parts, "host "+n+"/"+h.MAC+" "+h.IP)
			}
		}
	}
	slices.Sort(parts)
	return strings.Join(parts, "; ")
}
