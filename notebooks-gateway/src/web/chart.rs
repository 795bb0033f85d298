//! Charts drawn on the server as inline SVG (no script, no external asset; the Content-Security-Policy
//! needs nothing more): privacy spent over time, one step line per series, with each series' granted
//! total as a dashed line. Every label is escaped by maud.

use maud::{Markup, html};

/// One line: its label, `(unix seconds, cumulative spend)` in time order, and the total granted.
pub(super) struct Series {
    pub(super) label: String,
    pub(super) points: Vec<(i64, f64)>,
    pub(super) granted: Option<f64>,
}

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 280.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;
/// Line colours (distinguishable, and readable on white).
const PALETTE: [&str; 8] = [
    "#1f5fa8", "#c0392b", "#1e8449", "#8e44ad", "#d35400", "#117a8b", "#7f8c8d", "#b7950b",
];

fn date(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map_or_else(String::new, |d| d.format("%Y-%m-%d").to_string())
}

/// A step chart of cumulative spend over time; `unit` names the axis (ε, or ρ on zCDP datasets).
pub(super) fn spend_chart(title: &str, unit: &str, series: &[Series], now: i64) -> Markup {
    let points = series.iter().flat_map(|s| s.points.iter());
    let t0 = points.clone().map(|p| p.0).min().unwrap_or(now).min(now);
    let t1 = points
        .map(|p| p.0)
        .max()
        .unwrap_or(now)
        .max(now)
        .max(t0 + 86_400);
    let top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1).chain(s.granted))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.08;
    let x = |t: i64| LEFT + (t - t0) as f64 / (t1 - t0) as f64 * (WIDTH - LEFT - RIGHT);
    let y = |v: f64| TOP + (1.0 - v / top) * (HEIGHT - TOP - BOTTOM);
    let path = |s: &Series| {
        // Flat until each charge, then a step up; carried on to now.
        let mut d = format!("{:.1},{:.1}", x(t0), y(0.0));
        let mut last = 0.0;
        for &(t, v) in &s.points {
            d.push_str(&format!(
                " {:.1},{:.1} {:.1},{:.1}",
                x(t),
                y(last),
                x(t),
                y(v)
            ));
            last = v;
        }
        d.push_str(&format!(" {:.1},{:.1}", x(t1), y(last)));
        d
    };
    let ticks = [0.0, top / 2.0, top / 1.08];
    html! {
        figure.chart {
            svg xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
                aria-label=(format!("{title}: cumulative {unit} spent over time")) {
                title { (title) }
                rect x=(LEFT) y=(TOP) width=(WIDTH - LEFT - RIGHT) height=(HEIGHT - TOP - BOTTOM) fill="#fff" stroke="#d8dde6" {}
                @for v in ticks {
                    line x1=(LEFT) x2=(WIDTH - RIGHT) y1=(format!("{:.1}", y(v))) y2=(format!("{:.1}", y(v))) stroke="#eef1f5" {}
                    text x=(LEFT - 6.0) y=(format!("{:.1}", y(v) + 4.0)) text-anchor="end" font-size="11" fill="#5b6576" { (format!("{v:.2}")) }
                }
                text x=(LEFT) y=(HEIGHT - 18.0) font-size="11" fill="#5b6576" { (date(t0)) }
                text x=(WIDTH - RIGHT) y=(HEIGHT - 18.0) text-anchor="end" font-size="11" fill="#5b6576" { (date(t1)) }
                text x=(12) y=(TOP + 8.0) font-size="11" fill="#5b6576" { (unit) }
                @for (i, s) in series.iter().enumerate() {
                    @let colour = PALETTE[i % PALETTE.len()];
                    @if let Some(g) = s.granted.filter(|g| g.is_finite()) {
                        line x1=(LEFT) x2=(WIDTH - RIGHT) y1=(format!("{:.1}", y(g))) y2=(format!("{:.1}", y(g)))
                            stroke=(colour) stroke-dasharray="4 4" stroke-width="1" {}
                    }
                    polyline points=(path(s)) fill="none" stroke=(colour) stroke-width="2" {}
                }
            }
            figcaption {
                @for (i, s) in series.iter().enumerate() {
                    span.key {
                        // A presentation attribute, not an inline style: the policy allows no inline CSS.
                        svg.swatch width="10" height="10" aria-hidden="true" { rect width="10" height="10" fill=(PALETTE[i % PALETTE.len()]) {} }
                        (s.label) ": " (format!("{:.4}", s.points.last().map_or(0.0, |p| p.1)))
                        @if let Some(g) = s.granted { " of " (format!("{g:.4}")) " (dashed)" }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_escapes_labels_and_steps_up_at_each_charge() {
        let series = [Series {
            label: "<script>alert(1)</script>".into(),
            points: vec![(1_000_000, 0.1), (1_086_400, 0.3)],
            granted: Some(1.0),
        }];
        let svg = spend_chart("a \"title\"", "ε", &series, 1_172_800).into_string();
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;"), "{svg}");
        assert!(svg.contains("<polyline"), "{svg}");
        assert!(svg.contains("stroke-dasharray"), "{svg}");
        // Two charges: start, two steps (two points each), carried to now.
        let points = svg
            .split("points=\"")
            .nth(1)
            .and_then(|p| p.split('"').next())
            .expect("points");
        assert_eq!(points.split(' ').count(), 6, "{points}");
        // No series: still a chart, nothing divides by zero.
        let empty = spend_chart("none", "ε", &[], 0).into_string();
        assert!(!empty.contains("NaN") && !empty.contains("inf"), "{empty}");
    }
}
