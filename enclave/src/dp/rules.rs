//! The refusal rules: every reason the engine gives for not answering, each with a stable name.
//!
//! The name is what a user reads (`refused by rule 'row-level': …`), what the audit log stores, and what
//! the `.slt` specifications match. Names never change once released; a new reason is a new variant.

use std::fmt;

/// Why a query was not answered. [`Rule::Execution`] is the only rule that follows a charge: the query
/// was accepted, ran, and failed anyway (a bug in the totality checks), so its cost is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// The query would release rows or per-row values (no aggregate, `SELECT *`, a bare column).
    RowLevel,
    /// An identifier column is aggregated or used as a group key.
    Identifier,
    /// `GROUP BY person_id`: one value per person.
    PerPersonKey,
    /// `MIN` / `MAX`: one person's value.
    MinMax,
    /// An aggregate needs declared bounds its argument does not have.
    Bounds,
    /// A function, or a function's argument, that is not on the allow-list.
    Function,
    /// A table, schema or dataset that is not in the catalog.
    Catalog,
    /// Anything but one plain `SELECT` (subqueries, CTEs, set operations, several statements, writes).
    SingleSelect,
    /// A join that is not an inner join on `person_id`.
    Join,
    /// A column that no table of the query has.
    UnknownColumn,
    /// An unqualified column that several tables have.
    AmbiguousColumn,
    /// The text does not parse.
    Syntax,
    /// No grant on the dataset.
    Access,
    /// Not enough budget left, or none in the dataset's unit.
    Budget,
    /// `GROUP BY` forms other than plain expressions, or too many public keys.
    GroupBy,
    /// An aggregate where none may stand (WHERE, GROUP BY, inside another aggregate).
    AggregatePlace,
    /// `COUNT(DISTINCT …)` of anything but `person_id`.
    CountDistinct,
    /// An option (ε, ρ, δ) outside its range.
    Options,
    /// The query does not type-check against the dataset's columns.
    Type,
    /// HAVING, ORDER BY, LIMIT or the SELECT list do not plan over the noisy aggregates.
    PostProcessing,
    /// A name the engine keeps for itself (aliases beginning with `__`).
    ReservedName,
    /// The query was accepted and charged, then failed while running.
    Execution,
}

impl Rule {
    /// The stable name.
    pub fn name(self) -> &'static str {
        match self {
            Rule::RowLevel => "row-level",
            Rule::Identifier => "identifier",
            Rule::PerPersonKey => "per-person-key",
            Rule::MinMax => "min-max",
            Rule::Bounds => "bounds",
            Rule::Function => "function",
            Rule::Catalog => "catalog",
            Rule::SingleSelect => "single-select",
            Rule::Join => "join",
            Rule::UnknownColumn => "unknown-column",
            Rule::AmbiguousColumn => "ambiguous-column",
            Rule::Syntax => "syntax",
            Rule::Access => "access",
            Rule::Budget => "budget",
            Rule::GroupBy => "group-by",
            Rule::AggregatePlace => "aggregate-place",
            Rule::CountDistinct => "count-distinct",
            Rule::Options => "options",
            Rule::Type => "type",
            Rule::PostProcessing => "post-processing",
            Rule::ReservedName => "reserved-name",
            Rule::Execution => "execution",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A refusal: which rule, and what to tell the user.
pub(crate) fn refuse<T>(rule: Rule, message: impl Into<String>) -> crate::Result<T> {
    Err(crate::Error::Refused {
        rule,
        message: message.into(),
        receipt: None,
    })
}
