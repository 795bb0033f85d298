//! The SQL front door: parses a query and checks its syntax tree against the refusal rules, before
//! DataFusion ever sees it.
//!
//! Everything is allow-listed: one `SELECT` over the dataset's tables, inner joins on `person_id` only,
//! a fixed set of scalar functions, aggregates over catalogued columns with declared bounds. Anything
//! else is refused with the [`Rule`] it breaks. What passes is handed on as the syntax tree itself
//! ([`Analyzed::statement`]), never as text: DataFusion plans that tree, and `plan.rs` rewrites the plan.
//!
//! Identifiers are compared as DataFusion resolves them: unquoted ones in lower case, quoted ones as
//! written. Aliases may not begin with `__`: the engine's own columns do.

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList,
    FunctionArguments, GroupByExpr, Ident, JoinConstraint, JoinOperator, ObjectName,
    ObjectNamePart, Query, Select, SelectItem, SetExpr, Statement, TableFactor, Value,
    ValueWithSpan, Visit, VisitMut, Visitor, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use catalog::{ColumnEntry, VersionEntry};

use super::rules::{Rule, refuse};
use crate::{Error, Result};

/// Scalar functions a query may use (in WHERE, group keys, and post-processing). Nothing user-defined.
/// Each is checked again on DataFusion's plan, where its totality argument is (`total.rs`).
pub(crate) const SCALAR_FUNCTIONS: &[&str] = &[
    "DATE_TRUNC",
    "DATE_PART",
    "EXTRACT",
    "FLOOR",
    "CEIL",
    "ROUND",
    "TRUNC",
    "ABS",
    "COALESCE",
    "NULLIF",
    "LOWER",
    "UPPER",
    "SUBSTR",
    "SUBSTRING",
    "LEFT",
    "LENGTH",
    "CHAR_LENGTH",
    "CHARACTER_LENGTH",
    "GREATEST",
    "LEAST",
    "POWER",
    "POW",
    "SQRT",
    "LN",
    "LOG10",
    "EXP",
    "SIGNUM",
];

/// The aggregates the engine computes with DP.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum AggKind {
    /// `COUNT(*)`.
    CountRows,
    /// `COUNT(col)`.
    CountValues,
    /// `COUNT(DISTINCT person_id)`.
    CountPersons,
    /// `SUM(col)`.
    Sum,
    /// `AVG(col)`.
    Avg,
    /// `VARIANCE(col)` (sample variance).
    Variance,
    /// `STDDEV(col)`.
    Stddev,
    /// `MEDIAN(col)` (α = 0.5) or `APPROX_PERCENTILE_CONT(col, α)`.
    Quantile(f64),
}

impl AggKind {
    /// A mean of values (AVG, VARIANCE, STDDEV): bounded by the tables' mean bounds.
    pub(crate) fn is_mean(&self) -> bool {
        matches!(self, AggKind::Avg | AggKind::Variance | AggKind::Stddev)
    }
}

/// One aggregate call of the query, as the front door validated it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Aggregate {
    /// Its canonical SQL text (to deduplicate equal calls).
    pub key: String,
    /// What it computes.
    pub kind: AggKind,
    /// Public clamping bounds of its argument.
    pub bounds: Option<(f64, f64)>,
}

/// A validated query: its syntax tree, ready for DataFusion's planner.
#[derive(Debug, Clone)]
pub(crate) struct Analyzed {
    /// The one `SELECT`, with function names canonical (upper case; `VARIANCE` → `VAR_SAMP`).
    pub statement: Statement,
    /// The tables referenced (catalog names).
    pub tables: Vec<String>,
    /// The aggregates the front door validated (the plan's must be among them).
    pub aggregates: Vec<Aggregate>,
}

/// An identifier as DataFusion resolves it: unquoted in lower case, quoted as written.
pub(crate) fn normalized(id: &Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

struct Scope<'a> {
    /// alias or table name (normalised) → (table name, its columns)
    tables: Vec<(String, String, &'a [ColumnEntry])>,
}

impl Scope<'_> {
    fn resolve(&self, parts: &[Ident]) -> Result<(&str, &ColumnEntry)> {
        match parts {
            [col] => {
                let name = normalized(col);
                let hits: Vec<_> = self
                    .tables
                    .iter()
                    .filter_map(|(_, t, cols)| {
                        cols.iter()
                            .find(|c| c.name == name)
                            .map(|c| (t.as_str(), c))
                    })
                    .collect();
                match hits.as_slice() {
                    [one] => Ok(*one),
                    [] => refuse(
                        Rule::UnknownColumn,
                        format!("no column '{name}' in {}", self.names()),
                    ),
                    _ => refuse(
                        Rule::AmbiguousColumn,
                        format!("column '{name}' is in several tables: qualify it"),
                    ),
                }
            }
            [q, col] => {
                let (q, name) = (normalized(q), normalized(col));
                let Some((_, t, cols)) = self.tables.iter().find(|(a, _, _)| *a == q) else {
                    return refuse(
                        Rule::UnknownColumn,
                        format!("no table or alias '{q}' in the query"),
                    );
                };
                match cols.iter().find(|c| c.name == name) {
                    Some(c) => Ok((t.as_str(), c)),
                    None => refuse(
                        Rule::UnknownColumn,
                        format!("table {t} has no column '{name}'"),
                    ),
                }
            }
            _ => refuse(Rule::Catalog, "only table.column references are allowed"),
        }
    }

    fn names(&self) -> String {
        self.tables
            .iter()
            .map(|(_, t, _)| t.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn function_name(f: &Function) -> String {
    f.name.to_string().to_uppercase()
}

fn is_aggregate_name(name: &str) -> bool {
    matches!(
        name,
        "COUNT"
            | "SUM"
            | "AVG"
            | "MEAN"
            | "VARIANCE"
            | "VAR"
            | "VAR_SAMP"
            | "VAR_POP"
            | "STDDEV"
            | "STDDEV_SAMP"
            | "STDDEV_POP"
            | "MEDIAN"
            | "APPROX_PERCENTILE_CONT"
            | "MIN"
            | "MAX"
            | "ARRAY_AGG"
            | "STRING_AGG"
            | "FIRST_VALUE"
            | "LAST_VALUE"
            | "BIT_AND"
            | "BIT_OR"
            | "BOOL_AND"
            | "BOOL_OR"
            | "CORR"
            | "COVAR"
            | "NTH_VALUE"
            | "GROUPING"
            | "APPROX_DISTINCT"
            | "APPROX_MEDIAN"
    )
}

/// Upper-cases function names so equal calls print equally, and gives aggregates the name DataFusion
/// knows them by (`VARIANCE` is `VAR_SAMP` there).
struct Canonical;
impl VisitorMut for Canonical {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            let upper = function_name(f);
            let name = match upper.as_str() {
                "VARIANCE" | "VAR" => "VAR_SAMP".to_owned(),
                _ => upper,
            };
            f.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(name))]);
        }
        ControlFlow::Continue(())
    }
}

/// Parses and validates `sql` against the dataset version's catalog entry.
pub(crate) fn analyze(sql: &str, version: &VersionEntry) -> Result<Analyzed> {
    let mut statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) => s,
        Err(e) => return refuse(Rule::Syntax, format!("the query does not parse: {e}")),
    };
    if statements.len() != 1 {
        return refuse(Rule::SingleSelect, "send exactly one SELECT statement");
    }
    let Some(Statement::Query(mut query)) = statements.pop() else {
        return refuse(Rule::SingleSelect, "only SELECT queries are accepted");
    };
    let _ = VisitMut::visit(&mut *query, &mut Canonical);
    check_query_shape(&query)?;
    if let SetExpr::Select(select) = &mut *query.body {
        unqualify_tables(select, &version.version.dataset)?;
    }
    let SetExpr::Select(select) = &*query.body else {
        return refuse(
            Rule::SingleSelect,
            "set operations (UNION, INTERSECT, …) and VALUES are not accepted",
        );
    };
    let scope = scope(select, version)?;
    check_joins(select)?;
    if let Some(w) = &select.selection {
        check_expr(w, &scope, false)?;
    }

    // Group keys (GROUP BY alias and GROUP BY position refer to the projection).
    let mut groups: Vec<Expr> = Vec::new();
    match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => {
            for g in exprs {
                groups.push(resolve_group_ref(g, &select.projection, &scope)?);
            }
        }
        _ => {
            return refuse(
                Rule::GroupBy,
                "GROUP BY ALL, ROLLUP, CUBE and GROUPING SETS are not accepted",
            );
        }
    }
    for g in &groups {
        check_expr(g, &scope, false)?;
        check_group_key(g, &scope)?;
    }
    let group_texts: Vec<String> = groups.iter().map(ToString::to_string).collect();

    // Aggregates from the projection, HAVING and ORDER BY.
    let mut aggregates: Vec<Aggregate> = Vec::new();
    let mut aliases: Vec<String> = Vec::new();
    for item in &select.projection {
        let expr = match item {
            SelectItem::UnnamedExpr(e) => e,
            SelectItem::ExprWithAlias { expr, alias } => {
                if alias.value.starts_with("__") {
                    return refuse(
                        Rule::ReservedName,
                        "output names beginning with '__' are the engine's own: choose another alias",
                    );
                }
                aliases.push(normalized(alias));
                expr
            }
            _ => {
                return refuse(
                    Rule::RowLevel,
                    "SELECT * and t.* release rows; select aggregates instead",
                );
            }
        };
        collect_aggregates(expr, &scope, &mut aggregates)?;
        check_post_expr(expr, &group_texts)?;
    }
    if aggregates.is_empty() {
        return refuse(
            Rule::RowLevel,
            "the query has no aggregate: only aggregates (COUNT, SUM, AVG, …) are released",
        );
    }
    if let Some(h) = &select.having {
        collect_aggregates(h, &scope, &mut aggregates)?;
        check_post_expr(h, &group_texts)?;
    }
    if let Some(ob) = &query.order_by {
        let datafusion::sql::sqlparser::ast::OrderByKind::Expressions(items) = &ob.kind else {
            return refuse(Rule::SingleSelect, "ORDER BY ALL is not accepted");
        };
        for o in items {
            let aliased =
                matches!(&o.expr, Expr::Identifier(id) if aliases.contains(&normalized(id)));
            if !aliased {
                collect_aggregates(&o.expr, &scope, &mut aggregates)?;
                check_post_expr(&o.expr, &group_texts)?;
            }
        }
    }
    let tables = scope.tables.iter().map(|(_, t, _)| t.clone()).collect();
    Ok(Analyzed {
        statement: Statement::Query(query),
        tables,
        aggregates,
    })
}

fn check_query_shape(q: &Query) -> Result<()> {
    if q.with.is_some() {
        return refuse(
            Rule::SingleSelect,
            "WITH (common table expressions) is not accepted",
        );
    }
    if q.fetch.is_some()
        || !q.locks.is_empty()
        || q.for_clause.is_some()
        || q.settings.is_some()
        || q.format_clause.is_some()
        || !q.pipe_operators.is_empty()
    {
        return refuse(
            Rule::SingleSelect,
            "only SELECT … FROM … [WHERE] [GROUP BY] [HAVING] [ORDER BY] [LIMIT] is accepted",
        );
    }
    if let Some(l) = &q.limit_clause {
        use datafusion::sql::sqlparser::ast::LimitClause;
        match l {
            LimitClause::LimitOffset {
                limit,
                offset,
                limit_by,
            } if limit_by.is_empty() => {
                for e in limit.iter().chain(offset.as_ref().map(|o| &o.value)) {
                    if !matches!(e, Expr::Value(_)) {
                        return refuse(Rule::SingleSelect, "LIMIT and OFFSET take numbers");
                    }
                }
            }
            _ => return refuse(Rule::SingleSelect, "only LIMIT n [OFFSET m] is accepted"),
        }
    }
    let SetExpr::Select(s) = &*q.body else {
        return refuse(
            Rule::SingleSelect,
            "set operations (UNION, INTERSECT, …) and VALUES are not accepted",
        );
    };
    if s.distinct.is_some() {
        return refuse(
            Rule::RowLevel,
            "SELECT DISTINCT releases values row by row; use GROUP BY with an aggregate",
        );
    }
    if s.into.is_some()
        || s.top.is_some()
        || !s.lateral_views.is_empty()
        || s.prewhere.is_some()
        || !s.connect_by.is_empty()
        || !s.cluster_by.is_empty()
        || !s.distribute_by.is_empty()
        || !s.sort_by.is_empty()
        || !s.named_window.is_empty()
        || s.qualify.is_some()
    {
        return refuse(
            Rule::SingleSelect,
            "only SELECT … FROM … [WHERE] [GROUP BY] [HAVING] [ORDER BY] [LIMIT] is accepted",
        );
    }
    if s.from.len() != 1 {
        return refuse(
            Rule::Join,
            "list tables with JOIN … ON a.person_id = b.person_id, not with commas",
        );
    }
    Ok(())
}

/// The FROM items of a SELECT (the first table and every joined one).
fn relations_mut(select: &mut Select) -> impl Iterator<Item = &mut TableFactor> {
    select.from.iter_mut().flat_map(|t| {
        std::iter::once(&mut t.relation).chain(t.joins.iter_mut().map(|j| &mut j.relation))
    })
}

/// Tables may name the dataset as their schema (`"demo-cohort".encounters`, as every protocol shows
/// datasets): the qualifier must be the query's dataset, and is removed from the tree so DataFusion
/// resolves the table in the dataset's own session.
fn unqualify_tables(select: &mut Select, dataset: &str) -> Result<()> {
    for factor in relations_mut(select) {
        let TableFactor::Table { name, .. } = factor else {
            continue;
        };
        if let [
            ObjectNamePart::Identifier(schema),
            ObjectNamePart::Identifier(table),
        ] = name.0.as_slice()
        {
            if normalized(schema) != dataset {
                return refuse(
                    Rule::Catalog,
                    format!(
                        "'{name}' is not in dataset '{dataset}', which this query runs on (one dataset per query)"
                    ),
                );
            }
            *name = ObjectName(vec![ObjectNamePart::Identifier(table.clone())]);
        }
    }
    Ok(())
}

/// The dataset a query names as its tables' schema (`SELECT … FROM demo.encounters` → `demo`), when
/// every qualified table names the same one; `None` when no table is qualified or the query does not
/// parse as one SELECT (the front door then says why). Protocols without a dataset field use it.
pub fn dataset_named_in(sql: &str) -> Option<String> {
    let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).ok()?;
    let Some(Statement::Query(mut query)) = statements.pop() else {
        return None;
    };
    let SetExpr::Select(select) = &mut *query.body else {
        return None;
    };
    let mut named = None;
    for factor in relations_mut(select) {
        if let TableFactor::Table { name, .. } = factor
            && let [ObjectNamePart::Identifier(schema), _] = name.0.as_slice()
        {
            let schema = normalized(schema);
            match &named {
                Some(n) if *n != schema => return None,
                _ => named = Some(schema),
            }
        }
    }
    named
}

/// The table a FROM item names and the name the query refers to it by (its alias, else the table), both
/// normalised as DataFusion resolves them.
fn relation_name(factor: &TableFactor) -> Result<(String, String)> {
    let TableFactor::Table {
        name,
        alias,
        args: None,
        ..
    } = factor
    else {
        return refuse(
            Rule::SingleSelect,
            "subqueries and table functions in FROM are not accepted",
        );
    };
    let table = match name.0.as_slice() {
        [ObjectNamePart::Identifier(t)] => normalized(t),
        _ => {
            return refuse(
                Rule::Catalog,
                format!(
                    "'{name}' is not a table of this dataset (no schemas, no information_schema)"
                ),
            );
        }
    };
    if let Some(a) = alias
        && !a.columns.is_empty()
    {
        return refuse(
            Rule::SingleSelect,
            "column aliases on a table (AS t(a, b)) are not accepted",
        );
    }
    let referred = alias
        .as_ref()
        .map_or(table.clone(), |a| normalized(&a.name));
    Ok((table, referred))
}

fn scope<'a>(select: &Select, version: &'a VersionEntry) -> Result<Scope<'a>> {
    let mut tables: Vec<(String, String, &[ColumnEntry])> = Vec::new();
    let twj = &select.from[0];
    for factor in std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation)) {
        let (table, alias_name) = relation_name(factor)?;
        let Some(entry) = version.version.table(&table) else {
            let known = version
                .version
                .tables
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return refuse(
                Rule::Catalog,
                format!(
                    "'{table}' is not a table of dataset {} (tables: {known})",
                    version.version.dataset
                ),
            );
        };
        if tables.iter().any(|(a, _, _)| *a == alias_name) {
            return refuse(
                Rule::Join,
                format!("'{alias_name}' appears twice: give each table its own alias"),
            );
        }
        tables.push((alias_name, table, entry.columns.as_slice()));
    }
    Ok(Scope { tables })
}

fn check_joins(select: &Select) -> Result<()> {
    let twj = &select.from[0];
    let mut seen = vec![relation_name(&twj.relation)?.1];
    for j in &twj.joins {
        let this = relation_name(&j.relation)?.1;
        let on = match &j.join_operator {
            JoinOperator::Join(JoinConstraint::On(e))
            | JoinOperator::Inner(JoinConstraint::On(e)) => e,
            _ => {
                return refuse(
                    Rule::Join,
                    "only INNER JOIN … ON a.person_id = b.person_id is accepted",
                );
            }
        };
        let ok = match on {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => match (&**left, &**right) {
                (Expr::CompoundIdentifier(l), Expr::CompoundIdentifier(r))
                    if l.len() == 2 && r.len() == 2 =>
                {
                    let [lt, lc, rt, rc] = [&l[0], &l[1], &r[0], &r[1]].map(normalized);
                    lc == "person_id"
                        && rc == "person_id"
                        && ((lt == this && seen.contains(&rt))
                            || (rt == this && seen.contains(&lt)))
                }
                _ => false,
            },
            _ => false,
        };
        if !ok {
            return refuse(
                Rule::Join,
                format!(
                    "join {this} on person_id only: ON {this}.person_id = <earlier table>.person_id"
                ),
            );
        }
        seen.push(this);
    }
    Ok(())
}

/// What a GROUP BY item groups by, as DataFusion reads it: a position names a SELECT item; a name that
/// is a column of the query's tables is that column (even where an output alias has the same name);
/// another name is an output alias.
fn resolve_group_ref(g: &Expr, projection: &[SelectItem], scope: &Scope<'_>) -> Result<Expr> {
    if let Expr::Value(ValueWithSpan {
        value: Value::Number(n, _),
        ..
    }) = g
    {
        let i: usize = n.parse().unwrap_or(0);
        return match projection.get(i.wrapping_sub(1)) {
            Some(SelectItem::UnnamedExpr(e)) | Some(SelectItem::ExprWithAlias { expr: e, .. }) => {
                Ok(e.clone())
            }
            _ => refuse(
                Rule::GroupBy,
                format!("GROUP BY {n} names no column of the SELECT list"),
            ),
        };
    }
    if let Expr::Identifier(id) = g {
        if scope.resolve(std::slice::from_ref(id)).is_ok() {
            return Ok(g.clone());
        }
        for item in projection {
            if let SelectItem::ExprWithAlias { expr, alias } = item
                && normalized(alias) == normalized(id)
            {
                return Ok(expr.clone());
            }
        }
    }
    Ok(g.clone())
}

/// Walks an expression: every column must resolve, every function must be allowed; aggregates only where
/// `aggregates_allowed` (they are collected separately).
fn check_expr(e: &Expr, scope: &Scope<'_>, aggregates_allowed: bool) -> Result<()> {
    struct Check<'s, 'a> {
        scope: &'s Scope<'a>,
        aggregates_allowed: bool,
        err: Option<Error>,
    }
    impl Visitor for Check<'_, '_> {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            let r: Result<()> = match e {
                Expr::Identifier(id) => self.scope.resolve(std::slice::from_ref(id)).map(|_| ()),
                Expr::CompoundIdentifier(parts) => self.scope.resolve(parts).map(|_| ()),
                Expr::Subquery(_) | Expr::InSubquery { .. } | Expr::Exists { .. } => {
                    refuse(Rule::SingleSelect, "subqueries are not accepted")
                }
                Expr::Function(f) => {
                    let name = function_name(f);
                    if is_aggregate_name(&name) {
                        if self.aggregates_allowed {
                            Ok(())
                        } else {
                            refuse(Rule::AggregatePlace, format!("{name} is not allowed here"))
                        }
                    } else if SCALAR_FUNCTIONS.contains(&name.as_str()) {
                        if f.over.is_some() || f.filter.is_some() {
                            refuse(
                                Rule::Function,
                                "window functions and FILTER are not accepted",
                            )
                        } else {
                            Ok(())
                        }
                    } else {
                        refuse(
                            Rule::Function,
                            format!(
                                "function {name} is not allowed (user-defined and unlisted functions are refused)"
                            ),
                        )
                    }
                }
                _ => Ok(()),
            };
            match r {
                Ok(()) => ControlFlow::Continue(()),
                Err(err) => {
                    self.err = Some(err);
                    ControlFlow::Break(())
                }
            }
        }
    }
    let mut c = Check {
        scope,
        aggregates_allowed,
        err: None,
    };
    let _ = Visit::visit(e, &mut c);
    c.err.map_or(Ok(()), Err)
}

fn columns_of(e: &Expr) -> Vec<Vec<Ident>> {
    struct Cols(Vec<Vec<Ident>>);
    impl Visitor for Cols {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            match e {
                Expr::Identifier(id) => self.0.push(vec![id.clone()]),
                Expr::CompoundIdentifier(p) => self.0.push(p.clone()),
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    let mut c = Cols(Vec::new());
    let _ = Visit::visit(e, &mut c);
    c.0
}

fn check_group_key(g: &Expr, scope: &Scope<'_>) -> Result<()> {
    for parts in columns_of(g) {
        let (table, col) = scope.resolve(&parts)?;
        if col.name == "person_id" {
            return refuse(
                Rule::PerPersonKey,
                "GROUP BY person_id would release one value per person",
            );
        }
        if col.role == "identifier" {
            return refuse(
                Rule::Identifier,
                format!(
                    "{table}.{} is an identifier: it cannot be a group key",
                    col.name
                ),
            );
        }
    }
    Ok(())
}

/// Columns outside aggregates in a post-processed expression must be group keys.
fn check_post_expr(e: &Expr, groups: &[String]) -> Result<()> {
    /// Replaces group keys and aggregate calls by a marker; pre-order, so their insides are not visited.
    struct Prune<'g>(&'g [String]);
    impl VisitorMut for Prune<'_> {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
            let aggregate = matches!(e, Expr::Function(f) if is_aggregate_name(&function_name(f)));
            if aggregate || self.0.contains(&e.to_string()) {
                *e = Expr::Identifier(Ident::new(PRUNED));
            }
            ControlFlow::Continue(())
        }
    }
    const PRUNED: &str = "__pruned";
    let mut copy = e.clone();
    let _ = VisitMut::visit(&mut copy, &mut Prune(groups));
    match columns_of(&copy)
        .into_iter()
        .find(|p| !(p.len() == 1 && p[0].value == PRUNED))
    {
        Some(col) => {
            let name = col
                .iter()
                .map(|i| i.value.as_str())
                .collect::<Vec<_>>()
                .join(".");
            refuse(
                Rule::RowLevel,
                format!("'{name}' is neither a group key nor inside an aggregate"),
            )
        }
        None => Ok(()),
    }
}

fn arg_list(f: &Function) -> Result<&FunctionArgumentList> {
    match &f.args {
        FunctionArguments::List(l) if l.clauses.is_empty() => Ok(l),
        _ => refuse(
            Rule::Function,
            format!("{} takes a plain argument list", function_name(f)),
        ),
    }
}

fn collect_aggregates(e: &Expr, scope: &Scope<'_>, out: &mut Vec<Aggregate>) -> Result<()> {
    check_expr(e, scope, true)?;
    struct Collect<'s, 'a, 'o> {
        scope: &'s Scope<'a>,
        out: &'o mut Vec<Aggregate>,
        err: Option<Error>,
    }
    impl Visitor for Collect<'_, '_, '_> {
        type Break = ();
        fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
            if let Expr::Function(f) = e
                && is_aggregate_name(&function_name(f))
            {
                {
                    match aggregate(f, self.scope) {
                        Ok(a) => {
                            if !self.out.iter().any(|x| x.key == a.key) {
                                self.out.push(a);
                            }
                        }
                        Err(err) => {
                            self.err = Some(err);
                            return ControlFlow::Break(());
                        }
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    let mut c = Collect {
        scope,
        out,
        err: None,
    };
    let _ = Visit::visit(e, &mut c);
    c.err.map_or(Ok(()), Err)
}

fn aggregate(f: &Function, scope: &Scope<'_>) -> Result<Aggregate> {
    let name = function_name(f);
    let key = Expr::Function(f.clone()).to_string();
    if f.over.is_some() || f.filter.is_some() || !f.within_group.is_empty() {
        return refuse(
            Rule::Function,
            format!("{name} with OVER, FILTER or WITHIN GROUP is not accepted"),
        );
    }
    if matches!(name.as_str(), "MIN" | "MAX") {
        return refuse(
            Rule::MinMax,
            format!(
                "{name} releases one person's value; use APPROX_PERCENTILE_CONT(col, 0.01 / 0.99) or MEDIAN instead"
            ),
        );
    }
    let list = arg_list(f)?;
    let distinct = matches!(
        list.duplicate_treatment,
        Some(datafusion::sql::sqlparser::ast::DuplicateTreatment::Distinct)
    );
    let args: Vec<&FunctionArgExpr> = list
        .args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(x) => Ok(x),
            _ => refuse(Rule::Function, format!("{name} takes positional arguments")),
        })
        .collect::<Result<_>>()?;
    let column = |i: usize| -> Result<(String, &ColumnEntry)> {
        match args.get(i) {
            Some(FunctionArgExpr::Expr(e @ Expr::Identifier(id))) => {
                Ok((e.to_string(), scope.resolve(std::slice::from_ref(id))?.1))
            }
            Some(FunctionArgExpr::Expr(e @ Expr::CompoundIdentifier(parts))) => {
                Ok((e.to_string(), scope.resolve(parts)?.1))
            }
            Some(FunctionArgExpr::Expr(_)) => refuse(
                Rule::Bounds,
                format!("{name} takes a catalogued column: expressions have no declared bounds"),
            ),
            _ => refuse(Rule::Function, format!("{name} needs a column argument")),
        }
    };
    let bounded = |i: usize| -> Result<(String, (f64, f64))> {
        let (text, col) = column(i)?;
        if col.role == "identifier" {
            return refuse(
                Rule::Identifier,
                format!("{} is an identifier: it cannot be aggregated", col.name),
            );
        }
        match (col.lower, col.upper) {
            (Some(l), Some(u)) => Ok((text, (l, u))),
            _ => refuse(
                Rule::Bounds,
                format!(
                    "{} has no declared bounds, so {name} over it has no bounded sensitivity",
                    col.name
                ),
            ),
        }
    };
    let (kind, _arg, bounds) = match name.as_str() {
        "COUNT" => match args.as_slice() {
            [FunctionArgExpr::Wildcard] if !distinct => (AggKind::CountRows, None, None),
            [_] if distinct => {
                let (text, col) = column(0)?;
                if col.name != "person_id" {
                    return refuse(
                        Rule::CountDistinct,
                        "COUNT(DISTINCT …) is accepted for person_id only",
                    );
                }
                (AggKind::CountPersons, Some(text), None)
            }
            [_] => {
                let (text, col) = column(0)?;
                if col.role == "identifier" {
                    return refuse(
                        Rule::Identifier,
                        format!(
                            "{} is an identifier: count rows with COUNT(*) instead",
                            col.name
                        ),
                    );
                }
                (AggKind::CountValues, Some(text), None)
            }
            _ => return refuse(Rule::Function, "COUNT takes * or one column"),
        },
        _ if distinct => {
            return refuse(
                Rule::Function,
                format!("{name}(DISTINCT …) is not accepted"),
            );
        }
        "SUM" | "AVG" | "MEAN" | "VARIANCE" | "VAR" | "VAR_SAMP" | "STDDEV" | "STDDEV_SAMP" => {
            if args.len() != 1 {
                return refuse(Rule::Function, format!("{name} takes one column"));
            }
            let (text, b) = bounded(0)?;
            let kind = match name.as_str() {
                "SUM" => AggKind::Sum,
                "AVG" | "MEAN" => AggKind::Avg,
                "VARIANCE" | "VAR" | "VAR_SAMP" => AggKind::Variance,
                _ => AggKind::Stddev,
            };
            (kind, Some(text), Some(b))
        }
        "MEDIAN" => {
            if args.len() != 1 {
                return refuse(Rule::Function, "MEDIAN takes one column");
            }
            let (text, b) = bounded(0)?;
            (AggKind::Quantile(0.5), Some(text), Some(b))
        }
        "APPROX_PERCENTILE_CONT" => {
            let (text, b) = bounded(0)?;
            let alpha = match args.get(1) {
                Some(FunctionArgExpr::Expr(Expr::Value(ValueWithSpan {
                    value: Value::Number(n, _),
                    ..
                }))) => n.parse::<f64>().ok(),
                _ => None,
            };
            match alpha {
                Some(a) if args.len() == 2 && a > 0.0 && a < 1.0 => {
                    (AggKind::Quantile(a), Some(text), Some(b))
                }
                _ => {
                    return refuse(
                        Rule::Function,
                        "APPROX_PERCENTILE_CONT(column, p) needs a number p strictly between 0 and 1",
                    );
                }
            }
        }
        other => {
            return refuse(
                Rule::Function,
                format!(
                    "aggregate {other} is not offered (COUNT, SUM, AVG, VARIANCE, STDDEV, MEDIAN, APPROX_PERCENTILE_CONT are)"
                ),
            );
        }
    };
    Ok(Aggregate { key, kind, bounds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dataset_a_query_names_is_its_tables_common_schema() {
        for (sql, want) in [
            ("SELECT COUNT(*) FROM demo.encounters", Some("demo")),
            (
                "SELECT COUNT(*) FROM \"diabetes-2026\".encounters",
                Some("diabetes-2026"),
            ),
            (
                "SELECT COUNT(*) FROM DEMO.encounters e JOIN demo.patients p ON p.person_id = e.person_id",
                Some("demo"),
            ),
            ("SELECT COUNT(*) FROM encounters", None),
            (
                "SELECT COUNT(*) FROM a.encounters e JOIN b.patients p ON p.person_id = e.person_id",
                None,
            ),
            ("DROP TABLE demo.encounters", None),
            ("not sql", None),
        ] {
            assert_eq!(dataset_named_in(sql).as_deref(), want, "{sql}");
        }
    }
}
