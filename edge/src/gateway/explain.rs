//! ExplainRoute, answered by the edge: the control plane sends a query on
//! the edge's routing-table stream and the edge runs the stages that
//! choose a replica (parse, resolve, pick) against the table it holds, as
//! a request would, without their effects: nothing is sent, round robin's
//! turn is not taken, prefix affinity records nothing, no demand is
//! signalled. Only the control plane can ask (the stream is the edge's own,
//! mutually authenticated), and the admin API asks only for an admin.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use infermesh_proto::v1::{
    CandidateExplanation, CandidateLoad, ExplainQuery, RouteExplanation, RoutingTable,
};
use infermesh_runtime::discovery::ApplyTable;
use infermesh_runtime::time::now_unix_ms;
use serde_json::json;

use super::SESSION_HEADER;
use super::pick::hints;
use super::resolve::fallback;
use crate::openai::Endpoint;
use crate::route::{least_load, session_affinity};
use crate::table::{EdgeTable, ModelRoute, Policy, RouteHints};

/// A table builder whose tables also explain routes.
#[derive(Debug, Default)]
pub struct Explaining<A>(pub A);

impl<A: ApplyTable<Table = EdgeTable>> ApplyTable for Explaining<A> {
    type Table = EdgeTable;
    type Error = A::Error;

    fn apply(&mut self, table: RoutingTable) -> Result<EdgeTable, A::Error> {
        self.0.apply(table)
    }

    fn explain(&self, table: &EdgeTable, query: &ExplainQuery) -> Result<RouteExplanation, String> {
        explain(table, query)
    }
}

/// Which replica a request made of `query` would go to under `table`.
pub fn explain(table: &EdgeTable, query: &ExplainQuery) -> Result<RouteExplanation, String> {
    let (endpoint, body) = request_body(query)?;
    let request = crate::request::parse(endpoint, &body).map_err(|e| format!("body: {e}"))?;
    let route = table.route(&request.model).ok_or_else(|| {
        format!(
            "model {:?} is not served in region {:?} (no model or alias of that name)",
            request.model, table.region
        )
    })?;
    let mut explanation = RouteExplanation {
        model: route.model.clone(),
        serving_model: route.model.clone(),
        policy: route.policy.as_str().to_string(),
        ..Default::default()
    };
    // As resolve does: another region's edge first, then a fallback served
    // here, then a pool coming back from zero.
    let serving = if !route.upstreams.is_empty() {
        route.clone()
    } else if !table.failover.is_empty() {
        explanation.otherwise = "spillover".to_string();
        explanation.reason = format!(
            "no serving replica here: forwarded to the edge of {}",
            table
                .failover
                .iter()
                .map(|p| p.region.as_str())
                .collect::<Vec<_>>()
                .join(", then ")
        );
        return Ok(explanation);
    } else if let Some(other) = fallback(table, route, None) {
        explanation.serving_model = other.model.clone();
        explanation.policy = other.policy.as_str().to_string();
        other
    } else {
        let (otherwise, reason) = match &route.cold_start {
            Some(cold) => (
                "cold_start",
                format!(
                    "no serving replica here: held up to {:?} while pool {} scales up from zero",
                    cold.timeout, cold.pool
                ),
            ),
            None => (
                "unavailable",
                "no serving replica in this region".to_string(),
            ),
        };
        explanation.otherwise = otherwise.to_string();
        explanation.reason = reason;
        return Ok(explanation);
    };
    let mut headers = HeaderMap::new();
    if !query.session.is_empty() {
        let session = HeaderValue::from_str(&query.session)
            .map_err(|_| "session: must be printable ASCII".to_string())?;
        headers.insert(SESSION_HEADER, session);
    }
    let hints = hints(serving.policy, &request, &headers);
    explanation.prompt_blocks = hints.prefix.as_ref().map_or(0, |k| k.len() as u32);
    explanation.candidates = candidates(&serving, &hints, now_unix_ms());
    match serving.preview(&hints, &mut rand::rng()) {
        Some((chosen, reason)) => {
            explanation.chosen = chosen.id.clone();
            explanation.reason = reason.to_string();
        }
        None => {
            explanation.otherwise = "unavailable".to_string();
            explanation.reason = "no serving replica in this region".to_string();
        }
    }
    Ok(explanation)
}

/// The request the query stands for: its body (with the query's model,
/// when set, in place of the body's), or a completion of its prompt.
fn request_body(query: &ExplainQuery) -> Result<(Endpoint, Bytes), String> {
    if query.body.is_empty() {
        if query.model.is_empty() {
            return Err("model: required (or a body naming one)".to_string());
        }
        let body = json!({ "model": query.model, "prompt": query.prompt });
        return Ok((Endpoint::Completions, Bytes::from(body.to_string())));
    }
    let mut body: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&query.body).map_err(|e| format!("body: not a JSON object: {e}"))?;
    if !query.model.is_empty() {
        body.insert("model".to_string(), json!(query.model));
    }
    let endpoint = if body.contains_key("messages") {
        Endpoint::ChatCompletions
    } else {
        Endpoint::Completions
    };
    let body = serde_json::Value::Object(body).to_string();
    Ok((endpoint, Bytes::from(body)))
}

/// Every replica of `route` as its policy sees it at `now_ms`.
fn candidates(route: &ModelRoute, hints: &RouteHints, now_ms: i64) -> Vec<CandidateExplanation> {
    let all: Vec<_> = route.upstreams.iter().collect();
    let owner = hints
        .session
        .as_deref()
        .filter(|_| route.policy == Policy::SessionAffinity)
        .and_then(|s| session_affinity::owner(&all, s))
        .map(|u| u.id.clone());
    route
        .upstreams
        .iter()
        .map(|u| CandidateExplanation {
            endpoint: u.id.clone(),
            pool: u.pool.clone(),
            address: u.authority.to_string(),
            ejected: u.health.is_ejected(),
            in_flight: u32::try_from(u.in_flight.load(std::sync::atomic::Ordering::Relaxed))
                .unwrap_or(u32::MAX),
            load: u
                .load
                .fresh_at(now_ms)
                .map(|(running, waiting, kv)| CandidateLoad {
                    running,
                    waiting,
                    kv_cache_usage: kv,
                }),
            load_age_ms: u.load.age_ms_at(now_ms).unwrap_or(-1),
            prefix_blocks: hints
                .prefix
                .as_ref()
                .map_or(0, |keys| route.prefixes.held_by(keys, &u.id) as u32),
            score: least_load::score(u),
            session_owner: owner.as_deref() == Some(u.id.as_str()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use infermesh_proto::v1::RoutingPolicy;

    use super::*;
    use crate::route::fixtures::serving_table;
    use crate::table::EdgeTableBuilder;

    /// A table serving `llama` (alias `l3`) under `policy` on replicas `ids`.
    fn table(policy: RoutingPolicy, ids: &[&str]) -> EdgeTable {
        EdgeTableBuilder::default().build(serving_table(policy, ids))
    }

    fn query(model: &str, prompt: &str) -> ExplainQuery {
        ExplainQuery {
            model: model.into(),
            prompt: prompt.into(),
            ..Default::default()
        }
    }

    #[test]
    fn prefix_affinity_names_the_holder_and_records_nothing() {
        let table = table(RoutingPolicy::PrefixAffinity, &["a", "b"]);
        let route = table.route("llama").unwrap();
        let prompt = "the quick brown fox jumps over the lazy dog ".repeat(4);
        let keys = crate::prefix::block_keys(prompt.as_bytes());
        route.prefixes.record(&keys, &Arc::from("b"));
        route.upstreams[1].load.update("r=2;w=1;kv=0.500");
        let explained = explain(&table, &query("l3", &prompt)).unwrap();
        assert_eq!(explained.model, "llama");
        assert_eq!(explained.policy, "prefix_affinity");
        assert_eq!(explained.chosen, "b");
        assert_eq!(explained.prompt_blocks as usize, keys.len());
        assert!(
            explained.reason.starts_with("prefix match"),
            "{}",
            explained.reason
        );
        let b = &explained.candidates[1];
        assert_eq!(
            (b.endpoint.as_str(), b.prefix_blocks as usize),
            ("b", keys.len())
        );
        assert_eq!(
            b.load.as_ref().map(|l| (l.running, l.waiting)),
            Some((2, 1))
        );
        assert!(b.load_age_ms >= 0);
        assert_eq!(explained.candidates[0].prefix_blocks, 0);
        assert_eq!(explained.candidates[0].load_age_ms, -1, "never stamped");
        // Explaining another prompt records nothing for it.
        let other = "a different prompt that nobody has sent to any replica yet, long enough";
        explain(&table, &query("llama", other)).unwrap();
        let other_keys = crate::prefix::block_keys(other.as_bytes());
        assert!(route.prefixes.longest(&other_keys, |_| true).is_none());
    }

    #[test]
    fn round_robin_is_explained_without_taking_the_turn() {
        let table = table(RoutingPolicy::RoundRobin, &["a", "b", "c"]);
        let first = explain(&table, &query("llama", "")).unwrap().chosen;
        assert_eq!(explain(&table, &query("llama", "")).unwrap().chosen, first);
        let route = table.route("llama").unwrap();
        let (taken, _) = route.choose(&RouteHints::default(), &[]).unwrap();
        assert_eq!(
            taken.id, first,
            "the explained replica is the next one chosen"
        );
        assert_ne!(explain(&table, &query("llama", "")).unwrap().chosen, first);
    }

    #[test]
    fn a_chat_body_and_a_session_are_read_as_the_request_path_reads_them() {
        let table = table(RoutingPolicy::SessionAffinity, &["a", "b", "c"]);
        let body =
            r#"{"model":"llama","messages":[{"role":"user","content":"hi"}],"user":"alice"}"#;
        let by_user = explain(
            &table,
            &ExplainQuery {
                body: body.into(),
                ..Default::default()
            },
        )
        .unwrap();
        let owners: Vec<_> = by_user
            .candidates
            .iter()
            .filter(|c| c.session_owner)
            .collect();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].endpoint, by_user.chosen);
        assert_eq!(by_user.reason, "session affinity");
        let route = table.route("llama").unwrap();
        let hints = RouteHints {
            session: Some("alice".into()),
            ..Default::default()
        };
        assert_eq!(route.choose(&hints, &[]).unwrap().0.id, by_user.chosen);
    }

    #[test]
    fn bad_queries_are_refused_naming_what_is_wrong() {
        let table = table(RoutingPolicy::LeastLoad, &["a"]);
        let refused = |q: ExplainQuery| explain(&table, &q).unwrap_err();
        assert!(refused(query("", "hi")).starts_with("model:"));
        assert!(refused(query("mistral", "hi")).starts_with("model \"mistral\""));
        let bad_body = |body: &str| ExplainQuery {
            body: body.into(),
            ..Default::default()
        };
        assert!(refused(bad_body("[]")).starts_with("body:"));
        assert!(refused(bad_body(r#"{"model":"llama","messages":7}"#)).starts_with("body:"));
        let bad_session = ExplainQuery {
            session: "line\nbreak".into(),
            ..query("llama", "")
        };
        assert!(refused(bad_session).starts_with("session:"));
    }

    #[test]
    fn a_model_without_replicas_says_what_happens_instead() {
        let table = table(RoutingPolicy::LeastLoad, &[]);
        let explained = explain(&table, &query("llama", "hi")).unwrap();
        assert_eq!(explained.otherwise, "unavailable");
        assert!(explained.chosen.is_empty());
        assert!(explained.candidates.is_empty());
    }
}
