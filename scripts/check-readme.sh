#!/usr/bin/env bash
# Keeps the README honest. Every ```sh block is either run here, in order,
# in one shell, against the emulator (HOME in a scratch folder, `provenafs`
# on PATH), or names where it is run: ```sh tested-by=FILE[:NAME] must name
# a file that exists and contains NAME. Every ```toml block must be a config
# file provenafs accepts.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
# "Other tools" makes a venv and installs boto3, the AWS CLI, s3fs and
# xarray from PyPI (Debian's python3 needs python3-venv for that): say so
# now rather than after the build.
python3 -c 'import ensurepip, venv' 2>/dev/null ||
  { echo "check-readme: python3 -m venv does not work here (apt-get install python3-venv)" >&2; exit 1; }
# The README's install steps build the binary every command uses:
# scripts/static-build.sh here, then its `cargo install` (in the run below)
# with the same settings, so both share one build. PROVENAFS_BIN=path skips
# both (for a quick local run).
if [ -n "${PROVENAFS_BIN:-}" ]; then
  bin=$PROVENAFS_BIN
else
  bin=$(scripts/static-build.sh | tail -1)
fi
bin=$(realpath "$bin")
host=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_HOME=${CARGO_HOME:-$HOME/.cargo} RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
work=$(mktemp -d /tmp/provenafs-readme.XXXXXX)
sim_pid=
cleanup() {
  set +e
  for m in $(awk -v w="$work" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo); do
    fusermount3 -uz "$m" 2>/dev/null || umount -l "$m"
  done
  [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null
  [ -n "${run_pid:-}" ] && kill -- "-$run_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/bin" "$work/home"

ln -s "$(realpath "$bin")" "$work/bin/provenafs"

python3 - "$repo" "$work" <<'PY'
import os, re, sys
repo, work = sys.argv[1], sys.argv[2]
text = open(os.path.join(repo, "README.md"), encoding="utf-8").read()
blocks = re.findall(r"^```([^\n]*)\n(.*?)^```\s*$", text, flags=re.S | re.M)
run, tomls, bad = [], 0, []
for info, body in blocks:
    words = info.split()
    lang = words[0] if words else ""
    attrs = dict(w.split("=", 1) for w in words[1:] if "=" in w)
    if lang == "sh":
        where = attrs.get("tested-by")
        if "scripts/static-build.sh" in body and where is None:
            continue  # already run above, to build the binary used here
        if "cargo install" in body and where is None and os.environ.get("PROVENAFS_BIN"):
            continue  # a quick local run: no release build
        if where is None:
            if "--path ." in body or "scripts/" in body:
                # Run from the clone, as the reader would.
                body = f'cd "$REPO"\n{body}cd "$HOME"\n'
            run.append(body)
            continue
        path, _, name = where.partition(":")
        full = os.path.join(repo, path)
        if not os.path.exists(full):
            bad.append(f"tested-by={where}: no file {path}")
        elif name and name not in open(full, encoding="utf-8").read():
            bad.append(f"tested-by={where}: {name!r} not in {path}")
    elif lang == "toml":
        tomls += 1
        open(os.path.join(work, f"config-{tomls}.toml"), "w").write(body)
    elif lang not in ("text", ""):
        bad.append(f"unknown block language {lang!r}")
if bad:
    sys.exit("check-readme: " + "; ".join(bad))
open(os.path.join(work, "run.sh"), "w").write("\n".join(run))
print(f"check-readme: {len(run)} blocks to run, {tomls} config examples")
PY

# The emulator, with the sample data the README talks about. Logins are
# approved at once; nothing else differs from the real service.
"$bin" sim --root "$work/data" --sample-data --auto-approve --device-interval 1 \
  --env-file "$work/sim.env" >/dev/null 2>"$work/sim.log" &
sim_pid=$!
for _ in $(seq 100); do [ -s "$work/sim.env" ] && break; sleep 0.1; done
eval "$(grep -E '^PROVENA_(AUTH_URL|API_URL|S3_ENDPOINT)=' "$work/sim.env" | sed 's/^/export /')"
unset RRAP_OFFLINE_TOKEN XDG_CONFIG_HOME PROVENAFS_CONFIG DISPLAY WAYLAND_DISPLAY BROWSER

cd "$work/home"
# `cargo install` lands in the sandbox and reuses the static build; the
# commands after it run what it installed.
export CARGO_INSTALL_ROOT="$work/cargo" CARGO_TARGET_DIR="$repo/target" \
  CARGO_BUILD_TARGET="$host" RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
# The venv of "Other tools" downloads from PyPI into the caller's pip
# cache, not the scratch HOME's: a second run does not download again.
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME/.cache/pip}" PIP_DISABLE_PIP_VERSION_CHECK=1
export HOME="$work/home" PATH="$work/cargo/bin:$work/bin:$PATH" REPO="$repo"
setsid bash -euo pipefail -x "$work/run.sh" &
run_pid=$!
wait "$run_pid"

for t in "$work"/config-*.toml; do
  [ -e "$t" ] || continue
  provenafs ls --config "$t" 10378.1/1687966 >/dev/null
  echo "check-readme: $(basename "$t") accepted"
done
echo "check-readme: README OK"
