#!/usr/bin/env bash
# A Slurm batch job that reads Provena datasets in place.
#
#   sbatch scripts/slurm-job.sh python3 analysis.py      # any command
#
# The datasets are mounted on the node under $TMPDIR, only the ones named in
# PROVENA_DATASETS (the registry is never listed), and unmounted however the
# job ends: normal exit, error, scancel or time limit (Slurm sends SIGTERM).
# The command sees the mount in $PROVENA_MNT.
#
#SBATCH --job-name=provena-analysis
#SBATCH --time=12:00:00
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --signal=TERM@60

set -euo pipefail

# The offline token from `provenafs login`, or a 0600 file of your own.
TOKEN_FILE=${PROVENA_TOKEN_FILE:-${XDG_CONFIG_HOME:-$HOME/.config}/provenafs/token}
DATASETS=${PROVENA_DATASETS:-10378.1/1687966}
# Node-local scratch; a cache folder on the cluster file system instead
# (PROVENA_CACHE=/scratch/$USER/provena-cache) lets every node of a job
# array reuse what one node downloaded.
NODE_TMP=${TMPDIR:-/tmp}
CACHE=${PROVENA_CACHE:-$NODE_TMP/provena-cache-${SLURM_JOB_ID:-$$}}

export PROVENA_MNT=$NODE_TMP/provena-${SLURM_JOB_ID:-$$}
mkdir -p "$PROVENA_MNT"
cleanup() {
  provenafs unmount "$PROVENA_MNT" 2>/dev/null || true
  rmdir "$PROVENA_MNT" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 143' TERM INT

pins=()
for d in $DATASETS; do pins+=(--dataset "$d"); done
provenafs mount "$PROVENA_MNT" --token-file "$TOKEN_FILE" "${pins[@]}" \
  --cache-dir "$CACHE" --cache-shared --log-file "$PROVENA_MNT.log"

if [ $# -eq 0 ]; then
  set -- ls -l "$PROVENA_MNT"
fi
# Not exec: the trap must run after the command ends.
"$@"
