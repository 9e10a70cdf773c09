//! `provenafs provenance`: what a mount's readers read, as a table, the
//! manifest's JSON, or a Provena model run record skeleton; and
//! `provenafs provenance register RECORD.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};

use super::{ApiArgs, Exit, IdentityArgs, TokenArgs};
use crate::provenance::register::RegisterConfig;
use crate::provenance::{model_run, Filter, Snapshot};

#[derive(Args, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ProvenanceArgs {
    #[command(subcommand)]
    pub action: Option<ProvenanceAction>,
    /// The mount [default: your only provenafs mount].
    pub mountpoint: Option<PathBuf>,
    /// A manifest a mount wrote when it ended (beside its log:
    /// `<log>.provenance.json`), instead of asking a live mount.
    #[arg(long, value_name = "FILE", conflicts_with = "mountpoint")]
    pub from: Option<PathBuf>,
    /// Only what processes of this Slurm job read.
    #[arg(long, value_name = "ID")]
    pub job: Option<String>,
    /// Only what this process read.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only readers that read or opened a file at or after TIME (RFC 3339,
    /// `YYYY-MM-DD HH:MM:SS` in UTC, or Unix seconds); each one's figures
    /// are whole.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<SystemTime>,
    /// The whole manifest as JSON: each file's key, ETag, bytes, times and
    /// readers.
    #[arg(long, conflicts_with = "model_run")]
    pub json: bool,
    /// A Provena ModelRunRecord skeleton (JSON) with one input per dataset
    /// read; fill in what its `_provenafs.fill_in` lists, then `register`.
    #[arg(long)]
    pub model_run: bool,
    /// A dataset's template in the model run: DATASET_HANDLE=TEMPLATE_ID
    /// (repeatable).
    #[arg(long, value_name = "HANDLE=TEMPLATE_ID", value_parser = model_run::parse_template, requires = "model_run")]
    pub template: Vec<(String, String)>,
}

#[derive(Subcommand, Clone)]
pub enum ProvenanceAction {
    /// Register a completed model run record (JSON, `-` for stdin) at the
    /// Provena provenance API; prints the new record's handle.
    Register(RegisterArgs),
}

#[derive(Args, Clone)]
pub struct RegisterArgs {
    /// The record: `provenance --model-run` output, filled in (`-`:
    /// standard input).
    #[arg(required_unless_present = "session")]
    pub record: Option<PathBuf>,
    /// Wait for a registration sent before (the session ID its message
    /// gave) instead of sending a record: never registers twice.
    #[arg(long, value_name = "ID", conflicts_with = "record")]
    pub session: Option<String>,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub token: TokenArgs,
    #[command(flatten)]
    pub api: ApiArgs,
    /// Provenance API URL [default: https://prov-api.<domain>].
    #[arg(long, env = "PROVENA_PROV_API_URL")]
    pub prov_api_url: Option<String>,
    /// Job API URL, asked when the lodging job ends [default:
    /// https://job-api.<domain>].
    #[arg(long, env = "PROVENA_JOB_API_URL")]
    pub job_api_url: Option<String>,
    /// How long to wait for the record to be lodged, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub wait: u64,
}

/// `provenafs provenance ...`.
pub fn run(a: ProvenanceArgs) -> Result<(), Exit> {
    if let Some(ProvenanceAction::Register(r)) = a.action {
        return register(r);
    }
    let filter = Filter {
        job: a.job.clone(),
        pid: a.pid,
        since: a.since,
    };
    let snap = match &a.from {
        Some(file) => from_file(file, &filter)?,
        None => {
            let mp = match &a.mountpoint {
                Some(m) => m.clone(),
                None => only_mount()?,
            };
            crate::status::ask_provenance(&mp, &filter)?
        }
    };
    let out = if a.model_run {
        let templates: BTreeMap<String, String> = a.template.into_iter().collect();
        let v = model_run::skeleton(&snap, &templates).ok_or_else(|| {
            format!(
                "nothing was read{} on {}: no model run to describe",
                if filter == Filter::default() {
                    ""
                } else {
                    " by the readers asked for"
                },
                snap.mountpoint
            )
        })?;
        pretty(&v)?
    } else if a.json {
        pretty(&snap)?
    } else {
        snap.table()
    };
    super::print_out(&out)
}

fn pretty<T: serde::Serialize>(v: &T) -> Result<String, String> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| e.to_string())
}

/// A manifest written on unmount, filtered as a live one would be.
fn from_file(path: &Path, filter: &Filter) -> Result<Snapshot, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let snap: Snapshot = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a provenafs read manifest: {e}", path.display()))?;
    Ok(snap.filtered(filter))
}

/// This user's only provenafs mount.
fn only_mount() -> Result<PathBuf, String> {
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let mine: Vec<PathBuf> = crate::mountinfo::read()
        .into_iter()
        .filter(crate::mountinfo::MountEntry::is_provenafs)
        .filter(|m| m.user_id().is_none_or(|u| u == me))
        .map(|m| m.mountpoint)
        .collect();
    match mine.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err("no provenafs mount of yours here; name one (or --from FILE)".into()),
        many => Err(format!(
            "{} provenafs mounts of yours; name one: {}",
            many.len(),
            many.iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// RFC 3339, `YYYY-MM-DD HH:MM:SS` (UTC) or Unix seconds.
fn parse_time(s: &str) -> Result<SystemTime, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<i64>() {
        // Within what a date can say (years 1 to 9999 and then some).
        return chrono::DateTime::from_timestamp(secs, 0)
            .filter(|t| secs >= 0 && t.timestamp() < 253_402_300_800)
            .map(SystemTime::from)
            .ok_or_else(|| format!("{s}: not a time a date can say"));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.into());
    }
    for f in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Ok(t.and_utc().into());
        }
    }
    Err(format!(
        "{s:?} is not a time: give RFC 3339 (2026-11-30T04:00:00Z), \"YYYY-MM-DD HH:MM:SS\" (UTC) or Unix seconds"
    ))
}

/// `provenafs provenance register RECORD.json` (or `--session ID`).
fn register(a: RegisterArgs) -> Result<(), Exit> {
    super::init_logging(None, None, "error")?;
    let record = match &a.record {
        Some(path) => Some(read_record(path)?),
        None => None,
    };
    let file = crate::config::load(a.identity.config.as_deref())?;
    let domain = a
        .identity
        .domain
        .clone()
        .or_else(|| file.domain.clone())
        .unwrap_or_else(|| crate::config::DEFAULT_DOMAIN.into());
    let cfg = RegisterConfig {
        prov_api_url: a
            .prov_api_url
            .clone()
            .unwrap_or_else(|| format!("https://prov-api.{domain}")),
        job_api_url: a
            .job_api_url
            .clone()
            .unwrap_or_else(|| format!("https://job-api.{domain}")),
        request_timeout: Duration::from_secs(
            a.api
                .request_timeout
                .or(file.request_timeout)
                .unwrap_or(crate::retry::DEFAULT_REQUEST_TIMEOUT.as_secs())
                .max(1),
        ),
        wait: Duration::from_secs(a.wait),
    };
    let insecure = a.identity.allow_insecure_http;
    crate::config::check_endpoint("--prov-api-url", &cfg.prov_api_url, insecure)?;
    crate::config::check_endpoint("--job-api-url", &cfg.job_api_url, insecure)?;
    let rt = super::runtime()?;
    let sent = record.clone();
    let handle = rt.block_on(async {
        let session = super::connect(&a.identity, &a.token, &a.api, None).await?;
        let http = crate::http::client()?;
        let tokens = session.api.tokens();
        let r = match (sent, &a.session) {
            (Some(record), _) => {
                crate::provenance::register::register(&http, tokens, &cfg, record).await
            }
            (None, Some(id)) => {
                crate::provenance::register::wait_for_job(&http, tokens, &cfg, id).await
            }
            (None, None) => unreachable!("clap requires a record or --session"),
        };
        r.map_err(|e| {
            let mut msg = e.to_string();
            if let (crate::provenance::register::RegisterError::Refused { .. }, Some(r)) =
                (&e, &record)
            {
                let empty = model_run::empty_fields(r);
                if !empty.is_empty() {
                    msg.push_str(&format!(
                        "\nstill empty in the record: {}",
                        empty.join(", ")
                    ));
                }
            }
            msg
        })
    })?;
    super::print_out(&format!("{handle}\n"))
}

/// A record from `path` (`-`: standard input): a JSON object.
fn read_record(path: &Path) -> Result<serde_json::Value, String> {
    let (text, name) = if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).map_err(|e| e.to_string())?;
        (s, "standard input".to_string())
    } else {
        let t = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        (t, path.display().to_string())
    };
    let record: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{name} is not JSON: {e}"))?;
    if !record.is_object() {
        return Err(format!("{name} is not a JSON object (a model run record)"));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_three_forms() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_475_200);
        assert_eq!(parse_time("1764475200"), Ok(t));
        assert_eq!(parse_time("2025-11-30T04:00:00Z"), Ok(t));
        assert_eq!(parse_time("2025-11-30 04:00:00"), Ok(t));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("99999999999999").is_err());
    }
}
