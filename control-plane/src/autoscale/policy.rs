//! The decision for one pool, from its replicas' load, the clock and its
//! settings: HPA's rule per target (desired = ceil(current x observed /
//! target), within a 10% tolerance), the highest proposal wins, clamped to
//! the floor of the hour and max_replicas, then stabilized (up at the
//! lowest recommendation of the up window, down at the highest of the
//! down window). Floors act at once; a pool idle long enough goes to zero
//! when its floor allows. Pure: the caller passes the clock in.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;

use infermesh_proto::v1::{Load, Pool};
use jiff::Timestamp;

use super::floors;

/// Within this fraction of a target, the current count stands.
const TOLERANCE: f64 = 0.1;
/// Scale-down window when a pool sets none.
pub const DEFAULT_DOWN_SECONDS: u32 = 300;

/// What the autoscaler sees of a pool at one tick.
pub struct Observation<'a> {
    /// The pool's settings.
    pub pool: &'a Pool,
    /// Replicas that are not draining, with their latest load if any.
    pub replicas: Vec<(&'a str, Option<&'a Load>)>,
    /// An edge holds requests for the pool.
    pub demand: bool,
    /// Monotonic milliseconds, for windows.
    pub now_ms: u64,
    /// Wall-clock time, for floors.
    pub wall: Timestamp,
}

/// The outcome of one tick.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas not draining.
    pub current: u32,
    /// Replicas wanted.
    pub desired: u32,
    /// Fewest replicas now.
    pub floor: u32,
    /// In words.
    pub reason: String,
    /// Mean waiting requests per reporting replica.
    pub waiting: f64,
    /// Mean KV-cache use.
    pub kv_cache: f64,
    /// Mean GPU utilisation over replicas with a GPU.
    pub gpu: f64,
    /// Seconds without a request.
    pub idle_seconds: u32,
}

/// What the autoscaler remembers of a pool between ticks.
#[derive(Debug, Default)]
pub struct PoolState {
    recommendations: VecDeque<(u64, u32)>,
    desired: Option<u32>,
    idle_since: Option<u64>,
    requests_seen: HashMap<String, u64>,
}

struct Means {
    waiting: f64,
    kv_cache: f64,
    gpu: Option<f64>,
    reporting: usize,
}

fn means(replicas: &[(&str, Option<&Load>)]) -> Means {
    let loads: Vec<&Load> = replicas.iter().filter_map(|(_, l)| *l).collect();
    let n = loads.len().max(1) as f64;
    let gpus: Vec<f64> = loads.iter().filter_map(|l| l.gpu_utilization).collect();
    Means {
        waiting: loads.iter().map(|l| f64::from(l.waiting)).sum::<f64>() / n,
        kv_cache: loads.iter().map(|l| l.kv_cache_usage).sum::<f64>() / n,
        gpu: (!gpus.is_empty()).then(|| gpus.iter().sum::<f64>() / gpus.len() as f64),
        reporting: loads.len(),
    }
}

fn proposal(current: u32, observed: f64, target: f64) -> u32 {
    let ratio = observed / target;
    if (ratio - 1.0).abs() <= TOLERANCE {
        current
    } else {
        (f64::from(current) * ratio).ceil().min(f64::from(u32::MAX)) as u32
    }
}

impl PoolState {
    /// A state that remembers `desired` as the last decision, made at
    /// `now_ms` (a new leader continues from the stored decision, so a
    /// scale-down still waits a full window).
    pub fn seeded(desired: u32, now_ms: u64) -> Self {
        Self {
            recommendations: VecDeque::from([(now_ms, desired)]),
            desired: Some(desired),
            ..Default::default()
        }
    }

    /// Whether the pool served anything since the previous tick.
    fn busy(&mut self, obs: &Observation<'_>) -> bool {
        let mut busy = obs.demand;
        let mut seen = HashMap::with_capacity(obs.replicas.len());
        for (id, load) in &obs.replicas {
            let Some(load) = load else { continue };
            busy |= load.running > 0 || load.waiting > 0;
            let before = self.requests_seen.get(*id).copied().unwrap_or(0);
            busy |= load.requests_total != before;
            seen.insert(id.to_string(), load.requests_total);
        }
        self.requests_seen = seen;
        busy
    }

    /// Decides for one tick.
    pub fn decide(&mut self, obs: &Observation<'_>) -> Decision {
        let pool = obs.pool;
        let current = obs.replicas.len() as u32;
        let (floor, window) = floors::floor_at(pool, obs.wall);
        let floor = floor.min(pool.max_replicas);
        let zero_allowed = pool.scale_to_zero_idle_seconds > 0 && floor == 0;
        let lowest = if zero_allowed { 0 } else { floor.max(1) };
        let m = means(&obs.replicas);

        let busy = self.busy(obs);
        if busy {
            self.idle_since = None;
        } else if self.idle_since.is_none() {
            self.idle_since = Some(obs.now_ms);
        }
        let idle_ms = self.idle_since.map_or(0, |t| obs.now_ms.saturating_sub(t));
        let idle_seconds = (idle_ms / 1000) as u32;

        let mut reason = String::new();
        let mut rec = if current == 0 {
            if obs.demand {
                reason.push_str("requests are held at an edge: scaling up from zero");
                lowest.max(1)
            } else {
                reason.push_str("no replicas and no requests");
                lowest
            }
        } else if m.reporting == 0 {
            reason.push_str("no load reports yet: holding");
            current
        } else {
            self.metric_recommendation(pool, current, &m, &mut reason)
        };

        let idle_to_zero = zero_allowed
            && !obs.demand
            && current > 0
            && idle_ms >= u64::from(pool.scale_to_zero_idle_seconds) * 1000;
        if idle_to_zero {
            rec = 0;
            reason = format!("idle for {idle_seconds}s: scaling to zero");
        } else if zero_allowed && current > 0 {
            // Only idleness takes a pool to zero, never a low metric.
            rec = rec.max(1);
        }
        let clamped = rec.clamp(lowest, pool.max_replicas);
        if clamped > rec {
            match window {
                Some(w) => {
                    let _ = write!(reason, "; floor {floor} from {}", floors::describe(pool, w));
                }
                None => {
                    let _ = write!(reason, "; floor {lowest} (min_replicas)");
                }
            }
        } else if clamped < rec {
            let _ = write!(reason, "; capped at max_replicas {}", pool.max_replicas);
        }
        let desired = if idle_to_zero {
            self.recommendations.clear();
            0
        } else {
            self.stabilize(pool, obs.now_ms, clamped, current, lowest, &mut reason)
        };
        self.desired = Some(desired);
        Decision {
            current,
            desired,
            floor: lowest,
            reason,
            waiting: m.waiting,
            kv_cache: m.kv_cache,
            gpu: m.gpu.unwrap_or(0.0),
            idle_seconds,
        }
    }

    fn metric_recommendation(
        &self,
        pool: &Pool,
        current: u32,
        m: &Means,
        reason: &mut String,
    ) -> u32 {
        let targets = pool.scaling_targets.unwrap_or_default();
        let mut best: Option<(u32, String)> = None;
        let candidates = [
            (
                "waiting",
                Some(m.waiting),
                targets.waiting_per_replica,
                " per replica",
            ),
            ("KV-cache use", Some(m.kv_cache), targets.kv_cache_usage, ""),
            ("GPU utilisation", m.gpu, targets.gpu_utilization, ""),
        ];
        for (name, observed, target, unit) in candidates {
            let Some(observed) = observed.filter(|_| target > 0.0) else {
                continue;
            };
            let proposed = proposal(current, observed, target);
            if best.as_ref().is_none_or(|(b, _)| proposed > *b) {
                best = Some((
                    proposed,
                    format!(
                        "{name} {observed:.2}{unit} against target {target}: {current} -> {proposed}"
                    ),
                ));
            }
        }
        match best {
            Some((proposed, why)) => {
                reason.push_str(&why);
                proposed
            }
            None => {
                reason.push_str("no scaling targets set: holding");
                current
            }
        }
    }

    /// Applies the stabilization windows to a clamped recommendation.
    fn stabilize(
        &mut self,
        pool: &Pool,
        now_ms: u64,
        rec: u32,
        current: u32,
        lowest: u32,
        reason: &mut String,
    ) -> u32 {
        let behavior = pool.behavior.unwrap_or_default();
        let up_ms = u64::from(behavior.scale_up_stabilization_seconds.unwrap_or(0)) * 1000;
        let down_ms = u64::from(
            behavior
                .scale_down_stabilization_seconds
                .unwrap_or(DEFAULT_DOWN_SECONDS),
        ) * 1000;
        self.recommendations.push_back((now_ms, rec));
        let keep = up_ms.max(down_ms);
        while let Some((t, _)) = self.recommendations.front() {
            if now_ms.saturating_sub(*t) > keep {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
        let within = |window: u64| {
            self.recommendations
                .iter()
                .filter(move |(t, _)| now_ms.saturating_sub(*t) <= window)
                .map(|(_, r)| *r)
        };
        let previous = self.desired.unwrap_or(current);
        let desired = if rec > previous {
            let held = within(up_ms).min().unwrap_or(rec).max(previous);
            if held < rec {
                let _ = write!(
                    reason,
                    "; scale-up held at {held} by the {}s up window",
                    up_ms / 1000
                );
            }
            held
        } else if rec < previous {
            let held = within(down_ms).max().unwrap_or(rec).min(previous);
            if held > rec {
                let _ = write!(
                    reason,
                    "; scale-down held at {held} by the {}s down window",
                    down_ms / 1000
                );
            }
            held
        } else {
            rec
        };
        // A floor that rises acts at once, whatever the windows say.
        desired.clamp(lowest, pool.max_replicas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_proto::v1::{ReplicaFloor, ScalingBehavior, ScalingTargets};

    fn pool() -> Pool {
        Pool {
            name: "llama".into(),
            min_replicas: 1,
            max_replicas: 10,
            scaling_targets: Some(ScalingTargets {
                waiting_per_replica: 2.0,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn load(waiting: u32, running: u32, requests: u64) -> Load {
        Load {
            waiting,
            running,
            requests_total: requests,
            engine_healthy: true,
            ..Default::default()
        }
    }

    /// Drives a state through ticks of one second.
    struct Trace {
        pool: Pool,
        state: PoolState,
        now_ms: u64,
        wall: Timestamp,
    }

    impl Trace {
        fn new(pool: Pool) -> Self {
            Self {
                pool,
                state: PoolState::default(),
                now_ms: 0,
                wall: "2026-01-15T12:00:00Z".parse().unwrap(),
            }
        }

        fn tick(&mut self, loads: &[Load], demand: bool) -> Decision {
            let ids: Vec<String> = (0..loads.len()).map(|i| format!("r{i}")).collect();
            let obs = Observation {
                pool: &self.pool,
                replicas: ids
                    .iter()
                    .map(|s| s.as_str())
                    .zip(loads.iter().map(Some))
                    .collect(),
                demand,
                now_ms: self.now_ms,
                wall: self.wall,
            };
            let d = self.state.decide(&obs);
            self.now_ms += 1000;
            self.wall += jiff::SignedDuration::from_secs(1);
            d
        }
    }

    #[test]
    fn a_queue_above_target_scales_up_at_once() {
        let mut t = Trace::new(pool());
        let d = t.tick(&[load(6, 4, 10), load(6, 4, 10), load(6, 4, 10)], false);
        // 6 waiting per replica against 2: 3 x 3 = 9.
        assert_eq!(d.desired, 9, "{}", d.reason);
        assert_eq!(d.current, 3);
        assert!(
            d.reason
                .contains("waiting 6.00 per replica against target 2: 3 -> 9"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn within_tolerance_nothing_moves() {
        let mut t = Trace::new(pool());
        let d = t.tick(&[load(2, 4, 1), load(2, 4, 1)], false);
        assert_eq!(d.desired, 2);
        let d = t.tick(&[load(2, 4, 2), load(3, 4, 2)], false); // 2.5: 25% over
        assert_eq!(d.desired, 3);
    }

    #[test]
    fn max_replicas_caps_and_says_so() {
        let mut t = Trace::new(pool());
        let d = t.tick(&[load(50, 4, 1), load(50, 4, 1)], false);
        assert_eq!(d.desired, 10);
        assert!(
            d.reason.contains("capped at max_replicas 10"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn scale_down_waits_for_the_down_window_and_up_is_fast() {
        let mut p = pool();
        p.behavior = Some(ScalingBehavior {
            scale_up_stabilization_seconds: None,
            scale_down_stabilization_seconds: Some(60),
        });
        let mut t = Trace::new(p);
        let busy: Vec<Load> = (0..4).map(|_| load(4, 4, 1)).collect();
        assert_eq!(t.tick(&busy, false).desired, 8);
        // The queue drains: the recommendation falls, the decision holds for 60 s.
        let quiet: Vec<Load> = (0..4).map(|i| load(0, 4, 2 + i)).collect();
        for second in 1..=60 {
            let d = t.tick(&quiet, false);
            assert_eq!(d.desired, 8, "second {second}: {}", d.reason);
            assert!(
                d.reason
                    .contains("scale-down held at 8 by the 60s down window"),
                "{}",
                d.reason
            );
        }
        let d = t.tick(&quiet, false);
        assert_eq!(d.desired, 1, "{}", d.reason);
        // A burst goes straight up again.
        let d = t.tick(&busy, false);
        assert_eq!(d.desired, 8);
    }

    #[test]
    fn an_up_window_takes_the_lowest_recent_recommendation() {
        let mut p = pool();
        p.behavior = Some(ScalingBehavior {
            scale_up_stabilization_seconds: Some(3),
            scale_down_stabilization_seconds: Some(0),
        });
        let mut t = Trace::new(p);
        let two = [load(2, 1, 1), load(2, 1, 1)];
        assert_eq!(t.tick(&two, false).desired, 2);
        let spike = [load(10, 1, 2), load(10, 1, 2)];
        // A one-tick spike does not scale; a lasting one does after 3 s.
        for _ in 0..3 {
            let d = t.tick(&spike, false);
            assert_eq!(d.desired, 2, "{}", d.reason);
        }
        assert_eq!(t.tick(&spike, false).desired, 10);
    }

    #[test]
    fn kv_cache_and_gpu_targets_take_the_highest_proposal() {
        let mut p = pool();
        p.scaling_targets = Some(ScalingTargets {
            waiting_per_replica: 2.0,
            kv_cache_usage: 0.5,
            gpu_utilization: 0.8,
        });
        let mut t = Trace::new(p);
        let loads: Vec<Load> = (0..2)
            .map(|_| Load {
                kv_cache_usage: 0.9,
                gpu_utilization: Some(0.6),
                ..load(0, 3, 1)
            })
            .collect();
        let d = t.tick(&loads, false);
        // KV 0.9 / 0.5 x 2 = 3.6 -> 4; GPU 0.75 x 2 -> 2; waiting 0.
        assert_eq!(d.desired, 4, "{}", d.reason);
        assert!(d.reason.starts_with("KV-cache use 0.90"), "{}", d.reason);
        assert!((d.gpu - 0.6).abs() < 1e-9);
    }

    #[test]
    fn floors_rise_at_once_and_fall_through_the_down_window() {
        let mut p = pool();
        p.min_replicas = 5;
        p.floors = vec![ReplicaFloor {
            start: "00:00".into(),
            end: "08:00".into(),
            days: vec![],
            min_replicas: 1,
        }];
        p.behavior = Some(ScalingBehavior {
            scale_up_stabilization_seconds: None,
            scale_down_stabilization_seconds: Some(120),
        });
        let mut t = Trace::new(p);
        t.wall = "2026-01-15T07:59:58Z".parse().unwrap();
        let one = [load(0, 1, 1)];
        let d = t.tick(&one, false);
        assert_eq!((d.desired, d.floor), (1, 1), "{}", d.reason);
        t.tick(&[load(0, 1, 2)], false);
        // 08:00: the floor of 5 applies at this tick.
        let d = t.tick(&[load(0, 1, 3)], false);
        assert_eq!((d.desired, d.floor), (5, 5), "{}", d.reason);
        assert!(d.reason.contains("floor 5 (min_replicas)"), "{}", d.reason);
        // Midnight: the floor drops to 1, the decision follows after 120 s.
        t.wall = "2026-01-15T23:59:59Z".parse().unwrap();
        let five: Vec<Load> = (0..5).map(|i| load(0, 1, 10 + i)).collect();
        assert_eq!(t.tick(&five, false).desired, 5);
        let mut seconds = 0;
        loop {
            let d = t.tick(&five, false);
            if d.desired < 5 {
                assert_eq!(d.desired, 1, "{}", d.reason);
                break;
            }
            seconds += 1;
            assert!(seconds <= 121, "never scaled down: {}", d.reason);
        }
        assert!(seconds >= 119, "scaled down after {seconds}s");
    }

    #[test]
    fn idle_pools_go_to_zero_and_come_back_on_demand() {
        let mut p = pool();
        p.min_replicas = 0;
        p.scale_to_zero_idle_seconds = 30;
        let mut t = Trace::new(p);
        // Served requests between reports count as activity.
        for i in 0..10 {
            let d = t.tick(&[load(0, 0, i)], false);
            assert_eq!(d.desired, 1, "{}", d.reason);
            assert_eq!(d.idle_seconds, 0);
        }
        let mut seconds = 0;
        let d = loop {
            let d = t.tick(&[load(0, 0, 9)], false);
            if d.desired == 0 {
                break d;
            }
            seconds += 1;
            assert!(seconds < 40, "never scaled to zero: {}", d.reason);
        };
        assert_eq!(seconds, 30);
        assert!(
            d.reason.starts_with("idle for 30s: scaling to zero"),
            "{}",
            d.reason
        );
        // No replicas and no demand: stays at zero.
        let d = t.tick(&[], false);
        assert_eq!(d.desired, 0, "{}", d.reason);
        // An edge holds a request: one replica.
        let d = t.tick(&[], true);
        assert_eq!(d.desired, 1, "{}", d.reason);
        assert!(d.reason.contains("scaling up from zero"), "{}", d.reason);
    }

    #[test]
    fn without_scale_to_zero_a_pool_never_leaves_one_replica() {
        let mut p = pool();
        p.min_replicas = 0;
        let mut t = Trace::new(p);
        for _ in 0..400 {
            let d = t.tick(&[load(0, 0, 0)], false);
            assert_eq!(d.desired, 1, "{}", d.reason);
        }
    }

    #[test]
    fn a_new_leader_continues_from_the_stored_decision() {
        let mut t = Trace::new(pool());
        t.state = PoolState::seeded(6, 0);
        t.now_ms = 1000;
        let quiet = [load(0, 1, 1), load(0, 1, 1)];
        // The stored 6 holds for the default 300 s down window.
        let d = t.tick(&quiet, false);
        assert_eq!(d.desired, 6, "{}", d.reason);
        t.now_ms = 300_000;
        assert_eq!(t.tick(&quiet, false).desired, 6);
        // 301 s after the stored decision.
        assert_eq!(t.tick(&quiet, false).desired, 1);
    }

    #[test]
    fn replicas_without_reports_hold_the_count() {
        let p = pool();
        let mut state = PoolState::default();
        let obs = Observation {
            pool: &p,
            replicas: vec![("a", None), ("b", None)],
            demand: false,
            now_ms: 0,
            wall: Timestamp::UNIX_EPOCH,
        };
        let d = state.decide(&obs);
        assert_eq!(d.desired, 2);
        assert_eq!(d.reason, "no load reports yet: holding");
    }
}
