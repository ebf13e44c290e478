//! Reads the figures routing needs out of an engine's Prometheus text.
//! Names checked against current vLLM (v1 engine) and SGLang sources, with
//! vLLM's older names accepted too:
//!
//! | figure         | vLLM                                                                  | SGLang                     |
//! |----------------|-----------------------------------------------------------------------|----------------------------|
//! | running        | `vllm:num_requests_running`                                           | `sglang:num_running_reqs`  |
//! | waiting        | `vllm:num_requests_waiting`                                           | `sglang:num_queue_reqs`    |
//! | KV-cache use   | `vllm:kv_cache_usage_perc` (old: `vllm:gpu_cache_usage_perc`)         | `sglang:token_usage`       |
//! | prefix cache   | `vllm:prefix_cache_{hits,queries}_total` (old: `gpu_prefix_cache_*`)  | `sglang:cache_hit_rate`    |
//!
//! Values of one name are summed over label sets (one engine may expose
//! several `model_name` or `engine` labels).

use std::collections::HashMap;

use super::EngineKind;

/// Sums of every sample in a Prometheus text exposition, by metric name.
#[derive(Debug, Default, Clone)]
pub struct Samples(HashMap<String, f64>);

impl Samples {
    /// Parses the text format; malformed lines are skipped, not fatal.
    pub fn parse(text: &str) -> Self {
        let mut sums: HashMap<String, f64> = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, rest) = match line.find(['{', ' ', '\t']) {
                Some(i) => line.split_at(i),
                None => continue,
            };
            let rest = match rest.strip_prefix('{') {
                Some(labels) => match closing_brace(labels) {
                    Some(end) => &labels[end + 1..],
                    None => continue,
                },
                None => rest,
            };
            let Some(value) = rest
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<f64>().ok())
            else {
                continue;
            };
            if value.is_finite() {
                *sums.entry(name.to_string()).or_default() += value;
            }
        }
        Self(sums)
    }

    /// The first of `names` present.
    pub fn first(&self, names: &[&str]) -> Option<f64> {
        names.iter().find_map(|n| self.0.get(*n).copied())
    }
}

/// The index of the `}` closing a label set, skipping quoted values.
fn closing_brace(labels: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// What one scrape says about the engine's load.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineFigures {
    /// Requests running.
    pub running: u32,
    /// Requests queued.
    pub waiting: u32,
    /// KV-cache use in [0, 1].
    pub kv_cache_usage: f64,
    /// Cumulative prefix-cache hit and query counters (vLLM), for rates between scrapes.
    pub prefix_counters: Option<(f64, f64)>,
    /// The engine's own hit rate (SGLang), when it exposes one.
    pub prefix_hit_rate: Option<f64>,
}

fn count(v: Option<f64>) -> u32 {
    v.map_or(0, |v| v.max(0.0).min(f64::from(u32::MAX)) as u32)
}

/// Extracts the figures of `engine` from `samples`.
pub fn figures(engine: EngineKind, samples: &Samples) -> EngineFigures {
    match engine {
        EngineKind::Vllm => {
            let hits = samples.first(&[
                "vllm:prefix_cache_hits_total",
                "vllm:prefix_cache_hits",
                "vllm:gpu_prefix_cache_hits_total",
                "vllm:gpu_prefix_cache_hits",
            ]);
            let queries = samples.first(&[
                "vllm:prefix_cache_queries_total",
                "vllm:prefix_cache_queries",
                "vllm:gpu_prefix_cache_queries_total",
                "vllm:gpu_prefix_cache_queries",
            ]);
            EngineFigures {
                running: count(samples.first(&["vllm:num_requests_running"])),
                waiting: count(samples.first(&["vllm:num_requests_waiting"])),
                kv_cache_usage: samples
                    .first(&["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"])
                    .unwrap_or(0.0)
                    .clamp(0.0, 1.0),
                prefix_counters: hits.zip(queries),
                prefix_hit_rate: None,
            }
        }
        EngineKind::Sglang => EngineFigures {
            running: count(samples.first(&["sglang:num_running_reqs"])),
            waiting: count(samples.first(&["sglang:num_queue_reqs"])),
            kv_cache_usage: samples
                .first(&["sglang:token_usage"])
                .unwrap_or(0.0)
                .clamp(0.0, 1.0),
            prefix_counters: None,
            prefix_hit_rate: samples
                .first(&["sglang:cache_hit_rate"])
                .map(|r| r.clamp(0.0, 1.0)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = r#"
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B"} 3.0
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B"} 0.42
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="a}b"} 12
"#;

    #[test]
    fn current_vllm_names_are_read() {
        let f = figures(EngineKind::Vllm, &Samples::parse(VLLM));
        assert_eq!(f.running, 3);
        assert_eq!(f.waiting, 7);
        assert!((f.kv_cache_usage - 0.42).abs() < 1e-9);
        assert_eq!(f.prefix_counters, Some((250.0, 1000.0)));
    }

    #[test]
    fn older_vllm_names_are_accepted() {
        let text = "vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\nvllm:gpu_prefix_cache_hits_total 5\nvllm:gpu_prefix_cache_queries_total 10\n";
        let f = figures(EngineKind::Vllm, &Samples::parse(text));
        assert!((f.kv_cache_usage - 0.5).abs() < 1e-9);
        assert_eq!(f.prefix_counters, Some((5.0, 10.0)));
    }

    #[test]
    fn sglang_names_are_read() {
        let text = "sglang:num_running_reqs{model_name=\"q\"} 2\nsglang:num_queue_reqs{model_name=\"q\"} 1\nsglang:token_usage{model_name=\"q\"} 0.25\nsglang:cache_hit_rate{model_name=\"q\"} 0.6\n";
        let f = figures(EngineKind::Sglang, &Samples::parse(text));
        assert_eq!((f.running, f.waiting), (2, 1));
        assert!((f.kv_cache_usage - 0.25).abs() < 1e-9);
        assert_eq!(f.prefix_hit_rate, Some(0.6));
    }

    #[test]
    fn label_sets_are_summed_and_garbage_skipped() {
        let text = "x{a=\"1\"} 1\nx{a=\"2\"} 2\ngarbage line\nx{broken 5\ny NaN\n";
        let s = Samples::parse(text);
        assert_eq!(s.first(&["x"]), Some(3.0));
        assert_eq!(s.first(&["y"]), None);
        assert_eq!(
            figures(EngineKind::Vllm, &Samples::parse("")),
            EngineFigures::default()
        );
    }
}
