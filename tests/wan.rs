//! Issue 14's regression check: reads through a mount of the emulator's
//! WAN profile (scaled down), checked on the requests they cost and the
//! bytes they fetch, never on time (CI machines are shared and noisy). The
//! read patterns are the ones researchers' readers make: a copy, a
//! netCDF-4 open and slice (one 4 MiB read at the start, scattered small
//! metadata reads, runs of adjacent compressed chunks), an indexed sqlite
//! query (random 4 KiB pages), and the first byte of a file.

mod common;

use std::os::unix::fs::FileExt;

use common::*;

const MIB: usize = 1 << 20;

fn wan_sim(files: &[(&str, usize)]) -> Sim {
    let d = tempfile::tempdir().unwrap();
    for (i, (rel, len)) in files.iter().enumerate() {
        write(d.path(), rel, &bytes(i as u64 + 1, *len));
    }
    Sim::start(d, WAN)
}

#[test]
fn a_cold_copy_fetches_the_file_once_in_part_sized_gets() {
    if !fuse_available() {
        return;
    }
    let size = 64 * MIB;
    let sim = wan_sim(&[("10378.1/1/big.bin", size)]);
    let m = sim.mount(&[]);
    let want = sha256(&sim.root().join("10378.1/1/big.bin"));
    // Listed first: the copy's requests only.
    std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
    let (bytes0, gets0) = (sim.stat("s3_get_bytes"), sim.stat("s3_get"));
    assert_eq!(sha256(&m.join("10378.1/1/big.bin")), want);
    let fetched = sim.stat("s3_get_bytes") - bytes0;
    let gets = sim.stat("s3_get") - gets0;
    eprintln!("cold copy of 64 MiB: {fetched} bytes in {gets} GETs");
    assert!(fetched as f64 <= 1.02 * size as f64, "{fetched} bytes");
    // 4 MiB parts once the window is open, a few smaller ones on the ramp
    // (the first blocks, before the run is seen, in parts side by side:
    // see `Pace::parts`); or, once the ramp's waits reach the price of the
    // rest (rent or buy), the rest in 2 MiB parts.
    assert!(gets <= 48, "{gets} GETs");
}

#[test]
fn a_netcdf_like_open_and_slice_fetches_at_most_four_times_what_it_reads() {
    if !fuse_available() {
        return;
    }
    let size = 64 * MIB;
    let sim = wan_sim(&[("10378.1/1/ocean.nc", size)]);
    // Without a disk cache a 64 MiB file is never bought (a buy is bounded
    // by the 48 MiB memory budget): what is checked here is the reads'
    // own cost, on every machine (CI's, whose disk may be below the
    // free-space floor, never buys; this one, with room, buys at once).
    let m = sim.mount(&["--no-disk-cache"]);
    std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
    let f = std::fs::File::open(m.join("10378.1/1/ocean.nc")).unwrap();
    let bytes0 = sim.stat("s3_get_bytes");
    let mut asked = 0usize;
    let mut read = |off: usize, len: usize| {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off as u64).unwrap();
        asked += len;
    };
    // netCDF-C's format check: the first 4 MiB in one read.
    read(0, 4 * MIB);
    // Metadata: object headers and B-tree nodes, small and scattered.
    for i in 0..16 {
        read(9 * MIB + i * 2_900_000, 3_000);
    }
    // Two runs of three adjacent compressed chunks (~175 KB each).
    for start in [30 * MIB, 47 * MIB] {
        for c in 0..3 {
            read(start + c * 175_000, 175_000);
        }
    }
    let fetched = sim.stat("s3_get_bytes") - bytes0;
    let bought = m.stats().get("buys") == Some(&1);
    eprintln!(
        "netCDF-like slice: asked {asked}, fetched {fetched} ({:.1}×), bought: {bought}",
        fetched as f64 / asked as f64
    );
    // Issue 22's bound on reads that end before buying: at most 4x what
    // was asked. The 4 MiB first read's read-ahead (the kernel's, 1 MiB
    // requests answered out of order) and the scattered metadata reads
    // after it are not a walk to follow: following them fetched 8 MiB
    // nobody read (4.0x, a CI failure).
    // Without that, it costs 2.3x here: held to 3x, so a misfire shows.
    assert!(!bought, "bought without a disk cache");
    assert!(
        fetched <= 3 * asked as u64,
        "fetched {fetched} bytes for {asked} asked"
    );
}

#[test]
fn random_pages_cost_one_small_get_each() {
    if !fuse_available() {
        return;
    }
    let size = 32 * MIB;
    let sim = wan_sim(&[("10378.1/1/index.sqlite", size)]);
    let m = sim.mount(&[]);
    std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
    let f = std::fs::File::open(m.join("10378.1/1/index.sqlite")).unwrap();
    // The header page first, as sqlite reads it.
    let mut page = [0u8; 4096];
    f.read_exact_at(&mut page, 0).unwrap();
    let (bytes0, gets0) = (sim.stat("s3_get_bytes"), sim.stat("s3_get"));
    // Pages spread over the file, none adjacent (a seeded shuffle).
    let pages = size / 4096;
    let mut p = 12345usize;
    let mut n = 0;
    for _ in 0..60 {
        p = (p * 7919 + 104_729) % pages;
        if p < 256 {
            continue; // in the header's block, already fetched
        }
        f.read_exact_at(&mut page, (p * 4096) as u64).unwrap();
        n += 1;
    }
    let fetched = sim.stat("s3_get_bytes") - bytes0;
    let gets = sim.stat("s3_get") - gets0;
    let bought = m.stats().get("buys") == Some(&1);
    eprintln!("{n} random pages: {gets} GETs, {fetched} bytes, bought: {bought}");
    if bought {
        // Their rent reached the file's price (a few round trips against
        // one and 32 MiB at the link's pace): the rest came in 2 MiB parts,
        // once.
        assert!(gets <= (n + size / (2 * MIB)) as u64, "{gets} GETs");
        assert!(fetched <= (size + n * 4 * 4096) as u64, "{fetched} bytes");
    } else {
        assert!(gets <= n as u64, "{gets} GETs for {n} pages");
        // The kernel may read a page or so around each (its own read-ahead).
        assert!(fetched <= (n * 4 * 4096) as u64, "{fetched} bytes");
    }
}

#[test]
fn a_first_byte_costs_one_get_and_a_datasets_first_file_its_api_calls_once() {
    if !fuse_available() {
        return;
    }
    let sim = wan_sim(&[("10378.1/1/a.bin", 8 * MIB), ("10378.1/1/b.bin", 8 * MIB)]);
    let m = sim.mount(&[]);
    let counts = |sim: &Sim| {
        [
            "s3_get",
            "s3_list",
            "s3_head",
            "api_fetch",
            "api_credentials",
            "s3_get_bytes",
        ]
        .map(|k| sim.stat(k))
    };
    let first_byte = |rel: &str| {
        let mut b = [0u8; 1];
        std::fs::File::open(m.join(rel))
            .unwrap()
            .read_exact_at(&mut b, 0)
            .unwrap();
        // And what the read set off (the first block, for the reads after).
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    // A dataset's first file, by its path: its record and its read
    // credentials (asked together), then its folder's listing and a GET of
    // the file's first 128 KiB side by side (the first read is answered
    // from those), and the first block's GET for the reads after.
    let c0 = counts(&sim);
    first_byte("10378.1/1/a.bin");
    let c1 = counts(&sim);
    let d: Vec<u64> = c1.iter().zip(c0).map(|(a, b)| a - b).collect();
    eprintln!("dataset's first file: [get, list, head, fetch, credentials] = {d:?}");
    // (On a loaded machine the guess may come after the lookup stopped
    // waiting for it, 10 ms past its LIST: then the first read sends its
    // own small GET, as in a listed folder below. Never more.)
    assert!(
        (2..=3).contains(&d[0]),
        "the first bytes' GET and the block's: {d:?}"
    );
    assert!(d[5] <= (MIB + 256 * 1024) as u64, "{} bytes", d[5]);
    assert!(d[1] <= 1 && d[2] == 0, "at most one listing, no HEAD");
    assert_eq!((d[3], d[4]), (1, 1), "one record, one credentials call");
    // An unread file of a listed folder: a GET of the bytes the kernel
    // asked and their block, side by side (the first byte costs one round
    // trip, not the block's transfer too), nothing else. Over a link this
    // slow the block comes in parts side by side (see `Pace::parts`).
    std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
    let c0 = counts(&sim);
    first_byte("10378.1/1/b.bin");
    let c1 = counts(&sim);
    let d: Vec<u64> = c1.iter().zip(c0).map(|(a, b)| a - b).collect();
    eprintln!("unread file in a listed folder: {d:?}");
    assert!((2..=5).contains(&d[0]), "{d:?}");
    assert_eq!(d[1..5], [0, 0, 0, 0]);
    assert!(d[5] <= (MIB + 128 * 1024) as u64, "{} bytes", d[5]);
}

#[test]
fn reading_every_file_of_a_large_folder_past_the_ttl_lists_it_again_not_per_name() {
    if !fuse_available() {
        return;
    }
    // 2,500 files: a listing is 3 LIST pages. No WAN pacing: the count is
    // what matters, and every name must be looked up after the TTL.
    let d = tempfile::tempdir().unwrap();
    let n = 2500;
    for i in 0..n {
        write(d.path(), &format!("10378.1/1/f{i:04}"), b"x");
    }
    let sim = Sim::start(d, &[]);
    let m = sim.mount(&["--metadata-ttl", "1"]);
    let dir = m.join("10378.1/1");
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), n);
    // The listing (and the kernel's entries) expire before the reads.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let lists0 = sim.stat("s3_list");
    let t = std::time::Instant::now();
    for name in &names {
        let got = std::fs::read(dir.join(name));
        assert_eq!(got.as_deref().ok(), Some(&b"x"[..]), "{name:?}: {got:?}");
    }
    let secs = t.elapsed().as_secs_f64();
    let lists = sim.stat("s3_list") - lists0;
    eprintln!("{n} files read past the TTL in {secs:.1} s: {lists} LISTs");
    // Per TTL window at most as many probes as a listing's pages, then the
    // listing (3 + 3); one probe per name made 2,500.
    let windows = secs.ceil() as u64 + 1;
    assert!(
        lists <= 6 * windows,
        "{lists} LISTs in {windows} TTL windows"
    );
}

/// Issue 22's rule, at test scale: reads at scattered offsets, one after
/// the other (each waits for the one before, as sqlite's B-tree walk
/// does); returns the bytes asked.
fn dependent_reads(f: &std::fs::File, offsets: impl IntoIterator<Item = usize>, len: usize) -> u64 {
    let mut buf = vec![0u8; len];
    let mut asked = 0;
    for off in offsets {
        f.read_exact_at(&mut buf, off as u64).unwrap();
        asked += len as u64;
    }
    asked
}

#[test]
fn a_small_file_read_by_dependent_seeks_is_bought_once_and_a_large_one_never() {
    if !fuse_available() {
        return;
    }
    let (small, large) = (8 * MIB, 384 * MIB);
    let sim = wan_sim(&[
        ("10378.1/1/index.sqlite", small),
        ("10378.1/1/big.h5", large),
    ]);
    let m = sim.mount(&[]);
    std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
    // The small file: its rent (a few round trips) soon reaches its price
    // (one round trip and 8 MiB over parallel GETs): bought, once.
    let want = sha256(&sim.root().join("10378.1/1/index.sqlite"));
    let f = std::fs::File::open(m.join("10378.1/1/index.sqlite")).unwrap();
    let bytes0 = sim.stat("s3_get_bytes");
    let asked = dependent_reads(&f, (0..24).map(|i| (i * 2_654_435) % (small - 4096)), 4096);
    // Let the buy end, then every byte is here: a full read fetches none.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(sha256(&m.join("10378.1/1/index.sqlite")), want);
    let fetched = sim.stat("s3_get_bytes") - bytes0;
    let stats = m.stats();
    eprintln!(
        "small file: asked {asked}, fetched {fetched}, buys {:?}",
        stats.get("buys")
    );
    assert_eq!(stats.get("buys"), Some(&1), "{stats:?}");
    // Fetched once: the file and the bytes the first reads asked for on
    // their own (the kernel asks a page or so around each).
    assert!(
        fetched <= small as u64 + 4 * asked,
        "fetched {fetched} for a file of {small} and {asked} asked"
    );
    // The large file, read for one slice (eight dependent reads): its
    // price (0.4 s here: one round trip, 384 MiB at the link's 1000 MiB/s)
    // is never reached.
    let f = std::fs::File::open(m.join("10378.1/1/big.h5")).unwrap();
    let bytes0 = sim.stat("s3_get_bytes");
    let asked = dependent_reads(
        &f,
        (0..8).map(|i| 3 * MIB + (i * 19_999_999) % (large - 8192)),
        8192,
    );
    std::thread::sleep(std::time::Duration::from_millis(500));
    let fetched = sim.stat("s3_get_bytes") - bytes0;
    eprintln!("large file: asked {asked}, fetched {fetched}");
    assert_eq!(m.stats().get("buys"), Some(&1), "the large file was bought");
    assert!(
        fetched <= 4 * asked + 2 * MIB as u64,
        "fetched {fetched} for {asked} asked"
    );
}

#[test]
fn a_reader_moving_forward_is_followed_and_the_follow_stops_when_it_jumps_away() {
    if !fuse_available() {
        return;
    }
    let size = 64 * MIB;
    let sim = wan_sim(&[("10378.1/1/grid.h5", size)]);
    let m = sim.mount(&["--no-disk-cache", "--no-read-hints"]);
    std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
    let f = std::fs::File::open(m.join("10378.1/1/grid.h5")).unwrap();
    let (bytes0, gets0) = (sim.stat("s3_get_bytes"), sim.stat("s3_get"));
    // An HDF5 chunk walk: 150 KB chunks, 150 KB apart, forward.
    let chunk = |k: usize| 8 * MIB + k * 300_000;
    let mut asked = dependent_reads(&f, (0..4).map(chunk), 150_000);
    let gets_before_follow = sim.stat("s3_get");
    // Followed now: the next chunks come from GETs already on their way.
    asked += dependent_reads(&f, (4..12).map(chunk), 150_000);
    let gets_followed = sim.stat("s3_get") - gets_before_follow;
    // And away (a B-tree node far off): what was asked ahead is stopped.
    asked += dependent_reads(&f, [50 * MIB], 8192);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let fetched = sim.stat("s3_get_bytes") - bytes0;
    let stats = m.stats();
    eprintln!(
        "forward walk: asked {asked}, fetched {fetched} in {} GETs ({gets_followed} while followed); {stats:?}",
        sim.stat("s3_get") - gets0
    );
    assert!(fetched <= 4 * asked, "fetched {fetched} for {asked} asked");
    assert_eq!(stats.get("buys"), Some(&0), "a 64 MiB file read for 2 MB");
    // Eight chunks over 2.4 MB while followed: block GETs, a few of which
    // the walk's own reads would have made anyway; never a GET per read.
    assert!(gets_followed <= 8, "{gets_followed} GETs while followed");
    assert!(
        stats.get("follows_stopped").is_some_and(|&n| n >= 1),
        "{stats:?}"
    );
}

#[test]
fn a_second_mount_asks_at_once_for_what_the_first_mounts_readers_needed_first() {
    if !fuse_available() {
        return;
    }
    let size = 64 * MIB;
    let sim = wan_sim(&[("10378.1/1/grid.h5", size)]);
    // An HDF5 open and slice: superblock, a B-tree node near the end,
    // object headers, then chunks.
    let walk = [
        0,
        16_384,
        59 * MIB + 700_000,
        58 * MIB + 830_000,
        61 * MIB + 600_000,
        62 * MIB + 500_000,
    ];
    let run = |m: &Mount| {
        std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
        let f = std::fs::File::open(m.join("10378.1/1/grid.h5")).unwrap();
        // The open asks for what it recalls: let it land first.
        std::thread::sleep(std::time::Duration::from_millis(400));
        let gets0 = sim.stat("s3_get");
        dependent_reads(&f, walk, 8192);
        sim.stat("s3_get") - gets0
    };
    // No disk cache: the second mount finds nothing of the first's bytes.
    let m = sim.mount(&["--no-disk-cache"]);
    let gets_cold = run(&m);
    // Cold, each link of the walk waited on a fetch of its own.
    let cold = m.stats();
    assert!(cold.get("waits").is_some_and(|&n| n >= 4), "{cold:?}");
    drop(m);
    // The record: in the state folder, named by a hash (no key in sight).
    let hints = sim.state.path().join("provenafs/hints");
    let names: Vec<String> = std::fs::read_dir(&hints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("v-")), "{names:?}");
    assert!(names.iter().all(|n| !n.contains("grid")), "{names:?}");
    let m = sim.mount(&["--no-disk-cache"]);
    let gets_recalled = run(&m);
    let stats = m.stats();
    eprintln!(
        "walk's GETs: {gets_cold} cold, {gets_recalled} with the first mount's record; {stats:?}"
    );
    assert!(gets_cold >= 4, "{gets_cold}");
    // Every block the walk needs was asked for at the open.
    assert_eq!(gets_recalled, 0, "the recalled walk made GETs of its own");
    assert!(stats.get("hinted").is_some_and(|&n| n >= 4), "{stats:?}");
    // Not one read of the walk started a round trip of its own: the open's
    // one round trip (all its ranges at once) is the chain's only link
    // (issue 22: at most 2 before the first chunk).
    assert_eq!(stats.get("waits"), Some(&0), "{stats:?}");
    // And --no-read-hints means no record is read.
    let m = sim.mount(&["--no-disk-cache", "--no-read-hints"]);
    assert!(run(&m) >= 4);
}

#[test]
fn a_series_read_file_after_file_has_its_next_files_fetched_ahead() {
    if !fuse_available() {
        return;
    }
    let size = 2 * MIB;
    let names: Vec<String> = (1..=6)
        .map(|d| format!("10378.1/1/series/ocean_202401{d:02}.nc"))
        .collect();
    let files: Vec<(&str, usize)> = names
        .iter()
        .map(|n| (n.as_str(), size + 4096 * names.len()))
        .collect();
    let sim = wan_sim(&files);
    let m = sim.mount(&[]);
    // The reader's glob: the folder listed, every file known.
    std::fs::read_dir(m.join("10378.1/1/series"))
        .unwrap()
        .count();
    // The first file read whole (as netCDF-C reads most of a small file).
    let want = |i: usize| sha256(&sim.root().join(&names[i]));
    assert_eq!(sha256(&m.join(&names[0])), want(0));
    // The second one opened: it, and the ones after it (up to six), come
    // at once.
    let bytes0 = sim.stat("s3_get_bytes");
    let f = std::fs::File::open(m.join(&names[1])).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let ahead = sim.stat("s3_get_bytes") - bytes0;
    eprintln!("opening the second file fetched {ahead} bytes");
    assert!(
        ahead >= 3 * size as u64,
        "{ahead} bytes fetched at the second open"
    );
    assert!(
        ahead <= 5 * (size + 4096 * 6) as u64 + MIB as u64,
        "{ahead} bytes"
    );
    drop(f);
    // Each file then read is already here: the last two were fetched
    // ahead as the ones before them opened.
    for (i, name) in names.iter().enumerate().skip(1) {
        assert_eq!(sha256(&m.join(name)), want(i));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let total = sim.stat("s3_get_bytes") - bytes0;
    // Every file once: at most the five files' bytes (and a first block's
    // small GETs).
    eprintln!("files 2-6: {total} bytes from S3");
    assert!(
        total <= 5 * (size + 4096 * 6) as u64 + MIB as u64,
        "{total} bytes"
    );
}

#[test]
fn an_sqlite_database_is_bought_at_its_first_read_a_look_alike_is_not() {
    if !fuse_available() {
        return;
    }
    let size = 48 * MIB;
    let d = tempfile::tempdir().unwrap();
    let mut db = bytes(3, size);
    db[..16].copy_from_slice(b"SQLite format 3\0");
    write(d.path(), "10378.1/1/index.sqlite", &db);
    // The same bytes but its first: any other file read the same way.
    write(d.path(), "10378.1/1/other.bin", &bytes(3, size));
    let sim = Sim::start(d, WAN);
    let m = sim.mount(&[]);
    std::fs::read_dir(m.join("10378.1/1")).unwrap().count();
    let pages = |name: &str| {
        let f = std::fs::File::open(m.join("10378.1/1").join(name)).unwrap();
        let mut page = [0u8; 4096];
        // The header page, then a page of a B-tree descent: one wait of
        // rent (the first is not rent), a third of the look-alike's price
        // (48 MiB at the link's pace) even on a slow machine.
        for off in [0, 21 * MIB + 8192] {
            f.read_exact_at(&mut page, off as u64).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(1500));
    };
    let bytes0 = sim.stat("s3_get_bytes");
    pages("other.bin");
    let other = sim.stat("s3_get_bytes") - bytes0;
    assert_eq!(m.stats().get("buys"), Some(&0), "a look-alike was bought");
    let bytes0 = sim.stat("s3_get_bytes");
    pages("index.sqlite");
    let fetched = sim.stat("s3_get_bytes") - bytes0;
    let st = m.stats();
    eprintln!("two pages: {other} bytes of other.bin, {fetched} of the database; {st:?}");
    // Its first read says what it is: the rent its queries will pay (16
    // round trips) is more than the 48 MiB cost, so it is bought at once,
    // and fetched once.
    assert_eq!(st.get("buys"), Some(&1), "{st:?}");
    assert!(fetched <= (size + 2 * 4096 * 4) as u64, "{fetched} bytes");
    assert!(fetched >= size as u64 - MIB as u64, "{fetched} bytes");
}
