//! A small metric registry: counter, gauge and histogram families keyed by label values,
//! rendered in the Prometheus text format as Go daprd's exporter renders them (metric and
//! label names, `_bucket`/`_sum`/`_count`, numbers in Go's shortest `%g` form).
//!
//! Recording is lock-free once a series exists: a read lock and a hash lookup find it, then
//! atomics count. A new label combination takes the write lock once.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use regex::Regex;

/// What a family aggregates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic count.
    Counter,
    /// Last value (may go down).
    Gauge,
    /// Distribution over fixed buckets.
    Histogram,
}

/// One series' value.
#[derive(Debug)]
pub struct Series {
    count: AtomicU64,
    gauge: AtomicI64,
    sum_bits: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

impl Series {
    fn new(buckets: usize) -> Self {
        Self {
            count: AtomicU64::new(0),
            gauge: AtomicI64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
            buckets: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Adds `n` to a counter.
    pub fn inc_by(&self, n: u64) {
        self.count.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `delta` to a gauge.
    pub fn add(&self, delta: i64) {
        self.gauge.fetch_add(delta, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(&self, v: i64) {
        self.gauge.store(v, Ordering::Relaxed);
    }

    fn observe(&self, bounds: &[f64], v: f64) {
        // Prometheus buckets are upper-inclusive (`le`); the first bound >= v takes it.
        let i = bounds.partition_point(|b| *b < v);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut cur = self.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self.sum_bits.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Replacement and regular expression pairs for one label: a value the regex matches is
/// replaced.
pub type Replacements = Vec<(String, Regex)>;

/// `spec.metric.rules` for one family: label index → its replacements.
pub type LabelRules = Vec<(usize, Replacements)>;

/// A metric family: one name, one label set, any number of series.
#[derive(Debug)]
pub struct Family {
    name: String,
    help: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    bounds: Arc<[f64]>,
    rules: LabelRules,
    /// Series by the hash of their label values (collisions share the bucket's list).
    series: RwLock<HashMap<u64, Vec<Entry>, PreHashed>>,
}

#[derive(Debug)]
struct Entry {
    values: Box<[Box<str>]>,
    series: Arc<Series>,
}

/// Most labels a family has.
const MAX_LABELS: usize = 8;

impl Family {
    /// A family named `name` (with its `dapr_` prefix) over `labels` (at most 8).
    pub fn new(
        name: impl Into<String>,
        help: &'static str,
        kind: Kind,
        labels: &'static [&'static str],
        bounds: Arc<[f64]>,
    ) -> Self {
        assert!(labels.len() <= MAX_LABELS, "too many labels");
        Self {
            name: name.into(),
            help,
            kind,
            labels,
            bounds: if kind == Kind::Histogram {
                bounds
            } else {
                Arc::from(Vec::new())
            },
            rules: Vec::new(),
            series: RwLock::new(HashMap::default()),
        }
    }

    /// The family's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Applies `rules` (label name → replacement and regex pairs) to recorded values.
    pub fn with_rules(mut self, rules: &[(String, Replacements)]) -> Self {
        for (label, pairs) in rules {
            if let Some(i) = self.labels.iter().position(|l| l == label) {
                self.rules.push((i, pairs.clone()));
            }
        }
        self
    }

    /// Calls `f` with the series of these label values (in the family's label order),
    /// creating it on first use. A hit takes a read lock and allocates nothing.
    fn with<R>(&self, values: &[&str], f: impl FnOnce(&Arc<Series>) -> R) -> R {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        let mut rewritten = [""; MAX_LABELS];
        let n = values.len().min(MAX_LABELS);
        for (i, v) in values.iter().take(n).enumerate() {
            rewritten[i] = self.rewrite(i, v);
        }
        let values = &rewritten[..n];
        let hash = hash_values(values);
        let same = |e: &Entry| {
            e.values
                .iter()
                .map(AsRef::as_ref)
                .eq(values.iter().copied())
        };
        {
            let map = self.series.read().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = map
                .get(&hash)
                .and_then(|list| list.iter().find(|e| same(e)))
            {
                return f(&e.series);
            }
        }
        let mut map = self.series.write().unwrap_or_else(|e| e.into_inner());
        let list = map.entry(hash).or_default();
        if let Some(e) = list.iter().find(|e| same(e)) {
            return f(&e.series);
        }
        let series = Arc::new(Series::new(self.bounds.len() + 1));
        let r = f(&series);
        list.push(Entry {
            values: values.iter().map(|v| Box::from(*v)).collect(),
            series,
        });
        r
    }

    /// The series of these label values (in the family's label order).
    pub fn series(&self, values: &[&str]) -> Arc<Series> {
        self.with(values, Arc::clone)
    }

    fn rewrite<'a>(&'a self, label: usize, value: &'a str) -> &'a str {
        for (i, pairs) in &self.rules {
            if *i == label {
                if let Some((to, _)) = pairs.iter().find(|(_, re)| re.is_match(value)) {
                    return to;
                }
            }
        }
        value
    }

    /// Counts one more in the series of `values`.
    pub fn inc(&self, values: &[&str]) {
        self.with(values, |s| s.inc_by(1));
    }

    /// Adds `n` to the series of `values`.
    pub fn inc_by(&self, values: &[&str], n: u64) {
        self.with(values, |s| s.inc_by(n));
    }

    /// Sets the gauge of `values`.
    pub fn set(&self, values: &[&str], v: i64) {
        self.with(values, |s| s.set(v));
    }

    /// Observes `v` in the series of `values`.
    pub fn observe(&self, values: &[&str], v: f64) {
        self.with(values, |s| s.observe(&self.bounds, v));
    }

    /// Observes `v` in `series` (one found earlier with [`Family::series`]).
    pub fn observe_in(&self, series: &Series, v: f64) {
        series.observe(&self.bounds, v);
    }

    /// The series, sorted by their label values.
    fn rows(&self) -> Vec<(String, Arc<Series>)> {
        let map = self.series.read().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<(Vec<&str>, &Arc<Series>)> = map
            .values()
            .flatten()
            .map(|e| (e.values.iter().map(AsRef::as_ref).collect(), &e.series))
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        rows.into_iter()
            .map(|(values, s)| (self.label_text(&values), s.clone()))
            .collect()
    }

    /// Appends the family in the Prometheus text format (nothing when it has no series).
    pub fn render(&self, out: &mut String) {
        let rows = self.rows();
        if rows.is_empty() {
            return;
        }
        let ty = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {ty}", self.name);
        for (labels, s) in rows {
            match self.kind {
                Kind::Counter => {
                    let v = s.count.load(Ordering::Relaxed) as f64;
                    let _ = writeln!(out, "{}{{{labels}}} {}", self.name, go_float(v));
                }
                Kind::Gauge => {
                    let v = s.gauge.load(Ordering::Relaxed) as f64;
                    let _ = writeln!(out, "{}{{{labels}}} {}", self.name, go_float(v));
                }
                Kind::Histogram => self.render_histogram(out, &labels, &s),
            }
        }
    }

    /// Appends, for a histogram, the counter `name` that counts its observations (Dapr's
    /// `_count` metrics have the same labels as its latency histograms: one lookup records
    /// both).
    pub fn render_count_as(&self, name: &str, help: &str, out: &mut String) {
        let rows = self.rows();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, s) in rows {
            let v = s.count.load(Ordering::Relaxed) as f64;
            let _ = writeln!(out, "{name}{{{labels}}} {}", go_float(v));
        }
    }

    fn render_histogram(&self, out: &mut String, labels: &str, s: &Series) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, b) in s.buckets.iter().enumerate() {
            cumulative += b.load(Ordering::Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| go_float(*b));
            let _ = writeln!(
                out,
                "{}_bucket{{{labels}{sep}le=\"{le}\"}} {}",
                self.name,
                go_float(cumulative as f64)
            );
        }
        let sum = f64::from_bits(s.sum_bits.load(Ordering::Relaxed));
        let _ = writeln!(out, "{}_sum{{{labels}}} {}", self.name, go_float(sum));
        let _ = writeln!(
            out,
            "{}_count{{{labels}}} {}",
            self.name,
            go_float(s.count.load(Ordering::Relaxed) as f64)
        );
    }

    fn label_text(&self, values: &[&str]) -> String {
        let mut text = String::new();
        for (i, (name, value)) in self.labels.iter().zip(values).enumerate() {
            if i > 0 {
                text.push(',');
            }
            let _ = write!(text, "{name}=\"");
            escape_label(&mut text, value);
            text.push('"');
        }
        text
    }
}

/// The map's hasher: its keys are [`hash_values`] already, so they are used as they are
/// (hashing them again with SipHash cost as much as a histogram update).
#[derive(Debug, Default, Clone, Copy)]
struct PreHashed;

impl std::hash::BuildHasher for PreHashed {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

/// Passes a `u64` key through.
#[derive(Debug)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // only `u64` keys are hashed here; any other input is folded in, not lost
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A fast hash of label values, eight bytes at a time (the FxHash step; each value's length
/// closes it): the values come from the sidecar's own configuration and API paths, and a
/// collision only costs a comparison.
fn hash_values(values: &[&str]) -> u64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h: u64 = 0;
    let mut add = |w: u64| h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    for v in values {
        let bytes = v.as_bytes();
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            add(u64::from_le_bytes(word));
        }
        let rest = words.remainder();
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        add(u64::from_le_bytes(last));
        add(bytes.len() as u64);
    }
    h
}

/// A label value escaped for the text format (`\`, `"` and newline).
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `v` as Go's `strconv.FormatFloat(v, 'g', -1, 64)` writes it (what the Prometheus Go
/// client puts in the text format): shortest round-trip digits, exponent form when the
/// decimal exponent is below -4 or at least 6.
pub fn go_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "+Inf" } else { "-Inf" }.into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let e = format!("{v:e}");
    let (mantissa, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_float_matches_strconv() {
        for (v, want) in [
            (0.0, "0"),
            (1.0, "1"),
            (2.5, "2.5"),
            (100000.0, "100000"),
            (1048576.0, "1.048576e+06"),
            (1000000.0, "1e+06"),
            (4294967296.0, "4.294967296e+09"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123456.0, "123456"),
            (1234567.0, "1.234567e+06"),
            (f64::INFINITY, "+Inf"),
        ] {
            assert_eq!(go_float(v), want, "{v}");
        }
    }

    #[test]
    fn histogram_text() {
        let f = Family::new(
            "dapr_x_latencies",
            "x",
            Kind::Histogram,
            &["app_id", "topic"],
            Arc::from(vec![1.0, 5.0]),
        );
        f.observe(&["a", "t\"1"], 1.0);
        f.observe(&["a", "t\"1"], 3.0);
        f.observe(&["a", "t\"1"], 9.5);
        let mut out = String::new();
        f.render(&mut out);
        assert_eq!(
            out,
            "# HELP dapr_x_latencies x\n# TYPE dapr_x_latencies histogram\n\
             dapr_x_latencies_bucket{app_id=\"a\",topic=\"t\\\"1\",le=\"1\"} 1\n\
             dapr_x_latencies_bucket{app_id=\"a\",topic=\"t\\\"1\",le=\"5\"} 2\n\
             dapr_x_latencies_bucket{app_id=\"a\",topic=\"t\\\"1\",le=\"+Inf\"} 3\n\
             dapr_x_latencies_sum{app_id=\"a\",topic=\"t\\\"1\"} 13.5\n\
             dapr_x_latencies_count{app_id=\"a\",topic=\"t\\\"1\"} 3\n"
        );
    }

    #[test]
    fn rules_rewrite_label_values() {
        let rules = vec![(
            "topic".to_string(),
            vec![("orders-*".to_string(), Regex::new("^orders-").unwrap())],
        )];
        let f = Family::new(
            "dapr_c",
            "c",
            Kind::Counter,
            &["topic"],
            Arc::from(Vec::new()),
        )
        .with_rules(&rules);
        f.inc(&["orders-1"]);
        f.inc(&["orders-2"]);
        f.inc(&["other"]);
        let mut out = String::new();
        f.render(&mut out);
        assert!(out.contains("dapr_c{topic=\"orders-*\"} 2\n"), "{out}");
        assert!(out.contains("dapr_c{topic=\"other\"} 1\n"), "{out}");
    }

    #[test]
    fn empty_family_renders_nothing() {
        let f = Family::new("dapr_g", "g", Kind::Gauge, &["a"], Arc::from(Vec::new()));
        let mut out = String::new();
        f.render(&mut out);
        assert!(out.is_empty());
        f.series(&["x"]).add(3);
        f.series(&["x"]).add(-1);
        f.render(&mut out);
        assert!(out.ends_with("dapr_g{a=\"x\"} 2\n"), "{out}");
    }
}
