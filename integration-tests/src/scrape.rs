//! Reading one value out of a Prometheus text exposition, as a test asks
//! for it: a metric name and the labels that must match (others ignored).

/// The value of the first sample of `name` whose labels include every
/// `(label, value)` of `labels`.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, sample) = line.rsplit_once(' ')?;
            let (found, rest) = match series.split_once('{') {
                Some((found, rest)) => (found, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let matches = found == name
                && labels.iter().all(|(label, value)| {
                    rest.split(',').any(|l| l == format!("{label}=\"{value}\""))
                });
            matches.then(|| sample.parse().ok()).flatten()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_found_by_name_and_labels() {
        let text = "# HELP m help\nm{kind=\"a\",region=\"eu\"} 1\nm{kind=\"b\",region=\"eu\"} 2\nplain 7\n";
        assert_eq!(value(text, "m", &[("kind", "b")]), Some(2.0));
        assert_eq!(
            value(text, "m", &[("region", "eu"), ("kind", "a")]),
            Some(1.0)
        );
        assert_eq!(value(text, "plain", &[]), Some(7.0));
        assert_eq!(value(text, "m", &[("kind", "c")]), None);
        assert_eq!(value(text, "mm", &[]), None);
    }
}
