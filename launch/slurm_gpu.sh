#!/usr/bin/env bash
# Multi-node NVIDIA GPU training under SLURM: one JAX process per node, all local GPUs each.
# jax.distributed.initialize() reads the SLURM environment.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh configs/imagenet512.py /shared/dfm512
#
#SBATCH --job-name=dfm_jax
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
CONFIG=$1; WORKDIR=$2; shift 2
srun python3 -m dfm_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --config.distributed.initialize=True "$@"
