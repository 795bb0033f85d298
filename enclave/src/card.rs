//! The figures a dataset card shows researchers, released through the DP engine: how many persons and
//! rows, the years the events cover, and histograms of the categorical columns. Each figure is one DP
//! query, planned and charged like a researcher's, under the dataset's **catalog budget**: the principal
//! [`CATALOG_PRINCIPAL`], granted by the board member who releases the card (ε split over the queries,
//! the coverage query weighing [`COVERAGE_WEIGHT`] times the others: its years pass private key selection
//! only with a larger share). The figures are released once per version and kept in the catalog; nothing on a card a
//! researcher sees is computed exactly from rows.
//!
//! The queries are built as syntax trees from a fixed template whose table and column identifiers are
//! replaced by the catalog's (quoted by the SQL printer), never by formatting names into text.

use datafusion::sql::sqlparser::ast::{
    Expr, Ident, ObjectName, ObjectNamePart, Statement, visit_expressions_mut, visit_relations_mut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use serde::{Deserialize, Serialize};
use std::ops::ControlFlow;

use crate::audit::Via;
use crate::dp::{DpAnswer, DpEngine, QueryOptions};
use crate::{Error, Result};
use catalog::{CardRelease, CatalogStore, SqliteCatalog, VersionEntry};

/// The principal the card's queries are charged to (no user name can start with `@`).
pub const CATALOG_PRINCIPAL: &str = "@catalog";
/// δ granted with a card release (private key selection for histograms).
pub const CARD_DELTA: f64 = 1e-6;
/// Histograms released per card at most (each costs a share of the budget).
const MAX_HISTOGRAMS: usize = 12;
/// The coverage query's share of the budget, in units of one other query's.
pub const COVERAGE_WEIGHT: f64 = 6.0;

/// One released number: the noisy value as released (never below zero; counts rounded), its noise scale
/// and 95 % interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// The released value.
    pub value: f64,
    /// Noise scale (Laplace b or Gaussian σ; for sums of figures, the standard deviation of their noise).
    #[serde(deserialize_with = "number_or_nan")]
    pub scale: f64,
    /// 95 % interval, low end (NaN where none is known; stored as null).
    #[serde(deserialize_with = "number_or_nan")]
    pub low: f64,
    /// 95 % interval, high end (NaN where none is known; stored as null).
    #[serde(deserialize_with = "number_or_nan")]
    pub high: f64,
}

/// JSON has no NaN (serde_json writes it as null): null reads back as NaN.
fn number_or_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// A released histogram: the values private key selection let through, each with its noisy count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Table.
    pub table: String,
    /// Column.
    pub column: String,
    /// (value, count), by value.
    pub bins: Vec<(String, Figure)>,
}

/// A version's released card figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardFigures {
    /// The total ε of the release (under zCDP: the ε the granted ρ is equivalent to at half of
    /// [`CARD_DELTA`]; the other half goes to key selection).
    pub epsilon: f64,
    /// Queries it was split over.
    pub queries: usize,
    /// Persons: the rows of the table holding one row per person.
    pub persons: Option<Figure>,
    /// Rows per table: the rows within each person's bound plus the estimate of those bounding left
    /// out, each person counted up to the bound plus its cap (a lower bound where persons have more).
    pub rows: Vec<(String, Figure)>,
    /// Per table whose count needed it, the most left-out rows one person was counted for.
    #[serde(default)]
    pub row_caps: Vec<(String, f64)>,
    /// All rows: the sum of the tables' released counts (post-processing).
    pub records: Option<Figure>,
    /// The first and last event year the coverage histogram released, with the column it is over.
    pub coverage: Option<Coverage>,
    /// Histograms of categorical columns.
    pub histograms: Vec<Histogram>,
    /// Figures that were not released, and why (a refusal by the engine's rules, or the histogram limit).
    pub skipped: Vec<String>,
}

/// The released time coverage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coverage {
    /// Table.
    pub table: String,
    /// The event-year column.
    pub column: String,
    /// First year released.
    pub first_year: i64,
    /// Last year released.
    pub last_year: i64,
}

/// What one query releases.
enum Ask {
    Rows(String),
    Years(String, String),
    Histogram(String, String),
}

/// The table holding one row per person: declared so, or else one named like a person table.
fn person_table(v: &VersionEntry) -> Option<&str> {
    v.version
        .tables
        .iter()
        .find(|t| t.max_rows_per_person == Some(1))
        .or_else(|| {
            v.version
                .tables
                .iter()
                .find(|t| ["patients", "patient", "persons", "person"].contains(&t.name.as_str()))
        })
        .map(|t| t.name.as_str())
}

/// The queries a card release makes, in order.
fn plan(v: &VersionEntry) -> Vec<Ask> {
    let person = person_table(v);
    let mut asks: Vec<Ask> = v
        .version
        .tables
        .iter()
        .map(|t| Ask::Rows(t.name.clone()))
        .collect();
    // Coverage: the first event-year column (generalised to years) outside the person table.
    if let Some((t, c)) = v.version.tables.iter().find_map(|t| {
        (Some(t.name.as_str()) != person)
            .then(|| {
                t.columns.iter().find(|c| {
                    c.data_type == "Int32"
                        && c.action.starts_with("generalize: year")
                        && c.role != "identifier"
                })
            })
            .flatten()
            .map(|c| (t.name.clone(), c.name.clone()))
    }) {
        asks.push(Ask::Years(t, c));
    }
    // Histograms: columns with a declared domain, then the person table's categorical quasi-identifiers.
    let mut histograms = Vec::new();
    for t in &v.version.tables {
        for c in &t.columns {
            let declared = c.domain.as_ref().is_some_and(|d| !d.is_empty());
            let person_qi = Some(t.name.as_str()) == person
                && c.role == "quasi_identifier"
                && c.data_type == "Utf8";
            if (declared || person_qi) && c.role != "identifier" {
                histograms.push(Ask::Histogram(t.name.clone(), c.name.clone()));
            }
        }
    }
    histograms.truncate(MAX_HISTOGRAMS);
    asks.extend(histograms);
    asks
}

/// How many histograms a card leaves out (past [`MAX_HISTOGRAMS`]), to say so.
fn left_out(v: &VersionEntry) -> usize {
    let person = person_table(v);
    v.version
        .tables
        .iter()
        .flat_map(|t| t.columns.iter().map(move |c| (t, c)))
        .filter(|(t, c)| {
            (c.domain.as_ref().is_some_and(|d| !d.is_empty())
                || (Some(t.name.as_str()) == person
                    && c.role == "quasi_identifier"
                    && c.data_type == "Utf8"))
                && c.role != "identifier"
        })
        .count()
        .saturating_sub(MAX_HISTOGRAMS)
}

/// `SELECT COUNT(*) AS n FROM <table>`, or `SELECT <column> AS v, COUNT(*) AS n FROM <table> GROUP BY
/// <column>`, built on the syntax tree.
fn count_sql(table: &str, group: Option<&str>) -> Result<String> {
    let template = if group.is_some() {
        "SELECT g AS v, COUNT(*) AS n FROM t GROUP BY g"
    } else {
        "SELECT COUNT(*) AS n FROM t"
    };
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, template)
        .map_err(|e| Error::Internal(format!("card query template: {e}")))?;
    let quoted = |name: &str| Ident::with_quote('"', name);
    for statement in &mut statements {
        let _ = visit_relations_mut(statement, |relation: &mut ObjectName| {
            *relation = ObjectName(vec![ObjectNamePart::Identifier(quoted(table))]);
            ControlFlow::<()>::Continue(())
        });
        if let Some(column) = group {
            let _ = visit_expressions_mut(statement, |expr: &mut Expr| {
                if let Expr::Identifier(ident) = expr
                    && ident.value == "g"
                {
                    *ident = quoted(column);
                }
                ControlFlow::<()>::Continue(())
            });
        }
    }
    match statements.as_slice() {
        [one @ Statement::Query(_)] => Ok(one.to_string()),
        _ => Err(Error::Internal("card query template".into())),
    }
}

/// The `n` column of an answer, row by row, as figures (post-processed: never below zero, whole).
fn counts(answer: &DpAnswer) -> Vec<(Option<String>, Figure)> {
    let noise = answer.noise.iter().find(|n| n.column == "n");
    let rows = answer.rows();
    let n_at = answer
        .batch
        .schema()
        .index_of("n")
        .unwrap_or(rows.first().map_or(0, |r| r.len().saturating_sub(1)));
    let v_at = answer.batch.schema().index_of("v").ok();
    rows.iter()
        .enumerate()
        .filter_map(|(i, row)| {
            let value: f64 = row.get(n_at)?.as_deref()?.parse().ok()?;
            let (low, high) = noise
                .and_then(|n| n.intervals.get(i).copied())
                .unwrap_or((f64::NAN, f64::NAN));
            Some((
                v_at.and_then(|j| row.get(j).cloned().flatten()),
                Figure {
                    value: value.max(0.0).round(),
                    scale: noise.map_or(f64::NAN, |n| n.scale),
                    // Clamped at zero where known; an unknown interval stays unknown.
                    low: if low.is_nan() { low } else { low.max(0.0) },
                    high: if high.is_nan() { high } else { high.max(0.0) },
                },
            ))
        })
        .collect()
}

/// Releases the card figures of `dataset`'s latest version: grants the catalog budget `epsilon` (on
/// top of what earlier releases spent) in the name of board member `by`, runs the queries under it, and
/// keeps the figures in the catalog. A version's figures are released once.
pub async fn release(
    engine: &DpEngine,
    catalog: &SqliteCatalog,
    dataset: &str,
    by: &str,
    epsilon: f64,
    via: &Via,
) -> Result<CardRelease> {
    if !(epsilon.is_finite() && epsilon > 0.0 && epsilon <= 10.0) {
        return Err(Error::Config(
            "a card release's ε must be a number above 0 and at most 10".into(),
        ));
    }
    let v = catalog.version(dataset, None)?;
    // The version is claimed before anything is granted or charged: a second release at the same time
    // (a double click) is refused, not run beside the first.
    catalog.claim_card_release(dataset, &v.version.version, by)?;
    let released = release_claimed(engine, catalog, &v, by, epsilon, via).await;
    if released.is_err() {
        catalog.unclaim_card_release(dataset, &v.version.version)?;
    }
    released
}

async fn release_claimed(
    engine: &DpEngine,
    catalog: &SqliteCatalog,
    v: &VersionEntry,
    by: &str,
    epsilon: f64,
    via: &Via,
) -> Result<CardRelease> {
    let dataset = v.version.dataset.as_str();
    let asks = plan(v);
    if asks.is_empty() {
        return Err(Error::Config(format!("dataset '{dataset}' has no tables")));
    }
    let zcdp = v.version.accounting == "zcdp";
    let ledger = engine.ledger();
    let before = ledger.budget(CATALOG_PRINCIPAL, dataset)?;
    // What earlier releases spent stays spent; this release adds its own amount (under zCDP, the ρ whose
    // (ε, δ) equivalent is ε).
    let spent = before.as_ref().map_or((0.0, 0.0, 0.0), |b| {
        (b.spent_epsilon, b.spent_delta, b.spent_rho)
    });
    // Under zCDP half of δ converts ρ to its ε equivalent and half goes to key selection, so the release
    // as a whole is (ε, CARD_DELTA)-DP.
    let rho = zcdp.then(|| crate::access::rho_for(epsilon, CARD_DELTA / 2.0));
    ledger.set_budget(
        by,
        CATALOG_PRINCIPAL,
        dataset,
        spent.0 + epsilon,
        spent.1 + CARD_DELTA,
        rho.map(|r| spent.2 + r),
    )?;
    // The coverage query weighs more: its years are released by private key selection, whose threshold
    // falls as its ε grows, so a small share would release no year at all.
    let weight = |ask: &Ask| {
        if matches!(ask, Ask::Years(..)) {
            COVERAGE_WEIGHT
        } else {
            1.0
        }
    };
    let total_weight: f64 = asks.iter().map(weight).sum();
    let grouped = asks
        .iter()
        .filter(|a| !matches!(a, Ask::Rows(_)))
        .count()
        .max(1);
    // Shares are rounded down to the ledger's units, so together they never exceed what was granted.
    let share = |total: f64, part: f64| -> Result<f64> {
        let units = crate::audit::to_units(total)?;
        Ok(crate::audit::from_units(
            (units as f64 * part).floor() as i64
        ))
    };
    let key_delta = if zcdp { CARD_DELTA / 2.0 } else { CARD_DELTA };
    let delta_share = share(key_delta, 1.0 / grouped as f64)?;
    let mut shares = Vec::with_capacity(asks.len());
    for ask in &asks {
        shares.push(share(rho.unwrap_or(epsilon), weight(ask) / total_weight)?);
    }
    let options_for = |i: usize| QueryOptions {
        epsilon: Some(shares[i]),
        delta: Some(delta_share),
        via: Via {
            origin: format!("card release by {by}"),
            ..via.clone()
        },
        timeout: None,
        max_groups: None,
    };
    let mut figures = CardFigures {
        epsilon,
        queries: asks.len(),
        persons: None,
        rows: Vec::new(),
        row_caps: Vec::new(),
        records: None,
        coverage: None,
        histograms: Vec::new(),
        skipped: match left_out(v) {
            0 => Vec::new(),
            n => vec![format!(
                "{n} more categorical columns: a card releases at most {MAX_HISTOGRAMS} histograms"
            )],
        },
    };
    let person = person_table(v).map(str::to_owned);
    for (i, ask) in asks.iter().enumerate() {
        let (table, group) = match ask {
            Ask::Rows(t) => (t, None),
            Ask::Years(t, c) | Ask::Histogram(t, c) => (t, Some(c.as_str())),
        };
        let sql = count_sql(table, group)?;
        let answer = match engine
            .answer(CATALOG_PRINCIPAL, dataset, &sql, &options_for(i))
            .await
        {
            Ok(a) => a,
            // A rule refused the query (before running: nothing charged; while running: its cost
            // charged): say so on the card.
            Err(Error::Refused { rule, message, .. }) => {
                figures.skipped.push(format!(
                    "{table}{}: refused (rule '{}'): {message}",
                    group.map(|g| format!(".{g}")).unwrap_or_default(),
                    rule.name()
                ));
                continue;
            }
            Err(e) => return Err(e),
        };
        let released = counts(&answer);
        match ask {
            Ask::Rows(t) => {
                if let Some((_, f)) = released.into_iter().next() {
                    if person.as_deref() == Some(t.as_str()) {
                        figures.persons = Some(f.clone());
                    }
                    // The count is of rows within each person's bound; the same query's DP estimate of
                    // the rows bounding left out (each person up to its cap) is added back, so a table
                    // with many rows per person is not shown as small (post-processing of two releases).
                    let f = match answer.truncation {
                        Some(tr) if tr.rows_left_out.is_finite() => {
                            let out = tr.rows_left_out.max(0.0).round();
                            figures.row_caps.push((t.clone(), tr.cap_per_person));
                            Figure {
                                value: f.value + out,
                                scale: f.scale.hypot(tr.scale),
                                low: f.low + (out - tr.half_width_95).max(0.0),
                                high: f.high + out + tr.half_width_95,
                            }
                        }
                        _ => f,
                    };
                    figures.rows.push((t.clone(), f));
                }
            }
            Ask::Years(t, c) => {
                let years: Vec<i64> = released
                    .iter()
                    .filter_map(|(k, _)| k.as_deref()?.parse().ok())
                    .collect();
                if let (Some(first), Some(last)) = (years.iter().min(), years.iter().max()) {
                    figures.coverage = Some(Coverage {
                        table: t.clone(),
                        column: c.clone(),
                        first_year: *first,
                        last_year: *last,
                    });
                }
            }
            Ask::Histogram(t, c) => {
                let mut bins: Vec<(String, Figure)> = released
                    .into_iter()
                    .map(|(k, f)| (k.unwrap_or_else(|| "(none)".into()), f))
                    .collect();
                bins.sort_by(|a, b| a.0.cmp(&b.0));
                figures.histograms.push(Histogram {
                    table: t.clone(),
                    column: c.clone(),
                    bins,
                });
            }
        }
    }
    // All records: only when every table's count was released (a sum missing tables would be low).
    if !figures.rows.is_empty() && figures.rows.len() == v.version.tables.len() {
        let value = figures.rows.iter().map(|(_, f)| f.value).sum::<f64>();
        // The standard deviation of the summed noise (a Laplace scale b has deviation b·√2; under zCDP
        // the scales are Gaussian σ already).
        let sd = |b: f64| {
            if zcdp {
                b
            } else {
                b * std::f64::consts::SQRT_2
            }
        };
        let scale = figures
            .rows
            .iter()
            .map(|(_, f)| sd(f.scale).powi(2))
            .sum::<f64>()
            .sqrt();
        let (low, high) = figures
            .rows
            .iter()
            .fold((0.0, 0.0), |(l, h), (_, f)| (l + f.low, h + f.high));
        figures.records = Some(Figure {
            value,
            scale,
            low,
            high,
        });
    }
    let release = CardRelease {
        dataset: dataset.to_owned(),
        version: v.version.version.clone(),
        released_by: by.to_owned(),
        released_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        figures: serde_json::to_value(&figures)
            .map_err(|e| Error::Internal(format!("card figures: {e}")))?,
    };
    catalog.put_card_release(&release)?;
    Ok(release)
}

/// The released figures of a stored release.
pub fn figures(release: &CardRelease) -> Option<CardFigures> {
    serde_json::from_value(release.figures.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_queries_quote_whatever_the_catalog_names() {
        assert_eq!(
            count_sql("patients", None).expect("sql"),
            r#"SELECT COUNT(*) AS n FROM "patients""#
        );
        let odd = r#"a"b; DROP TABLE x; --"#;
        let sql = count_sql(odd, Some(odd)).expect("sql");
        assert_eq!(
            sql,
            r#"SELECT "a""b; DROP TABLE x; --" AS v, COUNT(*) AS n FROM "a""b; DROP TABLE x; --" GROUP BY "a""b; DROP TABLE x; --""#
        );
        // It parses back to one query over exactly that table.
        let parsed = Parser::parse_sql(&PostgreSqlDialect {}, &sql).expect("parses");
        assert_eq!(parsed.len(), 1);
    }
}
