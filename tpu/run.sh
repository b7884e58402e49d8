#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Launches `python -m jaxlm train` on every worker, in the background, one log per host.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: tpu/run.sh [options] CONFIG WORKDIR [extra jaxlm flags...]

Starts, on all workers at once (--worker=all), under nohup:
  cd ~/REMOTE_DIR && ~/VENV_DIR/bin/python -m jaxlm train --config=CONFIG --workdir=WORKDIR [extra...]
and returns. jaxlm calls jax.distributed.initialize() itself, which on TPU VMs
needs no arguments. CONFIG is a path inside the repo on the workers. WORKDIR
should be a gs:// path every host can reach; a run started again with the same
WORKDIR resumes from its last checkpoint.
Each host logs to ~/jaxlm-logs/RUN_NAME-worker<TPU_WORKER_ID or hostname>.log
(see tpu/logs.sh). Refuses to start where a jaxlm run is already going.
Needs TPU_NAME, ZONE, PROJECT.

Options:
  --env=KEY=VALUE     environment for the run, e.g. --env=LIBTPU_INIT_ARGS='...' (repeatable)
  --run-name=NAME     log file prefix (RUN_NAME; default: last part of WORKDIR)

Example:
  tpu/run.sh configs/gpt2_small.py gs://my-bucket/runs/gpt2-small-1 --config.steps=2000
EOF
}

RUN_ENV=()
tpu_script_opt() {
    case "$1" in
        --env=*) RUN_ENV+=("${1#--env=}"); TPU_SHIFT=1 ;;
        --env) [ $# -ge 2 ] || tpu_die "--env needs KEY=VALUE" 2; RUN_ENV+=("$2"); TPU_SHIFT=2 ;;
        --run-name=*) RUN_NAME=${1#--run-name=}; TPU_SHIFT=1 ;;
        --run-name) [ $# -ge 2 ] || tpu_die "--run-name needs a value" 2; RUN_NAME=$2; TPU_SHIFT=2 ;;
    esac
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tpu_parse_args "$@"
tpu_require TPU_NAME ZONE PROJECT
if [ ${#TPU_ARGS[@]} -lt 2 ]; then
    tpu_die "CONFIG and WORKDIR are required (usage: tpu/run.sh [options] CONFIG WORKDIR [extra jaxlm flags...])" 2
fi
config=${TPU_ARGS[0]}
workdir=${TPU_ARGS[1]}
extra=("${TPU_ARGS[@]:2}")

for kv in ${RUN_ENV[@]+"${RUN_ENV[@]}"}; do
    case "$kv" in
        [A-Za-z_]*=*) ;;
        *) tpu_die "--env wants KEY=VALUE, got '$kv'" 2 ;;
    esac
done
case "$workdir" in
    gs://*) ;;
    *) tpu_note "warning: WORKDIR '$workdir' is not a gs:// path; on a multi-host slice every host must see the same WORKDIR" ;;
esac
if [ -z "$RUN_NAME" ]; then
    RUN_NAME=${workdir%/}
    RUN_NAME=${RUN_NAME##*/}
fi
# The name goes into a file name and a glob on the workers.
RUN_NAME=$(printf '%s' "$RUN_NAME" | tr -c 'A-Za-z0-9._-' '-')
RUN_NAME=${RUN_NAME:-run}

launcher=(env ${RUN_ENV[@]+"${RUN_ENV[@]}"})

# "train" is kept apart from "jaxlm" in the script text on purpose: the remote
# shell's own command line must not match the `pgrep -f '[j]axlm train'` check.
vars=$(tpu_remote_vars dir "$REMOTE_DIR" venv "$VENV_DIR" run "$RUN_NAME" mode train)
launcher_line="launcher=($(printf '%q ' "${launcher[@]}"))"
args_line="set -- $(printf '%q ' "--config=$config" "--workdir=$workdir" ${extra[@]+"${extra[@]}"})"
body=$(
    cat <<'EOF'
worker=${TPU_WORKER_ID:-$(hostname)}
if pgrep -f '[j]axlm train' >/dev/null; then
    echo "worker $worker: a jaxlm run is already running here; stop it first (tpu/stop.sh)" >&2
    exit 1
fi
if [ ! -x "$HOME/$venv/bin/python" ]; then
    echo "worker $worker: no venv at ~/$venv; run tpu/setup.sh first" >&2
    exit 1
fi
mkdir -p "$HOME/jaxlm-logs"
log="$HOME/jaxlm-logs/$run-worker$worker.log"
cd "$dir"
nohup "${launcher[@]}" "$HOME/$venv/bin/python" -m jaxlm "$mode" "$@" >"$log" 2>&1 </dev/null &
echo "worker $worker: started (pid $!), log ~/jaxlm-logs/$run-worker$worker.log"
EOF
)

tpu_ssh all "set -eu
cd
$vars
$launcher_line
$args_line
$body"
tpu_note "run '$RUN_NAME' started on $TPU_NAME; follow it with: tpu/logs.sh"
