//! Pictures drawn by hand as inline SVG, for the eval report and the console: a plot frame
//! with axes, escaping, thinning of long lines, and the shared style sheet. A few polylines
//! and rectangles do not justify a plotting crate (the ones that write SVG pull in font and
//! image stacks this build does not otherwise need).

use std::fmt::Write as _;

/// Most points a drawn line keeps (every n-th beyond it, the last always).
pub const MAX_POINTS: usize = 600;

/// Thin a sequence to at most `MAX_POINTS`, keeping the first and the last.
pub fn thin<T: Clone>(v: &[T]) -> Vec<T> {
    if v.len() <= MAX_POINTS {
        return v.to_vec();
    }
    let step = v.len().div_ceil(MAX_POINTS);
    let mut out: Vec<T> = v.iter().step_by(step).cloned().collect();
    if (v.len() - 1) % step != 0 {
        out.push(v[v.len() - 1].clone());
    }
    out
}

/// Escape text for HTML and SVG.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Width of a plot.
pub const W: f64 = 560.0;
/// Height of a plot.
pub const H: f64 = 260.0;
/// Margin around a plot's frame (axes, ticks, labels).
pub const PAD: f64 = 44.0;

/// An SVG plot frame with axes from (x0..x1, y0..y1); returns the SVG start and a mapper.
pub fn frame(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    xticks: &[(f64, String)],
    yticks: &[(f64, String)],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> (String, impl Fn(f64, f64) -> (f64, f64)) {
    let sx = move |x: f64| PAD + (x - x0) / (x1 - x0).max(1e-12) * (W - 2.0 * PAD);
    let sy = move |y: f64| H - PAD + -(y - y0) / (y1 - y0).max(1e-12) * (H - 2.0 * PAD);
    let mut s = format!(
        "<figure><figcaption>{}</figcaption><svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">",
        esc(title),
        esc(title)
    );
    let _ = write!(
        s,
        "<rect x=\"{PAD}\" y=\"{PAD}\" width=\"{}\" height=\"{}\" class=\"plot\"/>",
        W - 2.0 * PAD,
        H - 2.0 * PAD
    );
    for (x, l) in xticks {
        let px = sx(*x);
        let _ = write!(
            s,
            "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" class=\"grid\"/><text x=\"{px:.1}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"middle\">{}</text>",
            PAD,
            H - PAD,
            H - PAD + 14.0,
            esc(l)
        );
    }
    for (y, l) in yticks {
        let py = sy(*y);
        let _ = write!(
            s,
            "<line x1=\"{PAD}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" class=\"grid\"/><text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"end\">{}</text>",
            W - PAD,
            PAD - 4.0,
            py + 4.0,
            esc(l)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" class=\"axis\" text-anchor=\"middle\">{}</text><text x=\"12\" y=\"{:.1}\" class=\"axis\" text-anchor=\"middle\" transform=\"rotate(-90 12 {:.1})\">{}</text>",
        W / 2.0,
        H - 8.0,
        esc(xlabel),
        H / 2.0,
        H / 2.0,
        esc(ylabel)
    );
    (s, move |x, y| (sx(x), sy(y)))
}

/// Close a figure opened by [`frame`], with a note under it.
pub fn end_figure(mut s: String, note: &str) -> String {
    s.push_str("</svg>");
    if !note.is_empty() {
        let _ = write!(s, "<p class=\"note\">{}</p>", esc(note));
    }
    s.push_str("</figure>\n");
    s
}

/// The style sheet of the report and the console.
pub const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}\
h1{font-size:20px}h2{font-size:16px;margin-top:28px}table{border-collapse:collapse}\
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}\
td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:8px 16px 8px 0;vertical-align:top}\
figcaption{font-weight:600;margin-bottom:4px}.plot{fill:#fafafa;stroke:#999}.grid{stroke:#e4e4e4}\
.tick{font-size:10px;fill:#555}.axis{font-size:11px;fill:#333}.line{fill:none;stroke:#1f5fa8;stroke-width:1.5}\
.mark{fill:#c62828}.bar{fill:#1f5fa8}.bar2{fill:#9fbfe3}.span{fill:#ffe9b3;opacity:.6}\
.threshold{stroke:#c62828;stroke-dasharray:4 3}.label{fill:#e08a00}.note{font-size:12px;color:#555;max-width:560px}";
