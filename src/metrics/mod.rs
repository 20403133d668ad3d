//! Prometheus metrics, served at `GET /metrics` in the text format
//! (version 0.0.4): a small encoder and the daemon's own counters and
//! histograms (API request latency, QMP command latency and timeouts). A
//! leaf: `qemu/qmp/` records into it; the scrape that adds host and
//! per-VM series lives with the VMs (`vm/scrape.rs`).
//!
//! The daemon's series live in `static`s that any module may update
//! ([`observe_api_request`], [`observe_qmp_command`], [`count_qmp_timeout`]);
//! host and VM series are read when scraped. Every label value comes from
//! a bounded set (route templates, QMP command names, VM ids), never from
//! raw request paths.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What a metric family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever grows (resets when its source restarts).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations counted in fixed buckets, with their sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value: integers print exactly, floats as Go parses them.
pub trait SampleValue {
    /// Appends the value as the text format spells it.
    fn write_to(&self, out: &mut String);
}

impl SampleValue for u64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl SampleValue for f64 {
    fn write_to(&self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if *self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            // Rust never uses exponents here, and prints the shortest
            // string that reads back as the same number.
            let _ = write!(out, "{self}");
        }
    }
}

/// Writes the text format: families (`# HELP`, `# TYPE`) and their samples.
#[derive(Debug, Default)]
pub struct Encoder {
    out: String,
}

impl Encoder {
    /// An empty exposition.
    pub fn new() -> Encoder {
        Encoder::default()
    }

    /// Starts family `name`: its `# HELP` and `# TYPE` lines. Its samples
    /// must follow before the next family starts.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let _ = writeln!(
            self.out,
            "# HELP {name} {}\n# TYPE {name} {}",
            escape_help(help),
            kind.as_str()
        );
    }

    /// One sample line: `name{label="value",…} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl SampleValue) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label_value(value));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        value.write_to(&mut self.out);
        self.out.push('\n');
    }

    /// The text so far.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A label value as the text format quotes it: backslash, double quote and
/// line feed escaped.
pub fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A `# HELP` text: backslash and line feed escaped (quotes stay).
pub fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Observations of one series (durations in seconds), counted into fixed
/// buckets.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Upper bounds, ascending; `+Inf` is implied.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is `+Inf`'s.
    counts: Vec<u64>,
    /// The sum in whole nanoseconds: adding floats would show their noise
    /// (`0.30000000000000004`) in `_sum`.
    sum_nanos: u128,
    count: u64,
}

impl Histogram {
    /// An empty histogram with upper bounds `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum_nanos: 0,
            count: 0,
        }
    }

    /// Counts `seconds` into the first bucket whose bound is at least it;
    /// the sum takes it rounded to the nanosecond (negative and NaN as 0).
    pub fn observe(&mut self, seconds: f64) {
        // `as` saturates: NaN and negatives become 0, huge values u64::MAX.
        self.observe_nanos(seconds, (seconds * 1e9).round() as u64);
    }

    /// Counts a duration, exactly.
    pub fn observe_duration(&mut self, elapsed: std::time::Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.observe_nanos(elapsed.as_secs_f64(), nanos);
    }

    fn observe_nanos(&mut self, seconds: f64, nanos: u64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum_nanos += u128::from(nanos);
        self.count += 1;
    }

    /// The sum in seconds. Up to 2^53 ns (104 days) the nanoseconds are
    /// exact as a float and one division gives the float nearest the
    /// decimal, which prints as that decimal; beyond, whole seconds plus
    /// the fraction.
    fn sum_seconds(&self) -> f64 {
        const EXACT: u128 = 1 << 53;
        if self.sum_nanos < EXACT {
            self.sum_nanos as f64 / 1e9
        } else {
            let secs = (self.sum_nanos / 1_000_000_000) as f64;
            let nanos = (self.sum_nanos % 1_000_000_000) as f64;
            secs + nanos / 1e9
        }
    }

    /// The `_bucket` (cumulative, `+Inf` last), `_sum` and `_count` lines
    /// of family `name` with `labels`.
    pub fn encode(&self, encoder: &mut Encoder, name: &str, labels: &[(&str, &str)]) {
        let bucket_name = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count;
            let mut le = String::new();
            self.bounds
                .get(i)
                .copied()
                .unwrap_or(f64::INFINITY)
                .write_to(&mut le);
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            encoder.sample(&bucket_name, &with_le, cumulative);
        }
        encoder.sample(&format!("{name}_sum"), labels, self.sum_seconds());
        encoder.sample(&format!("{name}_count"), labels, self.count);
    }
}

/// A histogram family: one [`Histogram`] per set of label values.
#[derive(Debug)]
pub struct HistogramVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    bounds: &'static [f64],
    series: Mutex<BTreeMap<Vec<String>, Histogram>>,
}

impl HistogramVec {
    /// An empty family (usable in a `static`).
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        bounds: &'static [f64],
    ) -> HistogramVec {
        HistogramVec {
            name,
            help,
            labels,
            bounds,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Counts `value` into the series with label values `values` (in the
    /// order of the family's label names).
    pub fn observe(&self, values: &[&str], value: f64) {
        self.with_series(values, |h| h.observe(value));
    }

    /// Counts the duration `elapsed` (exactly, in nanoseconds) into the
    /// series with label values `values`.
    pub fn observe_duration(&self, values: &[&str], elapsed: Duration) {
        self.with_series(values, |h| h.observe_duration(elapsed));
    }

    /// Runs `f` on the series with label values `values`, made on first use.
    fn with_series(&self, values: &[&str], f: impl FnOnce(&mut Histogram)) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        f(series
            .entry(key)
            .or_insert_with(|| Histogram::new(self.bounds)));
    }

    /// The family: HELP, TYPE and every series.
    pub fn encode(&self, encoder: &mut Encoder) {
        encoder.family(self.name, Kind::Histogram, self.help);
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        for (values, histogram) in series.iter() {
            let labels = zip_labels(self.labels, values);
            histogram.encode(encoder, self.name, &labels);
        }
    }
}

/// A counter family: one count per set of label values.
#[derive(Debug)]
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, u64>>,
}

impl CounterVec {
    /// An empty family (usable in a `static`).
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> CounterVec {
        CounterVec {
            name,
            help,
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds one to the series with label values `values`.
    pub fn inc(&self, values: &[&str]) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        let key: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        *series.entry(key).or_insert(0) += 1;
    }

    /// The family: HELP, TYPE and every series.
    pub fn encode(&self, encoder: &mut Encoder) {
        encoder.family(self.name, Kind::Counter, self.help);
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        for (values, count) in series.iter() {
            encoder.sample(self.name, &zip_labels(self.labels, values), *count);
        }
    }
}

fn zip_labels<'a>(names: &[&'a str], values: &'a [String]) -> Vec<(&'a str, &'a str)> {
    names
        .iter()
        .copied()
        .zip(values.iter().map(String::as_str))
        .collect()
}

/// Buckets of API request latency, in seconds: from fast reads to long
/// power actions (a graceful stop may take a minute).
pub const API_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Buckets of QMP command latency, in seconds.
pub const QMP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// API request latency by route template, method and status.
pub static API_REQUEST_DURATION: HistogramVec = HistogramVec::new(
    "vmlet_api_request_duration_seconds",
    "Time until the response to an API request started, by route template \
     (`unmatched` when no route matched), method and status code.",
    &["route", "method", "status"],
    API_BUCKETS,
);

/// QMP command latency by command.
pub static QMP_COMMAND_DURATION: HistogramVec = HistogramVec::new(
    "vmlet_qmp_command_duration_seconds",
    "Time from sending a QMP command to its reply, by command (timed-out \
     commands are counted in vmlet_qmp_timeouts_total instead).",
    &["command"],
    QMP_BUCKETS,
);

/// QMP commands that got no reply within their deadline.
pub static QMP_TIMEOUTS: CounterVec = CounterVec::new(
    "vmlet_qmp_timeouts_total",
    "QMP commands that got no reply within their deadline (each one ends \
     its QMP connection), by command.",
    &["command"],
);

/// Records an API request that took `elapsed` until its response started.
/// `route` is the matched route template, or `unmatched`.
pub fn observe_api_request(route: &str, method: &str, status: u16, elapsed: Duration) {
    // Only the methods the API knows; anything else could grow without bound.
    let method = match method {
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS" => method,
        _ => "other",
    };
    let status = status.to_string();
    API_REQUEST_DURATION.observe_duration(&[route, method, &status], elapsed);
}

/// Records the reply to QMP command `command` after `elapsed`.
pub fn observe_qmp_command(command: &str, elapsed: Duration) {
    QMP_COMMAND_DURATION.observe_duration(&[command], elapsed);
}

/// Counts a QMP command that timed out.
pub fn count_qmp_timeout(command: &str) {
    QMP_TIMEOUTS.inc(&[command]);
}

/// The daemon's own families (API and QMP).
pub fn encode_daemon(encoder: &mut Encoder) {
    API_REQUEST_DURATION.encode(encoder);
    QMP_COMMAND_DURATION.encode(encoder);
    QMP_TIMEOUTS.encode(encoder);
}

#[cfg(test)]
mod tests {
    use super::*;
    use openmetrics_parser::prometheus::parse_prometheus;
    use openmetrics_parser::PrometheusValue;

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label_value(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label_value("two\nlines"), "two\\nlines");
        assert_eq!(escape_label_value("/v1/vms/{id}"), "/v1/vms/{id}");
        assert_eq!(escape_help("say \"hi\"\\\n"), "say \"hi\"\\\\\\n");

        let mut e = Encoder::new();
        e.family("t_info", Kind::Gauge, "odd \\ help\nline");
        e.sample("t_info", &[("name", "q\"uo\\te\nd"), ("id", "}{,=")], 1u64);
        let text = e.finish();
        assert_eq!(
            text,
            "# HELP t_info odd \\\\ help\\nline\n# TYPE t_info gauge\n\
             t_info{name=\"q\\\"uo\\\\te\\nd\",id=\"}{,=\"} 1\n"
        );
        // A real parser reads the values back unchanged.
        let parsed = parse_prometheus(&text).unwrap();
        let family = &parsed.families["t_info"];
        assert_eq!(family.help, "odd \\ help\nline");
        let sample = family.iter_samples().next().unwrap();
        let labels = sample.get_labelset().unwrap();
        assert_eq!(labels.get_label_value("name"), Some("q\"uo\\te\nd"));
        assert_eq!(labels.get_label_value("id"), Some("}{,="));
    }

    #[test]
    fn values_print_as_the_format_spells_them() {
        let text = |v: f64| {
            let mut s = String::new();
            v.write_to(&mut s);
            s
        };
        assert_eq!(text(f64::INFINITY), "+Inf");
        assert_eq!(text(f64::NEG_INFINITY), "-Inf");
        assert_eq!(text(f64::NAN), "NaN");
        assert_eq!(text(0.0005), "0.0005");
        assert_eq!(text(2.0), "2");
        assert_eq!(text(1.5e-9), "0.0000000015");
        let mut s = String::new();
        u64::MAX.write_to(&mut s);
        assert_eq!(s, "18446744073709551615");
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_inf_sum_and_count() {
        static BOUNDS: &[f64] = &[0.1, 1.0, 10.0];
        let mut h = Histogram::new(BOUNDS);
        for v in [0.05, 0.1, 0.5, 2.0, 20.0, 30.0] {
            h.observe(v);
        }
        let mut e = Encoder::new();
        e.family("t_seconds", Kind::Histogram, "test");
        h.encode(&mut e, "t_seconds", &[("route", "/v1/vms/{id}")]);
        let text = e.finish();
        let expected = "# HELP t_seconds test\n# TYPE t_seconds histogram\n\
            t_seconds_bucket{route=\"/v1/vms/{id}\",le=\"0.1\"} 2\n\
            t_seconds_bucket{route=\"/v1/vms/{id}\",le=\"1\"} 3\n\
            t_seconds_bucket{route=\"/v1/vms/{id}\",le=\"10\"} 4\n\
            t_seconds_bucket{route=\"/v1/vms/{id}\",le=\"+Inf\"} 6\n\
            t_seconds_sum{route=\"/v1/vms/{id}\"} 52.65\n\
            t_seconds_count{route=\"/v1/vms/{id}\"} 6\n";
        assert_eq!(text, expected);

        let parsed = parse_prometheus(&text).unwrap();
        let sample = parsed.families["t_seconds"].iter_samples().next().unwrap();
        let PrometheusValue::Histogram(value) = &sample.value else {
            panic!("not a histogram: {:?}", sample.value);
        };
        assert_eq!(value.count, Some(6));
        let inf = value.buckets.last().unwrap();
        assert_eq!(inf.upper_bound, f64::INFINITY);
        assert_eq!(inf.count.as_f64(), 6.0);
    }

    #[test]
    fn vecs_keep_one_series_per_label_set_and_empty_families_parse() {
        static H: HistogramVec = HistogramVec::new("t_h_seconds", "h", &["a", "b"], &[1.0]);
        static C: CounterVec = CounterVec::new("t_c_total", "c", &["a"]);
        static EMPTY: CounterVec = CounterVec::new("t_empty_total", "nothing yet", &["a"]);
        H.observe(&["x", "1"], 0.5);
        H.observe(&["x", "1"], 2.0);
        H.observe(&["y", "1"], 0.5);
        C.inc(&["x"]);
        C.inc(&["x"]);
        C.inc(&["y\"z"]);
        let mut e = Encoder::new();
        H.encode(&mut e);
        C.encode(&mut e);
        EMPTY.encode(&mut e);
        let text = e.finish();
        assert!(
            text.contains("t_h_seconds_count{a=\"x\",b=\"1\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("t_h_seconds_count{a=\"y\",b=\"1\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("t_c_total{a=\"x\"} 2\n"), "{text}");
        assert!(text.contains("t_c_total{a=\"y\\\"z\"} 1\n"), "{text}");
        let parsed = parse_prometheus(&text).unwrap();
        assert_eq!(parsed.families["t_h_seconds"].iter_samples().count(), 2);
        assert_eq!(parsed.families["t_c_total"].iter_samples().count(), 2);
        assert_eq!(parsed.families["t_empty_total"].iter_samples().count(), 0);
    }

    #[test]
    fn histogram_sums_have_no_float_noise() {
        static BOUNDS: &[f64] = &[1.0];
        let mut h = Histogram::new(BOUNDS);
        // As floats, 0.1 + 0.2 is 0.30000000000000004.
        h.observe(0.1);
        h.observe(0.2);
        let mut d = Histogram::new(BOUNDS);
        for _ in 0..3 {
            d.observe_duration(Duration::from_millis(100));
        }
        d.observe_duration(Duration::from_nanos(1));
        let mut e = Encoder::new();
        h.encode(&mut e, "a_seconds", &[]);
        d.encode(&mut e, "b_seconds", &[]);
        let text = e.finish();
        assert!(text.contains("a_seconds_sum 0.3\n"), "{text}");
        assert!(text.contains("b_seconds_sum 0.300000001\n"), "{text}");
        // Past 2^53 ns (104 days) of sum, whole seconds stay exact.
        let mut long = Histogram::new(BOUNDS);
        for _ in 0..200 {
            long.observe_duration(Duration::from_secs(86_400) + Duration::from_millis(250));
        }
        assert_eq!(long.sum_seconds(), 17_280_050.0);
        // Nonsense in, nothing out of the sum.
        let mut odd = Histogram::new(BOUNDS);
        odd.observe(f64::NAN);
        odd.observe(-1.0);
        assert_eq!((odd.sum_seconds(), odd.count), (0.0, 2));
    }

    #[test]
    fn unknown_methods_are_folded() {
        observe_api_request("unmatched", "BREW", 404, Duration::from_millis(1));
        let mut e = Encoder::new();
        API_REQUEST_DURATION.encode(&mut e);
        let text = e.finish();
        assert!(text.contains("route=\"unmatched\",method=\"other\",status=\"404\""));
        assert!(!text.contains("BREW"));
    }
}
