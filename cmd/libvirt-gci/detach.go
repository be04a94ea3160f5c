package main

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/libvirt-gci/libvirt-gci/executor"
)

// finisherEnv is what a finisher inherits of this process's environment, besides the
// settings: what reaching libvirt may need (the user's home and configuration, a
// session libvirt's socket, an ssh agent for qemu+ssh). Nothing of the job's.
var finisherEnv = []string{"PATH", "HOME", "USER", "LOGNAME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "SSH_AUTH_SOCK"}

// detacher is Executor.Detach: it starts `libvirt-gci finish NAME PREPARE_ID` in a
// session of its own (the runner's signals to the stage's process group do not reach
// it), with no stdio (the runner waits for the stage's output pipes to close), and with
// this process's settings, whether they came from flags or variables, as variables
// (not on its command line, which every user of the host can read).
func detacher(c *cli.Context) func(name, prepareID string) error {
	return func(name, prepareID string) error {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find this program: %w", err)
		}
		var env []string
		for _, k := range finisherEnv {
			if v, ok := os.LookupEnv(k); ok {
				env = append(env, k+"="+v)
			}
		}
		for _, d := range executor.SettingList {
			v := c.String(d.Flag)
			if d.Bool {
				v = strconv.FormatBool(c.Bool(d.Flag))
			}
			env = append(env, d.Env()+"="+v)
		}
		cmd := exec.Command(exe, "finish", name, prepareID)
		cmd.Env = env
		cmd.Dir = "/"
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("start %s finish: %w", exe, err)
		}
		return cmd.Process.Release()
	}
}
