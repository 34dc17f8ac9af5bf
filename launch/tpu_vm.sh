#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: installs dfm_jax on every worker and starts the same command
# on all of them (one JAX process per host; jax.distributed.initialize() finds its peers).
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   launch/tpu_vm.sh dfm512 us-central2-b v4-32 configs/imagenet512.py gs://BUCKET/dfm512 \
#       --config.data.path=/mnt/data/imagenet512_latents.npz
#
# Re-running the same command resumes from the latest checkpoint in WORKDIR.
set -euo pipefail
NAME=$1; ZONE=$2; ACCELERATOR=$3; CONFIG=$4; WORKDIR=$5; shift 5
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url)}

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version tpu-ubuntu2204-base
fi

gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d dfm_jax ] || git clone $REPO_URL dfm_jax
  cd dfm_jax && git pull --ff-only
  pip install -q -r requirements.txt 'jax[tpu]==0.10.2'
  pip install -q -e .
  nohup python3 -m dfm_jax.main --config=$CONFIG --workdir=$WORKDIR \
      --config.distributed.initialize=True $* > train.log 2>&1 &
"
echo "started on all workers of $NAME; logs: gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=0 --command 'tail -f dfm_jax/train.log'"
