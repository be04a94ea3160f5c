package provisiontest

import (
	"bytes"
	"cmp"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/digitalocean/go-libvirt"
	"golang.org/x/crypto/ssh"
	"libvirt.org/go/libvirtxml"
)

// guest is a running domain's guest, as its agent shows it: files and processes.
type guest struct {
	files   map[string]*bytes.Buffer
	dirs    map[string]bool
	handles map[int]*handle
	procs   map[int]*Job
	next    int
}

// handle is an open file: the file itself, which outlives its name being removed, as in
// Linux.
type handle struct {
	file *bytes.Buffer
	pos  int
}

func newGuest() *guest {
	return &guest{files: map[string]*bytes.Buffer{}, dirs: map[string]bool{"/run": true, "/tmp": true},
		handles: map[int]*handle{}, procs: map[int]*Job{}, next: 1000}
}

// Job is a job script running in the fake guest (sh -c WRAPPER gci SCRIPT OUT ERR).
type Job struct {
	Domain, Script string
	f              *Libvirt
	g              *guest
	out, err       string // its output files
	done, killed   chan struct{}
	code, signal   int
	outData        string // what a captured command printed
	errData        string
}

// Stdout appends s to the job's standard output, where the host reads it.
func (j *Job) Stdout(s string) { j.write(j.out, s) }

// Stderr appends s to the job's standard error.
func (j *Job) Stderr(s string) { j.write(j.err, s) }

func (j *Job) write(path, s string) {
	j.f.mu.Lock()
	defer j.f.mu.Unlock()
	if j.g.files[path] == nil {
		j.g.files[path] = &bytes.Buffer{}
	}
	j.g.files[path].WriteString(s)
}

// Killed is closed once the host has sent the job a signal.
func (j *Job) Killed() <-chan struct{} { return j.killed }

// JobFunc is what a job script does in the fake guest, for as long as it runs: it writes
// output through j and returns the exit code, or the signal that ended it.
type JobFunc func(j *Job) (code, signal int)

// ScriptFunc is a job script that runs at once: its output and exit code.
type ScriptFunc func(domain, script string) (stdout, stderr string, code int)

// SetScript decides what job scripts do from now on (by default: nothing, exit 0).
func (f *Libvirt) SetScript(fn ScriptFunc) {
	f.SetJob(func(j *Job) (int, int) {
		stdout, stderr, code := fn(j.Domain, j.Script)
		j.Stdout(stdout)
		j.Stderr(stderr)
		return code, 0
	})
}

// SetJob decides what job scripts do from now on; each runs in a goroutine of its own.
func (f *Libvirt) SetJob(fn JobFunc) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.job = fn
}

// Pause and Resume the domain name: libvirt refuses agent commands to a paused domain.
func (f *Libvirt) Pause(name string)  { f.setPaused(name, true) }
func (f *Libvirt) Resume(name string) { f.setPaused(name, false) }

func (f *Libvirt) setPaused(name string, p bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d := f.domains[name]; d != nil {
		d.paused, d.ioError = p, false
	}
}

// FillPool pauses the domain name as QEMU does when a write to its disks cannot be
// stored (error_policy 'enospace', the file system under its pool full).
func (f *Libvirt) FillPool(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d := f.domains[name]; d != nil {
		d.paused, d.ioError = true, true
	}
}

// AgentCommands counts the guest agent commands named execute sent so far, failed ones too.
func (f *Libvirt) AgentCommands(execute string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, c := range f.agentLog {
		if c == execute {
			n++
		}
	}
	return n
}

// GuestState is what is left in a domain's guest: files, directories, open file handles
// and processes not yet reaped.
type GuestState struct {
	Files, Dirs    []string
	Handles, Procs int
}

// Guest shows the guest of the running domain name.
func (f *Libvirt) Guest(name string) GuestState {
	f.mu.Lock()
	defer f.mu.Unlock()
	var st GuestState
	d := f.domains[name]
	if d == nil || d.guest == nil {
		return st
	}
	for p := range d.guest.files {
		st.Files = append(st.Files, p)
	}
	for p := range d.guest.dirs {
		st.Dirs = append(st.Dirs, p)
	}
	slices.Sort(st.Files)
	slices.Sort(st.Dirs)
	st.Handles, st.Procs = len(d.guest.handles), len(d.guest.procs)
	return st
}

// GuestFile is what the file path holds in the guest of the running domain name.
func (f *Libvirt) GuestFile(name, path string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d := f.domains[name]; d != nil && d.guest != nil && d.guest.files[path] != nil {
		return d.guest.files[path].String()
	}
	return ""
}

// Boot defines and starts a domain with nothing but its name, for tests of the guest
// alone.
func (f *Libvirt) Boot(name string) error {
	d, err := f.define("<domain type='qemu'><name>"+name+"</name></domain>", 0)
	if err != nil {
		return err
	}
	return f.start(d)
}

func agentErr(msg string) error {
	return libvirt.Error{Code: uint32(libvirt.ErrInternalError), Message: "internal error: unable to execute QEMU agent command: " + msg}
}

// QEMUDomainAgentCommand answers the guest agent's JSON protocol, as qemu-ga does, for a
// running domain: ping, exec and exec-status, and file open/read/write/close. A job
// script runs the JobFunc; kill signals it, rm removes files.
func (f *Libvirt) QEMUDomainAgentCommand(d libvirt.Domain, cmd string, _ int32, _ uint32) (libvirt.OptString, error) {
	var req agentRequest
	if err := json.Unmarshal([]byte(cmd), &req); err != nil {
		return nil, lverr(libvirt.ErrInvalidArg, "bad agent command: %v", err)
	}
	f.mu.Lock()
	f.agentLog = append(f.agentLog, req.Execute)
	f.mu.Unlock()
	if err := f.enter("QEMUDomainAgentCommand"); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	fd, err := f.dom(d)
	if err != nil {
		return nil, err
	}
	if !fd.running || fd.paused {
		return nil, lverr(libvirt.ErrOperationInvalid, "Requested operation is not valid: domain is not running")
	}
	if fd.guest == nil {
		fd.guest = newGuest()
	}
	g := fd.guest
	return f.agentCommand(d, fd, g, req)
}

// agentRequest is a guest agent command, as qemu-ga reads it.
type agentRequest struct {
	Execute   string    `json:"execute"`
	Arguments agentArgs `json:"arguments"`
}

// agentArgs are a guest agent command's arguments.
type agentArgs struct {
	Path   string   `json:"path"`
	Mode   string   `json:"mode"`
	Arg    []string `json:"arg"`
	Handle int      `json:"handle"`
	Count  int      `json:"count"`
	Buf    string   `json:"buf-b64"`
	PID    int      `json:"pid"`
	Input  string   `json:"input-data"`
}

// ret is an agent command's answer v.
func ret(v any) (libvirt.OptString, error) {
	b, _ := json.Marshal(map[string]any{"return": v})
	return libvirt.OptString{string(b)}, nil
}

// agentCommand carries out req in the guest g of the running domain fd, under f.mu.
func (f *Libvirt) agentCommand(d libvirt.Domain, fd *domain, g *guest, req agentRequest) (libvirt.OptString, error) {
	a := req.Arguments
	dir := func(p string) string { return p[:max(strings.LastIndex(p, "/"), 0)] }
	switch req.Execute {
	case "guest-ping":
		return ret(map[string]any{})
	case "guest-network-get-interfaces":
		return ret(f.interfaces(fd.xml))
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
		g.handles[g.next] = &handle{file: g.files[a.Path]}
		return ret(g.next)
	case "guest-file-write":
		h := g.handles[a.Handle]
		if h == nil {
			return nil, agentErr("invalid handle")
		}
		b, _ := base64.StdEncoding.DecodeString(a.Buf)
		h.file.Write(b)
		return ret(map[string]any{"count": len(b), "eof": false})
	case "guest-file-read":
		h := g.handles[a.Handle]
		if h == nil {
			return nil, agentErr("invalid handle")
		}
		data := h.file.Bytes()[h.pos:]
		n := min(len(data), a.Count)
		h.pos += n
		return ret(map[string]any{"count": n, "buf-b64": base64.StdEncoding.EncodeToString(data[:n]), "eof": n < a.Count})
	case "guest-exec":
		return f.exec(d, fd, g, req)
	case "guest-exec-status":
		return execStatus(g, a.PID)
	}
	return nil, agentErr("unknown command " + req.Execute)
}

// exec starts a program in g: a job's script (the JobFunc, in the background) or one
// of the programs of prepare, run and cleanup, whose output it makes at once.
func (f *Libvirt) exec(d libvirt.Domain, fd *domain, g *guest, req agentRequest) (libvirt.OptString, error) {
	a := req.Arguments
	g.next++
	pid := g.next
	p := &Job{Domain: d.Name, f: f, g: g, done: make(chan struct{}), killed: make(chan struct{})}
	g.procs[pid] = p
	switch {
	case a.Path == "bash" && len(a.Arg) == 4 && strings.Contains(a.Arg[1], `read -r -d '' __gci_script`): // a job script (runWrapper)
		f.startJob(g, p, a)
		return ret(map[string]any{"pid": pid})
	case a.Path == "/bin/sh" && len(a.Arg) == 4 && strings.Contains(a.Arg[1], "is-system-running"): // the wait for systemd's boot
		p.outData = "none\n"
		if f.system != "" {
			p.outData = f.system + "\n"
			for _, u := range strings.Split(f.failed, "\n") {
				if u != "" {
					p.outData += "failed " + u + "\n"
				}
			}
		}
	case a.Path == "/bin/sh" && len(a.Arg) == 19 && strings.Contains(a.Arg[1], "/sys/block"): // prepare's guest set-up
		in, _ := base64.StdEncoding.DecodeString(a.Input)
		p.code, p.outData = setUp(fd, g, a.Arg, in, f.noReseed)
	case a.Path == "/bin/sh" && len(a.Arg) == 2 && strings.Contains(a.Arg[1], "drop_caches"): // quiesce, before a save
		p.outData = "gci-rng: can reseed\n"
		if f.noReseed {
			p.outData = "gci-rng: cannot reseed\n"
		}
		p.outData += "gci-system: " + cmp.Or(f.system, "none") + "\n"
	case a.Path == "/bin/sh" && len(a.Arg) == 3 && strings.Contains(a.Arg[1], "mkdir"):
		g.dirs[a.Arg[2]] = true
	case a.Path == "/bin/sh" && len(a.Arg) == 5 && strings.Contains(a.Arg[1], "kill -"): // the script's group, by the wrapper's pid
		var target int
		fmt.Sscan(a.Arg[2], &target)
		if tp := g.procs[target]; tp != nil {
			select {
			case <-tp.killed:
			default:
				close(tp.killed)
			}
		}
	case a.Path == "/bin/rm":
		for _, p := range a.Arg {
			if !strings.HasPrefix(p, "-") {
				delete(g.files, p)
			}
		}
	default:
		delete(g.procs, pid)
		return nil, agentErr("unexpected exec " + a.Path)
	}
	close(p.done)
	return ret(map[string]any{"pid": pid})
}

// startJob starts the job script the stage wrapper's exec a runs (runWrapper) as p, in
// the background: the test's JobFunc runs it.
func (f *Libvirt) startJob(g *guest, p *Job, a agentArgs) {
	script, src := a.Arg[2], a.Arg[3]
	base := strings.TrimSuffix(script, ".sh")
	p.out, p.err = base+".out", base+".err"
	if src == "-" {
		b, _ := base64.StdEncoding.DecodeString(a.Input)
		p.Script = string(b)
	} else if b := g.files[src]; b != nil {
		p.Script = b.String()
		g.files[src] = &bytes.Buffer{} // emptied once read
	}
	g.dirs[script[:max(strings.LastIndex(script, "/"), 0)]] = true
	g.files[p.out], g.files[p.err] = &bytes.Buffer{}, &bytes.Buffer{}
	run := f.job
	go func() {
		if run != nil {
			p.code, p.signal = run(p)
		}
		f.mu.Lock()
		// The wrapper hands small output back and empties the files; else the host
		// reads the rest of them and removes them.
		out, errOut := g.files[p.out].String(), g.files[p.err].String()
		if p.signal == 0 && inline(out) && inline(errOut) {
			p.outData, p.errData = "gci-inline\n"+out, errOut
			g.files[p.out], g.files[p.err] = &bytes.Buffer{}, &bytes.Buffer{}
		}
		f.mu.Unlock()
		close(p.done)
	}()
}

// inline tells whether the stage wrapper hands the output s back (runWrapper).
func inline(s string) bool { return len(s) < 16<<10 && !strings.Contains(s, "\x00") }

// execStatus answers guest-exec-status for the process pid of g.
func execStatus(g *guest, pid int) (libvirt.OptString, error) {
	p, ok := g.procs[pid]
	if !ok {
		return nil, agentErr(fmt.Sprintf("Invalid parameter 'pid' %d", pid))
	}
	select {
	case <-p.done:
		delete(g.procs, pid)
		if p.signal != 0 {
			return ret(map[string]any{"exited": true, "signal": p.signal})
		}
		return ret(map[string]any{"exited": true, "exitcode": p.code, "out-data": base64.StdEncoding.EncodeToString([]byte(p.outData)),
			"err-data": base64.StdEncoding.EncodeToString([]byte(p.errData))})
	default:
		return ret(map[string]any{"exited": false})
	}
}

// SetSystem makes the guests' init systemd, whose boot ends in state (running,
// degraded, starting, ...) with the failed units; "" for no systemd (the default).
func (f *Libvirt) SetSystem(state string, failed ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.system, f.failed = state, strings.Join(failed, "\n")
}

// SetNoAddress has the guests' NICs with the MAC address mac get no address (by
// default every NIC of a domain's has one).
func (f *Libvirt) SetNoAddress(mac string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.noAddress == nil {
		f.noAddress = map[string]bool{}
	}
	f.noAddress[strings.ToLower(mac)] = true
}

// interfaces is guest-network-get-interfaces' answer for the domain XML x: each of its
// NICs, named ethN, with an address unless SetNoAddress says otherwise.
func (f *Libvirt) interfaces(x string) []map[string]any {
	var dom libvirtxml.Domain
	out := []map[string]any{{"name": "lo", "hardware-address": "00:00:00:00:00:00",
		"ip-addresses": []map[string]any{{"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}}}}
	if dom.Unmarshal(x) != nil || dom.Devices == nil {
		return out
	}
	for i, iface := range dom.Devices.Interfaces {
		if iface.MAC == nil {
			continue
		}
		mac := strings.ToLower(iface.MAC.Address)
		ips := []map[string]any{{"ip-address-type": "ipv6", "ip-address": "fe80::5054:ff:fe00:1", "prefix": 64}}
		if !f.noAddress[mac] {
			addr := fmt.Sprintf("192.0.2.%d", 10+i)
			if r := f.reserved(mac); r != "" {
				addr = r // what the network's dnsmasq hands it
			}
			ips = append(ips, map[string]any{"ip-address-type": "ipv4", "ip-address": addr, "prefix": 24})
		}
		out = append(out, map[string]any{"name": fmt.Sprintf("eth%d", i), "hardware-address": mac, "ip-addresses": ips})
	}
	return out
}

// hasSerial tells whether the domain XML has a disk with the serial.
func hasSerial(domainXML, serial string) bool {
	var dom libvirtxml.Domain
	if dom.Unmarshal(domainXML) != nil || dom.Devices == nil {
		return false
	}
	for _, d := range dom.Devices.Disks {
		if d.Serial == serial {
			return true
		}
	}
	return false
}

// setUp is prepare's guest set-up (setup.sh, with its arguments arg and standard input
// in): it mounts the cache share and the helper's disk where the domain has them, finds
// the ssh NIC, and installs the host key it is given (its public line an argument, the
// private key on in, which must be that key's). It returns the exit code and output.
func setUp(fd *domain, g *guest, arg []string, in []byte, noReseed bool) (int, string) {
	mac, serial, dir, name, tag, mnt := arg[3], arg[5], arg[6], arg[7], arg[10], arg[11]
	rng := ""
	if arg[13] != "" { // a restored clone's identity: its RNG first
		if noReseed {
			return 3, "gci-rng: cannot reseed\n"
		}
		rng = "gci-rng: reseeded\n"
	}
	if tag != "" {
		if !strings.Contains(fd.xml, "<target dir=\""+tag+"\"") {
			return 32, "mount: " + mnt + ": wrong fs type, bad option, bad superblock on " + tag + "\n"
		}
		g.dirs[mnt] = true
	}
	if mac != "" && !strings.Contains(fd.xml, "mac="+mac) {
		return 4, "no network interface with the MAC address " + mac + " in the guest\n"
	}
	if serial != "" {
		if !hasSerial(fd.xml, serial) {
			return 4, "no disk with the serial " + serial + " in the guest\n"
		}
		g.dirs[dir] = true
		g.files[dir+"/"+name] = &bytes.Buffer{}
	}
	if arg[18] != "" {
		pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(arg[18]))
		if err != nil {
			return 3, "bad host key line " + arg[18] + "\n"
		}
		priv, err := ssh.ParsePrivateKey(in)
		if err != nil || !bytes.Equal(priv.PublicKey().Marshal(), pub.Marshal()) {
			return 3, "no host key on standard input\n"
		}
		g.files["/etc/ssh/ssh_host_ed25519_key"] = bytes.NewBuffer(in)
		return 0, rng + "gci-hostkey: installed\n"
	}
	return 0, rng
}
