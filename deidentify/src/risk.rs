//! The re-identification risk of what is released, measured on the rows as they are written (ARX's risk
//! analysis is the model; El Emam, *Guide to the De-Identification of Personal Health Information*).
//!
//! Per table:
//! - **records unique on their quasi-identifiers**: a record's quasi-identifiers are its person's
//!   k-anonymity class (the demographic record) and the table's own quasi-identifier columns (event years);
//!   with the class sizes, the **prosecutor** risk (highest: 1 / smallest class; average: classes /
//!   records), the **journalist** risk (with no population table the dataset is taken as the population,
//!   so it equals the prosecutor risk; a sample of a larger population only lowers it) and the
//!   **marketer** risk (classes / records: the expected share re-identified when every record is tried);
//! - per released column: the share of persons it **singles out** — persons holding a value of the column
//!   that no other person holds, who an outsider knowing that one value links to their record. Shifted
//!   times are measured on their time of day, the part a whole-day shift keeps. In value and time columns
//!   ("limited") such values are withheld after the run (the ingest rewrites the tables that hold any, and
//!   measures them again), unless more than the profile's `max_unique_ratio` of a column's values would
//!   be: then its coarsening is too fine, and the run fails naming it;
//! - for `patients` (one record per person): the share of records unique on the quasi-identifiers plus
//!   each column. On event tables that combination is not counted: it would hold one entry per row, and
//!   the ingest's memory grows with persons, never with rows.
//!
//! Values are compared by a 64-bit hash under a key drawn for this run (aHash, randomly keyed: collisions,
//! which could only merge two values and so under-count by one, have probability about 2⁻⁶⁴ per pair).

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher};

use ahash::{AHashMap as HashMap, AHashSet as HashSet, RandomState};

use policies::Table;
use serde::Serialize;

use crate::transform::Out;

const MANY: u32 = u32::MAX;

/// A released value as it is compared: borrowed from the row or the array, so measuring allocates
/// nothing. Within a column the values have one type, so integers of every width share a variant.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Cell<'a> {
    Null,
    Str(&'a str),
    Int(i64),
    Bits(u64),
}

impl<'a> Cell<'a> {
    pub(crate) fn of(v: &'a Out) -> Cell<'a> {
        match v {
            Out::Null => Cell::Null,
            Out::Str(s) => Cell::Str(s),
            Out::I32(x) | Out::Date(x) => Cell::Int(i64::from(*x)),
            Out::I64(x) | Out::Ts(x) => Cell::Int(*x),
            Out::F64(x) => Cell::Bits(x.to_bits()),
        }
    }

    /// The cell at row `i` of a written column (the types the transform writes).
    pub(crate) fn at(array: &'a dyn arrow::array::Array, i: usize) -> Cell<'a> {
        use arrow::array::{
            Date32Array, Float64Array, Int32Array, Int64Array, StringArray,
            TimestampMicrosecondArray,
        };
        if array.is_null(i) {
            return Cell::Null;
        }
        let any = array.as_any();
        if let Some(a) = any.downcast_ref::<StringArray>() {
            Cell::Str(a.value(i))
        } else if let Some(a) = any.downcast_ref::<Float64Array>() {
            Cell::Bits(a.value(i).to_bits())
        } else if let Some(a) = any.downcast_ref::<Int64Array>() {
            Cell::Int(a.value(i))
        } else if let Some(a) = any.downcast_ref::<Int32Array>() {
            Cell::Int(i64::from(a.value(i)))
        } else if let Some(a) = any.downcast_ref::<Date32Array>() {
            Cell::Int(i64::from(a.value(i)))
        } else if let Some(a) = any.downcast_ref::<TimestampMicrosecondArray>() {
            Cell::Int(a.value(i))
        } else {
            Cell::Null
        }
    }
}

/// Who holds one value of a column, and in how many rows.
#[derive(Clone, Copy)]
struct Owner {
    /// The one person holding it, or [`MANY`].
    person: u32,
    rows: u32,
}
const DAY_MICROS: i64 = 86_400_000_000;

/// How one released column is measured.
pub(crate) struct Measured {
    /// Output column name.
    pub name: String,
    /// Position in the output row (after the person column).
    pub index: usize,
    /// Limited by `max_unique_ratio` (value and time columns).
    pub enforced: bool,
    /// A shifted time: measured on its time of day.
    pub time_of_day: bool,
}

struct ColumnMeter {
    spec: Measured,
    /// Value hash → who holds it.
    owner: HashMap<u64, Owner>,
    /// Persons holding any value of the column.
    holders: Vec<u64>,
    /// Persons holding a value some other person holds too (the holders once singled-out values are
    /// withheld).
    shared: Vec<u64>,
    /// Rows holding a value.
    values: u64,
    /// Values withheld because they singled out their person (set when the table is measured again).
    withheld: u64,
    /// Patients only: (class, value hash) → records, up to 2.
    with_qi: Option<HashMap<(u32, u64), u8>>,
}

impl ColumnMeter {
    fn new(spec: Measured, words: usize, patients: bool) -> ColumnMeter {
        ColumnMeter {
            spec,
            owner: HashMap::new(),
            holders: vec![0; words],
            shared: vec![0; words],
            values: 0,
            withheld: 0,
            with_qi: patients.then(HashMap::new),
        }
    }
}

/// A limited column's values that single out their person.
#[derive(Debug, Clone, PartialEq)]
pub struct SingledOut {
    /// Output column name.
    pub column: String,
    /// Rows holding a value of the column.
    pub values: u64,
    /// Of them, rows holding a value no other person holds.
    pub rows: u64,
}

/// What withholding a table's singled-out values needs: per limited column, its position in the row,
/// whether it is compared on its time of day, and the hashes of the values to withhold; and how the
/// table's figures are brought up to date from the rewritten rows.
pub(crate) struct Withhold {
    pub columns: Vec<(usize, bool, HashSet<u64>)>,
    /// Measure every rewritten row again (patients: its uniqueness with the quasi-identifiers depends
    /// on every value).
    pub measure_again: bool,
    /// Count the records' classes again (a withheld column is one of the table's quasi-identifiers).
    pub count_classes: bool,
    /// The table's own quasi-identifier columns (positions in the row).
    pub row_qis: Vec<usize>,
}

fn mark(bits: &mut [u64], person: usize) {
    if let Some(word) = bits.get_mut(person / 64) {
        *word |= 1 << (person % 64);
    }
}

struct TableMeter {
    records: u64,
    /// The table's own quasi-identifier columns (positions in the output row).
    row_qis: Vec<usize>,
    /// Record key (person class and own quasi-identifiers) → records.
    classes: HashMap<u64, u64>,
    columns: Vec<ColumnMeter>,
}

/// [`RiskMeter::hash_value`] under `hasher`.
fn hash_value(hasher: &RandomState, v: Cell<'_>, time_of_day: bool) -> u64 {
    let v = match v {
        Cell::Int(t) if time_of_day => Cell::Int(t.rem_euclid(DAY_MICROS)),
        v => v,
    };
    hasher.hash_one(v)
}

/// [`RiskMeter::record_key`] under `hasher`.
fn record_key<'a>(hasher: &RandomState, class: u32, qis: impl Iterator<Item = Cell<'a>>) -> u64 {
    let mut h = hasher.build_hasher();
    class.hash(&mut h);
    for c in qis {
        c.hash(&mut h);
    }
    h.finish()
}

/// Accumulates the risk figures while rows are written.
pub(crate) struct RiskMeter {
    hasher: RandomState,
    persons: usize,
    tables: BTreeMap<Table, TableMeter>,
}

/// One column's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnRisk {
    /// Persons holding a value of the column.
    pub persons: u64,
    /// Of them, persons holding a value no other person holds.
    pub singled_out: u64,
    /// `singled_out / persons` (0 when nobody holds a value).
    pub person_unique_ratio: f64,
    /// Values released in the column (non-null).
    pub values: u64,
    /// Values withheld because no other person held them (limited columns).
    pub withheld: u64,
    /// `patients` only: share of records unique on the quasi-identifiers plus this column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_with_qi_ratio: Option<f64>,
    /// What is compared: `"value"`, or `"time of day"` for a shifted time.
    pub measured_on: &'static str,
    /// Whether `max_unique_ratio` limits it (value and time columns).
    pub limited: bool,
}

/// One table's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableRisk {
    /// Records released.
    pub records: u64,
    /// Quasi-identifier classes among them.
    pub classes: u64,
    /// Records in the smallest class (0 for an empty table).
    pub smallest_class: u64,
    /// Share of records alone in their class.
    pub unique_ratio: f64,
    /// Highest prosecutor risk: 1 / smallest class.
    pub prosecutor_highest: f64,
    /// Average prosecutor risk: classes / records.
    pub prosecutor_average: f64,
    /// Highest journalist risk (the dataset taken as the population: the prosecutor's).
    pub journalist_highest: f64,
    /// Marketer risk: classes / records.
    pub marketer: f64,
    /// Per measured column.
    pub columns: BTreeMap<String, ColumnRisk>,
}

/// The risk report of one ingest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RiskReport {
    /// The profile's limit on the share of persons a value or time column may single out.
    pub max_unique_ratio: f64,
    /// Per table.
    pub tables: BTreeMap<String, TableRisk>,
    /// `table.column` of every limited column where more than `max_unique_ratio` of the values single
    /// out their person, with that share.
    pub over_limit: Vec<(String, f64)>,
}

impl RiskReport {
    /// The lines the provider reads: per table the uniqueness and risks, and the columns that single
    /// out the most persons.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "re-identification risk (prosecutor model; a value or time column's values held by one person are withheld, up to {:.1} % of them)\n",
            self.max_unique_ratio * 100.0
        );
        for (name, t) in &self.tables {
            s += &format!(
                "  {name:<13} {:>9} records, {:>5.2} % unique on quasi-identifiers, smallest class {}, prosecutor highest {:.3} / average {:.3}, marketer {:.3}\n",
                t.records,
                t.unique_ratio * 100.0,
                t.smallest_class,
                t.prosecutor_highest,
                t.prosecutor_average,
                t.marketer
            );
            let mut cols: Vec<(&String, &ColumnRisk)> = t.columns.iter().collect();
            cols.sort_by(|a, b| b.1.person_unique_ratio.total_cmp(&a.1.person_unique_ratio));
            let top: Vec<String> = cols
                .iter()
                .filter(|(_, c)| c.singled_out > 0)
                .take(3)
                .map(|(n, c)| {
                    format!(
                        "{n} {:.2} %{}",
                        c.person_unique_ratio * 100.0,
                        if c.limited { "" } else { " (not limited)" }
                    )
                })
                .collect();
            if !top.is_empty() {
                s += &format!(
                    "                persons singled out by: {}\n",
                    top.join(", ")
                );
            }
            let withheld: Vec<String> = t
                .columns
                .iter()
                .filter(|(_, c)| c.withheld > 0)
                .map(|(n, c)| format!("{n} {}", c.withheld))
                .collect();
            if !withheld.is_empty() {
                s += &format!(
                    "                values withheld (held by no other person): {}\n",
                    withheld.join(", ")
                );
            }
        }
        for (column, ratio) in &self.over_limit {
            s += &format!(
                "  OVER THE LIMIT: {:.2} % of {column}'s values are held by one person only\n",
                ratio * 100.0
            );
        }
        s
    }
}

impl RiskMeter {
    /// A meter for `persons` persons; `tables` gives each table's own quasi-identifier positions and its
    /// measured columns.
    pub(crate) fn new(
        persons: usize,
        tables: Vec<(Table, Vec<usize>, Vec<Measured>)>,
    ) -> RiskMeter {
        let words = persons.div_ceil(64);
        RiskMeter {
            hasher: RandomState::new(),
            persons,
            tables: tables
                .into_iter()
                .map(|(t, row_qis, measured)| {
                    let columns = measured
                        .into_iter()
                        .map(|spec| ColumnMeter::new(spec, words, t == Table::Patients))
                        .collect();
                    (
                        t,
                        TableMeter {
                            records: 0,
                            row_qis,
                            classes: HashMap::new(),
                            columns,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The hash a value is compared by (a time, by its time of day when `time_of_day`).
    pub(crate) fn hash_value(&self, v: Cell<'_>, time_of_day: bool) -> u64 {
        hash_value(&self.hasher, v, time_of_day)
    }

    /// The key of a record: its person's class and the table's own quasi-identifiers.
    pub(crate) fn record_key<'a>(&self, class: u32, qis: impl Iterator<Item = Cell<'a>>) -> u64 {
        record_key(&self.hasher, class, qis)
    }

    /// Counts one written row of `table` for person `person` (index) in class `class`.
    pub(crate) fn record(&mut self, table: Table, person: usize, class: u32, row: &[Out]) {
        let hasher = &self.hasher;
        let Some(t) = self.tables.get_mut(&table) else {
            return;
        };
        let cell = |i: usize| row.get(i).map_or(Cell::Null, Cell::of);
        let key = record_key(hasher, class, t.row_qis.iter().map(|&i| cell(i)));
        t.records += 1;
        *t.classes.entry(key).or_default() += 1;
        let Ok(p) = u32::try_from(person) else {
            return;
        };
        for c in &mut t.columns {
            let v = cell(c.spec.index);
            if v == Cell::Null {
                continue;
            }
            let hash = hash_value(hasher, v, c.spec.time_of_day);
            mark(&mut c.holders, person);
            c.values += 1;
            let o = c.owner.entry(hash).or_insert(Owner { person: p, rows: 0 });
            if o.person != p {
                if o.person != MANY {
                    mark(&mut c.shared, o.person as usize);
                    o.person = MANY;
                }
                mark(&mut c.shared, person);
            }
            o.rows = o.rows.saturating_add(1);
            if let Some(w) = &mut c.with_qi {
                let n = w.entry((class, hash)).or_default();
                *n = n.saturating_add(1).min(2);
            }
        }
    }

    /// Per limited column of `table` holding any, its values that single out their person.
    pub(crate) fn singled_out(&self, table: Table) -> Vec<SingledOut> {
        let Some(t) = self.tables.get(&table) else {
            return Vec::new();
        };
        t.columns
            .iter()
            .filter(|c| c.spec.enforced)
            .map(|c| SingledOut {
                column: c.spec.name.clone(),
                values: c.values,
                rows: c
                    .owner
                    .values()
                    .filter(|o| o.person != MANY)
                    .map(|o| u64::from(o.rows))
                    .sum(),
            })
            .filter(|s| s.rows > 0)
            .collect()
    }

    /// Withholds `table`'s singled-out values from its figures: returns what to withhold in its rows and
    /// how to bring the rest up to date. The limited columns' figures follow directly (their holders are
    /// the persons holding a shared value; no value is held by one person); `patients` is measured again
    /// from its rewritten rows, and an event table's classes are counted again when a withheld column is
    /// one of its quasi-identifiers.
    pub(crate) fn withhold(&mut self, table: Table) -> Withhold {
        let words = self.persons.div_ceil(64);
        let Some(t) = self.tables.get_mut(&table) else {
            return Withhold {
                columns: Vec::new(),
                measure_again: false,
                count_classes: false,
                row_qis: Vec::new(),
            };
        };
        let measure_again = table == Table::Patients;
        let mut columns = Vec::new();
        for c in &mut t.columns {
            if !c.spec.enforced {
                continue;
            }
            let singled: HashSet<u64> = c
                .owner
                .iter()
                .filter(|(_, o)| o.person != MANY)
                .map(|(h, _)| *h)
                .collect();
            if singled.is_empty() {
                continue;
            }
            let rows: u64 = c
                .owner
                .values()
                .filter(|o| o.person != MANY)
                .map(|o| u64::from(o.rows))
                .sum();
            c.withheld = rows;
            if !measure_again {
                c.values -= rows;
                c.owner.retain(|_, o| o.person == MANY);
                c.holders = c.shared.clone();
            }
            columns.push((c.spec.index, c.spec.time_of_day, singled));
        }
        let count_classes = !measure_again && columns.iter().any(|(i, _, _)| t.row_qis.contains(i));
        if measure_again {
            t.records = 0;
            t.classes.clear();
            for c in &mut t.columns {
                let withheld = c.withheld;
                let spec = Measured {
                    name: std::mem::take(&mut c.spec.name),
                    ..c.spec
                };
                *c = ColumnMeter::new(spec, words, true);
                c.withheld = withheld;
            }
        } else if count_classes {
            t.records = 0;
            t.classes.clear();
        }
        Withhold {
            columns,
            measure_again,
            count_classes,
            row_qis: t.row_qis.clone(),
        }
    }

    /// Counts one rewritten record's class again (see [`RiskMeter::withhold`]).
    pub(crate) fn count_record(&mut self, table: Table, key: u64) {
        if let Some(t) = self.tables.get_mut(&table) {
            t.records += 1;
            *t.classes.entry(key).or_default() += 1;
        }
    }

    /// The figures, with every limited column above `max_unique_ratio` named.
    pub(crate) fn finish(self, max_unique_ratio: f64) -> RiskReport {
        let mut tables = BTreeMap::new();
        let mut over_limit = Vec::new();
        for (table, t) in self.tables {
            let classes = t.classes.len() as u64;
            let smallest = t.classes.values().copied().min().unwrap_or(0);
            let alone = t.classes.values().filter(|n| **n == 1).count() as u64;
            let share = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
            let mut columns = BTreeMap::new();
            for c in t.columns {
                let mut singled = vec![0u64; self.persons.div_ceil(64)];
                for o in c.owner.values().filter(|o| o.person != MANY) {
                    let p = o.person as usize;
                    if let Some(word) = singled.get_mut(p / 64) {
                        *word |= 1 << (p % 64);
                    }
                }
                let persons: u64 = c.holders.iter().map(|w| u64::from(w.count_ones())).sum();
                let singled_out: u64 = singled.iter().map(|w| u64::from(w.count_ones())).sum();
                let ratio = share(singled_out, persons);
                let unique: u64 = c
                    .owner
                    .values()
                    .filter(|o| o.person != MANY)
                    .map(|o| u64::from(o.rows))
                    .sum::<u64>()
                    + c.withheld;
                let unique_share = share(unique, c.values + c.withheld);
                if c.spec.enforced && unique_share > max_unique_ratio {
                    over_limit.push((format!("{table}.{}", c.spec.name), unique_share));
                }
                columns.insert(
                    c.spec.name.clone(),
                    ColumnRisk {
                        persons,
                        singled_out,
                        person_unique_ratio: ratio,
                        values: c.values,
                        withheld: c.withheld,
                        unique_with_qi_ratio: c.with_qi.map(|w| {
                            share(w.values().filter(|n| **n == 1).count() as u64, t.records)
                        }),
                        measured_on: if c.spec.time_of_day {
                            "time of day"
                        } else {
                            "value"
                        },
                        limited: c.spec.enforced,
                    },
                );
            }
            tables.insert(
                table.name().to_owned(),
                TableRisk {
                    records: t.records,
                    classes,
                    smallest_class: smallest,
                    unique_ratio: share(alone, t.records),
                    prosecutor_highest: if smallest == 0 {
                        0.0
                    } else {
                        1.0 / smallest as f64
                    },
                    prosecutor_average: share(classes, t.records),
                    journalist_highest: if smallest == 0 {
                        0.0
                    } else {
                        1.0 / smallest as f64
                    },
                    marketer: share(classes, t.records),
                    columns,
                },
            );
        }
        over_limit.sort_by(|a, b| a.0.cmp(&b.0));
        RiskReport {
            max_unique_ratio,
            tables,
            over_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(name: &str, index: usize, enforced: bool, time_of_day: bool) -> Measured {
        Measured {
            name: name.into(),
            index,
            enforced,
            time_of_day,
        }
    }

    #[test]
    fn singled_out_persons_classes_and_risks() {
        let mut m = RiskMeter::new(
            4,
            vec![(
                Table::Encounters,
                vec![0],
                vec![
                    measured("year", 0, true, false),
                    measured("cost", 1, true, false),
                    measured("start", 2, true, true),
                ],
            )],
        );
        let hour = 3_600_000_000i64;
        // Persons 0..3 in class 7; person 3 alone has cost 9 and a visit at 13:00 (another day's 13:00
        // too); everyone else visits at 09:00 on different days.
        let rows = [
            (0, [Out::I32(2020), Out::F64(10.0), Out::Ts(9 * hour)]),
            (
                1,
                [
                    Out::I32(2020),
                    Out::F64(10.0),
                    Out::Ts(DAY_MICROS + 9 * hour),
                ],
            ),
            (
                2,
                [
                    Out::I32(2021),
                    Out::F64(10.0),
                    Out::Ts(2 * DAY_MICROS + 9 * hour),
                ],
            ),
            (
                2,
                [
                    Out::I32(2020),
                    Out::Null,
                    Out::Ts(3 * DAY_MICROS + 9 * hour),
                ],
            ),
            (3, [Out::I32(2020), Out::F64(9.0), Out::Ts(13 * hour)]),
            (
                3,
                [
                    Out::I32(2020),
                    Out::F64(10.0),
                    Out::Ts(5 * DAY_MICROS + 13 * hour),
                ],
            ),
        ];
        for (p, row) in &rows {
            m.record(Table::Encounters, *p, 7, row);
        }
        let singled = m.singled_out(Table::Encounters);
        assert_eq!(
            singled,
            vec![
                SingledOut {
                    column: "year".into(),
                    values: 6,
                    rows: 1
                },
                SingledOut {
                    column: "cost".into(),
                    values: 5,
                    rows: 1
                },
                SingledOut {
                    column: "start".into(),
                    values: 6,
                    rows: 2
                },
            ]
        );
        let r = m.finish(0.15);
        let t = &r.tables["encounters"];
        assert_eq!((t.records, t.classes, t.smallest_class), (6, 2, 1));
        assert!(
            (t.unique_ratio - 1.0 / 6.0).abs() < 1e-12,
            "the 2021 record is alone"
        );
        assert_eq!(t.prosecutor_highest, 1.0);
        assert!((t.marketer - 2.0 / 6.0).abs() < 1e-12);
        let cost = &t.columns["cost"];
        assert_eq!((cost.persons, cost.singled_out), (4, 1));
        assert_eq!(t.columns["year"].singled_out, 1, "only person 2 has 2021");
        assert_eq!(
            t.columns["start"].singled_out, 1,
            "only person 3 visits at 13:00"
        );
        assert_eq!(t.columns["start"].measured_on, "time of day");
        assert_eq!(
            r.over_limit,
            vec![
                ("encounters.cost".to_owned(), 1.0 / 5.0),
                ("encounters.start".to_owned(), 2.0 / 6.0),
                ("encounters.year".to_owned(), 1.0 / 6.0),
            ]
        );
        assert!(
            r.summary()
                .contains("OVER THE LIMIT: 20.00 % of encounters.cost's values")
        );
    }

    #[test]
    fn withheld_values_leave_nobody_singled_out_and_are_counted() {
        let hour = 3_600_000_000i64;
        let mut m = RiskMeter::new(
            3,
            vec![(
                Table::Encounters,
                vec![],
                vec![
                    measured("cost", 0, true, false),
                    measured("start", 1, true, true),
                    measured("code", 2, false, false),
                ],
            )],
        );
        let rows = [
            (0, [Out::F64(10.0), Out::Ts(9 * hour), Out::Str("a".into())]),
            (
                1,
                [
                    Out::F64(10.0),
                    Out::Ts(DAY_MICROS + 9 * hour),
                    Out::Str("b".into()),
                ],
            ),
            (
                2,
                [Out::F64(99.0), Out::Ts(13 * hour), Out::Str("a".into())],
            ),
            (2, [Out::F64(10.0), Out::Ts(9 * hour), Out::Str("a".into())]),
        ];
        for (p, row) in &rows {
            m.record(Table::Encounters, *p, 0, row);
        }
        let w = m.withhold(Table::Encounters);
        assert_eq!(w.columns.len(), 2, "cost and start; code is not limited");
        assert!(
            !w.measure_again && !w.count_classes,
            "no quasi-identifier is withheld"
        );
        let withheld: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, (_, row))| {
                w.columns.iter().any(|(i, tod, hashes)| {
                    hashes.contains(&m.hash_value(Cell::of(&row[*i]), *tod))
                })
            })
            .map(|(r, _)| r)
            .collect();
        assert_eq!(withheld, vec![2], "person 2's 99.0 at 13:00");
        let r = m.finish(0.3);
        let t = &r.tables["encounters"];
        for c in ["cost", "start"] {
            assert_eq!(t.columns[c].singled_out, 0, "{c}");
            assert_eq!(t.columns[c].withheld, 1, "{c}");
            assert_eq!(t.columns[c].values, 3, "{c}");
            assert_eq!(
                t.columns[c].persons, 3,
                "person 2 still holds a shared value"
            );
        }
        assert_eq!(
            t.columns["code"].singled_out, 1,
            "person 1's code b stays (not limited)"
        );
        assert!(r.over_limit.is_empty(), "1 of 4 values is under 30 %");
        assert!(
            r.summary()
                .contains("values withheld (held by no other person): cost 1, start 1")
        );
    }

    #[test]
    fn patients_count_uniqueness_with_the_quasi_identifiers() {
        let mut m = RiskMeter::new(
            3,
            vec![(
                Table::Patients,
                vec![],
                vec![measured("expenses", 0, true, false)],
            )],
        );
        m.record(Table::Patients, 0, 1, &[Out::F64(100.0)]);
        m.record(Table::Patients, 1, 1, &[Out::F64(100.0)]);
        m.record(Table::Patients, 2, 2, &[Out::F64(100.0)]);
        let r = m.finish(0.05);
        let c = &r.tables["patients"].columns["expenses"];
        assert_eq!(c.singled_out, 0, "one value shared by all");
        assert!((c.unique_with_qi_ratio.expect("patients") - 1.0 / 3.0).abs() < 1e-12);
        assert!(r.over_limit.is_empty());
    }
}
