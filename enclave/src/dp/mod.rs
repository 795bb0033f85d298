//! The differentially private SQL engine: the only way to learn anything about rows.
//!
//! ```text
//!  SQL ─► query (front door: syntax tree vs the refusal rules) ─► DataFusion plans the tree
//!      ─► total (every expression made total, type-checked) ─► plan (bounded aggregation as a plan tree;
//!         post-processing planned over an empty noisy table)        ── nothing has run yet: refusals free
//!      ─► DataFusion: exact aggregates per group ─► release: opendp noise ─► post-processing
//!      ─► ledger: charge + audit record, one transaction ─► answer
//! ```
//!
//! A failure after execution starts cannot come from the query's shape (that was all checked before),
//! so it could only come from the data: the planned cost is charged anyway and the user gets one
//! generic message (rule `execution`), never which row failed.
//!
//! The privacy unit is the person: every table carries `person_id`, each person contributes at most
//! `max_contributions` rows' worth (after joins and WHERE: rows weighted down, or chosen at random where a
//! mechanism needs real rows; see `Bounding`), and every sensitivity follows from that bound and the
//! catalogued value bounds. Group keys are selected privately (released only above a
//! noisy threshold, with δ accounted). Nothing is released before the charge and its audit record commit.

mod index;
pub mod noise;
mod plan;
pub(crate) mod query;
mod release;
pub mod rules;
mod total;

pub use query::dataset_named_in;
pub use rules::Rule;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use catalog::{CatalogStore, SqliteCatalog, VersionEntry};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use ring::digest::{SHA256, digest};
use serde::Serialize;

use crate::audit::Draft;
use crate::keys::Keystore;
use crate::ledger::{Budget, Cost, Ledger};
use crate::{Error, Result};
use noise::{Accounting, Noise};
use plan::{Bounding, Bounds, DpPlan, NoisyTable};

/// Per-query settings.
#[derive(Debug, Clone)]
pub struct QueryOptions {
    /// ε to spend (default: the engine's default, 0.1). Under zCDP: ρ.
    pub epsilon: Option<f64>,
    /// δ for private key selection (default 1e-6).
    pub delta: Option<f64>,
    /// Where the query came from, for the audit log: protocol, peer, session, authorization decision.
    pub via: crate::audit::Via,
    /// How long the query may run (none: no limit). A query stopped by it after execution started is
    /// charged its planned cost (the stop could depend on the data).
    pub timeout: Option<std::time::Duration>,
    /// At most this many rows are released (none: no limit). A larger answer is refused after it was
    /// computed, so its cost is charged.
    pub max_groups: Option<usize>,
}

impl Default for QueryOptions {
    fn default() -> Self {
        QueryOptions {
            epsilon: None,
            delta: None,
            via: crate::audit::Via::local("cli"),
            timeout: None,
            max_groups: None,
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
    /// How the interval is computed (exact from the noise distribution, or the approximation used).
    pub method: String,
}

/// What bounding each person to `k` rows left out of an answer: a DP estimate over the query's whole
/// relation (after WHERE), paid from the query's ε. Intervals describe the bounded values; this says how
/// far those are from the values asked for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Truncation {
    /// Rows left out (each person counted up to `cap_per_person` of them).
    pub rows_left_out: f64,
    /// Rows of the relation (each person counted up to `k + cap_per_person`).
    pub rows: f64,
    /// `rows_left_out / rows`, in [0, 1].
    pub share: f64,
    /// How many left-out rows one person counts for at most (three times `k`): a person with more leaves
    /// out more than the estimate counts, so it is a lower bound.
    pub cap_per_person: f64,
    /// Noise scale of `rows_left_out`.
    pub scale: f64,
    /// Half-width of the 95 % interval of `rows_left_out`.
    pub half_width_95: f64,
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
    /// The receipt: the audit chain's head at that record, signed by the enclave (proof that the query
    /// is on the record, checked with `enclave audit verify --receipt`).
    pub receipt: Option<crate::audit::SignedHead>,
    /// On zCDP datasets: the (ε, δ) the query's ρ implies, at the grant's δ.
    pub epsilon_delta_equivalent: Option<(f64, f64)>,
    /// What bounding left out, when some person may have had more rows than the bound.
    pub truncation: Option<Truncation>,
}

impl DpAnswer {
    /// The rows as display strings (NULL as `None`), the way every front end shows them.
    pub fn rows(&self) -> Vec<Vec<Option<String>>> {
        let b = &self.batch;
        let mut rows = vec![Vec::with_capacity(b.num_columns()); b.num_rows()];
        for c in b.columns() {
            for (r, row) in rows.iter_mut().enumerate() {
                row.push((!arrow::array::Array::is_null(c, r)).then(|| {
                    arrow::util::display::array_value_to_string(c, r).unwrap_or_default()
                }));
            }
        }
        rows
    }

    /// What a reader needs beside the rows, one line each: every noisy column's scale and interval
    /// method, what bounding left out, the cost and the budget left, the audit record and its receipt (`enclave sql`
    /// prints them under the table; the Postgres listener sends them as a NOTICE).
    pub fn summary_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for n in &self.noise {
            lines.push(format!(
                "noise: {} has scale {:.4}; interval {}",
                n.column, n.scale, n.method
            ));
        }
        if let Some(t) = &self.truncation {
            lines.push(format!(
                "truncation: bounding left out at least about {:.1} % (± {:.1}) of the rows this query covers \
                 (a DP estimate; each person counts for at most {:.0} left-out rows); the intervals describe the bounded values",
                100.0 * t.share,
                100.0 * t.half_width_95 / t.rows.max(1.0),
                t.cap_per_person
            ));
        }
        if self.cost.rho > 0.0 {
            let (e, d) = self
                .epsilon_delta_equivalent
                .unwrap_or((f64::NAN, f64::NAN));
            lines.push(format!(
                "cost: ρ {:.6} (≈ ε {e:.4} at δ {d:.1e}); budget left: ρ {:.6}",
                self.cost.rho,
                self.budget.rho.unwrap_or(0.0) - self.budget.spent_rho
            ));
        } else {
            lines.push(format!(
                "cost: ε {:.6}, δ {:.2e}; budget left: ε {:.6}, δ {:.2e}",
                self.cost.epsilon,
                self.cost.delta,
                self.budget.epsilon_left(),
                (self.budget.delta - self.budget.spent_delta).max(0.0)
            ));
        }
        lines.push(format!("audit record #{}", self.audit_seq));
        if let Some(r) = &self.receipt {
            lines.push(format!(
                "receipt: {}",
                serde_json::to_string(r).unwrap_or_default()
            ));
        }
        lines
    }

    /// The answer as JSON (`enclave sql --json` and the HTTP API): columns, rows, each column's noise
    /// and intervals, the cost and its split, the budget after it, truncation, the audit record and its
    /// signed receipt.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "columns": self.batch.schema().fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>(),
            "rows": self.rows(),
            "noise": self.noise,
            "cost": self.cost,
            "cost_split": self.cost_split.iter().map(|(what, n)| serde_json::json!({
                "what": what, "epsilon": n.epsilon, "delta": n.delta, "rho": n.rho, "scale": n.scale,
            })).collect::<Vec<_>>(),
            "budget": self.budget,
            "epsilon_delta_equivalent": self.epsilon_delta_equivalent,
            "truncation": self.truncation,
            "audit_seq": self.audit_seq,
            "receipt": self.receipt,
        })
    }
}

/// Why an accepted query stopped while running (either way its planned cost is charged).
enum Stopped {
    /// An error (could only depend on the data): the user learns only that it failed.
    Failed(Error),
    /// A limit of the caller's (time, rows): named to the user.
    Limit(String),
}

impl<E: Into<Error>> From<E> for Stopped {
    fn from(e: E) -> Stopped {
        Stopped::Failed(e.into())
    }
}

/// The engine over one data directory.
pub struct DpEngine {
    root: PathBuf,
    keystore: Arc<Keystore>,
    catalog: SqliteCatalog,
    ledger: Arc<Ledger>,
    default_epsilon: f64,
    default_delta: f64,
    danger_no_noise: bool,
    #[cfg(feature = "danger-test-hooks")]
    danger_crash_after_charge: bool,
    /// DataFusion sessions per (dataset, version), tables (and their indexed copies) registered as
    /// first used.
    sessions: std::sync::Mutex<HashMap<(String, String), SessionContext>>,
    /// The memory pool of each query's execution, in bytes (none: unbounded).
    memory_limit: Option<usize>,
    /// Partitions a query runs in (none: DataFusion's default, one per core).
    partitions: Option<usize>,
    /// Per (version directory, tables joined, k): the exact figures of the truncation estimate over
    /// their whole join (rows left out, rows), computed from their indexes once.
    truncation_totals: std::sync::Mutex<TruncationTotals>,
    /// What running queries have planned to spend, per (principal, dataset): (ε or ρ, δ).
    held: Arc<std::sync::Mutex<Held>>,
    /// Taken while tables are registered in a session: two first queries of a version at once would
    /// otherwise both register a table, and the second fail.
    registering: tokio::sync::Mutex<()>,
}

/// Planned costs of running queries, per (principal, dataset).
type Held = HashMap<(String, String), (f64, f64)>;

/// A running query's planned cost, held against its budget until it is charged (dropped after).
struct Hold {
    held: Arc<std::sync::Mutex<Held>>,
    key: (String, String),
    amount: (f64, f64),
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = held.get_mut(&self.key) {
            h.0 -= self.amount.0;
            h.1 -= self.amount.1;
            if h.0 <= 1e-12 && h.1 <= 1e-18 {
                held.remove(&self.key);
            }
        }
    }
}

impl DpEngine {
    /// Opens the engine on an initialised data directory.
    pub fn open(dir: &crate::DataDir) -> Result<DpEngine> {
        let keystore = Arc::new(dir.keystore()?);
        let ledger = Arc::new(dir.ledger(&keystore)?);
        Ok(DpEngine {
            root: dir.root().to_owned(),
            catalog: dir.catalog()?,
            keystore,
            ledger,
            default_epsilon: 0.1,
            default_delta: 1e-6,
            danger_no_noise: false,
            #[cfg(feature = "danger-test-hooks")]
            danger_crash_after_charge: false,
            sessions: std::sync::Mutex::new(HashMap::new()),
            memory_limit: None,
            partitions: None,
            truncation_totals: std::sync::Mutex::new(HashMap::new()),
            held: Arc::new(std::sync::Mutex::new(HashMap::new())),
            registering: tokio::sync::Mutex::new(()),
        })
    }

    /// Bounds the memory each query's execution may use (a DataFusion memory pool of its own; nothing
    /// spills to disk): a query that needs more stops, is charged (it ran) and says which limit
    /// stopped it.
    pub fn with_memory_limit(mut self, bytes: usize) -> DpEngine {
        self.memory_limit = Some(bytes);
        self
    }

    /// Runs each query in `n` partitions. A server answering many queries at once gains from one each
    /// (no repartitioning; the concurrent queries use the cores); `enclave sql` keeps one per core.
    pub fn with_partitions(mut self, n: usize) -> DpEngine {
        self.partitions = Some(n.max(1));
        self
    }

    /// Turns noise off while keeping every other step (bounding, clamping, accounting, audit). Only for
    /// tests that measure sensitivity: compiled only with the `danger-test-hooks` feature.
    #[cfg(feature = "danger-test-hooks")]
    pub fn danger_without_noise(mut self) -> DpEngine {
        self.danger_no_noise = true;
        self
    }

    /// Fault injection for the crash test: the process aborts right after a query's charge and audit record
    /// commit, before its answer is released. The binary sets it only when
    /// `ENCLAVE_DANGER_CRASH_AFTER_CHARGE` is set, and only with the `danger-test-hooks` feature.
    #[cfg(feature = "danger-test-hooks")]
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
        let mut draft = Draft::query(principal, &options.via, dataset, sql);
        match self.answer_inner(&mut draft, options).await {
            Ok(a) => Ok(a),
            // The ledger recorded this outcome in its own transaction.
            Err(Failure::Recorded(e)) => Err(e),
            Err(Failure::Unrecorded(Error::Refused { rule, message, .. })) => {
                let record = self.refuse(draft, rule.name(), &message).await?;
                Err(Error::Refused {
                    rule,
                    message,
                    receipt: record.receipt().map(Box::new),
                })
            }
            Err(Failure::Unrecorded(e)) => {
                // Before execution: a bug of the engine's, not the query's; nothing ran, nothing is
                // charged. The user learns only that it failed.
                tracing::error!(error = %e, "query failed before execution");
                self.refuse(draft, "error", "the query failed inside the enclave")
                    .await?;
                Err(Error::Internal(
                    "the query failed inside the enclave; it cost nothing".into(),
                ))
            }
        }
    }

    /// Records a refusal of the request `draft` describes (free) and returns its record, without holding
    /// an async worker while the record is made durable.
    pub async fn refuse(
        &self,
        draft: Draft,
        rule: &str,
        message: &str,
    ) -> Result<crate::audit::Record> {
        let (rule, message) = (rule.to_owned(), message.to_owned());
        self.on_ledger(move |ledger| ledger.refuse(&draft, &rule, &message))
            .await
    }

    /// Runs `write`, a ledger transaction that waits for the disk (`synchronous = FULL`), on the
    /// runtime's blocking pool instead of an async worker (outside a runtime, in place). It runs to its
    /// end even if the caller stops waiting: a charge is never half made (and whatever must last until
    /// it commits, such as a budget hold, moves into `write`).
    async fn on_ledger<T: Send + 'static>(
        &self,
        write: impl FnOnce(&Ledger) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let ledger = Arc::clone(&self.ledger);
        if tokio::runtime::Handle::try_current().is_err() {
            return write(&ledger);
        }
        tokio::task::spawn_blocking(move || write(&ledger))
            .await
            .map_err(|e| Error::Internal(format!("the ledger's task failed: {e}")))?
    }

    /// What a query would answer, without running it: the columns of its answer, after every check
    /// that comes before execution (the grant, the front door, DataFusion's planning and type checks,
    /// totality, the bounded plan, the post-processing plan). Nothing is read from the tables, charged
    /// or recorded; a refusal names its rule as `answer` would. Prepared statements use it.
    pub async fn prepare(
        &self,
        principal: &str,
        dataset: &str,
        sql: &str,
        options: &QueryOptions,
    ) -> Result<Prepared> {
        let mut draft = Draft::query(principal, &options.via, dataset, sql);
        match self.plan_query(&mut draft, options).await {
            Ok(p) => {
                let schema = p.dry.plan.schema().as_arrow().clone();
                let fields: Vec<_> = schema
                    .fields()
                    .iter()
                    .take(p.dry.shows.len())
                    .cloned()
                    .collect();
                let noisy_columns = p
                    .dry
                    .shows
                    .iter()
                    .zip(schema.fields())
                    .filter(|(shows, _)| shows.is_some())
                    .map(|(_, f)| f.name().clone())
                    .collect();
                Ok(Prepared {
                    noisy_columns,
                    schema: Arc::new(arrow::datatypes::Schema::new(fields)),
                    version: draft.version,
                    cost: planned_cost(&p.dp, p.total, p.delta, p.accounting),
                })
            }
            Err(Failure::Recorded(e) | Failure::Unrecorded(e @ Error::Refused { .. })) => Err(e),
            Err(Failure::Unrecorded(e)) => {
                tracing::error!(error = %e, "query failed to prepare");
                Err(Error::Internal(
                    "the query failed inside the enclave".into(),
                ))
            }
        }
    }

    /// Every stage before execution, shared by `answer` and `prepare`.
    async fn plan_query(
        &self,
        draft: &mut Draft,
        options: &QueryOptions,
    ) -> Result<Planned, Failure> {
        let version = match self.catalog.version(&draft.dataset, None) {
            Ok(v) => v,
            Err(catalog::Error::UnknownDataset(_)) => {
                return Err(Failure::refused(
                    Rule::Catalog,
                    format!("no dataset '{}'", draft.dataset),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        draft.version = version.version.version.clone();
        let Some(budget) = self.ledger.budget(&draft.principal, &draft.dataset)? else {
            return Err(Failure::refused(
                Rule::Access,
                format!(
                    "{} has no grant on dataset '{}'",
                    draft.principal, draft.dataset
                ),
            ));
        };
        if budget.expired(chrono::Utc::now()) {
            return Err(Failure::refused(
                Rule::Access,
                format!(
                    "the grant of {} on dataset '{}' ended at {}",
                    draft.principal,
                    draft.dataset,
                    budget.expires_at.as_deref().unwrap_or("")
                ),
            ));
        }
        let (total, delta) = self.options(options)?;
        let analyzed = query::analyze(&draft.sql, &version)?;
        // The dataset's policy decides the accounting; the budget must be in its unit.
        let accounting = if version.version.accounting == "zcdp" {
            Accounting::Zcdp
        } else {
            Accounting::Basic
        };
        if accounting == Accounting::Zcdp && budget.rho.is_none() {
            return Err(Failure::refused(
                Rule::Budget,
                format!(
                    "dataset '{}' is accounted in ρ (zCDP) and this grant has no ρ budget",
                    draft.dataset
                ),
            ));
        }
        let bounds = contribution_bounds(&version, &analyzed.tables)?;

        // Planning: DataFusion plans the validated syntax tree (never text); type coercion makes every
        // implicit cast explicit; then every expression is made total and the bounded plan is built.
        let ctx = self.session(&version, &analyzed.tables).await?;
        let state = ctx.state();
        let statement =
            datafusion::sql::parser::Statement::Statement(Box::new(analyzed.statement.clone()));
        let type_error = || {
            Failure::refused(
                Rule::Type,
                "the query does not type-check against the dataset's columns (compare and combine values of matching types)",
            )
        };
        let user = state
            .statement_to_plan(statement)
            .await
            .map_err(|_| type_error())?;
        let user = state
            .analyzer()
            .execute_and_check(user, state.config_options(), |_, _| {})
            .map_err(|_| type_error())?;
        let user = total::plan(user)?;
        let dp = plan::build(user, &analyzed, &version)?;
        let bounds = dp.bounds(bounds);
        // Post-processing is planned over an empty noisy table now, while a failure is still free.
        let empty = NoisyTable::empty(&dp.aggregate_types(), dp.aggregates.len())?;
        let dry = dp.post(&empty)?;
        if state.create_physical_plan(&dry.plan).await.is_err() {
            return Err(Failure::refused(
                Rule::PostProcessing,
                "HAVING, ORDER BY, LIMIT or the SELECT list do not plan over the noisy aggregates (check the types of the expressions over them)",
            ));
        }
        Ok(Planned {
            version,
            tables: analyzed.tables,
            dp,
            bounds,
            dry,
            ctx,
            total,
            delta,
            accounting,
        })
    }

    async fn answer_inner(
        &self,
        draft: &mut Draft,
        options: &QueryOptions,
    ) -> Result<DpAnswer, Failure> {
        let clock = std::time::Instant::now();
        let Planned {
            version,
            tables,
            dp,
            bounds,
            dry,
            ctx,
            total,
            delta,
            accounting,
        } = self.plan_query(draft, options).await?;
        // The planned cost is held against the budget while the query runs, so that its charge
        // afterwards always fits: a limit hit or failure is then charged in full, never capped to nothing
        // by queries that ran beside it. (The ledger's transaction stays the authority across processes.)
        let planned = planned_cost(&dp, total, delta, accounting);
        // Held until the charge has committed (released inside the ledger's task, so a caller that
        // stops waiting cannot free it while the charge is still being made).
        let held = self.hold(draft, accounting, planned)?;
        let index = if dp.bounding == (Bounding::Weight { indexed: true }) {
            self.index_scans(&ctx, &version, &tables).await?
        } else {
            HashMap::new()
        };
        let exact_plan = dp.exact(bounds, &index)?;
        let state = ctx.state();
        let exact_physical = state.create_physical_plan(&exact_plan).await?;
        draft.plan_hash = plan_hash(&exact_plan, &dry.plan, bounds);
        let t_plan = clock.elapsed();

        // Execution: from here a failure is charged (it could only depend on the data).
        let run = async {
            // Read from the indexes, what bounding leaves out is the tables' own figure (cached).
            let truncation_totals = if bounds.truncates && !index.is_empty() {
                Some(
                    self.truncation_totals(&ctx, &version, &tables, bounds)
                        .await?,
                )
            } else {
                None
            };
            let settings = release::Settings {
                bounds,
                truncation_totals,
                total,
                delta,
                accounting,
                danger_no_noise: self.danger_no_noise,
            };
            // The query's own memory pool: what it needs cannot make another query fail.
            let task = datafusion::execution::TaskContext::from(&state)
                .with_runtime(crate::storage::query_runtime(&ctx, self.memory_limit));
            let exact = datafusion::physical_plan::collect(exact_physical, Arc::new(task)).await?;
            let exact = concat(&exact_plan, &exact)?;
            let released = release::release(&dp, &exact, &settings)?;
            let table = release::noisy_table(&dp, &released)?;
            let post = dp.post(&table)?;
            let (batch, intervals) = plan::run_post(&ctx, &post, dp.aggregates.len()).await?;
            let noise = post
                .shows
                .iter()
                .enumerate()
                .filter_map(|(i, j)| j.map(|j| (i, j)))
                .map(|(i, j)| ColumnNoise {
                    column: batch.schema().field(i).name().clone(),
                    scale: released.values[j].scale,
                    sensitivity: released.values[j].sensitivity,
                    method: released.values[j].method.clone(),
                    intervals: intervals[j]
                        .0
                        .iter()
                        .copied()
                        .zip(intervals[j].1.iter().copied())
                        .collect(),
                })
                .collect::<Vec<_>>();
            if let Some(max) = options.max_groups.filter(|&m| batch.num_rows() > m) {
                return Err(Stopped::Limit(format!(
                    "the answer has more than {max} rows, the most the gateway releases; its cost was charged (group by fewer values, or filter)"
                )));
            }
            Ok::<_, Stopped>((
                batch,
                noise,
                released.cost,
                released.split,
                released.truncation,
            ))
        };
        let outcome = match options.timeout {
            Some(limit) => tokio::time::timeout(limit, run).await.unwrap_or_else(|_| {
                Err(Stopped::Limit(format!(
                    "the query ran past the time limit of {} s; its cost was charged",
                    limit.as_secs_f64()
                )))
            }),
            None => run.await,
        };
        let (batch, noise, cost, split, truncation) = match outcome {
            Ok(r) => r,
            Err(stopped) => {
                let message = match stopped {
                    Stopped::Failed(Error::DataFusion(e))
                        if matches!(
                            e.find_root(),
                            datafusion::error::DataFusionError::ResourcesExhausted(_)
                        ) =>
                    {
                        let limit = self.memory_limit.unwrap_or(0);
                        let limit = if limit >= 1024 * 1024 {
                            format!("{} MiB", limit / (1024 * 1024))
                        } else {
                            format!("{limit} bytes")
                        };
                        format!(
                            "the query needed more memory than the limit of {limit}; its cost was charged"
                        )
                    }
                    Stopped::Failed(e) => {
                        tracing::error!(error = %e, "an accepted query failed while running; charged");
                        "the query failed while running; its cost was charged".to_owned()
                    }
                    Stopped::Limit(m) => m,
                };
                let record = {
                    let (draft, message) = (draft.clone(), message.clone());
                    self.on_ledger(move |ledger| {
                        let charged = ledger.charge_failure(&draft, planned, &message);
                        drop(held);
                        charged
                    })
                    .await
                    .map_err(Failure::Recorded)?
                };
                return Err(Failure::Recorded(Error::Refused {
                    rule: Rule::Execution,
                    message,
                    receipt: record.receipt().map(Box::new),
                }));
            }
        };
        let t_run = clock.elapsed();
        let charged = {
            let draft = draft.clone();
            self.on_ledger(move |ledger| {
                let charged = ledger.charge(&draft, cost);
                drop(held);
                charged
            })
            .await
            .map_err(Failure::Recorded)?
        };
        #[cfg(feature = "danger-test-hooks")]
        if self.danger_crash_after_charge {
            std::process::abort();
        }
        tracing::debug!(
            bounding = ?dp.bounding,
            plan = ?t_plan,
            run = ?t_run - t_plan,
            charge = ?clock.elapsed() - t_run,
            "answered"
        );
        Ok(DpAnswer {
            batch,
            noise,
            cost,
            cost_split: split,
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
            receipt: charged.record.receipt(),
            truncation,
        })
    }

    /// Holds `planned` against the principal's budget on the dataset while the query runs, or refuses
    /// (rule `budget`) when what is left, less what running queries hold, does not cover it.
    fn hold(&self, draft: &Draft, accounting: Accounting, planned: Cost) -> Result<Hold, Failure> {
        let key = (draft.principal.clone(), draft.dataset.clone());
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self
            .ledger
            .budget(&draft.principal, &draft.dataset)?
            .ok_or_else(|| Failure::refused(Rule::Access, "the grant was removed"))?;
        let (main, unit, left) = match accounting {
            Accounting::Basic => (planned.epsilon, "ε", budget.epsilon_left()),
            Accounting::Zcdp => (
                planned.rho,
                "ρ",
                (budget.rho.unwrap_or(0.0) - budget.spent_rho).max(0.0),
            ),
        };
        let delta_left = (budget.delta - budget.spent_delta).max(0.0);
        let (h_main, h_delta) = held.get(&key).copied().unwrap_or((0.0, 0.0));
        let running = if h_main > 0.0 {
            format!(" ({h_main:.6} of it held by queries still running)")
        } else {
            String::new()
        };
        if main > left - h_main + 1e-12 {
            return Err(Failure::refused(
                Rule::Budget,
                format!("budget exhausted: {left:.6} {unit} left{running}, query needs {main:.6}"),
            ));
        }
        if planned.delta > delta_left - h_delta + 1e-18 {
            return Err(Failure::refused(
                Rule::Budget,
                format!(
                    "budget exhausted: {delta_left:.3e} δ left{running}, query needs {:.3e}",
                    planned.delta
                ),
            ));
        }
        let entry = held.entry(key.clone()).or_insert((0.0, 0.0));
        entry.0 += main;
        entry.1 += planned.delta;
        Ok(Hold {
            held: Arc::clone(&self.held),
            key,
            amount: (main, planned.delta),
        })
    }

    /// The query's ε (or ρ) and δ, checked: ε, ρ within [10⁻⁹, 10⁶] (a finite, positive amount the
    /// ledger can count exactly), δ within [10⁻¹², 0.5].
    fn options(&self, options: &QueryOptions) -> Result<(f64, f64), Failure> {
        let total = options.epsilon.unwrap_or(self.default_epsilon);
        let delta = options.delta.unwrap_or(self.default_delta);
        if !(1e-9..=1e6).contains(&total) {
            return Err(Failure::refused(
                Rule::Options,
                "ε (or ρ) must be a number from 1e-9 to 1e6",
            ));
        }
        if !(1e-12..=0.5).contains(&delta) {
            return Err(Failure::refused(
                Rule::Options,
                "δ must be a number from 1e-12 to 0.5",
            ));
        }
        Ok((total, delta))
    }

    /// The session for `version`, with `tables` registered. Sessions are kept per version, so a table's
    /// footer is read once per engine, not once per query.
    async fn session(&self, version: &VersionEntry, tables: &[String]) -> Result<SessionContext> {
        let key = (
            version.version.dataset.clone(),
            version.version.version.clone(),
        );
        let ctx = {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            match sessions.get(&key) {
                Some(ctx) => ctx.clone(),
                None => {
                    let ctx = crate::storage::session(self.keystore.clone())?;
                    if let Some(n) = self.partitions {
                        let state = ctx.state_ref();
                        let mut state = state.write();
                        state.config_mut().options_mut().execution.target_partitions = n;
                    }
                    sessions.insert(key, ctx.clone());
                    ctx
                }
            }
        };
        let dir = self.root.join(&version.version.storage_path);
        let _registering = self.registering.lock().await;
        for t in tables {
            if ctx.table_exist(t.as_str())? {
                continue;
            }
            let entry = version
                .version
                .table(t)
                .ok_or_else(|| Error::Internal(format!("table {t} vanished")))?;
            crate::storage::register_table(&ctx, t, &dir.join(&entry.file)).await?;
        }
        Ok(ctx)
    }

    /// The exact figures of the truncation estimate over the join of `tables` on `person_id` (rows left
    /// out, each person counted up to the cap; rows, up to k + cap), from their indexes (registered by
    /// `index_scans`): a person with `n_t` rows in each table has `Π n_t` rows in the join. Computed once
    /// per version, tables and bound.
    async fn truncation_totals(
        &self,
        ctx: &SessionContext,
        version: &VersionEntry,
        tables: &[String],
        bounds: Bounds,
    ) -> Result<(f64, f64)> {
        let key = (
            version.version.storage_path.clone(),
            tables.join("\u{0}"),
            bounds.k,
        );
        if let Some(t) = self.lock_totals().get(&key) {
            return Ok(*t);
        }
        use arrow::datatypes::DataType;
        use datafusion::functions_aggregate::expr_fn::{count, sum};
        use datafusion::logical_expr::{JoinType, col, lit, when};
        use datafusion::prelude::cast;
        let mut joined: Option<datafusion::dataframe::DataFrame> = None;
        let mut n: Option<datafusion::logical_expr::Expr> = None;
        for (i, t) in tables.iter().enumerate() {
            let (p, c) = (format!("__p{i}"), format!("__n{i}"));
            let per_person = ctx
                .table(format!("__index_{t}").as_str())
                .await?
                .aggregate(
                    vec![col("person_id").alias(&p)],
                    vec![count(lit(1)).alias(&c)],
                )?;
            joined = Some(match joined {
                None => per_person,
                Some(j) => j.join(per_person, JoinType::Inner, &["__p0"], &[p.as_str()], None)?,
            });
            let x = cast(col(c.as_str()), DataType::Float64);
            n = Some(match n {
                None => x,
                Some(n) => n * x,
            });
        }
        let (Some(joined), Some(n)) = (joined, n) else {
            return Ok((0.0, 0.0));
        };
        let (k, cap) = (bounds.k as f64, bounds.truncation_cap());
        let over = n.clone() - lit(k);
        let left_out = when(n.clone().lt_eq(lit(k)), lit(0.0))
            .when(over.clone().gt(lit(cap)), lit(cap))
            .otherwise(over)?;
        let all = when(n.clone().gt(lit(k + cap)), lit(k + cap)).otherwise(n)?;
        let batches = joined
            .aggregate(vec![], vec![sum(left_out).alias("d"), sum(all).alias("a")])?
            .collect()
            .await?;
        let value = |c: usize| {
            batches
                .first()
                .and_then(|b| {
                    b.column(c)
                        .as_any()
                        .downcast_ref::<arrow::array::Float64Array>()
                        .map(|a| {
                            if arrow::array::Array::is_null(a, 0) {
                                0.0
                            } else {
                                a.value(0)
                            }
                        })
                })
                .ok_or_else(|| Error::Internal("truncation totals".into()))
        };
        let totals = (value(0)?, value(1)?);
        self.lock_totals().insert(key, totals);
        Ok(totals)
    }

    fn lock_totals(&self) -> std::sync::MutexGuard<'_, TruncationTotals> {
        self.truncation_totals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Scans of the indexed copies of `tables` (built first if missing), by table name. They are
    /// registered under names no query can write (the front door accepts catalog tables only).
    async fn index_scans(
        &self,
        ctx: &SessionContext,
        version: &VersionEntry,
        tables: &[String],
    ) -> Result<HashMap<String, LogicalPlan>> {
        let mut out = HashMap::new();
        let _registering = self.registering.lock().await;
        for t in tables {
            let name = format!("__index_{t}");
            if !ctx.table_exist(name.as_str())? {
                let file = index::ensure(&self.root, version, t, &self.keystore).await?;
                crate::storage::register_table(ctx, &name, &file).await?;
            }
            let scan = ctx.table(name.as_str()).await?.into_unoptimized_plan();
            out.insert(t.clone(), scan);
        }
        Ok(out)
    }
}

/// How many rows of the query's relation one person contributes at most: each table's own bound (the
/// profile's `dp.rows_per_person`, else the version's `max_contributions`), multiplied over a join on
/// `person_id` (a person with `a` rows in one table and `b` in the other has `a·b` joined rows); and the
/// same for means, from each table's mean bound.
fn contribution_bounds(version: &VersionEntry, tables: &[String]) -> Result<Bounds, Failure> {
    let (mut k, mut mean): (i64, i64) = (1, 1);
    let truncates = tables.iter().any(|t| !version.version.bound_enforced(t));
    for t in tables {
        k = k.saturating_mul(i64::from(version.version.contribution_bound(t)));
        mean = mean.saturating_mul(i64::from(version.version.mean_bound(t)));
    }
    if k > 1_000_000 {
        return Err(Failure::refused(
            Rule::Join,
            "the join multiplies each person's rows to more than 1,000,000: the noise would drown every answer",
        ));
    }
    Ok(Bounds { k, mean, truncates })
}

/// The exact aggregates as one batch.
fn concat(plan: &LogicalPlan, batches: &[RecordBatch]) -> Result<RecordBatch> {
    let schema = Arc::new(plan.schema().as_arrow().clone());
    Ok(arrow::compute::concat_batches(&schema, batches)?)
}

/// SHA-256 of the plans as DataFusion displays them (a fingerprint for the audit log; never parsed).
fn plan_hash(exact: &LogicalPlan, post: &LogicalPlan, bounds: Bounds) -> String {
    let Bounds { k, mean, .. } = bounds;
    hex::encode(digest(
        &SHA256,
        format!(
            "{}\n{}\n{k}\n{mean}",
            exact.display_indent(),
            post.display_indent()
        )
        .as_bytes(),
    ))
}

/// What a query costs at most, before any mechanism runs: its whole ε (or ρ), and δ when keys are
/// selected privately. Charged when an accepted query fails while running.
fn planned_cost(dp: &DpPlan, total: f64, delta: f64, accounting: Accounting) -> Cost {
    let selection = !dp.groups.is_empty() && !dp.public_groups();
    let delta = if selection { delta } else { 0.0 };
    match accounting {
        Accounting::Basic => Cost {
            epsilon: total,
            delta,
            rho: 0.0,
        },
        Accounting::Zcdp => Cost {
            epsilon: 0.0,
            delta,
            rho: total,
        },
    }
}

/// (version directory, tables joined, k) → (rows left out, rows), exact, over the whole join.
type TruncationTotals = HashMap<(String, String, i64), (f64, f64)>;

/// A query checked and planned, not run.
struct Planned {
    version: VersionEntry,
    tables: Vec<String>,
    dp: DpPlan,
    bounds: Bounds,
    dry: plan::PostPlan,
    ctx: SessionContext,
    total: f64,
    delta: f64,
    accounting: Accounting,
}

/// What `DpEngine::prepare` learns about a query without running it.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The columns its answer will have (the interval bounds are not among them).
    pub schema: arrow::datatypes::SchemaRef,
    /// The dataset version it was planned against.
    pub version: String,
    /// What it will cost at most.
    pub cost: Cost,
    /// The columns that show an aggregate unchanged: the answer gives each a noise scale and intervals
    /// (as [`DpAnswer::noise`] will).
    pub noisy_columns: Vec<String>,
}

/// Why a query was not answered, and whether the audit log has it already.
enum Failure {
    /// Not yet in the audit log: `answer` records it.
    Unrecorded(Error),
    /// Recorded by the ledger's charge transaction.
    Recorded(Error),
}

impl Failure {
    fn refused(rule: Rule, message: impl Into<String>) -> Failure {
        Failure::Unrecorded(Error::Refused {
            rule,
            message: message.into(),
            receipt: None,
        })
    }
}

impl<E: Into<Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Unrecorded(e.into())
    }
}

/// The canonical dataset directory of a version (for tools that read files directly).
pub fn version_dir(root: &Path, v: &VersionEntry) -> PathBuf {
    root.join(&v.version.storage_path)
}
