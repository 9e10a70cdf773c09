#!/usr/bin/env python3
"""Benchmark driver behind scripts/bench.sh. See that file for usage.

    python3 scripts/bench.py [--profile loopback|wan]

--profile wan starts the emulator with WAN_FLAGS (real S3 and an API
gateway as seen from a cloud VM) and writes bench/RESULTS-wan.md; the
default, loopback, writes bench/RESULTS.md. Environment:
    BENCH_SCALE=N     sizes divided by N (science fixtures: their outermost
                      dimension), BENCH_REPS (3), BENCH_OUT (the .md file)
    BENCH_ONLY=core|science   run one group of rows only
    Only a full run (both groups, every tool, BENCH_SCALE=1) writes
    bench/RESULTS[-wan].md; a partial, scaled or BENCH_TOOLS run writes
    bench/out/RESULTS[-wan][-GROUP][-scaleN][-some-tools].md (git ignores
    bench/out/), and refuses a BENCH_OUT naming the kept files
    BENCH_RAND_SECS   seconds of each random 4 KiB run (15)
    BENCH_VENV        venv of the science readers (/tmp/provenafs-bench-venv),
                      made from scripts/bench-requirements.txt when missing
    BENCH_TOOLS="provenafs,rclone full"   only these tools (a quick look)

Every provenafs mount has an empty cache folder and an empty state folder
(XDG_CACHE_HOME, XDG_STATE_HOME) of its own: "provenafs" is a first reader
ever, with no disk cache and no read hints from an earlier mount. The
science rows add "provenafs recalled": a version another node read before
(one untimed read of the same reader through a mount of its own, whose
state folder, so whose read hints, the timed mounts share; their cache
folders are still new each mount).
"""
import argparse, json, os, platform, shutil, signal, statistics, subprocess, sys, tempfile, time, datetime, math

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINDIR = os.environ.get("PROVENAFS_BINDIR", os.path.join(ROOT, "target/release"))
BIN = os.path.join(BINDIR, "provenafs")
GETBENCH = os.path.join(BINDIR, "provenafs-getbench")
SCALE = int(os.environ.get("BENCH_SCALE", "1"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
OUT = os.environ.get("BENCH_OUT")  # default chosen in main() by profile and BENCH_ONLY
GROUPS = ("core", "science")
ONLY = [g for g in os.environ.get("BENCH_ONLY", ",".join(GROUPS)).split(",") if g]
VENV = os.environ.get("BENCH_VENV", "/tmp/provenafs-bench-venv")
REQS = os.path.join(ROOT, "scripts/bench-requirements.txt")
SCIENCE = os.path.join(ROOT, "scripts/science.py")
SCI_HANDLE = "10378.1/5"
# The direct GET column: best of these parallel 8 MiB parts.
DIRECT_PARALLEL = (8, 16, 32)
# Real S3 seen from a cloud VM, and the data store API behind its gateway
# (issue 14). Needs a provenafs whose `sim` has these flags.
WAN_FLAGS = ["--first-byte-ms", "20", "--stream-mib-per-s", "50", "--link-mib-per-s", "500",
             "--api-latency-ms", "150"]
PROFILES = {
    "loopback": ([], "on loopback"),
    "wan": (WAN_FLAGS, "under the WAN profile (`sim " + " ".join(WAN_FLAGS) + "`: 20 ms to the first byte, "
            "50 MiB/s per S3 response, 500 MiB/s for all of them, 150 ms per identity or API call)"),
}
MIB = 1 << 20
BIG = (1024 * MIB) // SCALE
PAR_N, PAR_SIZE = 8, (64 * MIB) // SCALE
NFILES = 10000 // SCALE
RAND_SECS = int(os.environ.get("BENCH_RAND_SECS", "15"))

def log(*a):
    print(*a, file=sys.stderr, flush=True)

def sh(cmd, check=True, **kw):
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True, **kw)

def timed(cmd):
    t = time.perf_counter()
    sh(cmd)
    return time.perf_counter() - t

def drop_caches(data):
    # No /proc/sys/vm/drop_caches on these shared machines: every figure is
    # taken on a fresh mount, whose page cache is empty (a FUSE mount's
    # pages belong to its own inodes), and no tool keeps a cache between
    # mounts (rclone's cache folder is new each time). What this does is
    # the opposite: the emulator's own reads come from memory, as a fast
    # server's would.
    if os.path.exists(f"{data}/10378.1/1/big.bin"):
        sh(f"cat {data}/10378.1/1/big.bin {data}/10378.1/2/* > /dev/null")
        sh(f"find {data}/10378.1/3 -type f -exec cat {{}} + > /dev/null")

def warm_science(data, files):
    # As drop_caches, for the science fixtures about to be read (one file,
    # or a series' files; re-reading everything before each read would
    # only cost CPU).
    sh("cat " + " ".join(f"'{data}/{SCI_HANDLE}/{f}'" for f in files) + " > /dev/null")

def gen(data):
    def rnd(path, size):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path) or os.path.getsize(path) != size:
            sh(f"head -c {size} /dev/urandom > '{path}'")
    rnd(f"{data}/10378.1/1/big.bin", BIG)
    for i in range(PAR_N):
        rnd(f"{data}/10378.1/2/part-{i}.bin", PAR_SIZE)
    many = f"{data}/10378.1/3/many"
    os.makedirs(many, exist_ok=True)
    if len(os.listdir(many)) != NFILES:
        for i in range(NFILES):
            with open(f"{many}/f{i:05d}.txt", "w") as f:
                f.write(f"file {i}\n" * 8)

def sim_has_flags(flags):
    """Whether this provenafs's `sim` knows every --flag in flags."""
    help_text = sh(f"'{BIN}' sim --help", check=False).stdout
    return all(f in help_text for f in flags if f.startswith("--"))

class Sim:
    def __init__(self, data, extra=()):
        self.envfile = tempfile.mktemp(suffix=".env")
        self.p = subprocess.Popen([BIN, "sim", "--root", data, "--env-file", self.envfile,
                                   "--credentials-ttl", "86400", "--access-token-ttl", "3600",
                                   "--log-level", "error", *extra], stdout=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(self.envfile) or self.p.poll() is not None:
                break
            time.sleep(0.05)
        if not os.path.exists(self.envfile):
            sys.exit(f"bench: `provenafs sim {' '.join(extra)}` did not start")
        # NAME=value lines; the closing `export NAME...` line is for shells.
        self.env = dict(l.split("=", 1) for l in open(self.envfile).read().splitlines()
                        if "=" in l and not l.startswith("export "))
        self.base = self.env["PROVENA_API_URL"]
        self.pid = self.p.pid

    def stats(self):
        return json.loads(sh(f"curl -s {self.base}/_sim/stats").stdout)

    def creds(self, handle):
        tok = json.loads(sh(f"curl -s -d grant_type=refresh_token -d client_id=automated-access "
                            f"-d scope=roles --data-urlencode refresh_token={self.env['RRAP_OFFLINE_TOKEN']} "
                            f"{self.env['PROVENA_AUTH_URL']}/protocol/openid-connect/token").stdout)["access_token"]
        body = json.dumps({"dataset_id": handle, "console_session_required": False})
        r = sh(f"curl -s -H 'Authorization: Bearer {tok}' -H 'content-type: application/json' "
               f"-d '{body}' {self.base}/registry/credentials/generate-read-access-credentials")
        return json.loads(r.stdout)["credentials"]

    def stop(self):
        self.p.terminate()
        self.p.wait()

def pids_of(*words):
    """Processes whose command line holds every word, found in /proc (a
    `pgrep -f` run through sh also finds that sh, whose command line holds
    the pattern: s3fs's peak RSS read 0 as the sh's pid was taken for
    s3fs's, s3fs having rewritten its own arguments)."""
    found = []
    for p in os.listdir("/proc"):
        if not p.isdigit() or int(p) == os.getpid():
            continue
        try:
            argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in argv if a]
        names = set(argv) | {os.path.basename(a) for a in argv}
        if argv and os.path.basename(argv[0]) not in ("sh", "bash") and all(w in names for w in words):
            found.append(int(p))
    return sorted(found)

def dashed(h):
    return "datasets/" + h.replace(".", "-").replace("/", "-")

class Tool:
    """One way of reading dataset files: mount() returns the dataset's folder."""
    def __init__(self, name, sim):
        self.name, self.sim, self.mounts, self.pids = name, sim, [], []
        # Scratch folders (rclone's caches) removed with the mounts: left
        # behind, each run leaked up to a GiB into /tmp.
        self.scratch = []

    def umount_all(self):
        for m in self.mounts:
            sh(f"fusermount3 -u '{m}' || umount -l '{m}'", check=False)
        time.sleep(0.3)
        for m in self.mounts + self.scratch:
            shutil.rmtree(m, ignore_errors=True)
        self.mounts, self.pids, self.scratch = [], [], []

    def new_mountpoint(self):
        m = tempfile.mkdtemp(prefix=f"bench-{self.name.replace(' ', '-')}-")
        self.mounts.append(m)
        return m

class Provenafs(Tool):
    """provenafs, a first reader ever: each mount has an empty cache folder
    and an empty state folder of its own."""
    def __init__(self, name, sim):
        super().__init__(name, sim)
        # The state folder shared by this tool's mounts, or None: a new one
        # each mount (see mount()).
        self.state = None
        self.logs = {}  # mountpoint -> (its log file, the pid serving it)

    def mount(self, handle):
        m = self.new_mountpoint()
        # provenafs keeps a disk cache by default, in $XDG_CACHE_HOME/provenafs,
        # kept across mounts: left there, every repetition after the first
        # read its blocks from disk, not S3 (and the runs leaked into
        # /root/.cache). Each mount gets an empty one of its own, as each
        # rclone mount gets a new cache folder; through XDG_CACHE_HOME, not
        # --cache-dir, so that it is still the default folder to provenafs
        # (whose first reads act on that).
        cache = tempfile.mkdtemp(prefix="bench-provenafs-cache-")
        self.scratch.append(cache)
        # Likewise the state folder, $XDG_STATE_HOME/provenafs: besides the
        # mount's log, status and read manifest it keeps the read hints, the
        # ranges each file version's (and series') readers asked for first,
        # which the next open of that version asks for at once. Kept across
        # mounts, every repetition after the first would be a reader that
        # had been there before (and the runs leaked into /root/.local/state).
        # A tool with a shared folder (ProvenafsRecalled) keeps it.
        state = self.state
        if state is None:
            state = tempfile.mkdtemp(prefix="bench-provenafs-state-")
            self.scratch.append(state)
        env = dict(os.environ, **self.sim.env, XDG_CACHE_HOME=cache, XDG_STATE_HOME=state)
        r = subprocess.run([BIN, "mount", m], env=env, check=True, capture_output=True, text=True)
        sys.stderr.write(r.stderr)
        pid = pids_of("provenafs", "mount", m, "--foreground")[:1]
        self.pids += pid
        # Its log, in that state folder: "mounted at M; logs in PATH".
        logf = next((l.split("logs in ", 1)[1].strip() for l in r.stderr.splitlines() if "logs in " in l), None)
        if logf and pid:
            self.logs[m] = (logf, pid[0])
        return f"{m}/{handle}"

    def umount_all(self):
        super().umount_all()
        self.logs = {}

    def mount_stats(self, d):
        """The figures of the mount serving folder d: the `stats:` line its
        process logs on SIGUSR1 (in its log, in the mount's own state
        folder), as numbers by name; {} when there are none within 5 s."""
        m = next((m for m in self.logs if d == m or d.startswith(m + "/")), None)
        if m is None:
            return {}
        logf, pid = self.logs[m]
        def lines():
            try:
                return [l for l in open(logf, errors="replace") if "stats: " in l]
            except OSError:
                return []
        before = len(lines())
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            return {}
        end = time.perf_counter() + 5
        while time.perf_counter() < end:
            found = lines()
            if len(found) > before:
                kv = (x.split("=", 1) for x in found[-1].rsplit("stats: ", 1)[1].split() if "=" in x)
                return {k: int(v) for k, v in kv if v.isdigit()}
            time.sleep(0.05)
        return {}

class ProvenafsRecalled(Provenafs):
    """provenafs where another node read this version before: its mounts
    share one state folder (so its read hints), set up per science read by
    new_state() and primed by one untimed read through a mount of its own
    (science()). Each mount still has an empty cache folder of its own (no
    disk cache shared): what carries over is the hints alone. Science rows
    only."""
    def __init__(self, name, sim):
        super().__init__(name, sim)
        self.kept = []

    def new_state(self):
        self.forget()
        self.state = tempfile.mkdtemp(prefix="bench-provenafs-recalled-state-")
        self.kept.append(self.state)

    def forget(self):
        for d in self.kept:
            shutil.rmtree(d, ignore_errors=True)
        self.kept, self.state = [], None

    def hint_records(self):
        d = os.path.join(self.state or "", "provenafs/hints")
        try:
            return sum(1 for f in os.listdir(d) if not f.startswith("."))
        except OSError:
            return 0

# The ways that are provenafs itself: never a peer, never an "other way".
PROVENAFS_WAYS = ("provenafs", "provenafs recalled")

def wait_exit(pids, secs=10.0):
    """Waits (up to secs) for processes not our children to be gone (a
    zombie counts as gone)."""
    end = time.perf_counter() + secs
    for p in pids:
        while time.perf_counter() < end:
            try:
                if open(f"/proc/{p}/stat").read().split(")")[-1].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.05)

class Rclone(Tool):
    def __init__(self, name, sim, mode):
        super().__init__(name, sim)
        self.mode = mode

    def mount(self, handle):
        m = self.new_mountpoint()
        c = self.sim.creds(handle)
        cache = tempfile.mkdtemp(prefix="bench-rclone-cache-")
        self.scratch.append(cache)
        env = dict(os.environ, RCLONE_CONFIG_P_TYPE="s3", RCLONE_CONFIG_P_PROVIDER="Other",
                   RCLONE_CONFIG_P_ENDPOINT=self.sim.env["PROVENA_S3_ENDPOINT"],
                   RCLONE_CONFIG_P_ACCESS_KEY_ID=c["aws_access_key_id"],
                   RCLONE_CONFIG_P_SECRET_ACCESS_KEY=c["aws_secret_access_key"],
                   RCLONE_CONFIG_P_SESSION_TOKEN=c["aws_session_token"],
                   RCLONE_CONFIG_P_FORCE_PATH_STYLE="true", RCLONE_CONFIG_P_REGION="ap-southeast-2")
        env.pop("AWS_CA_BUNDLE", None)
        subprocess.run(["rclone", "mount", f"p:provena-bucket/{dashed(handle)}", m, "--read-only",
                        "--vfs-cache-mode", self.mode, "--cache-dir", cache, "--daemon",
                        "--daemon-wait", "30s"], env=env, check=True)
        self.pids += pids_of("rclone", "mount", m)[:1]
        return m

class S3fs(Tool):
    def mount(self, handle):
        m = self.new_mountpoint()
        c = self.sim.creds(handle)
        env = dict(os.environ, AWSACCESSKEYID=c["aws_access_key_id"],
                   AWSSECRETACCESSKEY=c["aws_secret_access_key"], AWSSESSIONTOKEN=c["aws_session_token"])
        subprocess.run(["s3fs", f"provena-bucket:/{dashed(handle)}", m, "-o",
                        f"url={self.sim.env['PROVENA_S3_ENDPOINT']},use_path_request_style,ro,"
                        "endpoint=ap-southeast-2,sigv4"], env=env, check=True, timeout=60)
        for _ in range(100):
            if os.path.ismount(m):
                break
            time.sleep(0.1)
        # s3fs rewrites its arguments ("provena-bucket:/x" reads
        # "provena-bucket /x"): found by its mountpoint.
        self.pids += pids_of("s3fs", m)[:1]
        return m

def peak_rss_mib(pids):
    """Largest VmHWM of pids (MiB); None when none could be read."""
    best = None
    for p in pids:
        try:
            for l in open(f"/proc/{p}/status"):
                if l.startswith("VmHWM:"):
                    best = max(best or 0, int(l.split()[1]) // 1024)
        except OSError:
            pass
    return best

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

# What a first byte costs: the emulator's counters read around it.
TTFB_KEYS = ("s3_get", "s3_list", "s3_head", "api_fetch", "api_credentials", "tokens_issued")
# (key, file) of the two time-to-first-byte figures, on one fresh mount of
# dataset 10378.1/2: "first" is the dataset's first file, nothing of the
# dataset touched before (provenafs: its API calls, then S3); "listed" is
# another file of the same folder after an untimed `ls` of it (S3 alone).
TTFB_CASES = (("ttfb_first", "part-0.bin"), ("ttfb_listed", "part-1.bin"))

def ttfb_probe(t, sim, data):
    """One fresh mount, both time-to-first-byte cases: {case: {ms,
    s3_get, ..., tokens_issued, s3_get_bytes, first_get_bytes}}.
    first_get_bytes: bytes per GET asked by the time the first byte was
    there (the first request's size, for the WAN target's transfer time);
    the counts are taken SETTLE later, with the read-ahead the read set
    off."""
    drop_caches(data)
    d = t.mount("10378.1/2")
    out = {}
    try:
        for case, fname in TTFB_CASES:
            if case == "ttfb_listed":
                sh(f"ls '{d}' > /dev/null")
                time.sleep(SETTLE)
            s0 = sim.stats()
            ms = timed(f"head -c1 '{d}/{fname}' > /dev/null") * 1000
            s1 = sim.stats()
            time.sleep(SETTLE)
            s2 = sim.stats()
            r = {k: s2.get(k, 0) - s0.get(k, 0) for k in TTFB_KEYS + ("s3_get_bytes",)}
            gets = s1.get("s3_get", 0) - s0.get("s3_get", 0)
            r["first_get_bytes"] = (s1.get("s3_get_bytes", 0) - s0.get("s3_get_bytes", 0)) / gets if gets else None
            r["ms"] = ms
            out[case] = r
    finally:
        t.umount_all()
    return out

def bench_tool(t, data, sim):
    r = {}
    mbps = lambda b, s: b / s / MIB
    probes = []
    for _ in range(REPS):
        probes.append(ttfb_probe(t, sim, data))
    for case, _ in TTFB_CASES:
        runs = [p[case] for p in probes]
        r[case] = med([x["ms"] for x in runs])
        r[case + "_req"] = {k: med([x[k] for x in runs]) for k in runs[0] if k != "ms"}
        r[case + "_runs"] = runs
    cold, warm, rss2 = [], [], []
    for _ in range(REPS):
        drop_caches(data)
        d = t.mount("10378.1/1")
        # The folder listed first, untimed: the direct GET and the peers
        # are handed their credentials before they start, so provenafs's
        # opening of the dataset (API calls, row 6) is not in this row.
        sh(f"ls '{d}' > /dev/null")
        cold.append(mbps(BIG, timed(f"dd if='{d}/big.bin' of=/dev/null bs=1M status=none")))
        # The peak of the mount's life so far: mount, then the cold read.
        rss2.append(peak_rss_mib(t.pids))
        warm.append(mbps(BIG, timed(f"dd if='{d}/big.bin' of=/dev/null bs=1M status=none")))
        t.umount_all()
    r["cold"], r["warm"], r["rss_seq"] = med(cold), med(warm), med(rss2)
    # Random 4 KiB reads.
    iops, fetched = [], []
    for _ in range(REPS):
        drop_caches(data)
        d = t.mount("10378.1/1")
        before = sim.stats()["s3_get_bytes"]
        out = sh(f"fio --name=rr --filename='{d}/big.bin' --rw=randread --bs=4k --size={BIG} "
                 f"--runtime={RAND_SECS} --time_based --ioengine=psync --output-format=json --readonly")
        j = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]["read"]
        iops.append(j["iops"])
        asked = j["io_bytes"]
        fetched.append((sim.stats()["s3_get_bytes"] - before) / max(asked, 1))
        t.umount_all()
    r["iops"], r["rand_fetch_ratio"] = med(iops), med(fetched)
    # Parallel readers.
    par, rss4 = [], []
    for _ in range(REPS):
        drop_caches(data)
        d = t.mount("10378.1/2")
        sh(f"ls '{d}' > /dev/null")  # as in row 1
        cmd = " & ".join(f"dd if='{d}/part-{i}.bin' of=/dev/null bs=1M status=none" for i in range(PAR_N)) + " & wait"
        par.append(mbps(PAR_N * PAR_SIZE, timed(cmd)))
        rss4.append(peak_rss_mib(t.pids))
        t.umount_all()
    r["par"], r["rss_par"] = med(par), med(rss4)
    # Many files: ls -l, then read them all.
    ls, readall, lists, heads = [], [], [], []
    for _ in range(REPS):
        drop_caches(data)
        d = t.mount("10378.1/3")
        s0 = sim.stats()
        ls.append(timed(f"ls -l '{d}/many' > /dev/null"))
        s1 = sim.stats()
        lists.append(s1["s3_list"] - s0["s3_list"])
        heads.append(s1["s3_head"] - s0["s3_head"])
        readall.append(timed(f"cd '{d}/many' && cat * > /dev/null"))
        t.umount_all()
    r["ls"], r["readall"], r["ls_lists"], r["ls_heads"] = med(ls), med(readall), med(lists), med(heads)
    return r

def getbench(sim, handle, key, parallel, out=None):
    """provenafs-getbench: `bytes seconds MiB/s` of parallel 8 MiB ranged
    GETs of one object (and the object written into `out`)."""
    cmd = [GETBENCH, handle, key, str(parallel), "8"] + (["--out", out] if out else [])
    r = subprocess.run(cmd, env=dict(os.environ, **sim.env), check=True, capture_output=True, text=True)
    b, secs, mibs = r.stdout.split()[:3]
    return int(b), float(secs), float(mibs)

def direct_get(sim, data):
    """The direct GET column: the best of DIRECT_PARALLEL parallel 8 MiB
    parts, each the median of REPS."""
    by = {}
    for p in DIRECT_PARALLEL:
        xs = []
        for _ in range(REPS):
            drop_caches(data)
            xs.append(getbench(sim, "10378.1/1", "big.bin", p)[2])
        by[p] = med(xs)
    best = max(by, key=by.get)
    r = {"cold": by[best], "parallel": best, "by_parallel": by}
    r.update(direct_random(sim, data))
    return r

def direct_random(sim, data):
    """The direct column of the random 4 KiB row: `provenafs-getbench
    --random RAND_SECS`, one 4 KiB ranged GET at a time at random offsets
    of the same file (queue depth 1, as fio's psync), median of REPS.
    {"iops"} or, with a getbench that has no --random yet, {"iops": None,
    "random_error"}."""
    xs = []
    for _ in range(REPS):
        drop_caches(data)
        cmd = [GETBENCH, "--random", str(RAND_SECS), "10378.1/1", "big.bin"]
        r = subprocess.run(cmd, env=dict(os.environ, **sim.env), capture_output=True, text=True)
        try:
            xs.append(float(r.stdout.split()[2]))
        except (IndexError, ValueError):
            why = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-1]
            if "--random" in why:  # e.g. "no dataset with handle --random"
                why = f"this provenafs-getbench has no --random yet ({why})"
            log(f"direct random 4 KiB reads: {' '.join(cmd[:3])} failed: {why}")
            return {"iops": None, "random_error": why[-300:]}
    return {"iops": med(xs)}

def local_page_cache(data):
    p = f"{data}/10378.1/1/big.bin"
    sh(f"cat '{p}' > /dev/null")
    return med([BIG / timed(f"dd if='{p}' of=/dev/null bs=1M status=none") / MIB for _ in range(REPS)])

def cpu_times(pid):
    try:
        f = open(f"/proc/{pid}/stat").read().split(")")[-1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None

# ---- science reads (scripts/science.py) ----

def venv_python():
    """The venv's python, made or brought up to date from REQS."""
    py = os.path.join(VENV, "bin/python")
    stamp = os.path.join(VENV, ".bench-requirements.txt")
    want = open(REQS).read()
    if os.path.exists(py) and os.path.exists(stamp) and open(stamp).read() == want:
        return py
    if not os.path.exists(py):
        log(f"creating the science readers' venv {VENV}")
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    log(f"installing {os.path.relpath(REQS, ROOT)} into {VENV}")
    subprocess.run([py, "-m", "pip", "install", "-q", "-r", REQS], check=True)
    open(stamp, "w").write(want)
    return py

def sci_module():
    # science.py imports numpy & co. only inside its functions: its tables
    # are readable from this python.
    sys.path.insert(0, os.path.dirname(SCIENCE))
    import science
    return science

def sci_read(py, reader, path):
    """One reader in a fresh python: {seconds, result, rchar}."""
    r = subprocess.run([py, SCIENCE, "read", reader, path], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        why = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
        raise RuntimeError(f"{reader} on {path}: {why}")
    return json.loads(r.stdout.strip().splitlines()[-1])

SIM_KEYS = ("s3_get", "s3_get_bytes", "s3_head", "s3_list", "api_fetch", "api_credentials")

def download(sim, files, dest, parallel):
    """Download first: the dataset's `files` into dest (same relative
    paths) with provenafs-getbench --out, `parallel` 8 MiB parts each.
    Returns the transfer's seconds: for one file getbench's own time (from
    its first GET to the file written: its token, API calls and HEAD
    before that are left out, as they are for the mounts); for several
    (a series), one getbench per file, all started at once, each file's
    parts in parallel as for one file, and the time from the first of
    them to start its GETs to the last to finish (each one's start is its
    exit less its own time), so the API calls every getbench makes first,
    side by side, are left out in the same way."""
    for f in files:
        os.makedirs(os.path.dirname(f"{dest}/{f}"), exist_ok=True)
    if len(files) == 1:
        return getbench(sim, SCI_HANDLE, files[0], parallel, out=f"{dest}/{files[0]}")[1]
    env = dict(os.environ, **sim.env)
    procs = [subprocess.Popen([GETBENCH, SCI_HANDLE, f, str(parallel), "8", "--out", f"{dest}/{f}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for f in files]
    spans, errors = [], []
    pending = dict(zip(procs, files))
    deadline = time.perf_counter() + 900  # as a reader's (sci_read)
    while pending:  # polled, so that each exit is timed when it happens
        if time.perf_counter() > deadline:
            for p in pending:
                p.kill()
                p.wait()
            raise RuntimeError(f"getbench: {len(pending)} of {len(files)} files not downloaded in 900 s")
        for p in [p for p in pending if p.poll() is not None]:
            end, f = time.perf_counter(), pending.pop(p)
            out, err = p.communicate()
            if p.returncode != 0:
                errors.append(f"{f}: {(err.strip() or f'exit {p.returncode}').splitlines()[-1]}")
            else:
                spans.append((end - float(out.split()[1]), end))
        time.sleep(0.002)
    if errors:
        raise RuntimeError(f"getbench failed for {len(errors)} of {len(files)} files: {errors[0]}")
    return max(e for _, e in spans) - min(s for s, _ in spans)

def sim_delta(s0, s1):
    return {k: s1.get(k, 0) - s0.get(k, 0) for k in SIM_KEYS}

# Untimed wait after a read before the emulator's counters are read again:
# read-ahead the read set off is counted too (the emulator counts a GET's
# whole range when it is asked).
SETTLE = float(os.environ.get("BENCH_SETTLE_SECS", "0.5"))

def science(tools, sim, data, py, dl_parallel):
    """For each reader: a fresh mount of each tool per read (cold; for
    "provenafs recalled" after one untimed priming read, see
    ProvenafsRecalled), the whole file (a series: all its files) downloaded
    first, and the local file (page cache warm).
    Returns {reader: {way: {seconds, s3_get_bytes, s3_get, ..., rchar,
    ok, runs}}}."""
    sci = sci_module()
    fixtures = f"{data}/{SCI_HANDLE}"
    out = {}
    for reader, (fname, _) in sci.READERS.items():
        files = sci.reader_files(reader)
        log(f"science: {reader} ({fname}" + (f", {len(files)} files" if len(files) > 1 else "") + ")")
        row = out[reader] = {}
        local = f"{fixtures}/{fname}"
        # The folders the reader's files are in, listed before each timed
        # read with the dataset's own (below): a series' folder too.
        folders = sorted({os.path.dirname(f) for f in files} - {""})

        def record(way, runs):
            agg = {"runs": runs, "seconds": med([r["seconds"] for r in runs])}
            for k in SIM_KEYS + ("rchar", "download_seconds", "download_wall_seconds", "peak_rss_mib", "hinted",
                                 "buys", "waits"):
                if any(k in r for r in runs):
                    agg[k] = med([r.get(k) for r in runs])
            agg["result"] = runs[0]["result"]
            row[way] = agg

        # Local disk first: its result is the reference, its rchar what the
        # reader asks for.
        runs = []
        for _ in range(REPS):
            warm_science(data, files)
            runs.append(sci_read(py, reader, local))
        record("local disk", runs)
        ref = row["local disk"]["result"]

        def list_first(d):
            # The dataset's folder listed first, untimed: the read is timed
            # with the dataset's API calls (provenafs: token, fetch-dataset,
            # credentials) and the listing done, as the peers get their
            # credentials before they mount. A dataset's first file is issue
            # 14's time-to-first-byte row. A series' folder is listed too:
            # every row starts with the folder of its files listed (the
            # read's own glob lists it again, timed, from the tool's cache
            # when it keeps one).
            sh("ls -l " + " ".join(f"'{d}/{f}'" for f in [""] + folders) + " > /dev/null")

        def one_read(t):
            warm_science(data, files)
            d = t.mount(SCI_HANDLE)
            list_first(d)
            s0 = sim.stats()
            r = sci_read(py, reader, f"{d}/{fname}")
            time.sleep(SETTLE)
            r.update(sim_delta(s0, sim.stats()))
            r["peak_rss_mib"] = peak_rss_mib(t.pids)
            if isinstance(t, Provenafs):
                st = t.mount_stats(d)
                for k in ("hinted", "buys", "waits"):
                    if k in st:
                        r[k] = st[k]
                if not st:
                    log(f"science: {reader}: {t.name}: no stats line in the mount's log")
            pids = list(t.pids)
            t.umount_all()
            return r, pids

        for t in tools:
            runs = []
            try:
                prime = None
                if isinstance(t, ProvenafsRecalled):
                    # Another node read this version before: one untimed read
                    # of the same reader (a series: the same open_mfdataset)
                    # through a mount of its own, with the state folder the
                    # timed mounts then share; its cache folder goes with it.
                    # Its process gone, its read hints are written.
                    t.new_state()
                    prime, pids = one_read(t)
                    wait_exit(pids)
                    prime["hint_records"] = t.hint_records()
                    prime["ok"] = prime["result"] == ref
                    log(f"science: {reader}: {t.name}: primed in {fmt(prime['seconds'])} s, "
                        f"{prime['hint_records']} hint records")
                    if not prime["hint_records"]:
                        log(f"science: {reader}: {t.name}: the priming read left no read hints")
                for _ in range(REPS):
                    runs.append(one_read(t)[0])
                record(t.name, runs)
                if prime is not None:
                    row[t.name]["prime"] = prime
            except Exception as e:  # a peer failing must not lose the others' figures
                log(f"science: {reader} on {t.name} failed: {e}")
                row[t.name] = {"error": str(e)[-300:]}
            finally:
                t.umount_all()
                if isinstance(t, ProvenafsRecalled):
                    t.forget()

        # Download the whole file, or every file of a series (parallel
        # ranged GETs into local files, see download()), then read there:
        # time = the transfer time (API calls before the first GET left
        # out, as they are for the mounts) + the reader. The whole
        # download's time is kept in the JSON.
        runs = []
        tmp = tempfile.mkdtemp(prefix="bench-download-")
        try:
            for _ in range(REPS):
                warm_science(data, files)
                s0 = sim.stats()
                t0 = time.perf_counter()
                dl = download(sim, files, tmp, dl_parallel)
                wall = time.perf_counter() - t0
                r = sci_read(py, reader, f"{tmp}/{fname}")
                time.sleep(SETTLE)
                r.update(sim_delta(s0, sim.stats()))
                r["download_seconds"], r["download_wall_seconds"] = dl, wall
                r["seconds"] += dl
                if os.path.isdir(f"{tmp}/{fname}"):
                    shutil.rmtree(f"{tmp}/{fname}")
                else:
                    os.remove(f"{tmp}/{fname}")
                runs.append(r)
            record("download first", runs)
            row["download first"]["parallel"] = dl_parallel
        except Exception as e:
            log(f"science: {reader} download first failed: {e}")
            row["download first"] = {"error": str(e)[-300:]}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

        for way, v in row.items():
            if "runs" in v:
                v["ok"] = all(r["result"] == ref for r in v["runs"])
                if not v["ok"]:
                    log(f"science: {reader} on {way} read something else than the local file: "
                        f"{[r['result'] for r in v['runs']]} != {ref}")
    return out

def main():
    ap = argparse.ArgumentParser(description="Benchmark provenafs against rclone mount and s3fs "
                                 "on the same emulator (see scripts/bench.sh).")
    ap.add_argument("--profile", choices=list(PROFILES), default="loopback",
                    help="loopback: the emulator as fast as it goes; wan: " + " ".join(WAN_FLAGS))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (mounts)")
    bad = [g for g in ONLY if g not in GROUPS]
    if bad:
        sys.exit(f"bench: BENCH_ONLY: unknown group(s) {bad}; known: {', '.join(GROUPS)}")
    flags, _ = PROFILES[args.profile]
    if flags and not sim_has_flags(flags):
        sys.exit(f"bench: --profile {args.profile} needs `provenafs sim {' '.join(flags)}`, "
                 f"which {BIN} does not know yet (rebuild: cargo build --release --bins)")
    global OUT
    suffix = "" if args.profile == "loopback" else f"-{args.profile}"
    partial = set(ONLY) != set(GROUPS)
    # Only a full run (every group, every tool, full sizes) writes the
    # results kept in git; anything smaller goes to bench/out/.
    reduced = partial or SCALE != 1 or bool(os.environ.get("BENCH_TOOLS"))
    kept = {os.path.realpath(os.path.join(ROOT, f"bench/RESULTS{x}.md")) for x in ("",) + tuple(
        f"-{p}" for p in PROFILES if p != "loopback")}
    if OUT is None:
        OUT = (os.path.join(ROOT, "bench/out/RESULTS" + suffix + "".join(
                   [f"-{'-'.join(ONLY)}"] * partial + [f"-scale{SCALE}"] * (SCALE != 1)
                   + ["-some-tools"] * bool(os.environ.get("BENCH_TOOLS"))) + ".md") if reduced
               else os.path.join(ROOT, f"bench/RESULTS{suffix}.md"))
    elif reduced and os.path.realpath(OUT) in kept:
        sys.exit(f"bench: BENCH_OUT={OUT}: a partial, scaled or some-tools run does not write the results "
                 "kept in git (leave BENCH_OUT unset: it goes to bench/out/)")
    data = os.environ.get("BENCH_DATA", f"/tmp/provenafs-bench-data-{SCALE}")
    log(f"generating data in {data} (scale 1/{SCALE}; rows: {', '.join(ONLY)}; profile {args.profile})")
    py = None
    if "core" in ONLY:
        gen(data)
    if "science" in ONLY:
        try:
            py = venv_python()
            subprocess.run([py, SCIENCE, "gen", f"{data}/{SCI_HANDLE}", str(SCALE)], check=True,
                           stdout=subprocess.DEVNULL)
        except Exception as e:
            if ONLY != ["science"]:  # a full run keeps its other rows
                log(f"science rows skipped: {e}")
                py = None
            else:
                raise
    sim = Sim(data, flags)
    # Let the emulator hash every file (S3 ETags) before anything is timed.
    warm = Provenafs("warm-up", sim)
    sh(f"find '{warm.mount('10378.1/1' if 'core' in ONLY else SCI_HANDLE)}/..' -type f > /dev/null")
    warm.umount_all()
    time.sleep(float(os.environ.get("BENCH_WARM_SECS", str(max(2, 8 // SCALE)))))
    tools = [Provenafs("provenafs", sim)]
    if shutil.which("rclone"):
        tools += [Rclone("rclone full", sim, "full"), Rclone("rclone off", sim, "off")]
    if shutil.which("s3fs"):
        tools.append(S3fs("s3fs", sim))
    # The science rows also have provenafs where another node read the
    # version before (its read hints there): next to provenafs, science only.
    sci_tools = tools[:1] + [ProvenafsRecalled("provenafs recalled", sim)] + tools[1:]
    only_tools = os.environ.get("BENCH_TOOLS")  # e.g. "provenafs,rclone full": a quick look
    if only_tools:
        tools = [t for t in tools if t.name in only_tools.split(",")]
        sci_tools = [t for t in sci_tools if t.name in only_tools.split(",")]
    results = {"profile": args.profile, "sim_flags": flags, "groups": ONLY}
    try:
        if "core" in ONLY:
            results["direct GET"] = direct_get(sim, data)
            results["local file"] = {"warm": local_page_cache(data)}
            for t in tools:
                log(f"benchmarking {t.name}")
                cpu0 = cpu_times(sim.pid)
                try:
                    results[t.name] = bench_tool(t, data, sim)
                except Exception as e:  # a peer failing must not lose the others' figures
                    log(f"{t.name} failed: {e}")
                    results[t.name] = {}
                finally:
                    t.umount_all()
                cpu1 = cpu_times(sim.pid)
                if cpu0 is not None and cpu1 is not None:
                    results[t.name]["server_cpu_s"] = cpu1 - cpu0
        if py:
            # "Download first" at the direct GET column's best parallelism
            # when this run measured it.
            dl_parallel = results.get("direct GET", {}).get("parallel", 16)
            results["science"] = science(sci_tools, sim, data, py, dl_parallel)
            results["science_tools"] = [t.name for t in sci_tools]
            results["science_files"] = json.load(open(f"{data}/{SCI_HANDLE}/fixtures.json"))["sizes"]
            # The headline, as soon as it is known (the tables follow at the end).
            rows, medians = sci_ratios(results, results["science_tools"])
            r2 = lambda x: "n/a" if x is None else f"{x:.2f}"
            for r in rows:
                log(f"science: {r['reader']}: provenafs {fmt(r['provenafs'])} s, recalled {fmt(r['recalled'])} s, "
                    f"fastest other way {fmt(r['fastest'])} s ({r['fastest_way']}): {r2(r['ratio'])}, recalled "
                    f"{r2(r['ratio_recalled'])}")
            log(f"science: median of the ratios: provenafs {r2(medians['provenafs'])}, recalled "
                f"{r2(medians['provenafs recalled'])}")
    finally:
        sim.stop()
    write(results, [t.name for t in tools], args.profile)

ROWS = [
    ("cold", "1. direct / cold sequential read of {big} (MiB/s)", True),
    ("warm", "2. warm re-read (MiB/s; local page cache: {local})", True),
    ("iops", "3. random 4 KiB reads at queue depth 1 (IOPS; direct: ranged GETs one at a time)", True),
    ("rand_fetch_ratio", "3b. bytes fetched from S3 ÷ bytes read, random", False),
    ("par", "4. 8 parallel readers of 8 × {par} (MiB/s)", True),
    ("ls", "5. `ls -l` of {n} files (s)", False),
    ("ls_lists", "5b. LIST requests for that `ls -l`", False),
    ("ls_heads", "5c. HEAD requests for that `ls -l`", False),
    ("readall", "5d. read all {n} files (s)", False),
    ("ttfb_first", "6. time to first byte, a dataset's first file: API calls + S3 (ms)", False),
    ("ttfb_first_req", "6b. requests for 6", None),
    ("ttfb_listed", "6c. time to first byte, an unread file in an already-listed folder: S3 alone (ms)", False),
    ("ttfb_listed_req", "6d. requests for 6c", None),
    ("rss_seq", "7. peak RSS during 1, the cold {big} read (MiB)", False),
    ("rss_par", "7b. peak RSS during 4, 8 parallel readers (MiB)", False),
    ("server_cpu_s", "emulator CPU seconds during the tool's run", False),
]
# Rows with a direct GET figure (the column and the ratio to it).
DIRECT_KEYS = ("cold", "iops")

def fmt(x):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)

def fmt_req(d):
    """The requests of a time-to-first-byte row, zeros left out."""
    if not isinstance(d, dict):
        return "n/a"
    names = [("s3_get", "GET"), ("s3_list", "LIST"), ("s3_head", "HEAD"), ("api_fetch", "fetch-dataset"),
             ("api_credentials", "credentials"), ("tokens_issued", "token")]
    parts = [f"{fmt(d[k])} {n}" for k, n in names if d.get(k)]
    if d.get("s3_get") and d.get("s3_get_bytes") is not None:
        parts[0] += f" ({fmt(d['s3_get_bytes'] / MIB)} MiB)"
    return ", ".join(parts) or "none"

def core_table(res, names):
    peers = [n for n in names if n not in PROVENAFS_WAYS]
    cols = names + ["direct GET"]
    local = res.get("local file", {}).get("warm")
    hdr = "| figure | " + " | ".join(cols) + " | provenafs ÷ best peer | provenafs ÷ direct GET |"
    lines = [hdr, "|" + "---|" * (len(cols) + 3)]
    for key, label, higher in ROWS:
        label = label.format(big=f"{BIG // MIB} MiB", local=fmt(local), par=f"{PAR_SIZE // MIB} MiB", n=NFILES)
        vals = [res.get(n, {}).get(key) for n in names]
        if higher is None:  # requests: no ratios
            lines.append(f"| {label} | " + " | ".join(fmt_req(v) for v in vals) + " |  |  |  |")
            continue
        direct = res["direct GET"].get(key) if key in DIRECT_KEYS else None
        pv = res.get("provenafs", {}).get(key)
        pvals = [res.get(n, {}).get(key) for n in peers]
        pvals = [v for v in pvals if v is not None]
        best = (max(pvals) if higher else min(pvals)) if pvals else None
        r1 = f"{pv / best:.2f}" if pv is not None and best else "n/a"
        r2 = f"{pv / direct:.2f}" if pv is not None and direct else ("" if key != "warm" or not local else f"{pv / local:.2f} (÷ local)")
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(direct)} | {r1} | {r2} |")
    by = res["direct GET"].get("by_parallel", {})
    api_ms = sim_flag(res, "--api-latency-ms")
    lines += [""]
    if by:
        lines += ["- Direct GET (1): `provenafs-getbench` at the best of " + ", ".join(
            f"{p} ({fmt(v)} MiB/s)" for p, v in by.items()) + " parallel 8 MiB parts, timed from its first GET "
            "(its credentials obtained before). Every tool's cold read (1) and parallel readers (4) come after an "
            "untimed `ls` of the dataset's folder on the fresh mount, so provenafs's opening of the dataset (its "
            "API calls: row 6) is in neither, as the peers' credentials are not."]
    rnd = (f"`provenafs-getbench --random {RAND_SECS}`: one 4 KiB ranged GET at a time at random 4 KiB-aligned "
           f"offsets of the same file for {RAND_SECS} s, through the client provenafs uses")
    if res["direct GET"].get("random_error"):
        rnd += f" (not measured: {res['direct GET']['random_error']})"
    lines += [f"- Random 4 KiB reads (3): fio `--rw=randread --bs=4k --ioengine=psync` (queue depth 1) for "
              f"{RAND_SECS} s on the {BIG // MIB} MiB file of 1; the direct column is {rnd}."]
    lines += ["- Time to first byte (6, 6c): one fresh mount of dataset 10378.1/2 per repetition. 6 is `head -c1` of "
              "`part-0.bin` with nothing of the dataset touched before: for provenafs it includes the identity and "
              "data store API calls that open a dataset (access token, fetch-dataset, read credentials"
              + (f"; {fmt(api_ms)} ms each in this profile" if api_ms else "") + "), while the peers were handed "
              "their credentials before they mounted (those calls are neither timed nor counted), so the peers' 6 is "
              "S3 alone. 6c is `head -c1` of `part-1.bin` on the same mount after an untimed `ls` of the folder. "
              "Requests (6b, 6d): the emulator's counters (`/_sim/stats`) from before the read to "
              f"{SETTLE:g} s after it (read-ahead it set off included): S3 GETs (MiB asked), LISTs, HEADs, "
              "fetch-dataset and credentials calls, access tokens issued."]
    lines += ["- Peak RSS (7, 7b): the largest VmHWM of the tool's process (default settings), read right after the "
              "cold read of 1 on its fresh mount (so: mount, then that read) and after the 8 readers of 4."]
    return lines

def sim_flag(res, flag):
    """A numeric `sim` flag of this run's profile, or None."""
    f = res.get("sim_flags") or []
    try:
        return float(f[f.index(flag) + 1])
    except (ValueError, IndexError):
        return None

def targets_section(res, names):
    """Issue 14's targets, each with this run's measured ratio: WAN profile."""
    p = res.get("provenafs", {})
    peers = [n for n in names if n not in PROVENAFS_WAYS]
    fb, stream, api = (sim_flag(res, k) for k in ("--first-byte-ms", "--stream-mib-per-s", "--api-latency-ms"))
    rows = []
    def row(target, measured, ratio, ok):
        verdict = "n/a" if ok is None else ("met" if ok else "**missed**")
        rows.append(f"| {target} | {measured} | {ratio} | {verdict} |")
    def r2(x):
        return "n/a" if x is None else f"{x:.2f}"
    # Cold sequential.
    direct = res.get("direct GET", {})
    pv, dv = p.get("cold"), direct.get("cold")
    ratio = pv / dv if pv and dv else None
    row("1. cold sequential read of " + f"{BIG // MIB} MiB ≥ 0.85 × the best direct GET "
        f"(best of {'/'.join(map(str, DIRECT_PARALLEL))} parallel)",
        f"{fmt(pv)} MiB/s vs {fmt(dv)} MiB/s ({direct.get('parallel', '?')} parallel)",
        r2(ratio), None if ratio is None else ratio >= 0.85)
    # Time to first byte.
    def transfer_ms(case):
        b = (p.get(case + "_req") or {}).get("first_get_bytes")
        return b / MIB / stream * 1000 if b is not None and stream else None
    tb = transfer_ms("ttfb_listed")
    mb = p.get("ttfb_listed")
    if fb is not None and tb is not None and mb is not None:
        goal = 1.3 * fb + tb
        b_req = p["ttfb_listed_req"]
        row(f"6c. unread file in a listed folder ≤ 1.3 × first byte ({fmt(fb)} ms) + the first request's transfer "
            f"({fmt(b_req['first_get_bytes'] / MIB)} MiB at {fmt(stream)} MiB/s: {fmt(tb)} ms) = {fmt(goal)} ms",
            f"{fmt(mb)} ms; {fmt_req(b_req)}", r2(mb / goal), mb <= goal)
    else:
        row("6c. unread file in a listed folder ≤ 1.3 × first byte + the first request's transfer",
            f"{fmt(mb)} ms", "n/a", None)
    ta = transfer_ms("ttfb_first")
    ma = p.get("ttfb_first")
    if fb is not None and api is not None and ta is not None and ma is not None:
        goal = api + 1.3 * fb + ta
        a_req = p["ttfb_first_req"]
        row(f"6. a dataset's first file ≤ its API calls in parallel ({fmt(api)} ms) + one S3 round trip "
            f"(1.3 × {fmt(fb)} ms + {fmt(ta)} ms transfer) = {fmt(goal)} ms",
            f"{fmt(ma)} ms; {fmt_req(a_req)}", r2(ma / goal), ma <= goal)
    else:
        row("6. a dataset's first file ≤ its API calls in parallel + one S3 round trip", f"{fmt(ma)} ms", "n/a", None)
    # Science reads.
    sci = res.get("science") or {}
    if not sci:
        row("science reads ≥ 2× faster than every peer and than download-first; fetched ≤ 4× asked",
            "not measured in this run", "n/a", None)
    for reader, ways in sci.items():
        def get(way, key):
            v = ways.get(way, {})
            return v.get(key) if v.get("ok", True) and "error" not in v else None
        ps = get("provenafs", "seconds")
        others = {w: get(w, "seconds") for w in peers + ["download first"]}
        missing = [w for w, v in others.items() if v is None]
        others = {w: v for w, v in others.items() if v is not None}
        asked = get("local disk", "rchar")
        fetched = get("provenafs", "s3_get_bytes")
        if ps is None or not others:
            row(f"science, {reader}: ≥ 2× faster than every peer and download-first", f"provenafs {fmt(ps)} s",
                "n/a", None)
        else:
            fastest_w, fastest = min(others.items(), key=lambda kv: kv[1])
            speed = fastest / ps
            note = f"; {', '.join(missing)}: no figure" if missing else ""
            row(f"science, {reader}: ≥ 2× faster than every peer and download-first",
                f"{fmt(ps)} s vs {fmt(fastest)} s ({fastest_w}, the fastest of them){note}",
                f"{speed:.2f}×", speed >= 2)
        if fetched is None or not asked:
            row(f"science, {reader}: fetched ≤ 4× asked", "n/a", "n/a", None)
        else:
            ratio = fetched / asked
            row(f"science, {reader}: fetched ≤ 4× asked", f"{fmt(fetched / MIB)} MiB fetched, "
                f"{fmt(asked / MIB)} MiB asked", f"{ratio:.2f}", ratio <= 4)
    # Random 4 KiB at QD1.
    pv, dv = p.get("iops"), direct.get("iops")
    ratio = pv / dv if pv and dv else None
    why = f" ({direct['random_error']})" if direct.get("random_error") else ""
    row("3. random 4 KiB reads at queue depth 1 ≥ 0.9 × direct ranged GETs",
        f"{fmt(pv)} IOPS vs {fmt(dv)} IOPS{why}", r2(ratio), None if ratio is None else ratio >= 0.9)
    # Memory.
    for key, what in (("rss_seq", "7. peak RSS during the cold read"), ("rss_par", "7b. peak RSS, 8 parallel readers")):
        v = p.get(key)
        row(f"{what} ≤ 128 MiB (default settings)", f"{fmt(v)} MiB", r2(v / 128) if v else "n/a",
            None if v is None else v <= 128)
    return ["", "## Targets of issue 14 (this run)", "",
            "Each target with the figure measured in this run (ratio: provenafs's figure over the target's "
            "reference, or for the science reads the fastest other way's time over provenafs's). "
            "A \"one S3 round trip\" is, as the issue puts it, 1.3 × the first-byte delay plus the transfer of "
            "the first request: the bytes per GET the emulator had been asked for by the time the first byte "
            "arrived (the request's size) at the per-stream pace.", "",
            "| target | measured | ratio | |", "|---|---|---|---|"] + rows

SCI_LABELS = {
    "xarray": "xarray: one time step, a 50° × 90° lat/lon box (400 × 720 float32) of `ocean.nc`",
    "h5py": "h5py: a 600 × 600 slice of one layer of `grid.h5`",
    "pyarrow": "pyarrow: column `value` (float32, every row group) of `table.parquet`",
    "rasterio": "rasterio: an 800 × 600 window of `dem.tif` (COG)",
    "sqlite3": "sqlite3: `WHERE station = ?` through the index of `index.sqlite`",
    "xarray_mf": "xarray `open_mfdataset`: one point's hourly series (720 float32) across the 30 daily files "
                 "of `series/`",
}

def sci_ratios(res, names):
    """Per science row, the time of provenafs (a first reader ever) and of
    provenafs recalled (another node read the version before) over the
    fastest other way's (every peer and download first; never provenafs in
    any form; local disk is no way to get the data), and their bytes from
    S3 over what the reader asked them for (`rchar` of the reader in their
    own runs). Returns (rows, {"provenafs": median of its time ratios,
    "provenafs recalled": median of its}); a row's missing figure is None."""
    sci = res.get("science") or {}
    others = [n for n in names if n not in PROVENAFS_WAYS] + ["download first"]
    def get(ways, way, key):
        v = ways.get(way, {})
        return v.get(key) if v.get("ok", True) and "error" not in v else None
    div = lambda a, b: a / b if a is not None and b else None
    rows = []
    for reader, ways in sci.items():
        o = {w: get(ways, w, "seconds") for w in others}
        o = {w: v for w, v in o.items() if v is not None}
        fw = min(o, key=o.get) if o else None
        r = {"reader": reader, "fastest_way": fw, "fastest": o.get(fw),
             "missing": [w for w in others if w not in o]}
        for way, sfx in (("provenafs", ""), ("provenafs recalled", "_recalled")):
            pv = get(ways, way, "seconds")
            fetched, asked = get(ways, way, "s3_get_bytes"), get(ways, way, "rchar")
            r.update({("provenafs" if not sfx else "recalled"): pv, "ratio" + sfx: div(pv, o.get(fw)),
                      "fetched" + sfx: fetched, "asked" + sfx: asked, "fetch_ratio" + sfx: div(fetched, asked),
                      "gets" + sfx: get(ways, way, "s3_get"), "hinted" + sfx: get(ways, way, "hinted"),
                      "waits" + sfx: get(ways, way, "waits")})
        prime = ways.get("provenafs recalled", {}).get("prime") or {}
        r["prime_fetched"], r["prime_seconds"] = prime.get("s3_get_bytes"), prime.get("seconds")
        rows.append(r)
    return rows, {"provenafs": med([r["ratio"] for r in rows]),
                  "provenafs recalled": med([r["ratio_recalled"] for r in rows])}

def science_section(res, names):
    sci, sizes = res["science"], res.get("science_files", {})
    peers = [n for n in names if n not in PROVENAFS_WAYS]
    sm = sci_module()
    files = {reader: sm.reader_files(reader) for reader in sm.READERS}
    def label(reader):
        fs = files.get(reader, [])
        size = ""
        if fs and all(f in sizes for f in fs):
            total = sum(sizes[f] for f in fs) / 1e6
            size = f" ({total:.0f} MB)" if len(fs) == 1 else f" ({len(fs)} files, {total:.0f} MB)"
        return SCI_LABELS.get(reader, reader) + size
    def get(reader, way, key):
        v = sci.get(reader, {}).get(way, {})
        return v.get(key) if v.get("ok", True) else None
    def mark(reader, way):
        v = sci.get(reader, {}).get(way, {})
        return "" if v.get("ok", True) and "error" not in v else (" (failed)" if "error" in v else " (wrong result)")
    ways = names + ["download first", "local disk"]
    dl_par = next((v.get("parallel") for r in sci.values() for w, v in r.items() if w == "download first" and v.get("parallel")), None)
    lines = [
        "", "## Science reads", "",
        "One read a researcher does, in a fresh python process, timed from open to result (imports, and a first "
        "open of a tiny local file of the same format, come before the timer). Every mount is new for each read, "
        "its file's data cold; the dataset's folder is listed first, untimed, so the API calls that open a dataset "
        "(provenafs) are not in these times (the peers are handed their credentials before they mount). "
        f"\"Download first\" is `provenafs-getbench --out` ({dl_par or '?'} parallel 8 MiB GETs, timed from its "
        "first GET to the file written) into a local file, then the same read there (a series: one getbench per "
        "file, all at once, timed from the first GET of any to the last file written); the series' folder is "
        "listed, untimed, with the dataset's; \"local disk\" reads the "
        "fixture in the emulator's folder with its pages in memory. \"provenafs\" is a first reader ever: each "
        "mount has an empty cache folder and an empty state folder (so no read hints) of its own. \"provenafs "
        "recalled\" is a reader of a version another node read before: before its timed reads, one untimed read "
        "of the same reader (a series: the same `open_mfdataset`) through a mount of its own, whose state folder "
        "(its read hints: the ranges the version's readers asked for first) the timed mounts then share; every "
        "mount still has an empty cache folder of its own, so no data carries over. Files: `scripts/science.py`; "
        f"median of {REPS}.", "",
        "Seconds (lower is better):", "",
        "| read | " + " | ".join(ways) + " | provenafs ÷ fastest peer | provenafs ÷ download first |",
        "|" + "---|" * (len(ways) + 3),
    ]
    for reader in sci:
        vals = [get(reader, w, "seconds") for w in ways]
        pv = get(reader, "provenafs", "seconds")
        pvals = [v for v in (get(reader, n, "seconds") for n in peers) if v is not None]
        dl = get(reader, "download first", "seconds")
        r1 = f"{pv / min(pvals):.2f}" if pv is not None and pvals else "n/a"
        r2 = f"{pv / dl:.2f}" if pv is not None and dl else "n/a"
        lines.append(f"| {label(reader)} | " + " | ".join(fmt(v) + mark(reader, w) for w, v in zip(ways, vals))
                     + f" | {r1} | {r2} |")
    mib = lambda b: None if b is None else b / MIB
    fetch_ways = names + ["download first"]
    lines += [
        "", "Bytes asked of S3 for that read (MiB in GET ranges / GET requests; the emulator counts a GET's "
        "whole range when it is asked, so a tool that asks for more than it then reads is counted in full), "
        "and what the reader asked the file system for (`rchar` of `/proc/self/io` in the reader, local disk run):", "",
        "| read | reader asked (MiB) | " + " | ".join(fetch_ways) + " | provenafs ÷ asked | recalled ÷ asked | best peer ÷ asked |",
        "|" + "---|" * (len(fetch_ways) + 5),
    ]
    for reader in sci:
        asked = mib(get(reader, "local disk", "rchar"))
        cells = []
        for w in fetch_ways:
            b, n = get(reader, w, "s3_get_bytes"), get(reader, w, "s3_get")
            cells.append("n/a" + mark(reader, w) if b is None else f"{fmt(mib(b))} / {fmt(n)}")
        pb = mib(get(reader, "provenafs", "s3_get_bytes"))
        peer_b = [mib(get(reader, n, "s3_get_bytes")) for n in peers]
        peer_b = [b for b in peer_b if b is not None]
        rb = mib(get(reader, "provenafs recalled", "s3_get_bytes"))
        r1 = f"{pb / asked:.2f}" if pb is not None and asked else "n/a"
        r1b = f"{rb / asked:.2f}" if rb is not None and asked else "n/a"
        r2 = f"{min(peer_b) / asked:.2f}" if peer_b and asked else "n/a"
        lines.append(f"| {label(reader)} | {fmt(asked)} | " + " | ".join(cells) + f" | {r1} | {r1b} | {r2} |")
    rows, medians = sci_ratios(res, names)
    r2 = lambda x: "n/a" if x is None else f"{x:.2f}"
    lines += [
        "", "### provenafs against the fastest other way", "",
        "Per read, the time of provenafs (a first reader ever) and of provenafs recalled (another node read the "
        "version before) over the fastest of the other ways (rclone full, rclone off, s3fs and download first, "
        "whichever ran; below 1: provenafs is faster), and the bytes each asked of S3 over what the reader asked "
        "it for (`rchar` in that way's own runs; the emulator's counters as above). Recalled, hinted: blocks its "
        "mounts asked for at an open from read hints (the `stats:` line the mount logs on SIGUSR1), median of the "
        "timed reads; primed: what the untimed priming read fetched. Waits: the reader's reads that waited on a "
        "fetch started for them (a round trip neither read-ahead nor read hints had started: the links of a chain "
        "of dependent reads), median, the same stats line.", "",
        "| read | provenafs (s) | recalled (s) | fastest other way (s) | provenafs ÷ fastest other way "
        "| recalled ÷ fastest other way | provenafs from S3 (MiB / GETs) | recalled from S3 (MiB / GETs) "
        "| reader asked (MiB) | provenafs fetched ÷ asked | recalled fetched ÷ asked | recalled: hinted | "
        "primed from S3 (MiB) | provenafs: waits | recalled: waits |",
        "|" + "---|" * 15,
    ]
    for r in rows:
        fastest = "n/a" if r["fastest_way"] is None else f"{fmt(r['fastest'])} ({r['fastest_way']})"
        if r["missing"]:
            fastest += f"; no figure: {', '.join(r['missing'])}"
        lines.append(f"| {r['reader']} | {fmt(r['provenafs'])} | {fmt(r['recalled'])} | {fastest} | "
                     f"{r2(r['ratio'])} | {r2(r['ratio_recalled'])} | "
                     f"{fmt(mib(r['fetched']))} / {fmt(r['gets'])} | "
                     f"{fmt(mib(r['fetched_recalled']))} / {fmt(r['gets_recalled'])} | "
                     f"{fmt(mib(r['asked']))} | {r2(r['fetch_ratio'])} | {r2(r['fetch_ratio_recalled'])} | "
                     f"{fmt(r['hinted_recalled'])} | {fmt(mib(r['prime_fetched']))} | "
                     f"{fmt(r['waits'])} | {fmt(r['waits_recalled'])} |")
    for way, key in (("provenafs", "ratio"), ("provenafs recalled", "ratio_recalled")):
        n = sum(r[key] is not None for r in rows)
        lines += ["", f"**Median of the {n} ratios ({way} ÷ fastest other way): {r2(medians[way])}**"
                  + (f" ({len(rows) - n} of {len(rows)} rows without a ratio)" if n < len(rows) else "")]
    return lines

def write(res, names, profile="loopback"):
    cpu = platform.processor() or platform.machine()
    where = PROFILES[profile][1]
    body = core_table(res, names) if "direct GET" in res else []
    if res.get("science"):
        body += science_section(res, res.get("science_tools", names))
    if profile == "wan":
        body += targets_section(res, names)
    text = "\n".join([
        "# Benchmark results" + ("" if profile == "loopback" else f" ({profile} profile)"), "",
        f"Run {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
        f"({os.cpu_count()} cores, {cpu}, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
        f"kernel {platform.release()}), scale 1/{SCALE}, median of {REPS}.",
        f"Every tool reads from the same emulator (`provenafs sim`) {where}; the emulator competes for the same {os.cpu_count()} cores.",
        "Higher is better for MiB/s and IOPS; lower is better for seconds, ms, MiB and request counts.", "",
    ] + body + [""])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    prev = open(OUT).read() if os.path.exists(OUT) else ""
    marker = "\n## Notes"
    notes = prev[prev.index(marker):] if marker in prev else ""
    open(OUT, "w").write(text + notes)
    print(text)
    json.dump(res, open(OUT.replace(".md", ".json"), "w"), indent=1)

if __name__ == "__main__":
    main()
