//! The data store API endpoints the client uses: fetch-dataset, the
//! paginated registry list and generate-read-access-credentials.
//!
//! The registry list works as the real one does: it reads `page_size`
//! records of the whole table (newest `updated_timestamp` first), then
//! drops those the user may not see, so a page may come back short or
//! empty with a non-null `pagination_key`; `total_item_count` counts the
//! page. `--ragged-pages` shortens pages on purpose; a record that cannot
//! be parsed (`--fail-list-page`) makes every page that reads it a 400.

use std::cmp::Ordering as Order;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::json;

use super::store::{SimDataset, BUCKET};
use super::{Reply, SimState};
use crate::wire::{CredentialsRequest, ListRequest};

/// Provena's own clients ask for pages of 20: `--fail-list-page N`
/// counts pages of this size.
const PROVENA_PAGE: usize = 20;

/// Registry order: newest `updated_timestamp` first, then by handle (a
/// total order, so a pagination key always has one place).
fn registry_order(a: (i64, &str), b: (i64, &str)) -> Order {
    b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1))
}

/// Records a ragged page `k` (0-based) reads out of `size`: the full page,
/// half of it, or (for every third page) none at all.
fn ragged(size: usize, k: u64) -> usize {
    size - (k % 3) as usize * (size / 2)
}

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
        "release_status": ds.release_status,
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

    /// A record the user may not even see.
    fn hidden(&self, handle: &str) -> bool {
        self.cfg.hidden.iter().any(|d| d == handle)
    }

    /// The 401 the data store answers for a record the registry will not
    /// show this user.
    fn not_granted(&self) -> Reply {
        detail(401, "Registry did not grant access to the dataset")
    }

    pub fn fetch_dataset(&self, query: &HashMap<String, String>) -> Reply {
        let Some(handle) = query.get("handle_id") else {
            return Reply::json(
                422,
                json!({"detail": [{"loc": ["query", "handle_id"], "msg": "field required", "type": "value_error.missing"}]}),
            );
        };
        self.stats.api_fetches.fetch_add(1, Ordering::Relaxed);
        match self.store.dataset(handle) {
            Some(_) if self.hidden(handle) => {
                self.stats.api_fetch_401.fetch_add(1, Ordering::Relaxed);
                self.not_granted()
            }
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
            None => {
                // The registry answers 200 with success false; the data
                // store turns that into a 400 with its text inside.
                self.stats.api_fetch_400.fetch_add(1, Ordering::Relaxed);
                detail(
                    400,
                    &format!(
                        "The registry API responded with status success False during dataset fetching: \
                         Item with handle {handle} does not exist."
                    ),
                )
            }
        }
    }

    pub fn list_items(&self, body: &[u8]) -> Reply {
        let req: ListRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return detail(422, &format!("invalid body: {e}")),
        };
        self.stats.api_lists.fetch_add(1, Ordering::Relaxed);
        let size = req.page_size.clamp(1, self.cfg.page_size) as usize;
        // The key names the last record read (its `updated_timestamp` and
        // `id`); the next page starts after that place in the order, so a
        // key stays good when that record changes or goes. `sim_page`
        // counts pages, for `--ragged-pages`.
        let key = req.pagination_key.as_ref();
        let after = key.and_then(|k| {
            Some((
                k.get("updated_timestamp")?.as_i64()?,
                k.get("id")?.as_str()?.to_string(),
            ))
        });
        let page_no = key
            .and_then(|k| k.get("sim_page"))
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        // The whole table, hidden records included: access is filtered
        // after the page is read.
        let mut table: Vec<SimDataset> = self.store.datasets().as_ref().clone();
        table.sort_by(|a, b| registry_order((a.updated, &a.handle), (b.updated, &b.handle)));
        let start = match &after {
            None => 0,
            Some((u, id)) => table.partition_point(|d| {
                registry_order((d.updated, &d.handle), (*u, id)) != Order::Greater
            }),
        };
        let reads = if self.cfg.ragged_pages {
            ragged(size, page_no)
        } else {
            size
        };
        let end = (start + reads).min(table.len());
        let max = self.faults.list_max_page();
        if max > 0 && size as u64 > max {
            self.stats.api_list_timeouts.fetch_add(1, Ordering::Relaxed);
            // API Gateway's own words at its 29 s integration limit.
            return crate::sim::Reply::json(
                504,
                serde_json::json!({"message": "Endpoint request timed out"}),
            );
        }
        let bad = self.faults.fail_list_page();
        if bad > 0 {
            let at = (bad as usize - 1) * PROVENA_PAGE + PROVENA_PAGE / 2;
            if (start..end).contains(&at) {
                self.stats.api_list_400.fetch_add(1, Ordering::Relaxed);
                return detail(
                    400,
                    &format!(
                        "Failed to parse an item of the registry list page: 1 validation error for \
                         ItemDataset (record {})",
                        table[at].handle
                    ),
                );
            }
        }
        let page: Vec<serde_json::Value> = table[start..end]
            .iter()
            .filter(|d| !self.hidden(&d.handle))
            .map(record)
            .collect();
        // Null only once the table's end was read: an empty ragged page
        // still has a key, one page further on.
        let next = if end < table.len() {
            let anchor = match end.checked_sub(1) {
                Some(i) if i >= start => Some((table[i].updated, table[i].handle.clone())),
                _ => after.clone(),
            };
            let mut k = match anchor {
                Some((u, id)) => {
                    json!({"id": id, "universal_partition_key": "DATASET", "updated_timestamp": u})
                }
                None => json!({}),
            };
            if self.cfg.ragged_pages {
                k["sim_page"] = json!(page_no + 1);
            }
            Some(k)
        } else {
            None
        };
        Reply::json(
            200,
            json!({
                "status": {"success": true, "details": "Successfully retrieved items"},
                "total_item_count": page.len(),
                "items": page,
                "pagination_key": next,
            }),
        )
    }

    pub fn read_credentials(&self, body: &[u8]) -> Reply {
        let req: CredentialsRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return detail(422, &format!("invalid body: {e}")),
        };
        self.stats.api_credentials.fetch_add(1, Ordering::Relaxed);
        let Some(ds) = self.store.dataset(&req.dataset_id) else {
            return detail(
                400,
                &format!("Dataset with handle {} does not exist.", req.dataset_id),
            );
        };
        if self.hidden(&ds.handle) {
            // The service fetches the record first, as the user.
            self.stats
                .credentials_refused
                .fetch_add(1, Ordering::Relaxed);
            return self.not_granted();
        }
        if self.denied(&ds.handle) {
            self.stats
                .credentials_refused
                .fetch_add(1, Ordering::Relaxed);
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
            .fetch_add(1, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ragged_pages_are_full_half_and_empty_in_turn() {
        let sizes: Vec<usize> = (0..6).map(|k| ragged(20, k)).collect();
        assert_eq!(sizes, [20, 10, 0, 20, 10, 0]);
        assert_eq!(
            ragged(1, 2),
            1,
            "a page of one is never shortened to nothing"
        );
    }

    #[test]
    fn the_registry_order_is_newest_first_then_by_handle() {
        let mut v = vec![(5, "b"), (9, "z"), (5, "a"), (1, "c")];
        v.sort_by(|a, b| registry_order(*a, *b));
        assert_eq!(v, [(9, "z"), (5, "a"), (5, "b"), (1, "c")]);
    }
}
