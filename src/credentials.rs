//! Per-dataset S3 read credentials, renewed ahead of expiry.
//!
//! The data store hands out STS session credentials per dataset (8 hours in
//! the RRAP deployment; source: `../shared/docs/provena-api.md`).
//! [`DatasetCredentials`] keeps the current set and renews it in the
//! background when a third of its life is left (at most five minutes
//! before it expires; see [`crate::lease`]), so a data store API that is
//! slow or down stops no read while the set in hand lasts. A dataset the
//! user may not read is remembered as refused for a while, so listing it
//! again costs the data store nothing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::provider::{self, error::CredentialsError, ProvideCredentials};
use aws_credential_types::Credentials;
use tracing::debug;

use crate::api::{ApiError, DataStoreClient};
use crate::lease::{Lease, Renewer, Wait};
use crate::retry::Deadline;
use crate::secret::Secret;
use crate::wire::parse_expiry;

/// One set of read credentials.
#[derive(Clone)]
pub struct Issued {
    pub key_id: String,
    secret: Secret,
    session: Secret,
    expiry: SystemTime,
}

impl Issued {
    /// As aws-sdk-s3 takes them.
    pub fn to_sdk(&self) -> Credentials {
        Credentials::new(
            &self.key_id,
            self.secret.expose(),
            Some(self.session.expose().to_string()),
            Some(self.expiry),
            "provena",
        )
    }
}

pub struct DatasetCredentials {
    handle: String,
    /// The shared folder and this dataset's file in it, if shared.
    shared: Option<(crate::shared_lease::SharedLeases, String)>,
    renewer: Arc<Renewer<Issued, ApiError>>,
    /// The data store refused them (the user may see, not read, the
    /// dataset): when, and its words. Answered from memory for `refusal_ttl`.
    /// Set by the renewal itself, before its waiters wake: a request that
    /// comes after a refusal never asks the data store again (a lookup's
    /// LIST and first-bytes GET, asking at once, made two calls).
    refused: Arc<Mutex<Option<(Instant, String)>>>,
    /// The access key of the last set S3 refused: a renewal never takes it
    /// from the shared folder again (another process may not have removed
    /// it yet).
    rejected_key: Arc<Mutex<Option<String>>>,
    refusal_ttl: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for DatasetCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatasetCredentials")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl DatasetCredentials {
    /// Credentials of `handle`; each renewal is bounded by
    /// `request_timeout`, and a refusal is remembered for `refusal_ttl`.
    ///
    /// With `shared` (a shared cache folder, and a name for the user and
    /// deployment), the set is shared with this user's other processes
    /// there: about one credentials call per dataset per lifetime for a
    /// whole job array.
    pub fn new(
        handle: &str,
        api: Arc<DataStoreClient>,
        request_timeout: Duration,
        refusal_ttl: Duration,
        shared: Option<(crate::shared_lease::SharedLeases, &str)>,
    ) -> Self {
        let shared = shared.map(|(s, who)| {
            let name = crate::shared_lease::lease_name("creds", &[who, handle]);
            (s, name)
        });
        let h = handle.to_string();
        let sh = shared.clone();
        let refused: Arc<Mutex<Option<(Instant, String)>>> = Arc::default();
        let noted = refused.clone();
        let rejected_key: Arc<Mutex<Option<String>>> = Arc::default();
        let rejected = rejected_key.clone();
        let renewer = Renewer::new(
            "read credentials",
            request_timeout,
            || ApiError::Malformed("the credentials request was interrupted".into()),
            Box::new(move |deadline| {
                let (api, h, sh, noted) = (api.clone(), h.clone(), sh.clone(), noted.clone());
                let rejected = rejected.lock().unwrap_or_else(|p| p.into_inner()).clone();
                Box::pin(async move {
                    let r = match sh {
                        Some((s, name)) => {
                            issue_shared(&s, &name, &api, &h, rejected.as_deref(), deadline).await
                        }
                        None => issue(&api, &h, deadline).await,
                    };
                    if let Err(ApiError::PermissionDenied(why)) = &r {
                        debug!(handle = %h, "read credentials refused; remembered");
                        // Said with the dataset: the service's words do not
                        // name it.
                        let why =
                            format!("the data store refused read access to dataset {h}: {why}");
                        *noted.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some((Instant::now(), why));
                    }
                    r
                })
            }),
        );
        Self {
            handle: handle.to_string(),
            shared,
            renewer: Arc::new(renewer),
            refused,
            rejected_key,
            refusal_ttl,
            request_timeout,
        }
    }

    /// Usable credentials, waited for (if none are in hand) until `deadline`.
    pub async fn get(&self, deadline: Deadline) -> Result<Issued, ApiError> {
        // A refusal answers only while no usable set is in hand: one met
        // by a background renewal ahead of expiry leaves the set in hand
        // good until it expires.
        if !self.renewer.has_usable() {
            if let Some(why) = self.refusal() {
                return Err(ApiError::PermissionDenied(why));
            }
        }
        match self.renewer.get(deadline).await {
            Ok(c) => Ok(c),
            Err(Wait::Failed(ApiError::PermissionDenied(why))) => {
                let why = self.refusal().unwrap_or_else(|| {
                    format!(
                        "the data store refused read access to dataset {}: {why}",
                        self.handle
                    )
                });
                Err(ApiError::PermissionDenied(why))
            }
            Err(Wait::Failed(e)) => Err(e),
            Err(Wait::TimedOut) => Err(ApiError::TimedOut(format!(
                "read credentials of {}",
                self.handle
            ))),
        }
    }

    /// The data store's refusal, with the dataset named, while it is
    /// remembered.
    fn refusal(&self) -> Option<String> {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        let (at, why) = refused.as_ref()?;
        (at.elapsed() < self.refusal_ttl).then(|| why.clone())
    }

    /// Forgets the set with `access_key_id` after S3 refused it (expired,
    /// revoked, re-keyed), unless it was already replaced.
    pub fn invalidate(&self, access_key_id: &str) {
        *self.rejected_key.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(access_key_id.to_string());
        if let Some((s, name)) = &self.shared {
            // The others would hand the same refused set back; one another
            // process stored since is fresh, and stays (N mounts meeting
            // one refusal cost one credentials call, not N).
            let refused = access_key_id.to_string();
            s.forget_if(name, move |v| {
                v.get("key_id").and_then(|k| k.as_str()) == Some(refused.as_str())
            });
        }
        self.renewer.invalidate(|c| c.key_id == access_key_id);
    }
}

/// One set from the data store, with its lifetime measured against the
/// service's own clock (its `Date` header) when it gives one.
async fn issue(
    api: &DataStoreClient,
    handle: &str,
    deadline: Deadline,
) -> Result<Lease<Issued>, ApiError> {
    let got = api.read_credentials(handle, deadline).await?;
    let raw = got.credentials;
    let expiry = parse_expiry(&raw.expiry).ok_or_else(|| {
        ApiError::Malformed(format!(
            "credential expiry {:?} is not ISO 8601",
            raw.expiry
        ))
    })?;
    let now = got.server_time.unwrap_or_else(SystemTime::now);
    let lifetime = expiry.duration_since(now).unwrap_or(Duration::ZERO);
    debug!(handle, ?lifetime, "read credentials issued");
    Ok(Lease::new(
        Issued {
            key_id: raw.aws_access_key_id,
            secret: Secret::new(raw.aws_secret_access_key),
            session: Secret::new(raw.aws_session_token),
            expiry,
        },
        lifetime,
    ))
}

/// A set as the shared folder keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct SharedSet {
    key_id: String,
    secret: String,
    session: String,
    expiry_ms: u64,
}

/// [`issue`], through the shared folder (see [`crate::shared_lease`]).
/// A set whose access key is `rejected` (S3 refused it) is not taken from
/// the folder.
async fn issue_shared(
    shared: &crate::shared_lease::SharedLeases,
    name: &str,
    api: &DataStoreClient,
    handle: &str,
    rejected: Option<&str>,
    deadline: Deadline,
) -> Result<Lease<Issued>, ApiError> {
    let refused = |set: &SharedSet| Some(set.key_id.as_str()) == rejected;
    let (set, life) =
        crate::shared_lease::get_or_fetch(shared, name, deadline, refused, || async {
            let lease = issue(api, handle, deadline).await?;
            let c = &lease.value;
            let set = SharedSet {
                key_id: c.key_id.clone(),
                secret: c.secret.expose().to_string(),
                session: c.session.expose().to_string(),
                expiry_ms: c
                    .expiry
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            };
            Ok::<_, ApiError>((set, lease.lifetime()))
        })
        .await?;
    Ok(Lease::new(
        Issued {
            key_id: set.key_id,
            secret: Secret::new(set.secret),
            session: Secret::new(set.session),
            expiry: std::time::UNIX_EPOCH + Duration::from_millis(set.expiry_ms),
        },
        life,
    ))
}

/// Adapter that lets aws-sdk-s3 pull credentials from [`DatasetCredentials`].
#[derive(Debug, Clone)]
pub struct SdkProvider(pub Arc<DatasetCredentials>);

impl ProvideCredentials for SdkProvider {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            // Called inside a request that is itself bounded by its
            // deadline; this bound only keeps a stray call finite.
            let deadline = Deadline::after(self.0.request_timeout);
            self.0
                .get(deadline)
                .await
                .map(|c| c.to_sdk())
                .map_err(CredentialsError::provider_error)
        })
    }
}
