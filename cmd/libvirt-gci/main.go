// Command libvirt-gci is a GitLab Runner custom executor that runs every job in a fresh,
// throwaway libvirt VM cloned from a template.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
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
	// JOB_RESPONSE_FILE is set by GitLab Runner, unprefixed: no job can set or change
	// it. Whose job it is, and so which instance a stage may touch, comes from that file
	// alone.
	cs := &commandSet{renv: renv, job: executor.JobFromEnv(os.LookupEnv), responseFile: os.Getenv("JOB_RESPONSE_FILE"), stdout: stdout, stderr: stderr}
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
		Before:               cs.setup,
	}
	// As --help has always listed them: the stages, the operator's, then cleanup's.
	jobs := cs.jobCommands()
	app.Commands = append(append(jobs[:3:3], cs.operatorCommands()...), cs.templateCommand())
	app.Commands = append(append(app.Commands, jobs[3:]...), docCommands(app, stdout)...)
	err := app.RunContext(ctx, args)
	if cause := context.Cause(ctx); err != nil && cause != nil && !strings.Contains(err.Error(), cause.Error()) {
		err = fmt.Errorf("%w (%v)", err, cause) // why a call in flight was interrupted
	}
	err = executor.Explain(err)
	if err != nil {
		var bf *executor.BuildFailure
		log := cs.log
		if log == nil {
			log = slog.New(newLineHandler(stderr, slog.LevelInfo))
		}
		if !errors.As(err, &bf) { // a failed script speaks for itself in the job log
			log.Error(err.Error())
		}
	}
	return executor.ExitCode(err, renv.Codes())
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
