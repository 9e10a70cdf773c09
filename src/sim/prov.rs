//! The provenance API's `POST /model_run/register` and the job API's
//! `GET /jobs/user/fetch`: what a client needs to lodge a model run record
//! and poll for the handle it gets.
//!
//! Sources, all public (short names: P = `provena/provena`, IV2 =
//! `provena/provena-interfaces-v2`):
//! - the request model `ModelRunRecord` (pydantic v2): IV2
//!   `ProvenaInterfaces/ProvenanceModels.py`@328566b6;
//! - the route: P `prov-api/routes/model_run/model_run.py`@10c85492 (body
//!   validated, then the ids, then a job is dispatched and its session id
//!   returned);
//! - the id checks and their words: P
//!   `prov-api/helpers/validate_model_run_record.py`@14655f74 and
//!   `prov-api/helpers/entity_validators.py`@14655f74;
//! - what the registry says of an id it cannot fetch: P
//!   `registry-api/helpers/action_helpers.py`@5e2126dd (`fetch_helper`) and
//!   `registry-api/helpers/dynamo_helpers.py`@14655f74 (`get_entry_raw`);
//! - the job API: P `job-api/routes/jobs/user.py`@14655f74, IV2
//!   `ProvenaInterfaces/AsyncJobModels.py` and `AsyncJobAPI.py`@997ebb09.
//!
//! The emulator has no registry of workflow templates, dataset templates,
//! studies or people. Any non-empty id of those is taken to exist: the
//! workflow template lists (as optional) the dataset templates the record
//! names, each with the deferred resources the record gives, requires no
//! annotation, and names a model that exists. An empty id is what the real
//! registry refuses to fetch ("ID cannot be empty"), so it fails the same
//! check the real service would fail. Datasets are the ones this emulator
//! serves.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde_json::{json, Map, Value};

use super::identity::{Bearer, SIM_USERNAME};
use super::{Reply, SimState};

/// The provenance API's route (P `prov-api/main.py`@2b619e6f mounts the
/// model run router at `/model_run`).
pub(crate) const REGISTER: &str = "/model_run/register";
/// The job API's route (IV2 `AsyncJobAPI.py`@997ebb09: `/jobs/user` +
/// `/fetch`).
pub(crate) const JOB_FETCH: &str = "/jobs/user/fetch";

/// The first handle minted for a model run: far above the sample data's,
/// and any handle the folder serves is skipped anyway.
const FIRST_HANDLE: u64 = 9_000_000;

/// How `{dataset_type}` reads in the service's messages: the prov API runs
/// on Python 3.11 (P `prov-api/lambda_dockerfile`@2471aa83, `FROM
/// public.ecr.aws/lambda/python:3.11`), where an f-string of a `(str, Enum)`
/// member gives `DatasetType.DATA_STORE`, not its value (a Python 3.11
/// change to `Enum.__format__`). The on-premises image
/// (`prov-api/Dockerfile.server`@e6000b75, Python 3.10) would say
/// `DATA_STORE`.
const DATASET_TYPE_TEXT: &str = "DatasetType.DATA_STORE";

/// Stands in for the job payload's `user_info`, which the real service
/// fills with the user's details encrypted (`EncryptedUserInfo`, a string).
const USER_INFO: &str = "sim-encrypted-user-info";

/// Whether the emulator answers `path` here (the API side of `route`).
pub(crate) fn serves(path: &str) -> bool {
    path.starts_with("/model_run/") || path.starts_with("/jobs/")
}

/// What the registry makes of a dataset id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lookup {
    Found,
    Missing,
    /// There, but the user may not see it (`--hidden`).
    Hidden,
}

/// A refused register: the status and the JSON body.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) status: u16,
    pub(crate) body: Value,
}

impl Refusal {
    fn detail(status: u16, detail: impl Into<Value>) -> Self {
        let detail: Value = detail.into();
        Self {
            status,
            body: json!({ "detail": detail }),
        }
    }

    fn reply(self) -> Reply {
        Reply::json(self.status, self.body)
    }
}

// ---------------------------------------------------------------------
// The body, as FastAPI and pydantic v2 validate it.
//
// FastAPI validates a body parameter with
// `TypeAdapter.validate_python(value, from_attributes=True)` and answers
// 422 with `exc.errors(include_url=False)`, each `loc` prefixed with
// "body" (fastapi `_compat.py`, `ModelField.validate`): so Python's lax
// mode, errors without `url`, and every field's errors collected, in the
// model's field order. Unknown keys are ignored (no `extra="forbid"` on
// the models). A validator's ValueError comes out as `type: value_error`,
// `msg: "Value error, <message>"` and `ctx: {"error": {}}` (the exception
// through `jsonable_encoder`).
// ---------------------------------------------------------------------

/// The request body as FastAPI reads it (fastapi `routing.py`,
/// `get_request_handler`, before any dependency runs): an empty body is no
/// body (then "Field required" at `["body"]`); bytes that are not UTF-8
/// fail to decode, which FastAPI answers 400 "There was an error parsing
/// the body"; text that is not JSON answers 422 `json_invalid`. FastAPI
/// puts Python json's character offset and message there; the emulator
/// says offset 0 and "Expecting value", which is what Python says of a
/// body that does not begin like JSON.
pub(crate) fn parse_body(body: &[u8]) -> Result<Value, Refusal> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    if std::str::from_utf8(body).is_err() {
        return Err(Refusal::detail(400, "There was an error parsing the body"));
    }
    serde_json::from_slice::<Value>(body).map_err(|_| Refusal {
        status: 422,
        body: json!({"detail": [{
            "type": "json_invalid",
            "loc": ["body", 0],
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": "Expecting value"},
        }]}),
    })
}

fn at(loc: &[Value], key: impl Into<Value>) -> Vec<Value> {
    let mut v = loc.to_vec();
    v.push(key.into());
    v
}

fn problem(kind: &str, loc: &[Value], msg: &str, input: &Value) -> Value {
    json!({"type": kind, "loc": loc, "msg": msg, "input": input})
}

fn value_error(loc: &[Value], message: &str, input: &Value) -> Value {
    let mut e = problem(
        "value_error",
        loc,
        &format!("Value error, {message}"),
        input,
    );
    e["ctx"] = json!({"error": {}});
    e
}

/// A required field's value; missing, an error whose `input` is the whole
/// object it is missing from (as pydantic reports it).
fn required<'a>(
    obj: &'a Map<String, Value>,
    whole: &Value,
    loc: &[Value],
    name: &str,
    errs: &mut Vec<Value>,
) -> Option<&'a Value> {
    let v = obj.get(name);
    if v.is_none() {
        errs.push(problem("missing", &at(loc, name), "Field required", whole));
    }
    v
}

/// `str`: lax mode turns nothing else into a string.
fn string(v: &Value, loc: &[Value], errs: &mut Vec<Value>) -> Option<Value> {
    if v.is_string() {
        Some(v.clone())
    } else {
        errs.push(problem(
            "string_type",
            loc,
            "Input should be a valid string",
            v,
        ));
        None
    }
}

fn required_string(
    obj: &Map<String, Value>,
    whole: &Value,
    loc: &[Value],
    name: &str,
    errs: &mut Vec<Value>,
) -> Option<Value> {
    let v = required(obj, whole, loc, name, errs)?;
    string(v, &at(loc, name), errs)
}

/// `Optional[str] = None`: absent or null is null.
fn optional_string(
    obj: &Map<String, Value>,
    loc: &[Value],
    name: &str,
    errs: &mut Vec<Value>,
) -> Option<Value> {
    match obj.get(name) {
        None | Some(Value::Null) => Some(Value::Null),
        Some(v) => string(v, &at(loc, name), errs),
    }
}

/// The `string_must_not_be_empty` field validator of `display_name` and
/// `description`: only the exact empty string is refused.
fn not_empty(v: Value, loc: &[Value], errs: &mut Vec<Value>) -> Option<Value> {
    if v.as_str() == Some("") {
        errs.push(value_error(loc, "string must not be empty", &v));
        None
    } else {
        Some(v)
    }
}

/// `int` in lax mode: an integer, a float with no fractional part, a bool
/// (a Python int) or a string holding an integer.
fn integer(v: &Value, loc: &[Value], errs: &mut Vec<Value>) -> Option<i128> {
    let got: Result<i128, (&str, &str)> = match v {
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Ok(i as i128),
            (_, Some(u), _) => Ok(u as i128),
            (_, _, Some(f)) if f.is_finite() && f.fract() == 0.0 => Ok(f as i128),
            _ => Err((
                "int_from_float",
                "Input should be a valid integer, got a number with a fractional part",
            )),
        },
        Value::Bool(b) => Ok(*b as i128),
        Value::String(s) => s.trim().parse::<i128>().map_err(|_| {
            (
                "int_parsing",
                "Input should be a valid integer, unable to parse string as an integer",
            )
        }),
        _ => Err(("int_type", "Input should be a valid integer")),
    };
    match got {
        Ok(i) => Some(i),
        Err((kind, msg)) => {
            errs.push(problem(kind, loc, msg, v));
            None
        }
    }
}

fn int_value(i: i128) -> Value {
    if let Ok(n) = i64::try_from(i) {
        Value::from(n)
    } else if let Ok(n) = u64::try_from(i) {
        Value::from(n)
    } else {
        Value::from(i as f64)
    }
}

/// A nested model. With `from_attributes=True` a value that is not a dict
/// gets `model_attributes_type` (pydantic-core's `validate_model_fields`).
fn object<'a>(
    v: &'a Value,
    loc: &[Value],
    errs: &mut Vec<Value>,
) -> Option<&'a Map<String, Value>> {
    let o = v.as_object();
    if o.is_none() {
        errs.push(problem(
            "model_attributes_type",
            loc,
            "Input should be a valid dictionary or object to extract fields from",
            v,
        ));
    }
    o
}

/// `Optional[Dict[str, str]] = None` (`annotations`, `resources`).
fn string_map(v: Option<&Value>, loc: &[Value], errs: &mut Vec<Value>) -> Option<Value> {
    match v {
        None | Some(Value::Null) => Some(Value::Null),
        Some(Value::Object(m)) => {
            let mut ok = true;
            for (k, x) in m {
                if !x.is_string() {
                    errs.push(problem(
                        "string_type",
                        &at(loc, k.as_str()),
                        "Input should be a valid string",
                        x,
                    ));
                    ok = false;
                }
            }
            ok.then(|| Value::Object(m.clone()))
        }
        Some(other) => {
            errs.push(problem(
                "dict_type",
                loc,
                "Input should be a valid dictionary",
                other,
            ));
            None
        }
    }
}

/// `DatasetType`, whose one value is `DATA_STORE`.
fn dataset_type(v: &Value, loc: &[Value], errs: &mut Vec<Value>) -> Option<Value> {
    if v.as_str() == Some("DATA_STORE") {
        Some(v.clone())
    } else {
        let mut e = problem("enum", loc, "Input should be 'DATA_STORE'", v);
        e["ctx"] = json!({"expected": "'DATA_STORE'"});
        errs.push(e);
        None
    }
}

/// `TemplatedDataset`: `dataset_template_id`, `dataset_id`,
/// `dataset_type`, `resources`.
fn templated_dataset(v: &Value, loc: &[Value], errs: &mut Vec<Value>) -> Option<Value> {
    let o = object(v, loc, errs)?;
    let template = required_string(o, v, loc, "dataset_template_id", errs);
    let dataset = required_string(o, v, loc, "dataset_id", errs);
    let kind = required(o, v, loc, "dataset_type", errs)
        .and_then(|x| dataset_type(x, &at(loc, "dataset_type"), errs));
    let resources = string_map(o.get("resources"), &at(loc, "resources"), errs);
    let (Some(template), Some(dataset), Some(kind), Some(resources)) =
        (template, dataset, kind, resources)
    else {
        return None;
    };
    Some(json!({
        "dataset_template_id": template,
        "dataset_id": dataset,
        "dataset_type": kind,
        "resources": resources,
    }))
}

/// `List[TemplatedDataset]` (`inputs`, `outputs`; `[]` is fine).
fn datasets(v: &Value, loc: &[Value], errs: &mut Vec<Value>) -> Option<Value> {
    let Some(items) = v.as_array() else {
        errs.push(problem("list_type", loc, "Input should be a valid list", v));
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match templated_dataset(item, &at(loc, i), errs) {
            Some(d) => out.push(d),
            None => ok = false,
        }
    }
    ok.then_some(Value::Array(out))
}

/// `AssociationInfo`: `modeller_id`, `requesting_organisation_id`.
fn association_info(v: &Value, loc: &[Value], errs: &mut Vec<Value>) -> Option<Value> {
    let o = object(v, loc, errs)?;
    let modeller = required_string(o, v, loc, "modeller_id", errs);
    let organisation = optional_string(o, loc, "requesting_organisation_id", errs);
    let (Some(modeller), Some(organisation)) = (modeller, organisation) else {
        return None;
    };
    Some(json!({"modeller_id": modeller, "requesting_organisation_id": organisation}))
}

/// Validates a body as `ModelRunRecord` (IV2 `ProvenanceModels.py`@328566b6):
/// the record as the service would hold it (defaults filled in, unknown
/// keys dropped, times as integers), or every error, FastAPI-shaped, in
/// field order. The model validator (`start_time` after `end_time`) runs
/// only once every field is valid, as pydantic runs an `after` model
/// validator.
pub(crate) fn validate_schema(body: &Value) -> Result<Value, Vec<Value>> {
    let root = vec![Value::from("body")];
    if body.is_null() {
        return Err(vec![problem(
            "missing",
            &root,
            "Field required",
            &Value::Null,
        )]);
    }
    let mut errs = Vec::new();
    let Some(o) = object(body, &root, &mut errs) else {
        return Err(errs);
    };
    let workflow = required_string(o, body, &root, "workflow_template_id", &mut errs);
    let model_version = optional_string(o, &root, "model_version", &mut errs);
    let inputs = required(o, body, &root, "inputs", &mut errs)
        .and_then(|v| datasets(v, &at(&root, "inputs"), &mut errs));
    let outputs = required(o, body, &root, "outputs", &mut errs)
        .and_then(|v| datasets(v, &at(&root, "outputs"), &mut errs));
    let annotations = string_map(o.get("annotations"), &at(&root, "annotations"), &mut errs);
    let display_name = required_string(o, body, &root, "display_name", &mut errs)
        .and_then(|v| not_empty(v, &at(&root, "display_name"), &mut errs));
    let description = required_string(o, body, &root, "description", &mut errs)
        .and_then(|v| not_empty(v, &at(&root, "description"), &mut errs));
    let study_id = optional_string(o, &root, "study_id", &mut errs);
    let associations = required(o, body, &root, "associations", &mut errs)
        .and_then(|v| association_info(v, &at(&root, "associations"), &mut errs));
    let start = required(o, body, &root, "start_time", &mut errs)
        .and_then(|v| integer(v, &at(&root, "start_time"), &mut errs));
    let end = required(o, body, &root, "end_time", &mut errs)
        .and_then(|v| integer(v, &at(&root, "end_time"), &mut errs));
    let (
        Some(workflow),
        Some(model_version),
        Some(inputs),
        Some(outputs),
        Some(annotations),
        Some(display_name),
        Some(description),
        Some(study_id),
        Some(associations),
        Some(start),
        Some(end),
    ) = (
        workflow,
        model_version,
        inputs,
        outputs,
        annotations,
        display_name,
        description,
        study_id,
        associations,
        start,
        end,
    )
    else {
        return Err(errs);
    };
    if !errs.is_empty() {
        return Err(errs);
    }
    if start > end {
        // Equal times are allowed. The error is the model's, so its loc is
        // the body itself and its input the whole body.
        return Err(vec![value_error(
            &root,
            &format!(
                "The 'start_time' value ({start}) must be smaller than or equal to the 'end_time' value ({end})."
            ),
            body,
        )]);
    }
    Ok(json!({
        "workflow_template_id": workflow,
        "model_version": model_version,
        "inputs": inputs,
        "outputs": outputs,
        "annotations": annotations,
        "display_name": display_name,
        "description": description,
        "study_id": study_id,
        "associations": associations,
        "start_time": int_value(start),
        "end_time": int_value(end),
    }))
}

// ---------------------------------------------------------------------
// The ids, as `validate_model_run_record` checks them after pydantic.
// ---------------------------------------------------------------------

/// A Python `repr()` of a string (how `str(KeyError(msg))` reads).
fn py_repr(s: &str) -> String {
    let q = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(q);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == q => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push(q);
    out
}

/// The `{err}` of a registry fetch that found nothing: the registry answers
/// 200 with `status.success` false, and the prov API words that as
/// "Failed to retrieve item with details: {details}." (`validate_by_id`).
/// The registry's details (`fetch_helper`): `get_entry_raw` raises
/// ValueError("ID cannot be empty") for `""`, else KeyError("Failed to find
/// item. Is the ID ('{id}') correct and in the database?").
fn not_fetched(id: &str) -> String {
    let details = if id.is_empty() {
        "Value error. Details ID cannot be empty.".to_string()
    } else {
        let key_error =
            format!("Failed to find item. Is the ID ('{id}') correct and in the database?");
        format!(
            "Could not find the given key ({id}) in the registry. Details {}.",
            py_repr(&key_error)
        )
    };
    format!("Failed to retrieve item with details: {details}.")
}

/// The registry checks of a record that passed the schema, in the service's
/// order (first failure wins): study, workflow template, the workflow's
/// dataset templates, input datasets, output datasets, the workflow's
/// model, the modeller, the requesting organisation, required annotations.
/// A failure is 400 "Failed to validate an entity's ID in the record,
/// error: {msg}." (`model_run.py`); a dataset the registry will not show
/// the user is the registry's 401, passed on as 401 (`validate_by_id`).
pub(crate) fn validate_ids(
    record: &Value,
    dataset: &dyn Fn(&str) -> Lookup,
) -> Result<(), Refusal> {
    let fail = |msg: String| {
        Refusal::detail(
            400,
            format!("Failed to validate an entity's ID in the record, error: {msg}."),
        )
    };
    // Study, when set (even to ""). The message really says "workflow
    // definition": a copy-paste slip in the service.
    if let Some(study) = record["study_id"].as_str() {
        if study.is_empty() {
            return Err(fail(format!(
                "Provided model run workflow definition with id {study} was not a valid id, error: {}",
                not_fetched(study)
            )));
        }
    }
    let workflow = record["workflow_template_id"].as_str().unwrap_or_default();
    if workflow.is_empty() {
        return Err(fail(format!(
            "Provided model run workflow definition with id {workflow} was not a valid id, error: {}",
            not_fetched(workflow)
        )));
    }
    let inputs = record["inputs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let outputs = record["outputs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    // The workflow's dataset templates, inputs first (here: the ones the
    // record names).
    for d in inputs.iter().chain(outputs) {
        let template = d["dataset_template_id"].as_str().unwrap_or_default();
        if template.is_empty() {
            return Err(fail(format!(
                "Provided dataset template with id {template} (associated with the workflow def.) was not a valid id, error: {}",
                not_fetched(template)
            )));
        }
    }
    // Every dataset, inputs then outputs. The reason says "Input dataset"
    // for outputs too: both go through `validate_datastore_resource`.
    for (side, list) in [("input", inputs), ("output", outputs)] {
        for d in list {
            let template = d["dataset_template_id"].as_str().unwrap_or_default();
            let id = d["dataset_id"].as_str().unwrap_or_default();
            match dataset(id) {
                Lookup::Found => {}
                Lookup::Hidden => {
                    return Err(Refusal::detail(
                        401,
                        "Registry API denied access to resource: 401. Error: You are not authorised to fetch this item.",
                    ));
                }
                Lookup::Missing => {
                    return Err(fail(format!(
                        "An {side} dataset validation process failed, type {DATASET_TYPE_TEXT}, template id {template}, \
                         reason Input dataset with id {id} was not a valid id, error: {}.",
                        not_fetched(id)
                    )));
                }
            }
        }
    }
    let modeller = record["associations"]["modeller_id"]
        .as_str()
        .unwrap_or_default();
    if modeller.is_empty() {
        return Err(fail(format!(
            "Modeller with id {modeller} was not a valid person, error: {}.",
            not_fetched(modeller)
        )));
    }
    // The requesting organisation is checked only when truthy, so "" is
    // never fetched; any other id is taken to exist.
    Ok(())
}

/// The whole check of a parsed body: 422 (schema) before 400 (ids), as
/// FastAPI validates the body before the route runs.
pub(crate) fn check(body: &Value, dataset: impl Fn(&str) -> Lookup) -> Result<Value, Refusal> {
    let record = validate_schema(body).map_err(|errors| Refusal {
        status: 422,
        body: json!({ "detail": errors }),
    })?;
    validate_ids(&record, &dataset)?;
    Ok(record)
}

// ---------------------------------------------------------------------
// Records and jobs.
// ---------------------------------------------------------------------

/// A session id as the job API makes them: a UUID4 (P
/// `job-api/service/jobs/admin.py`@14655f74, `str(uuid.uuid4())`).
fn uuid4() -> String {
    let mut b: u128 = rand::thread_rng().gen();
    b = (b & !(0xF_u128 << 76)) | (0x4_u128 << 76);
    b = (b & !(0x3_u128 << 62)) | (0x2_u128 << 62);
    let h = format!("{b:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct Job {
    created: u64,
    handle: String,
    /// Fetches so far: the first answers PENDING, so a client's polling
    /// is exercised; later ones SUCCEEDED.
    fetches: u32,
}

/// Model run records lodged (by handle) and their jobs (by session id).
#[derive(Default)]
pub(crate) struct Prov {
    next: u64,
    records: HashMap<String, Value>,
    jobs: HashMap<String, Job>,
}

impl Prov {
    /// Stores a validated record under a new handle, one `taken` does not
    /// name (the folder's datasets), and opens its job; returns the job's
    /// session id.
    pub(crate) fn lodge(
        &mut self,
        record: Value,
        now: u64,
        taken: impl Fn(&str) -> bool,
    ) -> String {
        if self.next < FIRST_HANDLE {
            self.next = FIRST_HANDLE;
        }
        let handle = loop {
            let h = format!("10378.1/{}", self.next);
            self.next += 1;
            if !taken(&h) && !self.records.contains_key(&h) {
                break h;
            }
        };
        let session = loop {
            let s = uuid4();
            if !self.jobs.contains_key(&s) {
                break s;
            }
        };
        self.records.insert(handle.clone(), record);
        self.jobs.insert(
            session.clone(),
            Job {
                created: now,
                handle,
                fetches: 0,
            },
        );
        session
    }

    /// The job as `GET /jobs/user/fetch` shows it (`JobStatusTable`), or
    /// None for a session id never issued.
    pub(crate) fn job(&mut self, session: &str) -> Option<Value> {
        let job = self.jobs.get_mut(session)?;
        job.fetches = job.fetches.saturating_add(1);
        let record = self
            .records
            .get(&job.handle)
            .cloned()
            .unwrap_or(Value::Null);
        let done = job.fetches > 1;
        let status = if done { "SUCCEEDED" } else { "PENDING" };
        // `ProvLodgeModelRunResult{record: ProvenanceRecordInfo}`; the
        // emulator makes no PROV document, so `prov_json` is an empty one.
        let result = if done {
            json!({"record": {"id": job.handle, "prov_json": "{}", "record": record}})
        } else {
            Value::Null
        };
        Some(json!({
            "session_id": session,
            "created_timestamp": job.created,
            "username": SIM_USERNAME,
            "batch_id": null,
            // `ProvLodgeModelRunPayload`, as `model_run.py` builds it.
            "payload": {"record": record, "revalidate": false, "user_info": USER_INFO},
            "job_type": "PROV_LODGE",
            "job_sub_type": "MODEL_RUN_PROV_LODGE",
            // `GSI_VALUE` in AsyncJobModels.py.
            "gsi_status": "ok",
            "status": status,
            "info": null,
            "result": result,
        }))
    }
}

impl SimState {
    fn prov(&self) -> MutexGuard<'_, Prov> {
        self.prov.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dataset_lookup(&self, id: &str) -> Lookup {
        match self.store.dataset(id) {
            None => Lookup::Missing,
            Some(_) if self.cfg.hidden.iter().any(|h| h == id) => Lookup::Hidden,
            Some(_) => Lookup::Found,
        }
    }

    /// The 401 of a request without a usable token, or None. The words
    /// are KeycloakFastAPI's (P
    /// `utilities/packages/python/fast-api-keycloak-auth/KeycloakFastAPI/Dependencies.py`@f05da8f7):
    /// no `Authorization: Bearer` header is FastAPI's OAuth2PasswordBearer
    /// "Not authenticated"; a token without `realm_access` (made without
    /// the `roles` scope) fails `get_user` with "Token had incorrect
    /// structure." — the job API's `user_general_dependency` as well.
    fn prov_refusal(&self, bearer: Option<&str>) -> Option<Reply> {
        let detail = match bearer.map(|t| self.bearer(t)) {
            None => "Not authenticated",
            Some(Bearer::Invalid) => "Could not validate credentials",
            Some(Bearer::NoRoles) => "Token had incorrect structure.",
            Some(Bearer::Valid) => return None,
        };
        Some(Reply::json(401, json!({ "detail": detail })))
    }

    /// A provenance or job API request, in FastAPI's order: the route is
    /// matched (404/405 without looking at the token), the body is read as
    /// JSON (a `json_invalid` 422 comes before any dependency), the
    /// dependencies run (the token's 401), then the parameters and body are
    /// validated (422) and the route runs (400).
    pub(crate) fn prov_answer(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        query: &HashMap<String, String>,
        body: &[u8],
    ) -> Reply {
        let wanted = match path {
            REGISTER => "POST",
            JOB_FETCH => "GET",
            _ => return Reply::json(404, json!({"detail": "Not Found"})),
        };
        if method != wanted {
            return Reply::json(405, json!({"detail": "Method Not Allowed"}));
        }
        let reply = if path == REGISTER {
            match parse_body(body) {
                Err(refusal) => refusal.reply(),
                Ok(parsed) => match self.prov_refusal(bearer) {
                    Some(refused) => refused,
                    None => self.register_model_run(&parsed),
                },
            }
        } else {
            match self.prov_refusal(bearer) {
                Some(refused) => refused,
                None => self.fetch_job(query),
            }
        };
        if path == REGISTER {
            let counter = match reply.status {
                200 => Some(&self.stats.prov_registered),
                400..=499 => Some(&self.stats.prov_refused),
                _ => None,
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        reply
    }

    /// `POST /model_run/register`: validate, lodge, answer the session id
    /// (`RegisterModelRunResponse`).
    fn register_model_run(&self, body: &Value) -> Reply {
        let record = match check(body, |id| self.dataset_lookup(id)) {
            Ok(r) => r,
            Err(refusal) => return refusal.reply(),
        };
        let session = self
            .prov()
            .lodge(record, unix_now(), |h| self.store.dataset(h).is_some());
        Reply::json(
            200,
            json!({
                "status": {
                    "success": true,
                    "details": "Job dispatched, monitor session ID using the job API to see progress.",
                },
                "session_id": session,
            }),
        )
    }

    /// `GET /jobs/user/fetch?session_id=`: `GetJobResponse{job}` (no
    /// `status` field: IV2 `AsyncJobAPI.py`@997ebb09). An unknown session
    /// is the service's 400 "Item was not found." (P
    /// `job-api/routes/jobs/user.py`@14655f74); a missing `session_id` is
    /// FastAPI's 422 for a required query parameter.
    fn fetch_job(&self, query: &HashMap<String, String>) -> Reply {
        let Some(session) = query.get("session_id") else {
            return Reply::json(
                422,
                json!({"detail": [{
                    "type": "missing",
                    "loc": ["query", "session_id"],
                    "msg": "Field required",
                    "input": null,
                }]}),
            );
        };
        let job = self.prov().job(session);
        match job {
            Some(job) => Reply::json(200, json!({ "job": job })),
            None => Reply::json(400, json!({"detail": "Item was not found."})),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example, with the `display_name` it leaves out.
    fn valid() -> Value {
        json!({
            "workflow_template_id": "10378.1/100",
            "model_version": "1.2",
            "inputs": [{
                "dataset_template_id": "10378.1/200",
                "dataset_id": "10378.1/1",
                "dataset_type": "DATA_STORE",
                "resources": {"configuration_file": "data/configuration/config1234.csv"},
            }],
            "outputs": [{
                "dataset_template_id": "10378.1/201",
                "dataset_id": "10378.1/2",
                "dataset_type": "DATA_STORE",
            }],
            "annotations": {"RCP": "45", "species": "speciesA"},
            "display_name": "run 1",
            "description": "a model run",
            "study_id": "10378.1/300",
            "associations": {"modeller_id": "10378.1/400", "requesting_organisation_id": "10378.1/500"},
            "start_time": 1669355820,
            "end_time": 1669442219,
        })
    }

    fn served(id: &str) -> Lookup {
        if id == "10378.1/1" || id == "10378.1/2" {
            Lookup::Found
        } else {
            Lookup::Missing
        }
    }

    /// What a client that has nothing to say yet might send.
    fn skeleton() -> Value {
        json!({
            "workflow_template_id": "",
            "inputs": [],
            "outputs": [],
            "display_name": "",
            "description": "",
            "associations": {"modeller_id": ""},
            "start_time": 0,
            "end_time": 0,
        })
    }

    fn detail(r: &Refusal) -> &Vec<Value> {
        r.body["detail"].as_array().expect("a list of errors")
    }

    #[test]
    fn a_valid_record_passes_with_its_defaults_filled_in() {
        let mut body = valid();
        body.as_object_mut().unwrap().remove("model_version");
        body.as_object_mut().unwrap().remove("study_id");
        let record = check(&body, served).unwrap();
        assert_eq!(record["model_version"], Value::Null);
        assert_eq!(record["study_id"], Value::Null);
        assert_eq!(record["outputs"][0]["resources"], Value::Null);
        assert_eq!(record["inputs"][0], valid()["inputs"][0]);
        assert_eq!(record["start_time"], 1669355820);
        assert_eq!(
            record["associations"]["requesting_organisation_id"],
            "10378.1/500"
        );
    }

    #[test]
    fn empty_names_are_a_422_before_any_id_is_looked_at() {
        let r = check(&skeleton(), served).unwrap_err();
        assert_eq!(r.status, 422);
        let errs = detail(&r);
        assert_eq!(errs.len(), 2, "{errs:?}");
        for (e, field) in errs.iter().zip(["display_name", "description"]) {
            assert_eq!(e["type"], "value_error");
            assert_eq!(e["loc"], json!(["body", field]));
            assert_eq!(e["msg"], "Value error, string must not be empty");
            assert_eq!(e["input"], "");
            assert_eq!(e["ctx"], json!({"error": {}}));
        }
    }

    #[test]
    fn empty_ids_fail_the_registry_checks_in_the_service_order() {
        let mut body = skeleton();
        body["display_name"] = json!("run");
        body["description"] = json!("d");
        let r = check(&body, served).unwrap_err();
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body["detail"],
            "Failed to validate an entity's ID in the record, error: Provided model run workflow \
             definition with id  was not a valid id, error: Failed to retrieve item with details: \
             Value error. Details ID cannot be empty..."
        );
        body["workflow_template_id"] = json!("10378.1/100");
        let r = check(&body, served).unwrap_err();
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body["detail"],
            "Failed to validate an entity's ID in the record, error: Modeller with id  was not a \
             valid person, error: Failed to retrieve item with details: Value error. Details ID \
             cannot be empty...."
        );
        body["associations"]["modeller_id"] = json!("10378.1/400");
        assert!(check(&body, served).is_ok());
    }

    #[test]
    fn missing_fields_are_all_listed_in_field_order() {
        let r = check(&json!({}), served).unwrap_err();
        assert_eq!(r.status, 422);
        let errs = detail(&r);
        let fields: Vec<&str> = errs.iter().map(|e| e["loc"][1].as_str().unwrap()).collect();
        assert_eq!(
            fields,
            [
                "workflow_template_id",
                "inputs",
                "outputs",
                "display_name",
                "description",
                "associations",
                "start_time",
                "end_time"
            ]
        );
        for e in errs {
            assert_eq!(e["type"], "missing");
            assert_eq!(e["msg"], "Field required");
            assert_eq!(e["input"], json!({}));
            assert_eq!(e["loc"].as_array().unwrap().len(), 2);
        }
        // Nested models report their own missing fields.
        let mut body = valid();
        body["inputs"] = json!([{}]);
        body["associations"] = json!({});
        let r = check(&body, served).unwrap_err();
        let locs: Vec<Value> = detail(&r).iter().map(|e| e["loc"].clone()).collect();
        assert_eq!(
            locs,
            vec![
                json!(["body", "inputs", 0, "dataset_template_id"]),
                json!(["body", "inputs", 0, "dataset_id"]),
                json!(["body", "inputs", 0, "dataset_type"]),
                json!(["body", "associations", "modeller_id"]),
            ]
        );
        assert_eq!(detail(&r)[0]["input"], json!({}));
    }

    #[test]
    fn wrong_types_are_reported_where_they_are() {
        let mut body = valid();
        body["model_version"] = json!(2);
        body["inputs"][0]["dataset_type"] = json!("URL");
        body["outputs"] = json!({});
        body["annotations"] = json!({"RCP": 45});
        body["associations"] =
            json!({"modeller_id": "10378.1/400", "requesting_organisation_id": 7});
        body["start_time"] = json!(1.5);
        body["end_time"] = json!("soon");
        let r = check(&body, served).unwrap_err();
        assert_eq!(r.status, 422);
        let got: Vec<(String, Value)> = detail(&r)
            .iter()
            .map(|e| (e["type"].as_str().unwrap().to_string(), e["loc"].clone()))
            .collect();
        let want: Vec<(String, Value)> = vec![
            ("string_type".into(), json!(["body", "model_version"])),
            ("enum".into(), json!(["body", "inputs", 0, "dataset_type"])),
            ("list_type".into(), json!(["body", "outputs"])),
            ("string_type".into(), json!(["body", "annotations", "RCP"])),
            (
                "string_type".into(),
                json!(["body", "associations", "requesting_organisation_id"]),
            ),
            ("int_from_float".into(), json!(["body", "start_time"])),
            ("int_parsing".into(), json!(["body", "end_time"])),
        ];
        assert_eq!(got, want);
        let e = &detail(&r)[1];
        assert_eq!(e["msg"], "Input should be 'DATA_STORE'");
        assert_eq!(e["ctx"], json!({"expected": "'DATA_STORE'"}));
        assert_eq!(e["input"], "URL");
        // Not an object where a model goes.
        let r = check(&json!([1]), served).unwrap_err();
        assert_eq!(detail(&r)[0]["type"], "model_attributes_type");
        assert_eq!(detail(&r)[0]["loc"], json!(["body"]));
    }

    #[test]
    fn times_are_lax_integers() {
        let mut body = valid();
        body["start_time"] = json!(" 1669355820 ");
        body["end_time"] = json!(1669442219.0);
        let record = check(&body, served).unwrap();
        assert_eq!(record["start_time"], 1669355820);
        assert_eq!(record["end_time"], 1669442219);
        body["end_time"] = json!(null);
        let r = check(&body, served).unwrap_err();
        assert_eq!(detail(&r)[0]["type"], "int_type");
        assert_eq!(detail(&r)[0]["msg"], "Input should be a valid integer");
    }

    #[test]
    fn a_start_after_the_end_is_the_model_validators_error() {
        let mut body = valid();
        body["start_time"] = json!(20);
        body["end_time"] = json!(10);
        let r = check(&body, served).unwrap_err();
        assert_eq!(r.status, 422);
        assert_eq!(
            r.body["detail"],
            json!([{
                "type": "value_error",
                "loc": ["body"],
                "msg": "Value error, The 'start_time' value (20) must be smaller than or equal to the 'end_time' value (10).",
                "input": body,
                "ctx": {"error": {}},
            }])
        );
        // Not run while a field is wrong.
        body["display_name"] = json!("");
        let r = check(&body, served).unwrap_err();
        assert_eq!(detail(&r).len(), 1);
        assert_eq!(detail(&r)[0]["loc"], json!(["body", "display_name"]));
        // Equal times are fine.
        body["display_name"] = json!("run");
        body["end_time"] = json!(20);
        assert!(check(&body, served).is_ok());
    }

    #[test]
    fn an_unknown_dataset_is_a_400_in_the_services_words() {
        let mut body = valid();
        body["outputs"][0]["dataset_id"] = json!("10378.1/77");
        let r = check(&body, served).unwrap_err();
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body["detail"],
            "Failed to validate an entity's ID in the record, error: An output dataset validation \
             process failed, type DatasetType.DATA_STORE, template id 10378.1/201, reason Input \
             dataset with id 10378.1/77 was not a valid id, error: Failed to retrieve item with \
             details: Could not find the given key (10378.1/77) in the registry. Details \"Failed \
             to find item. Is the ID ('10378.1/77') correct and in the database?\"...."
        );
        // Inputs are checked first.
        body["inputs"][0]["dataset_id"] = json!("10378.1/76");
        let r = check(&body, served).unwrap_err();
        let text = r.body["detail"].as_str().unwrap();
        assert!(
            text.contains("error: An input dataset validation process failed"),
            "{text}"
        );
        assert!(text.contains("template id 10378.1/200, reason Input dataset with id 10378.1/76 "));
        // One the user may not see is the registry's 401.
        let hidden = |id: &str| {
            if id == "10378.1/1" {
                Lookup::Hidden
            } else {
                Lookup::Found
            }
        };
        let r = check(&valid(), hidden).unwrap_err();
        assert_eq!(r.status, 401);
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let mut body = valid();
        body["user_metadata"] = json!({"k": "v"});
        body["inputs"][0]["extra"] = json!(1);
        body["associations"]["role"] = json!("x");
        let record = check(&body, served).unwrap();
        assert!(record.get("user_metadata").is_none());
        assert!(record["inputs"][0].get("extra").is_none());
        assert!(record["associations"].get("role").is_none());
    }

    #[test]
    fn a_body_that_is_not_json_or_is_empty() {
        let r = parse_body(b"\xff").unwrap_err();
        assert_eq!(r.status, 400);
        let r = parse_body(b"not json").unwrap_err();
        assert_eq!(r.status, 422);
        assert_eq!(detail(&r)[0]["type"], "json_invalid");
        assert_eq!(detail(&r)[0]["loc"], json!(["body", 0]));
        let empty = parse_body(b"").unwrap();
        let r = check(&empty, served).unwrap_err();
        assert_eq!(
            r.body["detail"],
            json!([{"type": "missing", "loc": ["body"], "msg": "Field required", "input": null}])
        );
    }

    #[test]
    fn a_job_is_pending_once_then_names_the_new_handle() {
        let mut prov = Prov::default();
        let record = check(&valid(), served).unwrap();
        let session = prov.lodge(record.clone(), 1_700_000_000, |h| h == "10378.1/9000000");
        assert!(prov.job("no-such-session").is_none());
        let first = prov.job(&session).unwrap();
        assert_eq!(first["session_id"], session.as_str());
        assert_eq!(first["status"], "PENDING");
        assert_eq!(first["result"], Value::Null);
        assert_eq!(first["payload"]["record"], record);
        assert_eq!(first["created_timestamp"], 1_700_000_000);
        assert_eq!(first["job_sub_type"], "MODEL_RUN_PROV_LODGE");
        let second = prov.job(&session).unwrap();
        assert_eq!(second["status"], "SUCCEEDED");
        assert_eq!(second["result"]["record"]["id"], "10378.1/9000001");
        assert_eq!(second["result"]["record"]["record"], record);
        let other = prov.lodge(record, 0, |_| false);
        assert_ne!(other, session);
        prov.job(&other);
        let done = prov.job(&other).unwrap();
        assert_eq!(done["result"]["record"]["id"], "10378.1/9000002");
    }

    #[test]
    fn session_ids_are_uuid4s() {
        let s = uuid4();
        assert_eq!(s.len(), 36);
        let dashes: Vec<usize> = s.match_indices('-').map(|(i, _)| i).collect();
        assert_eq!(dashes, [8_usize, 13, 18, 23]);
        assert_eq!(&s[14..15], "4");
        assert!("89ab".contains(&s[19..20]), "{s}");
    }

    #[test]
    fn python_reprs_pick_their_quotes() {
        assert_eq!(py_repr("a ('b') c"), "\"a ('b') c\"");
        assert_eq!(py_repr("plain"), "'plain'");
        assert_eq!(py_repr("both ' and \""), "'both \\' and \"'");
    }
}
