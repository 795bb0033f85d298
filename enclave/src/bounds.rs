//! Contribution bounds chosen from the data under DP, at publish time.
//!
//! Truncation is the largest error of many DP answers: a bound of 10 rows per person on a table where
//! people have ~60 makes every count 80 % low, and the noise interval does not show it. Where a profile
//! leaves a table's bound open and asks for it (`[dp] bound_quantile`, `bound_epsilon`), ingest releases
//! that quantile of rows per person through opendp's noisy max over candidate bounds (each person has
//! one row count, so every score moves by at most 1; see `dp::noise::choose_bound`), charged to the
//! dataset's `catalog` budget and audited **before** the version is published with it. Bounds are
//! chosen within 1 to 1,000.

use std::path::Path;
use std::sync::Arc;

use datafusion::functions_aggregate::expr_fn::count;
use datafusion::prelude::{col, lit};
use policies::{ChosenBounds, Table};

use crate::audit::Draft;
use crate::keys::Keystore;
use crate::ledger::{Cost, Ledger};
use crate::{Error, Result};

/// The principal whose budget pays for a dataset's data-chosen bounds.
pub const CATALOG_PRINCIPAL: &str = "catalog";

/// The largest bound a table can be given.
const MAX_BOUND: u32 = 1000;

/// The version being published, and who publishes it.
pub(crate) struct Publishing<'a> {
    /// The provider running the ingest (the grant and the charge name it).
    pub by: &'a str,
    /// Dataset.
    pub dataset: &'a str,
    /// Version label.
    pub version: &'a str,
    /// The version's directory (its encrypted tables).
    pub dir: &'a Path,
}

/// Releases, for each of `tables`, the configured quantile of its rows per person, and charges the cost
/// to the dataset's `catalog` budget (granted by the publisher for exactly that amount, both audited).
/// Returns each table's bound.
pub(crate) fn choose(
    p: &Publishing<'_>,
    keystore: Arc<Keystore>,
    ledger: &Ledger,
    tables: &[Table],
    how: ChosenBounds,
) -> Result<Vec<(Table, u32)>> {
    let (by, dataset, version, version_dir) = (p.by, p.dataset, p.version, p.dir);
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Io("runtime".into(), e))?;
    let candidates: Vec<f64> = (1..=MAX_BOUND).map(f64::from).collect();
    let mut chosen = Vec::new();
    let mut cost = Cost::default();
    for t in tables {
        let rows_per_person: Vec<f64> = rt.block_on(async {
            let ctx = crate::storage::session(keystore.clone())?;
            let file = version_dir.join(format!("{}.parquet", t.name()));
            crate::storage::register_table(&ctx, t.name(), &file).await?;
            let batches = ctx
                .table(t.name())
                .await?
                .aggregate(vec![col("person_id")], vec![count(lit(1)).alias("n")])?
                .select(vec![col("n")])?
                .collect()
                .await?;
            let mut out = Vec::new();
            for b in &batches {
                let n = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Float64)?;
                let n = n
                    .as_any()
                    .downcast_ref::<arrow::array::Float64Array>()
                    .ok_or_else(|| Error::Internal("row counts".into()))?;
                out.extend(n.iter().flatten().map(|x| x.min(f64::from(MAX_BOUND))));
            }
            Ok::<_, Error>(out)
        })?;
        let (q, noise) = crate::dp::noise::choose_bound(
            &rows_per_person,
            &candidates,
            how.quantile,
            how.epsilon,
        )?;
        cost.epsilon += noise.epsilon;
        chosen.push((*t, (q.round() as u32).clamp(1, MAX_BOUND)));
    }
    let granted = ledger
        .budget(CATALOG_PRINCIPAL, dataset)?
        .map_or(0.0, |b| b.epsilon);
    ledger.set_budget(
        by,
        CATALOG_PRINCIPAL,
        dataset,
        granted + cost.epsilon,
        0.0,
        None,
    )?;
    let described: Vec<String> = chosen
        .iter()
        .map(|(t, k)| format!("{} ≤ {k}", t.name()))
        .collect();
    ledger.charge(
        &Draft {
            principal: CATALOG_PRINCIPAL.into(),
            via: crate::audit::Via::local(&format!("ingest by {by}")),
            dataset: dataset.into(),
            version: version.into(),
            sql: format!(
                "contribution bounds: the {} quantile of rows per person, ε {} per table: {}",
                how.quantile,
                how.epsilon,
                described.join(", ")
            ),
            plan_hash: String::new(),
        },
        cost,
    )?;
    Ok(chosen)
}
