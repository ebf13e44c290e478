//! Flow control: who waits, and who goes next, when a model's replicas are
//! full. A replica is full at its pool's concurrency bound, counting the
//! requests this edge has in flight to it and those of others as its
//! sidecar last counted them, or, without a bound, while its stamp shows
//! requests waiting in the engine; when every replica of the route is
//! full, a new request waits here instead of joining an engine queue, in
//! the order the edge decides rather than arrival order at the engines:
//!
//! - by priority band (critical, then standard); sheddable requests are
//!   not held at all: they get 503 at once, so they go first when the
//!   fleet is full;
//! - within a band, tenants share by a virtual token counter (VTC): the
//!   waiting tenant that has been served the fewest weighted tokens goes
//!   next, a tenant that starts waiting is raised to the least counter of
//!   those already waiting (no banking of idle time), and decode tokens
//!   weigh twice prefill tokens;
//! - within a tenant, first come first served.
//!
//! A waiter goes when a request of the route finishes (its ticket drops)
//! or, while requests wait, at each short tick on which the route is no
//! longer full. One goes per event, so the engines are refilled one slot
//! at a time. A request that cannot start within the model's queue
//! deadline gets 503 with `Retry-After`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::table::ModelRoute;

pub mod band;

pub use band::Band;

/// How often a route with waiters is looked at again without any request
/// finishing (a load sample may have gone stale or shown room).
const TICK: Duration = Duration::from_millis(25);
/// Weight of an output token against a prompt token in the fair share.
const DECODE_WEIGHT: f64 = 2.0;
/// A tenant let through this recently counts in the fair share of slots.
const RECENT: Duration = Duration::from_secs(1);
/// Slots a tenant over its share leaves free while other tenants are about.
const BURST_SLOTS: u64 = 1;

/// Why a request was not let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// A sheddable request while the route is full.
    Sheddable,
    /// No room within the queue deadline.
    Timeout,
}

impl Shed {
    /// The reason's name in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Sheddable => "sheddable",
            Shed::Timeout => "timeout",
        }
    }
}

/// Whether every replica of `route` is full: at its pool's concurrency
/// bound (`Upstream::at_bound`: this edge's requests in flight to it and
/// others' as its sidecar last counted them); or, without a bound, with
/// requests waiting in its engine as its latest fresh load sample shows.
pub fn full(route: &ModelRoute) -> bool {
    let mut candidates = route
        .upstreams
        .iter()
        .filter(|u| !u.health.is_ejected())
        .peekable();
    candidates.peek().is_some() && candidates.all(|u| replica_full(u))
}

fn replica_full(upstream: &crate::replica::Upstream) -> bool {
    if upstream.max_concurrency > 0 {
        return upstream.at_bound();
    }
    upstream
        .load
        .fresh()
        .is_some_and(|(_, waiting, _)| waiting > 0)
}

struct Waiter {
    go: oneshot::Sender<()>,
    cost: f64,
}

#[derive(Default)]
struct Inner {
    /// Waiters by band, then tenant, in arrival order.
    waiting: BTreeMap<Band, BTreeMap<String, VecDeque<Waiter>>>,
    /// Weighted tokens served per tenant.
    served: HashMap<String, f64>,
    /// The route to judge fullness by (the latest table's).
    route: Option<Arc<ModelRoute>>,
    ticking: bool,
    /// Tickets out: requests let through and not finished, some of which
    /// may not have reached a replica (or its in-flight count) yet.
    active: usize,
    /// Tickets out by tenant.
    active_by_tenant: HashMap<String, usize>,
    /// When each tenant was last let through.
    last_seen: HashMap<String, Instant>,
}

/// Whether a request may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// A slot no other tenant's share is kept for.
    Shared,
    /// A slot of its tenant's own fair share.
    Headroom,
    /// None.
    Full,
}

impl Inner {
    /// Whether a request of `tenant` has room on the route now. Without
    /// bounds on every replica, room is what the engines' load shows. With
    /// them, the tickets out count against their sum, and each tenant let
    /// through in the last second has a fair share of the slots (their sum
    /// over those tenants): a tenant under its share may take a slot at
    /// once, even ahead of others' waiters; one at or over it only a slot
    /// that no other tenant's unused share is kept for, and never the last
    /// free one while others are about (`BURST_SLOTS`). A light tenant does
    /// not wait behind a heavy one's backlog, nor, mostly, for a burst
    /// beyond its share; a tenant alone may use every slot.
    ///
    /// Right after a request finished (`finished`), the engines' load is
    /// not asked: the stamps are older than the slot that just freed.
    fn room(&self, route: &ModelRoute, tenant: &str, now: Instant, finished: bool) -> Room {
        if !finished && full(route) {
            return Room::Full;
        }
        let bound: Option<u64> = route
            .upstreams
            .iter()
            .map(|u| (u.max_concurrency > 0).then_some(u64::from(u.max_concurrency)))
            .sum();
        let Some(bound) = bound else {
            return Room::Shared;
        };
        let active = self.active as u64;
        if active >= bound {
            return Room::Full;
        }
        let holding = |t: &str| self.active_by_tenant.get(t).copied().unwrap_or(0) as u64;
        let recent = |t: &str| {
            holding(t) > 0
                || self
                    .last_seen
                    .get(t)
                    .is_some_and(|at| now.saturating_duration_since(*at) < RECENT)
        };
        let others: Vec<&String> = self
            .last_seen
            .keys()
            .filter(|t| t.as_str() != tenant && recent(t))
            .collect();
        let share = bound.div_ceil(others.len() as u64 + 1);
        let mine = holding(tenant);
        if mine < share {
            return Room::Headroom;
        }
        let kept_for_others: u64 = others
            .iter()
            .map(|t| share.saturating_sub(holding(t)))
            .sum();
        // While others are about, one slot more stays free for a burst of
        // theirs beyond their share: a tenant over its share never takes
        // the last free slot from a light tenant's next request.
        let burst = u64::from(!others.is_empty()) * BURST_SLOTS;
        if active + kept_for_others + burst < bound {
            Room::Shared
        } else {
            Room::Full
        }
    }

    /// Puts `waiter` of `tenant` at the back of its queue in `band`; the
    /// band's depth. No banking: a tenant that starts waiting is raised to
    /// the least counter of the tenants already waiting in its band.
    fn enqueue(&mut self, band: Band, tenant: &str, waiter: Waiter) -> usize {
        let joining = self
            .waiting
            .get(&band)
            .is_none_or(|t| !t.contains_key(tenant));
        if joining && let Some(least) = self.least_waiting(band) {
            let counter = self.served.entry(tenant.to_string()).or_default();
            *counter = counter.max(least);
        }
        self.waiting
            .entry(band)
            .or_default()
            .entry(tenant.to_string())
            .or_default()
            .push_back(waiter);
        self.tenant_depth(band, tenant)
    }

    /// Whether `tenant` has requests waiting in any band.
    fn waits(&self, tenant: &str) -> bool {
        self.waiting.values().any(|t| t.contains_key(tenant))
    }

    /// Counts a ticket of `tenant` out.
    fn let_through(&mut self, tenant: &str, now: Instant) {
        self.active += 1;
        *self.active_by_tenant.entry(tenant.to_string()).or_default() += 1;
        self.last_seen.insert(tenant.to_string(), now);
    }

    /// Counts a ticket of `tenant` back in.
    fn returned(&mut self, tenant: &str) {
        self.active = self.active.saturating_sub(1);
        if let Some(n) = self.active_by_tenant.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.active_by_tenant.remove(tenant);
            }
        }
    }

    #[cfg(test)]
    fn depth(&self, band: Band) -> usize {
        self.waiting
            .get(&band)
            .map_or(0, |t| t.values().map(VecDeque::len).sum())
    }

    /// Requests of `tenant` waiting in `band`.
    fn tenant_depth(&self, band: Band, tenant: &str) -> usize {
        self.waiting
            .get(&band)
            .and_then(|t| t.get(tenant))
            .map_or(0, VecDeque::len)
    }

    /// The least counter among tenants waiting in `band`.
    fn least_waiting(&self, band: Band) -> Option<f64> {
        self.waiting
            .get(&band)?
            .keys()
            .map(|t| self.counter(t))
            .reduce(f64::min)
    }

    fn counter(&self, tenant: &str) -> f64 {
        self.served.get(tenant).copied().unwrap_or(0.0)
    }

    /// Takes the next waiter that has room on `route`: bands from the
    /// most urgent, within a band tenants from the least counter, the
    /// oldest request of the first tenant with room; charged to its tenant
    /// and counted out. A tenant over its share does not hold up one
    /// under it. None when no waiting tenant has room.
    fn next_with_room(
        &mut self,
        route: &ModelRoute,
        now: Instant,
        finished: bool,
    ) -> Option<(String, Waiter)> {
        let mut turns: Vec<(Band, f64, String)> = self
            .waiting
            .iter()
            .flat_map(|(band, tenants)| tenants.keys().map(|t| (*band, self.counter(t), t.clone())))
            .collect();
        turns.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        for (band, _, tenant) in turns {
            if self.room(route, &tenant, now, finished) == Room::Full {
                continue;
            }
            if let Some(waiter) = self.take(band, &tenant) {
                self.let_through(&tenant, now);
                return Some((tenant, waiter));
            }
        }
        None
    }

    /// The oldest waiter of `tenant` in `band` that has not given up,
    /// charged to its tenant; waiters that gave up are dropped on the way.
    fn take(&mut self, band: Band, tenant: &str) -> Option<Waiter> {
        loop {
            let tenants = self.waiting.get_mut(&band)?;
            let queue = tenants.get_mut(tenant)?;
            let waiter = queue.pop_front();
            if queue.is_empty() {
                tenants.remove(tenant);
            }
            if tenants.is_empty() {
                self.waiting.remove(&band);
            }
            let waiter = waiter?;
            if waiter.go.is_closed() {
                // Gave up (deadline, client gone) without being removed yet.
                continue;
            }
            *self.served.entry(tenant.to_string()).or_default() += waiter.cost;
            return Some(waiter);
        }
    }
}

/// What the queue reports to metrics.
pub trait FlowObserver: Send + Sync {
    /// Requests of `tenant` in `band` waiting now.
    fn depth(&self, band: Band, tenant: &str, depth: usize);
    /// A request of `tenant` in `band` waited `waited` and went on.
    fn waited(&self, band: Band, tenant: &str, waited: Duration);
    /// A request of `tenant` in `band` was shed.
    fn shed(&self, band: Band, tenant: &str, why: Shed);
}

/// One model's queue, kept across table pushes.
pub struct Queue {
    inner: Mutex<Inner>,
    observer: Option<Arc<dyn FlowObserver>>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Queue")
            .field(
                "waiting",
                &inner.waiting.values().map(|t| t.len()).sum::<usize>(),
            )
            .finish()
    }
}

/// Held while a request let through is being answered; dropping it lets
/// the next waiter go.
#[derive(Debug)]
pub struct Ticket {
    queue: Arc<Queue>,
    tenant: String,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.queue.release_one(&self.tenant);
    }
}

impl Queue {
    /// An empty queue reporting to `observer`.
    pub fn new(observer: Option<Arc<dyn FlowObserver>>) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::default(),
            observer,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets a request of `tenant` in `band`, of `prompt` tokens asking up
    /// to `output`, through to `route` now or when its turn comes, within
    /// `deadline`.
    pub async fn enter(
        self: &Arc<Self>,
        route: &Arc<ModelRoute>,
        band: Band,
        tenant: &str,
        prompt: u64,
        output: u64,
        deadline: Duration,
    ) -> Result<Ticket, Shed> {
        let cost = prompt as f64 + DECODE_WEIGHT * output as f64;
        let (go, wait) = oneshot::channel();
        {
            let mut inner = self.lock();
            inner.route = Some(route.clone());
            let now = Instant::now();
            // Within its share a tenant goes ahead of others' waiters
            // (never of its own); beyond it only when nobody waits.
            let at_once = match inner.room(route, tenant, now, false) {
                Room::Shared => inner.waiting.is_empty(),
                Room::Headroom => !inner.waits(tenant),
                Room::Full => false,
            };
            if at_once {
                *inner.served.entry(tenant.to_string()).or_default() += cost;
                inner.let_through(tenant, now);
                return Ok(self.ticket(tenant));
            }
            if band == Band::Sheddable {
                drop(inner);
                self.observe_shed(band, tenant, Shed::Sheddable);
                return Err(Shed::Sheddable);
            }
            let depth = inner.enqueue(band, tenant, Waiter { go, cost });
            let start_ticking = !std::mem::replace(&mut inner.ticking, true);
            drop(inner);
            if let Some(observer) = &self.observer {
                observer.depth(band, tenant, depth);
            }
            if start_ticking {
                tokio::spawn(self.clone().tick());
            }
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(deadline, wait).await;
        let depth = self.lock().tenant_depth(band, tenant);
        if let Some(observer) = &self.observer {
            observer.depth(band, tenant, depth);
        }
        match outcome {
            Ok(Ok(())) => {
                if let Some(observer) = &self.observer {
                    observer.waited(band, tenant, started.elapsed());
                }
                // Counted out by whoever let it go.
                Ok(self.ticket(tenant))
            }
            // Timed out (the waiter is skipped when its turn comes), or the
            // queue went away.
            _ => {
                self.observe_shed(band, tenant, Shed::Timeout);
                Err(Shed::Timeout)
            }
        }
    }

    fn ticket(self: &Arc<Self>, tenant: &str) -> Ticket {
        Ticket {
            queue: self.clone(),
            tenant: tenant.to_string(),
        }
    }

    fn observe_shed(&self, band: Band, tenant: &str, why: Shed) {
        if let Some(observer) = &self.observer {
            observer.shed(band, tenant, why);
        }
    }

    /// A request of `tenant` finished: the next waiter goes in its place.
    fn release_one(&self, tenant: &str) {
        let mut inner = self.lock();
        inner.returned(tenant);
        self.send_next(inner, true);
    }

    /// Lets the next waiter with room go, if any; `finished` when a request
    /// just finished.
    fn send_next(&self, mut inner: std::sync::MutexGuard<'_, Inner>, finished: bool) {
        let Some(route) = inner.route.clone() else {
            return;
        };
        let next = inner.next_with_room(&route, Instant::now(), finished);
        let Some((tenant, waiter)) = next else {
            return;
        };
        drop(inner);
        // A waiter that gave up meanwhile never holds its ticket: its
        // place is given back.
        if waiter.go.send(()).is_err() {
            self.lock().returned(&tenant);
        }
    }

    /// While requests wait: lets one go whenever the route has room.
    async fn tick(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut inner = self.lock();
            if inner.waiting.is_empty() {
                inner.ticking = false;
                return;
            }
            self.send_next(inner, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::fixtures::serving_table;
    use crate::table::EdgeTableBuilder;
    use infermesh_proto::v1::RoutingPolicy;

    fn route(ids: &[&str]) -> Arc<ModelRoute> {
        let table = EdgeTableBuilder::default().build(serving_table(RoutingPolicy::LeastLoad, ids));
        table.route("llama").unwrap().clone()
    }

    fn fill(route: &ModelRoute, waiting: u32) {
        for u in &route.upstreams {
            u.load.update(&format!("r=4;w={waiting};kv=0.500"));
        }
    }

    /// Starts a waiter and returns its outcome's handle once it waits.
    async fn waiting(
        queue: &Arc<Queue>,
        route: &Arc<ModelRoute>,
        band: Band,
        tenant: &str,
        cost: u64,
    ) -> tokio::task::JoinHandle<Result<Ticket, Shed>> {
        let before = queue.lock().depth(band);
        let handle = tokio::spawn({
            let (queue, route, tenant) = (queue.clone(), route.clone(), tenant.to_string());
            async move {
                queue
                    .enter(&route, band, &tenant, cost, 0, Duration::from_secs(60))
                    .await
            }
        });
        while queue.lock().depth(band) == before {
            tokio::task::yield_now().await;
        }
        handle
    }

    #[test]
    fn a_replica_is_full_at_its_bound_or_with_a_queue_in_its_engine() {
        let mut table = serving_table(RoutingPolicy::LeastLoad, &["a"]);
        table.pools[0].max_concurrency = 2;
        let table = EdgeTableBuilder::default().build(table);
        let bounded = table.route("llama").unwrap().clone();
        let a = &bounded.upstreams[0];
        assert!(!full(&bounded), "idle");
        a.in_flight.store(2, std::sync::atomic::Ordering::Relaxed);
        assert!(full(&bounded), "two in flight from this edge");
        a.in_flight.store(0, std::sync::atomic::Ordering::Relaxed);
        a.load.update("r=2;w=0;kv=0.100");
        assert!(full(&bounded), "two running, sent by other edges");
        let unbounded = route(&["b"]);
        unbounded.upstreams[0]
            .in_flight
            .store(50, std::sync::atomic::Ordering::Relaxed);
        assert!(
            !full(&unbounded),
            "no bound: only a queue in the engine counts"
        );
        fill(&unbounded, 1);
        assert!(full(&unbounded));
    }

    #[test]
    fn a_tenant_over_its_share_does_not_hold_up_one_under_it() {
        let mut table = serving_table(RoutingPolicy::LeastLoad, &["a"]);
        table.pools[0].max_concurrency = 4;
        let route = EdgeTableBuilder::default()
            .build(table)
            .route("llama")
            .unwrap()
            .clone();
        let now = Instant::now();
        let mut inner = Inner::default();
        for _ in 0..3 {
            inner.let_through("heavy", now);
        }
        let waiter = || Waiter {
            go: oneshot::channel().0,
            cost: 1.0,
        };
        let (light_go, mut light_went) = oneshot::channel();
        inner.enqueue(Band::Standard, "heavy", waiter());
        inner.enqueue(
            Band::Standard,
            "light",
            Waiter {
                go: light_go,
                cost: 1.0,
            },
        );
        inner.last_seen.insert("light".into(), now);
        // The heavy tenant's turn by counter, but it holds 3 of 4 slots,
        // over its half: the light one, holding none, goes.
        inner.served.insert("light".into(), 100.0);
        let (tenant, waiter) = inner
            .next_with_room(&route, now, true)
            .expect("light has room");
        assert_eq!(tenant, "light");
        waiter.go.send(()).unwrap();
        assert!(light_went.try_recv().is_ok());
        assert!(
            inner.next_with_room(&route, now, true).is_none(),
            "the heavy one still has no room"
        );
        assert_eq!(inner.tenant_depth(Band::Standard, "heavy"), 1);
    }

    #[tokio::test]
    async fn a_light_tenant_gets_its_share_of_the_slots_past_a_heavy_ones_backlog() {
        let mut table = serving_table(RoutingPolicy::LeastLoad, &["a", "b"]);
        table.pools[0].max_concurrency = 4;
        let table = EdgeTableBuilder::default().build(table);
        let route = table.route("llama").unwrap().clone();
        let queue = Queue::new(None);
        let enter = |tenant: &'static str| {
            let (queue, route) = (queue.clone(), route.clone());
            async move {
                queue
                    .enter(
                        &route,
                        Band::Standard,
                        tenant,
                        1,
                        1,
                        Duration::from_millis(1),
                    )
                    .await
            }
        };
        // Alone, the heavy tenant's fair share is every slot.
        let mut heavy = Vec::new();
        for _ in 0..6 {
            heavy.push(enter("heavy").await.expect("alone: its share is all 8"));
        }
        let seventh = enter("heavy").await.expect("alone: its share is all 8");
        drop(seventh);
        // A light tenant comes: half the slots are its share, and the slots
        // of it the light tenant does not use are kept: the heavy one waits.
        let light = enter("light").await.expect("under its fair share");
        assert_eq!(enter("heavy").await.unwrap_err(), Shed::Timeout);
        let light_again = enter("light").await.expect("still under its share");
        assert_eq!(
            enter("light").await.unwrap_err(),
            Shed::Timeout,
            "all 8 taken"
        );
        drop((light, light_again, heavy));
    }

    #[tokio::test]
    async fn with_room_a_request_goes_at_once_and_a_sheddable_one_too() {
        let queue = Queue::new(None);
        let route = route(&["a", "b"]);
        fill(&route, 0);
        assert!(!full(&route));
        for band in [Band::Critical, Band::Standard, Band::Sheddable] {
            let ticket = queue
                .enter(&route, band, "acme", 10, 10, Duration::from_millis(1))
                .await;
            assert!(ticket.is_ok(), "{band:?}");
        }
    }

    #[tokio::test]
    async fn when_full_sheddable_requests_are_shed_and_others_wait_their_turn() {
        let queue = Queue::new(None);
        let route = route(&["a", "b"]);
        fill(&route, 2);
        assert!(full(&route));
        let shed = queue
            .enter(
                &route,
                Band::Sheddable,
                "acme",
                1,
                1,
                Duration::from_secs(5),
            )
            .await;
        assert_eq!(shed.unwrap_err(), Shed::Sheddable);
        let standard = waiting(&queue, &route, Band::Standard, "acme", 1).await;
        let critical = waiting(&queue, &route, Band::Critical, "acme", 1).await;
        // One request finishes: the critical one goes first.
        queue.release_one("acme");
        let critical = critical.await.unwrap().expect("critical went");
        assert!(!standard.is_finished());
        drop(critical);
        standard.await.unwrap().expect("then the standard one");
    }

    #[tokio::test]
    async fn tenants_share_by_served_tokens_not_by_arrival() {
        let queue = Queue::new(None);
        let route = route(&["a"]);
        fill(&route, 1);
        // The noisy tenant queued five first; the quiet one arrives last.
        let mut noisy = Vec::new();
        for _ in 0..5 {
            noisy.push(waiting(&queue, &route, Band::Standard, "noisy", 100).await);
        }
        let quiet = waiting(&queue, &route, Band::Standard, "quiet", 100).await;
        queue.release_one("acme");
        let _first = noisy.remove(0).await.unwrap().unwrap();
        queue.release_one("acme");
        let _second = quiet
            .await
            .unwrap()
            .expect("the quiet tenant's first request goes second");
        tokio::task::yield_now().await;
        assert!(noisy.iter().all(|n| !n.is_finished()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_cannot_start_in_time_is_refused_and_skipped() {
        let queue = Queue::new(None);
        let route = route(&["a"]);
        fill(&route, 1);
        let late = queue
            .enter(
                &route,
                Band::Standard,
                "acme",
                1,
                1,
                Duration::from_millis(100),
            )
            .await;
        assert_eq!(late.unwrap_err(), Shed::Timeout);
        let next = waiting(&queue, &route, Band::Standard, "acme", 1).await;
        queue.release_one("acme");
        next.await
            .unwrap()
            .expect("the timed-out waiter was skipped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_route_with_room_again_lets_waiters_go_without_a_finish() {
        let queue = Queue::new(None);
        let route = route(&["a"]);
        fill(&route, 1);
        let waiter = waiting(&queue, &route, Band::Standard, "acme", 1).await;
        fill(&route, 0);
        tokio::time::advance(TICK * 2).await;
        waiter.await.unwrap().expect("the tick let it go");
    }
}
