package executor

import (
	"context"
	"encoding/json"
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/libvirt-gci/libvirt-gci/provision"
	"github.com/libvirt-gci/libvirt-gci/provision/meta"
)

// Listed is one instance as `list --json` prints it.
type Listed struct {
	Name      string     `json:"name"`
	State     string     `json:"state"`
	Template  string     `json:"template"`
	Owner     meta.Owner `json:"owner"`
	CreatedAt string     `json:"created_at"`
	AgeSec    int64      `json:"age_s"`
	CPUs      int        `json:"cpus"`
	MemoryMiB uint64     `json:"memory_mib"`
	Transport string     `json:"transport"`
	Volumes   int        `json:"volumes"`
	Host      string     `json:"host,omitempty"` // the libvirt URI it was placed by
}

// firstSeen tells, instance by instance, whether it is the first time it sees one: two
// URIs of LIBVIRT_GCI_URI may reach one libvirt, and its instances count once.
func firstSeen() func(provision.Instance) bool {
	seen := map[string]bool{}
	return func(in provision.Instance) bool {
		k := in.Name + "\x00" + in.Metadata.PrepareID
		first := !seen[k]
		seen[k] = true
		return first
	}
}

// List prints the managed instances: every domain with our metadata, whatever its name.
func (e *Executor) List(ctx context.Context, asJSON bool) error {
	var infos []provision.Instance
	first := firstSeen()
	err := e.hosts().Each(ctx, e.Log, false, func(h *provision.Host) error {
		in, err := h.List(ctx)
		for _, i := range in {
			if first(i) {
				infos = append(infos, i)
			}
		}
		return err
	})
	if err != nil {
		return err
	}
	list := []Listed{}
	for _, in := range infos {
		l := Listed{Name: in.Name, State: in.State, Template: in.Metadata.Template, Owner: in.Metadata.Owner,
			CreatedAt: in.Metadata.CreatedAt, CPUs: in.CPUs, MemoryMiB: in.MemoryKiB / 1024, Transport: in.Metadata.StageTransport(),
			Volumes: len(in.Metadata.Volumes), Host: in.Metadata.URI}
		if t, err := time.Parse(time.RFC3339, in.Metadata.CreatedAt); err == nil {
			l.AgeSec = int64(time.Since(t).Seconds())
		}
		list = append(list, l)
	}
	if asJSON {
		enc := json.NewEncoder(e.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(list)
	}
	w := tabwriter.NewWriter(e.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tSTATE\tAGE\tTEMPLATE\tOWNER\tCPUS\tMEMORY\tTRANSPORT")
	for _, l := range list {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%d\t%d MiB\t%s\n", l.Name, l.State, (time.Duration(l.AgeSec) * time.Second).String(),
			l.Template, ownerString(l.Owner), l.CPUs, l.MemoryMiB, l.Transport)
	}
	return w.Flush()
}
