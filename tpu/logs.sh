#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Tails the jaxlm log of one worker or of all workers.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: tpu/logs.sh [options] [WORKER]

Tails ~/jaxlm-logs/RUN_NAME-worker*.log on worker WORKER (0, 1, ...) or, by
default, on all workers, each line prefixed with "[worker N]". Without RUN_NAME
it shows the newest log on each worker. Follows the log until Ctrl-C.
Needs TPU_NAME, ZONE, PROJECT.

Options:
  --lines=N          lines of history to show first (LOG_LINES; default: 100)
  --no-follow        print the last lines and exit
  --run-name=NAME    which run's log (RUN_NAME)

Example:
  tpu/logs.sh 0
EOF
}

FOLLOW=1
TPU_INTERSPERSED=1  # `tpu/logs.sh 0 --no-follow` reads naturally
tpu_script_opt() {
    case "$1" in
        --no-follow) FOLLOW=0; TPU_SHIFT=1 ;;
        --lines=*) LOG_LINES=${1#--lines=}; TPU_SHIFT=1 ;;
        --lines) [ $# -ge 2 ] || tpu_die "--lines needs a value" 2; LOG_LINES=$2; TPU_SHIFT=2 ;;
        --run-name=*) RUN_NAME=${1#--run-name=}; TPU_SHIFT=1 ;;
        --run-name) [ $# -ge 2 ] || tpu_die "--run-name needs a value" 2; RUN_NAME=$2; TPU_SHIFT=2 ;;
    esac
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tpu_parse_args "$@"
tpu_require TPU_NAME ZONE PROJECT
[ ${#TPU_ARGS[@]} -le 1 ] || tpu_die "unexpected argument: ${TPU_ARGS[1]} (see --help)" 2
worker=${TPU_ARGS[0]:-all}
case "$worker" in
    all | [0-9] | [0-9][0-9] | [0-9][0-9][0-9]) ;;
    *) tpu_die "WORKER must be a worker number or 'all', got '$worker'" 2 ;;
esac

vars=$(tpu_remote_vars run "$RUN_NAME" lines "$LOG_LINES" follow "$FOLLOW")
body=$(
    cat <<'EOF'
worker=${TPU_WORKER_ID:-$(hostname)}
if [ -n "$run" ]; then
    set -- jaxlm-logs/"$run"-worker*.log
else
    set -- jaxlm-logs/*-worker*.log
fi
log=$(ls -t "$@" 2>/dev/null | head -n 1)
if [ -z "$log" ]; then
    echo "worker $worker: no jaxlm log in ~/jaxlm-logs" >&2
    exit 1
fi
if [ "$follow" = 1 ]; then
    tail -n "$lines" -F "$log"
else
    tail -n "$lines" "$log"
fi | sed -u "s/^/[worker $worker] /"
EOF
)

tpu_ssh "$worker" "set -eu
cd
$vars
$body"
