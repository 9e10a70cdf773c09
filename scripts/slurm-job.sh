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
# Everything the job keeps on the node (the mountpoint, the mount's log and
# read manifest, its cache unless PROVENA_CACHE names one) is in a folder
# only you can write, under a name nobody can guess
# ($TMPDIR/provena-$SLURM_JOB_ID.XXXXXXXX): another user of the node can
# neither read the log nor plant a manifest for the job to keep. When the
# job ends that folder goes, unless the job failed: then the mount's log
# stays there, and the job's standard error says where.
#
# Job arrays: give every task one cache folder on the cluster file system
# (PROVENA_CACHE=/scratch/$USER/provena-cache) and stage the datasets into
# it once, before the array starts, with a stage-in job:
#
#   export PROVENA_CACHE=/scratch/$USER/provena-cache PROVENA_DATASETS=10378.1/1687966
#   stage=$(PROVENA_PREFETCH=only sbatch --parsable scripts/slurm-job.sh)
#   sbatch --dependency=afterok:$stage --array=0-499 scripts/slurm-job.sh python3 analysis.py
#
# PROVENA_PREFETCH=only  prefetch the datasets into PROVENA_CACHE, then end
#                        (no mount, no command): the stage-in job.
# PROVENA_PREFETCH=1     prefetch before mounting (one job that reads its
#                        data many times); in a job array only the first
#                        task does, and the others do not wait for it: for
#                        arrays, the stage-in job above.
# PROVENA_CACHE_SIZE     the cache budget of both (default 10GiB).
# PROVENA_PROVENANCE     where the job's read manifest goes (default:
#                        provenance-$SLURM_JOB_ID.json in the job's working
#                        folder; empty: not kept).
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
JOB_DIR=$(mktemp -d "$NODE_TMP/provena-${SLURM_JOB_ID:-$$}.XXXXXXXX")
# Until the mount's own clean-up takes over (below): a prefetch that fails
# leaves nothing behind.
trap 'rm -rf --one-file-system "$JOB_DIR"' EXIT
CACHE=${PROVENA_CACHE:-$JOB_DIR/cache}

# Bash 4.2 (RHEL 7) takes an empty array for an unset variable under set -u:
# hence ${sizes[@]+...}.
sizes=()
if [ -n "${PROVENA_CACHE_SIZE:-}" ]; then sizes=(--cache-size "$PROVENA_CACHE_SIZE"); fi
case ${PROVENA_PREFETCH:-0} in
  only)
    if [ -z "${PROVENA_CACHE:-}" ]; then
      echo "slurm-job.sh: PROVENA_PREFETCH=only needs PROVENA_CACHE (a folder the array's tasks share)" >&2
      exit 2
    fi
    rmdir "$JOB_DIR"
    trap - EXIT
    # shellcheck disable=SC2086 # DATASETS is a list of handles
    exec provenafs prefetch $DATASETS --token-file "$TOKEN_FILE" \
      --cache-dir "$CACHE" --cache-shared ${sizes[@]+"${sizes[@]}"}
    ;;
  1 | yes | true)
    # Resumable: what an earlier job staged is not fetched again.
    if [ "${SLURM_ARRAY_TASK_ID:-0}" = "${SLURM_ARRAY_TASK_MIN:-0}" ]; then
      # shellcheck disable=SC2086
      provenafs prefetch $DATASETS --token-file "$TOKEN_FILE" \
        --cache-dir "$CACHE" --cache-shared ${sizes[@]+"${sizes[@]}"}
    fi
    ;;
  0 | no | false | "") ;;
  *)
    echo "slurm-job.sh: PROVENA_PREFETCH must be 1, only or 0, not ${PROVENA_PREFETCH}" >&2
    exit 2
    ;;
esac

export PROVENA_MNT=$JOB_DIR/mnt
# What this job read (datasets, files, the versions read, by which of its
# processes), kept with its outputs however it ends: `provenafs provenance
# --from FILE --model-run` makes a Provena model run record of it later.
PROVENANCE=${PROVENA_PROVENANCE-$PWD/provenance-${SLURM_JOB_ID:-$$}.json}
mkdir -p "$PROVENA_MNT"
keep_provenance() {
  # The mount is this job's own: everything read through it is the job's.
  # From the live mount; else (scancel and the time limit signal every
  # process of the job, the daemon too, which may end first) from the
  # manifest the daemon writes beside its log as it ends, marked
  # "ended_at". Until then the file there is a checkpoint (written every
  # 30 s while mounted), which is all a daemon killed outright leaves.
  local written=$JOB_DIR/mount.provenance.json
  if mountpoint -q "$PROVENA_MNT" 2>/dev/null; then
    timeout 60 provenafs provenance "$PROVENA_MNT" --json
  else
    for _ in $(seq 20); do grep -qs '"ended_at"' "$written" && break; sleep 0.5; done
    # Only a file of ours (the folder is ours alone; this says so again).
    [ -O "$written" ] && [ ! -L "$written" ] || return 1
    provenafs provenance --from "$written" --json
  fi
}
cleanup() {
  if [ -n "$PROVENANCE" ]; then
    # 0600, as the daemon's own: it names the job's processes. Through a
    # temporary file nobody can guess (mktemp: made new, never through a
    # link someone planted), renamed into place.
    local tmp
    if tmp=$(umask 077 && mktemp "$PROVENANCE.XXXXXXXX" 2>/dev/null); then
      (keep_provenance >"$tmp") 2>/dev/null && mv -f "$tmp" "$PROVENANCE" || rm -f "$tmp"
    fi
  fi
  provenafs unmount "$PROVENA_MNT" 2>/dev/null || true
  if ! mountpoint -q "$PROVENA_MNT" 2>/dev/null; then
    rmdir "$PROVENA_MNT" 2>/dev/null || true
    # The job's own cache (never a shared PROVENA_CACHE).
    if [ -z "${PROVENA_CACHE:-}" ]; then rm -rf --one-file-system "$JOB_DIR/cache"; fi
    # The log and the daemon's manifest stay only when the job failed (to
    # see why); otherwise the job's folder goes too.
    if [ "$status" -eq 0 ]; then
      rm -rf --one-file-system "$JOB_DIR"
    else
      echo "slurm-job.sh: the mount's log is in $JOB_DIR/mount.log" >&2
    fi
  fi
}
trap 'status=$?; cleanup' EXIT
trap 'exit 143' TERM INT

pins=()
for d in $DATASETS; do pins+=(--dataset "$d"); done
provenafs mount "$PROVENA_MNT" --token-file "$TOKEN_FILE" "${pins[@]}" \
  --cache-dir "$CACHE" --cache-shared ${sizes[@]+"${sizes[@]}"} --log-file "$JOB_DIR/mount.log"

if [ $# -eq 0 ]; then
  set -- ls -l "$PROVENA_MNT"
fi
# Not exec: the trap must run after the command ends.
"$@"
