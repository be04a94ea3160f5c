package main

import (
	"fmt"
	"io"
	"log/slog"
	"strconv"

	"github.com/urfave/cli/v2"

	"github.com/libvirt-gci/libvirt-gci/executor"
)

// commandSet is what the commands share: the runner's environment, the job's variables,
// and, once the settings are read (setup), the executor and its log.
type commandSet struct {
	renv           executor.RunnerEnv
	job            executor.Job
	responseFile   string // JOB_RESPONSE_FILE: "" by hand
	stdout, stderr io.Writer
	exec           *executor.Executor
	log            *slog.Logger
}

// machineFlag names the instance by hand.
var machineFlag = &cli.StringFlag{Name: "machine", Usage: "instance `NAME` (by hand; under GitLab Runner it is derived from the job)"}

// setup reads the operator's settings from the global flags (and their variables), and
// makes the log and the executor.
func (cs *commandSet) setup(c *cli.Context) error {
	var s executor.Settings
	for _, d := range executor.SettingList {
		v := c.String(d.Flag)
		if d.Bool {
			v = strconv.FormatBool(c.Bool(d.Flag))
		}
		if err := d.Set(&s, v); err != nil {
			return err
		}
	}
	level := slog.LevelInfo
	if s.Debug {
		level = slog.LevelDebug
	}
	if s.LogFormat == "json" {
		cs.log = slog.New(slog.NewJSONHandler(cs.stderr, &slog.HandlerOptions{Level: level}))
	} else {
		cs.log = slog.New(newLineHandler(cs.stderr, level))
	}
	if err := s.Validate(); err != nil {
		return err
	}
	cs.exec = &executor.Executor{Settings: s, Version: versionString(), Log: cs.log, Stdout: cs.stdout, Stderr: cs.stderr}
	return nil
}

// target is the instance a stage acts on: the job's, or --machine's by hand.
func (cs *commandSet) target(c *cli.Context) (executor.Target, error) {
	return cs.exec.TargetFor(c.String("machine"), cs.responseFile)
}

// jobCommands are GitLab Runner's stages (and cleanup's finisher); by hand too.
func (cs *commandSet) jobCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:  "config",
			Usage: "print the custom executor configuration (config_exec)",
			Flags: []cli.Flag{machineFlag},
			Action: func(c *cli.Context) error {
				t, err := cs.target(c)
				if err != nil {
					return err
				}
				return cs.exec.Config(t)
			},
		},
		{
			Name:  "prepare",
			Usage: "clone a template into a new instance and boot it (prepare_exec)",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "distro", Usage: "`TEMPLATE` to clone (else the job's DISTRO or image:, else the default)"},
				machineFlag,
			},
			Action: cs.prepare,
		},
		{
			Name:      "run",
			Usage:     "run a stage script in the instance (run_exec)",
			ArgsUsage: "SCRIPT [STAGE]",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "script", Usage: "script `FILE` (also accepted as the first argument)"},
				machineFlag,
			},
			Action: cs.run,
		},
		{
			Name:  "cleanup",
			Usage: "remove the instance and its volumes (cleanup_exec)",
			Flags: []cli.Flag{machineFlag},
			Action: func(c *cli.Context) error {
				t, err := cs.target(c)
				if err != nil {
					return err
				}
				if !t.ByHand {
					cs.exec.Detach = detacher(c)
				}
				return cs.exec.Cleanup(c.Context, t)
			},
		},
		{
			Name:      "finish",
			Usage:     "remove the instance a job's cleanup paused (started by cleanup)",
			ArgsUsage: "NAME PREPARE_ID",
			Hidden:    true,
			Action: func(c *cli.Context) error {
				if c.NArg() != 2 {
					return &executor.InputError{Msg: "finish wants NAME PREPARE_ID"}
				}
				return cs.exec.Finish(c.Context, c.Args().Get(0), c.Args().Get(1))
			},
		},
	}
}

func (cs *commandSet) prepare(c *cli.Context) error {
	e := cs.exec
	tmpl, err := executor.SelectTemplate(e.Settings, c.String("distro"), cs.job)
	if err != nil {
		return err
	}
	size, err := executor.JobSize(e.Settings, cs.job)
	if err != nil {
		return err
	}
	byHand := cs.responseFile == ""
	machine := c.String("machine")
	if machine == "" && byHand {
		machine = executor.ManualName(e.Settings.Prefix)
	}
	t, err := e.TargetFor(machine, cs.responseFile)
	if err != nil {
		return err
	}
	if err := e.Prepare(c.Context, t, tmpl, size); err != nil {
		return err
	}
	if byHand {
		fmt.Fprintln(cs.stdout, t.Name) // say which machine to use
	}
	return nil
}

func (cs *commandSet) run(c *cli.Context) error {
	args := c.Args().Slice()
	script := c.String("script")
	if script == "" && len(args) > 0 {
		script, args = args[0], args[1:]
	}
	if script == "" || len(args) > 1 {
		return &executor.InputError{Msg: "usage: libvirt-gci run [--machine NAME] SCRIPT [STAGE]"}
	}
	stage := "build_script"
	if len(args) == 1 {
		stage = args[0]
	}
	t, err := cs.target(c)
	if err != nil {
		return err
	}
	return cs.exec.Run(c.Context, t, script, stage, cs.renv.BuildExitCodeFile)
}

// operatorCommands are the operator's: list, doctor, metrics and gc.
func (cs *commandSet) operatorCommands() []*cli.Command {
	return []*cli.Command{
		{
			Name:   "list",
			Usage:  "list the managed instances (found by libvirt-gci's metadata, whatever their names)",
			Flags:  []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
			Action: func(c *cli.Context) error { return cs.exec.List(c.Context, c.Bool("json")) },
		},
		{
			Name:  "doctor",
			Usage: "check this host for jobs with the runner's settings, one line per check, each problem with its fix; exit 2 if any",
			Flags: []cli.Flag{
				&cli.BoolFlag{Name: "boot", Usage: "boot a throwaway clone of each template offered, and say how long it took"},
				&cli.BoolFlag{Name: "json", Usage: "print JSON: a list of {check, status (ok, note, problem), detail, fix}"},
			},
			Action: func(c *cli.Context) error { return cs.exec.Doctor(c.Context, c.Bool("boot"), c.Bool("json")) },
		},
		{
			Name:   "metrics",
			Usage:  "write Prometheus metrics: instances, warm images, capacity, the pool (for node_exporter's textfile collector)",
			Flags:  []cli.Flag{&cli.StringFlag{Name: "output", Usage: "write to `FILE` (whole, then renamed into place; name it *.prom) instead of stdout"}},
			Action: func(c *cli.Context) error { return cs.exec.Metrics(c.Context, c.String("output")) },
		},
		{
			Name:  "gc",
			Usage: "remove orphaned instances: their runner is gone, the host rebooted, or they are too old",
			Flags: []cli.Flag{
				&cli.BoolFlag{Name: "dry-run", Usage: "say what would be removed, and why"},
				&cli.DurationFlag{Name: "older-than", Usage: "also remove instances older than `D`, whoever owns them"},
			},
			Action: cs.gc,
		},
	}
}

func (cs *commandSet) gc(c *cli.Context) error {
	sw, caches, err := cs.exec.GC(c.Context, c.Bool("dry-run"), c.Duration("older-than"))
	verb := "removed"
	if c.Bool("dry-run") {
		verb = "to remove"
	}
	given := ""
	if sw.Addresses > 0 {
		given = fmt.Sprintf(", %d addresses of gone instances given back", sw.Addresses)
	}
	if sw.Warm > 0 {
		given += fmt.Sprintf(", %d warm images removed (of gone templates, or unfinished)", sw.Warm)
	}
	if n := len(caches.Removed); n > 0 || caches.InUse > 0 {
		given += fmt.Sprintf(", %d cache shares %s (%d in use left)", n, verb, caches.InUse)
	}
	cs.log.Info(fmt.Sprintf("gc: %d %s, %d kept%s", sw.Removed, verb, sw.Kept, given), "removed", sw.Removed, "kept", sw.Kept, "addresses", sw.Addresses)
	return err
}

// templateCommand is `template`: the operator's templates.
func (cs *commandSet) templateCommand() *cli.Command {
	oneName := func(usage string, do func(c *cli.Context, name string) error) cli.ActionFunc {
		return func(c *cli.Context) error {
			if c.NArg() != 1 {
				return &executor.InputError{Msg: "usage: libvirt-gci template " + usage}
			}
			return do(c, c.Args().First())
		}
	}
	return &cli.Command{
		Name:  "template",
		Usage: "mark the domains jobs may clone (by hand, as the operator)",
		Subcommands: []*cli.Command{
			{
				Name:      "mark",
				Usage:     "let jobs clone the shut-off domain NAME",
				ArgsUsage: "NAME...",
				Action:    func(c *cli.Context) error { return cs.exec.MarkTemplates(c.Context, c.Args().Slice(), true) },
			},
			{
				Name:      "unmark",
				Usage:     "stop jobs from cloning NAME (unless LIBVIRT_GCI_TEMPLATES matches it)",
				ArgsUsage: "NAME...",
				Action:    func(c *cli.Context) error { return cs.exec.MarkTemplates(c.Context, c.Args().Slice(), false) },
			},
			{
				Name:      "make",
				Usage:     "turn NAME, a VM prepared by hand, into a template: reset its machine identity, shut it down, mark it",
				ArgsUsage: "NAME",
				Action: oneName("make NAME", func(c *cli.Context, name string) error {
					return cs.exec.MakeTemplate(c.Context, name)
				}),
			},
			{
				Name:      "check",
				Usage:     "say, check by check, whether NAME is usable as a template; --boot boots a throwaway clone too",
				ArgsUsage: "NAME",
				Flags:     []cli.Flag{&cli.BoolFlag{Name: "boot", Usage: "boot a throwaway clone to a ready guest and say how long it took"}},
				Action: oneName("check [--boot] NAME", func(c *cli.Context, name string) error {
					return cs.exec.CheckTemplate(c.Context, name, c.Bool("boot"))
				}),
			},
			{
				Name:      "warm",
				Usage:     "make the warm image prepare restores NAME's instances from (LIBVIRT_GCI_START=restore), unless it is up to date",
				ArgsUsage: "NAME",
				Action: oneName("warm NAME", func(c *cli.Context, name string) error {
					return cs.exec.WarmTemplate(c.Context, name)
				}),
			},
			{
				Name:   "list",
				Usage:  "list the domains that could be templates, and which ones jobs may clone",
				Action: func(c *cli.Context) error { return cs.exec.ListTemplates(c.Context) },
			},
		},
	}
}
