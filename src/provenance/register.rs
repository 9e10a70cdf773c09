//! Registering a model run at the Provena provenance API.
//!
//! `POST {prov-api}/model_run/register` with the record as its JSON body
//! validates it and starts a job that lodges it; the answer carries the
//! job's `session_id`, and the job API (`GET {job-api}/jobs/user/fetch
//! ?session_id=`) tells when the job has `SUCCEEDED` and the new record's
//! handle (`job.result.record.id`). Deployments from before that change
//! answered the register call with `record_info.id` at once; both are
//! understood. Sources: docs/provenance.md.
//!
//! The register call is sent once: it is not idempotent, and a retry
//! after an answer lost on the way would register the run twice. Only a
//! 401 (the access token expired) is retried, with a new token: the API
//! refused that call without looking at it.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tracing::{debug, info_span, Instrument};

use crate::auth::{AuthError, TokenSource};
use crate::retry::Deadline;

/// Why a record was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The record is not a model run record the API takes (HTTP 422: its
    /// model refused it; 400: an ID in it names nothing in the registry).
    #[error("the provenance API refused the record (HTTP {status}):\n{detail}")]
    Refused { status: u16, detail: String },
    #[error("the provenance API refused the access token: {0}")]
    Unauthorized(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("the {what} API answered HTTP {status}: {detail}")]
    Http {
        what: &'static str,
        status: u16,
        detail: String,
    },
    #[error("cannot reach the {what} API at {url}: {reason}")]
    Unreachable {
        what: &'static str,
        url: String,
        reason: String,
    },
    #[error("the {what} API sent an answer we cannot read: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("the job that lodges the record failed: {0}")]
    JobFailed(String),
    /// The job had not ended when the wait did; it may still succeed.
    #[error("the record was accepted, but its job had not finished lodging it{}; do not send it again: wait for it with `provenafs provenance register --session {session}`", .last.as_ref().map(|l| format!(" (last: {l})")).unwrap_or_default())]
    StillRunning {
        session: String,
        /// What the job API last said or why it did not answer.
        last: Option<String>,
    },
    /// The register call went out but its answer did not come back well:
    /// the run may be registered.
    #[error("{0}\nthe record may have been registered all the same: look for it in the registry before sending it again")]
    Unsure(Box<RegisterError>),
}

/// Where the two APIs are and how long to wait.
#[derive(Clone, Debug)]
pub struct RegisterConfig {
    /// e.g. `https://prov-api.mds.gbrrestoration.org`.
    pub prov_api_url: String,
    /// e.g. `https://job-api.mds.gbrrestoration.org`.
    pub job_api_url: String,
    /// Bound of each call.
    pub request_timeout: Duration,
    /// How long to wait for the job to lodge the record.
    pub wait: Duration,
}

#[derive(Deserialize)]
struct Status {
    success: bool,
    #[serde(default)]
    details: String,
}

/// `RegisterModelRunResponse`: `session_id` (newest) or `record_info`
/// (older deployments).
#[derive(Deserialize)]
struct Registered {
    status: Status,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    record_info: Option<RecordInfo>,
}

#[derive(Deserialize)]
struct RecordInfo {
    id: String,
}

/// `GetJobResponse`.
#[derive(Deserialize)]
struct JobAnswer {
    job: Job,
}

#[derive(Deserialize)]
struct Job {
    status: String,
    #[serde(default)]
    info: Option<String>,
    #[serde(default)]
    result: Option<JobResult>,
}

#[derive(Deserialize)]
struct JobResult {
    record: RecordInfo,
}

/// Registers `record` (a JSON object; keys starting with `_` are dropped
/// first: notes for the person who filled it in). Returns the new model
/// run record's handle.
pub async fn register(
    http: &reqwest::Client,
    tokens: &Arc<TokenSource>,
    cfg: &RegisterConfig,
    mut record: serde_json::Value,
) -> Result<String, RegisterError> {
    if let Some(o) = record.as_object_mut() {
        o.retain(|k, _| !k.starts_with('_'));
    }
    let url = format!(
        "{}/model_run/register",
        cfg.prov_api_url.trim_end_matches('/')
    );
    let span = info_span!("prov_register", url = %url);
    let body = async {
        let mut renewed = false;
        loop {
            let deadline = Deadline::after(cfg.request_timeout);
            let token = tokens.access_token(deadline).await?;
            let resp = http
                .post(&url)
                .bearer_auth(token.expose())
                .json(&record)
                .timeout(cfg.request_timeout)
                .send()
                .await
                .map_err(|e| {
                    // Refused before it was sent: nothing registered.
                    let sure = e.is_connect() || e.is_builder();
                    let err = unreachable("provenance", &url, &e);
                    if sure {
                        err
                    } else {
                        RegisterError::Unsure(Box::new(err))
                    }
                })?;
            let status = resp.status().as_u16();
            let body = resp.bytes().await.map_err(|e| {
                RegisterError::Unsure(Box::new(unreachable("provenance", &url, &e)))
            })?;
            match status {
                200 => return Ok(body),
                401 if !renewed && !is_refusal(&detail(&body)) => {
                    tokens.invalidate(&token);
                    renewed = true;
                }
                401 | 403 => return Err(RegisterError::Unauthorized(detail(&body))),
                400 | 422 => {
                    return Err(RegisterError::Refused {
                        status,
                        detail: detail(&body),
                    })
                }
                _ => {
                    let e = RegisterError::Http {
                        what: "provenance",
                        status,
                        detail: detail(&body),
                    };
                    // A gateway's 502/504 may come after the API did it.
                    return Err(if status >= 500 {
                        RegisterError::Unsure(Box::new(e))
                    } else {
                        e
                    });
                }
            }
        }
    }
    .instrument(span)
    .await?;
    let answer: Registered =
        serde_json::from_slice(&body).map_err(|e| RegisterError::Malformed {
            what: "provenance",
            detail: e.to_string(),
        })?;
    if !answer.status.success {
        return Err(RegisterError::Refused {
            status: 200,
            detail: answer.status.details,
        });
    }
    if let Some(info) = answer.record_info {
        return Ok(info.id);
    }
    let session = answer.session_id.ok_or_else(|| RegisterError::Malformed {
        what: "provenance",
        detail: "neither a session_id nor a record_info".into(),
    })?;
    wait_for_job(http, tokens, cfg, &session).await
}

/// Asks the job API about `session` until its job ends or `cfg.wait` is
/// over: every 250 ms at first, then up to every 5 s.
pub async fn wait_for_job(
    http: &reqwest::Client,
    tokens: &Arc<TokenSource>,
    cfg: &RegisterConfig,
    session: &str,
) -> Result<String, RegisterError> {
    let url = format!("{}/jobs/user/fetch", cfg.job_api_url.trim_end_matches('/'));
    let until = Deadline::after(cfg.wait);
    let mut pause = Duration::from_millis(250);
    let mut renewed = false;
    let mut last: Option<String> = None;
    loop {
        let deadline = Deadline::after(cfg.request_timeout);
        let token = tokens.access_token(deadline).await?;
        let sent = http
            .get(&url)
            .query(&[("session_id", session)])
            .bearer_auth(token.expose())
            .timeout(cfg.request_timeout)
            .send()
            .instrument(info_span!("job_fetch", url = %url))
            .await;
        // The job API is only asked: a failed question is asked again.
        let answer = match sent {
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.bytes().await.unwrap_or_default();
                match status {
                    200 => Some(serde_json::from_slice::<JobAnswer>(&body).map_err(|e| {
                        RegisterError::Malformed {
                            what: "job",
                            detail: e.to_string(),
                        }
                    })?),
                    401 if !renewed && !is_refusal(&detail(&body)) => {
                        tokens.invalidate(&token);
                        renewed = true;
                        None
                    }
                    401 | 403 => return Err(RegisterError::Unauthorized(detail(&body))),
                    s if s >= 500 || s == 429 => {
                        last = Some(format!("the job API answered HTTP {s}"));
                        None
                    }
                    s => {
                        return Err(RegisterError::Http {
                            what: "job",
                            status: s,
                            detail: detail(&body),
                        })
                    }
                }
            }
            Err(e) => {
                let why = crate::http::describe_reqwest(&e);
                debug!(error = %why, "job API did not answer; asking again");
                last = Some(format!("cannot reach the job API at {url}: {why}"));
                None
            }
        };
        if let Some(a) = answer {
            match a.job.status.as_str() {
                "SUCCEEDED" => {
                    return a
                        .job
                        .result
                        .map(|r| r.record.id)
                        .ok_or(RegisterError::Malformed {
                            what: "job",
                            detail: "a SUCCEEDED job without result.record.id".into(),
                        })
                }
                "FAILED" => {
                    return Err(RegisterError::JobFailed(
                        a.job.info.unwrap_or_else(|| "no reason given".into()),
                    ))
                }
                // PENDING, DEQUEUED, IN_PROGRESS.
                other => last = Some(format!("the job is {other}")),
            }
        }
        if !until.allows(pause) {
            return Err(RegisterError::StillRunning {
                session: session.to_string(),
                last,
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

fn unreachable(what: &'static str, url: &str, e: &reqwest::Error) -> RegisterError {
    RegisterError::Unreachable {
        what,
        url: url.to_string(),
        reason: crate::http::describe_reqwest(e),
    }
}

/// A 401 that is a refusal (a missing role), not an expired token.
fn is_refusal(detail: &str) -> bool {
    detail.contains("not authorised") || detail.contains("incorrect structure")
}

/// The human part of an error body: FastAPI's `detail` (a string, or for
/// a 422 a list of `{loc, msg}`: one line each), else the body's start.
pub fn detail(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    };
    match v.get("detail") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| {
                let loc: Vec<String> = i
                    .get("loc")
                    .and_then(|l| l.as_array())
                    .map(|l| {
                        l.iter()
                            .filter(|p| p.as_str() != Some("body"))
                            .map(|p| match p {
                                serde_json::Value::String(s) => s.clone(),
                                other => other.to_string(),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let msg = i.get("msg").and_then(|m| m.as_str()).unwrap_or("invalid");
                if loc.is_empty() {
                    format!("  {msg}")
                } else {
                    format!("  {}: {msg}", loc.join("."))
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Some(other) => other.to_string(),
        None => v
            .pointer("/status/details")
            .and_then(|s| s.as_str())
            .map_or_else(|| v.to_string(), str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_422_says_each_field_on_its_line() {
        let body = br#"{"detail":[{"type":"value_error","loc":["body","display_name"],"msg":"Value error, string must not be empty","input":""},{"type":"missing","loc":["body","inputs",0,"dataset_id"],"msg":"Field required"}]}"#;
        assert_eq!(
            detail(body),
            "  display_name: Value error, string must not be empty\n  inputs.0.dataset_id: Field required"
        );
        assert_eq!(
            detail(br#"{"detail":"Failed to validate"}"#),
            "Failed to validate"
        );
        assert_eq!(detail(b"<html>"), "<html>");
    }
}
