//! Small SVG line plots for the benchmark report (`us-bench`): polylines over a linear or logarithmic x axis
//! and a linear y axis from zero, with ticks, a legend and labelled vertical markers. Plain SVG 1.1 text, no
//! dependency.

use std::fmt::Write as _;

/// One line of a plot.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    /// Any SVG colour (`#1f77b4`).
    pub color: String,
    pub points: Vec<(f64, f64)>,
    /// Draw a dot at each point as well.
    pub dots: bool,
}

/// A plot: x range from the data (and the markers), y from zero to the largest value.
#[derive(Debug, Clone)]
pub struct Plot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Logarithmic x axis (every x must be positive).
    pub x_log: bool,
    pub series: Vec<Series>,
    /// Vertical lines at these x, with a label.
    pub marks: Vec<(f64, String)>,
    pub width: u32,
    pub height: u32,
}

impl Plot {
    pub fn new(title: &str, x_label: &str, y_label: &str) -> Plot {
        Plot {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            x_log: false,
            series: Vec::new(),
            marks: Vec::new(),
            width: 800,
            height: 360,
        }
    }

    /// The plot as an SVG document.
    pub fn to_svg(&self) -> String {
        let (w, h) = (self.width as f64, self.height as f64);
        let (left, right, top, bottom) = (72.0, 20.0, 36.0, 52.0);
        let (pw, ph) = (w - left - right, h - top - bottom);
        let fx = |x: f64| if self.x_log { x.max(f64::MIN_POSITIVE).log10() } else { x };
        let xs = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).chain(self.marks.iter().map(|m| m.0));
        let (mut x0, mut x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(fx(x)), b.max(fx(x))));
        if !x0.is_finite() {
            (x0, x1) = (0.0, 1.0);
        }
        if x1 - x0 < 1e-9 {
            (x0, x1) = (x0 - 0.5, x1 + 0.5);
        }
        let y_max = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).fold(0.0f64, f64::max);
        let y_ticks = nice_ticks(0.0, if y_max > 0.0 { y_max } else { 1.0 }, 6);
        let y1 = y_ticks.last().copied().unwrap_or(1.0).max(y_max).max(1e-9);
        let px = |x: f64| left + (fx(x) - x0) / (x1 - x0) * pw;
        let py = |y: f64| top + ph - y / y1 * ph;

        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
            w / 2.0,
            escape(&self.title)
        );
        // Grid and y ticks.
        for &t in &y_ticks {
            let y = py(t);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + pw,
                left - 6.0,
                y + 4.0,
                fmt_tick(t)
            );
        }
        // x ticks.
        let x_ticks: Vec<f64> = if self.x_log {
            (x0.floor() as i32..=x1.ceil() as i32)
                .map(|e| 10f64.powi(e))
                .filter(|&v| fx(v) >= x0 - 1e-9 && fx(v) <= x1 + 1e-9)
                .collect()
        } else {
            nice_ticks(x0, x1, 10).into_iter().filter(|&v| v >= x0 - 1e-9 && v <= x1 + 1e-9).collect()
        };
        for &t in &x_ticks {
            let x = px(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                top + ph,
                top + ph + 16.0,
                fmt_tick(t)
            );
        }
        // Axes and labels.
        let _ = writeln!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + pw / 2.0,
            h - 12.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
            top + ph / 2.0,
            top + ph / 2.0,
            escape(&self.y_label)
        );
        // Markers.
        for (x, label) in &self.marks {
            let x = px(*x);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#c00" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#c00">{}</text>"##,
                top + ph,
                x + 4.0,
                top + 14.0,
                escape(label)
            );
        }
        // Lines.
        for series in &self.series {
            let pts: Vec<String> = series.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                escape(&series.color),
                pts.join(" ")
            );
            if series.dots {
                for &(x, y) in &series.points {
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{}"/>"#,
                        px(x),
                        py(y),
                        escape(&series.color)
                    );
                }
            }
        }
        // Legend, top right inside the plot.
        for (i, series) in self.series.iter().enumerate() {
            let y = top + 16.0 + 16.0 * i as f64;
            let x = left + pw - 230.0;
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="3"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
                y - 4.0,
                x + 20.0,
                y - 4.0,
                escape(&series.color),
                x + 26.0,
                escape(&series.name)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// Round tick values (1, 2 or 5 times a power of ten apart) covering `[lo, hi]`, about `target` of them.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !lo.is_finite() || !hi.is_finite() || hi <= lo {
        return vec![lo];
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).floor() * step;
    let mut out = Vec::new();
    let mut k = 0;
    loop {
        let v = first + step * k as f64;
        // Snap away floating-point dust (0.30000000000000004) by rounding to the step's decimals.
        let decimals = (-step.log10().floor()).max(0.0) as usize;
        let v: f64 = format!("{v:.decimals$}").parse().unwrap_or(v);
        out.push(v);
        if v >= hi - step * 1e-9 || k > 1000 {
            break;
        }
        k += 1;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-3) {
        format!("{v:.0e}")
    } else if v.fract().abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(nice_ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(nice_ticks(0.0, 9.1, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(nice_ticks(-2.0, 3.0, 5), vec![-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]);
        assert_eq!(nice_ticks(0.0, 0.3, 3), vec![0.0, 0.1, 0.2, 0.3]);
        assert_eq!(nice_ticks(5.0, 5.0, 5), vec![5.0]);
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(
            (fmt_tick(0.0), fmt_tick(20.0), fmt_tick(0.25), fmt_tick(2e6)),
            ("0".into(), "20".into(), "0.25".into(), "2e6".into())
        );
    }

    #[test]
    fn the_svg_has_one_polyline_per_series_and_escapes_text() {
        let mut p = Plot::new("a < b & c", "x", "y");
        p.x_log = true;
        p.series.push(Series {
            name: "one".into(),
            color: "#111".into(),
            points: vec![(100.0, 5.0), (10000.0, 50.0)],
            dots: true,
        });
        p.series.push(Series {
            name: "two".into(),
            color: "#222".into(),
            points: vec![(100.0, 1.0), (1000.0, 2.0)],
            dots: false,
        });
        p.marks.push((1000.0, "kill".into()));
        let svg = p.to_svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("a &lt; b &amp; c") && !svg.contains("a < b"));
        // Decades on a log axis.
        assert!(svg.contains(">100</text>") && svg.contains(">1000</text>") && svg.contains(">10000</text>"), "{svg}");
    }

    #[test]
    fn an_empty_plot_still_renders() {
        let svg = Plot::new("empty", "x", "y").to_svg();
        assert!(svg.contains("</svg>") && !svg.contains("NaN"), "{svg}");
    }
}
