//! Direct S3 GET throughput through the same client stack provenafs uses
//! (token → data store credentials → aws-sdk-s3), with parallel ranged
//! GETs: the ceiling a mount can reach on this machine.
//!
//! Usage: provenafs-getbench HANDLE KEY-RELATIVE-TO-DATASET [PARALLEL] [PART-MIB]
//! Endpoints and token from PROVENA_* / RRAP_OFFLINE_TOKEN (as `sim` prints).
//! Prints one line: `bytes seconds MiB/s`. With `--out FILE` the parts are
//! also written into FILE at their offsets (the "download the whole file
//! first" baseline: what `aws s3 cp` does at best).
//!
//! `provenafs-getbench --random SECONDS HANDLE KEY` instead makes one 4 KiB
//! ranged GET at a time at random 4 KiB-aligned offsets for SECONDS, as a
//! reader at queue depth 1 would, and prints `reads seconds IOPS`.
//!
//! `provenafs-getbench --walk HANDLE [PARALLEL]` instead times the raw
//! ListObjectsV2 calls a walk of the whole dataset needs (one delimited
//! listing per folder, PARALLEL folders at once, as `find` on the mount
//! would need them) and prints `calls seconds objects folders`.

use std::sync::Arc;
use std::time::Instant;

use provenafs::api::{ApiConfig, DataStoreClient};
use provenafs::auth::{AuthConfig, TokenSource};
use provenafs::retry::Deadline;

/// Bound of one request, as a mount's default.
const TIMEOUT: std::time::Duration = provenafs::retry::DEFAULT_REQUEST_TIMEOUT;
use provenafs::s3::aws::{AwsFactory, S3Config};
use provenafs::s3::StoreFactory;
use provenafs::secret::Secret;

fn env(k: &str) -> Result<String, String> {
    std::env::var(k).map_err(|_| format!("{k} is not set"))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let mut args: Vec<String> = std::env::args().collect();
    let walk = args.get(1).is_some_and(|a| a == "--walk");
    if walk {
        args.remove(1);
    }
    let random: Option<f64> = if args.get(1).is_some_and(|a| a == "--random") {
        args.remove(1);
        let secs = args.remove(1);
        Some(
            secs.parse()
                .map_err(|_| format!("--random needs seconds, not {secs}"))?,
        )
    } else {
        None
    };
    let out = match args.iter().position(|a| a == "--out") {
        Some(i) if i + 1 < args.len() => {
            let path = args.remove(i + 1);
            args.remove(i);
            let f = std::fs::File::create(&path).map_err(|e| format!("{path}: {e}"))?;
            Some(Arc::new(f))
        }
        Some(_) => return Err("--out needs a file".into()),
        None => None,
    };
    if args.len() < 3 && !(walk && args.len() >= 2) {
        return Err(
            "usage: provenafs-getbench HANDLE KEY [PARALLEL] [PART-MIB] [--out FILE]".into(),
        );
    }
    let parallel: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let part: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(8) << 20;
    let http = reqwest::Client::new();
    let tokens = Arc::new(TokenSource::new(
        http.clone(),
        AuthConfig {
            realm_url: env("PROVENA_AUTH_URL")?,
            ..AuthConfig::default()
        },
        Secret::new(env("RRAP_OFFLINE_TOKEN")?),
    ));
    let api = Arc::new(DataStoreClient::new(
        http,
        ApiConfig {
            base_url: env("PROVENA_API_URL")?,
            ..ApiConfig::default()
        },
        tokens,
    ));
    let item = api
        .fetch_dataset(&args[1], Deadline::after(TIMEOUT))
        .await
        .map_err(|e| e.to_string())?;
    let factory = AwsFactory::new(
        S3Config {
            endpoint: std::env::var("PROVENA_S3_ENDPOINT").ok(),
            ..S3Config::default()
        },
        api,
    );
    let store = factory.open(&item.id, &item.s3.bucket_name);
    if walk {
        let parallel: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
        return walk_all(store, item.s3.path.clone(), parallel).await;
    }
    let key = format!("{}{}", item.s3.path, args[2]);
    let meta = store
        .head(&key, Deadline::after(TIMEOUT))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(secs) = random {
        let pages = (meta.size / 4096).max(1);
        let started = Instant::now();
        let mut reads = 0u64;
        while started.elapsed().as_secs_f64() < secs {
            let off = rand::random::<u64>() % pages * 4096;
            store
                .get_range(
                    &key,
                    off..(off + 4096).min(meta.size),
                    Some(&meta),
                    Deadline::after(TIMEOUT),
                )
                .await
                .map_err(|e| e.to_string())?;
            reads += 1;
        }
        let secs = started.elapsed().as_secs_f64();
        println!("{reads} {secs:.3} {:.1}", reads as f64 / secs);
        return Ok(());
    }
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let (store, key, next, meta) = (store.clone(), key.clone(), next.clone(), meta.clone());
        let out = out.clone();
        let size = meta.size;
        tasks.push(tokio::spawn(async move {
            let mut got = 0u64;
            loop {
                let off = next.fetch_add(part, std::sync::atomic::Ordering::Relaxed);
                if off >= size {
                    return Ok::<u64, String>(got);
                }
                let b = store
                    .get_range(
                        &key,
                        off..(off + part).min(size),
                        Some(&meta),
                        Deadline::after(TIMEOUT),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                got += b.len() as u64;
                if let Some(f) = out.clone() {
                    tokio::task::spawn_blocking(move || {
                        std::os::unix::fs::FileExt::write_all_at(&*f, &b, off)
                    })
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                }
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())??;
    }
    drop(out);
    let secs = started.elapsed().as_secs_f64();
    println!("{total} {secs:.3} {:.1}", total as f64 / secs / 1048576.0);
    Ok(())
}

/// Lists every folder under `root` with delimited ListObjectsV2 calls,
/// `parallel` folders at a time.
async fn walk_all(
    store: Arc<dyn provenafs::s3::ObjectStore>,
    root: String,
    parallel: usize,
) -> Result<(), String> {
    let started = Instant::now();
    let mut queue = vec![root];
    let (mut calls, mut objects, mut folders) = (0u64, 0u64, 0u64);
    while !queue.is_empty() {
        let batch: Vec<String> = queue.drain(..queue.len().min(parallel.max(1))).collect();
        let mut tasks = Vec::new();
        for prefix in batch {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let (mut calls, mut objects, mut subs) = (0u64, 0u64, Vec::new());
                let mut token = None;
                loop {
                    let page = store
                        .list(
                            &prefix,
                            Some("/"),
                            token.take(),
                            Some(1000),
                            Deadline::after(TIMEOUT),
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    calls += 1;
                    objects += page.objects.len() as u64;
                    subs.extend(page.prefixes);
                    match page.next {
                        Some(t) => token = Some(t),
                        None => return Ok::<_, String>((calls, objects, subs)),
                    }
                }
            }));
        }
        for t in tasks {
            let (c, o, subs) = t.await.map_err(|e| e.to_string())??;
            calls += c;
            objects += o;
            folders += subs.len() as u64;
            queue.extend(subs);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{calls} {secs:.3} {objects} {folders}");
    Ok(())
}
