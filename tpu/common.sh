#!/usr/bin/env bash
# shellcheck shell=bash
# Shared settings and helpers for tpu/*.sh. Sourced by the other scripts, never run.
#
# Every setting is an environment variable; the matching command-line option
# (parsed by tpu_parse_args) overrides it. Kept to bash 3.2 features so the
# scripts also run from macOS laptops.

TPU_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TPU_SCRIPT="tpu/$(basename "$0")"

: "${GCLOUD:=gcloud}"
: "${TPU_NAME:=}" "${ZONE:=}" "${PROJECT:=}" "${ACCELERATOR_TYPE:=}" "${RUNTIME_VERSION:=}"
: "${SPOT:=}" "${RESERVED:=}" "${QUEUED:=}" "${QR_NAME:=}"
: "${REPO_URL:=}" "${REPO_REF:=main}" "${TARBALL:=}" "${ARCHIVE:=}"
: "${REPO_DIR:=$(dirname "$TPU_DIR")}"
: "${REMOTE_DIR:=jaxlm}" "${VENV_DIR:=jaxlm-venv}" "${PYTHON:=python3}" "${RUN_NAME:=}"
: "${POLL_SECONDS:=60}" "${MAX_RETRIES:=10}" "${STOP_TIMEOUT:=600}" "${LOG_LINES:=100}"

# Positional arguments left after the options.
TPU_ARGS=()

tpu_err() {
    printf '%s: error: %s\n' "$TPU_SCRIPT" "$*" >&2
}

tpu_die() {  # MESSAGE [EXIT_CODE]
    tpu_err "$1"
    exit "${2:-1}"
}

tpu_note() {
    printf '%s: %s\n' "$TPU_SCRIPT" "$*" >&2
}

tpu_true() {
    case "$1" in
        1 | true | True | TRUE | yes | Yes | YES | on | ON) return 0 ;;
        *) return 1 ;;
    esac
}

tpu_common_help() {
    cat <<'EOF'

Settings (environment variable or option; the option wins):
  TPU_NAME           --tpu-name=NAME          TPU VM (node) name
  ZONE               --zone=ZONE              zone, e.g. us-west4-a
  PROJECT            --project=PROJECT        Google Cloud project id
  ACCELERATOR_TYPE   --accelerator-type=TYPE  e.g. v5litepod-8, v5p-64, v4-32
  RUNTIME_VERSION    --runtime-version=VER    default from the generation:
                       v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5,
                       v5e (v5litepod): v2-alpha-tpuv5-lite, v4 and older: tpu-ubuntu2204-base
  SPOT=1             --spot                   Spot capacity (cheaper, can be preempted)
  RESERVED=1         --reserved               use the project's reservation
  QUEUED=1           --queued                 go through a queued resource
  QR_NAME            --qr-name=NAME           queued resource name (default: TPU_NAME-qr)
  REPO_URL           --repo-url=URL           git URL the workers clone ...
  REPO_REF           --repo-ref=REF           ... at this branch, tag or commit (default: main)
  TARBALL            --tarball=FILE           ... or copy this source tarball to the workers
  ARCHIVE=1          --archive                ... or copy `git archive HEAD` of this checkout
  REMOTE_DIR                                  source dir on the workers, under ~ (default: jaxlm)
  VENV_DIR                                    virtualenv on the workers, under ~ (default: jaxlm-venv)
  PYTHON                                      Python that makes the venv (default: python3;
                                              python3.11 from apt when it is older than 3.11)
  GCLOUD                                      gcloud command (default: gcloud)
EOF
}

# Maps a value option to the variable it sets; fails for anything else.
tpu_opt_var() {
    case "$1" in
        --tpu-name) echo TPU_NAME ;;
        --zone) echo ZONE ;;
        --project) echo PROJECT ;;
        --accelerator-type) echo ACCELERATOR_TYPE ;;
        --runtime-version) echo RUNTIME_VERSION ;;
        --qr-name) echo QR_NAME ;;
        --repo-url) echo REPO_URL ;;
        --repo-ref) echo REPO_REF ;;
        --tarball) echo TARBALL ;;
        *) return 1 ;;
    esac
}

# Parses the common options. Stops at the first positional argument (or "--"),
# so everything after it, e.g. extra jaxlm flags, passes through untouched;
# a script that sets TPU_INTERSPERSED=1 takes options after positionals too.
# A script may define tpu_script_opt to take its own options: it sets
# TPU_SHIFT to the number of arguments it consumed (0: not its option).
tpu_parse_args() {
    local name value var
    while [ $# -gt 0 ]; do
        case "$1" in
            -h | --help)
                usage
                tpu_common_help
                exit 0
                ;;
            --spot) SPOT=1; shift; continue ;;
            --reserved) RESERVED=1; shift; continue ;;
            --queued) QUEUED=1; shift; continue ;;
            --archive) ARCHIVE=1; shift; continue ;;
            --) shift; TPU_ARGS+=("$@"); break ;;
            -*) ;;
            *)
                if [ "${TPU_INTERSPERSED:-0}" = 1 ]; then
                    TPU_ARGS+=("$1")
                    shift
                    continue
                fi
                TPU_ARGS+=("$@")
                break
                ;;
        esac
        if declare -F tpu_script_opt >/dev/null; then
            TPU_SHIFT=0
            tpu_script_opt "$@"
            if [ "$TPU_SHIFT" -gt 0 ]; then
                shift "$TPU_SHIFT"
                continue
            fi
        fi
        case "$1" in
            --*=*) name=${1%%=*}; value=${1#*=} ;;
            *) name=$1; value=${2-} ;;
        esac
        if ! var=$(tpu_opt_var "$name"); then
            tpu_die "unknown option: $1 (see --help)" 2
        fi
        if [ "$name" = "$1" ]; then
            [ $# -ge 2 ] || tpu_die "$name needs a value" 2
            shift
        fi
        printf -v "$var" '%s' "$value"
        shift
    done
    tpu_finish_settings
}

tpu_default_runtime() {  # ACCELERATOR_TYPE -> runtime version, or nothing
    case "$1" in
        v6e-*) echo v2-alpha-tpuv6e ;;
        v5p-*) echo v2-alpha-tpuv5 ;;
        v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
        v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    esac
}

tpu_finish_settings() {
    if [ -z "$RUNTIME_VERSION" ] && [ -n "$ACCELERATOR_TYPE" ]; then
        RUNTIME_VERSION=$(tpu_default_runtime "$ACCELERATOR_TYPE")
    fi
    if [ -z "$QR_NAME" ] && [ -n "$TPU_NAME" ]; then
        QR_NAME="$TPU_NAME-qr"
    fi
    if tpu_true "$SPOT" && tpu_true "$RESERVED"; then
        tpu_die "SPOT and RESERVED are exclusive; set one of them" 2
    fi
    local n
    for n in POLL_SECONDS MAX_RETRIES STOP_TIMEOUT LOG_LINES; do
        case "${!n}" in
            '' | *[!0-9]*) tpu_die "$n must be a whole number, got '${!n}'" 2 ;;
        esac
    done
    # setup.sh replaces these directories, so keep them plain paths under ~.
    for n in REMOTE_DIR VENV_DIR; do
        case "${!n}" in
            '' | /* | *..* | . | ./*) tpu_die "$n must be a relative path under ~, got '${!n}'" 2 ;;
        esac
    done
    # Children (retry.sh runs the other scripts) see options given as flags too.
    export GCLOUD TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION SPOT RESERVED
    export QUEUED QR_NAME REPO_URL REPO_REF TARBALL ARCHIVE REPO_DIR REMOTE_DIR VENV_DIR PYTHON
    export RUN_NAME POLL_SECONDS MAX_RETRIES STOP_TIMEOUT LOG_LINES
}

# Fails with exit code 2 and one line per missing variable.
tpu_require() {
    local var flag missing=0
    for var in "$@"; do
        if [ -z "${!var}" ]; then
            # It defaults from ACCELERATOR_TYPE; when that is missing, one line says so.
            if [ "$var" = RUNTIME_VERSION ] && [ -z "$ACCELERATOR_TYPE" ]; then
                continue
            fi
            flag=$(printf '%s' "$var" | tr '[:upper:]_' '[:lower:]-')
            if [ "$var" = RUNTIME_VERSION ] && [ -n "$ACCELERATOR_TYPE" ]; then
                tpu_err "RUNTIME_VERSION is not set and has no default for ACCELERATOR_TYPE=$ACCELERATOR_TYPE (set RUNTIME_VERSION or pass --runtime-version)"
            else
                tpu_err "$var is not set (set $var or pass --$flag)"
            fi
            missing=1
        fi
    done
    [ "$missing" -eq 0 ] || exit 2
}

# The workers get the source one way: a git clone, a given tarball, or an archive.
tpu_require_source() {
    local n=0
    [ -z "$REPO_URL" ] || n=$((n + 1))
    [ -z "$TARBALL" ] || n=$((n + 1))
    ! tpu_true "$ARCHIVE" || n=$((n + 1))
    if [ "$n" -eq 0 ]; then
        tpu_err "REPO_URL is not set (set REPO_URL, or TARBALL=FILE, or ARCHIVE=1; or pass --repo-url, --tarball or --archive)"
        exit 2
    fi
    if [ "$n" -gt 1 ]; then
        tpu_die "set only one of REPO_URL, TARBALL and ARCHIVE" 2
    fi
    if [ -n "$TARBALL" ] && [ ! -f "$TARBALL" ]; then
        tpu_die "TARBALL '$TARBALL' is not a file" 2
    fi
}

# Runs gcloud and echoes the command first, unless TPU_QUIET is set. GCLOUD
# may hold several words (e.g. "gcloud alpha"), hence the split.
tpu_gcloud() {
    local -a cmd
    local arg shown=""
    read -r -a cmd <<<"$GCLOUD"
    for arg in "${cmd[@]}" "$@"; do
        case "$arg" in
            # Remote scripts are long; the command line stays readable without them.
            --command=*) arg="--command=..." ;;
        esac
        shown="$shown $(printf '%q' "$arg")"
    done
    [ -n "${TPU_QUIET:-}" ] || printf '+%s\n' "$shown" >&2
    "${cmd[@]}" "$@"
}

tpu_ssh() {  # WORKER REMOTE_SCRIPT
    tpu_gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
        --worker="$1" --command="$2"
}

# Shell lines that set NAME to VALUE on the worker, quoted for bash.
tpu_remote_vars() {  # NAME VALUE [NAME VALUE ...]
    while [ $# -ge 2 ]; do
        printf '%s=%q\n' "$1" "$2"
        shift 2
    done
}

# Prints the state of the TPU VM (READY, PREEMPTED, ...) or of the queued
# resource (ACTIVE, SUSPENDED, ...) when QUEUED; MISSING when it does not
# exist and UNKNOWN when gcloud failed for another reason.
tpu_state() {
    local out
    local -a cmd
    read -r -a cmd <<<"$GCLOUD"
    if tpu_true "$QUEUED"; then
        out=$("${cmd[@]}" compute tpus queued-resources describe "$QR_NAME" \
            --zone="$ZONE" --project="$PROJECT" --format='value(state.state)' 2>&1) || {
            tpu_classify_failure "$out"
            return 0
        }
    else
        out=$("${cmd[@]}" compute tpus tpu-vm describe "$TPU_NAME" \
            --zone="$ZONE" --project="$PROJECT" --format='value(state)' 2>&1) || {
            tpu_classify_failure "$out"
            return 0
        }
    fi
    # gcloud warnings share the output; the state is the all-caps line.
    out=$(printf '%s\n' "$out" | grep -E '^[A-Z_]+$' | tail -n 1) || true
    printf '%s\n' "${out:-UNKNOWN}"
}

tpu_classify_failure() {
    case "$1" in
        *NOT_FOUND* | *"not found"*) echo MISSING ;;
        *) echo UNKNOWN ;;
    esac
}

tpu_mktemp_dir() {  # a temp dir removed when the script exits
    TPU_TMP=$(mktemp -d "${TMPDIR:-/tmp}/jaxlm-tpu.XXXXXX")
    trap 'rm -rf "$TPU_TMP"' EXIT
}
