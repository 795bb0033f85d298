//! k-anonymity over the patients' quasi-identifiers: Datafly-style full-domain generalisation, then
//! suppression of the persons whose class still has fewer than k members.
//!
//! Each quasi-identifier has a ladder of levels (a year: 1 → 5 → 10 → 20 years → withheld; a date: day →
//! month → year → 5 → 10 years → withheld; text: as is → withheld). While more than the allowed share of
//! persons sit in classes smaller than k, the column with the most distinct values climbs one level.
//! Then the remaining violators are suppressed. The result is applied to every released row of `patients`.

use std::collections::HashMap;

use chrono::{Datelike, NaiveDate};

use crate::transform::Out;

/// Levels per ladder, level 0 being the profile's own output.
fn max_level(v: &Out) -> u8 {
    match v {
        Out::I32(_) => 4,
        Out::Date(_) => 5,
        _ => 1,
    }
}

/// The value at a ladder level. Values at the top level are withheld (`Null`).
pub(crate) fn climb(v: &Out, level: u8) -> Out {
    if level == 0 || matches!(v, Out::Null) {
        return v.clone();
    }
    if level >= max_level(v) {
        return Out::Null;
    }
    match v {
        Out::I32(year) => {
            let w = [1, 5, 10, 20][usize::from(level)];
            Out::I32(year - year.rem_euclid(w))
        }
        Out::Date(days) => {
            let Some(d) = crate::transform::date_from_days(*days) else {
                return Out::Null;
            };
            let floored = match level {
                1 => NaiveDate::from_ymd_opt(d.year(), d.month(), 1),
                2 => NaiveDate::from_ymd_opt(d.year(), 1, 1),
                3 => NaiveDate::from_ymd_opt(d.year() - d.year().rem_euclid(5), 1, 1),
                _ => NaiveDate::from_ymd_opt(d.year() - d.year().rem_euclid(10), 1, 1),
            };
            floored
                .map(crate::transform::days_from_date)
                .map_or(Out::Null, Out::Date)
        }
        _ => Out::Null,
    }
}

/// What k-anonymity decided.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KAnonOutcome {
    /// Ladder level reached per quasi-identifier (same order as the profile's list).
    pub levels: Vec<u8>,
    /// Which persons (indexes into the input) are suppressed.
    pub suppressed: Vec<bool>,
    /// Smallest class among released persons (0 when nobody is released).
    pub k_reached: u64,
    /// Number of equivalence classes released.
    pub classes: u64,
}

/// Runs Datafly over `rows` (one quasi-identifier vector per person).
pub fn anonymize(rows: &[Vec<Out>], k: u32, max_suppression_ratio: f64) -> KAnonOutcome {
    let n_qi = rows.first().map_or(0, Vec::len);
    let mut levels = vec![0u8; n_qi];
    let maxes: Vec<u8> = (0..n_qi)
        .map(|i| rows.iter().map(|r| max_level(&r[i])).max().unwrap_or(1))
        .collect();
    let allowed = (max_suppression_ratio * rows.len() as f64).floor() as usize;
    loop {
        let keys: Vec<Vec<Out>> = rows
            .iter()
            .map(|r| r.iter().zip(&levels).map(|(v, l)| climb(v, *l)).collect())
            .collect();
        let mut sizes: HashMap<&[Out], u64> = HashMap::new();
        for key in &keys {
            *sizes.entry(key.as_slice()).or_default() += 1;
        }
        let violating: usize = keys
            .iter()
            .filter(|key| sizes[key.as_slice()] < u64::from(k))
            .count();
        let climbable: Vec<usize> = (0..n_qi).filter(|&i| levels[i] < maxes[i]).collect();
        if violating <= allowed || climbable.is_empty() {
            let suppressed: Vec<bool> = keys
                .iter()
                .map(|key| sizes[key.as_slice()] < u64::from(k))
                .collect();
            let released: Vec<u64> = sizes
                .values()
                .copied()
                .filter(|&s| s >= u64::from(k))
                .collect();
            return KAnonOutcome {
                levels,
                suppressed,
                k_reached: released.iter().copied().min().unwrap_or(0),
                classes: released.len() as u64,
            };
        }
        // Datafly: generalise the column with the most distinct values at its current level.
        let distinct = |i: usize| {
            let mut seen: Vec<&Out> = keys.iter().map(|key| &key[i]).collect();
            seen.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
            seen.dedup();
            seen.len()
        };
        if let Some(&col) = climbable.iter().max_by_key(|&&i| distinct(i)) {
            levels[col] += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(year: i32, sex: &str, zip: &str) -> Vec<Out> {
        vec![Out::I32(year), Out::Str(sex.into()), Out::Str(zip.into())]
    }

    #[test]
    fn generalises_before_suppressing() {
        let rows: Vec<_> = (0..40)
            .map(|i| row(1950 + i % 10, if i % 2 == 0 { "F" } else { "M" }, "021"))
            .collect();
        let out = anonymize(&rows, 5, 0.0);
        assert!(out.levels[0] >= 1, "birth years were coarsened: {out:?}");
        assert!(out.k_reached >= 5);
        assert!(out.suppressed.iter().all(|s| !s));
    }

    proptest! {
        #[test]
        fn every_released_class_has_at_least_k(
            people in proptest::collection::vec((1920i32..2020, 0usize..2, 0usize..6), 1..200),
            k in 2u32..8,
            ratio in 0.0f64..0.2,
        ) {
            let rows: Vec<_> = people.iter().map(|(y, s, z)| row(*y, ["F", "M"][*s], ["021", "100", "606", "941", "331", "000"][*z])).collect();
            let out = anonymize(&rows, k, ratio);
            let mut sizes: HashMap<Vec<Out>, u64> = HashMap::new();
            for (r, sup) in rows.iter().zip(&out.suppressed) {
                if !sup {
                    let key: Vec<Out> = r.iter().zip(&out.levels).map(|(v, l)| climb(v, *l)).collect();
                    *sizes.entry(key).or_default() += 1;
                }
            }
            prop_assert!(sizes.values().all(|&s| s >= u64::from(k)));
        }
    }
}
