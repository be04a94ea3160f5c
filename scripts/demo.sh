#!/usr/bin/env bash
# Runs a sample CI job through libvirt-gci the way GitLab Runner would: config, prepare,
# run (three stages), cleanup, on the local libvirt and the template scripts/testenv.sh
# defines. Used by `make demo`.
#
# usage: scripts/demo.sh [BINARY]
set -euo pipefail
bin=$(realpath "${1:-bin/libvirt-gci}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

export LIBVIRT_GCI_URI=${LIBVIRT_GCI_URI:-qemu:///system}
export LIBVIRT_GCI_POOL=${LIBVIRT_GCI_POOL:-default}
export LIBVIRT_GCI_DEFAULT_TEMPLATE=${LIBVIRT_GCI_DEFAULT_TEMPLATE:-tiny-bookworm}
# What the operator does once per template: let jobs clone it.
"$bin" template mark "$LIBVIRT_GCI_DEFAULT_TEMPLATE"
# What the runner sets for every stage:
export BUILD_FAILURE_EXIT_CODE=1 SYSTEM_FAILURE_EXIT_CODE=2 TMPDIR=$work
export BUILD_EXIT_CODE_FILE=$work/exit-code JOB_RESPONSE_FILE=$work/job.json
job_id=$((RANDOM * 1000 + $$ % 1000))
# The job response GitLab Runner writes: whose job it is (the job's variables cannot say).
printf '{"id": %d, "job_info": {"project_id": 1, "project_full_path": "demo/hello"}, "runner_info": {"uuid": "demo"}}\n' "$job_id" >"$JOB_RESPONSE_FILE"
export CUSTOM_ENV_CI_JOB_ID=$job_id CUSTOM_ENV_CI_PROJECT_PATH=demo/hello CUSTOM_ENV_CI_CONCURRENT_ID=0

stage() { printf '\n\033[1m$ libvirt-gci %s\033[0m\n' "$*" >&2; "$bin" "$@"; }
script() { printf '#!/usr/bin/env bash\nset -eo pipefail\n%s\n' "$2" >"$work/$1"; echo "$work/$1"; }

stage config
stage prepare || { echo "demo: prepare failed" >&2; stage cleanup; exit 1; }
rc=0
stage run "$(script prepare.sh 'echo "Running on $(hostname), $(. /etc/os-release; echo "$PRETTY_NAME"), kernel $(uname -r)"')" prepare_script || rc=$?
((rc)) || stage run "$(script build.sh 'for i in 1 2 3; do echo "building step $i"; sleep 0.5; done; echo "free memory: $(awk "/MemAvailable/ {print \$2\" kB\"}" /proc/meminfo)"')" build_script || rc=$?
stage run "$(script after.sh 'echo "after_script runs even if the build fails"')" after_script || true
stage cleanup
echo >&2
if ((rc)); then echo "demo: the job failed (exit $rc)" >&2; exit "$rc"; fi
echo "demo: the sample job ran in a throwaway VM, which is gone again" >&2
