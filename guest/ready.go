package guest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/digitalocean/go-libvirt"
)

// What "ready for the job" means beyond an answering agent: where systemd runs, its boot
// has finished; each NIC of the template's has its address. Both are asked through the
// agent, bounded by ctx.

// SystemState is what systemd says of the guest's boot once it is over.
type SystemState struct {
	Systemd bool     // systemd is the guest's init; else nothing was waited for
	State   string   // is-system-running's answer: running, degraded, ...
	Failed  []string // the failed units of a degraded system
}

// systemWait waits (at most $1 seconds) for systemd's boot to end and prints its state
// and, for a degraded system, its failed units; or "none" where systemd is not PID 1.
const systemWait = `[ -d /run/systemd/system ] || { echo none; exit 0; }
s=$(timeout "$1" systemctl is-system-running --wait 2>/dev/null) || true
echo "${s:-unknown}"
if [ "$s" = degraded ]; then systemctl list-units --state=failed --no-legend --plain 2>/dev/null | while read -r u _; do echo "failed $u"; done; fi`

// WaitSystem waits, where systemd is the guest's init, until its boot has finished
// (is-system-running past starting): running or degraded (a degraded system is usable,
// and says which units failed). Any other state once ctx ends, or once the guest's own
// bound ends, is an error that says what it waited for.
func (a *Agent) WaitSystem(ctx context.Context) (SystemState, error) {
	bound := 300
	if d, ok := ctx.Deadline(); ok {
		bound = max(int(time.Until(d).Seconds()), 1)
	}
	st, out, err := a.execWait(ctx, "/bin/sh", "-c", systemWait, "gci", fmt.Sprint(bound))
	if err != nil {
		return SystemState{}, fmt.Errorf("%w: waiting for systemd to finish booting (systemctl is-system-running --wait): %v", ErrNotReady, err)
	}
	if st.Code != 0 || st.Signal != 0 {
		return SystemState{}, fmt.Errorf("%w: waiting for systemd to finish booting: %s: %s", ErrNotReady, st, strings.TrimSpace(out))
	}
	return ParseSystemState(out)
}

// ParseSystemState reads what systemWait printed.
func ParseSystemState(out string) (SystemState, error) {
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if lines[0] == "none" {
		return SystemState{}, nil
	}
	s := SystemState{Systemd: true, State: strings.TrimSpace(lines[0])}
	for _, l := range lines[1:] {
		if u, ok := strings.CutPrefix(l, "failed "); ok {
			s.Failed = append(s.Failed, strings.TrimSpace(u))
		}
	}
	switch s.State {
	case "running", "degraded":
		return s, nil
	case "initializing", "starting":
		return s, fmt.Errorf("%w: systemd had not finished booting (is-system-running: %s) when the boot timeout passed", ErrNotReady, s.State)
	}
	return s, fmt.Errorf("%w: systemd's boot ended %s (is-system-running), not running or degraded", ErrNotReady, s.State)
}

// NICAddress is a NIC's address, as the guest has it.
type NICAddress struct {
	MAC, Device, Addr string
}

// WaitAddresses waits until each NIC with one of the MAC addresses macs has an address
// (IPv4, or a global IPv6 one: not only its link-local one), asking the agent for the
// guest's interfaces (no program started in the guest) every 100 ms. It returns them in
// the order of macs. Once ctx ends, it says which NICs had none.
func (a *Agent) WaitAddresses(ctx context.Context, macs []string) ([]NICAddress, error) {
	if len(macs) == 0 {
		return nil, nil
	}
	var last error
	for {
		got, missing, err := a.addresses(ctx, macs)
		if err == nil && len(missing) == 0 {
			return got, nil
		}
		if err != nil {
			last = err
			var lerr libvirt.Error
			if errors.As(err, &lerr) && (lerr.Code == uint32(libvirt.ErrOperationInvalid) || lerr.Code == uint32(libvirt.ErrNoDomain)) {
				return nil, fmt.Errorf("%w: waiting for the template's NICs to get their addresses: %v", ErrNotReady, err) // not running any more, or gone
			}
		}
		if !Sleep(ctx, 100*time.Millisecond) {
			why := fmt.Sprintf("NIC %s had no address", strings.Join(missing, ", "))
			if len(missing) == 0 {
				why = "the guest's NICs could not be read"
			}
			if last != nil {
				why += fmt.Sprintf(" (last error: %v)", last)
			}
			return nil, fmt.Errorf("%w: waiting for the template's NICs to get their addresses: %s when %v; does the guest configure them "+
				"(DHCP on their network, or a static address)?", ErrNotReady, why, context.Cause(ctx))
		}
	}
}

type agentInterface struct {
	Name string `json:"name"`
	MAC  string `json:"hardware-address"`
	IPs  []struct {
		Type   string `json:"ip-address-type"`
		Addr   string `json:"ip-address"`
		Prefix int    `json:"prefix"`
	} `json:"ip-addresses"`
}

// addresses is one look at the guest's interfaces: each of macs that has an address,
// and those that have none (as given, lower case).
func (a *Agent) addresses(ctx context.Context, macs []string) ([]NICAddress, []string, error) {
	var ifs []agentInterface
	if err := a.call(ctx, pingTimeout, "guest-network-get-interfaces", nil, &ifs); err != nil {
		return nil, lower(macs), err
	}
	got, missing := matchAddresses(ifs, macs)
	return got, missing, nil
}

func lower(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = strings.ToLower(s)
	}
	return out
}

// matchAddresses picks, for each MAC address, an address of the interface that has it.
func matchAddresses(ifs []agentInterface, macs []string) ([]NICAddress, []string) {
	var got []NICAddress
	var missing []string
	for _, m := range lower(macs) {
		i := slices.IndexFunc(ifs, func(f agentInterface) bool { return strings.EqualFold(f.MAC, m) })
		found := false
		if i >= 0 {
			for _, ip := range ifs[i].IPs {
				p := net.ParseIP(ip.Addr)
				if p == nil || p.IsLinkLocalUnicast() || p.IsLoopback() {
					continue
				}
				got = append(got, NICAddress{MAC: m, Device: ifs[i].Name, Addr: fmt.Sprintf("%s/%d", ip.Addr, ip.Prefix)})
				found = true
				break
			}
		}
		if !found {
			missing = append(missing, m)
		}
	}
	return got, missing
}
