//! The SQL front door: parses a query, checks it against the refusal rules, and extracts what the DP
//! engine computes (group keys and aggregates) from what is post-processing (HAVING, ORDER BY, LIMIT,
//! arithmetic over aggregates).
//!
//! Everything is allow-listed: one `SELECT` over the dataset's tables, inner joins on `person_id` only,
//! a fixed set of scalar functions, aggregates over catalogued columns with declared bounds. Anything
//! else is refused with the name of the rule it breaks.

use std::collections::HashMap;
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

use crate::{Error, Result};

/// A refusal: which rule, and what to tell the user.
pub(crate) fn refuse<T>(rule: &str, message: impl Into<String>) -> Result<T> {
    Err(Error::Refused {
        rule: rule.to_owned(),
        message: message.into(),
    })
}

/// Scalar functions a query may use (in WHERE, group keys, and post-processing). Nothing user-defined.
const SCALAR_FUNCTIONS: &[&str] = &[
    "DATE_TRUNC",
    "DATE_PART",
    "DATE_BIN",
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
    "TO_CHAR",
    "GREATEST",
    "LEAST",
    "POWER",
    "SQRT",
    "LN",
    "LOG10",
    "EXP",
    "SIGN",
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

/// One aggregate call of the query.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Aggregate {
    /// Its canonical SQL text (the key post-processing refers to it by).
    pub key: String,
    /// What it computes.
    pub kind: AggKind,
    /// Its argument column (SQL, qualified as written), when it has one.
    pub arg: Option<String>,
    /// Public clamping bounds of the argument.
    pub bounds: Option<(f64, f64)>,
}

/// A validated query, split into what DP computes and what is post-processing.
#[derive(Debug, Clone)]
pub(crate) struct Analyzed {
    /// The FROM clause as written (tables of the dataset, inner joins on person_id).
    pub from: String,
    /// The person key of the first table (qualified).
    pub person: String,
    /// WHERE, as written.
    pub selection: Option<String>,
    /// Group-key expressions.
    pub groups: Vec<String>,
    /// The public domain of each group key that is a bare column with a declared domain.
    pub group_domains: Vec<Option<Vec<String>>>,
    /// Aggregates, deduplicated.
    pub aggregates: Vec<Aggregate>,
    /// The post-processing query over the noisy table `noisy` (columns `__g{i}` and `__a{j}`).
    pub post: String,
    /// For each output column: the aggregate it shows unchanged, if any (its interval applies).
    pub output_aggregates: Vec<Option<usize>>,
    /// The tables referenced.
    pub tables: Vec<String>,
    /// The name each table goes by in the query (its alias, or its name), in FROM order.
    pub aliases: Vec<String>,
}

impl Analyzed {
    /// True when every group key has a declared public domain (every key is released, no selection).
    pub(crate) fn public_groups(&self) -> bool {
        !self.groups.is_empty() && self.group_domains.iter().all(Option::is_some)
    }
}

struct Scope<'a> {
    /// alias or table name → (table name, its columns)
    tables: Vec<(String, String, &'a [ColumnEntry])>,
    /// How the query refers to each table (alias or name, quoted as written), for generated SQL.
    written: Vec<String>,
}

impl Scope<'_> {
    fn resolve(&self, parts: &[Ident]) -> Result<(&str, &ColumnEntry)> {
        match parts {
            [col] => {
                let hits: Vec<_> = self
                    .tables
                    .iter()
                    .filter_map(|(_, t, cols)| {
                        cols.iter()
                            .find(|c| c.name == col.value)
                            .map(|c| (t.as_str(), c))
                    })
                    .collect();
                match hits.as_slice() {
                    [one] => Ok(*one),
                    [] => refuse(
                        "unknown-column",
                        format!("no column '{}' in {}", col.value, self.names()),
                    ),
                    _ => refuse(
                        "ambiguous-column",
                        format!("column '{}' is in several tables: qualify it", col.value),
                    ),
                }
            }
            [q, col] => {
                let Some((_, t, cols)) = self.tables.iter().find(|(a, _, _)| *a == q.value) else {
                    return refuse(
                        "unknown-column",
                        format!("no table or alias '{}' in the query", q.value),
                    );
                };
                match cols.iter().find(|c| c.name == col.value) {
                    Some(c) => Ok((t.as_str(), c)),
                    None => refuse(
                        "unknown-column",
                        format!("table {t} has no column '{}'", col.value),
                    ),
                }
            }
            _ => refuse("catalog", "only table.column references are allowed"),
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

/// Upper-cases function names so equal calls print equally.
struct Canonical;
impl VisitorMut for Canonical {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = e {
            let upper = function_name(f);
            f.name = ObjectName(vec![ObjectNamePart::Identifier(Ident::new(upper))]);
        }
        ControlFlow::Continue(())
    }
}

/// Replaces sub-expressions whose text is in `map` by identifiers (pre-order: outermost match wins).
struct Replace<'a>(&'a HashMap<String, String>);
impl VisitorMut for Replace<'_> {
    type Break = ();
    fn pre_visit_expr(&mut self, e: &mut Expr) -> ControlFlow<()> {
        if let Some(name) = self.0.get(&e.to_string()) {
            *e = Expr::Identifier(Ident::new(name.clone()));
        }
        ControlFlow::Continue(())
    }
}

/// Parses and validates `sql` against the dataset version's catalog entry.
pub(crate) fn analyze(sql: &str, version: &VersionEntry) -> Result<Analyzed> {
    let mut statements = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) => s,
        Err(e) => return refuse("syntax", format!("the query does not parse: {e}")),
    };
    if statements.len() != 1 {
        return refuse("single-select", "send exactly one SELECT statement");
    }
    let Some(Statement::Query(mut query)) = statements.pop() else {
        return refuse("single-select", "only SELECT queries are accepted");
    };
    let _ = VisitMut::visit(&mut *query, &mut Canonical);
    check_query_shape(&query)?;
    let SetExpr::Select(select) = &*query.body else {
        return refuse(
            "single-select",
            "set operations (UNION, INTERSECT, …) and VALUES are not accepted",
        );
    };
    let scope = scope(select, version)?;
    let from = select.from[0].to_string();
    let person = format!("{}.person_id", scope.tables[0].0);
    check_joins(select)?;
    if let Some(w) = &select.selection {
        check_expr(w, &scope, false)?;
    }

    // Group keys (GROUP BY alias and GROUP BY position refer to the projection).
    let mut groups: Vec<Expr> = Vec::new();
    match &select.group_by {
        GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => {
            for g in exprs {
                groups.push(resolve_group_ref(g, &select.projection)?);
            }
        }
        _ => {
            return refuse(
                "group-by",
                "GROUP BY ALL, ROLLUP, CUBE and GROUPING SETS are not accepted",
            );
        }
    }
    for g in &groups {
        check_expr(g, &scope, false)?;
        check_group_key(g, &scope)?;
    }
    let group_texts: Vec<String> = groups.iter().map(ToString::to_string).collect();
    let group_domains: Vec<Option<Vec<String>>> = groups
        .iter()
        .map(|g| match g {
            Expr::Identifier(id) => scope
                .resolve(std::slice::from_ref(id))
                .ok()
                .and_then(|(_, c)| c.domain.clone()),
            Expr::CompoundIdentifier(p) => {
                scope.resolve(p).ok().and_then(|(_, c)| c.domain.clone())
            }
            _ => None,
        })
        .collect();

    // Aggregates from the projection, HAVING and ORDER BY.
    let mut aggregates: Vec<Aggregate> = Vec::new();
    let mut projected = Vec::new();
    for item in &select.projection {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.value.clone())),
            _ => {
                return refuse(
                    "row-level",
                    "SELECT * and t.* release rows; select aggregates instead",
                );
            }
        };
        collect_aggregates(expr, &scope, &mut aggregates)?;
        check_post_expr(expr, &group_texts)?;
        projected.push((expr.clone(), alias));
    }
    if aggregates.is_empty() {
        return refuse(
            "row-level",
            "the query has no aggregate: only aggregates (COUNT, SUM, AVG, …) are released",
        );
    }
    if let Some(h) = &select.having {
        collect_aggregates(h, &scope, &mut aggregates)?;
        check_post_expr(h, &group_texts)?;
    }
    if let Some(ob) = &query.order_by
        && let datafusion::sql::sqlparser::ast::OrderByKind::Expressions(items) = &ob.kind
    {
        {
            for o in items {
                let aliased = projected
                    .iter()
                    .any(|(_, a)| a.as_deref() == Some(o.expr.to_string().as_str()));
                if !aliased {
                    collect_aggregates(&o.expr, &scope, &mut aggregates)?;
                    check_post_expr(&o.expr, &group_texts)?;
                }
            }
        }
    }

    // The post-processing query: the user's own query, over the noisy table.
    let mut names = HashMap::new();
    for (i, a) in aggregates.iter().enumerate() {
        names.insert(a.key.clone(), format!("__a{i}"));
    }
    for (i, g) in group_texts.iter().enumerate() {
        names.insert(g.clone(), format!("__g{i}"));
    }
    let mut post = (*query).clone();
    let mut output_aggregates = Vec::new();
    {
        let SetExpr::Select(s) = &mut *post.body else {
            return Err(Error::Internal("select vanished".into()));
        };
        let s: &mut Select = s;
        s.from = vec![datafusion::sql::sqlparser::ast::TableWithJoins {
            relation: TableFactor::Table {
                name: ObjectName(vec![ObjectNamePart::Identifier(Ident::new("noisy"))]),
                alias: None,
                args: None,
                with_hints: vec![],
                version: None,
                with_ordinality: false,
                partitions: vec![],
                json_path: None,
                sample: None,
                index_hints: vec![],
            },
            joins: vec![],
        }];
        s.selection = s.having.take();
        s.group_by = GroupByExpr::Expressions(vec![], vec![]);
        for (item, (expr, alias)) in s.projection.iter_mut().zip(&projected) {
            output_aggregates.push(aggregates.iter().position(|a| a.key == expr.to_string()));
            // Keep the user's column name: the alias, or the expression as written.
            let name = alias.clone().unwrap_or_else(|| match expr {
                Expr::CompoundIdentifier(parts) => parts
                    .last()
                    .map_or_else(|| expr.to_string(), |p| p.value.clone()),
                Expr::Identifier(id) => id.value.clone(),
                _ => expr.to_string(),
            });
            *item = SelectItem::ExprWithAlias {
                expr: expr.clone(),
                alias: Ident::with_quote('"', name),
            };
        }
        // Hidden columns that carry each shown aggregate's interval through HAVING, ORDER BY and LIMIT.
        for (i, j) in output_aggregates.iter().enumerate() {
            if let Some(j) = j {
                for side in ["lo", "hi"] {
                    s.projection.push(SelectItem::ExprWithAlias {
                        expr: Expr::Identifier(Ident::new(format!("__a{j}__{side}"))),
                        alias: Ident::new(format!("__{side}{i}")),
                    });
                }
            }
        }
    }
    let _ = VisitMut::visit(&mut post, &mut Replace(&names));
    Ok(Analyzed {
        from,
        person,
        selection: select.selection.as_ref().map(ToString::to_string),
        groups: group_texts,
        group_domains,
        aggregates,
        post: post.to_string(),
        output_aggregates,
        tables: scope.tables.iter().map(|(_, t, _)| t.clone()).collect(),
        aliases: scope.written.clone(),
    })
}

fn check_query_shape(q: &Query) -> Result<()> {
    if q.with.is_some() {
        return refuse(
            "single-select",
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
            "single-select",
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
                        return refuse("single-select", "LIMIT and OFFSET take numbers");
                    }
                }
            }
            _ => return refuse("single-select", "only LIMIT n [OFFSET m] is accepted"),
        }
    }
    let SetExpr::Select(s) = &*q.body else {
        return refuse(
            "single-select",
            "set operations (UNION, INTERSECT, …) and VALUES are not accepted",
        );
    };
    if s.distinct.is_some() {
        return refuse(
            "row-level",
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
            "single-select",
            "only SELECT … FROM … [WHERE] [GROUP BY] [HAVING] [ORDER BY] [LIMIT] is accepted",
        );
    }
    if s.from.len() != 1 {
        return refuse(
            "join",
            "list tables with JOIN … ON a.person_id = b.person_id, not with commas",
        );
    }
    Ok(())
}

fn scope<'a>(select: &Select, version: &'a VersionEntry) -> Result<Scope<'a>> {
    let mut tables = Vec::new();
    let mut written = Vec::new();
    let twj = &select.from[0];
    for factor in std::iter::once(&twj.relation).chain(twj.joins.iter().map(|j| &j.relation)) {
        let TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } = factor
        else {
            return refuse(
                "single-select",
                "subqueries and table functions in FROM are not accepted",
            );
        };
        let parts: Vec<String> = name.0.iter().map(|p| p.to_string()).collect();
        let table = match parts.as_slice() {
            [t] => t.trim_matches('"').to_owned(),
            _ => {
                return refuse(
                    "catalog",
                    format!(
                        "'{name}' is not a table of this dataset (no schemas, no information_schema)"
                    ),
                );
            }
        };
        let Some(entry) = version.version.tables.iter().find(|t| t.name == table) else {
            let known = version
                .version
                .tables
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return refuse(
                "catalog",
                format!(
                    "'{table}' is not a table of dataset {} (tables: {known})",
                    version.version.dataset
                ),
            );
        };
        let alias_name = alias
            .as_ref()
            .map_or(table.clone(), |a| a.name.value.clone());
        written.push(
            alias
                .as_ref()
                .map_or(name.to_string(), |a| a.name.to_string()),
        );
        if tables.iter().any(|(a, _, _)| *a == alias_name) {
            return refuse(
                "join",
                format!("'{alias_name}' appears twice: give each table its own alias"),
            );
        }
        tables.push((alias_name, table, entry.columns.as_slice()));
    }
    Ok(Scope { tables, written })
}

fn check_joins(select: &Select) -> Result<()> {
    let twj = &select.from[0];
    let first = match &twj.relation {
        TableFactor::Table { name, alias, .. } => alias
            .as_ref()
            .map_or(name.to_string(), |a| a.name.value.clone()),
        _ => return refuse("single-select", "subqueries in FROM are not accepted"),
    };
    let mut seen = vec![first];
    for j in &twj.joins {
        let this = match &j.relation {
            TableFactor::Table { name, alias, .. } => alias
                .as_ref()
                .map_or(name.to_string(), |a| a.name.value.clone()),
            _ => return refuse("single-select", "subqueries in FROM are not accepted"),
        };
        let on = match &j.join_operator {
            JoinOperator::Join(JoinConstraint::On(e))
            | JoinOperator::Inner(JoinConstraint::On(e)) => e,
            _ => {
                return refuse(
                    "join",
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
                    let (lt, lc, rt, rc) = (&l[0].value, &l[1].value, &r[0].value, &r[1].value);
                    lc == "person_id"
                        && rc == "person_id"
                        && ((lt == &this && seen.contains(rt))
                            || (rt == &this && seen.contains(lt)))
                }
                _ => false,
            },
            _ => false,
        };
        if !ok {
            return refuse(
                "join",
                format!(
                    "join {this} on person_id only: ON {this}.person_id = <earlier table>.person_id"
                ),
            );
        }
        seen.push(this);
    }
    Ok(())
}

fn resolve_group_ref(g: &Expr, projection: &[SelectItem]) -> Result<Expr> {
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
                "group-by",
                format!("GROUP BY {n} names no column of the SELECT list"),
            ),
        };
    }
    if let Expr::Identifier(id) = g {
        for item in projection {
            if let SelectItem::ExprWithAlias { expr, alias } = item
                && alias.value == id.value
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
                    refuse("single-select", "subqueries are not accepted")
                }
                Expr::Function(f) => {
                    let name = function_name(f);
                    if is_aggregate_name(&name) {
                        if self.aggregates_allowed {
                            Ok(())
                        } else {
                            refuse("aggregate-place", format!("{name} is not allowed here"))
                        }
                    } else if SCALAR_FUNCTIONS.contains(&name.as_str()) {
                        if f.over.is_some() || f.filter.is_some() {
                            refuse("function", "window functions and FILTER are not accepted")
                        } else {
                            Ok(())
                        }
                    } else {
                        refuse(
                            "function",
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
                "per-person-key",
                "GROUP BY person_id would release one value per person",
            );
        }
        if col.role == "identifier" {
            return refuse(
                "identifier",
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
                "row-level",
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
            "function",
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
            "function",
            format!("{name} with OVER, FILTER or WITHIN GROUP is not accepted"),
        );
    }
    if matches!(name.as_str(), "MIN" | "MAX") {
        return refuse(
            "min-max",
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
            _ => refuse("function", format!("{name} takes positional arguments")),
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
                "bounds",
                format!("{name} takes a catalogued column: expressions have no declared bounds"),
            ),
            _ => refuse("function", format!("{name} needs a column argument")),
        }
    };
    let bounded = |i: usize| -> Result<(String, (f64, f64))> {
        let (text, col) = column(i)?;
        if col.role == "identifier" {
            return refuse(
                "identifier",
                format!("{} is an identifier: it cannot be aggregated", col.name),
            );
        }
        match (col.lower, col.upper) {
            (Some(l), Some(u)) => Ok((text, (l, u))),
            _ => refuse(
                "bounds",
                format!(
                    "{} has no declared bounds, so {name} over it has no bounded sensitivity",
                    col.name
                ),
            ),
        }
    };
    let (kind, arg, bounds) = match name.as_str() {
        "COUNT" => match args.as_slice() {
            [FunctionArgExpr::Wildcard] if !distinct => (AggKind::CountRows, None, None),
            [_] if distinct => {
                let (text, col) = column(0)?;
                if col.name != "person_id" {
                    return refuse(
                        "count-distinct",
                        "COUNT(DISTINCT …) is accepted for person_id only",
                    );
                }
                (AggKind::CountPersons, Some(text), None)
            }
            [_] => {
                let (text, col) = column(0)?;
                if col.role == "identifier" {
                    return refuse(
                        "identifier",
                        format!(
                            "{} is an identifier: count rows with COUNT(*) instead",
                            col.name
                        ),
                    );
                }
                (AggKind::CountValues, Some(text), None)
            }
            _ => return refuse("function", "COUNT takes * or one column"),
        },
        _ if distinct => return refuse("function", format!("{name}(DISTINCT …) is not accepted")),
        "SUM" | "AVG" | "MEAN" | "VARIANCE" | "VAR" | "VAR_SAMP" | "STDDEV" | "STDDEV_SAMP" => {
            if args.len() != 1 {
                return refuse("function", format!("{name} takes one column"));
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
                return refuse("function", "MEDIAN takes one column");
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
                        "function",
                        "APPROX_PERCENTILE_CONT(column, p) needs a number p strictly between 0 and 1",
                    );
                }
            }
        }
        other => {
            return refuse(
                "function",
                format!(
                    "aggregate {other} is not offered (COUNT, SUM, AVG, VARIANCE, STDDEV, MEDIAN, APPROX_PERCENTILE_CONT are)"
                ),
            );
        }
    };
    Ok(Aggregate {
        key,
        kind,
        arg,
        bounds,
    })
}
