#!/usr/bin/env bash
# Benchmark provenafs against rclone mount and s3fs on the same emulator.
#   scripts/bench.sh                 full sizes (1 GiB file, 8 x 64 MiB, 10,000 files)
#   BENCH_SCALE=16 scripts/bench.sh  sizes divided by 16
#   BENCH_REPS=3                     repetitions per figure (median reported)
# Needs root (mounts), fuse3, fio; rclone and s3fs are used
# when installed (apt-get install -y rclone s3fs fio).
# Writes bench/RESULTS.md (or $BENCH_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bins
exec python3 scripts/bench.py "$@"
