//! k-anonymity over the patients' quasi-identifiers: global generalisation (Datafly) of the ordered
//! columns, then local recoding of the persons still in classes smaller than k, then suppression of the
//! few that even that cannot place.
//!
//! Each quasi-identifier has a ladder of levels, the top one withheld (`Null`): a year 1 → 5 → 10 → 20
//! years → withheld; a date day → month → year → 5 → 10 years → withheld; any other value as is →
//! withheld.
//!
//! 1. **Global** (Datafly, Sweeney 1998): while more than the allowed share of persons sit in classes
//!    smaller than k, the ordered column (year, date) with the most distinct values climbs one level for
//!    everyone; the levels kept are the first that left the fewest persons in small classes (a climb that
//!    placed nobody is undone). A column is never withheld globally: that is what step 2 does, for the
//!    persons who need it.
//! 2. **Local recoding** (cell generalisation and suppression, as μ-Argus and ARX do it): the persons still
//!    in small classes climb one column at a time until their classes reach k. Steps are tried in a fixed
//!    order — the profile's last-listed (least important) quasi-identifier first, and within a column a
//!    step that keeps a value (a wider band) before one that withholds it — and the first step that places anyone moves
//!    just the persons it places. When no step places anyone, one moves them all so that later steps can
//!    merge them: a wider band if any column has one, else the least important column is withheld. Only their cells change; everyone else keeps the global levels.
//! 3. **Suppression**: whoever is left (fewer than k persons, all of whose quasi-identifiers are then
//!    withheld) is not released.
//!
//! Every class is counted over the exact released values (`Null` is a value of its own), so each released
//! combination is shared by at least k persons. The outcome gives each person's levels, so the transform
//! releases exactly what was counted.

use ahash::{AHashMap as HashMap, AHashSet as HashSet};

use chrono::{Datelike, NaiveDate};

use crate::transform::Out;

/// Levels per ladder, level 0 being the profile's own output; the top level withholds the value.
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
        Out::I32(year) => Out::I32(year - year.rem_euclid(year_band(level))),
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

/// Width in years of a year value's band at a level below the top.
pub(crate) fn year_band(level: u8) -> i32 {
    [1, 5, 10, 20][usize::from(level.min(3))]
}

/// The last day a value climbed to `level` can stand for (a year band's last day, a date band's last
/// day); `None` for values that are not dates or years, and for withheld ones.
pub(crate) fn latest_day(v: &Out, level: u8) -> Option<NaiveDate> {
    match climb(v, level) {
        Out::I32(year) => NaiveDate::from_ymd_opt(year + year_band(level) - 1, 12, 31),
        Out::Date(days) => {
            let d = crate::transform::date_from_days(days)?;
            let (years, months) = match level {
                0 => return Some(d),
                1 => (0, 1),
                2 => (1, 0),
                3 => (5, 0),
                _ => (10, 0),
            };
            let next = d
                .checked_add_months(chrono::Months::new(years * 12 + months))
                .unwrap_or(NaiveDate::MAX);
            next.pred_opt()
        }
        _ => None,
    }
}

/// A released cell, borrowed from the person's value: what classes are counted over.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Cell<'a> {
    Null,
    Str(&'a str),
    Int(i64),
    Bits(u64),
}

fn cell(v: &Out, level: u8) -> Cell<'_> {
    if level >= max_level(v) && level > 0 {
        return Cell::Null;
    }
    match (v, level) {
        (Out::Null, _) => Cell::Null,
        (Out::Str(s), _) => Cell::Str(s),
        (Out::I32(_) | Out::Date(_), l) if l > 0 => match climb(v, l) {
            Out::I32(x) | Out::Date(x) => Cell::Int(i64::from(x)),
            _ => Cell::Null,
        },
        (Out::I32(x) | Out::Date(x), _) => Cell::Int(i64::from(*x)),
        (Out::I64(x) | Out::Ts(x), _) => Cell::Int(*x),
        (Out::F64(x), _) => Cell::Bits(x.to_bits()),
    }
}

/// What k-anonymity decided.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KAnonOutcome {
    /// Global ladder level reached per quasi-identifier (same order as the profile's list).
    pub levels: Vec<u8>,
    /// Each person's level per quasi-identifier, four bits each (column `i` at bits `4i..4i+4`): the
    /// global level, or higher where the person was recoded locally.
    pub person_levels: Vec<u64>,
    /// Per quasi-identifier, the persons recoded locally above the global level.
    pub recoded: Vec<u64>,
    /// Per quasi-identifier, the released persons whose value is withheld (`Null`) by recoding.
    pub withheld: Vec<u64>,
    /// Which persons (indexes into the input) are suppressed.
    pub suppressed: Vec<bool>,
    /// Each person's equivalence class (an index; suppressed persons' too).
    pub class_of: Vec<u32>,
    /// Smallest class among released persons (0 when nobody is released).
    pub k_reached: u64,
    /// Number of equivalence classes released.
    pub classes: u64,
}

/// The level of quasi-identifier `i` in a packed level word.
pub fn level_of(packed: u64, i: usize) -> u8 {
    ((packed >> (4 * i)) & 0xf) as u8
}

fn pack(levels: &[u8]) -> u64 {
    levels
        .iter()
        .enumerate()
        .fold(0, |acc, (i, l)| acc | (u64::from(*l & 0xf) << (4 * i)))
}

/// At most this many quasi-identifiers (each person's levels are packed four bits a column in 64 bits).
const MAX_QI: usize = 16;

/// A person's released record: one interned code per quasi-identifier (unused slots 0).
type Key = [u32; MAX_QI];

/// Levels per person, one per quasi-identifier.
type Levels = [u8; MAX_QI];

/// Every cell a person can be released with, interned: `codes[column][level][person]`. Equal released
/// values have equal codes (per column), so classes are counted over small fixed keys.
struct Coded {
    n_qi: usize,
    tops: Vec<u8>,
    codes: Vec<Vec<Vec<u32>>>,
}

impl Coded {
    fn new(rows: &[Vec<Out>], n_qi: usize) -> Coded {
        let tops: Vec<u8> = (0..n_qi)
            .map(|i| rows.iter().map(|r| max_level(&r[i])).max().unwrap_or(1))
            .collect();
        let codes = (0..n_qi)
            .map(|i| {
                let mut interned: HashMap<Cell<'_>, u32> = HashMap::new();
                (0..=tops[i])
                    .map(|level| {
                        rows.iter()
                            .map(|r| {
                                let next = u32::try_from(interned.len()).unwrap_or(u32::MAX);
                                *interned.entry(cell(&r[i], level)).or_insert(next)
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        Coded { n_qi, tops, codes }
    }

    /// A person's code in column `i` at `level`.
    fn code(&self, p: usize, i: usize, level: u8) -> u32 {
        self.codes[i][usize::from(level.min(self.tops[i]))][p]
    }

    fn key(&self, p: usize, levels: &Levels) -> Key {
        let mut key = [0; MAX_QI];
        for (i, slot) in key.iter_mut().enumerate().take(self.n_qi) {
            *slot = self.code(p, i, levels[i]);
        }
        key
    }

    /// The key with column `col` one level higher.
    fn key_climbed(&self, p: usize, levels: &Levels, col: usize) -> Key {
        let mut key = self.key(p, levels);
        key[col] = self.code(p, col, levels[col] + 1);
        key
    }

    /// Class sizes and each person's class over the persons' levels.
    fn classes(&self, levels: &[Levels]) -> (Vec<u32>, Vec<u64>) {
        let mut ids: HashMap<Key, u32> = HashMap::new();
        let mut sizes = Vec::new();
        let mut class_of = Vec::with_capacity(levels.len());
        for (p, lv) in levels.iter().enumerate() {
            let next = u32::try_from(sizes.len()).unwrap_or(u32::MAX);
            let id = *ids.entry(self.key(p, lv)).or_insert(next);
            if id == next {
                sizes.push(0);
            }
            sizes[id as usize] += 1;
            class_of.push(id);
        }
        (class_of, sizes)
    }

    /// Persons in classes smaller than k when everyone has the same `global` levels.
    fn violating(&self, n: usize, global: &Levels, k: u64) -> usize {
        let mut sizes: HashMap<Key, u64> = HashMap::new();
        for p in 0..n {
            *sizes.entry(self.key(p, global)).or_default() += 1;
        }
        sizes.values().filter(|s| **s < k).sum::<u64>() as usize
    }

    /// Distinct released values of column `i` among `who`.
    fn distinct(&self, levels: &[Levels], who: impl Iterator<Item = usize>, i: usize) -> usize {
        who.map(|p| self.code(p, i, levels[p][i]))
            .collect::<HashSet<_>>()
            .len()
    }

    /// Moves the small persons whose class, with the settled persons', now has k members to the
    /// settled.
    fn settle(
        &self,
        levels: &[Levels],
        small: &mut Vec<usize>,
        settled: &mut HashMap<Key, u64>,
        k: u64,
    ) {
        let keys: Vec<Key> = small.iter().map(|&p| self.key(p, &levels[p])).collect();
        let mut counts: HashMap<Key, u64> = HashMap::new();
        for key in &keys {
            *counts.entry(*key).or_default() += 1;
        }
        let mut still = Vec::new();
        for (p, key) in small.iter().zip(&keys) {
            if counts[key] + settled.get(key).copied().unwrap_or(0) >= k {
                *settled.entry(*key).or_default() += 1;
            } else {
                still.push(*p);
            }
        }
        *small = still;
    }

    /// Of `movers`, the persons whose class would reach k if all of them climbed column `col` one
    /// level (moving just those gives their classes the same members).
    fn placed_by(
        &self,
        levels: &[Levels],
        movers: &[usize],
        settled: &HashMap<Key, u64>,
        col: usize,
        k: u64,
    ) -> Vec<usize> {
        let keys: Vec<Key> = movers
            .iter()
            .map(|&p| self.key_climbed(p, &levels[p], col))
            .collect();
        let mut counts: HashMap<Key, u64> = HashMap::new();
        for key in &keys {
            *counts.entry(*key).or_default() += 1;
        }
        movers
            .iter()
            .zip(&keys)
            .filter(|(_, key)| counts[*key] + settled.get(*key).copied().unwrap_or(0) >= k)
            .map(|(p, _)| *p)
            .collect()
    }
}

/// Runs k-anonymity over `rows` (one quasi-identifier vector per person, at most 16 columns).
pub fn anonymize(rows: &[Vec<Out>], k: u32, max_suppression_ratio: f64) -> KAnonOutcome {
    let n = rows.len();
    let n_qi = rows.first().map_or(0, Vec::len).min(MAX_QI);
    let k = u64::from(k);
    let coded = Coded::new(rows, n_qi);
    let tops = coded.tops.clone();
    let allowed = (max_suppression_ratio * n as f64).floor() as usize;

    // 1. Global generalisation of the ordered columns, never to the withheld level. Datafly climbs the
    // ordered column with the most distinct values; the levels kept are the first that placed the most
    // persons (climbing that placed nobody is undone).
    let mut global: Levels = [0; MAX_QI];
    let mut now = coded.violating(n, &global, k);
    let mut best = (now, global);
    while now > allowed {
        let levels = vec![global; n];
        let Some(col) = (0..n_qi)
            .filter(|&i| global[i] + 1 < tops[i])
            .max_by_key(|&i| coded.distinct(&levels, 0..n, i))
        else {
            break;
        };
        global[col] += 1;
        now = coded.violating(n, &global, k);
        if now < best.0 {
            best = (now, global);
        }
    }
    let global = best.1;

    // 2. Local recoding of the persons still in small classes.
    let mut levels = vec![global; n];
    let (class_of, sizes) = coded.classes(&levels);
    let mut settled: HashMap<Key, u64> = HashMap::new();
    let mut small: Vec<usize> = Vec::new();
    for p in 0..n {
        if sizes[class_of[p] as usize] >= k {
            *settled.entry(coded.key(p, &levels[p])).or_default() += 1;
        } else {
            small.push(p);
        }
    }
    // Steps in the order they are tried: the profile's last quasi-identifier (its least important)
    // first, and within a column a wider band before a withheld value.
    let steps: Vec<(usize, bool)> = (0..n_qi)
        .rev()
        .flat_map(|c| [(c, true), (c, false)])
        .collect();
    // When no step places anyone: a wider band before any withheld value.
    let progress: Vec<(usize, bool)> = [true, false]
        .into_iter()
        .flat_map(|keep| (0..n_qi).rev().map(move |c| (c, keep)))
        .collect();
    let movers = |small: &[usize], levels: &[Levels], (c, keep): (usize, bool)| -> Vec<usize> {
        small
            .iter()
            .copied()
            .filter(|&p| levels[p][c] + u8::from(keep) < tops[c])
            .collect()
    };
    loop {
        // One round: every step in order moves just the persons it places.
        let mut placed_any = false;
        for &(c, keep) in &steps {
            coded.settle(&levels, &mut small, &mut settled, k);
            if small.is_empty() {
                break;
            }
            let placed =
                coded.placed_by(&levels, &movers(&small, &levels, (c, keep)), &settled, c, k);
            placed_any |= !placed.is_empty();
            for p in placed {
                levels[p][c] += 1;
            }
        }
        coded.settle(&levels, &mut small, &mut settled, k);
        if small.is_empty() {
            break;
        }
        if placed_any {
            continue;
        }
        // No step placed anyone: the first possible one moves every small person it can, so that
        // later steps can merge them.
        let Some((col, who)) = progress
            .iter()
            .map(|&step| (step.0, movers(&small, &levels, step)))
            .find(|(_, m)| !m.is_empty())
        else {
            break;
        };
        for p in who {
            levels[p][col] += 1;
        }
    }
    let (class_of, sizes) = coded.classes(&levels);

    // 3. Suppression of whoever is still in a small class.
    let suppressed: Vec<bool> = class_of.iter().map(|c| sizes[*c as usize] < k).collect();
    let mut recoded = vec![0u64; n_qi];
    let mut withheld = vec![0u64; n_qi];
    for p in (0..n).filter(|&p| !suppressed[p]) {
        for i in 0..n_qi {
            if levels[p][i] > global[i] {
                recoded[i] += 1;
            }
            if matches!(cell(&rows[p][i], levels[p][i]), Cell::Null)
                && !matches!(rows[p][i], Out::Null)
            {
                withheld[i] += 1;
            }
        }
    }
    let released: Vec<u64> = sizes.iter().copied().filter(|&s| s >= k).collect();
    KAnonOutcome {
        levels: global[..n_qi].to_vec(),
        person_levels: levels.iter().map(|l| pack(&l[..n_qi])).collect(),
        recoded,
        withheld,
        suppressed,
        class_of,
        k_reached: released.iter().copied().min().unwrap_or(0),
        classes: released.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(year: i32, sex: &str, zip: &str) -> Vec<Out> {
        vec![Out::I32(year), Out::Str(sex.into()), Out::Str(zip.into())]
    }

    /// Class sizes over the released values, recomputed from scratch.
    fn released_sizes(rows: &[Vec<Out>], out: &KAnonOutcome) -> HashMap<Vec<Out>, u64> {
        let mut sizes: HashMap<Vec<Out>, u64> = HashMap::new();
        for ((r, sup), packed) in rows.iter().zip(&out.suppressed).zip(&out.person_levels) {
            if !sup {
                let key: Vec<Out> = r
                    .iter()
                    .enumerate()
                    .map(|(i, v)| climb(v, level_of(*packed, i)))
                    .collect();
                *sizes.entry(key).or_default() += 1;
            }
        }
        sizes
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

    #[test]
    fn the_persons_of_small_classes_lose_one_cell_each_and_nobody_else_any() {
        // 60 persons over common values, 5 with a rare race (3 F, 2 M): no global generalisation; the
        // rare persons lose one value each (their sex: then all five share a class), nobody is suppressed.
        let mut rows: Vec<Vec<Out>> = (0..60)
            .map(|i| {
                let mut r = row(1960, ["F", "M"][i % 2], "021");
                r.push(Out::Str("white".into()));
                r
            })
            .collect();
        for sex in ["F", "F", "F", "M", "M"] {
            let mut r = row(1960, sex, "021");
            r.push(Out::Str("rare".into()));
            rows.push(r);
        }
        let out = anonymize(&rows, 5, 0.05);
        assert_eq!(out.levels, vec![0, 0, 0, 0], "nobody else is generalised");
        assert!(out.suppressed.iter().all(|s| !s), "nobody is suppressed");
        assert_eq!(out.recoded, vec![0, 5, 0, 0]);
        assert_eq!(out.withheld, vec![0, 5, 0, 0]);
        assert!(released_sizes(&rows, &out).values().all(|&s| s >= 5));
    }

    #[test]
    fn two_persons_no_class_can_take_are_suppressed() {
        let mut rows: Vec<Vec<Out>> = (0..60)
            .map(|i| row(1960, ["F", "M"][i % 2], "021"))
            .collect();
        rows.push(row(1930, "F", "999"));
        rows.push(row(2001, "M", "888"));
        let out = anonymize(&rows, 5, 0.05);
        assert_eq!(out.suppressed.iter().filter(|s| **s).count(), 2);
        assert_eq!(out.k_reached, 30);
    }

    #[test]
    fn a_year_band_is_widened_locally_before_a_value_is_withheld() {
        // Ten persons a year in 1950–1959, and three born 1990: they get a wider band, not a withheld year.
        let mut rows: Vec<Vec<Out>> = (0..100).map(|i| row(1950 + i % 10, "F", "021")).collect();
        for _ in 0..3 {
            rows.push(row(1990, "F", "021"));
        }
        rows.push(row(1994, "F", "021"));
        rows.push(row(1998, "F", "021"));
        let out = anonymize(&rows, 5, 0.05);
        assert_eq!(out.levels[0], 0);
        assert!(out.suppressed.iter().all(|s| !s), "{out:?}");
        for p in 100..105 {
            let l = level_of(out.person_levels[p], 0);
            assert!(
                l > 0 && l < 4,
                "1990s persons share a band, not a withheld year: level {l}"
            );
        }
        assert_eq!(out.withheld, vec![0, 0, 0]);
    }

    #[test]
    fn latest_days_of_bands() {
        let d = |y, m, dd| NaiveDate::from_ymd_opt(y, m, dd).expect("date");
        assert_eq!(latest_day(&Out::I32(1953), 0), Some(d(1953, 12, 31)));
        assert_eq!(latest_day(&Out::I32(1953), 1), Some(d(1954, 12, 31)));
        assert_eq!(latest_day(&Out::I32(1953), 3), Some(d(1959, 12, 31)));
        assert_eq!(latest_day(&Out::I32(1953), 4), None, "withheld");
        let birth = Out::Date(crate::transform::days_from_date(d(1953, 2, 14)));
        assert_eq!(latest_day(&birth, 0), Some(d(1953, 2, 14)));
        assert_eq!(latest_day(&birth, 1), Some(d(1953, 2, 28)));
        assert_eq!(latest_day(&birth, 2), Some(d(1953, 12, 31)));
        assert_eq!(latest_day(&birth, 3), Some(d(1954, 12, 31)));
        assert_eq!(latest_day(&birth, 4), Some(d(1959, 12, 31)));
        assert_eq!(latest_day(&Out::Str("F".into()), 0), None);
    }

    proptest! {
        #[test]
        fn every_released_class_has_at_least_k_and_few_are_suppressed(
            people in proptest::collection::vec((1920i32..2020, 0usize..2, 0usize..6, 0usize..4), 1..200),
            k in 2u32..8,
            ratio in 0.0f64..0.2,
        ) {
            let rows: Vec<_> = people.iter().map(|(y, s, z, r)| {
                let mut v = row(*y, ["F", "M"][*s], ["021", "100", "606", "941", "331", "000"][*z]);
                v.push(if *r == 3 { Out::Null } else { Out::Str(["a", "b", "c"][*r].into()) });
                v
            }).collect();
            let out = anonymize(&rows, k, ratio);
            let sizes = released_sizes(&rows, &out);
            prop_assert!(sizes.values().all(|&s| s >= u64::from(k)));
            let suppressed = out.suppressed.iter().filter(|s| **s).count();
            prop_assert!(suppressed < k as usize, "only a last small class is suppressed: {suppressed}");
            prop_assert_eq!(out.k_reached, sizes.values().copied().min().unwrap_or(0));
        }
    }
}
