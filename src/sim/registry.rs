//! The data store API endpoints the client uses: fetch-dataset, the
//! paginated registry list and generate-read-access-credentials.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::json;

use super::store::{SimDataset, BUCKET};
use super::{Reply, SimState};
use crate::wire::{CredentialsRequest, ListRequest};

/// Read credentials the S3 side accepts until they expire.
pub struct Issued {
    pub secret: String,
    pub session: String,
    pub expires: Instant,
    pub s3_prefix: String,
}

fn random(n: usize, upper: bool) -> String {
    let s: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect();
    if upper {
        s.to_uppercase()
    } else {
        s
    }
}

fn detail(status: u16, msg: &str) -> Reply {
    Reply::json(status, json!({ "detail": msg }))
}

fn record(ds: &SimDataset) -> serde_json::Value {
    json!({
        "id": ds.handle,
        "display_name": ds.name,
        "item_category": "ENTITY",
        "item_subtype": "DATASET",
        "record_type": "COMPLETE_ITEM",
        "owner_username": "researcher@example.org",
        "created_timestamp": ds.created,
        "updated_timestamp": ds.updated,
        "release_status": "NOT_RELEASED",
        "release_history": [],
        "history": [],
        "workflow_links": {"create_activity_workflow_id": null, "version_activity_workflow_id": null},
        "versioning_info": null,
        "user_metadata": null,
        "collection_format": {
            "associations": {"organisation_id": "10378.1/1", "data_custodian_id": null, "point_of_contact": null},
            "approvals": {"ethics_registration": {"relevant": false, "obtained": false},
                          "ethics_access": {"relevant": false, "obtained": false},
                          "indigenous_knowledge": {"relevant": false, "obtained": false},
                          "export_controls": {"relevant": false, "obtained": false}},
            "dataset_info": {
                "name": ds.name,
                "description": ds.description,
                "access_info": {"reposited": true, "uri": null, "description": null},
                "publisher_id": "10378.1/2",
                "published_date": "2026-01-01",
                "license": "https://creativecommons.org/licenses/by/4.0/",
                "purpose": null, "rights_holder": null, "usage_limitations": null,
                "preferred_citation": null, "formats": null, "keywords": [],
                "user_metadata": null, "version": null,
            },
        },
        "s3": {
            "bucket_name": BUCKET,
            "path": ds.s3_prefix,
            "s3_uri": format!("s3://{BUCKET}/{}", ds.s3_prefix),
        },
    })
}

impl SimState {
    /// Applies a credentials event to every set issued so far (see
    /// `POST /_sim/credentials`); returns how many sets it touched.
    pub fn credentials_event(&self, action: &str) -> usize {
        let mut creds = self.creds();
        let n = creds.len();
        match action {
            "forget" => creds.clear(),
            "rotate" => {
                for c in creds.values_mut() {
                    c.secret = random(40, false);
                    self.remember_secret(&c.secret);
                }
            }
            _ => {
                let now = Instant::now();
                for c in creds.values_mut() {
                    c.expires = now;
                }
            }
        }
        n
    }

    fn denied(&self, handle: &str) -> bool {
        self.cfg.deny.iter().any(|d| d == handle)
    }

    pub fn fetch_dataset(&self, query: &HashMap<String, String>) -> Reply {
        let Some(handle) = query.get("handle_id") else {
            return Reply::json(
                422,
                json!({"detail": [{"loc": ["query", "handle_id"], "msg": "field required", "type": "value_error.missing"}]}),
            );
        };
        self.stats
            .api_fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.store.dataset(handle) {
            Some(ds) => {
                let roles = if self.denied(handle) {
                    json!(["metadata-read"])
                } else {
                    json!(["metadata-read", "dataset-data-read"])
                };
                Reply::json(
                    200,
                    json!({
                        "status": {"success": true, "details": "Successfully retrieved item"},
                        "item": record(&ds),
                        "roles": roles,
                        "locked": false,
                    }),
                )
            }
            None => Reply::json(
                200,
                json!({
                    "status": {"success": false, "details": format!("Item with handle {handle} does not exist.")},
                    "item": null, "roles": null, "locked": null,
                }),
            ),
        }
    }

    pub fn list_items(&self, body: &[u8]) -> Reply {
        let req: ListRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return detail(422, &format!("invalid body: {e}")),
        };
        let size = req.page_size.clamp(1, self.cfg.page_size) as usize;
        let after = req
            .pagination_key
            .as_ref()
            .and_then(|k| k.get("id"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let all = self.store.datasets();
        let total = all.len();
        let rest: Vec<&SimDataset> = all
            .iter()
            .filter(|d| {
                after
                    .as_ref()
                    .is_none_or(|a| d.handle.as_str() > a.as_str())
            })
            .collect();
        let page: Vec<serde_json::Value> = rest.iter().take(size).map(|d| record(d)).collect();
        let key = (rest.len() > size).then(|| {
            json!({"id": rest[size - 1].handle, "universal_partition_key": "DATASET", "updated_timestamp": rest[size - 1].updated})
        });
        self.stats
            .api_lists
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Reply::json(
            200,
            json!({
                "status": {"success": true, "details": "Successfully retrieved items"},
                "items": page,
                "total_item_count": total,
                "pagination_key": key,
            }),
        )
    }

    pub fn read_credentials(&self, body: &[u8]) -> Reply {
        let req: CredentialsRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return detail(422, &format!("invalid body: {e}")),
        };
        let Some(ds) = self.store.dataset(&req.dataset_id) else {
            return detail(
                400,
                &format!("Dataset with handle {} does not exist.", req.dataset_id),
            );
        };
        if self.denied(&ds.handle) {
            self.stats
                .credentials_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return detail(
                401,
                "You do not have sufficient permissions to read from this dataset!",
            );
        }
        let key_id = format!("ASIA{}", random(16, true));
        let secret = random(40, false);
        let session = format!("IQoJb3JpZ2luX2Vj{}", random(300, false));
        self.remember_secret(&secret);
        self.remember_secret(&session);
        let ttl = Duration::from_secs(self.cfg.credentials_ttl);
        let expiry: chrono::DateTime<chrono::Utc> = (SystemTime::now() + ttl).into();
        {
            let mut creds = self.creds();
            let now = Instant::now();
            creds.retain(|_, c| c.expires + Duration::from_secs(3600) > now);
            creds.insert(
                key_id.clone(),
                Issued {
                    secret: secret.clone(),
                    session: session.clone(),
                    expires: now + ttl,
                    s3_prefix: ds.s3_prefix.clone(),
                },
            );
        }
        self.stats
            .credentials_issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Reply::json(
            200,
            json!({
                "status": {"success": true, "details": "Successfully generated credentials"},
                "credentials": {
                    "aws_access_key_id": key_id,
                    "aws_secret_access_key": secret,
                    "aws_session_token": session,
                    "expiry": expiry.to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
                },
                "console_session_url": null,
            }),
        )
    }
}
