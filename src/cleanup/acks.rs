//! Which of the expected nodes acknowledged each pending deletion, one bit per pair: 5,000 nodes
//! and 1,000 pending deletions (a namespace teardown) take 632 KB. A node name per pair took the
//! controller to 108 MiB at 200 pending deletions, past its 64 Mi limit, on every pass.

use std::collections::HashMap;

use serde_json::Value;

use super::record::{CleanupRecord, NodeAcks};

/// Names logged for a record that timed out; the count says how many more there are.
const NAMES_LOGGED: usize = 10;

/// What the nodes reported, for the pending records of one pass.
pub struct Acknowledgements<'a> {
    /// The nodes whose CSINode lists the driver, sorted: a node's place is its bit.
    nodes: Vec<String>,
    /// By pending volume id: the deletion's request time and its bits.
    acked: HashMap<&'a str, (u64, Vec<u64>)>,
}

/// The expected nodes that have not acknowledged one record.
pub struct Missing<'a> {
    pub count: usize,
    /// The first few of them, for the log.
    pub names: Vec<&'a str>,
}

impl<'a> Acknowledgements<'a> {
    pub fn new(mut nodes: Vec<String>, pending: &[&'a CleanupRecord]) -> Acknowledgements<'a> {
        nodes.sort_unstable();
        nodes.dedup();
        let words = nodes.len().div_ceil(64);
        let acked = pending
            .iter()
            .map(|r| (r.volume_id(), (r.deletion.requested_ms, vec![0; words])))
            .collect();
        Acknowledgements { nodes, acked }
    }

    /// Counts one node object; a node not expected, or a deletion not pending, counts for nothing.
    pub fn add(&mut self, object: &Value) {
        let Some((node, done)) = NodeAcks::read(object) else {
            return;
        };
        let Ok(bit) = self.nodes.binary_search_by(|n| n.as_str().cmp(node)) else {
            return;
        };
        for (id, requested_ms) in done {
            if let Some((ms, bits)) = self.acked.get_mut(id) {
                if *ms == requested_ms {
                    bits[bit / 64] |= 1 << (bit % 64);
                }
            }
        }
    }

    /// The expected nodes that acknowledged `r` neither in their object nor in the record itself
    /// (as the previous version did).
    pub fn missing(&self, r: &CleanupRecord) -> Missing<'_> {
        let bits = self
            .acked
            .get(r.volume_id())
            .filter(|(ms, _)| *ms == r.deletion.requested_ms)
            .map(|(_, bits)| bits.as_slice());
        let mut missing = Missing {
            count: 0,
            names: Vec::new(),
        };
        for (i, node) in self.nodes.iter().enumerate() {
            let acked = bits.is_some_and(|b| b[i / 64] & (1 << (i % 64)) != 0);
            if !acked && !r.legacy_acks.contains(node) {
                missing.count += 1;
                if missing.names.len() < NAMES_LOGGED {
                    missing.names.push(node);
                }
            }
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::cleanup::Deletion;
    use crate::volume;

    fn record(name: &str, requested_ms: u64, legacy: &[&str]) -> CleanupRecord {
        CleanupRecord {
            deletion: Deletion {
                volume_id: volume::id_for_name(name),
                requested_ms,
            },
            pending: true,
            completed: None,
            pv: String::new(),
            legacy_acks: legacy.iter().map(|n| n.to_string()).collect(),
            resource_version: String::new(),
        }
    }

    fn object(node: &str, done: &[&Deletion]) -> Value {
        NodeAcks {
            node: node.to_owned(),
            done: done.iter().map(|d| (*d).clone()).collect::<HashSet<_>>(),
        }
        .new_object()
    }

    #[test]
    fn every_expected_node_counts_once_and_nothing_else_counts() {
        let (a, b) = (record("a", 5, &[]), record("b", 7, &["node-2"]));
        let nodes: Vec<String> = (0..70).map(|i| format!("node-{i}")).collect();
        let mut acks = Acknowledgements::new(nodes, &[&a, &b]);
        let earlier_b = Deletion {
            requested_ms: 6,
            ..b.deletion.clone()
        };
        for i in 0..70 {
            if i != 2 {
                acks.add(&object(&format!("node-{i}"), &[&a.deletion, &earlier_b]));
            }
        }
        acks.add(&object("node-stranger", &[&b.deletion]));
        assert_eq!(acks.missing(&a).count, 1);
        assert_eq!(acks.missing(&a).names, ["node-2"]);
        // node-2 acknowledged b in the record; the others listed an earlier deletion of it.
        let missing_b = acks.missing(&b);
        assert_eq!(missing_b.count, 69);
        assert_eq!(missing_b.names.len(), NAMES_LOGGED);
        assert!(!missing_b.names.contains(&"node-2"));
        acks.add(&object("node-2", &[&a.deletion]));
        assert_eq!(acks.missing(&a).count, 0);
    }

    #[test]
    fn without_expected_nodes_nothing_is_missing() {
        let a = record("a", 5, &[]);
        let acks = Acknowledgements::new(Vec::new(), &[&a]);
        assert_eq!(acks.missing(&a).count, 0);
    }
}
