//! Results: a human-readable summary (aligned tables), a JSON file with every number, and an SVG
//! plot (hand-written, no dependencies) with one panel per series group, e.g. per-second
//! p50/p99/max latency over the run and the server's RSS.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

/// A titled table; the first column is left-aligned, the others right-aligned.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Shown above the table.
    pub title: String,
    /// Column names (empty for a key/value table).
    pub header: Vec<String>,
    /// Cells.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with a header.
    pub fn new(title: &str, header: &[&str]) -> Table {
        Table { title: title.into(), header: header.iter().map(|s| s.to_string()).collect(), rows: Vec::new() }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) -> &mut Table {
        self.rows.push(cells);
        self
    }

    /// Adds a key/value row.
    pub fn kv(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Table {
        self.rows.push(vec![key.to_owned(), value.to_string()]);
        self
    }

    /// Renders the table as text.
    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).chain([self.header.len()]).max().unwrap_or(0);
        let mut width = vec![0; cols];
        for r in self.rows.iter().chain([&self.header]) {
            for (i, c) in r.iter().enumerate() {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |r: &Vec<String>| {
            let mut s = String::from("  ");
            for (i, c) in r.iter().enumerate() {
                let pad = width[i] - c.chars().count();
                if i == 0 {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad));
                } else {
                    s.push_str("  ");
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                }
            }
            s.trim_end().to_owned()
        };
        let mut out = format!("{}\n", self.title);
        if !self.header.is_empty() {
            out.push_str(&line(&self.header));
            out.push('\n');
        }
        for r in &self.rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        out
    }
}

/// One line of a plot panel.
#[derive(Debug, Clone)]
pub struct Line {
    /// Legend text.
    pub name: String,
    /// (x, y) points in x order.
    pub points: Vec<(f64, f64)>,
}

/// One chart of the SVG.
#[derive(Debug, Clone)]
pub struct Panel {
    /// Title above the chart.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Logarithmic y axis (for latencies, where max dwarfs p50).
    pub log_y: bool,
    /// The lines.
    pub lines: Vec<Line>,
}

/// Everything a scenario produced.
#[derive(Debug, Clone)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// All the numbers (a JSON object).
    pub json: Value,
    /// The human-readable summary.
    pub tables: Vec<Table>,
    /// Warnings to print after the tables (rate limits exceeded, truncated runs, …).
    pub notes: Vec<String>,
    /// Plot panels.
    pub panels: Vec<Panel>,
}

impl Report {
    /// The summary text.
    pub fn render(&self) -> String {
        let mut out = format!("\n== chatsync-bench {} ==\n", self.scenario);
        for t in &self.tables {
            out.push_str(&t.render());
            out.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }

    /// Writes the JSON (pretty-printed).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.json)?;
        std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
    }

    /// Writes the SVG plot.
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        let title = format!("chatsync-bench {}", self.scenario);
        std::fs::write(path, render_svg(&title, &self.panels))
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Formats a float with `d` decimals.
pub fn f(x: f64, d: usize) -> String {
    format!("{x:.d$}")
}

/// Formats milliseconds for tables.
pub fn ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

const W: f64 = 960.0;
const PANEL_H: f64 = 320.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `target` ticks over `range`.
pub fn nice_step(range: f64, target: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn tick_label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 || (v.fract() == 0.0 && v.abs() >= 1.0) {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_owned()
    }
}

fn render_panel(out: &mut String, p: &Panel, y0: f64) {
    let pw = W - LEFT - RIGHT;
    let ph = PANEL_H - TOP - BOTTOM;
    let pts = || p.lines.iter().flat_map(|l| l.points.iter().copied());
    let (mut xmin, mut xmax) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut ymin, mut ymax) = (f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in pts() {
        if !x.is_finite() || !y.is_finite() || (p.log_y && y <= 0.0) {
            continue;
        }
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="14" font-weight="bold">{}</text>"#,
        LEFT,
        y0 + 22.0,
        esc(&p.title)
    );
    if !xmin.is_finite() {
        let _ = writeln!(out, r#"<text x="{}" y="{}" font-size="12">(no data)</text>"#, LEFT + 10.0, y0 + TOP + 20.0);
        return;
    }
    if xmax <= xmin {
        xmax = xmin + 1.0;
    }
    let (ylo, yhi) = if p.log_y {
        let lo = 10f64.powf(ymin.log10().floor());
        let mut hi = 10f64.powf(ymax.log10().ceil());
        if hi <= lo {
            hi = lo * 10.0;
        }
        (lo, hi)
    } else {
        let hi = if ymax <= 0.0 { 1.0 } else { ymax * 1.05 };
        (0.0f64.min(ymin), hi)
    };
    let sx = |x: f64| LEFT + (x - xmin) / (xmax - xmin) * pw;
    let sy = |y: f64| {
        let frac =
            if p.log_y { (y.log10() - ylo.log10()) / (yhi.log10() - ylo.log10()) } else { (y - ylo) / (yhi - ylo) };
        y0 + TOP + ph - frac * ph
    };
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#444"/>"##,
        y0 + TOP
    );
    // Y grid and labels.
    let mut yticks = Vec::new();
    if p.log_y {
        let mut v = ylo;
        while v <= yhi * 1.0001 {
            yticks.push(v);
            v *= 10.0;
        }
    } else {
        let step = nice_step(yhi - ylo, 6.0);
        let mut v = (ylo / step).ceil() * step;
        while v <= yhi {
            yticks.push(v);
            v += step;
        }
    }
    for v in yticks {
        let y = sy(v);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            tick_label(v)
        );
    }
    // X grid and labels.
    let step = nice_step(xmax - xmin, 10.0);
    let mut v = (xmin / step).ceil() * step;
    while v <= xmax + step * 1e-9 {
        let x = sx(v);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
            y0 + TOP,
            y0 + TOP + ph,
            y0 + TOP + ph + 16.0,
            tick_label(v)
        );
        v += step;
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        y0 + PANEL_H - 12.0,
        esc(&p.x_label)
    );
    let _ = writeln!(
        out,
        r#"<text x="16" y="{:.1}" font-size="12" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        y0 + TOP + ph / 2.0,
        y0 + TOP + ph / 2.0,
        esc(&format!("{}{}", p.y_label, if p.log_y { " (log)" } else { "" }))
    );
    for (i, l) in p.lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let mut segments: Vec<Vec<String>> = vec![Vec::new()];
        for &(x, y) in &l.points {
            if !x.is_finite() || !y.is_finite() || (p.log_y && y <= 0.0) {
                segments.push(Vec::new());
                continue;
            }
            segments.last_mut().expect("never empty").push(format!("{:.1},{:.1}", sx(x), sy(y)));
        }
        for s in segments.iter().filter(|s| !s.is_empty()) {
            if s.len() == 1 {
                let (cx, cy) = s[0].split_once(',').expect("formatted with a comma");
                let _ = writeln!(out, r#"<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>"#);
            } else {
                let _ = writeln!(
                    out,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
                    s.join(" ")
                );
            }
        }
        let ly = y0 + TOP + 14.0 + i as f64 * 18.0;
        let lx = LEFT + pw + 14.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            esc(&l.name)
        );
    }
}

/// Renders the panels, stacked vertically, as one SVG document.
pub fn render_svg(title: &str, panels: &[Panel]) -> String {
    let h = 30.0 + PANEL_H * panels.len().max(1) as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"#
    );
    out.push('\n');
    let _ = writeln!(out, r#"<rect width="{W}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="20" font-size="16" font-weight="bold" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    for (i, p) in panels.iter().enumerate() {
        render_panel(&mut out, p, 30.0 + i as f64 * PANEL_H);
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new("T", &["step", "rate"]);
        t.row(vec!["a".into(), "1".into()]).row(vec!["bbb".into(), "100".into()]);
        assert_eq!(t.render(), "T\n  step  rate\n  a        1\n  bbb    100\n");
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 10.0), 10.0);
        assert_eq!(nice_step(37.0, 10.0), 5.0);
        assert_eq!(nice_step(0.9, 10.0), 0.1);
    }

    #[test]
    fn svg_has_a_polyline_per_line_and_escapes() {
        let p = Panel {
            title: "lat <ms>".into(),
            x_label: "s".into(),
            y_label: "ms".into(),
            log_y: true,
            lines: vec![
                Line { name: "p50".into(), points: vec![(0.0, 1.0), (1.0, 2.0), (2.0, 0.0), (3.0, 3.0), (4.0, 4.0)] },
                Line { name: "max".into(), points: vec![(0.0, 10.0), (4.0, 100.0)] },
            ],
        };
        let svg = render_svg("t", &[p]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("lat &lt;ms&gt;"));
        assert_eq!(svg.matches("<polyline").count(), 3, "a zero on a log axis splits the line");
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
