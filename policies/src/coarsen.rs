//! Coarsening of released values: numbers to a grid (`round`, `bin`) within codes (`top_code`,
//! `bottom_code`), and times to a grain (`truncate_time`). Pure functions of one value, shared by the
//! profile's checks (declared DP bounds must stay consistent with the coarsened values) and the transform.

use std::fmt;

/// How a numeric value is coarsened: first clamped to its codes, then put on the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Coarsening {
    /// The grid values are released on.
    pub grid: Grid,
    /// Values below this become this (`bottom_code`).
    pub bottom_code: Option<f64>,
    /// Values above this become this (`top_code`).
    pub top_code: Option<f64>,
}

/// The values a coarsened number can take.
#[derive(Debug, Clone, PartialEq)]
pub enum Grid {
    /// As it is (only the codes apply).
    Exact,
    /// The nearest multiple of this step (`round`, `step = 0.5`).
    Step(f64),
    /// This many significant digits (`round`, `digits = 2`: 12,345.67 → 12,000).
    Significant(u32),
    /// The lower edge of the bin the value falls in (`bin`, `edges = [0, 100, 1000]`): edges ascend;
    /// below the first edge is the first bin, at or above the last edge the last.
    Bins(Vec<f64>),
}

impl Coarsening {
    /// The released value, or `None` when there is none to release (NaN; an infinity no code catches).
    pub fn apply(&self, v: f64) -> Option<f64> {
        if v.is_nan() {
            return None;
        }
        let mut v = v;
        if let Some(top) = self.top_code
            && v > top
        {
            v = top;
        }
        if let Some(bottom) = self.bottom_code
            && v < bottom
        {
            v = bottom;
        }
        let out = match &self.grid {
            Grid::Exact => v,
            Grid::Step(step) => on_step(v, *step),
            Grid::Significant(digits) => significant(v, *digits),
            Grid::Bins(edges) => {
                let i = edges.partition_point(|e| *e <= v);
                edges[i.saturating_sub(1)]
            }
        };
        out.is_finite().then_some(out)
    }

    /// True when every value the coarsening gives is an integer (it may then apply to integer columns).
    pub fn is_integral(&self) -> bool {
        let whole = |x: &f64| x.fract() == 0.0;
        self.top_code.iter().chain(&self.bottom_code).all(whole)
            && match &self.grid {
                Grid::Exact | Grid::Significant(_) => true,
                Grid::Step(s) => whole(s),
                Grid::Bins(edges) => edges.iter().all(whole),
            }
    }
}

impl fmt::Display for Coarsening {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.grid {
            Grid::Exact => f.write_str("coded")?,
            Grid::Step(s) => write!(f, "rounded to a multiple of {s}")?,
            Grid::Significant(d) => write!(f, "rounded to {d} significant digits")?,
            Grid::Bins(edges) => {
                let e: Vec<String> = edges.iter().map(f64::to_string).collect();
                write!(f, "binned at [{}] (lower edges)", e.join(", "))?;
            }
        }
        if let Some(b) = self.bottom_code {
            write!(f, ", below {b} bottom-coded")?;
        }
        if let Some(t) = self.top_code {
            write!(f, ", above {t} top-coded")?;
        }
        Ok(())
    }
}

/// The nearest multiple of `step`, written with no more decimals than the step has (so 0.1 steps give
/// 0.3, not 0.30000000000000004).
fn on_step(v: f64, step: f64) -> f64 {
    let r = (v / step).round() * step;
    if step.fract() == 0.0 {
        // A whole step has no decimals: the multiple is exact already.
        return r;
    }
    let text = step.to_string();
    let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
    if decimals == 0 || decimals > 17 {
        return r;
    }
    format!("{r:.decimals$}").parse().unwrap_or(r)
}

/// `v` to `digits` significant digits, as the nearest double to the decimal it reads as.
fn significant(v: f64, digits: u32) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    if let Some(r) = significant_by_arithmetic(v, digits) {
        return r;
    }
    let precision = digits.saturating_sub(1) as usize;
    format!("{v:.precision$e}").parse().unwrap_or(v)
}

/// Powers of ten a double holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// [`significant`] without formatting, where arithmetic gives the same double: the value scaled to
/// `digits` integer digits is rounded to the integer `m`, and `m` divided (or multiplied) by an exact
/// power of ten is, by IEEE rounding, the nearest double to the decimal — what parsing the formatted
/// text gives. `None` (the formatting path decides) where the scaled value lies too close to a half or
/// to a decade's edge for the inexact scaling to be trusted, or out of the exact range.
fn significant_by_arithmetic(v: f64, digits: u32) -> Option<f64> {
    if !(1..=15).contains(&digits) {
        return None;
    }
    let a = v.abs();
    if !(1e-15..1e15).contains(&a) {
        return None;
    }
    let e = a.log10().floor() as i32;
    let k = digits as i32 - 1 - e;
    let scale = *POW10.get(k.unsigned_abs() as usize)?;
    let x = if k >= 0 { a * scale } else { a / scale };
    let (low, high) = (POW10[digits as usize - 1], POW10[digits as usize]);
    let margin = 1e-9;
    if x < low * (1.0 + margin) || x > high * (1.0 - margin) || (x.fract() - 0.5).abs() < margin {
        return None;
    }
    let m = x.round();
    let r = if k >= 0 { m / scale } else { m * scale };
    Some(r.copysign(v))
}

/// How finely a time is released, coarsest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimeGrain {
    /// The year only.
    Year,
    /// Year and month.
    Month,
    /// The calendar day.
    Day,
    /// The hour.
    Hour,
    /// The minute.
    Minute,
    /// The second or finer (as recorded).
    Second,
}

impl TimeGrain {
    /// The grain with this profile name.
    pub fn from_name(name: &str) -> Option<TimeGrain> {
        Some(match name {
            "year" => TimeGrain::Year,
            "month" => TimeGrain::Month,
            "day" => TimeGrain::Day,
            "hour" => TimeGrain::Hour,
            "minute" => TimeGrain::Minute,
            "second" => TimeGrain::Second,
            _ => return None,
        })
    }

    /// Its profile name.
    pub fn name(self) -> &'static str {
        match self {
            TimeGrain::Year => "year",
            TimeGrain::Month => "month",
            TimeGrain::Day => "day",
            TimeGrain::Hour => "hour",
            TimeGrain::Minute => "minute",
            TimeGrain::Second => "second",
        }
    }

    /// A timestamp (microseconds since the epoch) truncated to this grain, for the grains within a day
    /// (`Day`, `Hour`, `Minute`, `Second`); coarser grains truncate to the day.
    pub fn truncate_micros(self, micros: i64) -> i64 {
        const SECOND: i64 = 1_000_000;
        let unit = match self {
            TimeGrain::Second => SECOND,
            TimeGrain::Minute => 60 * SECOND,
            TimeGrain::Hour => 3600 * SECOND,
            _ => 86_400 * SECOND,
        };
        micros - micros.rem_euclid(unit)
    }
}

impl fmt::Display for TimeGrain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(grid: Grid, bottom: Option<f64>, top: Option<f64>) -> Coarsening {
        Coarsening {
            grid,
            bottom_code: bottom,
            top_code: top,
        }
    }

    #[test]
    fn rounding_steps_and_significant_digits_read_as_decimals() {
        let tenth = c(Grid::Step(0.1), None, None);
        assert_eq!(tenth.apply(0.29999), Some(0.3));
        assert_eq!(tenth.apply(-1.06), Some(-1.1));
        let whole = c(Grid::Step(1.0), None, None);
        assert_eq!(whole.apply(2.5), Some(3.0));
        assert_eq!(whole.apply(0.49), Some(0.0));
        let hundred = c(Grid::Step(100.0), None, None);
        assert_eq!(hundred.apply(1234.5), Some(1200.0));
        let two = c(Grid::Significant(2), None, None);
        assert_eq!(two.apply(12_345.67), Some(12_000.0));
        assert_eq!(two.apply(0.012_345), Some(0.012));
        assert_eq!(two.apply(-987.0), Some(-990.0));
        assert_eq!(two.apply(0.0), Some(0.0));
        assert_eq!(two.apply(99_999.0), Some(100_000.0));
        assert_eq!(
            c(Grid::Significant(1), None, None).apply(f64::MIN_POSITIVE),
            Some(2e-308)
        );
    }

    #[test]
    fn bins_give_lower_edges_and_codes_clamp_first() {
        let bins = c(Grid::Bins(vec![0.0, 100.0, 1000.0]), None, None);
        assert_eq!(bins.apply(-5.0), Some(0.0));
        assert_eq!(bins.apply(0.0), Some(0.0));
        assert_eq!(bins.apply(99.99), Some(0.0));
        assert_eq!(bins.apply(100.0), Some(100.0));
        assert_eq!(bins.apply(1e12), Some(1000.0));
        assert_eq!(bins.apply(f64::INFINITY), Some(1000.0));
        let coded = c(Grid::Significant(2), Some(10.0), Some(50_000.0));
        assert_eq!(coded.apply(1e9), Some(50_000.0));
        assert_eq!(coded.apply(3.0), Some(10.0));
        assert_eq!(coded.apply(f64::INFINITY), Some(50_000.0));
        assert_eq!(coded.apply(f64::NEG_INFINITY), Some(10.0));
    }

    #[test]
    fn nan_and_uncaught_infinities_are_not_released() {
        let plain = c(Grid::Step(1.0), None, None);
        assert_eq!(plain.apply(f64::NAN), None);
        assert_eq!(plain.apply(f64::INFINITY), None);
        assert_eq!(c(Grid::Exact, None, Some(1.0)).apply(f64::NAN), None);
    }

    #[test]
    fn integral_coarsenings_and_time_grains() {
        assert!(c(Grid::Step(5.0), Some(0.0), Some(90.0)).is_integral());
        assert!(!c(Grid::Step(0.5), None, None).is_integral());
        assert!(!c(Grid::Bins(vec![0.0, 0.5]), None, None).is_integral());
        let t = 1_700_000_123_456_789; // 2023-11-14T22:15:23.456789Z
        assert_eq!(TimeGrain::Hour.truncate_micros(t), 1_699_999_200_000_000);
        assert_eq!(TimeGrain::Minute.truncate_micros(t), 1_700_000_100_000_000);
        assert_eq!(TimeGrain::Day.truncate_micros(t), 1_699_920_000_000_000);
        assert_eq!(
            TimeGrain::Hour.truncate_micros(-1),
            -3_600_000_000,
            "before 1970 too"
        );
        assert!(TimeGrain::Year < TimeGrain::Day && TimeGrain::Hour < TimeGrain::Second);
    }

    #[test]
    fn significant_digits_by_arithmetic_equal_the_formatted_decimal() {
        let by_text = |v: f64, digits: u32| -> f64 {
            let precision = digits as usize - 1;
            format!("{v:.precision$e}").parse().expect("parses")
        };
        // Halves and decade edges (the formatting path decides them), then values over 40 decades.
        let mut values = vec![
            0.15,
            0.25,
            1.5,
            2.5e-3,
            0.045,
            0.001,
            1000.0,
            999.95,
            99.95,
            1e-15,
            9.999_999_999e14,
            0.3,
            123_456.5,
            1e15,
            1e-16,
            5e-324,
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mantissa = (x >> 11) as f64 / (1u64 << 53) as f64;
            let exponent = (x % 40) as i32 - 20;
            values.push(mantissa * 10f64.powi(exponent));
        }
        for v in values {
            for digits in (1..=6).chain(13..=15) {
                for v in [v, -v] {
                    let expected = if v == 0.0 { v } else { by_text(v, digits) };
                    assert_eq!(
                        significant(v, digits).to_bits(),
                        expected.to_bits(),
                        "{v} to {digits} digits"
                    );
                }
            }
        }
    }
}
