//! `provenafs sim`: the emulator's flags, and running it until Ctrl-C.

use std::path::PathBuf;

use clap::Args;

use super::{absolute, LogArgs};
use crate::config;
use crate::sim::SimConfig;

#[derive(Args, Clone)]
pub struct SimArgs {
    /// Data folder: ROOT/<prefix>/<suffix>/ is the dataset <prefix>/<suffix>.
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    pub addr: std::net::SocketAddr,
    /// Also write the PROVENA_* / RRAP_OFFLINE_TOKEN lines to this file (0600).
    #[arg(long)]
    pub env_file: Option<PathBuf>,
    #[arg(long, default_value_t = 300)]
    pub access_token_ttl: u64,
    /// Seconds read credentials last (the RRAP deployment's 8 hours).
    #[arg(long, default_value_t = 28800)]
    pub credentials_ttl: u64,
    /// Largest page the registry list and ListObjectsV2 answer with.
    #[arg(long, default_value_t = 1000)]
    pub page_size: u32,
    /// Handles the user may see but not read (credentials answer 401).
    #[arg(long)]
    pub deny: Vec<String>,
    /// Handles the user may not see: never listed; fetch-dataset and read
    /// credentials answer 401 "Registry did not grant access to the dataset".
    #[arg(long, value_name = "HANDLE")]
    pub hidden: Vec<String>,
    /// Registry pages come back short or empty (deterministically) while
    /// `pagination_key` is non-null, as the real service's may.
    #[arg(long)]
    pub ragged_pages: bool,
    /// The middle record of registry page N (pages of 20, newest first)
    /// cannot be parsed: every list request reading it answers 400 (also
    /// `POST /_sim/faults?fail_list_page=N`; 0 clears).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fail_list_page: u64,
    /// Scopes of the printed offline token; without `roles` every data
    /// store call with its access tokens answers 401 "Token had incorrect
    /// structure.".
    #[arg(long, value_name = "SCOPES", default_value = crate::sim::DEFAULT_OFFLINE_SCOPE)]
    pub offline_token_scope: String,
    /// Region the bucket lives in: S3 requests signed for another region
    /// answer 301 PermanentRedirect with `x-amz-bucket-region` (also
    /// `POST /_sim/faults?s3_region=R`; empty accepts any region).
    #[arg(long, value_name = "REGION", default_value = crate::sim::DEFAULT_BUCKET_REGION)]
    pub s3_bucket_region: String,
    /// S3 requests whose key (or listing prefix or continuation token)
    /// contains TEXT answer HTTP 400 with an empty body, as a wrong
    /// endpoint or a proxy may (also `POST /_sim/faults?s3_bare_400=TEXT`;
    /// empty clears).
    #[arg(long, value_name = "TEXT")]
    pub s3_bare_400: Option<String>,
    /// Approve device logins at once (no browser step).
    #[arg(long)]
    pub auto_approve: bool,
    /// Seconds between device-code polls the emulator asks for.
    #[arg(long, default_value_t = 5)]
    pub device_interval: u64,
    /// Seconds a device login stays open.
    #[arg(long, default_value_t = 600)]
    pub device_expires_in: u64,
    /// Answer `slow_down` to polls closer than this many seconds, whatever
    /// interval was advertised (a busy server).
    #[arg(long, default_value_t = 0)]
    pub device_min_interval: u64,
    /// Fraction of S3 requests that fail (500, 503 SlowDown, reset, short body).
    #[arg(long, default_value_t = 0.0)]
    pub s3_fault_rate: f64,
    /// Fraction of identity and API requests that fail (500/502/503, reset).
    #[arg(long, default_value_t = 0.0)]
    pub api_fault_rate: f64,
    /// Milliseconds added to every request.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// JSON array of extra objects ({"key", "data"}) whose keys no file can hold.
    #[arg(long)]
    pub extra_keys: Option<PathBuf>,
    /// S3 requests whose key (or listing prefix or continuation token)
    /// contains TEXT are accepted and never answered (until cleared through
    /// `POST /_sim/faults?s3_hang=`).
    #[arg(long, value_name = "TEXT")]
    pub s3_hang: Option<String>,
    /// Identity and data store requests are accepted and never answered
    /// (until `POST /_sim/faults?api_hang=0`).
    #[arg(long)]
    pub api_hang: bool,
    /// Seconds the S3 side's clock runs ahead (negative: behind); beyond 15
    /// minutes requests answer RequestTimeTooSkewed.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub clock_skew: i64,
    /// WAN profile: milliseconds every S3 answer waits before its first
    /// byte (on top of --latency-ms).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "MS",
        help_heading = "WAN profile"
    )]
    pub first_byte_ms: u64,
    /// WAN profile: each S3 response body is paced to this many MiB/s (0: unpaced).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "MIB_S",
        help_heading = "WAN profile"
    )]
    pub stream_mib_per_s: f64,
    /// WAN profile: all S3 response bodies together are paced to this many MiB/s (0: unpaced).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "MIB_S",
        help_heading = "WAN profile"
    )]
    pub link_mib_per_s: f64,
    /// WAN profile: milliseconds every identity and data store call takes.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "MS",
        help_heading = "WAN profile"
    )]
    pub api_latency_ms: u64,
    /// First write the demo's sample datasets into --root.
    #[arg(long)]
    pub sample_data: bool,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Runs the emulator until SIGINT or SIGTERM.
pub async fn run(a: SimArgs) -> Result<(), String> {
    if a.sample_data {
        crate::demo::generate(&a.root)
            .map_err(|e| format!("cannot write sample data in {}: {e}", a.root.display()))?;
    }
    let cfg = SimConfig {
        root: a.root,
        addr: a.addr,
        access_token_ttl: a.access_token_ttl,
        credentials_ttl: a.credentials_ttl,
        page_size: a.page_size.max(1),
        s3_page_size: a.page_size.clamp(1, 1000),
        deny: a.deny,
        hidden: a.hidden,
        ragged_pages: a.ragged_pages,
        fail_list_page: a.fail_list_page,
        offline_token_scope: a.offline_token_scope,
        s3_bucket_region: a.s3_bucket_region,
        s3_bare_400: a.s3_bare_400,
        device_interval: a.device_interval,
        device_expires_in: a.device_expires_in,
        device_min_interval: a.device_min_interval,
        auto_approve: a.auto_approve,
        s3_fault_rate: a.s3_fault_rate,
        api_fault_rate: a.api_fault_rate,
        latency_ms: a.latency_ms,
        extra_keys: a.extra_keys,
        s3_hang: a.s3_hang,
        api_hang: a.api_hang,
        clock_skew: a.clock_skew,
        wan: crate::sim::wan::WanProfile {
            first_byte_ms: a.first_byte_ms,
            stream_mib_per_s: a.stream_mib_per_s,
            link_mib_per_s: a.link_mib_per_s,
            api_latency_ms: a.api_latency_ms,
        },
    };
    let sim = crate::sim::Sim::start(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let lines = sim.env.shell();
    if let Some(p) = &a.env_file {
        config::write_private(p, &lines)
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    print!("{lines}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // What to do next, on standard error: standard output stays the
    // lines to source, for `eval "$(provenafs sim ...)"` and scripts.
    let source = match &a.env_file {
        Some(p) => format!(
            "source {}",
            absolute(p).unwrap_or_else(|_| p.clone()).display()
        ),
        None => "paste the lines above (they set and export the endpoints and the token)".into(),
    };
    eprintln!(
        "provenafs sim: emulator at http://{addr}, serving {root}. Ctrl-C stops it.\n\
         Next, in another shell:\n\
         \x20 {source}\n\
         \x20 provenafs datasets\n\
         \x20 mkdir -p /tmp/provena && provenafs mount /tmp/provena && ls /tmp/provena\n\
         \x20 provenafs unmount /tmp/provena",
        addr = sim.addr,
        root = absolute(&sim.state.cfg.root)
            .unwrap_or_else(|_| sim.state.cfg.root.clone())
            .display(),
    );
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    sim.stop();
    Ok(())
}
