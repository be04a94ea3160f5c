package provisiontest

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/digitalocean/go-libvirt"
)

// guest is a running domain's guest, as its agent shows it: files and processes.
type guest struct {
	files   map[string]*bytes.Buffer
	dirs    map[string]bool
	handles map[int]*handle
	exited  map[int]int // pid -> exit code
	next    int
}

type handle struct {
	path string
	pos  int
}

func newGuest() *guest {
	return &guest{files: map[string]*bytes.Buffer{}, dirs: map[string]bool{"/run": true, "/tmp": true},
		handles: map[int]*handle{}, exited: map[int]int{}, next: 1000}
}

// ScriptFunc is what a job script does in the fake guest: its output and exit code.
type ScriptFunc func(domain, script string) (stdout, stderr string, code int)

// SetScript decides what job scripts do from now on (by default: nothing, exit 0).
func (f *Libvirt) SetScript(fn ScriptFunc) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.script = fn
}

func agentErr(msg string) error {
	return libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "internal error: unable to execute QEMU agent command: " + msg}
}

// QEMUDomainAgentCommand answers the guest agent's JSON protocol, as qemu-ga does, for a
// running domain: ping, exec and exec-status, and file open/read/write/close. A job
// script (sh -c WRAPPER gci SCRIPT OUT ERR) runs the ScriptFunc at once.
func (f *Libvirt) QEMUDomainAgentCommand(d libvirt.Domain, cmd string, _ int32, _ uint32) (libvirt.OptString, error) {
	if err := f.enter("QEMUDomainAgentCommand"); err != nil {
		return nil, err
	}
	var req struct {
		Execute   string `json:"execute"`
		Arguments struct {
			Path   string   `json:"path"`
			Mode   string   `json:"mode"`
			Arg    []string `json:"arg"`
			Handle int      `json:"handle"`
			Count  int      `json:"count"`
			Buf    string   `json:"buf-b64"`
			PID    int      `json:"pid"`
		} `json:"arguments"`
	}
	if err := json.Unmarshal([]byte(cmd), &req); err != nil {
		return nil, lverr(libvirt.ErrInvalidArg, "bad agent command: %v", err)
	}
	a := req.Arguments
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return nil, err
	}
	if !fd.running {
		return nil, lverr(libvirt.ErrOperationInvalid, "Requested operation is not valid: domain is not running")
	}
	if fd.guest == nil {
		fd.guest = newGuest()
	}
	g := fd.guest
	ret := func(v any) (libvirt.OptString, error) {
		b, _ := json.Marshal(map[string]any{"return": v})
		return libvirt.OptString{string(b)}, nil
	}
	dir := func(p string) string { return p[:max(strings.LastIndex(p, "/"), 0)] }
	switch req.Execute {
	case "guest-ping":
		return ret(map[string]any{})
	case "guest-file-close":
		delete(g.handles, a.Handle)
		return ret(map[string]any{})
	case "guest-file-open":
		if !g.dirs[dir(a.Path)] {
			return nil, agentErr(fmt.Sprintf("failed to open file '%s' (mode: '%s'): No such file or directory", a.Path, a.Mode))
		}
		if g.files[a.Path] == nil || strings.HasPrefix(a.Mode, "w") {
			g.files[a.Path] = &bytes.Buffer{}
		}
		g.next++
		g.handles[g.next] = &handle{path: a.Path}
		return ret(g.next)
	case "guest-file-write":
		h := g.handles[a.Handle]
		if h == nil {
			return nil, agentErr("invalid handle")
		}
		b, _ := base64.StdEncoding.DecodeString(a.Buf)
		g.files[h.path].Write(b)
		return ret(map[string]any{"count": len(b), "eof": false})
	case "guest-file-read":
		h := g.handles[a.Handle]
		if h == nil || g.files[h.path] == nil {
			return nil, agentErr("invalid handle")
		}
		data := g.files[h.path].Bytes()[h.pos:]
		n := min(len(data), a.Count)
		h.pos += n
		return ret(map[string]any{"count": n, "buf-b64": base64.StdEncoding.EncodeToString(data[:n]), "eof": n < a.Count})
	case "guest-exec":
		g.next++
		pid := g.next
		code := 0
		switch {
		case a.Path == "/bin/sh" && len(a.Arg) == 6 && a.Arg[2] == "gci": // a job script and its two output files
			script, out, errf := a.Arg[3], a.Arg[4], a.Arg[5]
			body := ""
			if b := g.files[script]; b != nil {
				body = b.String()
			}
			stdout, stderr := "", ""
			if f.script != nil {
				stdout, stderr, code = f.script(d.Name, body)
			}
			for p, s := range map[string]string{out: stdout, errf: stderr} {
				if g.files[p] == nil {
					g.files[p] = &bytes.Buffer{}
				}
				g.files[p].WriteString(s)
			}
			delete(g.files, script)
		case a.Path == "/bin/sh" && len(a.Arg) == 3 && strings.Contains(a.Arg[1], "mkdir"):
			g.dirs[a.Arg[2]] = true
		case a.Path == "/bin/sh", a.Path == "/bin/rm": // kill, rm: nothing lingers here
		default:
			return nil, agentErr("unexpected exec " + a.Path)
		}
		g.exited[pid] = code
		return ret(map[string]any{"pid": pid})
	case "guest-exec-status":
		code, ok := g.exited[a.PID]
		if !ok {
			return nil, agentErr(fmt.Sprintf("Invalid parameter 'pid' %d", a.PID))
		}
		delete(g.exited, a.PID)
		return ret(map[string]any{"exited": true, "exitcode": code})
	}
	return nil, agentErr("unknown command " + req.Execute)
}
