//! Small SVG charts (text as SVG `<text>`: no fonts needed to write them): grouped bars with
//! min–max whiskers, and lines over a log-scaled x axis.

use std::fmt::Write as _;

/// One value: median, min, max.
pub type Point = Option<(f64, f64, f64)>;

pub struct Series {
    pub name: String,
    pub values: Vec<Point>,
    /// Index into the palette.
    pub color: usize,
    /// Dashed line (line charts).
    pub dashed: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, values: Vec<Point>, color: usize) -> Series {
        Series { name: name.into(), values, color, dashed: false }
    }
}

const W: f64 = 760.0;
const H: f64 = 380.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;
const COLORS: [&str; 6] = ["#7f7f7f", "#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"];

pub fn color(i: usize) -> &'static str {
    COLORS[i % COLORS.len()]
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A "nice" axis maximum and step (1, 2, 5 × 10^k) for values up to `max`.
pub fn nice_axis(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_tick(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{}M", trim(v / 1_000_000.0))
    } else if v >= 10_000.0 {
        format!("{}k", trim(v / 1000.0))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn frame(out: &mut String, title: &str, y_label: &str, y_max: f64, step: f64) {
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        W / 2.0,
        esc(title)
    );
    let plot_h = H - TOP - BOTTOM;
    let mut v = 0.0;
    while v <= y_max + step / 2.0 {
        let y = TOP + plot_h * (1.0 - v / y_max);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(v)
        );
        v += step;
    }
    let _ = writeln!(
        out,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{LEFT}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>",
        H - BOTTOM,
        W - RIGHT
    );
    let _ = writeln!(
        out,
        "<text transform=\"translate(18,{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        TOP + plot_h / 2.0,
        esc(y_label)
    );
}

fn legend(out: &mut String, series: &[Series]) {
    let (mut x, mut y) = (LEFT, H - 40.0);
    for s in series {
        let w = 28.0 + 7.0 * s.name.chars().count() as f64;
        if x + w > W - RIGHT {
            x = LEFT;
            y += 18.0;
        }
        let _ = writeln!(
            out,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"12\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            if s.dashed { 4 } else { 12 },
            color(s.color),
            x + 16.0,
            y + 10.0,
            esc(&s.name)
        );
        x += w;
    }
}

fn y_of(v: f64, y_max: f64) -> f64 {
    let plot_h = H - TOP - BOTTOM;
    TOP + plot_h * (1.0 - (v / y_max).clamp(0.0, 1.05))
}

/// Grouped bars: one group per entry of `groups`, one bar per series; whiskers = min–max.
pub fn bars(title: &str, y_label: &str, groups: &[String], series: &[Series]) -> String {
    let max = series.iter().flat_map(|s| s.values.iter().flatten()).map(|p| p.2).fold(0.0, f64::max);
    let (y_max, step) = nice_axis(max);
    let mut out = String::new();
    frame(&mut out, title, y_label, y_max, step);
    let plot_w = W - LEFT - RIGHT;
    let gw = plot_w / groups.len().max(1) as f64;
    let bw = (gw * 0.8) / series.len().max(1) as f64;
    for (g, name) in groups.iter().enumerate() {
        let gx = LEFT + gw * g as f64 + gw * 0.1;
        for (i, s) in series.iter().enumerate() {
            let Some(Some((med, lo, hi))) = s.values.get(g) else { continue };
            let x = gx + bw * i as f64;
            let y = y_of(*med, y_max);
            let _ = writeln!(
                out,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}: {}</title></rect>",
                bw * 0.9,
                (H - BOTTOM - y).max(0.0),
                color(s.color),
                esc(&s.name),
                trim(*med)
            );
            let cx = x + bw * 0.45;
            let _ = writeln!(
                out,
                "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
                y_of(*lo, y_max),
                y_of(*hi, y_max)
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            LEFT + gw * (g as f64 + 0.5),
            H - BOTTOM + 16.0,
            esc(name)
        );
    }
    legend(&mut out, series);
    out.push_str("</svg>\n");
    out
}

/// Lines over x values (log10 scale), one per series; whiskers = min–max.
pub fn lines(title: &str, y_label: &str, xs: &[f64], series: &[Series]) -> String {
    let max = series.iter().flat_map(|s| s.values.iter().flatten()).map(|p| p.2).fold(0.0, f64::max);
    let (y_max, step) = nice_axis(max);
    let mut out = String::new();
    frame(&mut out, title, y_label, y_max, step);
    let plot_w = W - LEFT - RIGHT - 40.0;
    let (lx0, lx1) =
        (xs.iter().copied().fold(f64::INFINITY, f64::min).max(1.0).log10(), xs.iter().copied().fold(0.0, f64::max).max(10.0).log10());
    let x_of = |x: f64| LEFT + 20.0 + plot_w * (x.max(1.0).log10() - lx0) / (lx1 - lx0).max(1e-9);
    for x in xs {
        let _ = writeln!(out, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", x_of(*x), H - BOTTOM + 16.0, fmt_tick(*x));
    }
    for s in series {
        let pts: Vec<(f64, (f64, f64, f64))> = xs.iter().zip(&s.values).filter_map(|(x, v)| v.map(|v| (x_of(*x), v))).collect();
        let path: Vec<String> = pts.iter().map(|(x, v)| format!("{x:.1},{:.1}", y_of(v.0, y_max))).collect();
        let dash = if s.dashed { " stroke-dasharray=\"6,4\"" } else { "" };
        let _ =
            writeln!(out, "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>", color(s.color), path.join(" "));
        for (x, (med, lo, hi)) in pts {
            let _ = writeln!(
                out,
                "<circle cx=\"{x:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"><title>{}: {}</title></circle><line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{}\"/>",
                y_of(med, y_max),
                color(s.color),
                esc(&s.name),
                trim(med),
                y_of(lo, y_max),
                y_of(hi, y_max),
                color(s.color)
            );
        }
    }
    legend(&mut out, series);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_are_nice() {
        assert_eq!(nice_axis(9.0), (10.0, 2.0));
        assert_eq!(nice_axis(12_345.0), (15_000.0, 5_000.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
    }

    #[test]
    fn charts_are_well_formed_svg() {
        let s = vec![
            Series::new("direct", vec![Some((3.0, 2.0, 4.0)), None], 0),
            Series::new("a<b", vec![Some((1.0, 1.0, 1.0)), Some((2.0, 1.5, 2.5))], 1),
        ];
        let b = bars("t", "y", &["g1".into(), "g2".into()], &s);
        assert!(b.starts_with("<svg") && b.trim_end().ends_with("</svg>"), "{b}");
        assert!(b.contains("a&lt;b") && !b.contains("a<b"));
        assert_eq!(b.matches("<rect x=").count(), 3 + 2, "3 bars + 2 legend boxes");
        let l = lines("t", "y", &[1.0, 100.0], &s);
        assert_eq!(l.matches("<polyline").count(), 2);
    }
}
