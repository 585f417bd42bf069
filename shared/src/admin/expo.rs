//! The Prometheus text exposition format, version 0.0.4, written by hand.
//!
//! Format: <https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format>.
//! One family at a time: `# HELP name text`, `# TYPE name counter|gauge|histogram`, then its
//! samples, contiguous. In HELP text `\` and newline are escaped; in label values also `"`.
//! Values are Go-parsable floats (`+Inf`, `-Inf`, `NaN` spelt so). A histogram's samples
//! are `name_bucket{le=".."}` (cumulative, ascending, ending with `le="+Inf"` equal to
//! `name_count`), `name_sum` and `name_count`.
//!
//! The [`Encoder`] only writes whole families, so no sample can go out without its
//! HELP and TYPE.

use super::metrics::{Counter, Family, Gauge, HistogramSnapshot, Label};
use std::fmt::Write;

/// The `Content-Type` of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A sample value.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    Int(i64),
    Uint(u64),
    Float(f64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Uint(v) => write!(f, "{v}"),
            Value::Float(v) if v.is_nan() => f.write_str("NaN"),
            Value::Float(v) if v == f64::INFINITY => f.write_str("+Inf"),
            Value::Float(v) if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            // Rust never uses exponent notation for `{}` on f64; Go's ParseFloat reads it.
            Value::Float(v) => write!(f, "{v}"),
        }
    }
}

/// Writes metric families into a string.
#[derive(Debug, Default)]
pub struct Encoder {
    out: String,
}

impl Encoder {
    /// The exposition written so far.
    pub fn finish(self) -> String {
        self.out
    }

    fn header(&mut self, name: &str, help: &str, kind: &str) {
        debug_assert!(valid_metric_name(name), "invalid metric name {name}");
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: Value) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label_value(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A counter without labels. `name` ends in `_total`.
    pub fn counter(&mut self, name: &str, help: &str, c: &Counter) {
        self.counter_value(name, help, c.get());
    }

    /// A counter without labels, from a value kept elsewhere. `name` ends in `_total`.
    pub fn counter_value(&mut self, name: &str, help: &str, v: u64) {
        debug_assert!(name.ends_with("_total"), "counter {name} must end in _total");
        self.header(name, help, "counter");
        self.sample(name, &[], Value::Uint(v));
    }

    /// A counter per value of one label.
    pub fn counter_family<L: Label>(&mut self, name: &str, help: &str, f: &Family<L, Counter>) {
        debug_assert!(name.ends_with("_total"), "counter {name} must end in _total");
        self.header(name, help, "counter");
        for (l, c) in f.iter() {
            self.sample(name, &[(L::NAME, l.as_str())], Value::Uint(c.get()));
        }
    }

    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help: &str, v: Value) {
        self.header(name, help, "gauge");
        self.sample(name, &[], v);
    }

    /// A gauge family given as `(labels, value)` samples (possibly none).
    pub fn gauge_samples(&mut self, name: &str, help: &str, samples: &[(&[(&str, &str)], Value)]) {
        self.header(name, help, "gauge");
        for (labels, v) in samples {
            self.sample(name, labels, *v);
        }
    }

    /// A gauge per value of one label.
    pub fn gauge_family<L: Label>(&mut self, name: &str, help: &str, f: &Family<L, Gauge>) {
        self.header(name, help, "gauge");
        for (l, g) in f.iter() {
            self.sample(name, &[(L::NAME, l.as_str())], Value::Int(g.get()));
        }
    }

    /// A histogram. `name` carries the unit (`_seconds`).
    pub fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.header(name, help, "histogram");
        let bucket = format!("{name}_bucket");
        for &(le, n) in &h.buckets {
            let le = Value::Float(le).to_string();
            self.sample(&bucket, &[("le", &le)], Value::Uint(n));
        }
        self.sample(&bucket, &[("le", "+Inf")], Value::Uint(h.count));
        self.sample(&format!("{name}_sum"), &[], Value::Float(h.sum_seconds));
        self.sample(&format!("{name}_count"), &[], Value::Uint(h.count));
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label_value(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_value_with_quote_backslash_newline_is_escaped() {
        let mut e = Encoder::default();
        e.gauge_samples("x_info", "a \\ b\nc", &[(&[("node", "a\"b\\c\nd")], Value::Int(1))]);
        assert_eq!(e.finish(), "# HELP x_info a \\\\ b\\nc\n# TYPE x_info gauge\nx_info{node=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn float_values_use_go_spellings() {
        assert_eq!(Value::Float(f64::INFINITY).to_string(), "+Inf");
        assert_eq!(Value::Float(f64::NEG_INFINITY).to_string(), "-Inf");
        assert_eq!(Value::Float(f64::NAN).to_string(), "NaN");
        assert_eq!(Value::Float(0.00005).to_string(), "0.00005");
        assert_eq!(Value::Float(1.0).to_string(), "1");
    }

    #[test]
    fn metric_names_are_checked() {
        assert!(valid_metric_name("understudy_gate_packets_total"));
        assert!(valid_metric_name("a:b_c1"));
        assert!(!valid_metric_name("1abc"));
        assert!(!valid_metric_name("a-b"));
        assert!(!valid_metric_name(""));
    }
}
