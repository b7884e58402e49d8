#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Stops the jaxlm run on every worker: SIGTERM, so jaxlm saves a checkpoint and exits.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: tpu/stop.sh [options]

Sends SIGTERM to `jaxlm train` on all workers (pkill -TERM -f), which makes
jaxlm save a checkpoint and exit, then waits up to STOP_TIMEOUT seconds
(default: 600) for the processes to end. Delete the TPU only after that, or
the checkpoint is lost.
Needs TPU_NAME, ZONE, PROJECT.

Options:
  --timeout=SECONDS   how long to wait for the exit (STOP_TIMEOUT); 0: don't wait
  --kill              send SIGKILL instead (no checkpoint), for a hung run
EOF
}

SIGNAL=TERM
tpu_script_opt() {
    case "$1" in
        --kill) SIGNAL=KILL; TPU_SHIFT=1 ;;
        --timeout=*) STOP_TIMEOUT=${1#--timeout=}; TPU_SHIFT=1 ;;
        --timeout) [ $# -ge 2 ] || tpu_die "--timeout needs a value" 2; STOP_TIMEOUT=$2; TPU_SHIFT=2 ;;
    esac
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tpu_parse_args "$@"
tpu_require TPU_NAME ZONE PROJECT
[ ${#TPU_ARGS[@]} -eq 0 ] || tpu_die "unexpected argument: ${TPU_ARGS[0]} (see --help)" 2

# The [j] keeps the pattern from matching this remote shell's own command line.
vars=$(tpu_remote_vars signal "$SIGNAL" timeout "$STOP_TIMEOUT")
body=$(
    cat <<'EOF'
worker=${TPU_WORKER_ID:-$(hostname)}
if ! pkill "-$signal" -f '[j]axlm train'; then
    echo "worker $worker: no jaxlm run"
    exit 0
fi
echo "worker $worker: sent SIG$signal"
[ "$timeout" -gt 0 ] || exit 0
waited=0
while pgrep -f '[j]axlm train' >/dev/null; do
    if [ "$waited" -ge "$timeout" ]; then
        echo "worker $worker: still running after ${timeout}s (tpu/stop.sh --kill ends it)" >&2
        exit 1
    fi
    sleep 5
    waited=$((waited + 5))
done
echo "worker $worker: stopped"
EOF
)

tpu_ssh all "set -eu
$vars
$body"
