#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Installs jaxlm with the tpu extra on every worker of the TPU VM.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: tpu/setup.sh [options]

Puts the jaxlm source in ~/REMOTE_DIR on every worker (replacing what was
there) and installs it with `pip install -e '.[tpu]'` into the venv ~/VENV_DIR,
made with PYTHON (python3; python3.11 from apt where that is older than 3.11,
as on Ubuntu 22.04 images). The source comes from one of:
  REPO_URL (+ REPO_REF)  git clone on each worker, then checkout REPO_REF
  TARBALL=FILE           a .tar.gz with the repo at its top level, copied over scp
  ARCHIVE=1              `git archive HEAD` of this checkout (committed files only)
Needs TPU_NAME, ZONE, PROJECT.

Example:
  tpu/setup.sh --repo-url=https://github.com/me/jaxlm.git --repo-ref=v0.1
  tpu/setup.sh --archive
EOF
}

# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
tpu_parse_args "$@"
tpu_require TPU_NAME ZONE PROJECT
tpu_require_source
[ ${#TPU_ARGS[@]} -eq 0 ] || tpu_die "unexpected argument: ${TPU_ARGS[0]} (see --help)" 2

remote_tarball=jaxlm-src.tar.gz

if tpu_true "$ARCHIVE"; then
    tpu_mktemp_dir
    if ! git -C "$REPO_DIR" diff --quiet HEAD --; then
        tpu_note "warning: $REPO_DIR has uncommitted changes; only committed files are copied"
    fi
    TARBALL="$TPU_TMP/$remote_tarball"
    git -C "$REPO_DIR" archive --format=tar.gz -o "$TARBALL" HEAD
fi

# The remote script runs in the login shell (bash) of each worker, from ~.
# jaxlm needs Python 3.11+, and the Ubuntu 22.04 TPU images ship 3.10: then
# python3.11 comes from apt. jaxlm goes into a venv made with it.
install_body=$(
    cat <<'EOF'
worker=${TPU_WORKER_ID:-$(hostname)}
new_enough() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
if ! new_enough "$python"; then
    echo "worker $worker: $python is missing or older than 3.11; installing python3.11 with apt"
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq update
    sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y python3.11 python3.11-venv
    python=python3.11
fi
if ! new_enough "$venv/bin/python"; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
cd "$dir"
echo "worker $worker: pip install -e .[tpu] in ~/$dir (venv ~/$venv)"
"$HOME/$venv/bin/python" -m pip install --quiet -e '.[tpu]'
echo "worker $worker: jaxlm installed"
EOF
)

if [ -n "$TARBALL" ]; then
    tpu_gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:$remote_tarball" \
        --zone="$ZONE" --project="$PROJECT" --worker=all
    fetch_body=$(
        cat <<'EOF'
rm -rf "$dir"
mkdir -p "$dir"
tar -xf "$tarball" -C "$dir"
rm -f "$tarball"
EOF
    )
    vars=$(tpu_remote_vars dir "$REMOTE_DIR" venv "$VENV_DIR" python "$PYTHON" tarball "$remote_tarball")
else
    fetch_body=$(
        cat <<'EOF'
rm -rf "$dir"
git clone --quiet "$url" "$dir"
git -C "$dir" checkout --quiet "$ref"
EOF
    )
    vars=$(tpu_remote_vars dir "$REMOTE_DIR" venv "$VENV_DIR" python "$PYTHON" url "$REPO_URL" ref "$REPO_REF")
fi

tpu_ssh all "set -eu
cd
$vars
$fetch_body
$install_body"
tpu_note "jaxlm is installed on every worker of $TPU_NAME"
