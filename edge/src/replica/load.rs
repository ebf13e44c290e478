//! A replica's latest engine load, as its sidecar stamps it on each
//! response (`x-infermesh-load: r=<running>;w=<waiting>;kv=<use>;f=<in
//! flight>`: the engine's figures as last scraped, and the sidecar's own
//! count of requests in flight as the response left it). Kept
//! in atomics so the response path writes it and the balancers read it
//! without a lock; a sample older than a few seconds is not used, because
//! a replica that stopped answering would otherwise look idle forever.

use std::sync::RwLock;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

use infermesh_runtime::time::now_unix_ms;

/// Load samples older than this are not used.
const LOAD_SAMPLE_TTL_MS: i64 = 5_000;

/// A replica's latest load as its sidecar stamped it on a response.
#[derive(Debug, Default)]
pub struct LoadSample {
    running: AtomicU32,
    waiting: AtomicU32,
    kv_milli: AtomicU32,
    /// Requests in flight at the sidecar that were not this edge's when
    /// the stamp was taken; `NO_COUNT` when the stamp had none.
    others: AtomicU32,
    at_ms: AtomicI64,
    /// LoRA adapters its engine holds (`name@version`, sorted), as the
    /// sidecar last listed them (`x-infermesh-adapters`).
    adapters: RwLock<Vec<String>>,
}

/// `others` of a stamp without the sidecar's count.
const NO_COUNT: u32 = u32::MAX;

impl LoadSample {
    /// Records a `r=<running>;w=<waiting>;kv=<use>` stamp; ignores a malformed one.
    pub fn update(&self, stamp: &str) {
        self.update_seen(stamp, 0);
    }

    /// Records a stamp that arrived while this edge had `mine` requests in
    /// flight to the replica (the stamped one included).
    pub fn update_seen(&self, stamp: &str, mine: usize) {
        self.update_at(stamp, mine, now_unix_ms());
    }

    /// Records a stamp as taken at `now_ms` (Unix milliseconds).
    pub fn update_at(&self, stamp: &str, mine: usize, now_ms: i64) {
        let Some((running, waiting, kv)) = parse(stamp) else {
            return;
        };
        let others = in_flight(stamp).map_or(NO_COUNT, |f| {
            u32::try_from(f.saturating_sub(mine)).unwrap_or(NO_COUNT - 1)
        });
        self.others.store(others, Ordering::Relaxed);
        self.running.store(running, Ordering::Relaxed);
        self.waiting.store(waiting, Ordering::Relaxed);
        self.kv_milli.store((kv * 1000.0) as u32, Ordering::Relaxed);
        self.at_ms.store(now_ms, Ordering::Relaxed);
    }

    /// (running, waiting, KV use) when fresh.
    pub fn fresh(&self) -> Option<(u32, u32, f64)> {
        self.fresh_at(now_unix_ms())
    }

    /// (running, waiting, KV use) when fresh at `now_ms` (Unix milliseconds).
    pub fn fresh_at(&self, now_ms: i64) -> Option<(u32, u32, f64)> {
        let age = now_ms - self.at_ms.load(Ordering::Relaxed);
        (age <= LOAD_SAMPLE_TTL_MS).then(|| {
            (
                self.running.load(Ordering::Relaxed),
                self.waiting.load(Ordering::Relaxed),
                f64::from(self.kv_milli.load(Ordering::Relaxed)) / 1000.0,
            )
        })
    }
}

impl LoadSample {
    /// Records the adapters a sidecar listed: `name@version` apart by spaces.
    pub fn update_adapters(&self, listed: &str) {
        let mut adapters: Vec<String> = listed
            .split(' ')
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        adapters.sort_unstable();
        *self.adapters.write().unwrap_or_else(|e| e.into_inner()) = adapters;
    }

    /// Whether its engine holds adapter `resident` (`name@version`).
    pub fn holds_adapter(&self, resident: &str) -> bool {
        self.adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .binary_search_by(|a| a.as_str().cmp(resident))
            .is_ok()
    }

    /// How many adapters its engine holds.
    pub fn adapter_count(&self) -> usize {
        self.adapters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Requests of others (other edges, direct callers) in flight at the
    /// replica when its latest fresh stamp was taken, where the stamp
    /// carried the sidecar's count.
    pub fn others_at(&self, now_ms: i64) -> Option<u32> {
        let others = self.others.load(Ordering::Relaxed);
        (others != NO_COUNT && self.fresh_at(now_ms).is_some()).then_some(others)
    }

    /// Milliseconds since the last sample at `now_ms`; `None` when none arrived.
    pub fn age_ms_at(&self, now_ms: i64) -> Option<i64> {
        let at = self.at_ms.load(Ordering::Relaxed);
        (at > 0).then(|| (now_ms - at).max(0))
    }
}

/// The sidecar's count of requests in flight (`f=`), when the stamp has it.
fn in_flight(stamp: &str) -> Option<usize> {
    stamp
        .split(';')
        .find_map(|part| match part.trim().split_once('=') {
            Some(("f", v)) => v.parse().ok(),
            _ => None,
        })
}

/// (running, waiting, KV use) of a well-formed stamp: all three fields,
/// KV use within 0 to 1.
fn parse(stamp: &str) -> Option<(u32, u32, f64)> {
    let mut fields = (None, None, None);
    for part in stamp.split(';') {
        match part.trim().split_once('=') {
            Some(("r", v)) => fields.0 = v.parse::<u32>().ok(),
            Some(("w", v)) => fields.1 = v.parse::<u32>().ok(),
            Some(("kv", v)) => fields.2 = v.parse::<f64>().ok().filter(|k| (0.0..=1.0).contains(k)),
            _ => {}
        }
    }
    let (running, waiting, kv) = fields;
    Some((running?, waiting?, kv?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    #[test]
    fn a_stamp_is_read_and_a_malformed_one_keeps_the_last_sample() {
        let load = LoadSample::default();
        load.update_at("r=1;w=0;kv=0.100", 0, NOW);
        for malformed in ["garbage", "r=1;w=0", "r=1;w=0;kv=1.5", "r=x;w=0;kv=0.2"] {
            load.update_at(malformed, 0, NOW + 1);
        }
        assert_eq!(load.fresh_at(NOW), Some((1, 0, 0.1)));
        load.update_at(" r=4 ; w=6 ; kv=0.900 ", 0, NOW);
        assert_eq!(load.fresh_at(NOW), Some((4, 6, 0.9)));
    }

    #[test]
    fn a_sample_goes_stale_after_its_time_to_live() {
        let load = LoadSample::default();
        assert_eq!(load.fresh_at(NOW), None, "never stamped");
        load.update_at("r=2;w=3;kv=0.500", 0, NOW);
        assert!(load.fresh_at(NOW + LOAD_SAMPLE_TTL_MS).is_some());
        assert_eq!(load.fresh_at(NOW + LOAD_SAMPLE_TTL_MS + 1), None);
    }

    #[test]
    fn the_sidecars_count_less_this_edges_own_is_what_others_have_in_flight() {
        let load = LoadSample::default();
        load.update_at("r=4;w=0;kv=0.100", 2, NOW);
        assert_eq!(load.others_at(NOW), None, "no count in the stamp");
        load.update_at("r=4;w=0;kv=0.100;f=5", 2, NOW);
        assert_eq!(load.others_at(NOW), Some(3));
        load.update_at("r=4;w=0;kv=0.100;f=1", 2, NOW);
        assert_eq!(
            load.others_at(NOW),
            Some(0),
            "requests of this edge ended since"
        );
        load.update_at("r=4;w=0;kv=0.100;f=x", 2, NOW);
        assert_eq!(load.others_at(NOW), None);
        load.update_at("r=4;w=0;kv=0.100;f=3", 0, NOW);
        assert_eq!(load.others_at(NOW + LOAD_SAMPLE_TTL_MS + 1), None, "stale");
    }

    #[test]
    fn the_listed_adapters_replace_the_last_list() {
        let load = LoadSample::default();
        assert!(!load.holds_adapter("bot@r1"));
        load.update_adapters("bot@r1 other@v2");
        assert!(load.holds_adapter("bot@r1") && load.holds_adapter("other@v2"));
        assert!(!load.holds_adapter("bot@r2"), "another version");
        load.update_adapters("other@v2");
        assert!(!load.holds_adapter("bot@r1"));
        assert_eq!(load.adapter_count(), 1);
        load.update_adapters("");
        assert_eq!(load.adapter_count(), 0);
    }

    #[test]
    fn update_stamps_the_sample_with_the_wall_clock() {
        let load = LoadSample::default();
        load.update("r=1;w=2;kv=0.250");
        assert_eq!(load.fresh(), Some((1, 2, 0.25)));
    }
}
