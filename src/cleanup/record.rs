//! What the cleanup protocol stores in the API and how it reads it back: the per-volume record,
//! the controller's index of records, and each node's list of finished deletions. All three keep
//! their data in a few ConfigMap keys, so the managedFields the apiserver adds stay a few lines.

use std::collections::{BTreeSet, HashSet};
use std::time::SystemTime;

use serde_json::{json, Value};
use uuid::Uuid;

use super::LABEL;
use crate::time;
use crate::volume;

/// When a repeated DeleteVolume last joined a pending record; a tombstone drops it.
const JOINED_AT: &str = "joinedAt";

const PENDING: &str = "pending";
const COMPLETE: &str = "complete";
/// Acknowledgements of records written before the index (one data key per node).
const LEGACY_ACK_PREFIX: &str = "ack.";

/// The controller's index of every record, pending and complete.
pub const INDEX_NAME: &str = "nlc-cleanup-index";
const INDEX_KEY: &str = "records";
/// The earliest request time (ms) from which the index lists every deletion; "0" (or no key, as
/// an earlier controller wrote it) when it leaves none out.
const COVERS_FROM_KEY: &str = "coversFrom";
/// Marks the nodes' objects, so the controller lists them (and only them).
pub const NODE_LABEL: &str = "node-local-cache.csi.io/cleanup-node";
const NODE_KEY: &str = "node";
const DONE_KEY: &str = "done";
/// Longest object name the API takes.
const MAX_NAME: usize = 253;
/// Names the node objects of nodes whose name is too long to be spelled out.
const NODE_NAMESPACE: Uuid = Uuid::from_u128(0x6d1e_2b0a_55c4_4f7e_8a3b_0c9d_e1f2_a3b4);

pub fn record_name(volume_id: &str) -> String {
    format!("nlc-cleanup-{volume_id}")
}

/// `nlc-node-<node>`, or a name derived from it when that would be too long for the API.
pub fn node_object_name(node: &str) -> String {
    let name = format!("nlc-node-{node}");
    if name.len() <= MAX_NAME {
        name
    } else {
        format!(
            "nlc-node-{}",
            Uuid::new_v5(&NODE_NAMESPACE, node.as_bytes()).hyphenated()
        )
    }
}

/// One deletion of one volume: the id and when it was requested. A volume deleted, created
/// again under the same name and deleted again is two deletions, never mixed up.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Deletion {
    pub volume_id: String,
    pub requested_ms: u64,
}

impl Deletion {
    pub fn requested(&self) -> SystemTime {
        time::from_millis(self.requested_ms)
    }

    fn parse(text: &str) -> Option<Deletion> {
        let (volume_id, requested_ms) = parse_deletion(text)?;
        Some(Deletion {
            volume_id: volume_id.to_owned(),
            requested_ms,
        })
    }

    fn render(&self) -> String {
        format!("{} {}", self.volume_id, self.requested_ms)
    }
}

/// `<volume-id> <requested-ms>`, the form the index and the node objects store, borrowed from
/// the text.
fn parse_deletion(text: &str) -> Option<(&str, u64)> {
    let mut words = text.split_ascii_whitespace();
    let volume_id = words.next()?;
    volume::check_id(volume_id).ok()?;
    Some((volume_id, words.next()?.parse().ok()?))
}

/// A cleanup record as read from its ConfigMap.
#[derive(Debug, Clone)]
pub struct CleanupRecord {
    pub deletion: Deletion,
    pub pending: bool,
    pub completed: Option<SystemTime>,
    pub pv: String,
    /// Nodes that acknowledged in the record itself, as versions before the index did.
    pub legacy_acks: HashSet<String>,
    /// The object's resourceVersion as read: the record is expired only as it was then.
    pub resource_version: String,
}

impl CleanupRecord {
    /// `None` unless `cm` is a whole record stored under its volume's record name: nodes write
    /// their own objects, labels and data included, but never a record's name, so an object
    /// that names another volume than its name says is no record.
    pub fn parse(cm: &Value) -> Option<CleanupRecord> {
        let data = cm["data"].as_object()?;
        let volume_id = data.get("volumeId")?.as_str()?.to_owned();
        volume::check_id(&volume_id).ok()?;
        if cm["metadata"]["name"].as_str() != Some(record_name(&volume_id).as_str()) {
            return None;
        }
        let requested = data.get("requestedAt").and_then(Value::as_str).and_then(time::parse)?;
        Some(CleanupRecord {
            deletion: Deletion {
                volume_id,
                requested_ms: time::to_millis(requested),
            },
            pending: cm["metadata"]["labels"][LABEL].as_str() != Some(COMPLETE),
            completed: data.get("completedAt").and_then(Value::as_str).and_then(time::parse),
            pv: data.get("pv").and_then(Value::as_str).unwrap_or_default().to_owned(),
            legacy_acks: data
                .keys()
                .filter_map(|k| k.strip_prefix(LEGACY_ACK_PREFIX))
                .map(str::to_owned)
                .collect(),
            resource_version: cm["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
    }

    pub fn volume_id(&self) -> &str {
        &self.deletion.volume_id
    }

    /// A new pending record.
    pub fn new_object(volume_id: &str, requested: SystemTime, pv: &str) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": record_name(volume_id), "labels": { LABEL: PENDING } },
            "data": { "volumeId": volume_id, "requestedAt": time::format(requested), "pv": pv },
        })
    }

    /// Turns the tombstone `existing` of an earlier deletion into a new pending record, on the
    /// condition that it did not change meanwhile; earlier acknowledgements are dropped with it.
    pub fn restart_patch(existing: &Value, requested: SystemTime, pv: &str) -> Value {
        let mut data = serde_json::Map::new();
        for key in existing["data"].as_object().into_iter().flat_map(|d| d.keys()) {
            if key.starts_with(LEGACY_ACK_PREFIX) || key == "completedAt" || key == JOINED_AT {
                data.insert(key.clone(), Value::Null);
            }
        }
        data.insert("requestedAt".into(), time::format(requested).into());
        data.insert("pv".into(), pv.into());
        json!({
            "metadata": { "labels": { LABEL: PENDING }, "resourceVersion": existing["metadata"]["resourceVersion"] },
            "data": data,
        })
    }

    /// Marks the record complete, on the condition that it did not change since listed (a
    /// DeleteVolume that joined or restarted it meanwhile); a tombstone keeps no per-node data,
    /// so legacy acknowledgements go with it.
    pub fn complete_patch(&self, at: SystemTime) -> Value {
        let mut data = serde_json::Map::new();
        for node in &self.legacy_acks {
            data.insert(format!("{LEGACY_ACK_PREFIX}{node}"), Value::Null);
        }
        data.insert("completedAt".into(), time::format(at).into());
        data.insert(JOINED_AT.into(), Value::Null);
        json!({
            "metadata": { "labels": { LABEL: COMPLETE }, "resourceVersion": self.resource_version },
            "data": data,
        })
    }

    /// Marks a pending record as joined by another DeleteVolume call, on the condition that it
    /// did not change since read: a change the pass that may be completing it meanwhile sees (its
    /// completion is conditional too), so one of the two learns of the other.
    pub fn joined_patch(existing: &Value, at: SystemTime) -> Value {
        json!({
            "metadata": { "resourceVersion": existing["metadata"]["resourceVersion"] },
            "data": { JOINED_AT: time::format(at) },
        })
    }

    pub fn index_entry(&self) -> IndexEntry {
        IndexEntry {
            deletion: self.deletion.clone(),
            pending: self.pending,
        }
    }
}

/// One line of the index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct IndexEntry {
    pub deletion: Deletion,
    pub pending: bool,
}

impl IndexEntry {
    /// The entries of an index ConfigMap; lines that do not parse are skipped.
    pub fn parse_index(cm: &Value) -> Vec<IndexEntry> {
        cm["data"][INDEX_KEY]
            .as_str()
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let (deletion, state) = line.rsplit_once(' ')?;
                Some(IndexEntry {
                    deletion: Deletion::parse(deletion)?,
                    pending: match state {
                        PENDING => true,
                        COMPLETE => false,
                        _ => return None,
                    },
                })
            })
            .collect()
    }

    /// From when an index ConfigMap lists every deletion: a node that has not read it since
    /// before then (plus the clock skew allowed) must list the records instead.
    pub fn covers_from(cm: &Value) -> u64 {
        cm["data"][COVERS_FROM_KEY]
            .as_str()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0)
    }

    /// The entry's line in the index.
    pub fn line(&self) -> String {
        format!(
            "{} {}\n",
            self.deletion.render(),
            if self.pending { PENDING } else { COMPLETE }
        )
    }

    /// The index's data, one line per entry in a stable order.
    pub fn render_index(entries: &BTreeSet<IndexEntry>, covers_from: u64) -> Value {
        let text: String = entries.iter().map(IndexEntry::line).collect();
        json!({ INDEX_KEY: text, COVERS_FROM_KEY: covers_from.to_string() })
    }
}

/// A node's object: which pending deletions it has finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAcks {
    pub node: String,
    pub done: HashSet<Deletion>,
}

impl NodeAcks {
    pub fn parse(cm: &Value) -> Option<NodeAcks> {
        let (node, done) = NodeAcks::read(cm)?;
        Some(NodeAcks {
            node: node.to_owned(),
            done: done
                .map(|(volume_id, requested_ms)| Deletion {
                    volume_id: volume_id.to_owned(),
                    requested_ms,
                })
                .collect(),
        })
    }

    /// The node and the deletions (volume id, request time) its object lists, borrowed from the
    /// object: the controller reads one object per node and copies nothing out of it.
    pub fn read(cm: &Value) -> Option<(&str, impl Iterator<Item = (&str, u64)>)> {
        let data = &cm["data"];
        let node = data[NODE_KEY].as_str()?;
        let done = data[DONE_KEY]
            .as_str()
            .unwrap_or_default()
            .lines()
            .filter_map(parse_deletion);
        Some((node, done))
    }

    /// The node object's data.
    pub fn data(&self) -> Value {
        let sorted: BTreeSet<&Deletion> = self.done.iter().collect();
        let done: String = sorted.iter().map(|d| format!("{}\n", d.render())).collect();
        json!({ NODE_KEY: self.node, DONE_KEY: done })
    }

    pub fn new_object(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": node_object_name(&self.node), "labels": { NODE_LABEL: "" } },
            "data": self.data(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deletion(name: &str, ms: u64) -> Deletion {
        Deletion {
            volume_id: volume::id_for_name(name),
            requested_ms: ms,
        }
    }

    #[test]
    fn records_parse_state_and_legacy_acks() {
        let id = volume::id_for_name("pvc-1");
        let cm = json!({
            "metadata": { "name": record_name(&id), "labels": { LABEL: PENDING } },
            "data": { "volumeId": id, "requestedAt": "2026-11-24T00:00:00.000Z", "pv": "pvc-1", "ack.node-a": "x", "ack.node-b": "y" },
        });
        let r = CleanupRecord::parse(&cm).unwrap();
        assert!(r.pending);
        assert_eq!(r.pv, "pvc-1");
        assert_eq!(r.deletion.requested_ms, 1_795_478_400_000);
        assert_eq!(r.legacy_acks, HashSet::from(["node-a".to_owned(), "node-b".to_owned()]));
        let done = r.complete_patch(SystemTime::UNIX_EPOCH);
        assert_eq!(done["data"]["ack.node-a"], Value::Null);
        assert_eq!(done["metadata"]["labels"][LABEL], COMPLETE);
        let bad = json!({ "data": { "volumeId": "../etc", "requestedAt": "2026-11-24T00:00:00.000Z" } });
        assert!(CleanupRecord::parse(&bad).is_none());
        let mut elsewhere = cm.clone();
        elsewhere["metadata"]["name"] = json!(node_object_name("node-a"));
        assert!(
            CleanupRecord::parse(&elsewhere).is_none(),
            "a record under another name"
        );
    }

    #[test]
    fn index_round_trips_and_skips_bad_lines() {
        let entries = BTreeSet::from([
            IndexEntry {
                deletion: deletion("a", 5),
                pending: true,
            },
            IndexEntry {
                deletion: deletion("b", 7),
                pending: false,
            },
        ]);
        let mut cm = json!({ "data": IndexEntry::render_index(&entries, 6) });
        assert_eq!(IndexEntry::covers_from(&cm), 6);
        assert_eq!(
            IndexEntry::parse_index(&cm),
            entries.iter().cloned().collect::<Vec<_>>()
        );
        let text = cm["data"][INDEX_KEY].as_str().unwrap().to_owned();
        cm["data"][INDEX_KEY] = format!(
            "{text}../etc 1 pending\nnlc-x\n{} 1 maybe\n",
            deletion("c", 1).volume_id
        )
        .into();
        assert_eq!(IndexEntry::parse_index(&cm).len(), 2);
    }

    #[test]
    fn node_objects_round_trip() {
        let acks = NodeAcks {
            node: "ip-10-0-1-23.eu-west-1.compute.internal".into(),
            done: HashSet::from([deletion("a", 1), deletion("b", 2)]),
        };
        let obj = acks.new_object();
        assert_eq!(
            obj["metadata"]["name"],
            "nlc-node-ip-10-0-1-23.eu-west-1.compute.internal"
        );
        assert_eq!(NodeAcks::parse(&obj), Some(acks));
    }

    #[test]
    fn long_node_names_get_a_derived_object_name() {
        let long = "n".repeat(250);
        let name = node_object_name(&long);
        assert!(name.len() <= MAX_NAME, "{name}");
        assert_eq!(name, node_object_name(&long));
        assert_ne!(name, node_object_name(&"m".repeat(250)));
    }
}
