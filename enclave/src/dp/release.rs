//! Release: turns the exact bounded aggregates into noisy values through `noise.rs`, and shapes them
//! into the noisy table the post-processing plan reads.
//!
//! ε (or ρ) is split evenly over the query's aggregates (private key selection shares `COUNT(*)`'s part,
//! or takes its own when there is none), then evenly over each aggregate's own mechanisms (AVG: a centred
//! sum and a count; VARIANCE and STDDEV: sum, sum of squares and count). When a table's bound was not
//! enforced at ingest, 5 % of it first goes to estimating how many rows bounding left out. What is charged
//! is what each mechanism's privacy map reports.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::AsArray;
use arrow::array::{Array, ArrayRef, Float64Array, RecordBatch, UInt32Array};
use arrow::datatypes::{ArrowPrimitiveType, DataType, Float64Type, Int64Type};

use super::noise::{self, Accounting, Noise};
use super::plan::{Bounding, Bounds, DpPlan, NoisyTable};
use super::query::AggKind;
use super::rules::{Rule, refuse};
use crate::ledger::Cost;
use crate::{Error, Result};

/// The share of a query's ε (or ρ) spent estimating how many rows bounding left out, when it may have.
pub(crate) const TRUNCATION_SHARE: f64 = 0.05;

/// How the interval of a count or sum is computed.
const EXACT: &str = "exact: the noise distribution's 2.5 % and 97.5 % quantiles";
/// How the interval of a mean or variance is computed.
const DELTA_METHOD: &str = "approximate: delta method over the independent noises of its sums and count, clipped to the bounds";

/// What the mechanisms are given.
pub(crate) struct Settings {
    /// Contributions per person (for totals and for means).
    pub bounds: Bounds,
    /// The truncation estimate's exact figures (rows left out, rows) when the exact plan does not carry
    /// them: tables read from their indexes.
    pub truncation_totals: Option<(f64, f64)>,
    /// ε, or ρ under zCDP, for the whole query.
    pub total: f64,
    /// δ for private key selection.
    pub delta: f64,
    /// The dataset's accounting.
    pub accounting: Accounting,
    /// Skip the draws (sensitivity tests only).
    pub danger_no_noise: bool,
}

/// One aggregate's noisy values over the released groups.
pub(crate) struct AggValues {
    /// Per released group.
    pub values: Vec<f64>,
    /// 95 % interval per group (NaN when none is known).
    pub intervals: Vec<(f64, f64)>,
    /// Noise scale of the released value (of the centred sum for AVG, of the sum of squares for VARIANCE
    /// and STDDEV).
    pub scale: f64,
    /// Released as an integer (counts).
    pub integer: bool,
    /// How far one person can move the exact value (NaN for derived values: AVG, VARIANCE, quantiles).
    pub sensitivity: f64,
    /// How the interval is computed.
    pub method: String,
}

/// The noisy per-group values, before post-processing.
pub(crate) struct Released {
    /// Group-key columns of the released groups.
    pub groups: Vec<ArrayRef>,
    /// Per aggregate, per released group.
    pub values: Vec<AggValues>,
    /// What the mechanisms' privacy maps charge, in all.
    pub cost: Cost,
    /// How the cost splits over the mechanisms: (what, noise).
    pub split: Vec<(String, Noise)>,
    /// What bounding left out, when it may have left out rows.
    pub truncation: Option<super::Truncation>,
}

/// Column `name` of `b` as values of `T` (cast; nulls as the default).
fn column_values<T: ArrowPrimitiveType>(b: &RecordBatch, name: &str) -> Result<Vec<T::Native>> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| Error::Internal(format!("missing {name}")))?;
    let c = arrow::compute::cast(c, &T::DATA_TYPE)?;
    Ok(c.as_primitive::<T>()
        .iter()
        .map(Option::unwrap_or_default)
        .collect())
}

fn col_i64(b: &RecordBatch, name: &str) -> Result<Vec<i64>> {
    column_values::<Int64Type>(b, name)
}

fn col_f64(b: &RecordBatch, name: &str) -> Result<Vec<f64>> {
    column_values::<Float64Type>(b, name)
}

/// Draws the noisy values of every aggregate of `plan` over its exact bounded aggregates.
pub(crate) fn release(plan: &DpPlan, exact: &RecordBatch, s: &Settings) -> Result<Released> {
    let (k, total, delta, acc) = (s.bounds.k, s.total, s.delta, s.accounting);
    let a = plan;
    {
        let private_groups = !a.groups.is_empty() && !a.public_groups();
        let has_count_rows = a.aggregates.iter().any(|x| x.kind == AggKind::CountRows);
        let shares = a.aggregates.len() + usize::from(private_groups && !has_count_rows);
        let for_truncation = if s.bounds.truncates {
            total * TRUNCATION_SHARE
        } else {
            0.0
        };
        let share = (total - for_truncation) / shares.max(1) as f64;
        let part = share;
        let off = s.danger_no_noise;
        let mut cost = Cost::default();
        let mut split: Vec<(String, Noise)> = Vec::new();
        let mut add = |what: String, n: &Noise| {
            cost.epsilon += n.epsilon;
            cost.delta += n.delta;
            cost.rho += n.rho;
            split.push((what, *n));
        };
        let n_groups = a.groups.len();
        let weighted = plan.bounding != Bounding::Sample;
        let key_of = |r: usize| -> String {
            let parts: Vec<String> = (0..n_groups)
                .map(|g| {
                    arrow::util::display::array_value_to_string(exact.column(g), r)
                        .unwrap_or_default()
                })
                .collect();
            serde_json::to_string(&parts).unwrap_or_default()
        };
        // Which groups are released (as rows of `exact`; None for an empty key of a public domain), and,
        // under private selection, their noisy row counts.
        let mut public_keys: Option<Vec<Vec<String>>> = None;
        let (rows, noisy_n, n_noise): (Vec<Option<usize>>, Vec<f64>, Noise) = if n_groups == 0 {
            (
                vec![(exact.num_rows() > 0).then_some(0)],
                Vec::new(),
                Noise::default(),
            )
        } else if a.public_groups() {
            let mut keys: Vec<Vec<String>> = vec![Vec::new()];
            for d in a.groups.iter().filter_map(|g| g.domain.as_ref()) {
                keys = keys
                    .into_iter()
                    .flat_map(|k| d.iter().map(move |v| [k.clone(), vec![v.clone()]].concat()))
                    .collect();
                if keys.len() > 100_000 {
                    return refuse(
                        Rule::GroupBy,
                        "the public domains multiply to more than 100,000 groups",
                    );
                }
            }
            let index: HashMap<String, usize> =
                (0..exact.num_rows()).map(|r| (key_of(r), r)).collect();
            let rows = keys
                .iter()
                .map(|k| {
                    index
                        .get(&serde_json::to_string(k).unwrap_or_default())
                        .copied()
                })
                .collect();
            public_keys = Some(keys);
            (rows, Vec::new(), Noise::default())
        } else {
            let keys: Vec<String> = (0..exact.num_rows()).map(key_of).collect();
            let counts: HashMap<String, i64> =
                keys.iter().cloned().zip(col_i64(exact, "__n")?).collect();
            let (kept, n, _threshold) = noise::select_keys(&counts, k, part, delta, acc, off)?;
            let counted = a.aggregates.iter().any(|x| x.kind == AggKind::CountRows);
            add(
                if counted {
                    "group selection + count(*)"
                } else {
                    "group selection"
                }
                .to_owned(),
                &n,
            );
            let mut rows: Vec<usize> = (0..keys.len())
                .filter(|r| kept.contains_key(&keys[*r]))
                .collect();
            rows.sort_by(|x, y| keys[*x].cmp(&keys[*y]));
            let noisy: Vec<f64> = rows.iter().map(|r| kept[&keys[*r]] as f64).collect();
            (rows.into_iter().map(Some).collect(), noisy, n)
        };
        let private_selection = n_groups > 0 && public_keys.is_none();
        let pick_i = |v: Vec<i64>| -> Vec<i64> {
            rows.iter()
                .map(|r| r.and_then(|r| v.get(r).copied()).unwrap_or(0))
                .collect()
        };
        let pick_f = |v: Vec<f64>| -> Vec<f64> {
            rows.iter()
                .map(|r| r.and_then(|r| v.get(r).copied()).unwrap_or(0.0))
                .collect()
        };
        let interval = |v: &[f64], n: &Noise| -> Vec<(f64, f64)> {
            v.iter()
                .map(|x| (x - n.half_width_95, x + n.half_width_95))
                .collect()
        };

        let mut values = Vec::new();
        for (j, agg) in a.aggregates.iter().enumerate() {
            let bound = agg.bounds.map_or(0.0, |(l, u)| l.abs().max(u.abs()));
            let km = s.bounds.mean;
            let part = share
                / match agg.kind {
                    AggKind::Avg => 2.0,
                    AggKind::Variance | AggKind::Stddev => 3.0,
                    _ => 1.0,
                };
            let label = |what: &str| {
                if what.is_empty() {
                    agg.name.clone()
                } else {
                    format!("{} ({what})", agg.name)
                }
            };
            let count_of = |name: &str,
                            what: &str,
                            sens: i64,
                            add: &mut dyn FnMut(String, &Noise)|
             -> Result<(Vec<f64>, Noise)> {
                if weighted && !name.starts_with("__pers") {
                    // Sums of weights: a continuous mechanism, then rounded (post-processing).
                    let (v, n) =
                        noise::sums(&pick_f(col_f64(exact, name)?), sens as f64, part, acc, off)?;
                    add(label(what), &n);
                    return Ok((v.into_iter().map(f64::round).collect(), n));
                }
                let (v, n) = noise::counts(&pick_i(col_i64(exact, name)?), sens, part, acc, off)?;
                add(label(what), &n);
                Ok((v.into_iter().map(|x| x as f64).collect(), n))
            };
            let sum_of = |name: &str,
                          what: &str,
                          sens: f64,
                          add: &mut dyn FnMut(String, &Noise)|
             -> Result<(Vec<f64>, Noise)> {
                let (v, n) = noise::sums(&pick_f(col_f64(exact, name)?), sens, part, acc, off)?;
                add(label(what), &n);
                Ok((v, n))
            };
            let entry = match agg.kind {
                AggKind::CountRows if private_selection => (
                    noisy_n.clone(),
                    interval(&noisy_n, &n_noise),
                    n_noise.scale,
                    true,
                    n_noise.sensitivity(),
                    EXACT.to_owned(),
                ),
                AggKind::CountRows => {
                    let (v, n) = count_of("__n", "", k, &mut add)?;
                    let iv = interval(&v, &n);
                    (v, iv, n.scale, true, n.sensitivity(), EXACT.to_owned())
                }
                AggKind::CountValues => {
                    let (v, n) = count_of(&format!("__cnt{j}"), "", k, &mut add)?;
                    let iv = interval(&v, &n);
                    (v, iv, n.scale, true, n.sensitivity(), EXACT.to_owned())
                }
                AggKind::CountPersons => {
                    let (v, n) = count_of(
                        &format!("__pers{j}"),
                        "",
                        if n_groups == 0 { 1 } else { k },
                        &mut add,
                    )?;
                    let iv = interval(&v, &n);
                    (v, iv, n.scale, true, n.sensitivity(), EXACT.to_owned())
                }
                AggKind::Sum => {
                    let (v, n) = sum_of(&format!("__sum{j}"), "", k as f64 * bound, &mut add)?;
                    let iv = interval(&v, &n);
                    (v, iv, n.scale, false, n.sensitivity(), EXACT.to_owned())
                }
                AggKind::Avg => {
                    // The sum is of values centred on the middle of the bounds: half the sensitivity.
                    let (lo, hi) = agg.bounds.unwrap_or((0.0, 0.0));
                    let center = (lo + hi) / 2.0;
                    let (s, ns) = sum_of(
                        &format!("__csum{j}"),
                        "sum",
                        km as f64 * (hi - lo) / 2.0,
                        &mut add,
                    )?;
                    let (c, nc) = count_of(&format!("__cnt{j}"), "count", km, &mut add)?;
                    let avg: Vec<f64> = s
                        .iter()
                        .zip(&c)
                        .map(|(s, c)| (center + s / c.max(1.0)).clamp(lo, hi))
                        .collect();
                    // Delta-method interval for a ratio of two independent noisy values.
                    let iv = avg
                        .iter()
                        .zip(&c)
                        .map(|(m, c)| {
                            let c = c.max(1.0);
                            let d = m - center;
                            let sd = ((ns.std * ns.std) + d * d * (nc.std * nc.std)).sqrt() / c;
                            ((m - 1.96 * sd).max(lo), (m + 1.96 * sd).min(hi))
                        })
                        .collect();
                    (avg, iv, ns.scale, false, f64::NAN, DELTA_METHOD.to_owned())
                }
                AggKind::Variance | AggKind::Stddev => {
                    // Sums of values centred on the middle of the bounds: each within h of zero.
                    let (lo, hi) = agg.bounds.unwrap_or((0.0, 0.0));
                    let h = (hi - lo) / 2.0;
                    let (s, ns) = sum_of(&format!("__sum{j}"), "sum", km as f64 * h, &mut add)?;
                    let (q, nq) = sum_of(
                        &format!("__sq{j}"),
                        "sum of squares",
                        km as f64 * h * h,
                        &mut add,
                    )?;
                    let (c, nc) = count_of(&format!("__cnt{j}"), "count", km, &mut add)?;
                    // A variance of values in [lo, hi] lies in [0, h²].
                    let variance =
                        |s: f64, q: f64, c: f64| ((q - s * s / c) / (c - 1.0)).clamp(0.0, h * h);
                    let mut v = Vec::with_capacity(s.len());
                    let mut iv = Vec::with_capacity(s.len());
                    for ((s, q), c) in s.iter().zip(&q).zip(&c) {
                        let c = c.max(2.0);
                        let var = variance(*s, *q, c);
                        // Delta method over the three independent noises, from the released values.
                        let (ds, dq) = (-2.0 * s / (c * (c - 1.0)), 1.0 / (c - 1.0));
                        let dc = (s * s / (c * c) - var) / (c - 1.0);
                        let sd =
                            ((ds * ns.std).powi(2) + (dq * nq.std).powi(2) + (dc * nc.std).powi(2))
                                .sqrt();
                        let (a, b) = ((var - 1.96 * sd).max(0.0), (var + 1.96 * sd).min(h * h));
                        if agg.kind == AggKind::Stddev {
                            // The square root is monotone: the interval's ends carry over.
                            v.push(var.sqrt());
                            iv.push((a.sqrt(), b.sqrt()));
                        } else {
                            v.push(var);
                            iv.push((a, b));
                        }
                    }
                    (v, iv, nq.scale, false, f64::NAN, DELTA_METHOD.to_owned())
                }
                AggKind::Quantile(alpha) => {
                    let (l, u) = agg.bounds.unwrap_or((0.0, 1.0));
                    let candidates: Vec<f64> = (0..=1000)
                        .map(|i| l + (u - l) * f64::from(i) / 1000.0)
                        .collect();
                    let col = exact
                        .column_by_name(&format!("__arr{j}"))
                        .ok_or_else(|| Error::Internal("missing array".into()))?;
                    let list = col
                        .as_any()
                        .downcast_ref::<arrow::array::ListArray>()
                        .ok_or_else(|| Error::Internal("not a list".into()))?;
                    let mut out = Vec::new();
                    let mut total_noise = Noise::default();
                    // The exponential mechanism is pure ε-DP; on a zCDP dataset its share of ρ buys
                    // ε = √(2ρ).
                    let eps_q = if acc == Accounting::Zcdp {
                        (2.0 * part).sqrt()
                    } else {
                        part
                    };
                    for r in &rows {
                        let vals: Vec<f64> = match r {
                            None => Vec::new(),
                            Some(r) if list.is_null(*r) => Vec::new(),
                            Some(r) => {
                                let inner = list.value(*r);
                                let inner = arrow::compute::cast(&inner, &DataType::Float64)?;
                                let f = inner
                                    .as_any()
                                    .downcast_ref::<Float64Array>()
                                    .ok_or_else(|| Error::Internal("not float".into()))?;
                                f.iter().flatten().collect()
                            }
                        };
                        let (q, n) =
                            noise::quantile(&vals, &candidates, alpha, k as u32, eps_q, off)?;
                        out.push(q);
                        total_noise = n;
                    }
                    // Each person's ≤ k values are spread over groups; the map is linear in k, so one
                    // group's cost at d_in = k bounds the total.
                    if acc == Accounting::Zcdp {
                        // ε-DP implies (ε²/2)-zCDP: the quantile is charged in ρ like the rest.
                        total_noise.rho = total_noise.epsilon * total_noise.epsilon / 2.0;
                        total_noise.epsilon = 0.0;
                    }
                    add(label(""), &total_noise);
                    let iv = out.iter().map(|_| (f64::NAN, f64::NAN)).collect();
                    // The exponential mechanism's utility bound, in ranks: over |C| candidates with Gumbel
                    // noise of scale s on scores that move by `den` per row crossed, the released
                    // candidate's score is within s·ln(|C| / 0.05) of the best candidate's with probability
                    // ≥ 95 % (the best of the grid: the grid's spacing adds to the error in values);
                    // s / den = 2·k·max(α, 1 − α) / ε (opendp's quantile score map).
                    let rank = 2.0 * k as f64 * alpha.max(1.0 - alpha) / eps_q
                        * (candidates.len() as f64 / 0.05).ln();
                    let method = format!(
                        "rank: with 95 % probability within {rank:.0} rows of the rank of the grid point \
                         nearest the exact quantile (1,001 points over the bounds; exponential mechanism's \
                         utility bound; no value interval without the data)"
                    );
                    (out, iv, total_noise.scale, false, f64::NAN, method)
                }
            };
            values.push(AggValues {
                values: entry.0,
                intervals: entry.1,
                scale: entry.2,
                integer: entry.3,
                sensitivity: entry.4,
                method: entry.5,
            });
        }
        // What bounding left out, over the whole relation: rows left out (a person counted up to C), and
        // rows (up to k + C), each at half the truncation share.
        let truncation = if s.bounds.truncates {
            let cap = s.bounds.truncation_cap();
            // Summed over the exact groups, or the table's own figures when the plan has none.
            let (drop, all) = if exact.column_by_name("__drop").is_some() {
                let total_of =
                    |name: &str| -> Result<f64> { Ok(col_f64(exact, name)?.iter().sum::<f64>()) };
                (total_of("__drop")?, total_of("__all")?)
            } else {
                s.truncation_totals
                    .ok_or_else(|| Error::Internal("truncation totals missing".into()))?
            };
            let half = for_truncation / 2.0;
            let (d, nd) = noise::sums(&[drop], cap, half, acc, off)?;
            add("truncation (rows left out)".into(), &nd);
            let (r, nr) = noise::sums(&[all], k as f64 + cap, half, acc, off)?;
            add("truncation (rows)".into(), &nr);
            let left_out = d.first().copied().unwrap_or(0.0).max(0.0);
            let rows = r.first().copied().unwrap_or(0.0).max(left_out);
            Some(super::Truncation {
                rows_left_out: left_out.round(),
                rows: rows.round(),
                share: if rows >= 1.0 { left_out / rows } else { 0.0 },
                cap_per_person: cap,
                scale: nd.scale,
                half_width_95: nd.half_width_95,
            })
        } else {
            None
        };
        let groups: Vec<ArrayRef> = match public_keys {
            Some(keys) => (0..n_groups)
                .map(|g| {
                    Arc::new(arrow::array::StringArray::from(
                        keys.iter().map(|k| k[g].clone()).collect::<Vec<_>>(),
                    )) as ArrayRef
                })
                .collect(),
            None => {
                let idx = UInt32Array::from(
                    rows.iter()
                        .map(|r| r.unwrap_or(0) as u32)
                        .collect::<Vec<_>>(),
                );
                (0..n_groups)
                    .map(|g| arrow::compute::take(exact.column(g), &idx, None))
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(Released {
            groups,
            values,
            cost,
            split,
            truncation,
        })
    }
}

/// Shapes the released values into the noisy table the post-processing plan reads: each column cast to
/// the type DataFusion gave the aggregate (counts rounded; a value that does not fit becomes NULL), and
/// counts and sums whose bounds are non-negative clipped at 0, their intervals alike (post-processing
/// of a DP value, free).
pub(crate) fn noisy_table(plan: &DpPlan, r: &Released) -> Result<NoisyTable> {
    let types = plan.aggregate_types();
    let n_groups = plan.groups.len();
    if types.len() != n_groups + plan.aggregates.len() || r.groups.len() != n_groups {
        return Err(Error::Internal("noisy table: shape".into()));
    }
    let mut columns = Vec::with_capacity(types.len());
    for (g, t) in r.groups.iter().zip(&types) {
        columns.push(arrow::compute::cast(g, t)?);
    }
    let mut intervals = Vec::with_capacity(plan.aggregates.len());
    for ((agg, v), t) in plan
        .aggregates
        .iter()
        .zip(&r.values)
        .zip(&types[n_groups..])
    {
        let non_negative = match agg.kind {
            AggKind::CountRows | AggKind::CountValues | AggKind::CountPersons => true,
            AggKind::Sum => agg.bounds.is_some_and(|(l, _)| l >= 0.0),
            _ => false,
        };
        let clip = |x: f64| if non_negative { x.max(0.0) } else { x };
        let round = |x: f64| {
            if v.integer || t.is_integer() {
                x.round()
            } else {
                x
            }
        };
        let values: Float64Array = v.values.iter().map(|x| Some(round(clip(*x)))).collect();
        columns.push(arrow::compute::cast(&(Arc::new(values) as ArrayRef), t)?);
        intervals.push((
            v.intervals.iter().map(|i| clip(i.0)).collect(),
            v.intervals.iter().map(|i| clip(i.1)).collect(),
        ));
    }
    Ok(NoisyTable { columns, intervals })
}
