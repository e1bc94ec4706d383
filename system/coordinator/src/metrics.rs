//! Cluster-wide metrics: workers ship counter deltas and HdrHistogram deltas (V2
//! encoding); the coordinator merges them per (metric, plugin). Percentiles are
//! computed only from merged histograms: averaging per-worker percentiles would be
//! wrong.
//!
//! Deltas come from peers, so nothing is decoded before it is judged: names must be
//! the ones workers ship ([`rollout_core::protocol::metric`]), plugins ones the worker
//! offers, and a histogram's header must describe exactly the bytes that follow, with
//! the precision and range workers use ([`check_histogram`]). A beat's cost is bounded
//! by `limits.max_metric_series_per_beat` series and [`HISTOGRAM_BYTES_PER_BEAT_MAX`]
//! bytes.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use rollout_core::protocol::MetricDeltas;
use rollout_core::protocol::metric::{COUNTERS, HISTOGRAM_SIGNIFICANT_DIGITS, HISTOGRAM_VALUE_MAX, HISTOGRAMS};

/// Largest encoded histogram accepted from a worker.
pub const HISTOGRAM_BYTES_MAX: usize = 64 * 1024;
/// Histogram bytes one beat may carry in all; later ones are dropped.
pub const HISTOGRAM_BYTES_PER_BEAT_MAX: usize = 256 * 1024;
/// Most distinct (metric, plugin) series kept; deltas for new series beyond it are dropped.
pub const SERIES_MAX: usize = 4096;
/// Most observations one histogram delta may carry (2^40: a million a second for
/// twelve days, in one beat). Its counts are summed by every percentile read.
pub const HISTOGRAM_DELTA_COUNT_MAX: u64 = 1 << 40;
/// Most observations a merged histogram holds; a delta that would pass it is dropped,
/// so no sum over a histogram's counts can overflow.
pub const HISTOGRAM_TOTAL_COUNT_MAX: u64 = 1 << 62;
/// The V2 header: cookie, payload length, normalizing offset, significant digits,
/// lowest and highest trackable value, integer-to-double ratio.
pub const V2_HEADER_BYTES: usize = 40;
/// The cookie of an uncompressed V2 histogram (the only encoding accepted).
pub const V2_COOKIE: u32 = 0x1c84_9313;

/// Percentiles of one merged latency histogram, in microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySummary {
    /// The metric's name.
    pub metric: String,
    /// The plugin.
    pub plugin: String,
    /// Samples merged.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Largest sample.
    pub max_us: u64,
}

/// What a merge left out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MergeOutcome {
    /// Series dropped.
    pub dropped: u32,
    /// Why the first one was.
    pub reason: Option<String>,
}

impl MergeOutcome {
    fn drop(&mut self, reason: impl FnOnce() -> String) {
        self.dropped += 1;
        if self.reason.is_none() {
            self.reason = Some(reason());
        }
    }
}

/// Merged counters and histograms.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    counters: BTreeMap<(String, String), u64>,
    histograms: BTreeMap<(String, String), Histogram<u64>>,
    rejected_deltas: u64,
}

/// Checks an HdrHistogram V2 encoding before anything is allocated for it: the
/// uncompressed cookie, a payload length equal to the bytes present, no normalizing
/// offset, at most [`HISTOGRAM_SIGNIFICANT_DIGITS`] significant digits, a value range
/// within `1..=`[`HISTOGRAM_VALUE_MAX`], and a ratio of 1. With those, decoding costs
/// `O(bytes)` and the counts array is a few hundred KiB at most.
pub fn check_histogram(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() > HISTOGRAM_BYTES_MAX {
        return Err(format!("{} bytes exceed {HISTOGRAM_BYTES_MAX}", bytes.len()));
    }
    let Some(header) = bytes.get(..V2_HEADER_BYTES) else {
        return Err(format!("{} bytes are shorter than the {V2_HEADER_BYTES}-byte V2 header", bytes.len()));
    };
    let u32_at = |at: usize| u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_be_bytes(b)
    };
    let cookie = u32_at(0);
    if cookie != V2_COOKIE {
        return Err(format!("cookie {cookie:#010x} is not the uncompressed V2 cookie {V2_COOKIE:#010x}"));
    }
    let payload = u32_at(4) as usize;
    if payload != bytes.len() - V2_HEADER_BYTES {
        return Err(format!("the header claims {payload} payload bytes; {} follow it", bytes.len() - V2_HEADER_BYTES));
    }
    if u32_at(8) != 0 {
        return Err("a normalizing index offset is not supported".into());
    }
    let digits = u32_at(12);
    if digits == 0 || digits > u32::from(HISTOGRAM_SIGNIFICANT_DIGITS) {
        return Err(format!("{digits} significant digits; 1 to {HISTOGRAM_SIGNIFICANT_DIGITS} are accepted"));
    }
    let (low, high) = (u64_at(16), u64_at(24));
    if low == 0 || high < low.saturating_mul(2) || high > HISTOGRAM_VALUE_MAX {
        return Err(format!("trackable range {low}..={high} is outside 1..={HISTOGRAM_VALUE_MAX}"));
    }
    if f64::from_bits(u64_at(32)) != 1.0 {
        return Err("an integer-to-double ratio other than 1 is not supported".into());
    }
    check_payload(&bytes[V2_HEADER_BYTES..])
}

/// Walks the payload's LEB128-64b9B varints as the decoder will: a zig-zag value of
/// `i64::MIN` (a run of zeros whose length cannot be negated: the decoder overflows
/// on it) is refused, as is a truncated last varint, and counts that add up to more
/// than [`HISTOGRAM_DELTA_COUNT_MAX`] (summing them would overflow `u64`).
fn check_payload(payload: &[u8]) -> Result<(), String> {
    walk_payload(payload, |_, _| true).map(|_| ())
}

/// Walks the payload's counts (see [`check_payload`]), calling `count(index, n)` for
/// each nonzero count `n` at counts-array `index`; stops with an error when `count`
/// returns false (an index the caller cannot place). The total count.
fn walk_payload(mut payload: &[u8], mut count: impl FnMut(usize, u64) -> bool) -> Result<u64, String> {
    let mut total: u64 = 0;
    let mut index: usize = 0;
    while !payload.is_empty() {
        let mut value: u64 = 0;
        let mut used = 0;
        loop {
            let Some(&b) = payload.get(used) else {
                return Err("the payload ends inside a varint".into());
            };
            if used == 8 {
                // The ninth byte is used whole.
                value |= u64::from(b) << 56;
                used += 1;
                break;
            }
            value |= u64::from(b & 0x7f) << (7 * used);
            used += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        payload = &payload[used..];
        let decoded = ((value >> 1) as i64) ^ -((value & 1) as i64);
        if decoded == i64::MIN {
            return Err("a run of zeros of 2^63 counts".into());
        }
        if decoded > 0 {
            total = total.saturating_add(decoded as u64);
            if total > HISTOGRAM_DELTA_COUNT_MAX {
                return Err(format!("more than {HISTOGRAM_DELTA_COUNT_MAX} observations in one delta"));
            }
            if !count(index, decoded as u64) {
                return Err(format!("a count at index {index}, beyond the histogram's range"));
            }
            index = index.saturating_add(1);
        } else if decoded == 0 {
            index = index.saturating_add(1);
        } else {
            // A run of zero counts.
            index = index.saturating_add(decoded.unsigned_abs() as usize);
        }
    }
    Ok(total)
}

/// Where each counts-array index of a histogram puts its values: hdrhistogram's layout
/// for a lowest discernible value and a precision, reproduced so a delta merges without
/// materializing (allocating and zeroing) its whole counts array.
#[derive(Debug, Clone, Copy)]
struct Layout {
    unit_magnitude: u32,
    sub_bucket_half_count_magnitude: u32,
    sub_bucket_half_count: u32,
    /// The length of the counts array a histogram of this layout up to the header's
    /// highest trackable value has (hdrhistogram refuses a payload longer than that).
    counts_len: usize,
}

impl Layout {
    /// For `low` >= 1, `digits` in 1..=5, values up to `highest` (as `check_histogram`
    /// accepts them).
    fn new(low: u64, digits: u32, highest: u64) -> Layout {
        let largest = 2 * 10_u32.pow(digits);
        let unit_magnitude = low.ilog2();
        let sub_bucket_count_magnitude = largest.next_power_of_two().ilog2();
        let sub_bucket_half_count_magnitude = sub_bucket_count_magnitude - 1;
        // Buckets to cover `highest`, each twice the range of the one before.
        let mut smallest_untrackable = 1u64 << (sub_bucket_count_magnitude + unit_magnitude);
        let mut buckets = 1usize;
        while smallest_untrackable <= highest {
            if smallest_untrackable > u64::MAX / 2 {
                buckets += 1;
                break;
            }
            smallest_untrackable <<= 1;
            buckets += 1;
        }
        let sub_bucket_half_count = 1u32 << sub_bucket_half_count_magnitude;
        Layout {
            unit_magnitude,
            sub_bucket_half_count_magnitude,
            sub_bucket_half_count,
            counts_len: (buckets + 1) * sub_bucket_half_count as usize,
        }
    }

    /// The value of counts index `index`, if the counts array has that index.
    fn value_for(&self, index: usize) -> Option<u64> {
        if index >= self.counts_len {
            return None;
        }
        let mut bucket = (index >> self.sub_bucket_half_count_magnitude) as i64 - 1;
        let mut sub = (u32::try_from(index).ok()? & (self.sub_bucket_half_count - 1)) + self.sub_bucket_half_count;
        if bucket < 0 {
            sub -= self.sub_bucket_half_count;
            bucket = 0;
        }
        let shift = u32::try_from(bucket).ok()?.checked_add(self.unit_magnitude)?;
        if shift >= 64 || u64::from(sub).leading_zeros() < shift {
            return None;
        }
        Some(u64::from(sub) << shift)
    }
}

impl ClusterMetrics {
    /// Merges one worker's deltas: only known metric names, plugins for which
    /// `plugin_known` holds, at most `series_max` series and
    /// [`HISTOGRAM_BYTES_PER_BEAT_MAX`] histogram bytes, histograms that pass
    /// [`check_histogram`]. Everything else is dropped, counted in
    /// [`ClusterMetrics::rejected_deltas`] and reported: metrics never fail a beat.
    pub fn merge_from(
        &mut self,
        deltas: &MetricDeltas,
        plugin_known: impl Fn(&str) -> bool,
        series_max: usize,
    ) -> MergeOutcome {
        let mut outcome = MergeOutcome::default();
        let mut series = 0usize;
        for (name, plugin, delta) in &deltas.counters {
            series += 1;
            if series > series_max {
                outcome.drop(|| format!("more than {series_max} series (limits.max_metric_series_per_beat)"));
                continue;
            }
            if !COUNTERS.contains(&name.as_str()) || !plugin_known(plugin) {
                outcome.drop(|| format!("unknown counter {:?} or plugin {:?}", truncated(name), truncated(plugin)));
                continue;
            }
            let key = (name.clone(), plugin.clone());
            if self.counters.len() >= SERIES_MAX && !self.counters.contains_key(&key) {
                outcome.drop(|| format!("the coordinator keeps at most {SERIES_MAX} series"));
                continue;
            }
            let c = self.counters.entry(key).or_default();
            *c = c.saturating_add(*delta);
        }
        let mut histogram_bytes = 0usize;
        for (name, plugin, bytes) in &deltas.histograms {
            series += 1;
            if series > series_max {
                outcome.drop(|| format!("more than {series_max} series (limits.max_metric_series_per_beat)"));
                continue;
            }
            if !HISTOGRAMS.contains(&name.as_str()) || !plugin_known(plugin) {
                outcome.drop(|| format!("unknown histogram {:?} or plugin {:?}", truncated(name), truncated(plugin)));
                continue;
            }
            histogram_bytes += bytes.len();
            if histogram_bytes > HISTOGRAM_BYTES_PER_BEAT_MAX {
                outcome.drop(|| format!("more than {HISTOGRAM_BYTES_PER_BEAT_MAX} histogram bytes in one beat"));
                continue;
            }
            if let Err(e) = check_histogram(bytes) {
                outcome.drop(|| format!("histogram {name}/{}: {e}", truncated(plugin)));
                continue;
            }
            let key = (name.clone(), plugin.clone());
            if self.histograms.len() >= SERIES_MAX && !self.histograms.contains_key(&key) {
                outcome.drop(|| format!("the coordinator keeps at most {SERIES_MAX} series"));
                continue;
            }
            // Checked above: a V2 header with a valid range and precision, then counts.
            let header = |at: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&bytes[at..at + 8]);
                u64::from_be_bytes(b)
            };
            let digits = u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
            let layout = Layout::new(header(16), digits, header(24));
            let mut counts: Vec<(u64, u64)> = Vec::new();
            let walked = walk_payload(&bytes[V2_HEADER_BYTES..], |index, n| match layout.value_for(index) {
                Some(value) => {
                    counts.push((value, n));
                    true
                }
                None => false,
            });
            let delta_len = match walked {
                Ok(total) => total,
                Err(e) => {
                    outcome.drop(|| format!("histogram {name}/{}: {e}", truncated(plugin)));
                    continue;
                }
            };
            // A delta has a fixed range; the merged one grows to fit any worker's.
            let merged = self.histograms.entry(key).or_insert_with(|| {
                let mut h =
                    Histogram::new(HISTOGRAM_SIGNIFICANT_DIGITS).expect("3 significant figures is a valid precision");
                h.auto(true);
                h
            });
            if merged.len().saturating_add(delta_len) > HISTOGRAM_TOTAL_COUNT_MAX {
                outcome.drop(|| {
                    format!(
                        "histogram {name}/{}: would hold more than {HISTOGRAM_TOTAL_COUNT_MAX} observations",
                        truncated(plugin)
                    )
                });
                continue;
            }
            if counts.iter().any(|&(value, n)| merged.record_n(value, n).is_err()) {
                outcome.drop(|| format!("histogram {name}/{}: does not merge", truncated(plugin)));
            }
        }
        self.rejected_deltas += u64::from(outcome.dropped);
        outcome
    }

    /// Counts `n` deltas dropped before they were looked at (e.g. shipped too often).
    pub fn reject(&mut self, n: u32) {
        self.rejected_deltas += u64::from(n);
    }

    /// The merged value of a counter.
    pub fn counter(&self, name: &str, plugin: &str) -> u64 {
        self.counters.get(&(name.to_owned(), plugin.to_owned())).copied().unwrap_or(0)
    }

    /// Every counter, in (name, plugin) order.
    pub fn counters(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.counters.iter().map(|((n, p), v)| (n.as_str(), p.as_str(), *v))
    }

    /// Percentiles of every merged histogram, in (name, plugin) order.
    pub fn latencies(&self) -> Vec<LatencySummary> {
        self.histograms
            .iter()
            .map(|((metric, plugin), h)| LatencySummary {
                metric: metric.clone(),
                plugin: plugin.clone(),
                count: h.len(),
                p50_us: h.value_at_quantile(0.50),
                p90_us: h.value_at_quantile(0.90),
                p99_us: h.value_at_quantile(0.99),
                max_us: h.max(),
            })
            .collect()
    }

    /// Deltas that were malformed, oversized or beyond a bound.
    pub fn rejected_deltas(&self) -> u64 {
        self.rejected_deltas
    }
}

/// A peer's text, cut for a log line.
fn truncated(text: &str) -> String {
    rollout_core::text::truncate_at_char_boundary(text.to_owned(), 64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::{Serializer, V2Serializer};
    use rollout_core::protocol::metric::TASK_LATENCY_US;

    fn encoded(samples: &[u64]) -> Vec<u8> {
        let mut h = Histogram::<u64>::new_with_bounds(1, HISTOGRAM_VALUE_MAX, HISTOGRAM_SIGNIFICANT_DIGITS)
            .expect("valid bounds");
        for s in samples {
            h.record(*s).expect("in range");
        }
        let mut out = Vec::new();
        V2Serializer::new().serialize(&h, &mut out).expect("serializes");
        out
    }

    fn any_plugin(_: &str) -> bool {
        true
    }

    proptest::proptest! {
        /// Merging a delta straight from its payload gives exactly what decoding it with
        /// hdrhistogram and adding it gives, for any precision, lowest value and samples.
        #[test]
        fn merging_from_the_payload_equals_decoding_and_adding(
            samples in proptest::collection::vec(1u64..HISTOGRAM_VALUE_MAX, 0..200),
            digits in 1u8..=HISTOGRAM_SIGNIFICANT_DIGITS,
            low_log in 0u32..6,
            auto in proptest::bool::ANY,
        ) {
            // Workers ship fixed-range histograms; an auto-resizing one's header names a
            // smaller highest value than its counts reach, and must merge the same.
            let low = if auto { 1 } else { 1u64 << low_log };
            let mut h = if auto {
                let mut h = Histogram::<u64>::new(digits).expect("precision");
                h.auto(true);
                h
            } else {
                Histogram::<u64>::new_with_bounds(low, HISTOGRAM_VALUE_MAX, digits).expect("valid bounds")
            };
            for s in samples.iter().filter(|s| **s >= low) {
                h.record(*s).expect("in range");
            }
            let mut bytes = Vec::new();
            V2Serializer::new().serialize(&h, &mut bytes).expect("serializes");
            // (An auto-resized header may name a range past what workers may ship.)
            proptest::prop_assume!(check_histogram(&bytes).is_ok());
            let mut m = ClusterMetrics::default();
            let outcome = m.merge_from(&histograms(vec![bytes.clone()]), any_plugin, 16);
            proptest::prop_assert_eq!(outcome.dropped, 0);
            let decoded: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
                .deserialize(&mut bytes.as_slice())
                .expect("decodes");
            let mut expected = Histogram::<u64>::new(HISTOGRAM_SIGNIFICANT_DIGITS).expect("precision");
            expected.auto(true);
            expected.add(&decoded).expect("adds");
            let got = m.histograms.get(&(TASK_LATENCY_US.to_owned(), "echo".to_owned()));
            if expected.is_empty() {
                proptest::prop_assert!(got.is_none_or(Histogram::is_empty));
            } else {
                let got = got.expect("merged");
                proptest::prop_assert_eq!(got.len(), expected.len());
                for q in [0.0, 0.25, 0.5, 0.9, 0.99, 1.0] {
                    proptest::prop_assert_eq!(got.value_at_quantile(q), expected.value_at_quantile(q), "quantile {}", q);
                }
                let a: Vec<(u64, u64)> = got.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect();
                let b: Vec<(u64, u64)> = expected.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect();
                proptest::prop_assert_eq!(a, b);
            }
        }
    }

    fn histograms(items: Vec<Vec<u8>>) -> MetricDeltas {
        MetricDeltas {
            counters: vec![],
            histograms: items.into_iter().map(|b| (TASK_LATENCY_US.into(), "echo".into(), b)).collect(),
        }
    }

    /// A V2 header claiming `payload` bytes, with `digits` and `high`, and no payload.
    fn header(payload: u32, digits: u32, high: u64) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&V2_COOKIE.to_be_bytes());
        h.extend_from_slice(&payload.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes());
        h.extend_from_slice(&digits.to_be_bytes());
        h.extend_from_slice(&1u64.to_be_bytes());
        h.extend_from_slice(&high.to_be_bytes());
        h.extend_from_slice(&1f64.to_be_bytes());
        h
    }

    #[test]
    fn percentiles_come_from_the_merged_histogram() {
        // Worker A saw 99 fast tasks, worker B one slow one: the merged p99 is fast,
        // the merged max is slow. Averaging per-worker p99s would say ~5000.
        let mut m = ClusterMetrics::default();
        let fast: Vec<u64> = vec![100; 99];
        assert_eq!(m.merge_from(&histograms(vec![encoded(&fast)]), any_plugin, 16).dropped, 0);
        assert_eq!(m.merge_from(&histograms(vec![encoded(&[10_000])]), any_plugin, 16).dropped, 0);
        let s = &m.latencies()[0];
        assert_eq!(s.count, 100);
        assert!(s.p99_us <= 101, "{s:?}");
        assert!(s.max_us >= 9_990, "{s:?}");
    }

    #[test]
    fn counters_add_up_and_garbage_is_rejected() {
        let mut m = ClusterMetrics::default();
        for _ in 0..3 {
            let deltas = MetricDeltas {
                counters: vec![("tasks_succeeded".into(), "echo".into(), 5)],
                histograms: vec![(TASK_LATENCY_US.into(), "echo".into(), vec![1, 2, 3])],
            };
            m.merge_from(&deltas, any_plugin, 16);
        }
        assert_eq!(m.counter("tasks_succeeded", "echo"), 15);
        assert_eq!(m.rejected_deltas(), 3);
        assert!(m.latencies().is_empty());
    }

    #[test]
    fn headers_that_lie_are_refused_before_anything_is_allocated() {
        // Each of these made the decoder allocate gigabytes (a 4 GiB payload buffer, or
        // a counts array for 5 digits over the whole u64 range).
        for (bytes, why) in [
            (header(u32::MAX - 8, 3, 3_600_000_000), "payload bytes"),
            (header(0, 5, u64::MAX / 4), "significant digits"),
            (header(0, 3, u64::MAX / 4), "trackable range"),
            ([&[0x1c, 0x84, 0x93, 0x14][..], &[0; 36]].concat(), "cookie"),
            (vec![0; 12], "shorter"),
            // A valid header, then the varint of u64::MAX: zig-zag i64::MIN, which the
            // decoder negates (found by the `histogram` fuzz target).
            ([&header(9, 3, 3_600_000_000)[..], &[0xff; 9]].concat(), "2^63"),
            ([&header(2, 3, 3_600_000_000)[..], &[0x80, 0x80]].concat(), "inside a varint"),
        ] {
            let err = check_histogram(&bytes).expect_err(why);
            assert!(err.contains(why), "{why}: {err}");
        }
        check_histogram(&encoded(&[1, 2, 3])).expect("a worker's own encoding passes");
    }

    /// The payload varint (LEB128, zig-zag) of a bucket count.
    fn count_varint(count: u64) -> Vec<u8> {
        let mut v = count << 1;
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn counts_that_would_overflow_a_sum_are_refused() {
        // Two buckets of 2^39 + 1 observations: over the per-delta bound. (The fuzzer's
        // input had counts near 2^63 whose sum overflowed in value_at_quantile.)
        let big = count_varint((1 << 39) + 1);
        let payload = [&big[..], &big[..]].concat();
        let bytes = [&header(payload.len() as u32, 3, 3_600_000_000)[..], &payload].concat();
        let err = check_histogram(&bytes).expect_err("too many observations");
        assert!(err.contains("observations"), "{err}");
        let one = count_varint(1 << 39);
        let bytes = [&header(one.len() as u32, 3, 3_600_000_000)[..], &one].concat();
        check_histogram(&bytes).expect("2^39 observations pass");

        // A merged histogram near its bound takes no delta that would pass it.
        let mut m = ClusterMetrics::default();
        let mut full = Histogram::new(HISTOGRAM_SIGNIFICANT_DIGITS).expect("valid");
        full.auto(true);
        full.record_n(100, HISTOGRAM_TOTAL_COUNT_MAX - 5).expect("in range");
        m.histograms.insert((TASK_LATENCY_US.into(), "echo".into()), full);
        let outcome = m.merge_from(&histograms(vec![encoded(&[100; 10])]), any_plugin, 16);
        assert_eq!(outcome.dropped, 1, "{outcome:?}");
        assert_eq!(m.latencies()[0].count, HISTOGRAM_TOTAL_COUNT_MAX - 5);
        assert_eq!(m.merge_from(&histograms(vec![encoded(&[100; 5])]), any_plugin, 16).dropped, 0);
    }

    #[test]
    fn unknown_names_unknown_plugins_and_excess_series_are_dropped() {
        let mut m = ClusterMetrics::default();
        let deltas = MetricDeltas {
            counters: vec![
                ("tasks_succeeded".into(), "echo".into(), 1),
                ("made_up".into(), "echo".into(), 1),
                ("tasks_failed".into(), "not-offered".into(), 1),
                ("tasks_started".into(), "echo".into(), 1),
            ],
            histograms: vec![],
        };
        let outcome = m.merge_from(&deltas, |p| p == "echo", 3);
        assert_eq!(outcome.dropped, 3, "{outcome:?}");
        assert_eq!(m.counter("tasks_succeeded", "echo"), 1);
        assert_eq!(m.counter("tasks_started", "echo"), 0, "beyond the series bound");
        let too_many = histograms(vec![encoded(&[5; 10]); 10]);
        let outcome = m.merge_from(&too_many, any_plugin, 1000);
        assert_eq!(outcome.dropped, 0, "ten small histograms fit: {outcome:?}");
    }
}
