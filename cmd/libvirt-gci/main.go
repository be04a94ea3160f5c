// Command libvirt-gci is a GitLab Runner custom executor that runs every job in a fresh,
// throwaway libvirt VM cloned from a template.
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"

	"github.com/kelseyhightower/envconfig"
	"github.com/urfave/cli/v2"

	"github.com/libvirt-gci/libvirt-gci/executor"
)

// version is set with -ldflags "-X main.version=..."; else the module version is used.
var version = ""

func main() {
	ctx, cancel := context.WithCancelCause(context.Background())
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		name := map[os.Signal]string{syscall.SIGINT: "SIGINT", syscall.SIGTERM: "SIGTERM"}[<-sigs]
		cancel(fmt.Errorf("cancelled by %s", name))
	}()
	code := run(ctx, os.Args, os.Stdout, os.Stderr)
	os.Exit(code)
}

// run is main without the exit: it returns GitLab's exit code for the stage.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var renv executor.RunnerEnv
	_ = envconfig.Process("", &renv) // string fields only: cannot fail
	codes := renv.Codes()

	job := executor.JobFromEnv(os.LookupEnv)
	// Set by GitLab Runner, unprefixed: no job can set or change it. Whose job it is, and
	// so which instance a stage may touch, comes from that file alone.
	responseFile := os.Getenv("JOB_RESPONSE_FILE")
	inJob := responseFile != ""

	var log *slog.Logger
	var exec *executor.Executor
	setup := func(c *cli.Context) error {
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
			log = slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level}))
		} else {
			log = slog.New(newLineHandler(stderr, level))
		}
		if err := s.Validate(); err != nil {
			return err
		}
		exec = &executor.Executor{Settings: s, Version: versionString(), Log: log, Stdout: stdout, Stderr: stderr}
		return nil
	}
	machineFlag := &cli.StringFlag{Name: "machine", Usage: "instance `NAME` (by hand; under GitLab Runner it is derived from the job)"}

	app := &cli.App{
		Name:  "libvirt-gci",
		Usage: "GitLab Runner custom executor: every job in a fresh, throwaway libvirt VM",
		Description: "GitLab Runner's config_exec, prepare_exec, run_exec and cleanup_exec call it (config, prepare, run SCRIPT STAGE, cleanup); " +
			"each job runs in a VM cloned from a template and removed when the job ends. " +
			"The global options are the operator's settings: each is also read from its environment variable " +
			"(--max-instances is LIBVIRT_GCI_MAX_INSTANCES, --uri is LIBVIRT_GCI_URI; --help names each), never from a job's variables. " +
			"The package keeps them in /etc/default/libvirt-gci, which gitlab-runner.service and libvirt-gci-gc.service read. " +
			"Check a host with libvirt-gci doctor; see README.rst for the whole story.",
		Version:   versionString(),
		Writer:    stderr,
		ErrWriter: stderr,
		// Errors are reported and mapped to exit codes below, in one place.
		ExitErrHandler: func(*cli.Context, error) {},
		Flags:          settingFlags(),
		// --generate-bash-completion lists commands and flags for the completion script.
		EnableBashCompletion: true,
		Before:               setup,
		Commands: []*cli.Command{
			{
				Name:  "config",
				Usage: "print the custom executor configuration (config_exec)",
				Flags: []cli.Flag{machineFlag},
				Action: func(c *cli.Context) error {
					t, err := exec.TargetFor(c.String("machine"), responseFile)
					if err != nil {
						return err
					}
					return exec.Config(t)
				},
			},
			{
				Name:  "prepare",
				Usage: "clone a template into a new instance and boot it (prepare_exec)",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "distro", Usage: "`TEMPLATE` to clone (else the job's DISTRO or image:, else the default)"},
					machineFlag,
				},
				Action: func(c *cli.Context) error {
					tmpl, err := executor.SelectTemplate(exec.Settings, c.String("distro"), job)
					if err != nil {
						return err
					}
					size, err := executor.JobSize(exec.Settings, job)
					if err != nil {
						return err
					}
					machine := c.String("machine")
					if machine == "" && !inJob {
						machine = exec.Settings.Prefix + "manual-" + strings.ToLower(rand.Text()[:8])
					}
					t, err := exec.TargetFor(machine, responseFile)
					if err != nil {
						return err
					}
					if err := exec.Prepare(c.Context, t, tmpl, size); err != nil {
						return err
					}
					if !inJob {
						fmt.Fprintln(stdout, t.Name) // by hand: say which machine to use
					}
					return nil
				},
			},
			{
				Name:      "run",
				Usage:     "run a stage script in the instance (run_exec)",
				ArgsUsage: "SCRIPT [STAGE]",
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "script", Usage: "script `FILE` (also accepted as the first argument)"},
					machineFlag,
				},
				Action: func(c *cli.Context) error {
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
					t, err := exec.TargetFor(c.String("machine"), responseFile)
					if err != nil {
						return err
					}
					return exec.Run(c.Context, t, script, stage, renv.BuildExitCodeFile)
				},
			},
			{
				Name:   "list",
				Usage:  "list the managed instances (found by libvirt-gci's metadata, whatever their names)",
				Flags:  []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
				Action: func(c *cli.Context) error { return exec.List(c.Context, c.Bool("json")) },
			},
			{
				Name:  "doctor",
				Usage: "check this host for jobs with the runner's settings, one line per check, each problem with its fix; exit 2 if any",
				Flags: []cli.Flag{
					&cli.BoolFlag{Name: "boot", Usage: "boot a throwaway clone of each template offered, and say how long it took"},
					&cli.BoolFlag{Name: "json", Usage: "print JSON: a list of {check, status (ok, note, problem), detail, fix}"},
				},
				Action: func(c *cli.Context) error { return exec.Doctor(c.Context, c.Bool("boot"), c.Bool("json")) },
			},
			{
				Name:   "metrics",
				Usage:  "write Prometheus metrics: instances, warm images, capacity, the pool (for node_exporter's textfile collector)",
				Flags:  []cli.Flag{&cli.StringFlag{Name: "output", Usage: "write to `FILE` (whole, then renamed into place; name it *.prom) instead of stdout"}},
				Action: func(c *cli.Context) error { return exec.Metrics(c.Context, c.String("output")) },
			},
			{
				Name:  "gc",
				Usage: "remove orphaned instances: their runner is gone, the host rebooted, or they are too old",
				Flags: []cli.Flag{
					&cli.BoolFlag{Name: "dry-run", Usage: "say what would be removed, and why"},
					&cli.DurationFlag{Name: "older-than", Usage: "also remove instances older than `D`, whoever owns them"},
				},
				Action: func(c *cli.Context) error {
					sw, caches, err := exec.GC(c.Context, c.Bool("dry-run"), c.Duration("older-than"))
					verb := "removed"
					if c.Bool("dry-run") {
						verb = "to remove"
					}
					given := ""
					if sw.Addresses > 0 {
						given = fmt.Sprintf(", %d addresses of gone instances given back", sw.Addresses)
					}
					if n := len(caches.Removed); n > 0 || caches.InUse > 0 {
						given += fmt.Sprintf(", %d cache shares %s (%d in use left)", n, verb, caches.InUse)
					}
					log.Info(fmt.Sprintf("gc: %d %s, %d kept%s", sw.Removed, verb, sw.Kept, given), "removed", sw.Removed, "kept", sw.Kept, "addresses", sw.Addresses)
					return err
				},
			},
			{
				Name:  "template",
				Usage: "mark the domains jobs may clone (by hand, as the operator)",
				Subcommands: []*cli.Command{
					{
						Name:      "mark",
						Usage:     "let jobs clone the shut-off domain NAME",
						ArgsUsage: "NAME...",
						Action:    func(c *cli.Context) error { return exec.MarkTemplates(c.Context, c.Args().Slice(), true) },
					},
					{
						Name:      "unmark",
						Usage:     "stop jobs from cloning NAME (unless LIBVIRT_GCI_TEMPLATES matches it)",
						ArgsUsage: "NAME...",
						Action:    func(c *cli.Context) error { return exec.MarkTemplates(c.Context, c.Args().Slice(), false) },
					},
					{
						Name:      "make",
						Usage:     "turn NAME, a VM prepared by hand, into a template: reset its machine identity, shut it down, mark it",
						ArgsUsage: "NAME",
						Action: func(c *cli.Context) error {
							if c.NArg() != 1 {
								return &executor.InputError{Msg: "usage: libvirt-gci template make NAME"}
							}
							return exec.MakeTemplate(c.Context, c.Args().First())
						},
					},
					{
						Name:      "check",
						Usage:     "say, check by check, whether NAME is usable as a template; --boot boots a throwaway clone too",
						ArgsUsage: "NAME",
						Flags:     []cli.Flag{&cli.BoolFlag{Name: "boot", Usage: "boot a throwaway clone to a ready guest and say how long it took"}},
						Action: func(c *cli.Context) error {
							if c.NArg() != 1 {
								return &executor.InputError{Msg: "usage: libvirt-gci template check [--boot] NAME"}
							}
							return exec.CheckTemplate(c.Context, c.Args().First(), c.Bool("boot"))
						},
					},
					{
						Name:      "warm",
						Usage:     "make the warm image prepare restores NAME's instances from (LIBVIRT_GCI_START=restore), unless it is up to date",
						ArgsUsage: "NAME",
						Action: func(c *cli.Context) error {
							if c.NArg() != 1 {
								return &executor.InputError{Msg: "usage: libvirt-gci template warm NAME"}
							}
							return exec.WarmTemplate(c.Context, c.Args().First())
						},
					},
					{
						Name:   "list",
						Usage:  "list the domains that could be templates, and which ones jobs may clone",
						Action: func(c *cli.Context) error { return exec.ListTemplates(c.Context) },
					},
				},
			},
			{
				Name:  "cleanup",
				Usage: "remove the instance and its volumes (cleanup_exec)",
				Flags: []cli.Flag{machineFlag},
				Action: func(c *cli.Context) error {
					t, err := exec.TargetFor(c.String("machine"), responseFile)
					if err != nil {
						return err
					}
					if !t.ByHand {
						exec.Detach = detacher(c)
					}
					return exec.Cleanup(c.Context, t)
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
					return exec.Finish(c.Context, c.Args().Get(0), c.Args().Get(1))
				},
			},
		},
	}

	app.Commands = append(app.Commands, docCommands(app, stdout)...)
	err := app.RunContext(ctx, args)
	if cause := context.Cause(ctx); err != nil && cause != nil && !strings.Contains(err.Error(), cause.Error()) {
		err = fmt.Errorf("%w (%v)", err, cause) // why a call in flight was interrupted
	}
	if err != nil {
		var bf *executor.BuildFailure
		if log == nil {
			log = slog.New(newLineHandler(stderr, slog.LevelInfo))
		}
		if !errors.As(err, &bf) { // a failed script speaks for itself in the job log
			log.Error(err.Error())
		}
	}
	return executor.ExitCode(err, codes)
}

// settingFlags are the global flags, one per operator setting.
func settingFlags() []cli.Flag {
	var flags []cli.Flag
	for _, d := range executor.SettingList {
		if d.Bool {
			flags = append(flags, &cli.BoolFlag{Name: d.Flag, EnvVars: []string{d.Env()}, Usage: d.Help})
			continue
		}
		flags = append(flags, &cli.StringFlag{Name: d.Flag, Value: d.DefaultValue(), EnvVars: []string{d.Env()}, Usage: d.Help})
	}
	return flags
}

func versionString() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}
