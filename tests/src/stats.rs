//! Percentiles for the benchmarks (both `schemagate-bench` and `schemagate-bench-scale`).

/// The `p`th percentile (nearest rank) of values sorted ascending; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Sorts the values and returns their 50th and 99th percentiles.
#[allow(
    dead_code,
    reason = "only the scale benchmark reports exactly these two"
)]
pub fn p50_p99(mut values: Vec<f64>) -> (f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    (percentile(&values, 50.0), percentile(&values, 99.0))
}
