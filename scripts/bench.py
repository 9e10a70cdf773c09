#!/usr/bin/env python3
"""Benchmark driver behind scripts/bench.sh. See that file for usage."""
import json, os, platform, shutil, statistics, subprocess, sys, tempfile, time, datetime, math

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINDIR = os.environ.get("PROVENAFS_BINDIR", os.path.join(ROOT, "target/release"))
BIN = os.path.join(BINDIR, "provenafs")
GETBENCH = os.path.join(BINDIR, "provenafs-getbench")
SCALE = int(os.environ.get("BENCH_SCALE", "1"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "bench/RESULTS.md"))
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
    sh(f"cat {data}/10378.1/1/big.bin {data}/10378.1/2/* > /dev/null")
    sh(f"find {data}/10378.1/3 -type f -exec cat {{}} + > /dev/null")

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

class Sim:
    def __init__(self, data):
        self.envfile = tempfile.mktemp(suffix=".env")
        self.p = subprocess.Popen([BIN, "sim", "--root", data, "--env-file", self.envfile,
                                   "--credentials-ttl", "86400", "--access-token-ttl", "3600",
                                   "--log-level", "error"], stdout=subprocess.DEVNULL)
        for _ in range(200):
            if os.path.exists(self.envfile):
                break
            time.sleep(0.05)
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
    def mount(self, handle):
        m = self.new_mountpoint()
        env = dict(os.environ, **self.sim.env)
        subprocess.run([BIN, "mount", m], env=env, check=True)
        pid = sh(f"pgrep -f 'provenafs mount {m} --foreground'").stdout.split()[0]
        self.pids.append(int(pid))
        return f"{m}/{handle}"

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
        pid = sh(f"pgrep -f 'rclone mount .* {m}'").stdout.split()
        self.pids += [int(p) for p in pid[:1]]
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
        pid = sh(f"pgrep -f 's3fs provena-bucket:/{dashed(handle)} {m}'", check=False).stdout.split()
        self.pids += [int(p) for p in pid[:1]]
        return m

def peak_rss_mib(pids):
    best = 0
    for p in pids:
        try:
            for l in open(f"/proc/{p}/status"):
                if l.startswith("VmHWM:"):
                    best = max(best, int(l.split()[1]) // 1024)
        except OSError:
            pass
    return best

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def bench_tool(t, data, sim):
    r = {}
    mbps = lambda b, s: b / s / MIB
    cold, warm, rss2, ttfb = [], [], [], []
    for _ in range(REPS):
        drop_caches(data)
        d = t.mount("10378.1/2")
        ttfb.append(timed(f"head -c1 '{d}/part-0.bin' > /dev/null") * 1000)
        t.umount_all()
        drop_caches(data)
        d = t.mount("10378.1/1")
        cold.append(mbps(BIG, timed(f"dd if='{d}/big.bin' of=/dev/null bs=1M status=none")))
        warm.append(mbps(BIG, timed(f"dd if='{d}/big.bin' of=/dev/null bs=1M status=none")))
        rss2.append(peak_rss_mib(t.pids))
        t.umount_all()
    r["cold"], r["warm"], r["rss_seq"], r["ttfb"] = med(cold), med(warm), med(rss2), med(ttfb)
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

def direct_get(sim, data):
    xs = []
    env = dict(os.environ, **sim.env)
    for _ in range(REPS):
        drop_caches(data)
        out = subprocess.run([GETBENCH, "10378.1/1", "big.bin", "8", "8"], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        xs.append(float(out[2]))
    return med(xs)

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

def main():
    if os.geteuid() != 0:
        sys.exit("bench: run as root (mounts)")
    data = os.environ.get("BENCH_DATA", f"/tmp/provenafs-bench-data-{SCALE}")
    log(f"generating data in {data} (scale 1/{SCALE})")
    gen(data)
    sim = Sim(data)
    # Let the emulator hash every file (S3 ETags) before anything is timed.
    warm = Provenafs("warm-up", sim)
    sh(f"find '{warm.mount('10378.1/1')}/..' -type f > /dev/null")
    warm.umount_all()
    time.sleep(float(os.environ.get("BENCH_WARM_SECS", str(max(2, 8 // SCALE)))))
    tools = [Provenafs("provenafs", sim)]
    if shutil.which("rclone"):
        tools += [Rclone("rclone full", sim, "full"), Rclone("rclone off", sim, "off")]
    if shutil.which("s3fs"):
        tools.append(S3fs("s3fs", sim))
    results = {}
    try:
        results["direct GET"] = {"cold": direct_get(sim, data)}
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
    finally:
        sim.stop()
    write(results, [t.name for t in tools])

ROWS = [
    ("cold", "1. direct / cold sequential read of {big} (MiB/s)", True),
    ("warm", "2. warm re-read (MiB/s; local page cache: {local})", True),
    ("iops", "3. random 4 KiB reads (IOPS)", True),
    ("rand_fetch_ratio", "3b. bytes fetched from S3 ÷ bytes read, random", False),
    ("par", "4. 8 parallel readers of 8 × {par} (MiB/s)", True),
    ("ls", "5. `ls -l` of {n} files (s)", False),
    ("ls_lists", "5b. LIST requests for that `ls -l`", False),
    ("ls_heads", "5c. HEAD requests for that `ls -l`", False),
    ("readall", "5d. read all {n} files (s)", False),
    ("ttfb", "6. time to first byte (ms)", False),
    ("rss_seq", "7. peak RSS during 2 (MiB)", False),
    ("rss_par", "7b. peak RSS during 4 (MiB)", False),
    ("server_cpu_s", "emulator CPU seconds during the tool's run", False),
]

def fmt(x):
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)

def write(res, names):
    peers = [n for n in names if n != "provenafs"]
    cols = names + ["direct GET"]
    local = res.get("local file", {}).get("warm")
    hdr = "| figure | " + " | ".join(cols) + " | provenafs ÷ best peer | provenafs ÷ direct GET |"
    lines = [hdr, "|" + "---|" * (len(cols) + 3)]
    for key, label, higher in ROWS:
        label = label.format(big=f"{BIG // MIB} MiB", local=fmt(local), par=f"{PAR_SIZE // MIB} MiB", n=NFILES)
        vals = [res.get(n, {}).get(key) for n in names]
        direct = res["direct GET"].get(key) if key == "cold" else None
        pv = res.get("provenafs", {}).get(key)
        pvals = [res.get(n, {}).get(key) for n in peers]
        pvals = [v for v in pvals if v is not None]
        best = (max(pvals) if higher else min(pvals)) if pvals else None
        r1 = f"{pv / best:.2f}" if pv is not None and best else "n/a"
        r2 = f"{pv / direct:.2f}" if pv is not None and direct else ("" if key != "warm" or not local else f"{pv / local:.2f} (÷ local)")
        lines.append(f"| {label} | " + " | ".join(fmt(v) for v in vals) + f" | {fmt(direct)} | {r1} | {r2} |")
    cpu = platform.processor() or platform.machine()
    text = "\n".join([
        "# Benchmark results", "",
        f"Run {datetime.datetime.now().isoformat(timespec='seconds')} on {platform.node()} "
        f"({os.cpu_count()} cores, {cpu}, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, "
        f"kernel {platform.release()}), scale 1/{SCALE}, median of {REPS}.",
        "Every tool reads from the same emulator (`provenafs sim`) on loopback; the emulator competes for the same 2 cores.",
        "Higher is better for MiB/s and IOPS; lower is better for seconds, ms, MiB and request counts.", "",
    ] + lines + [""])
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    prev = open(OUT).read() if os.path.exists(OUT) else ""
    marker = "\n## Notes"
    notes = prev[prev.index(marker):] if marker in prev else ""
    open(OUT, "w").write(text + notes)
    print(text)
    json.dump(res, open(OUT.replace(".md", ".json"), "w"), indent=1)

if __name__ == "__main__":
    main()
