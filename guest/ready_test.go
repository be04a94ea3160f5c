package guest

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The answer of the guest's wait for systemd, read.
func TestParseSystemState(t *testing.T) {
	t.Parallel()
	st, err := ParseSystemState("degraded\nfailed a.service\nfailed b.mount\n")
	require.NoError(t, err)
	assert.Equal(t, SystemState{Systemd: true, State: "degraded", Failed: []string{"a.service", "b.mount"}}, st)
	st, err = ParseSystemState("none\n")
	require.NoError(t, err)
	assert.False(t, st.Systemd)
	st, err = ParseSystemState("running\n")
	require.NoError(t, err)
	assert.Equal(t, "running", st.State)
	_, err = ParseSystemState("unknown\n")
	assert.ErrorIs(t, err, ErrNotReady)
	_, err = ParseSystemState("starting\n")
	assert.ErrorContains(t, err, "had not finished booting")
}

// A NIC has its address once it has one that is not link-local: IPv4, or global IPv6.
func TestMatchAddresses(t *testing.T) {
	t.Parallel()
	var ifs []agentInterface
	require.NoError(t, json.Unmarshal([]byte(`[
	 {"name":"lo","hardware-address":"00:00:00:00:00:00","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"127.0.0.1","prefix":8}]},
	 {"name":"ens2","hardware-address":"52:54:00:aa:00:01","ip-addresses":[{"ip-address-type":"ipv6","ip-address":"fe80::1","prefix":64}]},
	 {"name":"ens3","hardware-address":"52:54:00:aa:00:02","ip-addresses":[{"ip-address-type":"ipv6","ip-address":"fe80::2","prefix":64},
	   {"ip-address-type":"ipv4","ip-address":"10.1.2.3","prefix":24}]},
	 {"name":"ens4","hardware-address":"52:54:00:aa:00:03","ip-addresses":[{"ip-address-type":"ipv6","ip-address":"2001:db8::3","prefix":64}]}]`), &ifs))
	got, missing := matchAddresses(ifs, []string{"52:54:00:AA:00:01", "52:54:00:aa:00:02", "52:54:00:aa:00:03", "52:54:00:aa:00:09"})
	assert.Equal(t, []NICAddress{{MAC: "52:54:00:aa:00:02", Device: "ens3", Addr: "10.1.2.3/24"}, {MAC: "52:54:00:aa:00:03", Device: "ens4", Addr: "2001:db8::3/64"}}, got)
	assert.Equal(t, []string{"52:54:00:aa:00:01", "52:54:00:aa:00:09"}, missing, "link-local only, and absent, are missing")
}
