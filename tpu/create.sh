#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Creates the TPU VM, directly or through a queued resource.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: tpu/create.sh [options] [-- extra gcloud create flags...]

Creates a TPU VM (gcloud compute tpus tpu-vm create), or with QUEUED=1 a queued
resource holding one node named TPU_NAME (gcloud compute tpus queued-resources
create ... --node-id=TPU_NAME) and waits until it is ACTIVE.
Needs TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE.

Options:
  --no-wait          with QUEUED=1, return once the request is queued
  POLL_SECONDS       seconds between state checks while waiting (default: 60)

Example:
  TPU_NAME=jaxlm-v5e ZONE=us-west4-a PROJECT=my-proj ACCELERATOR_TYPE=v5litepod-8 \
      tpu/create.sh --spot
EOF
}

WAIT=1
tpu_script_opt() {
    case "$1" in
        --no-wait) WAIT=0; TPU_SHIFT=1 ;;
    esac
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tpu_parse_args "$@"
tpu_require TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION

capacity=()
if tpu_true "$SPOT"; then
    capacity=(--spot)
elif tpu_true "$RESERVED"; then
    capacity=(--reserved)
fi

if ! tpu_true "$QUEUED"; then
    # gcloud waits for the create operation, so the VM is READY on success.
    tpu_gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
        ${capacity[@]+"${capacity[@]}"} ${TPU_ARGS[@]+"${TPU_ARGS[@]}"}
    exit 0
fi

tpu_gcloud compute tpus queued-resources create "$QR_NAME" --node-id="$TPU_NAME" \
    --zone="$ZONE" --project="$PROJECT" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" \
    ${capacity[@]+"${capacity[@]}"} ${TPU_ARGS[@]+"${TPU_ARGS[@]}"}
[ "$WAIT" -eq 1 ] || exit 0

# The request can sit in the queue for a long time; Ctrl-C leaves it queued.
while :; do
    state=$(tpu_state)
    case "$state" in
        ACTIVE)
            tpu_note "queued resource $QR_NAME is ACTIVE; node $TPU_NAME is ready"
            exit 0
            ;;
        FAILED | SUSPENDING | SUSPENDED | MISSING)
            tpu_die "queued resource $QR_NAME is $state (gcloud compute tpus queued-resources describe $QR_NAME --zone=$ZONE --project=$PROJECT)"
            ;;
    esac
    tpu_note "queued resource $QR_NAME is $state; checking again in ${POLL_SECONDS}s"
    sleep "$POLL_SECONDS"
done
