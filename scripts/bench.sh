#!/usr/bin/env bash
# Benchmark provenafs against rclone mount and s3fs on the same emulator.
#   scripts/bench.sh                 full sizes (1 GiB file, 8 x 64 MiB, 10,000
#                                    files, science reads), loopback profile
#   scripts/bench.sh --profile wan   the same under the emulator's WAN profile
#                                    (20 ms first byte, 50 MiB/s a stream,
#                                    500 MiB/s link, 150 ms per API call):
#                                    bench/RESULTS-wan.md
#   BENCH_SCALE=16 scripts/bench.sh  sizes divided by 16 (written to bench/out/)
#   BENCH_REPS=3                     repetitions per figure (median reported)
#   BENCH_ONLY=science|core          only the science reads, or only the rest
# The science reads (xarray, h5py, pyarrow, rasterio, sqlite3, and xarray's
# open_mfdataset over a series of 30 files) run in a venv
# of their own (BENCH_VENV, default /tmp/provenafs-bench-venv) made from
# scripts/bench-requirements.txt. Each provenafs mount has new, empty cache
# and state folders (no disk cache, no read hints of an earlier mount); the
# science reads also have "provenafs recalled", whose mounts share read hints
# left by one untimed read before (another node read the version before).
# Needs root (mounts), fuse3, fio; rclone and s3fs are used
# when installed (apt-get install -y rclone s3fs fio).
# Writes bench/RESULTS.md (or $BENCH_OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bins
exec python3 scripts/bench.py "$@"
