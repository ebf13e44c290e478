//! `/metrics` in Prometheus text format with vLLM's (or SGLang's) names, so
//! the sidecar reads the simulated engine exactly as it reads a real one.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use crate::config::Dialect;
use crate::engine::{Engine, TTFT_BUCKETS};

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, labels: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}"
    );
}

/// The exposition text for `engine`.
pub fn render(engine: &Engine) -> String {
    let c = &engine.counters;
    let model = format!("model_name=\"{}\"", escape(&engine.config.model));
    let running = engine.running.load(Ordering::Relaxed) as f64;
    let waiting = engine.waiting.load(Ordering::Relaxed) as f64;
    let queries = c.prefix_queries.load(Ordering::Relaxed) as f64;
    let hits = c.prefix_hits.load(Ordering::Relaxed) as f64;
    let prompt = c.prompt_tokens.load(Ordering::Relaxed) as f64;
    let generated = c.generation_tokens.load(Ordering::Relaxed) as f64;
    let mut out = String::with_capacity(4096);
    match engine.config.metrics_dialect {
        Dialect::Vllm => {
            metric(
                &mut out,
                "vllm:num_requests_running",
                "gauge",
                "Number of requests in model execution batches.",
                &model,
                running,
            );
            metric(
                &mut out,
                "vllm:num_requests_waiting",
                "gauge",
                "Number of requests waiting to be processed.",
                &model,
                waiting,
            );
            metric(
                &mut out,
                "vllm:kv_cache_usage_perc",
                "gauge",
                "KV-cache usage. 1 means 100 percent usage.",
                &model,
                engine.kv_cache_usage(),
            );
            metric(
                &mut out,
                "vllm:prefix_cache_queries_total",
                "counter",
                "Prefix cache queries, in terms of number of queried tokens.",
                &model,
                queries,
            );
            metric(
                &mut out,
                "vllm:prefix_cache_hits_total",
                "counter",
                "Prefix cache hits, in terms of number of cached tokens.",
                &model,
                hits,
            );
            metric(
                &mut out,
                "vllm:prompt_tokens_total",
                "counter",
                "Number of prefill tokens processed.",
                &model,
                prompt,
            );
            metric(
                &mut out,
                "vllm:generation_tokens_total",
                "counter",
                "Number of generation tokens processed.",
                &model,
                generated,
            );
            let _ = writeln!(
                out,
                "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter"
            );
            for (reason, n) in [("length", &c.finished_length), ("abort", &c.finished_abort)] {
                let _ = writeln!(
                    out,
                    "vllm:request_success_total{{finished_reason=\"{reason}\",{model}}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
            let _ = writeln!(
                out,
                "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.\n# TYPE vllm:time_to_first_token_seconds histogram"
            );
            let mut cumulative = 0;
            for (i, bound) in TTFT_BUCKETS
                .iter()
                .map(|b| b.to_string())
                .chain(["+Inf".to_string()])
                .enumerate()
            {
                cumulative += c.ttft_buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "vllm:time_to_first_token_seconds_bucket{{le=\"{bound}\",{model}}} {cumulative}"
                );
            }
            let sum = c.ttft_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "vllm:time_to_first_token_seconds_sum{{{model}}} {sum}\nvllm:time_to_first_token_seconds_count{{{model}}} {cumulative}"
            );
        }
        Dialect::Sglang => {
            let hit_rate = if queries > 0.0 { hits / queries } else { 0.0 };
            metric(
                &mut out,
                "sglang:num_running_reqs",
                "gauge",
                "The number of running requests.",
                &model,
                running,
            );
            metric(
                &mut out,
                "sglang:num_queue_reqs",
                "gauge",
                "The number of requests in the waiting queue.",
                &model,
                waiting,
            );
            metric(
                &mut out,
                "sglang:token_usage",
                "gauge",
                "The token usage.",
                &model,
                engine.kv_cache_usage(),
            );
            metric(
                &mut out,
                "sglang:cache_hit_rate",
                "gauge",
                "The prefix cache hit rate.",
                &model,
                hit_rate,
            );
            metric(
                &mut out,
                "sglang:prompt_tokens_total",
                "counter",
                "Number of prefill tokens processed.",
                &model,
                prompt,
            );
            metric(
                &mut out,
                "sglang:generation_tokens_total",
                "counter",
                "Number of generation tokens processed.",
                &model,
                generated,
            );
        }
    }
    if engine.config.enable_lora {
        // vLLM's adapter gauge: which adapters the running batch uses.
        let slots = engine.loras.in_slots().join(",");
        let labels = format!(
            "max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"\"",
            engine.config.max_loras,
            escape(&slots)
        );
        metric(
            &mut out,
            "vllm:lora_requests_info",
            "gauge",
            "Running stats on lora requests.",
            &labels,
            1.0,
        );
        let loras = &engine.loras;
        metric(
            &mut out,
            "sim:lora_loads_total",
            "counter",
            "Adapters loaded through the runtime API (simulator only).",
            &model,
            loras.loads.load(Ordering::Relaxed) as f64,
        );
        metric(
            &mut out,
            "sim:lora_load_failures_total",
            "counter",
            "Adapter loads that failed (simulator only).",
            &model,
            loras.load_failures.load(Ordering::Relaxed) as f64,
        );
        metric(
            &mut out,
            "sim:lora_switches_total",
            "counter",
            "Adapters moved into a GPU slot for a request (simulator only).",
            &model,
            loras.switches.load(Ordering::Relaxed) as f64,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn vllm_and_sglang_names_are_exposed() {
        let engine = Engine::new(crate::config::Config::parse_from([
            "sim", "--model", "m\"x",
        ]));
        let text = render(&engine);
        for name in [
            "vllm:num_requests_running{model_name=\"m\\\"x\"} 0",
            "vllm:num_requests_waiting{",
            "vllm:kv_cache_usage_perc{",
            "vllm:prefix_cache_queries_total{",
            "vllm:prefix_cache_hits_total{",
            "vllm:time_to_first_token_seconds_bucket{le=\"+Inf\"",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        let engine = Engine::new(crate::config::Config::parse_from([
            "sim",
            "--metrics-dialect",
            "sglang",
        ]));
        let text = render(&engine);
        for name in [
            "sglang:num_running_reqs{",
            "sglang:num_queue_reqs{",
            "sglang:token_usage{",
            "sglang:cache_hit_rate{",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
