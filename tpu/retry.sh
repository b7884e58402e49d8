#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Keeps a run going on Spot / queued TPUs: recreates, sets up and relaunches after preemption.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: tpu/retry.sh [options] CONFIG WORKDIR [extra jaxlm flags...]

Watches the TPU every POLL_SECONDS (default: 60) with `describe`:
  READY / ACTIVE          checks `jaxlm train` on worker 0; launches it (setup.sh
                          then run.sh) if it is not running yet; exits 0 once a
                          run it launched or saw has ended (finished or failed)
  PREEMPTED, TERMINATED,  deletes the TPU (or queued resource), creates it again
  FAILED, SUSPENDED,      (create.sh), then sets up and relaunches; the run
  missing                 resumes from the last checkpoint in WORKDIR
  anything else           (CREATING, WAITING_FOR_RESOURCES, ...) waits
Each recreate or failed launch uses one of MAX_RETRIES (default: 10); it exits 1
when they are used up. Creates the TPU first if it does not exist yet.
Needs TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE and a source (REPO_URL, TARBALL
or ARCHIVE=1); takes the settings of create.sh, setup.sh and run.sh.

Options:
  --env=KEY=VALUE    passed to run.sh (repeatable)
  --run-name=NAME    passed to run.sh

Example:
  QUEUED=1 SPOT=1 tpu/retry.sh configs/llama_1b.py gs://my-bucket/runs/llama-1b-1
EOF
}

RUN_OPTS=()
tpu_script_opt() {
    case "$1" in
        --env=* | --run-name=*) RUN_OPTS+=("$1"); TPU_SHIFT=1 ;;
        --env | --run-name)
            [ $# -ge 2 ] || tpu_die "$1 needs a value" 2
            RUN_OPTS+=("$1=$2")
            TPU_SHIFT=2
            ;;
    esac
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tpu_parse_args "$@"
tpu_require TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION
tpu_require_source
if [ ${#TPU_ARGS[@]} -lt 2 ]; then
    tpu_die "CONFIG and WORKDIR are required (usage: tpu/retry.sh [options] CONFIG WORKDIR [extra jaxlm flags...])" 2
fi

retries=0
what="TPU $TPU_NAME"
if tpu_true "$QUEUED"; then
    what="queued resource $QR_NAME"
fi

spend_retry() {  # REASON; exits once MAX_RETRIES are used
    if [ "$retries" -ge "$MAX_RETRIES" ]; then
        tpu_die "giving up: $1, and all MAX_RETRIES=$MAX_RETRIES retries are used"
    fi
    retries=$((retries + 1))
    tpu_note "retry $retries/$MAX_RETRIES: $1"
}

# Prints running, stopped, or unknown (worker 0 unreachable).
run_status() {
    local out
    if out=$(TPU_QUIET=1 tpu_ssh 0 "if pgrep -f '[j]axlm train' >/dev/null; then echo jaxlm-status:running; else echo jaxlm-status:stopped; fi"); then
        case "$out" in
            *jaxlm-status:running*) echo running; return ;;
            *jaxlm-status:stopped*) echo stopped; return ;;
        esac
    fi
    echo unknown
}

launch() {
    "$TPU_DIR/setup.sh" &&
        "$TPU_DIR/run.sh" ${RUN_OPTS[@]+"${RUN_OPTS[@]}"} -- "${TPU_ARGS[@]}"
}

seen_run=0  # 1 once the run was launched, or seen running, on this TPU
first=1
while :; do
    state=$(tpu_state)
    case "$state" in
        READY | ACTIVE)
            case "$(run_status)" in
                running)
                    seen_run=1
                    ;;
                stopped)
                    if [ "$seen_run" -eq 1 ]; then
                        tpu_note "the run is no longer going on worker 0: it finished or failed (see tpu/logs.sh 0 --no-follow)"
                        exit 0
                    fi
                    if launch; then
                        seen_run=1
                    else
                        spend_retry "launching the run failed"
                    fi
                    ;;
                *)
                    tpu_note "could not reach worker 0 of $TPU_NAME; checking again in ${POLL_SECONDS}s"
                    ;;
            esac
            ;;
        PREEMPTED | TERMINATED | FAILED | SUSPENDED | MISSING)
            # Creating a TPU that never existed is the start, not a retry.
            if [ "$first" -eq 0 ] || [ "$state" != MISSING ]; then
                spend_retry "$what is $state"
            fi
            first=0
            seen_run=0
            if [ "$state" != MISSING ]; then
                "$TPU_DIR/delete.sh" || tpu_note "delete failed; creating anyway"
            fi
            if "$TPU_DIR/create.sh"; then
                continue  # launch right away, without waiting a poll
            fi
            tpu_note "create failed; checking again in ${POLL_SECONDS}s"
            ;;
        *)
            tpu_note "$what is $state; checking again in ${POLL_SECONDS}s"
            ;;
    esac
    first=0
    sleep "$POLL_SECONDS"
done
