//! Direct S3 GET throughput through the same client stack provenafs uses
//! (token → data store credentials → aws-sdk-s3), with parallel ranged
//! GETs: the ceiling a mount can reach on this machine.
//!
//! Usage: provenafs-getbench HANDLE KEY-RELATIVE-TO-DATASET [PARALLEL] [PART-MIB]
//! Endpoints and token from PROVENA_* / RRAP_OFFLINE_TOKEN (as `sim` prints).
//! Prints one line: `bytes seconds MiB/s`.

use std::sync::Arc;
use std::time::Instant;

use provenafs::api::{ApiConfig, DataStoreClient};
use provenafs::auth::{AuthConfig, TokenSource};
use provenafs::s3::aws::{AwsFactory, S3Config};
use provenafs::s3::StoreFactory;
use provenafs::secret::Secret;

fn env(k: &str) -> Result<String, String> {
    std::env::var(k).map_err(|_| format!("{k} is not set"))
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: provenafs-getbench HANDLE KEY [PARALLEL] [PART-MIB]".into());
    }
    let parallel: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let part: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(8) << 20;
    let http = reqwest::Client::new();
    let tokens = Arc::new(TokenSource::new(
        http.clone(),
        AuthConfig {
            realm_url: env("PROVENA_AUTH_URL")?,
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
        .fetch_dataset(&args[1])
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
    let key = format!("{}{}", item.s3.path, args[2]);
    let meta = store.head(&key).await.map_err(|e| e.to_string())?;
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let (store, key, next, etag) =
            (store.clone(), key.clone(), next.clone(), meta.etag.clone());
        let size = meta.size;
        tasks.push(tokio::spawn(async move {
            let mut got = 0u64;
            loop {
                let off = next.fetch_add(part, std::sync::atomic::Ordering::Relaxed);
                if off >= size {
                    return Ok::<u64, String>(got);
                }
                let b = store
                    .get_range(&key, off..(off + part).min(size), Some(&etag))
                    .await
                    .map_err(|e| e.to_string())?;
                got += b.len() as u64;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{total} {secs:.3} {:.1}", total as f64 / secs / 1048576.0);
    Ok(())
}
