//! What the benchmark binaries share: their command-line flags and percentiles.

use std::time::Duration;

/// The value after `--name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// A numeric flag, or `default` when absent or not a number.
pub fn arg_u64(name: &str, default: u64) -> u64 {
    arg(name, "").parse().unwrap_or(default)
}

/// The `p` quantile (0 to 1) of `sorted`, which must not be empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
