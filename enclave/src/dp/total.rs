//! Totality: every expression an accepted query evaluates is rewritten or refused so that it cannot
//! fail on any data.
//!
//! A data-dependent error is an exact, free answer to a yes/no question ("does any row make this
//! divide by zero?"), so this runs on DataFusion's plan of the query, after type coercion has made every
//! implicit cast explicit, and before anything executes. The rules, each with why it is total:
//!
//! | expression | treatment | why it cannot fail |
//! |---|---|---|
//! | `CAST(x AS t)`, implicit casts | becomes `TRY_CAST(x AS t)`; `t` must be boolean, integer, float or text, or a date or timestamp cast from text, a date or a timestamp | a value that does not fit becomes NULL; no number becomes a timestamp outside the range later steps check |
//! | `a / b`, `a % b` | divisor wrapped in `NULLIF(b, 0)`; for signed integers `b = -1` is answered as `0 - a` (or `0`) | no division by zero; `MIN / -1` never runs; `0 - a` wraps |
//! | `+`, `-`, `*` on numbers | kept | DataFusion evaluates them wrapping (no overflow error) |
//! | `+`, `-` with a date, timestamp or interval operand | refused, but for date − date | arrow checks them and fails on overflow; the query could supply the extreme operand |
//! | unary `-` | `0 - x` for signed integers; kept for floats; refused otherwise | a negated constant is computed checked |
//! | comparisons, `IS [NOT] DISTINCT FROM`, `AND`/`OR`/`NOT`, `IS [NOT] NULL`, `IN (…)`, `BETWEEN`, `CASE` | kept | defined for every value |
//! | other binary operators (bitwise, shifts, `\|\|`, array and JSON operators such as `@>`) | refused | not on the list; some cannot even be planned on these columns |
//! | `LIKE`/`ILIKE` | a literal pattern of at most 1,000 characters, no `ESCAPE` | no pattern is built from data; none exceeds the regex size limit |
//! | regex operators, `SIMILAR TO` | refused | a pattern from data can fail to compile |
//! | `abs(x)` over a signed integer | argument clamped to `MIN + 1` (`greatest`) | `abs(MIN)` is the only overflow; it saturates |
//! | `date_trunc(g, t)` | `g` a literal from DataFusion's list | an unknown granularity fails on every row |
//! | `date_part(p, t)` / `EXTRACT` | `t` a date or timestamp; `p` a literal from a list valid for both (time parts only for timestamps) | an unknown or unsupported part, or a duration, fails |
//! | `round(x, n)`, `trunc(x, n)` | `n` an integer literal within ±30 | an out-of-range `n` fails |
//! | `substr(s, i [, n])`, `left(s, n)` | `i`, `n` integer literals, `n ≥ 0`, all within ±10⁶ | a negative length or an overflowing end fails |
//! | `sqrt(x)` | a negative `x` becomes NULL first | DataFusion refuses the square root of a negative number |
//! | `power(b, e)` | `e` becomes NULL where `b` is 0 or −0 and `e < 0` | DataFusion refuses 0 to a negative power; the rest is floating point (NaN, ±∞) |
//! | `ln`, `log10`, `exp` | kept | floating point: NaN or ±∞, never an error |
//! | `floor`, `ceil`, `signum`, `coalesce`, `nullif`, `greatest`, `least`, `lower`, `upper`, `character_length` | kept | defined for every value of their (checked) types |
//! | anything else (other functions, subqueries, placeholders, window functions, variables) | refused | not on the list |
//!
//! Should anything still fail while running, the failure is charged (see `mod.rs`): it is paid for, and
//! the user learns only that it failed.

use arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::expr::{Like, ScalarFunction};
use datafusion::logical_expr::{
    BinaryExpr, Cast, Expr, ExprSchemable, LogicalPlan, Operator, TryCast, when,
};
use datafusion::prelude::lit;

use super::rules::{Rule, refuse};
use crate::{Error, Result};

/// Granularities `date_trunc` accepts.
const TRUNC_GRANULARITIES: &[&str] = &[
    "microsecond",
    "millisecond",
    "second",
    "minute",
    "hour",
    "day",
    "week",
    "month",
    "quarter",
    "year",
];
/// Parts `date_part` accepts for dates and timestamps alike.
const DATE_PARTS: &[&str] = &["year", "quarter", "month", "week", "day", "dow", "doy"];
/// Parts `date_part` accepts for timestamps only.
const TIME_PARTS: &[&str] = &["hour", "minute", "second"];

/// Rewrites every expression of `plan` into its total form, or refuses the plan.
pub(crate) fn plan(plan: LogicalPlan) -> Result<LogicalPlan> {
    let mut refusal: Option<Error> = None;
    let out = plan.transform_up(|node| {
        if refusal.is_some() {
            return Ok(Transformed::no(node));
        }
        let schema = match node.inputs().as_slice() {
            [one] => one.schema().clone(),
            _ => node.schema().clone(),
        };
        node.map_expressions(|e| match expr(e, &schema) {
            Ok(t) => Ok(t),
            Err(err) => {
                refusal = Some(err);
                Ok(Transformed::no(Expr::Literal(ScalarValue::Null, None)))
            }
        })
    })?;
    match refusal {
        Some(e) => Err(e),
        None => Ok(out.data),
    }
}

/// Rewrites one expression (over `schema`) into its total form.
pub(crate) fn expr(e: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    let mut refusal: Option<Error> = None;
    let out = e.transform_up(|e| match node(e, schema) {
        Ok(t) => Ok(t),
        Err(err) => {
            refusal.get_or_insert(err);
            Ok(Transformed::no(Expr::Literal(ScalarValue::Null, None)))
        }
    })?;
    match refusal {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn literal_str(e: &Expr) -> Option<String> {
    match e {
        // Type coercion may have wrapped the literal in a cast (text literals to `Utf8View`).
        Expr::Cast(Cast { expr, .. }) | Expr::TryCast(TryCast { expr, .. }) => literal_str(expr),
        Expr::Literal(ScalarValue::Utf8(Some(s)), _)
        | Expr::Literal(ScalarValue::LargeUtf8(Some(s)), _)
        | Expr::Literal(ScalarValue::Utf8View(Some(s)), _) => Some(s.to_lowercase()),
        _ => None,
    }
}

fn literal_int(e: &Expr) -> Option<i64> {
    match e {
        // Type coercion may have wrapped the literal in a cast.
        Expr::Cast(Cast { expr, .. }) | Expr::TryCast(TryCast { expr, .. }) => literal_int(expr),
        Expr::Literal(v, _) if v.data_type().is_integer() => {
            v.cast_to(&DataType::Int64).ok().and_then(|v| match v {
                ScalarValue::Int64(x) => x,
                _ => None,
            })
        }
        _ => None,
    }
}

fn is_temporal(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Date32
            | DataType::Date64
            | DataType::Timestamp(_, _)
            | DataType::Time32(_)
            | DataType::Time64(_)
            | DataType::Interval(_)
            | DataType::Duration(_)
    )
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// Casts a query may make: to numbers, text and booleans from anything; to dates and timestamps only
/// from text, dates and timestamps (a number cast to a timestamp can fall outside the nanosecond range
/// that `date_trunc` and timestamp arithmetic check).
fn allowed_cast(from: &DataType, to: &DataType) -> bool {
    match to {
        t if t.is_integer() || t.is_floating() || is_text(t) => true,
        DataType::Boolean => true,
        DataType::Date32 | DataType::Timestamp(_, _) => {
            is_text(from)
                || matches!(
                    from,
                    DataType::Date32 | DataType::Timestamp(_, _) | DataType::Null
                )
        }
        _ => false,
    }
}

fn is_signed_integer(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
    )
}

fn min_plus_one(t: &DataType) -> Option<ScalarValue> {
    Some(match t {
        DataType::Int8 => ScalarValue::Int8(Some(i8::MIN + 1)),
        DataType::Int16 => ScalarValue::Int16(Some(i16::MIN + 1)),
        DataType::Int32 => ScalarValue::Int32(Some(i32::MIN + 1)),
        DataType::Int64 => ScalarValue::Int64(Some(i64::MIN + 1)),
        _ => return None,
    })
}

fn node(e: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    let type_of = |e: &Expr| -> Result<DataType> {
        e.get_type(schema).map_err(|_| Error::Refused {
            rule: Rule::Type,
            message: "the query does not type-check against the dataset's columns".into(),
            receipt: None,
        })
    };
    Ok(match e {
        Expr::Cast(Cast {
            ref expr,
            ref field,
        })
        | Expr::TryCast(TryCast {
            ref expr,
            ref field,
        }) => {
            let data_type = field.data_type();
            if !allowed_cast(&type_of(expr)?, data_type) {
                return refuse(
                    Rule::Function,
                    format!(
                        "casts to {data_type} are not accepted (integer, float, text, boolean, date and timestamp are)"
                    ),
                );
            }
            match e {
                Expr::Cast(Cast { expr, field }) => {
                    Transformed::yes(Expr::TryCast(TryCast { expr, field }))
                }
                other => Transformed::no(other),
            }
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(op, Operator::Divide | Operator::Modulo) =>
        {
            let t = type_of(&right)?;
            let zero = ScalarValue::new_zero(&t).map_err(|_| Error::Refused {
                rule: Rule::Type,
                message: format!("division by a value of type {t} is not accepted"),
                receipt: None,
            })?;
            let guarded = Expr::BinaryExpr(BinaryExpr::new(
                left.clone(),
                op,
                Box::new(datafusion::functions::core::expr_fn::nullif(
                    (*right).clone(),
                    lit(zero.clone()),
                )),
            ));
            if is_signed_integer(&t) && is_signed_integer(&type_of(&left)?) {
                // MIN / -1 and MIN % -1 overflow: answer b = -1 without dividing.
                let minus_one = ScalarValue::Int64(Some(-1))
                    .cast_to(&t)
                    .map_err(|_| Error::Internal("no -1 of an integer type".into()))?;
                let instead = if op == Operator::Divide {
                    Expr::BinaryExpr(BinaryExpr::new(Box::new(lit(zero)), Operator::Minus, left))
                } else {
                    lit(zero)
                };
                Transformed::yes(
                    when((*right).clone().eq(lit(minus_one)), instead)
                        .otherwise(guarded)
                        .map_err(Error::DataFusion)?,
                )
            } else {
                Transformed::yes(guarded)
            }
        }
        Expr::BinaryExpr(BinaryExpr { ref op, .. })
            if matches!(
                op,
                Operator::RegexMatch
                    | Operator::RegexIMatch
                    | Operator::RegexNotMatch
                    | Operator::RegexNotIMatch
                    | Operator::LikeMatch
                    | Operator::ILikeMatch
                    | Operator::NotLikeMatch
                    | Operator::NotILikeMatch
            ) =>
        {
            return refuse(
                Rule::Function,
                "regular expressions are not accepted: use LIKE with a literal pattern",
            );
        }
        Expr::BinaryExpr(BinaryExpr {
            ref left,
            op,
            ref right,
        }) if matches!(op, Operator::Plus | Operator::Minus) => {
            let (l, r) = (type_of(left)?, type_of(right)?);
            let date_minus_date =
                op == Operator::Minus && l == DataType::Date32 && r == DataType::Date32;
            if (is_temporal(&l) || is_temporal(&r)) && !date_minus_date {
                // arrow checks date, timestamp and interval arithmetic and fails on overflow, and the
                // query can supply the extreme operand.
                return refuse(
                    Rule::Function,
                    "arithmetic on dates, timestamps and intervals is not accepted (compare them, or use date_trunc / date_part; date − date gives days)",
                );
            }
            Transformed::no(e)
        }
        Expr::Negative(ref x) => {
            let t = type_of(x)?;
            if is_signed_integer(&t) {
                // A negated constant is computed with checked arithmetic: 0 − x wraps instead.
                let zero = ScalarValue::new_zero(&t).map_err(Error::DataFusion)?;
                let Expr::Negative(x) = e else {
                    return Err(Error::Internal("negative vanished".into()));
                };
                Transformed::yes(Expr::BinaryExpr(BinaryExpr::new(
                    Box::new(lit(zero)),
                    Operator::Minus,
                    x,
                )))
            } else if t.is_floating() || t == DataType::Null {
                Transformed::no(e)
            } else {
                return refuse(
                    Rule::Function,
                    format!("unary minus on {t} is not accepted"),
                );
            }
        }
        Expr::BinaryExpr(BinaryExpr { op, .. })
            if !matches!(
                op,
                Operator::Eq
                    | Operator::NotEq
                    | Operator::Lt
                    | Operator::LtEq
                    | Operator::Gt
                    | Operator::GtEq
                    | Operator::IsDistinctFrom
                    | Operator::IsNotDistinctFrom
                    | Operator::And
                    | Operator::Or
                    | Operator::Multiply
            ) =>
        {
            // Bitwise and shift operators, `||`, and the array and JSON operators (`@>`, `->`, …,
            // which DataFusion parses but cannot run on these columns): not on the list.
            return refuse(
                Rule::Function,
                format!(
                    "the operator {op} is not accepted (arithmetic, comparisons, AND, OR, NOT, IS [NOT] DISTINCT FROM and LIKE are)"
                ),
            );
        }
        Expr::BinaryExpr(_)
        | Expr::Column(_)
        | Expr::Literal(..)
        | Expr::Alias(_)
        | Expr::Not(_)
        | Expr::IsNotNull(_)
        | Expr::IsNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsUnknown(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::IsNotUnknown(_)
        | Expr::Between(_)
        | Expr::Case(_)
        | Expr::InList(_)
        | Expr::AggregateFunction(_) => Transformed::no(e),
        Expr::Like(Like {
            ref pattern,
            escape_char,
            ..
        }) => {
            if literal_str(pattern).is_none_or(|p| p.chars().count() > 1000) {
                return refuse(
                    Rule::Function,
                    "LIKE takes a literal pattern (at most 1,000 characters), not one computed from data",
                );
            }
            if escape_char.is_some() {
                return refuse(Rule::Function, "LIKE … ESCAPE is not accepted");
            }
            Transformed::no(e)
        }
        Expr::SimilarTo(_) => {
            return refuse(
                Rule::Function,
                "SIMILAR TO is not accepted: use LIKE with a literal pattern",
            );
        }
        Expr::ScalarFunction(f) => scalar_function(f, &type_of)?,
        other => {
            return refuse(
                Rule::Function,
                format!(
                    "{} is not accepted here",
                    match other {
                        Expr::WindowFunction(_) => "a window function",
                        Expr::Placeholder(_) => "a parameter placeholder",
                        Expr::ScalarVariable(..) => "a variable",
                        Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) =>
                            "a subquery",
                        _ => "this expression",
                    }
                ),
            );
        }
    })
}

fn scalar_function(
    f: ScalarFunction,
    type_of: &dyn Fn(&Expr) -> Result<DataType>,
) -> Result<Transformed<Expr>> {
    let name = f.func.name().to_owned();
    let args = &f.args;
    let bad = |why: &str| refuse(Rule::Function, format!("{name}: {why}"));
    match name.as_str() {
        "date_trunc" => match args.first().and_then(literal_str) {
            Some(g) if TRUNC_GRANULARITIES.contains(&g.as_str()) => {}
            _ => {
                return bad(
                    "the granularity must be a literal: year, quarter, month, week, day, hour, minute, second, millisecond or microsecond",
                );
            }
        },
        "date_part" => {
            let part = args.first().and_then(literal_str);
            let (timestamp, date) = match args.get(1).map(type_of).transpose()? {
                Some(DataType::Timestamp(_, _)) => (true, true),
                Some(DataType::Date32) => (false, true),
                _ => (false, false),
            };
            if !date {
                return bad("takes a date or a timestamp");
            }
            match part {
                Some(p) if DATE_PARTS.contains(&p.as_str()) => {}
                Some(p) if timestamp && TIME_PARTS.contains(&p.as_str()) => {}
                _ => {
                    return bad(
                        "the part must be a literal: year, quarter, month, week, day, dow or doy (hour, minute, second for timestamps)",
                    );
                }
            }
        }
        "round" | "trunc" => {
            if let Some(n) = args.get(1)
                && !literal_int(n).is_some_and(|n| (-30..=30).contains(&n))
            {
                return bad("the number of digits must be an integer literal within ±30");
            }
        }
        "substr" | "left" => {
            let ints: Option<Vec<i64>> = args[1..].iter().map(literal_int).collect();
            let ok = match (name.as_str(), ints.as_deref()) {
                ("substr", Some([i])) => i.abs() <= 1_000_000,
                ("substr", Some([i, n])) => i.abs() <= 1_000_000 && (0..=1_000_000).contains(n),
                ("left", Some([n])) => (0..=1_000_000).contains(n),
                _ => false,
            };
            if !ok {
                return bad(
                    "positions and lengths must be integer literals (lengths ≥ 0, all within 10⁶)",
                );
            }
        }
        "abs" => {
            if let Some(a) = args.first()
                && let Some(floor) = min_plus_one(&type_of(a)?)
            {
                let clamped =
                    datafusion::functions::core::expr_fn::greatest(vec![a.clone(), lit(floor)]);
                return Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction {
                    func: f.func.clone(),
                    args: vec![clamped],
                })));
            }
        }
        "sqrt" if args.len() == 1 => {
            // sqrt fails on a negative number: a negative argument becomes NULL first.
            let x = args[0].clone();
            let guarded = when(x.clone().gt_eq(lit(0.0)), x)
                .end()
                .map_err(Error::DataFusion)?;
            return Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction {
                func: f.func.clone(),
                args: vec![guarded],
            })));
        }
        "power" if args.len() == 2 => {
            // power fails on 0 raised to a negative exponent: that exponent becomes NULL first.
            let (b, e) = (args[0].clone(), args[1].clone());
            // −0.0 is distinct from 0.0 in DataFusion's comparisons but not in power's own check.
            let zero = b.clone().eq(lit(0.0)).or(b.clone().eq(lit(-0.0)));
            let guarded = when(
                zero.and(e.clone().lt(lit(0.0))),
                lit(ScalarValue::Float64(None)),
            )
            .otherwise(e)
            .map_err(Error::DataFusion)?;
            return Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction {
                func: f.func.clone(),
                args: vec![b, guarded],
            })));
        }
        "floor" | "ceil" | "signum" | "coalesce" | "nullif" | "greatest" | "least" | "lower"
        | "upper" | "character_length" | "ln" | "log10" | "exp" => {}
        _ => {
            return refuse(
                Rule::Function,
                format!(
                    "function {name} is not allowed (user-defined and unlisted functions are refused)"
                ),
            );
        }
    }
    Ok(Transformed::no(Expr::ScalarFunction(f)))
}
