//! The bounded plan: DataFusion's own plan of the validated query, rewritten as a tree into the plan that
//! computes the exact, bounded aggregates, and the user's post-processing kept as the rest of that tree.
//!
//! ```text
//!  user plan:  [Limit] [Sort] Projection [Filter: HAVING] Aggregate(groups, aggregates) ◄─ input: scans,
//!                                                                                          joins, WHERE
//!  exact plan: input ─► Projection(__g*, clamped __v*, __pid, weights) ─► bounding ─► Aggregate(__n, …)
//!  post plan:  the user plan above the Aggregate, over a scan of the noisy table that has the
//!              Aggregate's schema (plus each aggregate's interval, carried through every Projection)
//! ```
//!
//! Nothing here formats SQL: identifiers, aliases and literals stay values in expression trees. Column
//! names the engine adds begin with `__`, which the front door refuses as a user alias.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use catalog::{ColumnEntry, VersionEntry};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue, TableReference};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::functions_aggregate::expr_fn::{array_agg, count, sum};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, Expr, ExprFunctionExt, JoinType, LogicalPlan, LogicalPlanBuilder, Projection,
    TableScan, when,
};
use datafusion::prelude::{SessionContext, lit};

use super::index::{ROWS_COLUMN, WEIGHT_COLUMN};
use super::query::{AggKind, Analyzed};
use super::rules::{Rule, refuse};
use crate::{Error, Result};

/// How each person's contribution is bounded to `k` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bounding {
    /// Up to `k` of a person's rows, chosen at random (quantiles need real values; grouped
    /// `COUNT(DISTINCT person_id)` and privately selected keys need each person in at most `k` groups).
    Sample,
    /// Every row of a person with `n > k` rows weighs `k / n`, so a person's rows weigh `min(n, k)` in
    /// all: the sensitivity of sampling `k` rows, without its sampling error. `n` is the person's rows in
    /// the query's relation: read from the per-person contribution index when the query has no WHERE (a
    /// join on `person_id` multiplies the tables' counts), counted per query otherwise.
    Weight {
        /// `n` comes from the index.
        indexed: bool,
    },
}

/// At most how many rows of the query's relation one person contributes: `k` for totals, `mean` (≤ `k`)
/// for means (each table's [`catalog::TableEntry::mean_bound`], multiplied over a join like `k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// For counts, sums, quantiles and private key selection.
    pub k: i64,
    /// For AVG, VARIANCE and STDDEV.
    pub mean: i64,
    /// Some person may have more than `k` rows (a table whose bound ingest did not enforce): the answer
    /// then estimates how many rows bounding left out (`__drop`, `__all`).
    pub truncates: bool,
}

impl Bounds {
    /// How many of a person's rows beyond `k` the truncation estimate counts at most (its sensitivity):
    /// three times `k`, so a person with up to four times the bound is counted in full and the estimate
    /// shows shares up to 75 %; its noise grows with the cap.
    pub(crate) fn truncation_cap(&self) -> f64 {
        3.0 * self.k as f64
    }
}

/// One aggregate of the query, in the order of the Aggregate node's expressions.
#[derive(Debug, Clone)]
pub(crate) struct DpAggregate {
    /// What it computes.
    pub kind: AggKind,
    /// Public clamping bounds of its argument.
    pub bounds: Option<(f64, f64)>,
    /// Its name in the Aggregate's output (`count(*)`, `avg(e.base_cost)`), for the cost split.
    pub name: String,
}

/// One group key.
#[derive(Debug, Clone)]
pub(crate) struct GroupKey {
    /// The declared public domain, when the key is a bare column that has one.
    pub domain: Option<Vec<String>>,
}

/// The rewritten query.
pub(crate) struct DpPlan {
    /// The user's plan (total), whose Aggregate node the noisy table replaces.
    user: LogicalPlan,
    /// The user's Aggregate node.
    aggregate: Aggregate,
    /// Per aggregate: the expression whose values it aggregates (none for `COUNT(*)`, persons).
    values: Vec<Option<Expr>>,
    /// The aggregates.
    pub aggregates: Vec<DpAggregate>,
    /// The group keys.
    pub groups: Vec<GroupKey>,
    /// How persons are bounded.
    pub bounding: Bounding,
}

impl DpPlan {
    /// True when every group key has a declared public domain (every key is released, no selection).
    pub(crate) fn public_groups(&self) -> bool {
        !self.groups.is_empty() && self.groups.iter().all(|g| g.domain.is_some())
    }
}

/// The expression under every alias (`count(Int64(1)) AS count(*) AS n` is a column reference).
fn unalias_all(e: &Expr) -> Expr {
    let mut e = e.clone();
    while let Expr::Alias(a) = e {
        e = *a.expr;
    }
    e
}

fn column(name: &str) -> Expr {
    Expr::Column(Column::new_unqualified(name))
}

fn shape_refusal<T>() -> Result<T> {
    refuse(
        Rule::SingleSelect,
        "only SELECT … FROM … [WHERE] [GROUP BY] [HAVING] [ORDER BY] [LIMIT] is accepted",
    )
}

/// The single Aggregate node of `user`, checking that only post-processing nodes stand above it and
/// only scans, aliases, joins and filters below it.
fn find_aggregate(user: &LogicalPlan) -> Result<Aggregate> {
    let mut node = user;
    loop {
        match node {
            LogicalPlan::Projection(p) => node = &p.input,
            LogicalPlan::Filter(f) => node = &f.input,
            LogicalPlan::Sort(s) => node = &s.input,
            LogicalPlan::Limit(l) => node = &l.input,
            LogicalPlan::Aggregate(a) => {
                let mut ok = true;
                a.input.apply(|n| {
                    ok &= match n {
                        LogicalPlan::TableScan(_)
                        | LogicalPlan::SubqueryAlias(_)
                        | LogicalPlan::Filter(_) => true,
                        LogicalPlan::Join(j) => j.join_type == JoinType::Inner,
                        _ => false,
                    };
                    Ok(TreeNodeRecursion::Continue)
                })?;
                return if ok { Ok(a.clone()) } else { shape_refusal() };
            }
            _ => return shape_refusal(),
        }
    }
}

/// Qualifier (alias or table name) → catalog table name, for every scan below `input`.
fn qualifiers(input: &LogicalPlan) -> Result<HashMap<TableReference, String>> {
    let mut out = HashMap::new();
    input.apply(|n| {
        match n {
            LogicalPlan::SubqueryAlias(a) => {
                if let LogicalPlan::TableScan(t) = a.input.as_ref() {
                    out.insert(a.alias.clone(), t.table_name.table().to_owned());
                }
            }
            LogicalPlan::TableScan(t) => {
                out.insert(t.table_name.clone(), t.table_name.table().to_owned());
            }
            _ => {}
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(out)
}

struct Resolver<'a> {
    version: &'a VersionEntry,
    qualifiers: HashMap<TableReference, String>,
}

impl Resolver<'_> {
    /// The catalog entry of a column expression (through casts the type checker added).
    fn entry(&self, e: &Expr) -> Option<&ColumnEntry> {
        match e {
            Expr::Column(c) => {
                let table = self.qualifiers.get(c.relation.as_ref()?)?;
                let t = self.version.version.table(table)?;
                t.columns.iter().find(|x| x.name == c.name)
            }
            Expr::Cast(c) => self.entry(&c.expr),
            Expr::TryCast(c) => self.entry(&c.expr),
            Expr::Alias(a) => self.entry(&a.expr),
            _ => None,
        }
    }
}

fn internal(why: &str) -> Error {
    Error::Internal(format!("plan: {why}"))
}

/// An aggregate's kind, its argument's bounds, and the expression whose values it aggregates.
type Classified = (AggKind, Option<(f64, f64)>, Option<Expr>);

/// Classifies one aggregate expression of the Aggregate node.
fn classify(e: &Expr, r: &Resolver<'_>) -> Result<Classified> {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = unalias_all(e) else {
        return Err(internal("an aggregate that is no aggregate function"));
    };
    if params.filter.is_some() || !params.order_by.is_empty() {
        return refuse(
            Rule::Function,
            "aggregates with FILTER, ORDER BY or WITHIN GROUP are not accepted",
        );
    }
    let arg = params.args.first().cloned();
    let entry = arg.as_ref().and_then(|a| r.entry(a));
    let bounds = entry.and_then(|c| c.lower.zip(c.upper));
    let name = func.name();
    let kind = match (name, params.distinct) {
        ("count", true) if entry.is_some_and(|c| c.name == "person_id") => AggKind::CountPersons,
        ("count", false) => match arg {
            Some(Expr::Literal(ref v, _)) if !v.is_null() => AggKind::CountRows,
            Some(_) if entry.is_some() => AggKind::CountValues,
            _ => return Err(internal("COUNT of something the front door refuses")),
        },
        ("sum", false) => AggKind::Sum,
        ("avg", false) => AggKind::Avg,
        ("var", false) => AggKind::Variance,
        ("stddev", false) => AggKind::Stddev,
        ("median", false) => AggKind::Quantile(0.5),
        ("approx_percentile_cont", false) if params.args.len() == 2 => {
            match &unalias_all(&params.args[1]) {
                Expr::Literal(v, _) => match v.cast_to(&DataType::Float64) {
                    Ok(ScalarValue::Float64(Some(a))) if a > 0.0 && a < 1.0 => AggKind::Quantile(a),
                    _ => return Err(internal("a percentile the front door refuses")),
                },
                _ => return Err(internal("a percentile the front door refuses")),
            }
        }
        _ => return Err(internal("an aggregate the front door refuses")),
    };
    let needs_bounds = !matches!(
        kind,
        AggKind::CountRows | AggKind::CountValues | AggKind::CountPersons
    );
    if needs_bounds && bounds.is_none() {
        return Err(internal(
            "an aggregate without bounds passed the front door",
        ));
    }
    let value = match kind {
        AggKind::CountRows | AggKind::CountPersons => None,
        _ => arg,
    };
    Ok((kind, if needs_bounds { bounds } else { None }, value))
}

/// Clamps a value to `[l, u]` as a double. A NaN compares above every number in DataFusion's ordering,
/// so it clamps to `u`: no NaN reaches a sum.
fn clamp(e: Expr, (l, u): (f64, f64)) -> Result<Expr> {
    let x = datafusion::prelude::try_cast(e, DataType::Float64);
    Ok(when(x.clone().lt(lit(l)), lit(l))
        .when(x.clone().gt(lit(u)), lit(u))
        .otherwise(x)?)
}

fn df(e: datafusion::error::DataFusionError) -> Error {
    Error::DataFusion(e)
}

/// Rewrites the user's (total, type-checked) plan into the bounded aggregation; [`DpPlan::exact`] then
/// builds the exact plan.
pub(crate) fn build(
    user: LogicalPlan,
    analyzed: &Analyzed,
    version: &VersionEntry,
) -> Result<DpPlan> {
    let agg = find_aggregate(&user)?;
    let resolver = Resolver {
        version,
        qualifiers: qualifiers(&agg.input)?,
    };
    // The output name each aggregate is shown under (the SELECT list's alias, `count(*)`, or `n`).
    let mut shown: HashMap<Column, String> = HashMap::new();
    user.apply(|n| {
        if let LogicalPlan::Projection(p) = n {
            for e in &p.expr {
                if let (Expr::Alias(a), Expr::Column(c)) = (e, unalias_all(e)) {
                    shown.entry(c).or_insert_with(|| a.name.clone());
                }
            }
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let mut aggregates = Vec::new();
    let mut values = Vec::new();
    for (j, e) in agg.aggr_expr.iter().enumerate() {
        let (kind, bounds, value) = classify(e, &resolver)?;
        // Defence in depth: DataFusion's reading of the query must be one the front door validated.
        if !analyzed
            .aggregates
            .iter()
            .any(|a| a.kind == kind && (bounds.is_none() || a.bounds == bounds))
        {
            return Err(internal("an aggregate the front door did not see"));
        }
        aggregates.push(DpAggregate {
            kind,
            bounds,
            // The name the query's output knows it by (`count(*)`, not `count(Int64(1))`).
            name: {
                let (q, f) = agg.schema.qualified_field(agg.group_expr.len() + j);
                let column = Column::new(q.cloned(), f.name());
                shown
                    .get(&column)
                    .cloned()
                    .unwrap_or_else(|| f.name().clone())
            },
        });
        values.push(value);
    }
    let groups: Vec<GroupKey> = agg
        .group_expr
        .iter()
        .map(|g| GroupKey {
            domain: match g {
                Expr::Column(_) => resolver.entry(g).and_then(|c| c.domain.clone()),
                _ => None,
            },
        })
        .collect();
    let public = !groups.is_empty() && groups.iter().all(|g| g.domain.is_some());
    if public {
        let keys = groups.iter().try_fold(1usize, |n, g| {
            n.checked_mul(g.domain.as_ref().map_or(1, Vec::len))
        });
        if keys.is_none_or(|n| n > 100_000) {
            return refuse(
                Rule::GroupBy,
                "the public domains multiply to more than 100,000 groups",
            );
        }
    }
    let mut has_where = false;
    agg.input.apply(|n| {
        has_where |= matches!(n, LogicalPlan::Filter(_));
        Ok(TreeNodeRecursion::Continue)
    })?;
    let sampled = (!groups.is_empty()
        && (!public || aggregates.iter().any(|x| x.kind == AggKind::CountPersons)))
        || aggregates
            .iter()
            .any(|x| matches!(x.kind, AggKind::Quantile(_)));
    let bounding = if sampled {
        Bounding::Sample
    } else {
        Bounding::Weight {
            indexed: !has_where,
        }
    };
    Ok(DpPlan {
        user,
        aggregate: agg,
        values,
        aggregates,
        groups,
        bounding,
    })
}

/// Replaces every scan of a table by the scan of its indexed copy (same qualifier, two more columns).
fn use_index(input: &LogicalPlan, index: &HashMap<String, LogicalPlan>) -> Result<LogicalPlan> {
    let out = input
        .clone()
        .transform_up(|n| match n {
            LogicalPlan::TableScan(TableScan { ref table_name, .. }) => {
                let Some(LogicalPlan::TableScan(ix)) = index.get(table_name.table()) else {
                    return Err(datafusion::error::DataFusionError::Internal(
                        "no index for a table".into(),
                    ));
                };
                let scan = datafusion::logical_expr::TableScanBuilder::new(
                    table_name.clone(),
                    ix.source.clone(),
                )
                .build()?;
                Ok(Transformed::yes(LogicalPlan::TableScan(scan)))
            }
            other => Ok(Transformed::yes(other.recompute_schema()?)),
        })
        .map_err(df)?;
    Ok(out.data)
}

impl DpPlan {
    /// The bounds this plan uses: sampling keeps one set of rows per person, so means share `k` there.
    pub(crate) fn bounds(&self, b: Bounds) -> Bounds {
        if self.bounding == Bounding::Sample {
            Bounds { mean: b.k, ..b }
        } else {
            b
        }
    }

    /// The plan that computes the exact bounded aggregates: `__g{i}` per group key, then `__n`, and per
    /// aggregate `j` the columns its mechanisms need (`__cnt{j}`, `__pers{j}`, `__sum{j}`, `__csum{j}`,
    /// `__sq{j}`, `__arr{j}`). `index` gives, for a table name, the plan node that scans its indexed copy,
    /// when the bounding reads weights from the index.
    pub(crate) fn exact(
        &self,
        bounds: Bounds,
        index: &HashMap<String, LogicalPlan>,
    ) -> Result<LogicalPlan> {
        exact_plan(self, self.bounds(bounds), index)
    }
}

fn exact_plan(
    plan: &DpPlan,
    bounds: Bounds,
    index: &HashMap<String, LogicalPlan>,
) -> Result<LogicalPlan> {
    let k = bounds.k;
    // Means weigh rows by their own bound when it is smaller (a second weight column, `__wm`).
    let mean_weights = bounds.mean < k && plan.aggregates.iter().any(|a| a.kind.is_mean());
    let weight_for = |kind: &AggKind| {
        if mean_weights && kind.is_mean() {
            "__wm"
        } else {
            "__w"
        }
    };
    let (agg, values) = (&plan.aggregate, &plan.values);
    let indexed = plan.bounding == (Bounding::Weight { indexed: true });
    let input = if indexed {
        use_index(&agg.input, index)?
    } else {
        agg.input.as_ref().clone()
    };
    let schema = input.schema().clone();
    let fields_named = |name: &str| -> Vec<Column> {
        schema
            .iter()
            .filter(|(_, f)| f.name() == name)
            .map(|(q, f)| Column::new(q.cloned(), f.name()))
            .collect()
    };
    // Read from the index (no WHERE), the relation is the tables' whole join: what bounding leaves out
    // of it depends on the tables alone, and the engine computes it once per version, not per row.
    let per_row_truncation = bounds.truncates && !indexed;
    let person = fields_named("person_id")
        .into_iter()
        .next()
        .ok_or_else(|| internal("no person_id in the query's relation"))?;

    let mut base = Vec::new();
    for (i, g) in agg.group_expr.iter().enumerate() {
        base.push(g.clone().alias(format!("__g{i}")));
    }
    for (j, v) in values.iter().enumerate() {
        if let Some(v) = v {
            base.push(v.clone().alias(format!("__v{j}")));
        }
    }
    base.push(Expr::Column(person).alias("__pid"));
    // What a row adds to the truncation estimate when its person has `pn` rows of which `kept` are
    // aggregated: (rows left out, capped at C per person; rows, capped at k + C per person), each spread
    // over the kept rows so that a person's rows add up to min(pn − k, C)⁺ and min(pn, k + C).
    let cap = bounds.truncation_cap();
    let truncation_of = |pn: Expr, kept: Expr| -> Result<Vec<Expr>> {
        let (kf, f) = (k as f64, |x: f64| lit(x));
        let over = pn.clone() - f(kf);
        let left_out = when(pn.clone().lt_eq(f(kf)), f(0.0))
            .when(over.clone().gt(f(cap)), f(cap))
            .otherwise(over)?;
        let all = when(pn.clone().gt(f(kf + cap)), f(kf + cap)).otherwise(pn)?;
        Ok(vec![
            (left_out / kept.clone()).alias("__d"),
            (all / kept).alias("__a"),
        ])
    };
    // A row's weight for bound `k` when its person has `pn` rows: min(1, k / pn).
    let weight_of = |pn: Expr, k: i64, name: &str| -> Result<Expr> {
        let kf = k as f64;
        Ok(when(pn.clone().lt_eq(lit(kf)), lit(1.0))
            .otherwise(lit(kf) / pn)?
            .alias(name))
    };
    if indexed {
        // Rows per person in the joined relation: the product of the tables' per-person counts.
        let mut product: Option<Expr> = None;
        for c in fields_named(ROWS_COLUMN) {
            let x = datafusion::prelude::cast(Expr::Column(c), DataType::Float64);
            product = Some(match product {
                None => x,
                Some(p) => p * x,
            });
        }
        let pn = product.ok_or_else(|| internal("no row counts in the index"))?;
        let weights = fields_named(WEIGHT_COLUMN);
        if let [w] = weights.as_slice() {
            base.push(Expr::Column(w.clone()).alias("__w"));
        } else {
            base.push(weight_of(pn.clone(), k, "__w")?);
        }
        if mean_weights {
            base.push(weight_of(pn.clone(), bounds.mean, "__wm")?);
        }
        if per_row_truncation {
            base.extend(truncation_of(pn.clone(), pn)?);
        }
    }
    let mut b = LogicalPlanBuilder::from(input).project(base).map_err(df)?;
    if plan.public_groups() && !indexed {
        // Rows outside a declared domain are not counted: the released keys are exactly the domain's.
        // (With indexed weights, which do not depend on the filter, the groups outside the domain are
        // computed and never released: the same values, without a filter over every row.)
        for (i, g) in plan.groups.iter().enumerate() {
            if let Some(d) = &g.domain {
                let list = d.iter().map(|v| lit(v.clone())).collect();
                b = b
                    .filter(column(&format!("__g{i}")).in_list(list, false))
                    .map_err(df)?;
            }
        }
    }
    let weighted = plan.bounding != Bounding::Sample;
    let cells = plan.bounding == (Bounding::Weight { indexed: false });
    let group_cols: Vec<Expr> = (0..agg.group_expr.len())
        .map(|i| column(&format!("__g{i}")))
        .collect();
    // Per-query weights (WHERE) are computed over (group, person) cells: every aggregate here is a sum
    // over rows, so each cell's partial sums, weighted by its person's weight, give the same figures as
    // weighting row by row, and the person totals come from a window over the cells, not the rows.
    let mut partials: Vec<Expr> = Vec::new();
    let mut partial = |e: Expr, w: &str| -> Expr {
        let name = format!("__p{}", partials.len());
        partials.push(e.alias(&name));
        datafusion::functions::core::expr_fn::coalesce(vec![
            sum(column(w) * column(&name)),
            lit(0.0),
        ])
    };
    let mut outs: Vec<Expr> = Vec::new();
    let zero = || lit(0.0);
    let wsum = |e: Expr| datafusion::functions::core::expr_fn::coalesce(vec![sum(e), zero()]);
    // Counting a row: 1 when sampled, its weight when weighted.
    let count_if =
        |cond: Option<Expr>, w: &str, partial: &mut dyn FnMut(Expr, &str) -> Expr| -> Expr {
            match (weighted, cells, cond) {
                (false, _, None) => count(lit(1)),
                (false, _, Some(c)) => count(c),
                (true, true, None) => wsum(column(w) * column("__c")),
                (true, true, Some(c)) => partial(count(c), w),
                (true, false, None) => wsum(column(w)),
                (true, false, Some(c)) => wsum(
                    when(c.is_not_null(), column(w))
                        .end()
                        .unwrap_or_else(|_| lit(ScalarValue::Float64(None))),
                ),
            }
        };
    let sum_of = |x: Expr, w: &str, partial: &mut dyn FnMut(Expr, &str) -> Expr| -> Expr {
        if cells {
            partial(sum(x), w)
        } else if weighted {
            wsum(column(w) * x)
        } else {
            wsum(x)
        }
    };
    outs.push(count_if(None, "__w", &mut partial).alias("__n"));
    if per_row_truncation {
        outs.push(wsum(column("__d")).alias("__drop"));
        outs.push(wsum(column("__a")).alias("__all"));
    }
    for (j, a) in plan.aggregates.iter().enumerate() {
        let w = weight_for(&a.kind);
        let v = column(&format!("__v{j}"));
        let clamped = match a.bounds {
            Some(b) => Some(clamp(v.clone(), b)?),
            None => None,
        };
        let c = || clamped.clone().ok_or_else(|| internal("bounds vanished"));
        match a.kind {
            AggKind::CountRows => {}
            AggKind::CountValues => {
                outs.push(count_if(Some(v), w, &mut partial).alias(format!("__cnt{j}")));
            }
            AggKind::CountPersons => {
                outs.push(
                    count(column("__pid"))
                        .distinct()
                        .build()
                        .map_err(df)?
                        .alias(format!("__pers{j}")),
                );
            }
            AggKind::Sum => outs.push(sum_of(c()?, w, &mut partial).alias(format!("__sum{j}"))),
            AggKind::Avg => {
                let (l, u) = a.bounds.unwrap_or((0.0, 0.0));
                let centre = (l + u) / 2.0;
                outs.push(sum_of(c()? - lit(centre), w, &mut partial).alias(format!("__csum{j}")));
                outs.push(count_if(Some(v), w, &mut partial).alias(format!("__cnt{j}")));
            }
            AggKind::Variance | AggKind::Stddev => {
                // Sums of values centred on the middle of the bounds (the variance does not change):
                // each value within half the range of zero.
                let (l, u) = a.bounds.unwrap_or((0.0, 0.0));
                let centred = || Ok::<_, Error>(c()? - lit((l + u) / 2.0));
                outs.push(sum_of(centred()?, w, &mut partial).alias(format!("__sum{j}")));
                outs.push(
                    sum_of(centred()? * centred()?, w, &mut partial).alias(format!("__sq{j}")),
                );
                outs.push(count_if(Some(v), w, &mut partial).alias(format!("__cnt{j}")));
            }
            AggKind::Quantile(_) => {
                outs.push(
                    array_agg(c()?)
                        .filter(v.is_not_null())
                        .build()
                        .map_err(df)?
                        .alias(format!("__arr{j}")),
                );
            }
        }
    }
    b = match plan.bounding {
        Bounding::Sample => {
            let rn = row_number()
                .partition_by(vec![column("__pid")])
                .order_by(vec![
                    datafusion::functions::math::expr_fn::random().sort(true, false),
                ])
                .build()
                .map_err(df)?
                .alias("__rn");
            let mut b = b.window(vec![rn]).map_err(df)?;
            if bounds.truncates {
                // Its own window node: DataFusion plans one node's windows over one sort order.
                let pn = Expr::from(datafusion::logical_expr::expr::WindowFunction::new(
                    datafusion::functions_aggregate::count::count_udaf(),
                    vec![lit(1)],
                ))
                .partition_by(vec![column("__pid")])
                .build()
                .map_err(df)?
                .alias("__pn");
                b = b.window(vec![pn]).map_err(df)?;
            }
            let b = b.filter(column("__rn").lt_eq(lit(k))).map_err(df)?;
            if bounds.truncates {
                let pn = datafusion::prelude::cast(column("__pn"), DataType::Float64);
                // The person's kept rows: min(pn, k).
                let kept =
                    when(pn.clone().gt(lit(k as f64)), lit(k as f64)).otherwise(pn.clone())?;
                let mut keep: Vec<Expr> =
                    b.schema().columns().into_iter().map(Expr::Column).collect();
                keep.extend(truncation_of(pn, kept)?);
                b.project(keep).map_err(df)?
            } else {
                b
            }
        }
        Bounding::Weight { indexed: true } => b,
        Bounding::Weight { indexed: false } => {
            let mut cell_keys = group_cols.clone();
            cell_keys.push(column("__pid"));
            let mut cell_aggs = vec![count(lit(1)).alias("__c")];
            cell_aggs.extend(partials.iter().cloned());
            let pn = Expr::from(datafusion::logical_expr::expr::WindowFunction::new(
                datafusion::functions_aggregate::sum::sum_udaf(),
                vec![column("__c")],
            ))
            .partition_by(vec![column("__pid")])
            .build()
            .map_err(df)?
            .alias("__pn");
            let b = b
                .aggregate(cell_keys, cell_aggs)
                .and_then(|b| b.window(vec![pn]))
                .map_err(df)?;
            let mut keep: Vec<Expr> = b.schema().columns().into_iter().map(Expr::Column).collect();
            let pn = datafusion::prelude::cast(column("__pn"), DataType::Float64);
            keep.push(weight_of(pn.clone(), k, "__w")?);
            if mean_weights {
                keep.push(weight_of(pn.clone(), bounds.mean, "__wm")?);
            }
            if per_row_truncation {
                // A cell of `__c` rows adds `__c` rows' worth.
                let c = datafusion::prelude::cast(column("__c"), DataType::Float64);
                keep.extend(truncation_of(pn.clone(), pn / c)?);
            }
            b.project(keep).map_err(df)?
        }
    };
    b.aggregate(group_cols, outs)
        .and_then(|b| b.build())
        .map_err(df)
}

/// The noisy table, as the post-processing plan sees it: one column per field of the Aggregate's
/// schema, then each aggregate's interval.
pub(crate) struct NoisyTable {
    /// `__c{i}` per Aggregate field (group keys, then aggregates), typed as that field.
    pub columns: Vec<arrow::array::ArrayRef>,
    /// Per aggregate: (low, high) of its 95 % interval, per row.
    pub intervals: Vec<(Vec<f64>, Vec<f64>)>,
}

impl NoisyTable {
    /// A table with no rows, for planning post-processing before anything runs.
    pub(crate) fn empty(types: &[DataType], n_aggs: usize) -> Result<NoisyTable> {
        Ok(NoisyTable {
            columns: types.iter().map(arrow::array::new_empty_array).collect(),
            intervals: vec![(Vec::new(), Vec::new()); n_aggs],
        })
    }
}

/// The post-processing plan over `noisy`, and for each user output column the aggregate it shows
/// unchanged (whose interval and noise scale apply to it).
pub(crate) struct PostPlan {
    /// The plan; its output is the user's columns, then `__lo{j}`, `__hi{j}` per aggregate.
    pub plan: LogicalPlan,
    /// Per user column.
    pub shows: Vec<Option<usize>>,
}

impl DpPlan {
    /// The Aggregate node's output types (group keys, then aggregates).
    pub(crate) fn aggregate_types(&self) -> Vec<DataType> {
        self.aggregate
            .schema
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect()
    }

    /// Builds the post-processing plan over `noisy` (the user's plan with its Aggregate node replaced).
    pub(crate) fn post(&self, noisy: &NoisyTable) -> Result<PostPlan> {
        let n_groups = self.groups.len();
        let n_aggs = self.aggregates.len();
        let mut fields = Vec::new();
        let mut arrays = Vec::new();
        for (i, (f, a)) in self
            .aggregate
            .schema
            .fields()
            .iter()
            .zip(&noisy.columns)
            .enumerate()
        {
            fields.push(Field::new(format!("__c{i}"), f.data_type().clone(), true));
            arrays.push(a.clone());
        }
        for (j, (lo, hi)) in noisy.intervals.iter().enumerate() {
            fields.push(Field::new(format!("__lo{j}"), DataType::Float64, true));
            arrays.push(Arc::new(arrow::array::Float64Array::from(lo.clone())));
            fields.push(Field::new(format!("__hi{j}"), DataType::Float64, true));
            arrays.push(Arc::new(arrow::array::Float64Array::from(hi.clone())));
        }
        let schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(schema.clone(), arrays)?;
        let table = MemTable::try_new(schema, vec![vec![batch]])?;
        let scan = LogicalPlanBuilder::scan("__noisy", provider_as_source(Arc::new(table)), None)
            .map_err(df)?;
        let hidden: Vec<Expr> = (0..n_aggs)
            .flat_map(|j| [format!("__lo{j}"), format!("__hi{j}")])
            .map(|n| column(&n))
            .collect();
        let mut replacement = Vec::new();
        for (i, (q, f)) in self.aggregate.schema.iter().enumerate() {
            replacement.push(
                Expr::Column(Column::new(Some("__noisy"), format!("__c{i}")))
                    .alias_qualified(q.cloned(), f.name()),
            );
        }
        replacement.extend(hidden.iter().cloned());
        let replacement = scan
            .project(replacement)
            .and_then(|b| b.build())
            .map_err(df)?;
        // Which output column shows which aggregate unchanged, tracked up the tree.
        let mut shows: HashMap<Column, usize> = HashMap::new();
        for (i, (q, f)) in self.aggregate.schema.iter().enumerate() {
            if i >= n_groups {
                shows.insert(Column::new(q.cloned(), f.name()), i - n_groups);
            }
        }
        let out = self
            .user
            .clone()
            .transform_up(|node| match node {
                LogicalPlan::Aggregate(_) => Ok(Transformed::yes(replacement.clone())),
                LogicalPlan::Projection(p) => {
                    let mut next = HashMap::new();
                    for (i, e) in p.expr.iter().enumerate() {
                        if let Expr::Column(c) = unalias_all(e)
                            && let Some(j) = shows.get(&c)
                        {
                            let (q, f) = p.schema.qualified_field(i);
                            next.insert(Column::new(q.cloned(), f.name()), *j);
                        }
                    }
                    let mut exprs = p.expr.clone();
                    exprs.extend(hidden.iter().cloned());
                    let rebuilt = Projection::try_new(exprs, p.input.clone())?;
                    shows = next;
                    Ok(Transformed::yes(LogicalPlan::Projection(rebuilt)))
                }
                other => Ok(Transformed::yes(other.recompute_schema()?)),
            })
            .map_err(|_| Error::Refused {
                rule: Rule::PostProcessing,
                message: "HAVING, ORDER BY, LIMIT or the SELECT list do not plan over the noisy aggregates".into(),
                receipt: None,
            })?
            .data;
        let n_user = out.schema().fields().len().saturating_sub(2 * n_aggs);
        let shows = (0..n_user)
            .map(|i| {
                let (q, f) = out.schema().qualified_field(i);
                shows.get(&Column::new(q.cloned(), f.name())).copied()
            })
            .collect();
        Ok(PostPlan { plan: out, shows })
    }
}

/// Runs a post-processing plan: the user's columns, and per user column the interval columns of the
/// aggregate it shows.
pub(crate) async fn run_post(
    ctx: &SessionContext,
    post: &PostPlan,
    n_aggs: usize,
) -> Result<(RecordBatch, Vec<(Vec<f64>, Vec<f64>)>)> {
    let schema = Arc::new(post.plan.schema().as_arrow().clone());
    let batches = ctx
        .execute_logical_plan(post.plan.clone())
        .await?
        .collect()
        .await?;
    let all = arrow::compute::concat_batches(&schema, &batches)?;
    let n_user = post.shows.len();
    let user = all.project(&(0..n_user).collect::<Vec<_>>())?;
    let f64s = |i: usize| -> Result<Vec<f64>> {
        let c = arrow::compute::cast(all.column(i), &DataType::Float64)?;
        Ok(c.as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .ok_or_else(|| internal("interval column"))?
            .iter()
            .map(|x| x.unwrap_or(f64::NAN))
            .collect())
    };
    let mut intervals = Vec::with_capacity(n_aggs);
    for j in 0..n_aggs {
        intervals.push((f64s(n_user + 2 * j)?, f64s(n_user + 2 * j + 1)?));
    }
    Ok((user, intervals))
}
