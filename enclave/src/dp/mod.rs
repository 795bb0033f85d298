//! The differentially private SQL engine: the only way to learn anything about rows.
//!
//! ```text
//!  SQL ─► query::analyze (refusal rules) ─► bounded plan: WHERE, clamp to bounds, ≤ k rows per person
//!      ─► DataFusion: exact aggregates per group ─► noise: opendp (key selection, Laplace / Gaussian)
//!      ─► ledger: charge + audit record, one transaction ─► post-processing (HAVING, ORDER BY, LIMIT)
//! ```
//!
//! The privacy unit is the person: every table carries `person_id`, each person contributes at most
//! `max_contributions` rows' worth (after joins and WHERE: rows weighted down, or chosen at random where a
//! mechanism needs real rows; see `Bounding`), and every sensitivity follows from that bound and the
//! catalogued value bounds. Group keys are selected privately (released only above a
//! noisy threshold, with δ accounted). Nothing is released before the charge and its audit record commit.

mod index;
pub mod noise;
pub(crate) mod query;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::AsArray;
use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, UInt32Array};
use arrow::datatypes::{ArrowPrimitiveType, DataType, Field, Float64Type, Int64Type, Schema};
use catalog::{CatalogStore, SqliteCatalog, VersionEntry};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use ring::digest::{SHA256, digest};
use serde::Serialize;

use crate::audit::Draft;
use crate::keys::Keystore;
use crate::ledger::{Budget, Cost, Ledger};
use crate::{Error, Result};
use index::{ROWS_COLUMN, WEIGHT_COLUMN};
use noise::{Accounting, Noise};
use query::{AggKind, Analyzed};

/// Per-query settings.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// ε to spend (default: the engine's default, 0.1). Under zCDP: ρ.
    pub epsilon: Option<f64>,
    /// δ for private key selection (default 1e-6).
    pub delta: Option<f64>,
    /// Where the query came from, for the audit log.
    pub origin: String,
}

impl Default for QueryOptions {
    fn default() -> Self {
        QueryOptions {
            epsilon: None,
            delta: None,
            origin: "cli".into(),
        }
    }
}

/// One released column's noise, row by row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnNoise {
    /// Output column.
    pub column: String,
    /// Noise scale (Laplace b or Gaussian σ) of the value as released (for AVG: of its sum).
    pub scale: f64,
    /// 95 % interval per row: (low, high); NaN where none is known (quantiles).
    pub intervals: Vec<(f64, f64)>,
    /// How far one person can move the exact value: the bounded sensitivity the noise is calibrated to
    /// (NaN for values derived from several mechanisms: AVG, VARIANCE, STDDEV, quantiles).
    pub sensitivity: f64,
}

/// A DP answer.
#[derive(Debug, Clone)]
pub struct DpAnswer {
    /// The noisy result.
    pub batch: RecordBatch,
    /// Noise and intervals of the columns that show an aggregate unchanged.
    pub noise: Vec<ColumnNoise>,
    /// What the query cost.
    pub cost: Cost,
    /// How the cost splits over the mechanisms: (what, cost).
    pub cost_split: Vec<(String, Noise)>,
    /// The budget after the charge.
    pub budget: Budget,
    /// The audit record's sequence number.
    pub audit_seq: i64,
    /// On zCDP datasets: the (ε, δ) the query's ρ implies, at the grant's δ.
    pub epsilon_delta_equivalent: Option<(f64, f64)>,
}

/// The engine over one data directory.
pub struct DpEngine {
    root: PathBuf,
    keystore: Arc<Keystore>,
    catalog: SqliteCatalog,
    ledger: Ledger,
    default_epsilon: f64,
    default_delta: f64,
    danger_no_noise: bool,
    danger_crash_after_charge: bool,
    /// DataFusion sessions per (dataset, version, indexed), tables registered as first used.
    sessions: std::sync::Mutex<HashMap<(String, String, bool), SessionContext>>,
}

impl DpEngine {
    /// Opens the engine on an initialised data directory.
    pub fn open(dir: &crate::DataDir) -> Result<DpEngine> {
        let keystore = Arc::new(dir.keystore()?);
        let ledger = dir.ledger(&keystore)?;
        Ok(DpEngine {
            root: dir.root().to_owned(),
            catalog: dir.catalog()?,
            keystore,
            ledger,
            default_epsilon: 0.1,
            default_delta: 1e-6,
            danger_no_noise: false,
            danger_crash_after_charge: false,
            sessions: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Turns noise off while keeping every other step (bounding, clamping, accounting, audit). Only for
    /// tests that measure sensitivity; the binary never calls it.
    pub fn danger_without_noise(mut self) -> DpEngine {
        self.danger_no_noise = true;
        self
    }

    /// Fault injection for the crash test: the process aborts right after a query's charge and audit record
    /// commit, before its answer is released. The binary sets it only when
    /// `ENCLAVE_DANGER_CRASH_AFTER_CHARGE` is set.
    pub fn danger_crash_after_charge(mut self) -> DpEngine {
        self.danger_crash_after_charge = true;
        self
    }

    /// The ledger (budgets, audit log).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Answers one query for `principal` on `dataset` (its latest version), or refuses with the rule.
    /// Every outcome is in the audit log before this returns.
    pub async fn answer(
        &self,
        principal: &str,
        dataset: &str,
        sql: &str,
        options: &QueryOptions,
    ) -> Result<DpAnswer> {
        let mut draft = Draft {
            principal: principal.to_owned(),
            origin: options.origin.clone(),
            dataset: dataset.to_owned(),
            version: String::new(),
            sql: sql.to_owned(),
            plan_hash: String::new(),
        };
        match self.answer_inner(&mut draft, options).await {
            Ok(a) => Ok(a),
            // The ledger recorded this outcome in its own transaction.
            Err(Failure::Recorded(e)) => Err(e),
            Err(Failure::Unrecorded(Error::Refused { rule, message })) => {
                self.ledger.refuse(&draft, &rule, &message)?;
                Err(Error::Refused { rule, message })
            }
            Err(Failure::Unrecorded(e)) => {
                // Planning errors name only what the user wrote; execution errors may quote a row's
                // value (a failed cast, say), so the user gets the kind of failure, never its text.
                let (rule, message) = match &e {
                    Error::DataFusion(df) => match df.find_root() {
                        datafusion::error::DataFusionError::Plan(m) => ("plan", m.clone()),
                        datafusion::error::DataFusionError::SchemaError(..) => ("plan", df.find_root().to_string()),
                        _ => ("execution", "the query failed while running (for example a cast that does not fit every value); it cost nothing".to_owned()),
                    },
                    _ => ("error", "the query failed inside the enclave; it cost nothing".to_owned()),
                };
                self.ledger.refuse(&draft, rule, &message)?;
                if rule == "error" {
                    Err(e)
                } else {
                    Err(Error::Refused {
                        rule: rule.into(),
                        message,
                    })
                }
            }
        }
    }

    async fn answer_inner(
        &self,
        draft: &mut Draft,
        options: &QueryOptions,
    ) -> Result<DpAnswer, Failure> {
        let version = match self.catalog.version(&draft.dataset, None) {
            Ok(v) => v,
            Err(catalog::Error::UnknownDataset(_)) => {
                return Err(Failure::refused(
                    "catalog",
                    format!("no dataset '{}'", draft.dataset),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        draft.version = version.version.version.clone();
        let Some(budget) = self.ledger.budget(&draft.principal, &draft.dataset)? else {
            return Err(Failure::refused(
                "access",
                format!(
                    "{} has no grant on dataset '{}'",
                    draft.principal, draft.dataset
                ),
            ));
        };
        let analyzed = query::analyze(&draft.sql, &version)?;
        // The dataset's policy decides the accounting; the budget must be in its unit.
        let accounting = if version.version.accounting == "zcdp" {
            Accounting::Zcdp
        } else {
            Accounting::Basic
        };
        if accounting == Accounting::Zcdp && budget.rho.is_none() {
            return Err(Failure::refused(
                "budget",
                format!(
                    "dataset '{}' is accounted in ρ (zCDP) and this grant has no ρ budget",
                    draft.dataset
                ),
            ));
        }
        let total = options.epsilon.unwrap_or(self.default_epsilon);
        let delta = options.delta.unwrap_or(self.default_delta);
        if !(total > 0.0 && total.is_finite() && (0.0..1.0).contains(&delta)) {
            return Err(Failure::refused(
                "options",
                "ε (or ρ) must be positive and δ within [0, 1)",
            ));
        }
        // Cheap pre-check; the ledger's transaction is the authority.
        let left = match accounting {
            Accounting::Basic => budget.epsilon_left(),
            Accounting::Zcdp => (budget.rho.unwrap_or(0.0) - budget.spent_rho).max(0.0),
        };
        if total > left + 1e-12 {
            let unit = if accounting == Accounting::Zcdp {
                "ρ"
            } else {
                "ε"
            };
            return Err(Failure::refused(
                "budget",
                format!("budget exhausted: {left:.6} {unit} left, query needs {total:.6}"),
            ));
        }
        let k = i64::from(version.version.max_contributions.max(1));
        let plan = Plan::new(&analyzed, k)?;
        draft.plan_hash = hex::encode(digest(
            &SHA256,
            format!("{}\n{}\n{}", plan.aggregate_sql, analyzed.post, k).as_bytes(),
        ));

        let indexed = plan.bounding == (Bounding::Weight { indexed: true });
        let clock = std::time::Instant::now();
        let ctx = self.session(&version, &analyzed.tables, indexed).await?;
        let t_session = clock.elapsed();
        let exact = ctx.sql(&plan.aggregate_sql).await?.collect().await?;
        let exact = arrow::compute::concat_batches(&plan_schema(&exact)?, &exact)?;
        let t_exact = clock.elapsed();
        let released = self.noise(&analyzed, &plan, &exact, k, total, delta, accounting)?;
        let t_noise = clock.elapsed();

        let cost = released.cost;
        let charged = self.ledger.charge(draft, cost).map_err(Failure::Recorded)?;
        let t_charge = clock.elapsed();
        if self.danger_crash_after_charge {
            std::process::abort();
        }
        let (batch, noise) = post_process(&analyzed, released).await?;
        tracing::debug!(
            bounding = ?plan.bounding,
            session = ?t_session,
            exact = ?t_exact - t_session,
            noise = ?t_noise - t_exact,
            charge = ?t_charge - t_noise,
            post = ?clock.elapsed() - t_charge,
            "answered"
        );
        Ok(DpAnswer {
            batch,
            noise,
            cost,
            cost_split: plan
                .split_names
                .clone()
                .into_iter()
                .zip(plan.noises.lock_noises())
                .collect(),
            epsilon_delta_equivalent: (accounting == Accounting::Zcdp).then(|| {
                // zCDP ρ implies (ρ + 2√(ρ ln(1/δ)), δ)-DP for every δ > 0 [Bun & Steinke 2016, Prop. 1.3];
                // a private key selection's own δ adds to it (approximate zCDP).
                let d = if charged.budget.delta > 0.0 {
                    charged.budget.delta
                } else {
                    self.default_delta
                };
                (
                    cost.rho + 2.0 * (cost.rho * (1.0 / d).ln()).sqrt(),
                    d + cost.delta,
                )
            }),
            budget: charged.budget,
            audit_seq: charged.record.seq,
        })
    }

    /// The session for `version`, with `tables` registered: the indexed copies when `indexed`. Sessions
    /// are kept per version, so a table's footer is read once per engine, not once per query.
    async fn session(
        &self,
        version: &VersionEntry,
        tables: &[String],
        indexed: bool,
    ) -> Result<SessionContext> {
        let key = (
            version.version.dataset.clone(),
            version.version.version.clone(),
            indexed,
        );
        let ctx = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_insert_with(|| crate::storage::session(self.keystore.clone()))
            .clone();
        let dir = self.root.join(&version.version.storage_path);
        for t in tables {
            if ctx.table_exist(t.as_str())? {
                continue;
            }
            let file = if indexed {
                index::ensure(&self.root, version, t, &self.keystore).await?
            } else {
                let entry = version
                    .version
                    .tables
                    .iter()
                    .find(|e| &e.name == t)
                    .ok_or_else(|| Error::Internal(format!("table {t} vanished")))?;
                dir.join(&entry.file)
            };
            crate::storage::register_table(&ctx, t, &file).await?;
        }
        Ok(ctx)
    }
}

fn plan_schema(batches: &[RecordBatch]) -> Result<Arc<Schema>> {
    batches
        .first()
        .map(|b| b.schema())
        .ok_or_else(|| Error::Internal("aggregate returned no batch".into()))
}

/// Why a query was not answered, and whether the audit log has it already.
enum Failure {
    /// Not yet in the audit log: `answer` records it.
    Unrecorded(Error),
    /// Recorded by the ledger's charge transaction.
    Recorded(Error),
}

impl Failure {
    fn refused(rule: &str, message: impl Into<String>) -> Failure {
        Failure::Unrecorded(Error::Refused {
            rule: rule.to_owned(),
            message: message.into(),
        })
    }
}

impl<E: Into<Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Unrecorded(e.into())
    }
}

/// How each person's contribution is bounded to `k` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bounding {
    /// Up to `k` of a person's rows, chosen at random (quantiles need real values; grouped
    /// `COUNT(DISTINCT person_id)` and privately selected keys need each person in at most `k` groups).
    Sample,
    /// Every row of a person with `n > k` rows weighs `k / n`, so a person's rows weigh `min(n, k)` in
    /// all: the sensitivity of sampling `k` rows, without its sampling error. `n` is the person's rows in
    /// the query's relation: read from the per-person contribution index when the query has no WHERE (a
    /// join on `person_id` multiplies the tables' counts), counted per query otherwise.
    Weight { indexed: bool },
}

/// The SQL that computes the exact, bounded aggregates, and how the ε is split.
struct Plan {
    aggregate_sql: String,
    bounding: Bounding,
    split_names: Vec<String>,
    noises: NoiseLog,
}

/// The noise of each mechanism, in the order of `split_names`.
#[derive(Default)]
struct NoiseLog(std::sync::Mutex<Vec<Noise>>);

impl NoiseLog {
    fn push(&self, n: Noise) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(n);
    }
    fn lock_noises(&self) -> Vec<Noise> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn float_lit(x: f64) -> String {
    format!("{x:?}")
}

impl Plan {
    fn new(a: &Analyzed, k: i64) -> Result<Plan> {
        let sampled = !a.groups.is_empty()
            && (!a.public_groups() || a.aggregates.iter().any(|x| x.kind == AggKind::CountPersons))
            || a.aggregates
                .iter()
                .any(|x| matches!(x.kind, AggKind::Quantile(_)));
        let bounding = if sampled {
            Bounding::Sample
        } else {
            Bounding::Weight {
                indexed: a.selection.is_none(),
            }
        };
        let mut inner = Vec::new();
        for (i, g) in a.groups.iter().enumerate() {
            inner.push(format!("{g} AS __g{i}"));
        }
        for (j, agg) in a.aggregates.iter().enumerate() {
            if let Some(arg) = &agg.arg {
                inner.push(format!("{arg} AS __v{j}"));
            }
        }
        inner.push(format!("{} AS __pid", a.person));
        let indexed = bounding == (Bounding::Weight { indexed: true });
        if let (true, [t]) = (indexed, a.aliases.as_slice()) {
            inner.push(format!("{t}.{WEIGHT_COLUMN} AS __w"));
        } else if indexed {
            // Rows per person in the joined relation: the product of the tables' per-person counts.
            let n = a
                .aliases
                .iter()
                .map(|t| format!("CAST({t}.{ROWS_COLUMN} AS DOUBLE)"))
                .collect::<Vec<_>>()
                .join(" * ");
            inner.push(format!("{n} AS __pn"));
        }
        let mut sql = format!("SELECT {} FROM {}", inner.join(", "), a.from);
        let mut conditions: Vec<String> = a.selection.iter().map(|w| format!("({w})")).collect();
        if a.public_groups() && !indexed {
            // Rows outside a declared domain are not counted: the released keys are exactly the domain's.
            // (With indexed weights, which do not depend on the filter, the groups outside the domain are
            // computed and never released: the same values, without a string filter over every row.)
            for (g, d) in a.groups.iter().zip(&a.group_domains) {
                let list = d
                    .iter()
                    .flatten()
                    .map(|v| format!("'{}'", v.replace('\'', "''")))
                    .collect::<Vec<_>>()
                    .join(", ");
                conditions.push(format!("({g}) IN ({list})"));
            }
        }
        if !conditions.is_empty() {
            sql += &format!(" WHERE {}", conditions.join(" AND "));
        }
        let weighted = bounding != Bounding::Sample;
        // Per-query weights (WHERE) are computed over (group, person) cells: every aggregate here is a sum
        // over rows, so each cell's partial sums, weighted by its person's weight, give the same figures as
        // weighting row by row, and the person totals come from a window over the cells, not the rows.
        let cells = bounding == (Bounding::Weight { indexed: false });
        let partials = std::cell::RefCell::new(Vec::<String>::new());
        let partial = |agg: String| {
            let mut p = partials.borrow_mut();
            let i = p.len();
            p.push(format!("{agg} AS __p{i}"));
            format!("COALESCE(SUM(__w * __p{i}), 0.0)")
        };
        // Counting a row: 1 when sampled, its weight when weighted.
        let count_if = |cond: Option<String>| match (weighted, cond) {
            (false, None) => "COUNT(*)".to_owned(),
            (false, Some(c)) => format!("COUNT({c})"),
            (true, None) if cells => "COALESCE(SUM(__w * __c), 0.0)".to_owned(),
            (true, Some(c)) if cells => partial(format!("COUNT({c})")),
            (true, None) => "COALESCE(SUM(__w), 0.0)".to_owned(),
            (true, Some(c)) => {
                format!("COALESCE(SUM(CASE WHEN {c} IS NOT NULL THEN __w END), 0.0)")
            }
        };
        let sum_of = |x: &str| {
            if cells {
                partial(format!("SUM({x})"))
            } else if weighted {
                format!("COALESCE(SUM(__w * ({x})), 0.0)")
            } else {
                format!("COALESCE(SUM({x}), 0.0)")
            }
        };
        let mut outs: Vec<String> = (0..a.groups.len()).map(|i| format!("__g{i}")).collect();
        outs.push(format!("{} AS __n", count_if(None)));
        let mut split_names = Vec::new();
        if !a.groups.is_empty() && !a.public_groups() {
            let counted = a.aggregates.iter().any(|x| x.kind == AggKind::CountRows);
            split_names.push(
                if counted {
                    "group selection + COUNT(*)"
                } else {
                    "group selection"
                }
                .to_owned(),
            );
        }
        for (j, agg) in a.aggregates.iter().enumerate() {
            let clamp = agg.bounds.map(|(l, u)| {
                let x = format!("CAST(__v{j} AS DOUBLE)");
                format!(
                    "CASE WHEN {x} < {l} THEN {l} WHEN {x} > {u} THEN {u} ELSE {x} END",
                    l = float_lit(l),
                    u = float_lit(u)
                )
            });
            let c = clamp.clone().unwrap_or_default();
            let v = format!("__v{j}");
            match agg.kind {
                AggKind::CountRows => {
                    if a.groups.is_empty() || a.public_groups() {
                        split_names.push(agg.key.clone());
                    }
                }
                AggKind::CountValues => {
                    outs.push(format!("{} AS __cnt{j}", count_if(Some(v))));
                    split_names.push(agg.key.clone());
                }
                AggKind::CountPersons => {
                    outs.push(format!("COUNT(DISTINCT __pid) AS __pers{j}"));
                    split_names.push(agg.key.clone());
                }
                AggKind::Sum => {
                    outs.push(format!("{} AS __sum{j}", sum_of(&c)));
                    split_names.push(agg.key.clone());
                }
                AggKind::Avg => {
                    let center = agg.bounds.map_or(0.0, |(l, u)| (l + u) / 2.0);
                    outs.push(format!(
                        "{} AS __csum{j}",
                        sum_of(&format!("({c}) - {}", float_lit(center)))
                    ));
                    outs.push(format!("{} AS __cnt{j}", count_if(Some(v))));
                    split_names.push(format!("{} (sum)", agg.key));
                    split_names.push(format!("{} (count)", agg.key));
                }
                AggKind::Variance | AggKind::Stddev => {
                    outs.push(format!("{} AS __sum{j}", sum_of(&c)));
                    outs.push(format!("{} AS __sq{j}", sum_of(&format!("({c}) * ({c})"))));
                    outs.push(format!("{} AS __cnt{j}", count_if(Some(v))));
                    split_names.push(format!("{} (sum)", agg.key));
                    split_names.push(format!("{} (sum of squares)", agg.key));
                    split_names.push(format!("{} (count)", agg.key));
                }
                AggKind::Quantile(_) => {
                    outs.push(format!(
                        "ARRAY_AGG({c}) FILTER (WHERE __v{j} IS NOT NULL) AS __arr{j}"
                    ));
                    split_names.push(agg.key.clone());
                }
            }
        }
        let group_by = if a.groups.is_empty() {
            String::new()
        } else {
            format!(
                " GROUP BY {}",
                (0..a.groups.len())
                    .map(|i| format!("__g{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let weight =
            format!("CASE WHEN __pn <= {k} THEN 1.0 ELSE {k}.0 / CAST(__pn AS DOUBLE) END AS __w");
        let (with, bounded) = match bounding {
            Bounding::Sample => (
                String::new(),
                format!(
                    "SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY __pid ORDER BY random()) AS __rn FROM ({sql}) AS __i) AS __r WHERE __rn <= {k}"
                ),
            ),
            // The index holds the weight itself.
            Bounding::Weight { indexed: true } if a.aliases.len() == 1 => {
                (String::new(), format!("SELECT * FROM ({sql}) AS __i"))
            }
            Bounding::Weight { indexed: true } => (
                String::new(),
                format!("SELECT *, {weight} FROM ({sql}) AS __i"),
            ),
            Bounding::Weight { indexed: false } => {
                let keys: String = (0..a.groups.len()).map(|i| format!("__g{i}, ")).collect();
                let parts: String = partials.borrow().iter().map(|p| format!(", {p}")).collect();
                (
                    format!(
                        "WITH __cells AS (SELECT {keys}__pid, COUNT(*) AS __c{parts} FROM ({sql}) AS __i GROUP BY {keys}__pid) "
                    ),
                    format!(
                        "SELECT *, {weight} FROM (SELECT *, SUM(__c) OVER (PARTITION BY __pid) AS __pn FROM __cells) AS __y"
                    ),
                )
            }
        };
        let aggregate_sql = format!(
            "{with}SELECT {} FROM ({bounded}) AS __b{group_by}",
            outs.join(", ")
        );
        Ok(Plan {
            aggregate_sql,
            bounding,
            split_names,
            noises: NoiseLog::default(),
        })
    }
}

/// One aggregate's noisy values over the released groups.
struct AggValues {
    values: Vec<f64>,
    /// 95 % interval per group (NaN when none is known).
    intervals: Vec<(f64, f64)>,
    /// Noise scale of the released value (of the sum, for AVG).
    scale: f64,
    /// Released as an integer (counts).
    integer: bool,
    /// How far one person can move the exact value (NaN for derived values: AVG, VARIANCE, quantiles).
    sensitivity: f64,
}

/// The noisy per-group values, before post-processing.
struct Released {
    /// Group-key columns of the released groups.
    groups: Vec<ArrayRef>,
    /// Per aggregate, per released group.
    values: Vec<AggValues>,
    cost: Cost,
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

impl DpEngine {
    #[allow(clippy::too_many_arguments)]
    fn noise(
        &self,
        a: &Analyzed,
        plan: &Plan,
        exact: &RecordBatch,
        k: i64,
        total: f64,
        delta: f64,
        acc: Accounting,
    ) -> Result<Released> {
        // ε is split evenly over the aggregates (private key selection shares COUNT(*)'s part, or takes
        // its own when there is no COUNT(*)), then evenly over an aggregate's own mechanisms (AVG: 2).
        let private_groups = !a.groups.is_empty() && !a.public_groups();
        let has_count_rows = a.aggregates.iter().any(|x| x.kind == AggKind::CountRows);
        let shares = a.aggregates.len() + usize::from(private_groups && !has_count_rows);
        let share = total / shares.max(1) as f64;
        let part = share;
        let off = self.danger_no_noise;
        let mut cost = Cost::default();
        let mut add = |n: &Noise| {
            cost.epsilon += n.epsilon;
            cost.delta += n.delta;
            cost.rho += n.rho;
            plan.noises.push(*n);
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
            for d in a.group_domains.iter().flatten() {
                keys = keys
                    .into_iter()
                    .flat_map(|k| d.iter().map(move |v| [k.clone(), vec![v.clone()]].concat()))
                    .collect();
                if keys.len() > 100_000 {
                    return query::refuse(
                        "group-by",
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
            add(&n);
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
            let part = share
                / match agg.kind {
                    AggKind::Avg => 2.0,
                    AggKind::Variance | AggKind::Stddev => 3.0,
                    _ => 1.0,
                };
            let count_of = |name: &str,
                            sens: i64,
                            add: &mut dyn FnMut(&Noise)|
             -> Result<(Vec<f64>, Noise)> {
                if weighted && !name.starts_with("__pers") {
                    // Sums of weights: a continuous mechanism, then rounded (post-processing).
                    let (v, n) =
                        noise::sums(&pick_f(col_f64(exact, name)?), sens as f64, part, acc, off)?;
                    add(&n);
                    return Ok((v.into_iter().map(f64::round).collect(), n));
                }
                let (v, n) = noise::counts(&pick_i(col_i64(exact, name)?), sens, part, acc, off)?;
                add(&n);
                Ok((v.into_iter().map(|x| x as f64).collect(), n))
            };
            let sum_of =
                |name: &str, sens: f64, add: &mut dyn FnMut(&Noise)| -> Result<(Vec<f64>, Noise)> {
                    let (v, n) = noise::sums(&pick_f(col_f64(exact, name)?), sens, part, acc, off)?;
                    add(&n);
                    Ok((v, n))
                };
            let entry = match agg.kind {
                AggKind::CountRows if private_selection => (
                    noisy_n.clone(),
                    interval(&noisy_n, &n_noise),
                    n_noise.scale,
                    true,
                    n_noise.sensitivity(),
                ),
                AggKind::CountRows => {
                    let (v, n) = count_of("__n", k, &mut add)?;
                    let iv = interval(&v, &n);
                    (v, iv, n.scale, true, n.sensitivity())
                }
                AggKind::CountValues => {
                    let (v, n) = count_of(&format!("__cnt{j}"), k, &mut add)?;
                    let iv = interval(&v, &n);
                    (v, iv, n.scale, true, n.sensitivity())
                }
                AggKind::CountPersons => {
                    let (v, n) = count_of(
                        &format!("__pers{j}"),
                        if n_groups == 0 { 1 } else { k },
                        &mut add,
                    )?;
                    let iv = interval(&v, &n);
                    (v, iv, n.scale, true, n.sensitivity())
                }
                AggKind::Sum => {
                    let (v, n) = sum_of(&format!("__sum{j}"), k as f64 * bound, &mut add)?;
                    let iv = interval(&v, &n);
                    (v, iv, n.scale, false, n.sensitivity())
                }
                AggKind::Avg => {
                    // The sum is of values centred on the middle of the bounds: half the sensitivity.
                    let (lo, hi) = agg.bounds.unwrap_or((0.0, 0.0));
                    let center = (lo + hi) / 2.0;
                    let (s, ns) =
                        sum_of(&format!("__csum{j}"), k as f64 * (hi - lo) / 2.0, &mut add)?;
                    let (c, nc) = count_of(&format!("__cnt{j}"), k, &mut add)?;
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
                    (avg, iv, ns.scale, false, f64::NAN)
                }
                AggKind::Variance | AggKind::Stddev => {
                    let (s, _) = sum_of(&format!("__sum{j}"), k as f64 * bound, &mut add)?;
                    let (q, _) = sum_of(&format!("__sq{j}"), k as f64 * bound * bound, &mut add)?;
                    let (c, nc) = count_of(&format!("__cnt{j}"), k, &mut add)?;
                    let var: Vec<f64> = s
                        .iter()
                        .zip(&q)
                        .zip(&c)
                        .map(|((s, q), c)| {
                            let c = c.max(2.0);
                            ((q - s * s / c) / (c - 1.0)).clamp(0.0, bound * bound)
                        })
                        .collect();
                    let v: Vec<f64> = if agg.kind == AggKind::Stddev {
                        var.iter().map(|x| x.sqrt()).collect()
                    } else {
                        var
                    };
                    let iv = v.iter().map(|_| (f64::NAN, f64::NAN)).collect();
                    (v, iv, nc.scale, false, f64::NAN)
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
                            noise::quantile(&vals, &candidates, alpha, k as u32, part, off)?;
                        out.push(q);
                        total_noise = n;
                    }
                    // Each person's ≤ k values are spread over groups; the map is linear in k, so one
                    // group's cost at d_in = k bounds the total.
                    add(&total_noise);
                    let iv = out.iter().map(|_| (f64::NAN, f64::NAN)).collect();
                    (out, iv, total_noise.scale, false, f64::NAN)
                }
            };
            values.push(AggValues {
                values: entry.0,
                intervals: entry.1,
                scale: entry.2,
                integer: entry.3,
                sensitivity: entry.4,
            });
        }
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
        })
    }
}

async fn post_process(a: &Analyzed, r: Released) -> Result<(RecordBatch, Vec<ColumnNoise>)> {
    let mut fields = Vec::new();
    let mut cols: Vec<ArrayRef> = Vec::new();
    for (i, g) in r.groups.iter().enumerate() {
        fields.push(Field::new(format!("__g{i}"), g.data_type().clone(), true));
        cols.push(g.clone());
    }
    for (
        j,
        AggValues {
            values: v,
            intervals: iv,
            integer,
            ..
        },
    ) in r.values.iter().enumerate()
    {
        if *integer {
            fields.push(Field::new(format!("__a{j}"), DataType::Int64, true));
            cols.push(Arc::new(Int64Array::from(
                v.iter().map(|x| x.round() as i64).collect::<Vec<_>>(),
            )));
        } else {
            fields.push(Field::new(format!("__a{j}"), DataType::Float64, true));
            cols.push(Arc::new(Float64Array::from(v.clone())));
        }
        fields.push(Field::new(format!("__a{j}__lo"), DataType::Float64, true));
        cols.push(Arc::new(Float64Array::from(
            iv.iter().map(|x| x.0).collect::<Vec<_>>(),
        )));
        fields.push(Field::new(format!("__a{j}__hi"), DataType::Float64, true));
        cols.push(Arc::new(Float64Array::from(
            iv.iter().map(|x| x.1).collect::<Vec<_>>(),
        )));
    }
    let schema = Arc::new(Schema::new(fields));
    let noisy = RecordBatch::try_new(schema.clone(), cols)?;
    let ctx = SessionContext::new();
    ctx.register_table(
        "noisy",
        Arc::new(MemTable::try_new(schema, vec![vec![noisy]])?),
    )?;
    let out = ctx.sql(&a.post).await?.collect().await?;
    let out_schema = ctx.sql(&a.post).await?.schema().as_arrow().clone();
    let all = arrow::compute::concat_batches(&Arc::new(out_schema), &out)?;
    let n_user = a.output_aggregates.len();
    let user = all.project(&(0..n_user).collect::<Vec<_>>())?;
    let mut noise = Vec::new();
    let mut hidden = n_user;
    for (i, agg) in a.output_aggregates.iter().enumerate() {
        if let Some(j) = agg {
            let lo = col_f64(&all, all.schema().field(hidden).name())?;
            let hi = col_f64(&all, all.schema().field(hidden + 1).name())?;
            hidden += 2;
            noise.push(ColumnNoise {
                column: user.schema().field(i).name().clone(),
                scale: r.values[*j].scale,
                sensitivity: r.values[*j].sensitivity,
                intervals: lo.into_iter().zip(hi).collect(),
            });
        }
    }
    Ok((user, noise))
}

/// The canonical dataset directory of a version (for tools that read files directly).
pub fn version_dir(root: &Path, v: &VersionEntry) -> PathBuf {
    root.join(&v.version.storage_path)
}
