//! Admission against local buckets and control-plane grants, on a paused clock.

use std::sync::Arc;
use std::time::Duration;

use infermesh_proto::v1::{ApiKey, QuotaGrant, QuotaGrants, RateLimits, RoutingTable, Tenant};
use infermesh_runtime::api_key;
use infermesh_runtime::discovery::QuotaExchange;

use super::*;
use crate::access::Access;

fn principal(key_limits: RateLimits, tenant_limits: Option<RateLimits>) -> Principal {
    let made = api_key::generate();
    let table = RoutingTable {
        api_keys: vec![ApiKey {
            id: made.id.clone(),
            tenant: "acme".into(),
            secret_sha256: made.sha256.to_vec(),
            limits: Some(key_limits),
            ..Default::default()
        }],
        tenants: tenant_limits
            .map(|limits| Tenant {
                name: "acme".into(),
                limits: Some(limits),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    };
    let access = Access::from_table(
        &table,
        |_| None,
        &mut crate::table::skips::SkipLog::default(),
    );
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", made.secret.parse().unwrap());
    access.authenticate(&headers, 1).unwrap()
}

fn rpm(n: u64) -> RateLimits {
    RateLimits {
        requests_per_minute: n,
        ..Default::default()
    }
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name).unwrap().to_str().unwrap().to_string()
}

#[tokio::test(start_paused = true)]
async fn a_cold_edge_admits_its_share_then_refuses_with_openai_headers() {
    let limiter = Limiter::new(16);
    let p = principal(rpm(3), None);
    for left in [2, 1, 0] {
        let admitted = limiter.admit(&p, 10, Some(5)).unwrap();
        assert_eq!(header(&admitted.headers, "x-ratelimit-limit-requests"), "3");
        assert_eq!(
            header(&admitted.headers, "x-ratelimit-remaining-requests"),
            left.to_string()
        );
    }
    match limiter.admit(&p, 10, Some(5)) {
        Err(ApiError::RateLimited {
            kind,
            headers,
            message,
        }) => {
            assert_eq!(kind, "requests");
            assert_eq!(header(&headers, "retry-after"), "20");
            assert_eq!(header(&headers, "x-ratelimit-remaining-requests"), "0");
            assert!(message.contains("3 requests per minute"), "{message}");
        }
        other => panic!("expected 429, got {other:?}"),
    }
    tokio::time::advance(Duration::from_secs(20)).await;
    assert!(
        limiter.admit(&p, 10, Some(5)).is_ok(),
        "refilled after retry-after"
    );
}

#[tokio::test(start_paused = true)]
async fn token_reservations_are_settled_against_actual_usage() {
    let limiter = Limiter::new(16);
    let p = principal(
        RateLimits {
            tokens_per_minute: 100,
            ..Default::default()
        },
        None,
    );
    let first = limiter.admit(&p, 40, Some(50)).unwrap();
    assert_eq!(first.reserved_tokens(), 90);
    assert!(
        limiter.admit(&p, 40, Some(50)).is_err(),
        "only 10 tokens left"
    );
    first.settle(Used {
        prompt: 20,
        completion: 0,
    });
    let second = limiter.admit(&p, 40, Some(20)).unwrap();
    assert_eq!(
        header(&second.headers, "x-ratelimit-remaining-tokens"),
        "20"
    );
}

#[tokio::test(start_paused = true)]
async fn the_tenant_limit_binds_across_its_keys() {
    let limiter = Limiter::new(16);
    let tenant = Some(rpm(2));
    let a = principal(RateLimits::default(), tenant);
    assert!(limiter.admit(&a, 1, Some(1)).is_ok());
    assert!(limiter.admit(&a, 1, Some(1)).is_ok());
    match limiter.admit(&a, 1, Some(1)) {
        Err(ApiError::RateLimited { message, .. }) => assert!(message.contains("tenant acme")),
        other => panic!("expected 429, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_grant_replaces_the_local_share_and_a_stale_one_falls_back() {
    let limiter = Limiter::new(16);
    let p = principal(rpm(100), None);
    limiter.grants(QuotaGrants {
        sequence: 1,
        edges: 4,
        grants: vec![],
    });
    // Cold with four edges: a quarter of the limit.
    for _ in 0..25 {
        limiter.admit(&p, 1, Some(1)).unwrap();
    }
    assert!(limiter.admit(&p, 1, Some(1)).is_err());
    let quota = format!("key/{}/rpm", p.key.id);
    let report = limiter.usage().unwrap();
    let usage = report.quotas.iter().find(|q| q.quota == quota).unwrap();
    assert_eq!((usage.consumed, usage.demand), (25, 26));
    // The control plane saw those 25 and grants 10 more.
    limiter.grants(QuotaGrants {
        sequence: 2,
        edges: 4,
        grants: vec![QuotaGrant {
            quota: quota.clone(),
            allowance: 10,
            consumed_seen: 25,
            limit: 100,
            global_remaining: 40,
            reset_ms: 36_000,
            share: 0.25,
        }],
    });
    for _ in 0..10 {
        limiter.admit(&p, 1, Some(1)).unwrap();
    }
    assert!(limiter.admit(&p, 1, Some(1)).is_err(), "allowance spent");
    assert!(limiter.usage().is_some());
    assert!(limiter.usage().is_none(), "nothing new to report");
    // No share-out for a while: back to the local bucket, which refilled.
    tokio::time::advance(GRANT_FRESH_FOR + Duration::from_secs(12)).await;
    assert!(limiter.admit(&p, 1, Some(1)).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_new_stream_restarts_the_counters_it_reports() {
    let limiter = Arc::new(Limiter::new(16));
    let p = principal(rpm(100), None);
    limiter.admit(&p, 1, Some(1)).unwrap();
    limiter.stream_opened();
    limiter.admit(&p, 1, Some(1)).unwrap();
    let report = limiter.usage().unwrap();
    assert!(report.quotas.iter().all(|q| q.consumed == 1));
}

/// A control plane answering every borrow on `desk` with `lend(amount)`.
fn lender(
    desk: Arc<infermesh_runtime::loans::LoanDesk>,
    lend: impl Fn(i64) -> i64 + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            desk.signalled.notified().await;
            for borrow in desk.take() {
                desk.answer(infermesh_proto::v1::Loan {
                    id: borrow.id,
                    quota: borrow.quota.clone(),
                    amount: lend(borrow.amount),
                    global_remaining: 50,
                    reset_ms: 1_000,
                });
            }
        }
    })
}

fn granted(
    limiter: &Limiter,
    quota: &str,
    allowance: i64,
    consumed_seen: i64,
    global_remaining: i64,
) {
    limiter.grants(QuotaGrants {
        sequence: 1,
        edges: 2,
        grants: vec![QuotaGrant {
            quota: quota.to_string(),
            allowance,
            consumed_seen,
            limit: 100,
            global_remaining,
            reset_ms: 30_000,
            share: 0.05,
        }],
    });
}

#[tokio::test(start_paused = true)]
async fn an_edge_that_ran_dry_borrows_from_the_reserve_before_it_refuses() {
    let desk = Arc::new(infermesh_runtime::loans::LoanDesk::default());
    desk.opened();
    let limiter = Limiter::new(16).borrowing_through(desk.clone(), Duration::from_millis(20));
    let p = principal(rpm(100), None);
    let quota = format!("key/{}/rpm", p.key.id);
    // An idle edge's share: nothing of its own, though 90 are left globally.
    granted(&limiter, &quota, 0, 0, 90);
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = asked.clone();
    let _lender = lender(desk.clone(), move |amount| {
        log.lock().unwrap().push(amount);
        amount
    });
    // Asks for at least 2% of the limit, so the next request needs no loan.
    limiter
        .admit_or_borrow(&p, &Ask::tokens(1, Some(1)).choices(1))
        .await
        .unwrap();
    limiter
        .admit_or_borrow(&p, &Ask::tokens(1, Some(1)).choices(1))
        .await
        .unwrap();
    assert_eq!(
        *asked.lock().unwrap(),
        vec![2],
        "one loan of 2 for two requests"
    );
    // A new share-out, which saw the 2 admitted, replaces the loan.
    granted(&limiter, &quota, 1, 2, 88);
    limiter
        .admit_or_borrow(&p, &Ask::tokens(1, Some(1)).choices(1))
        .await
        .unwrap();
    assert_eq!(asked.lock().unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_spent_reserve_or_an_absent_control_plane_refuses_at_once() {
    let desk = Arc::new(infermesh_runtime::loans::LoanDesk::default());
    desk.opened();
    let limiter = Limiter::new(16).borrowing_through(desk.clone(), Duration::from_millis(20));
    let p = principal(rpm(100), None);
    let quota = format!("key/{}/rpm", p.key.id);
    granted(&limiter, &quota, 0, 0, 0);
    let lender = lender(desk.clone(), |_| 0);
    let refused = limiter
        .admit_or_borrow(&p, &Ask::tokens(1, Some(1)).choices(1))
        .await
        .unwrap_err();
    assert!(
        matches!(refused, ApiError::RateLimited { .. }),
        "{refused:?}"
    );
    // Nothing left globally: Retry-After is the refill time of one request.
    let ApiError::RateLimited { headers, .. } = refused else {
        unreachable!()
    };
    assert_eq!(header(&headers, "retry-after"), "1");
    lender.abort();
    // Stream closed: no question is asked, no wait.
    desk.closed();
    let started = Instant::now();
    assert!(
        limiter
            .admit_or_borrow(&p, &Ask::tokens(1, Some(1)).choices(1))
            .await
            .is_err()
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn every_choice_asked_for_is_reserved() {
    let limiter = Limiter::new(16);
    let p = principal(
        RateLimits {
            tokens_per_minute: 1_000,
            ..Default::default()
        },
        None,
    );
    // Cold with one edge: the whole limit. 10 + 4 x 100 = 410 reserved.
    let four = limiter
        .admit_or_borrow(&p, &Ask::tokens(10, Some(100)).choices(4))
        .await
        .unwrap();
    assert_eq!(four.reserved_tokens(), 410);
    // Without max_tokens: the default reserve per choice.
    let two = limiter
        .admit_or_borrow(&p, &Ask::tokens(10, None).choices(2))
        .await
        .unwrap();
    assert_eq!(two.reserved_tokens(), 10 + 2 * 16);
    assert!(
        limiter
            .admit_or_borrow(&p, &Ask::tokens(10, Some(300)).choices(2))
            .await
            .is_err(),
        "610 asked, 548 left"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_probe_spends_a_request() {
    let limiter = Limiter::new(16);
    let p = principal(rpm(2), None);
    limiter.count_request(&p);
    limiter.count_request(&p);
    assert!(
        limiter.admit(&p, 1, Some(1)).is_err(),
        "both requests spent on probes"
    );
    let quota = format!("key/{}/rpm", p.key.id);
    let report = limiter.usage().unwrap();
    let usage = report.quotas.iter().find(|q| q.quota == quota).unwrap();
    assert_eq!((usage.consumed, usage.demand), (2, 3));
}

#[tokio::test(start_paused = true)]
async fn a_peek_charges_nothing_and_refuses_as_admission_would() {
    let limiter = Limiter::new(16);
    let p = principal(rpm(1), None);
    for _ in 0..3 {
        limiter
            .peek(&p, &Ask::tokens(1, Some(1)).choices(1))
            .unwrap();
    }
    assert!(limiter.usage().is_none(), "nothing to report");
    limiter.admit(&p, 1, Some(1)).unwrap();
    let refused = limiter
        .peek(&p, &Ask::tokens(1, Some(1)).choices(1))
        .unwrap_err();
    assert!(
        matches!(refused, ApiError::RateLimited { .. }),
        "{refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_admission_dropped_unsettled_keeps_its_reservation_or_its_fallback_charge() {
    let limiter = Limiter::new(16);
    let p = principal(
        RateLimits {
            tokens_per_minute: 1_000,
            ..Default::default()
        },
        None,
    );
    let quota = format!("key/{}/tpm", p.key.id);
    let consumed = |limiter: &Limiter| {
        let report = limiter.usage().unwrap();
        report
            .quotas
            .iter()
            .find(|q| q.quota == quota)
            .unwrap()
            .consumed
    };
    drop(limiter.admit(&p, 10, Some(100)).unwrap());
    assert_eq!(
        consumed(&limiter),
        110,
        "no fallback: the reservation stands"
    );
    let mut left = limiter.admit(&p, 10, Some(100)).unwrap();
    left.charge_if_dropped(Used {
        prompt: 10,
        completion: 0,
    });
    drop(left);
    assert_eq!(consumed(&limiter), 120, "the client left: its prompt only");
    let mut settled = limiter.admit(&p, 10, Some(100)).unwrap();
    settled.charge_if_dropped(Used {
        prompt: 10,
        completion: 0,
    });
    settled.settle(Used {
        prompt: 42,
        completion: 0,
    });
    assert_eq!(consumed(&limiter), 162, "settled once, to what was used");
}

#[tokio::test(start_paused = true)]
async fn spend_budgets_reserve_the_cost_and_settle_what_was_used() {
    let limiter = Limiter::new(16);
    // A tenant may spend 0.01 a day; the model costs 0.001 per 1k prompt
    // tokens and 0.002 per 1k completion tokens.
    let p = principal(
        RateLimits::default(),
        Some(RateLimits {
            spend_per_day: "0.01".into(),
            ..Default::default()
        }),
    );
    let price = Price::parse("0.001", "0.002").unwrap();
    let ask = Ask::tokens(1000, Some(1000)).priced(price);
    let first = limiter.admit_or_borrow(&p, &ask).await.unwrap();
    assert_eq!(first.reserved_spend(), 3000, "0.001 + 0.002");
    assert_eq!(
        header(&first.headers, "x-ratelimit-limit-spend-day"),
        "0.01"
    );
    assert_eq!(
        header(&first.headers, "x-ratelimit-remaining-spend-day"),
        "0.007"
    );
    // Two more fit, a fourth does not.
    let second = limiter.admit_or_borrow(&p, &ask).await.unwrap();
    let third = limiter.admit_or_borrow(&p, &ask).await.unwrap();
    match limiter.admit_or_borrow(&p, &ask).await {
        Err(ApiError::RateLimited {
            kind,
            headers,
            message,
        }) => {
            assert_eq!(kind, "insufficient_quota");
            assert!(
                message.contains("Spend budget of 0.01 per day"),
                "{message}"
            );
            assert!(message.contains("may cost up to 0.003"), "{message}");
            let retry: u64 = header(&headers, "retry-after").parse().unwrap();
            assert!(
                retry > 0 && retry <= 24 * 3600,
                "until UTC midnight: {retry}"
            );
        }
        other => panic!("expected 429, got {other:?}"),
    }
    // The first used only its prompt and 100 completion tokens: 0.0012.
    first.settle(Used {
        prompt: 1000,
        completion: 100,
    });
    second.settle(Used::NONE);
    drop(third);
    let fourth = limiter.admit_or_borrow(&p, &ask).await.unwrap();
    assert_eq!(
        header(&fourth.headers, "x-ratelimit-remaining-spend-day"),
        // 0.01 - 0.0012 (first) - 0.003 (third, kept) - 0.003 (this one)
        "0.0028"
    );
    // A free model counts against no budget.
    let free = limiter
        .admit_or_borrow(&p, &Ask::tokens(1000, Some(1000)))
        .await
        .unwrap();
    assert_eq!(free.reserved_spend(), 0);
}
