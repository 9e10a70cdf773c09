//! What each user operation costs in requests, counted by the emulator: the
//! CI guard of the read path and listings (sizes scaled down from the
//! benchmark; the request counts, not the times, are asserted).

mod common;

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use common::*;

const MIB: usize = 1 << 20;

fn data() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/big.bin", &bytes(11, 64 * MIB));
    for i in 0..2000 {
        write(
            d.path(),
            &format!("10378.1/2/many/f{i:04}.txt"),
            format!("file {i}\n").as_bytes(),
        );
    }
    d
}

struct Delta<'a> {
    sim: &'a Sim,
    before: serde_json::Value,
}

impl<'a> Delta<'a> {
    fn new(sim: &'a Sim) -> Self {
        Self {
            sim,
            before: sim.stats(),
        }
    }
    fn get(&self, k: &str) -> u64 {
        self.sim.stats()[k].as_u64().unwrap() - self.before[k].as_u64().unwrap()
    }
}

#[test]
fn sequential_read_uses_few_large_gets_and_rereads_none() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let m = sim.mount(&[]);
    let f = m.join("10378.1/1/big.bin");
    std::fs::metadata(&f).unwrap();
    let d = Delta::new(&sim);
    assert_eq!(sha256(&f), sha256(&sim.root().join("10378.1/1/big.bin")));
    let (gets, bytes) = (d.get("s3_get"), d.get("s3_get_bytes"));
    eprintln!("64 MiB sequential: {gets} GETs, {bytes} bytes");
    // The run's first 16 MiB as read (a block a GET: a short run is not
    // worth read-ahead), the rest in 4 MiB parts: 28. On a loaded machine
    // the kernel loses a few pages of a completed read (see the re-read
    // below) and asks for each again, a small GET each (34 GETs, 70 MiB
    // seen in a full suite run): the bytes bound below is the property.
    // On loopback the first 16 MiB's waits soon reach the price of the
    // rest (issue 22's rent or buy): the rest then comes in 2 MiB parts.
    assert!(gets <= 48, "{gets} GETs for 64 MiB");
    assert!(
        bytes <= (64 * MIB) as u64 * 11 / 10,
        "{bytes} bytes fetched"
    );
    // Second read: the kernel page cache, kept across opens. All of it
    // but what the kernel itself lost: under CPU load, the kernel (6.18
    // here) leaves a few scattered 4 KiB pages of a completed 1 MiB FUSE
    // read out of the page cache, with no reclaim (`pgsteal` unchanged;
    // `fincore` counts 16,380 of 16,384 pages). Each comes back as a
    // single-page read, its own small GET (beside its block's GET at
    // most). Counted here, so only those may cost a request.
    let lost = (64 * MIB / 4096) as u64 - resident_pages(&f);
    let d = Delta::new(&sim);
    assert_eq!(sha256(&f), sha256(&sim.root().join("10378.1/1/big.bin")));
    let (gets, bytes) = (d.get("s3_get"), d.get("s3_get_bytes"));
    assert!(
        gets <= 2 * lost && bytes <= lost * (MIB as u64 + 4096),
        "warm re-read: {gets} GETs, {bytes} bytes for {lost} pages the kernel lost"
    );
}

/// How many of `f`'s pages the kernel's page cache holds (util-linux
/// `fincore`).
fn resident_pages(f: &std::path::Path) -> u64 {
    let out = std::process::Command::new("fincore")
        .args(["--raw", "--noheadings", "--output", "PAGES"])
        .arg(f)
        .output()
        .expect("fincore (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("fincore said {text:?}"))
}

#[test]
fn random_small_reads_fetch_at_most_twice_what_they_ask() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let m = sim.mount(&[]);
    let want = std::fs::read(sim.root().join("10378.1/1/big.bin")).unwrap();
    let file = std::fs::File::open(m.join("10378.1/1/big.bin")).unwrap();
    // As fio does for random workloads: tell the kernel not to read ahead.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    let d = Delta::new(&sim);
    let mut x = 0x9e3779b97f4a7c15u64;
    let mut asked = 0u64;
    let mut buf = [0u8; 4096];
    for _ in 0..1000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (64 * MIB as u64 - 4096)) / 4096 * 4096;
        file.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(&buf[..], &want[off as usize..off as usize + 4096]);
        asked += 4096;
    }
    let fetched = d.get("s3_get_bytes");
    let bought = m.stats().get("buys") == Some(&1);
    eprintln!(
        "random 4 KiB: asked {asked}, fetched {fetched}, {} GETs, bought: {bought}",
        d.get("s3_get")
    );
    // Issue 22's rule: reads whose waits reach the price of the rest of
    // the file (on loopback, soon) buy it, once: at most its size and
    // what was asked before; until then at most twice what is asked.
    let bound = if bought {
        64 * MIB as u64 + asked
    } else {
        2 * asked
    };
    assert!(fetched <= bound, "fetched {fetched} for {asked} asked");
}

#[test]
fn listing_a_big_folder_costs_pages_not_heads() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let m = sim.mount(&[]);
    let d = Delta::new(&sim);
    let out = sh(&format!(
        "ls -l '{}' | wc -l",
        m.join("10378.1/2/many").display()
    ));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2001");
    let (lists, heads) = (d.get("s3_list"), d.get("s3_head"));
    eprintln!("ls -l of 2000 files: {lists} LIST, {heads} HEAD");
    // The dataset folder's lookup (1) + ceil(2000/1000) pages.
    assert!(lists <= 3, "{lists} LISTs");
    assert_eq!(heads, 0, "ls -l makes no HEAD");
    // Within the TTL: a second ls and a lookup in the listed folder are free.
    let d = Delta::new(&sim);
    sh(&format!(
        "ls -l '{}' > /dev/null",
        m.join("10378.1/2/many").display()
    ));
    assert_eq!(
        std::fs::read(m.join("10378.1/2/many/f0042.txt")).unwrap(),
        b"file 42\n"
    );
    assert!(std::fs::metadata(m.join("10378.1/2/many/.git")).is_err());
    assert_eq!((d.get("s3_list"), d.get("s3_head")), (0, 0));
    assert_eq!(d.get("s3_get"), 1, "one GET to read one small file");
}

#[test]
fn many_open_files_stay_within_the_memory_budget() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    for i in 0..24 {
        write(d.path(), &format!("10378.1/3/f{i}"), &bytes(i, 4 * MIB));
    }
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&["--memory-cache-size", "32MiB", "--max-memory", "16MiB"]);
    // 24 files open at once, each read a little, then all read to the end.
    let files: Vec<_> = (0..24)
        .map(|i| std::fs::File::open(m.join(&format!("10378.1/3/f{i}"))).unwrap())
        .collect();
    let mut buf = vec![0u8; 256 * 1024];
    for (i, f) in files.iter().enumerate() {
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf[..], &bytes(i as u64, 4 * MIB)[..256 * 1024]);
    }
    std::thread::scope(|s| {
        for (i, f) in files.iter().enumerate() {
            s.spawn(move || {
                let want = bytes(i as u64, 4 * MIB);
                let mut got = vec![0u8; 4 * MIB];
                f.read_exact_at(&mut got, 0).unwrap();
                assert!(got == want, "file {i} differs");
            });
        }
    });
}

#[test]
fn disk_cache_serves_a_remount_without_gets() {
    if !fuse_available() {
        return;
    }
    let sim = Sim::start(data(), &[]);
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join("blocks");
    // Blocks, not a whole file handed to the kernel: a whole file is not
    // checked at each read (it is kept only where no one else may write;
    // see SEMANTICS.md), and this checks the blocks' checks.
    let flags = [
        "--cache-dir",
        dir.to_str().unwrap(),
        "--cache-size",
        "1GiB",
        "--no-passthrough",
    ];
    let want = sha256(&sim.root().join("10378.1/1/big.bin"));
    {
        let m = sim.mount(&flags);
        assert_eq!(sha256(&m.join("10378.1/1/big.bin")), want);
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("v1"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "cache folder private");
    // Blocks are written in the background; give them a moment.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let m = sim.mount(&flags);
    let d = Delta::new(&sim);
    assert_eq!(sha256(&m.join("10378.1/1/big.bin")), want);
    assert_eq!(
        d.get("s3_get"),
        0,
        "a remount reads every block from the disk cache"
    );
    // A corrupted block is a miss, never wrong bytes.
    let mut n = 0;
    for sub in std::fs::read_dir(dir.join("v1")).unwrap().flatten() {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let mut raw = std::fs::read(f.path()).unwrap();
            let last = raw.len() - 1;
            raw[last] ^= 0xff;
            std::fs::write(f.path(), raw).unwrap();
            n += 1;
        }
    }
    assert!(n >= 64);
    drop(m);
    let m = sim.mount(&flags);
    assert_eq!(sha256(&m.join("10378.1/1/big.bin")), want);
}

#[test]
fn a_handle_that_does_not_exist_costs_no_credentials_call() {
    if !fuse_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "10378.1/1/f.txt", b"x\n");
    write(d.path(), "10378.1/2/g.txt", b"y\n");
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&[]);
    let delta = Delta::new(&sim);
    // A script probing handles, a typo: each asks for the record, never
    // for read credentials (a service token and an STS call each on the
    // real service).
    for i in 0..20 {
        assert!(std::fs::metadata(m.join(&format!("10378.1/{}", 5_000_000 + i))).is_err());
    }
    assert_eq!(delta.get("api_fetch"), 20);
    assert_eq!(delta.get("api_credentials"), 0);
    // A dataset reached by its path that exists: its credentials come once
    // its record says so, and its first file reads.
    assert_eq!(std::fs::read(m.join("10378.1/2/g.txt")).unwrap(), b"y\n");
    assert_eq!(delta.get("api_credentials"), 1);
}
