package main

import (
	"encoding/json"
	"io"
	"os/exec"
	"path"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The import rule (README's Development section): imports flow one way,
// cmd -> executor -> provision -> {provision's rooms, guest, template}.
const module = "github.com/libvirt-gci/libvirt-gci"

// importRule forbids the packages matched by from (a path under the module, "..." for
// everything below it) to import, directly, the packages any of not matches.
type importRule struct {
	from string
	not  []string
	why  string
}

var importRules = []importRule{
	{"executor/...", []string{"github.com/digitalocean/go-libvirt/...", "libvirt.org/go/libvirtxml", "guest/...", "provision/libvirt/..."},
		"executor speaks GitLab's protocol; libvirt and the guest are provision's"},
	{"template/...", []string{"...ours", "github.com/digitalocean/go-libvirt/..."},
		"template is pure functions over domain XML"},
	{"guest/...", []string{"...ours"}, "guest is the transports alone"},
	{"provision/provisiontest", []string{"...ours"}, "the fake stands in for libvirt, not for our code"},
	{"provision/meta", []string{"...ours", "github.com/digitalocean/go-libvirt/...", "libvirt.org/go/libvirtxml"},
		"meta is the schema of our <metadata>, pure"},
	{"provision/*", []string{"provision", "guest/...", "executor/...", "cmd/..."},
		"provision's rooms import neither the façade nor the guest"},
	{"provision", []string{"executor/...", "cmd/..."}, "the lifecycle knows nothing of GitLab"},
	{"provision", []string{"github.com/digitalocean/go-libvirt/...", "libvirt.org/go/libvirtxml"},
		"the façade asks libvirt through provision/libvirt, and domain XML comes from template"},
	{"cmd/libvirt-gci/internal/...", []string{"...ours"}, "the test harness's rooms stand alone"},
	{"...", []string{"cmd/libvirt-gci"}, "nothing imports the command"},
}

// matches says whether the import path p matches pattern: a module path ("guest",
// "provision/*" for the packages below it, "x/..." for x and below), a full import
// path, or "...ours" for any package of this module.
func matches(pattern, p string) bool {
	if pattern == "...ours" {
		return p == module || strings.HasPrefix(p, module+"/")
	}
	if pattern == "..." {
		return true
	}
	if first, _, _ := strings.Cut(pattern, "/"); !strings.Contains(first, ".") { // under the module
		pattern = module + "/" + pattern
	}
	switch {
	case strings.HasSuffix(pattern, "/..."):
		base := strings.TrimSuffix(pattern, "/...")
		return p == base || strings.HasPrefix(p, base+"/")
	case strings.HasSuffix(pattern, "/*"):
		return strings.HasPrefix(p, strings.TrimSuffix(pattern, "*")) && p != strings.TrimSuffix(pattern, "/*")
	}
	return p == pattern
}

// importViolations lists, for packages and their direct imports, each import the rules
// forbid, as "FROM imports TO: WHY".
func importViolations(imports map[string][]string, rules []importRule) []string {
	var bad []string
	for from, tos := range imports {
		for _, r := range rules {
			if !matches(r.from, from) {
				continue
			}
			for _, to := range tos {
				for _, n := range r.not {
					if matches(n, to) && to != from {
						bad = append(bad, from+" imports "+to+": "+r.why)
					}
				}
			}
		}
	}
	return bad
}

func TestImportRule(t *testing.T) {
	cmd := exec.Command("go", "list", "-json", module+"/...")
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	imports := map[string][]string{}
	dec := json.NewDecoder(out)
	for {
		var p struct {
			ImportPath string
			Imports    []string
		}
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else {
			require.NoError(t, err)
		}
		imports[p.ImportPath] = p.Imports
	}
	require.NoError(t, cmd.Wait())
	for _, p := range []string{"executor", "provision", "guest", "template", "cmd/libvirt-gci"} {
		require.Contains(t, imports, path.Join(module, p), "go list found the module's packages")
	}
	assert.Empty(t, importViolations(imports, importRules))
}

// The rule catches what it is for (a rule that can never fail holds nothing).
func TestImportRuleCatches(t *testing.T) {
	m := func(p string) string { return path.Join(module, p) }
	for _, c := range []struct{ from, to string }{
		{m("executor"), "github.com/digitalocean/go-libvirt"},
		{m("executor"), "github.com/digitalocean/go-libvirt/socket"},
		{m("executor"), m("guest")},
		{m("template"), m("provision")},
		{m("guest"), m("provision")},
		{m("provision/warm"), m("guest")},
		{m("provision/warm"), m("provision")},
		{m("provision"), m("executor")},
		{m("provision/meta"), m("template")},
		{m("executor"), m("provision/libvirt")},
		{m("executor"), m("provision/libvirt/dial")},
		{m("provision/libvirt"), m("guest")},
		{m("provision/libvirt/dial"), m("provision")},
		{m("provision/meta"), "github.com/digitalocean/go-libvirt"},
		{m("provision"), "github.com/digitalocean/go-libvirt"},
		{m("provision"), "libvirt.org/go/libvirtxml"},
		{m("executor"), m("cmd/libvirt-gci")},
		{m("cmd/libvirt-gci/internal/fakegitlab"), m("executor")},
	} {
		assert.NotEmpty(t, importViolations(map[string][]string{c.from: {c.to}}, importRules), "%s -> %s", c.from, c.to)
	}
	for _, c := range []struct{ from, to string }{
		{m("executor"), m("provision")},
		{m("provision"), m("guest")},
		{m("provision"), m("provision/warm")},
		{m("provision/warm"), m("provision/meta")},
		{m("provision/warm"), "github.com/digitalocean/go-libvirt"},
		{m("provision/libvirt"), "github.com/digitalocean/go-libvirt"},
		{m("provision/libvirt"), "libvirt.org/go/libvirtxml"},
		{m("guest"), "github.com/digitalocean/go-libvirt"},
		{m("cmd/libvirt-gci"), m("executor")},
	} {
		assert.Empty(t, importViolations(map[string][]string{c.from: {c.to}}, importRules), "%s -> %s", c.from, c.to)
	}
}
