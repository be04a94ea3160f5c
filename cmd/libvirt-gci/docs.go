package main

import (
	"fmt"
	"io"

	"github.com/urfave/cli/v2"

	"github.com/libvirt-gci/libvirt-gci/executor"
)

// The files `make install` and `make deb` put beside the binary, generated from the
// CLI itself so that they never disagree with it: the man page, the bash completion, and
// the documented settings file.

// bashCompletion completes libvirt-gci's commands and flags by asking the binary
// (urfave/cli's --generate-bash-completion), so it follows every version.
const bashCompletion = `# bash completion for libvirt-gci (generated: libvirt-gci completion bash)
_libvirt_gci() {
	local cur=${COMP_WORDS[COMP_CWORD]} words
	if [[ $cur == -* ]]; then
		words=$("${COMP_WORDS[0]}" "${COMP_WORDS[@]:1:COMP_CWORD-1}" "$cur" --generate-bash-completion 2>/dev/null)
	else
		words=$("${COMP_WORDS[0]}" "${COMP_WORDS[@]:1:COMP_CWORD-1}" --generate-bash-completion 2>/dev/null)
	fi
	COMPREPLY=($(compgen -W "$words" -- "$cur"))
}
complete -o default -F _libvirt_gci libvirt-gci
`

// docCommands are the hidden commands that print those files.
func docCommands(app *cli.App, stdout io.Writer) []*cli.Command {
	return []*cli.Command{
		{
			Name:   "man",
			Usage:  "print the man page (roff), made from this help",
			Hidden: true,
			Action: func(*cli.Context) error {
				page, err := app.ToManWithSection(1)
				if err != nil {
					return fmt.Errorf("man page: %w", err)
				}
				_, err = io.WriteString(stdout, page)
				return err
			},
		},
		{
			Name:      "completion",
			Usage:     "print the shell completion script (bash)",
			ArgsUsage: "bash",
			Hidden:    true,
			Action: func(c *cli.Context) error {
				if c.Args().First() != "bash" || c.NArg() != 1 {
					return &executor.InputError{Msg: "usage: libvirt-gci completion bash"}
				}
				_, err := io.WriteString(stdout, bashCompletion)
				return err
			},
		},
		{
			Name:   "environment-file",
			Usage:  "print the documented settings file (/etc/default/libvirt-gci)",
			Hidden: true,
			Action: func(*cli.Context) error {
				_, err := io.WriteString(stdout, executor.EnvironmentFile())
				return err
			},
		},
	}
}
