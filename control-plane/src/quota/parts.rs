//! Each control-plane replica's part of every shared limit. Parts follow
//! where the demand is: every replica publishes its edges' demand
//! (`QuotaDigest`) each round, and a replica shares out only its part of
//! each limit, so the limit holds across replicas as long as the parts in
//! use sum to at most 1.
//!
//! Parts each replica computed for itself from the digests it read would
//! not: two replicas reading at different moments each see their own
//! demand fresh and the other's stale, and in a burst both take most of a
//! limit. So the leader computes every replica's parts from one read and
//! writes them to etcd (`QuotaParts`) each round. Each replica says in its
//! digest which record it read last, and takes for each quota the least of
//! its parts in every record from the oldest any live replica last read
//! to the newest it read itself. Every replica's part is then at most its
//! part in that oldest record, so together they are at most 1; and once
//! every replica has read a record, each takes its part in it whole.
//!
//! A replica not named in a record (it just started, or had no edges)
//! takes no part from it; a replica alone takes every limit whole.

use std::collections::{HashMap, HashSet};

use infermesh_proto::v1::{QuotaDigest, QuotaParts, ReplicaParts};

/// This replica's part of every limit, from the last exchange.
#[derive(Debug, Clone)]
pub struct Parts {
    /// By quota id, for quotas someone asked for.
    pub by_quota: HashMap<String, f64>,
    /// For any other quota: this replica's share of all edges.
    pub default: f64,
    /// Edges connected to every replica.
    pub edges: u32,
}

impl Default for Parts {
    fn default() -> Self {
        Self {
            by_quota: HashMap::new(),
            default: 1.0,
            edges: 0,
        }
    }
}

/// Fraction of the mean replica demand every replica with edges gets on top of its own.
const REPLICA_FLOOR: f64 = 0.05;

/// This replica's parts from its digest and the other replicas'.
pub fn parts(mine: &QuotaDigest, others: &[QuotaDigest]) -> Parts {
    let all: Vec<&QuotaDigest> = std::iter::once(mine).chain(others.iter()).collect();
    let replicas: Vec<&QuotaDigest> = all.iter().copied().filter(|d| d.edges > 0).collect();
    let edges: u32 = replicas.iter().map(|d| d.edges).sum();
    if mine.edges == 0 {
        return Parts {
            edges,
            ..Parts::default()
        };
    }
    let default = f64::from(mine.edges) / f64::from(edges.max(1));
    let quotas: HashSet<&String> = all
        .iter()
        .flat_map(|d| d.demand.keys().chain(d.used.keys()))
        .collect();
    let by_quota = quotas
        .into_iter()
        .map(|quota| {
            let rate = |d: &QuotaDigest| d.demand.get(quota).copied().unwrap_or(0.0).max(0.0);
            let used = |d: &QuotaDigest| d.used.get(quota).copied().unwrap_or(0.0).max(0.0);
            let total: f64 = replicas.iter().map(|d| rate(d)).sum();
            let share = if total <= 0.0 {
                default
            } else {
                let floor = REPLICA_FLOOR * total / replicas.len() as f64;
                (rate(mine) + floor) / (total + floor * replicas.len() as f64)
            };
            // Each replica keeps what it used; what is left is shared by demand.
            let used_total: f64 = all.iter().map(|d| used(d)).sum();
            let part = if used_total >= 1.0 {
                used(mine) / used_total
            } else {
                used(mine) + share * (1.0 - used_total)
            };
            (quota.clone(), part)
        })
        .collect();
    Parts {
        by_quota,
        default,
        edges,
    }
}

/// Every replica's parts, computed from one read of every digest: what the
/// leader writes.
pub fn record(digests: &[QuotaDigest]) -> QuotaParts {
    let replicas = digests
        .iter()
        .enumerate()
        .map(|(i, mine)| {
            let others: Vec<QuotaDigest> = digests
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, d)| d.clone())
                .collect();
            // A replica without edges shares nothing out: it keeps what it
            // used and takes no part of what is left.
            let parts = if mine.edges == 0 {
                ReplicaParts {
                    by_quota: mine.used.clone(),
                    default_part: 0.0,
                }
            } else {
                let p = parts(mine, &others);
                ReplicaParts {
                    by_quota: p.by_quota,
                    default_part: p.default,
                }
            };
            (mine.node.clone(), parts)
        })
        .collect();
    QuotaParts { replicas }
}

/// Records kept: enough to cover the slowest live replica for a few rounds.
const KEPT: usize = 8;

/// The leader's records a replica has read, by the etcd revision each was
/// written at.
#[derive(Debug, Default)]
pub struct Records {
    read: std::collections::BTreeMap<i64, QuotaParts>,
}

impl Records {
    /// Takes the record written at `revision`.
    pub fn read(&mut self, revision: i64, parts: QuotaParts) {
        self.read.insert(revision, parts);
        while self.read.len() > KEPT {
            self.read.pop_first();
        }
    }

    /// The revision of the newest record read; 0 for none.
    pub fn newest(&self) -> i64 {
        self.read.keys().next_back().copied().unwrap_or(0)
    }

    /// The parts of replica `node`, `edges` being every replica's edges:
    /// for each quota the least of its parts in the records from
    /// `oldest_read` (the oldest newest-record any live replica reported)
    /// on; `None` before any record was read.
    pub fn parts_of(&self, node: &str, edges: u32, oldest_read: i64) -> Option<Parts> {
        let newest = self.newest();
        if newest == 0 {
            return None;
        }
        let none = ReplicaParts::default();
        let from = oldest_read.min(newest);
        let mine: Vec<&ReplicaParts> = self
            .read
            .range(from..)
            .map(|(_, r)| r.replicas.get(node).unwrap_or(&none))
            .collect();
        let part = |p: &ReplicaParts, quota: &str| {
            p.by_quota.get(quota).copied().unwrap_or(p.default_part)
        };
        let quotas: HashSet<&String> = mine.iter().flat_map(|p| p.by_quota.keys()).collect();
        let by_quota = quotas
            .into_iter()
            .map(|q| {
                let least = mine
                    .iter()
                    .map(|p| part(p, q))
                    .fold(f64::INFINITY, f64::min);
                (q.clone(), least)
            })
            .collect();
        let default = mine
            .iter()
            .map(|p| p.default_part)
            .fold(f64::INFINITY, f64::min);
        Some(Parts {
            by_quota,
            default,
            edges,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(node: &str, edges: u32, demand: &[(&str, f64)]) -> QuotaDigest {
        QuotaDigest {
            node: node.into(),
            edges,
            demand: demand.iter().map(|(q, r)| (q.to_string(), *r)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn parts_follow_demand_and_sum_to_one() {
        let a = digest("a", 1, &[("key/k/rpm", 7.0)]);
        let b = digest("b", 2, &[("key/k/rpm", 3.0), ("tenant/t/tpm", 0.0)]);
        let pa = parts(&a, std::slice::from_ref(&b));
        let pb = parts(&b, std::slice::from_ref(&a));
        let q = "key/k/rpm";
        assert!((pa.by_quota[q] + pb.by_quota[q] - 1.0).abs() < 1e-9);
        assert!(
            pa.by_quota[q] > 0.65 && pa.by_quota[q] < 0.7,
            "{:?}",
            pa.by_quota
        );
        // Nobody asks for the tenant quota: parts by edge count.
        assert!((pa.by_quota["tenant/t/tpm"] - 1.0 / 3.0).abs() < 1e-9);
        assert!((pb.default - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!((pa.edges, pb.edges), (3, 3));
    }

    #[test]
    fn replicas_without_edges_take_no_part() {
        let a = digest("a", 2, &[("key/k/rpm", 1.0)]);
        let idle = digest("idle", 0, &[]);
        let pa = parts(&a, std::slice::from_ref(&idle));
        assert_eq!(pa.by_quota["key/k/rpm"], 1.0);
        assert_eq!(pa.default, 1.0);
        let pi = parts(&idle, &[a]);
        assert_eq!(pi.edges, 2);
    }

    #[test]
    fn parts_in_use_never_sum_past_one_while_the_records_change() {
        // Demand moves from a to b between two records.
        let first = record(&[digest("a", 1, &[("q", 9.0)]), digest("b", 1, &[("q", 1.0)])]);
        let second = record(&[digest("a", 1, &[("q", 1.0)]), digest("b", 1, &[("q", 9.0)])]);
        let (mut a, mut b) = (Records::default(), Records::default());
        a.read(10, first.clone());
        b.read(10, first.clone());
        let part = |r: &Records, node: &str, oldest: i64| {
            r.parts_of(node, 2, oldest).unwrap().by_quota["q"]
        };
        assert!((part(&a, "a", 10) + part(&b, "b", 10) - 1.0).abs() < 1e-9);
        // b has read the second record, a not yet (its digest says 10):
        // b is held to the lesser of its parts in both.
        b.read(20, second.clone());
        assert!(part(&a, "a", 10) + part(&b, "b", 10) <= 1.0 + 1e-9);
        assert!(part(&b, "b", 10) < 0.2, "b grows only once a has read it");
        // a reads it: a shrinks at once; b grows once a's digest says so.
        a.read(20, second);
        assert!(part(&a, "a", 10) < 0.2);
        assert!(part(&a, "a", 10) + part(&b, "b", 10) <= 1.0 + 1e-9);
        assert!(part(&b, "b", 20) > 0.8);
        assert!((part(&a, "a", 20) + part(&b, "b", 20) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_replica_keeps_what_it_used_and_the_rest_follows_demand() {
        let mut a = digest("a", 1, &[("q", 1.0)]);
        let mut b = digest("b", 1, &[("q", 9.0)]);
        // a used 60% of the limit while its part was larger.
        a.used.insert("q".into(), 0.6);
        b.used.insert("q".into(), 0.1);
        let pa = parts(&a, std::slice::from_ref(&b)).by_quota["q"];
        let pb = parts(&b, std::slice::from_ref(&a)).by_quota["q"];
        assert!((pa + pb - 1.0).abs() < 1e-9);
        assert!(pa >= 0.6, "a keeps what it used: {pa}");
        assert!(pb > 0.1 + 0.2, "b gets most of the 30% left: {pb}");
        // Over the limit already: nobody gets more than it used.
        a.used.insert("q".into(), 0.8);
        b.used.insert("q".into(), 0.4);
        let pa = parts(&a, std::slice::from_ref(&b)).by_quota["q"];
        assert!((pa - 0.8 / 1.2).abs() < 1e-9);
    }

    #[test]
    fn a_replica_no_record_names_takes_no_part() {
        let mut records = Records::default();
        assert!(records.parts_of("a", 1, 0).is_none(), "no record yet");
        records.read(1, record(&[digest("a", 2, &[("q", 1.0)])]));
        assert_eq!(records.parts_of("new", 3, 1).unwrap().default, 0.0);
        let edgeless = record(&[digest("a", 2, &[]), digest("idle", 0, &[])]);
        records.read(2, edgeless);
        assert_eq!(records.parts_of("idle", 2, 2).unwrap().default, 0.0);
        assert_eq!(records.parts_of("a", 2, 2).unwrap().default, 1.0);
        assert_eq!(records.newest(), 2);
    }
}
