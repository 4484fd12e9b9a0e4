#!/usr/bin/env bash
# sbatch launch/slurm.sh RECIPE JOB_DIR   -- one task per node, 8 GPUs per node, Accelerate on each.
#SBATCH --job-name=llmpalette
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=llmpalette-%j.out
set -euo pipefail
RECIPE="$1"; JOB_DIR="$2"
MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
GPUS_PER_NODE=8
srun bash -c "accelerate launch \
  --multi_gpu --num_machines $SLURM_NNODES --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID --main_process_ip $MAIN_IP --main_process_port 29517 \
  -m llmpalette compress $RECIPE --job-dir $JOB_DIR --resume"
