#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Deletes the TPU VM, or with QUEUED=1 the queued resource and its node.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: tpu/delete.sh [options]

Deletes the TPU VM TPU_NAME without asking (gcloud ... tpu-vm delete --quiet),
or with QUEUED=1 the queued resource QR_NAME together with its node
(gcloud ... queued-resources delete --force --quiet). Stop the run first
(tpu/stop.sh) so it saves a checkpoint.
Needs TPU_NAME, ZONE, PROJECT.
EOF
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tpu_parse_args "$@"
tpu_require TPU_NAME ZONE PROJECT
[ ${#TPU_ARGS[@]} -eq 0 ] || tpu_die "unexpected argument: ${TPU_ARGS[0]} (see --help)" 2

if tpu_true "$QUEUED"; then
    # --force deletes the node too; without it the request must be empty first.
    tpu_gcloud compute tpus queued-resources delete "$QR_NAME" --zone="$ZONE" --project="$PROJECT" \
        --force --quiet
else
    tpu_gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
fi
