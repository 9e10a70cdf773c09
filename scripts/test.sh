#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the integration
# tests that mount for real (they need /dev/fuse and fusermount3; under
# CI=1 a missing FUSE fails them instead of skipping).
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-shot CI build gains nothing from incremental state, which is
# gigabytes on disk beside the ~25 test binaries.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked -- --test-threads "${TEST_THREADS:-4}"
# The README's commands, run against the emulator with the binary its
# install step builds (a static release build).
scripts/check-readme.sh
