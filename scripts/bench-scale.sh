#!/usr/bin/env bash
# Full-size scale benchmark (issue 6): a 100,000-object folder, a nested
# 100,000-object dataset, 5,000 datasets, and a 1 GiB file read by a second
# "node" through a shared cache folder. Compares listings with the raw
# ListObjectsV2 calls they need and with rclone mount (when installed).
#   BENCH_LATENCY_MS=20   added to every emulator request (S3 from a cluster)
#   BENCH_SCALE=10        sizes divided by 10 (a quick look)
#   BENCH_ONLY=job_array  only the job-array table (issue 13): 8 mounts on one
#                         shared folder reading one 1 GiB file together, and
#                         prefetch against the direct GET; replaces that
#                         section of bench/SCALE.md
# Needs root (mounts) and fuse3. Writes bench/SCALE.md
# (or $BENCH_OUT) and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bins
exec python3 scripts/bench_scale.py "$@"
