#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=8
#SBATCH --error=/scratch/study/jobs/%j_0_log.err
#SBATCH --exclusive
#SBATCH --gpus-per-node=4
#SBATCH --job-name=r2d2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=/scratch/study/jobs/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --requeue
#SBATCH --signal=USR2@90
#SBATCH --time=90
#SBATCH --wckey=submitit

# setup

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /scratch/study/jobs/%j_%t_log.out --error /scratch/study/jobs/%j_%t_log.err --cpus-per-task=8 python -u -m submitit.core._submit /scratch/study/jobs
