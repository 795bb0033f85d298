//! The only place noise is drawn: thin wrappers over opendp's vetted measurements.
//!
//! Each wrapper builds the measurement for a target privacy loss and a bounded sensitivity, asks the
//! measurement's own privacy map what it costs (that, not the target, is what is charged), and invokes it.
//! `danger_no_noise` skips only the invocation — for the sensitivity tests, never reachable from the CLI.

use std::collections::HashMap;

use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
use opendp::measurements::{
    make_gaussian, make_gaussian_threshold, make_laplace, make_laplace_threshold,
    make_private_quantile,
};
use opendp::measures::{Approximate, MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{
    AbsoluteDistance, L0PInfDistance, L1Distance, L2Distance, SymmetricDistance,
};

use crate::{Error, Result};

fn dp_err(e: opendp::error::Error) -> Error {
    Error::Internal(format!("opendp: {e}"))
}

/// How an answer was noised, for the user and the audit.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Noise {
    /// The distribution's scale parameter (Laplace b, or Gaussian σ).
    pub scale: f64,
    /// Its standard deviation.
    pub std: f64,
    /// Half-width of the central 95 % interval of the noise.
    pub half_width_95: f64,
    /// ε charged (basic composition), or the (ε, δ) equivalent under zCDP.
    pub epsilon: f64,
    /// δ charged.
    pub delta: f64,
    /// ρ charged (zCDP only).
    pub rho: f64,
}

impl Noise {
    /// The sensitivity this noise is calibrated to, recovered from the mechanism's own privacy map:
    /// Laplace ε = Δ/b, Gaussian ρ = Δ²/(2σ²).
    pub fn sensitivity(&self) -> f64 {
        if self.rho > 0.0 {
            self.scale * (2.0 * self.rho).sqrt()
        } else {
            self.epsilon * self.scale
        }
    }
}

/// Which privacy accounting a dataset uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Accounting {
    /// Pure/approximate DP under basic composition: Laplace mechanisms, costs in (ε, δ).
    Basic,
    /// Zero-concentrated DP: Gaussian mechanisms, costs in ρ.
    Zcdp,
}

fn laplace_noise(scale: f64, epsilon: f64, delta: f64) -> Noise {
    // Laplace(b): sd = √2·b; P(|X| > t) = e^{-t/b}, so the 95 % half-width is b·ln 20.
    Noise {
        scale,
        std: std::f64::consts::SQRT_2 * scale,
        half_width_95: scale * 20f64.ln(),
        epsilon,
        delta,
        rho: 0.0,
    }
}

fn gaussian_noise(scale: f64, rho: f64) -> Noise {
    Noise {
        scale,
        std: scale,
        half_width_95: 1.959_963_984_540_054 * scale,
        epsilon: 0.0,
        delta: 0.0,
        rho,
    }
}

/// One vector measurement: Laplace under basic composition, Gaussian under zCDP, over `$atom` values.
/// Counts (integers, discrete noise) and sums (floats) differ only in their domain.
macro_rules! noisy_vector {
    ($ty:ty, $domain:expr, $values:expr, $sensitivity:expr, $budget:expr, $accounting:expr, $off:expr) => {{
        let (values, sensitivity, budget, off): (&[$ty], $ty, f64, bool) =
            ($values, $sensitivity, $budget, $off);
        match $accounting {
            Accounting::Basic => {
                let scale = sensitivity as f64 / budget;
                let m = make_laplace::<_, _, MaxDivergence>(
                    $domain,
                    L1Distance::<$ty>::default(),
                    scale,
                    None,
                )
                .map_err(dp_err)?;
                let eps = m.map(&sensitivity).map_err(dp_err)?;
                let out = if off {
                    values.to_vec()
                } else {
                    m.invoke(&values.to_vec()).map_err(dp_err)?
                };
                Ok((out, laplace_noise(scale, eps, 0.0)))
            }
            Accounting::Zcdp => {
                let scale = sensitivity as f64 / (2.0 * budget).sqrt();
                let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
                    $domain,
                    L2Distance::<$ty>::default(),
                    scale,
                    None,
                )
                .map_err(dp_err)?;
                let rho = m.map(&sensitivity).map_err(dp_err)?;
                let out = if off {
                    values.to_vec()
                } else {
                    m.invoke(&values.to_vec()).map_err(dp_err)?
                };
                Ok((out, gaussian_noise(scale, rho)))
            }
        }
    }};
}

/// Noisy integer counts with L1 sensitivity `sensitivity` (Laplace) or L2 (Gaussian), for `budget` ε or ρ.
pub fn counts(
    values: &[i64],
    sensitivity: i64,
    budget: f64,
    accounting: Accounting,
    danger_no_noise: bool,
) -> Result<(Vec<i64>, Noise)> {
    noisy_vector!(
        i64,
        VectorDomain::new(AtomDomain::<i64>::default()),
        values,
        sensitivity,
        budget,
        accounting,
        danger_no_noise
    )
}

/// Noisy float sums with sensitivity `sensitivity`, for `budget` ε or ρ.
pub fn sums(
    values: &[f64],
    sensitivity: f64,
    budget: f64,
    accounting: Accounting,
    danger_no_noise: bool,
) -> Result<(Vec<f64>, Noise)> {
    noisy_vector!(
        f64,
        VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
        values,
        sensitivity,
        budget,
        accounting,
        danger_no_noise
    )
}

/// Private key selection: noisy counts per key, released only above a threshold. A person touches at most
/// `contributions` keys with at most `contributions` rows in all (so an L1 and L2 distance of at most
/// `contributions`). Laplace noise for `budget` ε under basic composition, Gaussian noise for `budget` ρ
/// under zCDP (approximate zCDP: the threshold's δ is charged beside ρ). The threshold is raised until the
/// mechanism's own privacy map says δ ≤ `delta`.
pub fn select_keys(
    counts: &HashMap<String, i64>,
    contributions: i64,
    budget: f64,
    delta: f64,
    accounting: Accounting,
    danger_no_noise: bool,
) -> Result<(HashMap<String, i64>, Noise, i64)> {
    let domain = || {
        MapDomain::new(
            AtomDomain::<String>::default(),
            AtomDomain::<i64>::default(),
        )
    };
    let k = contributions;
    let d_in = (k as u32, k, k);
    let (scale, tail) = match accounting {
        Accounting::Basic => {
            let b = k as f64 / budget;
            (b, b * (1.0 / (2.0 * delta)).ln())
        }
        Accounting::Zcdp => {
            let sigma = k as f64 / (2.0 * budget).sqrt();
            (sigma, sigma * (2.0 * (1.0 / delta).ln()).sqrt())
        }
    };
    let mut threshold = k + tail.ceil() as i64;
    // Noise off (sensitivity tests): the exact counts at or above the threshold.
    let above = |threshold: i64| -> HashMap<String, i64> {
        counts
            .iter()
            .filter(|(_, c)| **c >= threshold)
            .map(|(key, c)| (key.clone(), *c))
            .collect()
    };
    // One threshold measurement: built, its privacy map asked for (loss, δ), invoked when δ fits.
    macro_rules! try_threshold {
        ($make:ident, $p:literal, $measure:ty, $noise:expr) => {{
            let m = $make::<_, _, Approximate<$measure>>(
                domain(),
                L0PInfDistance::<$p, _>(AbsoluteDistance::<i64>::default()),
                scale,
                threshold,
                None,
            )
            .map_err(dp_err)?;
            let (loss, d) = m.map(&d_in).map_err(dp_err)?;
            if d <= delta {
                let out = if danger_no_noise {
                    above(threshold)
                } else {
                    m.invoke(counts).map_err(dp_err)?
                };
                let noise: Noise = $noise(loss, d);
                return Ok((out, noise, threshold));
            }
        }};
    }
    for _ in 0..64 {
        match accounting {
            Accounting::Basic => {
                try_threshold!(make_laplace_threshold, 1, MaxDivergence, |eps, d| {
                    laplace_noise(scale, eps, d)
                })
            }
            Accounting::Zcdp => try_threshold!(
                make_gaussian_threshold,
                2,
                ZeroConcentratedDivergence,
                |rho, d| Noise {
                    delta: d,
                    ..gaussian_noise(scale, rho)
                }
            ),
        }
        threshold += (scale.ceil() as i64).max(1);
    }
    Err(Error::Internal(format!("no threshold reaches δ = {delta}")))
}

/// A private quantile (exponential mechanism over `candidates`), each person contributing up to
/// `contributions` values, for `epsilon`.
pub fn quantile(
    values: &[f64],
    candidates: &[f64],
    alpha: f64,
    contributions: u32,
    epsilon: f64,
    danger_no_noise: bool,
) -> Result<(f64, Noise)> {
    let build = |scale: f64| {
        make_private_quantile(
            VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
            SymmetricDistance,
            MaxDivergence,
            candidates.to_vec(),
            alpha,
            scale,
        )
    };
    // The privacy map is inversely proportional to the scale: calibrate from scale 1.
    let eps_at_1 = build(1.0)
        .map_err(dp_err)?
        .map(&contributions)
        .map_err(dp_err)?;
    let scale = eps_at_1 / epsilon;
    let m = build(scale).map_err(dp_err)?;
    let eps = m.map(&contributions).map_err(dp_err)?;
    let out = if danger_no_noise {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let exact = v
            .get(((v.len() as f64 - 1.0) * alpha).round() as usize)
            .copied()
            .unwrap_or(candidates[0]);
        candidates
            .iter()
            .copied()
            .min_by(|a, b| (a - exact).abs().total_cmp(&(b - exact).abs()))
            .unwrap_or(exact)
    } else {
        m.invoke(&values.to_vec()).map_err(dp_err)?
    };
    Ok((
        out,
        Noise {
            scale,
            std: f64::NAN,
            half_width_95: f64::NAN,
            epsilon: eps,
            delta: 0.0,
            rho: 0.0,
        },
    ))
}

/// A contribution bound chosen from the data: the smallest of `candidates` (ascending) that at most a
/// `1 − quantile` share of persons exceed, selected privately for `epsilon` by opendp's noisy max
/// (permute-and-flip, `MaxDivergence`). `rows_per_person` has one value per person, so adding or removing
/// a person moves every score by at most 1 (an L∞ distance of 1): score(c) = −max(0, #{x > c} − (1 −
/// quantile)·n), less a data-independent preference for smaller candidates (scale·c) that breaks the
/// ties above the quantile, where every candidate would otherwise be equally good (it costs an expected
/// overshoot of about one row, never privacy: it does not depend on the data).
pub fn choose_bound(
    rows_per_person: &[f64],
    candidates: &[f64],
    quantile: f64,
    epsilon: f64,
) -> Result<(f64, Noise)> {
    use opendp::measurements::make_noisy_max;
    use opendp::metrics::LInfDistance;
    let build = |scale: f64| {
        make_noisy_max(
            VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
            LInfDistance::<f64>::default(),
            MaxDivergence,
            scale,
            false,
        )
    };
    // The privacy map is inversely proportional to the scale: calibrate from scale 1.
    let eps_at_1 = build(1.0).map_err(dp_err)?.map(&1.0).map_err(dp_err)?;
    let scale = eps_at_1 / epsilon;
    let m = build(scale).map_err(dp_err)?;
    let eps = m.map(&1.0).map_err(dp_err)?;
    let mut sorted = rows_per_person.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let scores: Vec<f64> = candidates
        .iter()
        .map(|c| {
            let above = (sorted.len() - sorted.partition_point(|x| x <= c)) as f64;
            -(above - (1.0 - quantile) * n).max(0.0) - scale * c
        })
        .collect();
    let i = m.invoke(&scores).map_err(dp_err)?;
    let chosen = candidates
        .get(i)
        .copied()
        .ok_or_else(|| Error::Internal("noisy max chose no candidate".into()))?;
    Ok((
        chosen,
        Noise {
            scale,
            std: f64::NAN,
            half_width_95: f64::NAN,
            epsilon: eps,
            delta: 0.0,
            rho: 0.0,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chosen bound lands at the data's quantile: on 20,000 persons at ε = 0.1, and on ties (every
    /// person with the same count, where all larger candidates would otherwise be equally good).
    #[test]
    fn a_chosen_bound_lands_at_the_quantile_and_breaks_ties_downwards() {
        let candidates: Vec<f64> = (1..=1000).map(f64::from).collect();
        // A geometric-looking spread: person i has 1 + (i mod 97) / 3 rows (max 33), exact p99 = 33.
        let counts: Vec<f64> = (0..20_000)
            .map(|i| 1.0 + f64::from(i % 97) / 3.0)
            .map(f64::floor)
            .collect();
        let mut sorted = counts.clone();
        sorted.sort_by(f64::total_cmp);
        let exact = sorted[(0.99 * sorted.len() as f64) as usize];
        for _ in 0..50 {
            let (b, n) = choose_bound(&counts, &candidates, 0.99, 0.1).expect("bound");
            // Above the quantile each row more is e⁻¹ as likely; below it the data's own gap decides.
            assert!(
                (exact - 3.0..=exact + 10.0).contains(&b),
                "chose {b}, p99 is {exact}"
            );
            assert!((n.epsilon - 0.1).abs() < 1e-9, "charged {}", n.epsilon);
        }
        let ones = vec![1.0; 500];
        let chosen: Vec<f64> = (0..50)
            .map(|_| {
                choose_bound(&ones, &candidates, 0.99, 1.0)
                    .expect("bound")
                    .0
            })
            .collect();
        assert!(chosen.iter().all(|b| *b <= 12.0), "{chosen:?}");
    }
}
