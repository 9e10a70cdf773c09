//! A Provena model run record (`ModelRunRecord`) made from a read
//! manifest: one input per dataset read, the run's span from the first and
//! last read, and placeholders the provenance API refuses until a person
//! fills them.
//!
//! The shape is the provenance API's pydantic model `ModelRunRecord`
//! (provena/provena-interfaces-v2 `ProvenaInterfaces/ProvenanceModels.py`
//! @328566b6; see docs/provenance.md for every fact and its source).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::manifest::Snapshot;

/// `ModelRunRecord`, field for field. `start_time`/`end_time` are Unix
/// seconds. Fields the API takes as optional are left out when empty.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModelRunRecord {
    pub workflow_template_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    pub inputs: Vec<TemplatedDataset>,
    pub outputs: Vec<TemplatedDataset>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    pub display_name: String,
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study_id: Option<String>,
    pub associations: AssociationInfo,
    pub start_time: i64,
    pub end_time: i64,
}

/// `TemplatedDataset`: one dataset a run read or wrote.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TemplatedDataset {
    /// The dataset template (a registry handle) this dataset fills in the
    /// workflow template.
    pub dataset_template_id: String,
    /// The dataset's handle.
    pub dataset_id: String,
    /// Always `DATA_STORE` (the only value the API defines).
    pub dataset_type: String,
    /// The template's deferred resource keys → paths in the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<BTreeMap<String, String>>,
}

/// `AssociationInfo`: who ran it, for whom.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AssociationInfo {
    /// A Person's handle in the registry.
    pub modeller_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requesting_organisation_id: Option<String>,
}

/// The fields a skeleton leaves for a person to fill in. The API refuses
/// each while it is empty: `display_name` and `description` by its model
/// (422), the two IDs as registry lookups that find nothing (400).
pub const TO_FILL: [&str; 4] = [
    "workflow_template_id",
    "display_name",
    "description",
    "associations.modeller_id",
];

/// The annotation of a skeleton that names the version (ETag) of each
/// file read: `{"<handle>": {"<path>": "<etag>"}}` as a JSON string.
pub const VERSIONS_ANNOTATION: &str = "provenafs_versions_read";

/// What a skeleton carries beside the record, for the person filling it
/// in. The API ignores keys it does not know (its models do not forbid
/// extra fields), and `provenafs provenance register` drops it before
/// sending.
pub const NOTE_KEY: &str = "_provenafs";

/// The skeleton of a model run that read what `snap` holds. `templates`
/// gives datasets' template IDs (dataset handle → template handle); the
/// others are left empty for the user. `resources` names the files read,
/// each under its path in the dataset: the API requires the keys of a
/// dataset template's deferred resources, so they are to be renamed (or
/// dropped) to match the template. Returns `None` when nothing was read.
pub fn skeleton(
    snap: &Snapshot,
    templates: &BTreeMap<String, String>,
) -> Option<serde_json::Value> {
    let (first, last) = snap.span();
    let (first, last) = (first?, last?);
    let inputs = snap
        .datasets
        .iter()
        .map(|d| {
            let resources: BTreeMap<String, String> = d
                .files
                .iter()
                .map(|f| {
                    let path = relative(&f.key);
                    (path.clone(), path)
                })
                .collect();
            TemplatedDataset {
                dataset_template_id: templates.get(&d.handle).cloned().unwrap_or_default(),
                dataset_id: d.handle.clone(),
                dataset_type: "DATA_STORE".into(),
                resources: (!resources.is_empty()).then_some(resources),
            }
        })
        .collect();
    // The versions read, which the record's own fields cannot hold: as
    // one annotation (the API takes keys its workflow template does not
    // name, and does not check values), `{handle: {path: ETag}}`.
    let versions: BTreeMap<&str, BTreeMap<String, &str>> = snap
        .datasets
        .iter()
        .map(|d| {
            let files = d
                .files
                .iter()
                .map(|f| (relative(&f.key), f.etag.as_str()))
                .collect();
            (d.handle.as_str(), files)
        })
        .collect();
    let annotations = serde_json::to_string(&versions)
        .ok()
        .map(|v| BTreeMap::from([(VERSIONS_ANNOTATION.to_string(), v)]));
    let record = ModelRunRecord {
        workflow_template_id: String::new(),
        model_version: None,
        inputs,
        outputs: Vec::new(),
        annotations,
        display_name: String::new(),
        description: String::new(),
        study_id: None,
        associations: AssociationInfo {
            modeller_id: String::new(),
            requesting_organisation_id: None,
        },
        // Whole seconds around the reads: the first read's second, and
        // the second after the last read, so the span holds every read.
        start_time: first.timestamp(),
        end_time: last.timestamp() + i64::from(last.timestamp_subsec_nanos() > 0),
    };
    let mut v = serde_json::to_value(&record).ok()?;
    let mut fill: Vec<&str> = TO_FILL.to_vec();
    if snap
        .datasets
        .iter()
        .any(|d| !templates.contains_key(&d.handle))
    {
        fill.push("inputs[].dataset_template_id");
    }
    let note = serde_json::json!({
        "fill_in": fill,
        "resources": "each file read, under its path; rename the keys to the dataset template's \
                      deferred resource keys, or drop the ones it does not name",
        "mountpoint": snap.mountpoint,
        "filter": snap.filter,
    });
    if let Some(o) = v.as_object_mut() {
        o.insert(NOTE_KEY.into(), note);
    }
    Some(v)
}

/// A key's path inside its dataset: S3 keys are `datasets/<dashed
/// handle>/<path>`.
fn relative(key: &str) -> String {
    let mut parts = key.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("datasets"), Some(_), Some(rest)) if !rest.is_empty() => rest.to_string(),
        _ => key.to_string(),
    }
}

/// The fields of `record` a person still has to fill in (empty strings
/// where the API needs an ID or a text), as `fill_in` names them.
pub fn empty_fields(record: &serde_json::Value) -> Vec<String> {
    let empty = |p: &str| record.pointer(p).is_some_and(|v| v.as_str() == Some(""));
    let mut out: Vec<String> = [
        ("/workflow_template_id", "workflow_template_id"),
        ("/display_name", "display_name"),
        ("/description", "description"),
        ("/associations/modeller_id", "associations.modeller_id"),
    ]
    .iter()
    .filter(|(p, _)| empty(p))
    .map(|(_, n)| n.to_string())
    .collect();
    for list in ["inputs", "outputs"] {
        for (i, d) in record[list].as_array().into_iter().flatten().enumerate() {
            if d["dataset_template_id"].as_str() == Some("") {
                out.push(format!("{list}[{i}].dataset_template_id"));
            }
        }
    }
    out
}

/// Parses `HANDLE=TEMPLATE_ID` (`--template`).
pub fn parse_template(s: &str) -> Result<(String, String), String> {
    let (h, t) = s
        .split_once('=')
        .ok_or_else(|| format!("--template {s:?}: expected DATASET_HANDLE=TEMPLATE_ID"))?;
    let h = crate::wire::normalize_handle(h.trim())?;
    let t = t.trim();
    if t.is_empty() {
        return Err(format!("--template {s:?}: the template ID is empty"));
    }
    Ok((h, t.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provenance::manifest::{Filter, Manifest, Opened};
    use crate::provenance::who::Who;
    use std::sync::Arc;

    #[test]
    fn a_skeleton_names_each_dataset_and_file_and_leaves_the_rest_empty() {
        let m = Manifest::new("/mnt");
        let who = Arc::new(Who::default());
        for (h, k) in [
            ("10378.1/1", "datasets/10378-1-1/data/a.nc"),
            ("10378.1/1", "datasets/10378-1-1/b.csv"),
            ("10378.1/2", "datasets/10378-1-2/c"),
        ] {
            m.opened(
                &Opened {
                    handle: h,
                    name: None,
                    key: k,
                    etag: "e",
                    size: 1,
                },
                who.clone(),
            )
            .read(1);
        }
        let snap = m.snapshot(&Filter::default());
        let templates = BTreeMap::from([("10378.1/2".to_string(), "10378.1/77".to_string())]);
        let v = skeleton(&snap, &templates).unwrap();
        let r: ModelRunRecord = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(r.inputs.len(), 2);
        assert_eq!(r.inputs[0].dataset_id, "10378.1/1");
        assert_eq!(r.inputs[0].dataset_template_id, "");
        assert_eq!(r.inputs[1].dataset_template_id, "10378.1/77");
        let res = r.inputs[0].resources.as_ref().unwrap();
        assert_eq!(res.keys().collect::<Vec<_>>(), ["b.csv", "data/a.nc"]);
        assert!(r.start_time <= r.end_time && r.start_time > 1_700_000_000);
        for f in ["workflow_template_id", "display_name", "description"] {
            assert_eq!(v[f], "", "{f} left to fill");
        }
        assert_eq!(v["associations"]["modeller_id"], "");
        assert!(v[NOTE_KEY]["fill_in"].as_array().unwrap().len() == 5);
        let versions: serde_json::Value =
            serde_json::from_str(r.annotations.as_ref().unwrap()[VERSIONS_ANNOTATION].as_str())
                .unwrap();
        assert_eq!(versions["10378.1/1"]["data/a.nc"], "e");
        assert_eq!(empty_fields(&v).len(), 5);
        // Nothing read: no record.
        assert!(skeleton(
            &Manifest::new("/m").snapshot(&Filter::default()),
            &templates
        )
        .is_none());
    }

    #[test]
    fn templates_parse() {
        assert_eq!(
            parse_template("10378.1/1=10378.1/9").unwrap(),
            ("10378.1/1".into(), "10378.1/9".into())
        );
        assert!(parse_template("10378.1/1").is_err());
        assert!(parse_template("10378.1/1=").is_err());
    }
}
