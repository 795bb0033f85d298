//! What the Postgres listener answers catalog queries from: `pg_catalog` and `information_schema`
//! tables built per request from the metadata of the datasets the caller may query (names, columns,
//! types, roles and DP bounds; never a row count, a size or a value: `reltuples` is -1, sizes are
//! NULL), and the `pg_catalog` functions psql, psycopg and DBeaver call, in a DataFusion context of
//! their own that holds no data at all.
//!
//! A client's catalog query is parsed into a syntax tree, rewritten where DataFusion's planner does not
//! follow Postgres (`OPERATOR(pg_catalog.~)`, `COLLATE`, `'name'::regclass` and the `oid`-like casts,
//! `pg_catalog.`-qualified function names), and planned from the tree: no SQL text is built.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::sqlparser::ast::{
    self, BinaryOperator, CastKind, Expr, ObjectName, ObjectNamePart, Query, Statement,
};

use crate::service::{DatasetInfo, GatewayError};

/// The oid of the first dataset's namespace (Postgres starts user objects at 16384).
const FIRST_OID: i64 = 16_384;

/// Memory one catalog query may use.
const MEMORY: usize = 64 * 1024 * 1024;

/// Rows one catalog answer may have (more are left out).
const MAX_ROWS: usize = 100_000;

/// Bind parameters a statement may have (Postgres' own limit).
const MAX_PARAMETERS: usize = 65_535;

/// Built-in functions (scalar or table) whose output size their arguments choose: not offered.
const UNBOUNDED: [&str; 7] = [
    "range",
    "generate_series",
    "repeat",
    "lpad",
    "rpad",
    "array_repeat",
    "overlay",
];

/// Whether `query` only reads this module's catalog tables (or no table at all), by plain table
/// references, and so is this module's. Anything else (a dataset's table, a table function, UNNEST,
/// LATERAL) is the DP engine's to answer or refuse.
pub fn is_catalog_query(query: &Query) -> bool {
    struct Check {
        ctes: Vec<String>,
        catalog: bool,
    }
    impl ast::Visitor for Check {
        type Break = ();
        fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
            if let Some(with) = &q.with {
                if with.recursive {
                    self.catalog = false;
                    return ControlFlow::Break(());
                }
                self.ctes.extend(
                    with.cte_tables
                        .iter()
                        .map(|c| c.alias.name.value.to_ascii_lowercase()),
                );
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, f: &ast::TableFactor) -> ControlFlow<()> {
            let ok = match f {
                ast::TableFactor::Table {
                    name,
                    args: None,
                    with_hints,
                    ..
                } if with_hints.is_empty() => {
                    let parts: Vec<String> = name
                        .0
                        .iter()
                        .filter_map(ObjectNamePart::as_ident)
                        .map(|i| i.value.to_ascii_lowercase())
                        .collect();
                    match parts.as_slice() {
                        [schema, table] if schema == "pg_catalog" => catalog_table(table),
                        [schema, table] if schema == "information_schema" => {
                            INFORMATION_SCHEMA.iter().any(|(t, _)| t == table)
                        }
                        [table] => catalog_table(table) || self.ctes.contains(table),
                        _ => false,
                    }
                }
                // pg_catalog's set-returning functions (psql's publication query reads
                // generate_series): this context offers none, so planning fails and the query is
                // answered empty; data is out of reach either way.
                ast::TableFactor::Table {
                    name,
                    args: Some(_),
                    ..
                } => {
                    name.0.len() == 2
                        && name.0[0]
                            .as_ident()
                            .is_some_and(|i| i.value.eq_ignore_ascii_case("pg_catalog"))
                }
                ast::TableFactor::Derived { lateral: false, .. }
                | ast::TableFactor::NestedJoin { .. } => true,
                _ => false,
            };
            if ok {
                ControlFlow::Continue(())
            } else {
                self.catalog = false;
                ControlFlow::Break(())
            }
        }
    }
    let mut check = Check {
        ctes: Vec::new(),
        catalog: true,
    };
    // ARRAY(SELECT …) becomes NULL before planning (see `rewrite`): what it reads does not count.
    let mut query = query.clone();
    let _ = ast::visit_expressions_mut(&mut query, |e: &mut Expr| {
        if array_subquery(e) {
            *e = Expr::Value(ast::ValueWithSpan::from(ast::Value::Null));
        }
        ControlFlow::<()>::Continue(())
    });
    let _ = ast::Visit::visit(&query, &mut check);
    check.catalog
}

/// Whether `e` is `ARRAY(SELECT …)`.
fn array_subquery(e: &Expr) -> bool {
    matches!(e, Expr::Function(f)
        if matches!(f.args, ast::FunctionArguments::Subquery(_))
            && f.name.0.len() == 1
            && f.name.0[0]
                .as_ident()
                .is_some_and(|i| i.value.eq_ignore_ascii_case("array")))
}

fn catalog_table(name: &str) -> bool {
    TABLES.iter().any(|(t, _)| *t == name)
}

/// A function answered from metadata: each row's arguments as text in, one value out.
type Body = Arc<dyn Fn(&[Option<String>]) -> ScalarValue + Send + Sync>;

struct PgFunction {
    name: String,
    returns: DataType,
    signature: Signature,
    body: Body,
}

impl std::fmt::Debug for PgFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgFunction({})", self.name)
    }
}

impl PartialEq for PgFunction {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for PgFunction {}

impl std::hash::Hash for PgFunction {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl ScalarUDFImpl for PgFunction {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(self.returns.clone())
    }

    fn invoke_with_args(
        &self,
        args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        let rows = args.number_rows;
        let columns = args
            .args
            .iter()
            .map(|a| {
                let array = a.to_array(rows)?;
                Ok(arrow::compute::cast(&array, &DataType::Utf8)?)
            })
            .collect::<datafusion::error::Result<Vec<ArrayRef>>>()?;
        let values = (0..rows).map(|r| {
            let row: Vec<Option<String>> = columns
                .iter()
                .map(|c| {
                    use arrow::array::{Array, AsArray};
                    let c = c.as_string::<i32>();
                    (!c.is_null(r)).then(|| c.value(r).to_owned())
                })
                .collect();
            (self.body)(&row)
        });
        let array = if rows == 0 {
            arrow::array::new_empty_array(&self.returns)
        } else {
            ScalarValue::iter_to_array(values)?
        };
        Ok(ColumnarValue::Array(array))
    }
}

fn function(name: &str, returns: DataType, body: Body) -> ScalarUDF {
    ScalarUDF::from(PgFunction {
        name: name.to_owned(),
        returns,
        signature: Signature::one_of(
            vec![TypeSignature::Nullary, TypeSignature::VariadicAny],
            Volatility::Stable,
        ),
        body,
    })
}

fn text(v: impl Into<String>) -> ScalarValue {
    ScalarValue::Utf8(Some(v.into()))
}

fn int(v: i64) -> ScalarValue {
    ScalarValue::Int64(Some(v))
}

fn boolean(v: bool) -> ScalarValue {
    ScalarValue::Boolean(Some(v))
}

/// A built-in type: (oid, name, `format_type` name, length, category).
const TYPES: [(i64, &str, &str, i64, &str); 16] = [
    (16, "bool", "boolean", 1, "B"),
    (17, "bytea", "bytea", -1, "U"),
    (18, "char", "\"char\"", 1, "Z"),
    (19, "name", "name", 64, "S"),
    (20, "int8", "bigint", 8, "N"),
    (21, "int2", "smallint", 2, "N"),
    (23, "int4", "integer", 4, "N"),
    (25, "text", "text", -1, "S"),
    (26, "oid", "oid", 4, "N"),
    (700, "float4", "real", 4, "N"),
    (701, "float8", "double precision", 8, "N"),
    (1043, "varchar", "character varying", -1, "S"),
    (1082, "date", "date", 4, "D"),
    (1114, "timestamp", "timestamp without time zone", 8, "D"),
    (1184, "timestamptz", "timestamp with time zone", 8, "D"),
    (1700, "numeric", "numeric", -1, "N"),
];

/// The pg type oid of a column's Arrow type (as the catalog records it, e.g. `Int64`).
fn type_oid(arrow_type: &str) -> i64 {
    let t = arrow_type.to_ascii_lowercase();
    if t == "boolean" {
        16
    } else if t == "int8" || t == "int16" {
        21
    } else if t == "int32" {
        23
    } else if t.starts_with("int") || t.starts_with("uint") {
        20
    } else if t == "float16" || t == "float32" {
        700
    } else if t.starts_with("float") {
        701
    } else if t.starts_with("date") {
        1082
    } else if t.starts_with("timestamp") {
        if t.contains("none") { 1114 } else { 1184 }
    } else if t.starts_with("decimal") {
        1700
    } else {
        25
    }
}

fn format_type(oid: i64) -> Option<&'static str> {
    TYPES.iter().find(|t| t.0 == oid).map(|t| t.2)
}

/// Column kinds of the catalog tables.
#[derive(Clone, Copy)]
enum Col {
    I16,
    I32,
    I64,
    F32,
    Text,
    Bool,
}

impl Col {
    fn data_type(self) -> DataType {
        match self {
            Col::I16 => DataType::Int16,
            Col::I32 => DataType::Int32,
            Col::I64 => DataType::Int64,
            Col::F32 => DataType::Float32,
            Col::Text => DataType::Utf8,
            Col::Bool => DataType::Boolean,
        }
    }

    /// The value of a column a row leaves out: zero, false, or NULL for text.
    fn default(self) -> ScalarValue {
        match self {
            Col::I16 => ScalarValue::Int16(Some(0)),
            Col::I32 => ScalarValue::Int32(Some(0)),
            Col::I64 => ScalarValue::Int64(Some(0)),
            Col::F32 => ScalarValue::Float32(Some(0.0)),
            Col::Text => ScalarValue::Utf8(None),
            Col::Bool => ScalarValue::Boolean(Some(false)),
        }
    }
}

/// Parses `"oid:i64 relname:s …"` into columns.
fn columns(spec: &str) -> Vec<(String, Col)> {
    spec.split_whitespace()
        .map(|c| {
            let (name, kind) = c.split_once(':').unwrap_or((c, "s"));
            let kind = match kind {
                "i16" => Col::I16,
                "i32" => Col::I32,
                "i64" => Col::I64,
                "f32" => Col::F32,
                "b" => Col::Bool,
                _ => Col::Text,
            };
            (name.to_owned(), kind)
        })
        .collect()
}

/// The catalog tables: name and columns (oids are `i64`; a column a row leaves out takes its default).
const TABLES: &[(&str, &str)] = &[
    ("pg_namespace", "oid:i64 nspname nspowner:i64 nspacl"),
    (
        "pg_class",
        "oid:i64 relname relnamespace:i64 reltype:i64 reloftype:i64 relowner:i64 relam:i64 relfilenode:i64 \
         reltablespace:i64 relpages:i32 reltuples:f32 relallvisible:i32 reltoastrelid:i64 relhasindex:b \
         relisshared:b relpersistence relkind relnatts:i16 relchecks:i16 relhasrules:b relhastriggers:b \
         relhassubclass:b relrowsecurity:b relforcerowsecurity:b relispopulated:b relreplident \
         relispartition:b relrewrite:i64 relfrozenxid:i64 relminmxid:i64 relacl reloptions relpartbound",
    ),
    (
        "pg_attribute",
        "attrelid:i64 attname atttypid:i64 attstattarget:i16 attlen:i16 attnum:i16 attndims:i16 \
         attcacheoff:i32 atttypmod:i32 attbyval:b attalign attstorage attcompression attnotnull:b \
         atthasdef:b atthasmissing:b attidentity attgenerated attisdropped:b attislocal:b attinhcount:i16 \
         attcollation:i64 attacl attoptions attfdwoptions attmissingval",
    ),
    (
        "pg_type",
        "oid:i64 typname typnamespace:i64 typowner:i64 typlen:i16 typbyval:b typtype typcategory \
         typispreferred:b typisdefined:b typdelim typrelid:i64 typsubscript typelem:i64 typarray:i64 \
         typinput typoutput typreceive typsend typmodin typmodout typanalyze typalign typstorage \
         typnotnull:b typbasetype:i64 typtypmod:i32 typndims:i32 typcollation:i64 typdefaultbin typdefault typacl",
    ),
    (
        "pg_database",
        "oid:i64 datname datdba:i64 encoding:i32 datlocprovider datistemplate:b datallowconn:b \
         datconnlimit:i32 datfrozenxid:i64 datminmxid:i64 dattablespace:i64 datcollate datctype \
         daticulocale daticurules datcollversion datacl",
    ),
    ("pg_am", "oid:i64 amname amhandler amtype"),
    (
        "pg_roles",
        "oid:i64 rolname rolsuper:b rolinherit:b rolcreaterole:b rolcreatedb:b rolcanlogin:b \
         rolreplication:b rolconnlimit:i32 rolpassword rolvaliduntil rolbypassrls:b rolconfig",
    ),
    (
        "pg_user",
        "usename usesysid:i64 usecreatedb:b usesuper:b userepl:b usebypassrls:b passwd valuntil useconfig",
    ),
    (
        "pg_description",
        "objoid:i64 classoid:i64 objsubid:i32 description",
    ),
    ("pg_shdescription", "objoid:i64 classoid:i64 description"),
    (
        "pg_index",
        "indexrelid:i64 indrelid:i64 indnatts:i16 indnkeyatts:i16 indisunique:b indnullsnotdistinct:b \
         indisprimary:b indisexclusion:b indimmediate:b indisclustered:b indisvalid:b indcheckxmin:b \
         indisready:b indislive:b indisreplident:b indkey indcollation indclass indoption indexprs indpred",
    ),
    (
        "pg_constraint",
        "oid:i64 conname connamespace:i64 contype condeferrable:b condeferred:b convalidated:b \
         conrelid:i64 contypid:i64 conindid:i64 conparentid:i64 confrelid:i64 confupdtype confdeltype \
         confmatchtype conislocal:b coninhcount:i16 connoinherit:b conkey confkey conpfeqop conppeqop \
         conffeqop confdelsetcols conexclop conbin",
    ),
    (
        "pg_inherits",
        "inhrelid:i64 inhparent:i64 inhseqno:i32 inhdetachpending:b",
    ),
    (
        "pg_trigger",
        "oid:i64 tgrelid:i64 tgparentid:i64 tgname tgfoid:i64 tgtype:i16 tgenabled tgisinternal:b \
         tgconstrrelid:i64 tgconstrindid:i64 tgconstraint:i64 tgdeferrable:b tginitdeferred:b \
         tgnargs:i16 tgattr tgargs tgqual tgoldtable tgnewtable",
    ),
    (
        "pg_policy",
        "oid:i64 polname polrelid:i64 polcmd polpermissive:b polroles polqual polwithcheck",
    ),
    (
        "pg_rewrite",
        "oid:i64 rulename ev_class:i64 ev_type ev_enabled is_instead:b ev_qual ev_action",
    ),
    (
        "pg_statistic_ext",
        "oid:i64 stxrelid:i64 stxname stxnamespace:i64 stxowner:i64 stxstattarget:i32 stxkeys stxkind stxexprs",
    ),
    (
        "pg_publication",
        "oid:i64 pubname pubowner:i64 puballtables:b pubinsert:b pubupdate:b pubdelete:b pubtruncate:b pubviaroot:b",
    ),
    (
        "pg_publication_rel",
        "oid:i64 prpubid:i64 prrelid:i64 prqual prattrs",
    ),
    (
        "pg_publication_namespace",
        "oid:i64 pnpubid:i64 pnnspid:i64",
    ),
    ("pg_attrdef", "oid:i64 adrelid:i64 adnum:i16 adbin"),
    (
        "pg_collation",
        "oid:i64 collname collnamespace:i64 collowner:i64 collprovider collisdeterministic:b \
         collencoding:i32 collcollate collctype",
    ),
    (
        "pg_tablespace",
        "oid:i64 spcname spcowner:i64 spcacl spcoptions",
    ),
    (
        "pg_settings",
        "name setting unit category short_desc extra_desc context vartype source min_val max_val \
         enumvals boot_val reset_val sourcefile sourceline:i32 pending_restart:b",
    ),
    (
        "pg_proc",
        "oid:i64 proname pronamespace:i64 proowner:i64 prolang:i64 procost:f32 prorows:f32 \
         provariadic:i64 prosupport prokind prosecdef:b proleakproof:b proisstrict:b proretset:b \
         provolatile proparallel pronargs:i16 pronargdefaults:i16 prorettype:i64 proargtypes \
         proallargtypes proargmodes proargnames proargdefaults protrftypes prosrc probin prosqlbody \
         proconfig proacl",
    ),
    (
        "pg_extension",
        "oid:i64 extname extowner:i64 extnamespace:i64 extrelocatable:b extversion extconfig extcondition",
    ),
    ("pg_foreign_table", "ftrelid:i64 ftserver:i64 ftoptions"),
    (
        "pg_partitioned_table",
        "partrelid:i64 partstrat partnatts:i16 partdefid:i64 partattrs partclass partcollation partexprs",
    ),
    (
        "pg_sequence",
        "seqrelid:i64 seqtypid:i64 seqstart:i64 seqincrement:i64 seqmax:i64 seqmin:i64 seqcache:i64 seqcycle:b",
    ),
    (
        "pg_enum",
        "oid:i64 enumtypid:i64 enumsortorder:f32 enumlabel",
    ),
    ("pg_views", "schemaname viewname viewowner definition"),
    (
        "pg_matviews",
        "schemaname matviewname matviewowner tablespace hasindexes:b ispopulated:b definition",
    ),
    (
        "pg_tables",
        "schemaname tablename tableowner tablespace hasindexes:b hasrules:b hastriggers:b rowsecurity:b",
    ),
    (
        "pg_event_trigger",
        "oid:i64 evtname evtevent evtowner:i64 evtfoid:i64 evtenabled evttags",
    ),
    (
        "pg_language",
        "oid:i64 lanname lanowner:i64 lanispl:b lanpltrusted:b lanplcallfoid:i64 laninline:i64 lanvalidator:i64 lanacl",
    ),
    (
        "pg_foreign_server",
        "oid:i64 srvname srvowner:i64 srvfdw:i64 srvtype srvversion srvacl srvoptions",
    ),
    (
        "pg_foreign_data_wrapper",
        "oid:i64 fdwname fdwowner:i64 fdwhandler:i64 fdwvalidator:i64 fdwacl fdwoptions",
    ),
    (
        "pg_stat_activity",
        "datid:i64 datname pid:i32 usesysid:i64 usename application_name client_addr state query",
    ),
    (
        "pg_available_extensions",
        "name default_version installed_version comment",
    ),
    (
        "pg_auth_members",
        "oid:i64 roleid:i64 member:i64 grantor:i64 admin_option:b",
    ),
    (
        "pg_cast",
        "oid:i64 castsource:i64 casttarget:i64 castfunc:i64 castcontext castmethod",
    ),
    (
        "pg_operator",
        "oid:i64 oprname oprnamespace:i64 oprowner:i64 oprkind oprleft:i64 oprright:i64 oprresult:i64 oprcode",
    ),
    (
        "pg_opclass",
        "oid:i64 opcmethod:i64 opcname opcnamespace:i64 opcowner:i64 opcfamily:i64 opcintype:i64 opcdefault:b",
    ),
    (
        "pg_range",
        "rngtypid:i64 rngsubtype:i64 rngmultitypid:i64 rngcollation:i64 rngsubopc:i64",
    ),
];

/// The `information_schema` views clients read.
const INFORMATION_SCHEMA: &[(&str, &str)] = &[
    (
        "schemata",
        "catalog_name schema_name schema_owner default_character_set_catalog \
         default_character_set_schema default_character_set_name sql_path",
    ),
    (
        "tables",
        "table_catalog table_schema table_name table_type self_referencing_column_name \
         reference_generation user_defined_type_catalog user_defined_type_schema user_defined_type_name \
         is_insertable_into is_typed commit_action",
    ),
    (
        "columns",
        "table_catalog table_schema table_name column_name ordinal_position:i32 column_default \
         is_nullable data_type character_maximum_length:i32 character_octet_length:i32 \
         numeric_precision:i32 numeric_precision_radix:i32 numeric_scale:i32 datetime_precision:i32 \
         interval_type interval_precision:i32 character_set_catalog character_set_schema \
         character_set_name collation_catalog collation_schema collation_name domain_catalog \
         domain_schema domain_name udt_catalog udt_schema udt_name scope_catalog scope_schema \
         scope_name maximum_cardinality:i32 dtd_identifier is_self_referencing is_identity \
         identity_generation identity_start identity_increment identity_maximum identity_minimum \
         identity_cycle is_generated generation_expression is_updatable",
    ),
    (
        "views",
        "table_catalog table_schema table_name view_definition check_option is_updatable \
         is_insertable_into is_trigger_updatable is_trigger_deletable is_trigger_insertable_into",
    ),
    (
        "routines",
        "specific_catalog specific_schema specific_name routine_catalog routine_schema routine_name \
         routine_type data_type",
    ),
    (
        "table_constraints",
        "constraint_catalog constraint_schema constraint_name table_catalog table_schema table_name \
         constraint_type is_deferrable initially_deferred enforced nulls_distinct",
    ),
    (
        "key_column_usage",
        "constraint_catalog constraint_schema constraint_name table_catalog table_schema table_name \
         column_name ordinal_position:i32 position_in_unique_constraint:i32",
    ),
];

/// Rows of one catalog table: column name → value.
type Rows = Vec<HashMap<&'static str, ScalarValue>>;

fn batch(spec: &str, rows: &Rows) -> Result<RecordBatch, GatewayError> {
    let cols = columns(spec);
    let schema = Arc::new(Schema::new(
        cols.iter()
            .map(|(n, c)| Field::new(n, c.data_type(), true))
            .collect::<Vec<_>>(),
    ));
    let arrays = cols
        .iter()
        .map(|(name, col)| {
            if rows.is_empty() {
                return Ok(arrow::array::new_empty_array(&col.data_type()));
            }
            ScalarValue::iter_to_array(rows.iter().map(|r| {
                r.get(name.as_str())
                    .cloned()
                    .unwrap_or_else(|| col.default())
            }))
        })
        .collect::<datafusion::error::Result<Vec<ArrayRef>>>()
        .map_err(internal)?;
    RecordBatch::try_new(schema, arrays).map_err(internal)
}

fn internal(e: impl std::fmt::Display) -> GatewayError {
    tracing::error!(error = %e, "pg catalog");
    GatewayError::Internal
}

/// The catalog of one request: what the caller may see, as Postgres shows it.
pub struct CatalogView {
    ctx: SessionContext,
    /// Relation name → oid, for `'name'::regclass`.
    relations: HashMap<String, i64>,
    /// The catalog tables that have no rows here.
    empty: Vec<String>,
}

/// The metadata a catalog is built from, with oids assigned.
struct Objects<'a> {
    datasets: &'a [DatasetInfo],
    user: &'a str,
    database: &'a str,
}

impl Objects<'_> {
    fn namespace_oid(i: usize) -> i64 {
        FIRST_OID + 1000 * i as i64
    }

    fn table_oid(i: usize, j: usize) -> i64 {
        Self::namespace_oid(i) + 1 + j as i64
    }

    /// What the catalog says of a column: its role and public bounds (`\d+` shows it).
    fn column_description(c: &crate::service::ColumnInfo) -> String {
        let mut d = format!("role: {}", c.role);
        if let (Some(lo), Some(hi)) = (c.lower, c.upper) {
            d.push_str(&format!("; DP bounds [{lo}, {hi}]"));
        }
        if let Some(domain) = &c.domain {
            d.push_str(&format!("; domain: {}", domain.join(", ")));
        }
        d
    }

    fn rows(&self, table: &str) -> Rows {
        let mut rows: Rows = Vec::new();
        let mut row = |r: Vec<(&'static str, ScalarValue)>| rows.push(r.into_iter().collect());
        let owner = 10;
        match table {
            "pg_namespace" => {
                for (oid, name) in [
                    (11, "pg_catalog"),
                    (2200, "public"),
                    (13_000, "information_schema"),
                ] {
                    row(vec![
                        ("oid", int(oid)),
                        ("nspname", text(name)),
                        ("nspowner", int(owner)),
                    ]);
                }
                for (i, d) in self.datasets.iter().enumerate() {
                    row(vec![
                        ("oid", int(Self::namespace_oid(i))),
                        ("nspname", text(&d.name)),
                        ("nspowner", int(owner)),
                    ]);
                }
            }
            "pg_class" => {
                for (i, d) in self.datasets.iter().enumerate() {
                    for (j, t) in d.tables.iter().enumerate() {
                        row(vec![
                            ("oid", int(Self::table_oid(i, j))),
                            ("relname", text(&t.name)),
                            ("relnamespace", int(Self::namespace_oid(i))),
                            ("relowner", int(owner)),
                            ("relam", int(2)),
                            ("reltablespace", int(0)),
                            // Never a row count: -1 is Postgres' "not known".
                            ("reltuples", ScalarValue::Float32(Some(-1.0))),
                            ("relpersistence", text("p")),
                            ("relkind", text("r")),
                            ("relnatts", ScalarValue::Int16(Some(t.columns.len() as i16))),
                            ("relispopulated", boolean(true)),
                            ("relreplident", text("d")),
                        ]);
                    }
                }
            }
            "pg_attribute" => {
                for (i, d) in self.datasets.iter().enumerate() {
                    for (j, t) in d.tables.iter().enumerate() {
                        for (k, c) in t.columns.iter().enumerate() {
                            let oid = type_oid(&c.data_type);
                            let len = TYPES.iter().find(|t| t.0 == oid).map_or(-1, |t| t.3);
                            row(vec![
                                ("attrelid", int(Self::table_oid(i, j))),
                                ("attname", text(&c.name)),
                                ("atttypid", int(oid)),
                                ("attlen", ScalarValue::Int16(Some(len as i16))),
                                ("attnum", ScalarValue::Int16(Some(k as i16 + 1))),
                                ("atttypmod", ScalarValue::Int32(Some(-1))),
                                ("attstattarget", ScalarValue::Int16(Some(-1))),
                                ("attalign", text("d")),
                                ("attstorage", text("p")),
                                ("attcompression", text("")),
                                ("attidentity", text("")),
                                ("attgenerated", text("")),
                                ("attislocal", boolean(true)),
                            ]);
                        }
                    }
                }
            }
            "pg_type" => {
                for (oid, name, _, len, category) in TYPES {
                    row(vec![
                        ("oid", int(oid)),
                        ("typname", text(name)),
                        ("typnamespace", int(11)),
                        ("typowner", int(owner)),
                        ("typlen", ScalarValue::Int16(Some(len as i16))),
                        ("typbyval", boolean(len > 0 && len <= 8)),
                        ("typtype", text("b")),
                        ("typcategory", text(category)),
                        ("typisdefined", boolean(true)),
                        ("typdelim", text(",")),
                        ("typtypmod", ScalarValue::Int32(Some(-1))),
                    ]);
                }
            }
            "pg_database" => {
                row(vec![
                    ("oid", int(FIRST_OID - 1)),
                    ("datname", text(self.database)),
                    ("datdba", int(owner)),
                    ("encoding", ScalarValue::Int32(Some(6))),
                    ("datlocprovider", text("c")),
                    ("datallowconn", boolean(true)),
                    ("datconnlimit", ScalarValue::Int32(Some(-1))),
                    ("dattablespace", int(1663)),
                    ("datcollate", text("C")),
                    ("datctype", text("C")),
                ]);
            }
            "pg_am" => {
                row(vec![
                    ("oid", int(2)),
                    ("amname", text("heap")),
                    ("amtype", text("t")),
                ]);
            }
            "pg_roles" => {
                row(vec![
                    ("oid", int(owner)),
                    ("rolname", text(self.user)),
                    ("rolinherit", boolean(true)),
                    ("rolcanlogin", boolean(true)),
                    ("rolconnlimit", ScalarValue::Int32(Some(-1))),
                    ("rolpassword", text("********")),
                ]);
            }
            "pg_user" => {
                row(vec![
                    ("usename", text(self.user)),
                    ("usesysid", int(owner)),
                    ("passwd", text("********")),
                ]);
            }
            "pg_description" => {
                for (i, d) in self.datasets.iter().enumerate() {
                    row(vec![
                        ("objoid", int(Self::namespace_oid(i))),
                        ("classoid", int(2615)),
                        (
                            "description",
                            text(format!(
                                "dataset {} version {} from {} (query it with DP SQL)",
                                d.name, d.version, d.provider
                            )),
                        ),
                    ]);
                    for (j, t) in d.tables.iter().enumerate() {
                        for (k, c) in t.columns.iter().enumerate() {
                            row(vec![
                                ("objoid", int(Self::table_oid(i, j))),
                                ("classoid", int(1259)),
                                ("objsubid", ScalarValue::Int32(Some(k as i32 + 1))),
                                ("description", text(Self::column_description(c))),
                            ]);
                        }
                    }
                }
            }
            "pg_tablespace" => {
                row(vec![
                    ("oid", int(1663)),
                    ("spcname", text("pg_default")),
                    ("spcowner", int(owner)),
                ]);
            }
            "pg_settings" => {
                for (name, value) in super::Parameters::fixed() {
                    row(vec![
                        ("name", text(name)),
                        ("setting", text(value)),
                        ("context", text("internal")),
                        ("vartype", text("string")),
                        ("source", text("default")),
                    ]);
                }
            }
            "pg_tables" => {
                for d in self.datasets {
                    for t in &d.tables {
                        row(vec![
                            ("schemaname", text(&d.name)),
                            ("tablename", text(&t.name)),
                            ("tableowner", text(self.user)),
                        ]);
                    }
                }
            }
            "pg_language" => {
                row(vec![
                    ("oid", int(12)),
                    ("lanname", text("internal")),
                    ("lanowner", int(owner)),
                ]);
                row(vec![
                    ("oid", int(14)),
                    ("lanname", text("sql")),
                    ("lanowner", int(owner)),
                ]);
            }
            _ => {}
        }
        rows
    }

    fn information_schema(&self, table: &str) -> Rows {
        let mut rows: Rows = Vec::new();
        let mut row = |r: Vec<(&'static str, ScalarValue)>| rows.push(r.into_iter().collect());
        let catalog = text(self.database);
        match table {
            "schemata" => {
                let system = ["pg_catalog", "public", "information_schema"];
                for name in system
                    .iter()
                    .map(|s| s.to_string())
                    .chain(self.datasets.iter().map(|d| d.name.clone()))
                {
                    row(vec![
                        ("catalog_name", catalog.clone()),
                        ("schema_name", text(name)),
                        ("schema_owner", text(self.user)),
                    ]);
                }
            }
            "tables" => {
                for d in self.datasets {
                    for t in &d.tables {
                        row(vec![
                            ("table_catalog", catalog.clone()),
                            ("table_schema", text(&d.name)),
                            ("table_name", text(&t.name)),
                            ("table_type", text("BASE TABLE")),
                            ("is_insertable_into", text("NO")),
                            ("is_typed", text("NO")),
                        ]);
                    }
                }
            }
            "columns" => {
                for d in self.datasets {
                    for t in &d.tables {
                        for (k, c) in t.columns.iter().enumerate() {
                            let oid = type_oid(&c.data_type);
                            let udt = TYPES.iter().find(|t| t.0 == oid).map_or("text", |t| t.1);
                            row(vec![
                                ("table_catalog", catalog.clone()),
                                ("table_schema", text(&d.name)),
                                ("table_name", text(&t.name)),
                                ("column_name", text(&c.name)),
                                ("ordinal_position", ScalarValue::Int32(Some(k as i32 + 1))),
                                ("is_nullable", text("YES")),
                                ("data_type", text(format_type(oid).unwrap_or("text"))),
                                ("udt_catalog", catalog.clone()),
                                ("udt_schema", text("pg_catalog")),
                                ("udt_name", text(udt)),
                                ("is_identity", text("NO")),
                                ("is_generated", text("NEVER")),
                                ("is_updatable", text("NO")),
                            ]);
                        }
                    }
                }
            }
            _ => {}
        }
        rows
    }
}

impl CatalogView {
    /// The catalog of `datasets` (those the caller may query), for `user` connected to `database`.
    pub fn new(
        datasets: &[DatasetInfo],
        user: &str,
        database: &str,
    ) -> Result<CatalogView, GatewayError> {
        let objects = Objects {
            datasets,
            user,
            database,
        };
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema("enclave", "pg_catalog")
            .with_information_schema(false)
            .with_target_partitions(1);
        config.options_mut().execution.enable_recursive_ctes = false;
        // Catalog answers are small; a query that builds something big (a cross join of catalog
        // tables) fails on this pool instead of taking the enclave's memory.
        let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
            .with_memory_limit(MEMORY, 1.0)
            .with_disk_manager_builder(enclave::storage::no_spill())
            .build_arc()
            .map_err(internal)?;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        // Functions whose output size is the caller's to choose.
        for f in UNBOUNDED {
            ctx.deregister_udf(f);
            ctx.deregister_udtf(f);
        }
        let mut empty = Vec::new();
        let catalog = Arc::new(datafusion::catalog::MemoryCatalogProvider::new());
        ctx.register_catalog("enclave", catalog.clone());
        for (schema, tables, rows) in [
            (
                "pg_catalog",
                TABLES,
                &(|t: &str| objects.rows(t)) as &dyn Fn(&str) -> Rows,
            ),
            ("information_schema", INFORMATION_SCHEMA, &|t: &str| {
                objects.information_schema(t)
            }),
        ] {
            let provider = Arc::new(datafusion::catalog::MemorySchemaProvider::new());
            datafusion::catalog::CatalogProvider::register_schema(
                catalog.as_ref(),
                schema,
                provider.clone(),
            )
            .map_err(internal)?;
            for (name, spec) in tables {
                let b = batch(spec, &rows(name))?;
                if b.num_rows() == 0 {
                    empty.push((*name).to_owned());
                }
                let table = MemTable::try_new(b.schema(), vec![vec![b]]).map_err(internal)?;
                datafusion::catalog::SchemaProvider::register_table(
                    provider.as_ref(),
                    (*name).to_owned(),
                    Arc::new(table),
                )
                .map_err(internal)?;
            }
        }
        let mut relations = HashMap::new();
        for (i, d) in datasets.iter().enumerate() {
            for (j, t) in d.tables.iter().enumerate() {
                relations.insert(t.name.clone(), Objects::table_oid(i, j));
                relations.insert(format!("{}.{}", d.name, t.name), Objects::table_oid(i, j));
            }
        }
        for (k, (name, _)) in TABLES.iter().enumerate() {
            let oid = match *name {
                "pg_namespace" => 2615,
                "pg_class" => 1259,
                "pg_type" => 1247,
                "pg_attribute" => 1249,
                "pg_proc" => 1255,
                "pg_database" => 1262,
                "pg_constraint" => 2606,
                "pg_description" => 2609,
                _ => 3000 + k as i64,
            };
            relations.insert((*name).to_owned(), oid);
            relations.insert(format!("pg_catalog.{name}"), oid);
        }
        register_functions(&ctx, &objects, datasets);
        Ok(CatalogView {
            ctx,
            relations,
            empty,
        })
    }

    /// Plans a catalog statement (rewritten for DataFusion); `None` when DataFusion cannot.
    async fn plan(&self, statement: &Statement) -> Option<datafusion::logical_expr::LogicalPlan> {
        let mut statement = statement.clone();
        rewrite(&mut statement, &self.relations, &self.empty);
        self.ctx
            .state()
            .statement_to_plan(datafusion::sql::parser::Statement::Statement(Box::new(
                statement,
            )))
            .await
            .inspect_err(|e| tracing::debug!(error = %e, "pg catalog query not planned"))
            .ok()
    }

    /// The parameter types and the answer's columns of a catalog statement.
    pub async fn describe(&self, statement: &Statement) -> (Vec<DataType>, SchemaRef) {
        let Some(plan) = self.plan(statement).await else {
            return (
                vec![DataType::Utf8; placeholders(statement)],
                fallback_schema(statement),
            );
        };
        let mut params: Vec<(String, DataType)> = plan
            .get_parameter_types()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.unwrap_or(DataType::Utf8)))
            .collect();
        params.sort_by_key(|(k, _)| k.trim_start_matches('$').parse::<usize>().unwrap_or(0));
        let schema = Arc::new(plan.schema().as_arrow().clone());
        (params.into_iter().map(|(_, t)| t).collect(), schema)
    }

    /// Runs a catalog statement with its parameters (as text, converted to the types the plan infers).
    /// A statement DataFusion cannot plan or run is answered with no rows (clients probe optional
    /// features this way and carry on); the answer says so.
    pub async fn run(
        &self,
        statement: &Statement,
        parameters: &[Option<String>],
        limit: std::time::Duration,
    ) -> Result<CatalogAnswer, GatewayError> {
        let empty = CatalogAnswer {
            schema: fallback_schema(statement),
            batches: Vec::new(),
            supported: false,
        };
        match tokio::time::timeout(limit, self.run_unlimited(statement, parameters)).await {
            Ok(answer) => answer,
            Err(_) => Ok(empty),
        }
    }

    async fn run_unlimited(
        &self,
        statement: &Statement,
        parameters: &[Option<String>],
    ) -> Result<CatalogAnswer, GatewayError> {
        let empty = || CatalogAnswer {
            schema: fallback_schema(statement),
            batches: Vec::new(),
            supported: false,
        };
        // Queries that certainly yield nothing (psql's follow-ups on policies, statistics,
        // publications) are answered as such, whether DataFusion could plan them or not.
        if let Statement::Query(q) = statement
            && yields_no_row(q, &self.empty)
        {
            return Ok(CatalogAnswer {
                supported: true,
                ..empty()
            });
        }
        let Some(mut plan) = self.plan(statement).await else {
            return Ok(empty());
        };
        if !parameters.is_empty() {
            let types = plan.get_parameter_types().unwrap_or_default();
            let values = parameters
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let t = types
                        .get(&format!("${}", i + 1))
                        .cloned()
                        .flatten()
                        .unwrap_or(DataType::Utf8);
                    match v {
                        None => ScalarValue::try_from(&t).map_err(|_| bad_parameter(i)),
                        Some(s) => ScalarValue::Utf8(Some(s.clone()))
                            .cast_to(&t)
                            .map_err(|_| bad_parameter(i)),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            plan = plan
                .with_param_values(ParamValues::List(
                    values.into_iter().map(Into::into).collect(),
                ))
                .map_err(|_| bad_parameter(0))?;
        }
        let Ok(frame) = self.ctx.execute_logical_plan(plan).await else {
            return Ok(empty());
        };
        let schema = Arc::new(frame.schema().as_arrow().clone());
        let Ok(mut stream) = frame.execute_stream().await else {
            return Ok(empty());
        };
        let mut batches = Vec::new();
        let mut rows = 0;
        while let Some(batch) = futures::StreamExt::next(&mut stream).await {
            match batch {
                Ok(b) => {
                    let take = b.num_rows().min(MAX_ROWS - rows);
                    rows += take;
                    batches.push(b.slice(0, take));
                    if rows == MAX_ROWS {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "pg catalog query failed");
                    return Ok(empty());
                }
            }
        }
        Ok(CatalogAnswer {
            schema,
            batches,
            supported: true,
        })
    }
}

/// A catalog statement's answer.
pub struct CatalogAnswer {
    /// Its columns.
    pub schema: SchemaRef,
    /// Its rows.
    pub batches: Vec<RecordBatch>,
    /// False when the statement could not be answered and the rows are left empty.
    pub supported: bool,
}

/// The highest `$n` a statement uses (at most 65,535, Postgres' own limit; a higher one counts as that).
pub fn placeholders(statement: &Statement) -> usize {
    let mut most = 0;
    let _ = ast::visit_expressions(statement, |e: &Expr| {
        if let Expr::Value(v) = e
            && let ast::Value::Placeholder(p) = &v.value
        {
            let n = p
                .trim_start_matches('$')
                .parse::<usize>()
                .unwrap_or(MAX_PARAMETERS)
                .min(MAX_PARAMETERS);
            most = most.max(n.max(1));
        }
        ControlFlow::<()>::Continue(())
    });
    most
}

/// The columns of an unanswerable query, as text: its first SELECT's named items.
fn fallback_schema(statement: &Statement) -> SchemaRef {
    let mut fields = Vec::new();
    if let Statement::Query(q) = statement
        && let ast::SetExpr::Select(select) = first_select(&q.body)
    {
        for item in &select.projection {
            let name = match item {
                ast::SelectItem::ExprWithAlias { alias, .. } => alias.value.clone(),
                ast::SelectItem::UnnamedExpr(e) => match e {
                    Expr::Identifier(i) => i.value.clone(),
                    Expr::CompoundIdentifier(parts) => {
                        parts.last().map_or("?column?".into(), |i| i.value.clone())
                    }
                    Expr::Function(f) => f
                        .name
                        .0
                        .last()
                        .and_then(ObjectNamePart::as_ident)
                        .map_or("?column?".into(), |i| i.value.clone()),
                    _ => "?column?".into(),
                },
                _ => continue,
            };
            fields.push(Field::new(name, DataType::Utf8, true));
        }
    }
    Arc::new(Schema::new(fields))
}

fn first_select(body: &ast::SetExpr) -> &ast::SetExpr {
    match body {
        ast::SetExpr::SetOperation { left, .. } => first_select(left),
        ast::SetExpr::Query(q) => first_select(&q.body),
        other => other,
    }
}

fn bad_parameter(i: usize) -> GatewayError {
    GatewayError::BadRequest(format!("parameter ${} does not fit its place", i + 1))
}

fn register_functions(ctx: &SessionContext, objects: &Objects<'_>, datasets: &[DatasetInfo]) {
    let user = objects.user.to_owned();
    let database = objects.database.to_owned();
    let schema = if datasets.iter().any(|d| d.name == database) {
        database.clone()
    } else {
        "public".to_owned()
    };
    let constant = |v: ScalarValue| -> Body { Arc::new(move |_| v.clone()) };
    let mut descriptions: HashMap<(i64, i32), String> = HashMap::new();
    for (i, d) in datasets.iter().enumerate() {
        for (j, t) in d.tables.iter().enumerate() {
            for (k, c) in t.columns.iter().enumerate() {
                descriptions.insert(
                    (Objects::table_oid(i, j), k as i32 + 1),
                    Objects::column_description(c),
                );
            }
        }
    }
    let descriptions = Arc::new(descriptions);
    let version = format!(
        "PostgreSQL {} (RWD enclave: differentially private answers only)",
        super::SERVER_VERSION
    );
    let mut functions: Vec<(&str, DataType, Body)> = vec![
        ("version", DataType::Utf8, constant(text(version))),
        (
            "current_database",
            DataType::Utf8,
            constant(text(&database)),
        ),
        ("current_catalog", DataType::Utf8, constant(text(&database))),
        ("current_schema", DataType::Utf8, constant(text(&schema))),
        (
            "current_schemas",
            DataType::Utf8,
            constant(text(format!("{{pg_catalog,{schema}}}"))),
        ),
        (
            "pg_backend_pid",
            DataType::Int32,
            constant(ScalarValue::Int32(Some(0))),
        ),
        (
            "pg_encoding_to_char",
            DataType::Utf8,
            constant(text("UTF8")),
        ),
    ];
    let constants: [(&[&str], DataType, ScalarValue); 5] = [
        (
            &[
                "current_user",
                "session_user",
                "current_role",
                "user",
                "pg_get_userbyid",
            ],
            DataType::Utf8,
            text(&user),
        ),
        (
            &[
                "pg_table_is_visible",
                "pg_type_is_visible",
                "pg_function_is_visible",
                "has_table_privilege",
                "has_schema_privilege",
                "has_database_privilege",
                "has_column_privilege",
            ],
            DataType::Boolean,
            boolean(true),
        ),
        (
            &["pg_has_role", "pg_is_in_recovery"],
            DataType::Boolean,
            boolean(false),
        ),
        (
            &[
                "pg_get_expr",
                "pg_get_indexdef",
                "pg_get_constraintdef",
                "pg_get_viewdef",
                "pg_get_triggerdef",
                "pg_get_partkeydef",
                "pg_get_function_arguments",
                "pg_get_function_result",
                "pg_get_statisticsobjdef_columns",
                "pg_tablespace_location",
                "shobj_description",
                "obj_description",
                "pg_size_pretty",
            ],
            DataType::Utf8,
            ScalarValue::Utf8(None),
        ),
        // Sizes would tell row counts: never given.
        (
            &[
                "pg_relation_size",
                "pg_total_relation_size",
                "pg_table_size",
                "pg_indexes_size",
                "pg_database_size",
            ],
            DataType::Int64,
            ScalarValue::Int64(None),
        ),
    ];
    for (names, returns, value) in constants {
        for name in names {
            functions.push((name, returns.clone(), constant(value.clone())));
        }
    }
    functions.extend::<Vec<(&str, DataType, Body)>>(vec![
        // The catalog has no array columns: its ACL and option lists are NULL text.
        (
            "array_to_string",
            DataType::Utf8,
            Arc::new(|args: &[Option<String>]| ScalarValue::Utf8(args.first().cloned().flatten())),
        ),
        (
            "format_type",
            DataType::Utf8,
            Arc::new(|args: &[Option<String>]| {
                let oid = args.first().cloned().flatten().and_then(|s| s.parse().ok());
                ScalarValue::Utf8(oid.map(|o| format_type(o).unwrap_or("text").to_owned()))
            }),
        ),
        (
            "col_description",
            DataType::Utf8,
            Arc::new(move |args: &[Option<String>]| {
                let table = args.first().cloned().flatten().and_then(|s| s.parse().ok());
                let column = args.get(1).cloned().flatten().and_then(|s| s.parse().ok());
                ScalarValue::Utf8(
                    table
                        .zip(column)
                        .and_then(|k| descriptions.get(&k).cloned()),
                )
            }),
        ),
        (
            "quote_ident",
            DataType::Utf8,
            Arc::new(|args: &[Option<String>]| {
                ScalarValue::Utf8(args.first().cloned().flatten().map(|s| {
                    let plain = s
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                        && s.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                    if plain {
                        s
                    } else {
                        format!("\"{}\"", s.replace('"', "\"\""))
                    }
                }))
            }),
        ),
    ]);
    for (name, returns, body) in functions {
        ctx.register_udf(function(name, returns, body));
    }
}

/// Rewrites what DataFusion does not plan the way Postgres does, in the syntax tree.
fn rewrite(statement: &mut Statement, relations: &HashMap<String, i64>, empty: &[String]) {
    let _ = ast::visit_expressions_mut(statement, |e: &mut Expr| {
        match e {
            // A scalar subquery over an empty table is NULL (DataFusion does not plan the correlated
            // ones psql sends for defaults and collations).
            Expr::Subquery(q) if yields_no_row(q, empty) => {
                *e = Expr::Value(ast::ValueWithSpan::from(ast::Value::Null));
            }
            // ARRAY(SELECT …) → NULL: the catalog's array columns (options, ACLs) are all NULL here.
            e if array_subquery(e) => {
                *e = Expr::Value(ast::ValueWithSpan::from(ast::Value::Null));
            }
            // pg_catalog.f(…) → f(…)
            Expr::Function(f)
                if f.name.0.len() == 2
                    && f.name.0[0]
                        .as_ident()
                        .is_some_and(|i| i.value.eq_ignore_ascii_case("pg_catalog")) =>
            {
                let last = f.name.0[1].clone();
                f.name = ObjectName(vec![last]);
            }
            // a OPERATOR(pg_catalog.~) b → a ~ b (and the other operators psql qualifies)
            Expr::BinaryOp { op, .. } => {
                if let BinaryOperator::PGCustomBinaryOperator(parts) = op {
                    let plain = match parts.last().map(String::as_str) {
                        Some("~") => Some(BinaryOperator::PGRegexMatch),
                        Some("~*") => Some(BinaryOperator::PGRegexIMatch),
                        Some("!~") => Some(BinaryOperator::PGRegexNotMatch),
                        Some("!~*") => Some(BinaryOperator::PGRegexNotIMatch),
                        Some("=") => Some(BinaryOperator::Eq),
                        Some("<>") => Some(BinaryOperator::NotEq),
                        Some("<") => Some(BinaryOperator::Lt),
                        Some(">") => Some(BinaryOperator::Gt),
                        Some("~~") => Some(BinaryOperator::PGLikeMatch),
                        _ => None,
                    };
                    if let Some(p) = plain {
                        *op = p;
                    }
                }
            }
            // x COLLATE pg_catalog.default → x
            Expr::Collate { expr, .. } => {
                *e = (**expr).clone();
            }
            // 'pg_class'::regclass → its oid; x::oid, x::regtype … → x; x::pg_catalog.text → x::text
            Expr::Cast {
                expr,
                data_type,
                kind,
                ..
            } => {
                let name = match data_type {
                    ast::DataType::Regclass => Some("regclass".to_owned()),
                    ast::DataType::Custom(n, _) => {
                        n.0.last()
                            .and_then(ObjectNamePart::as_ident)
                            .map(|i| i.value.to_ascii_lowercase())
                    }
                    _ => None,
                };
                let Some(name) = name else {
                    return ControlFlow::<()>::Continue(());
                };
                let literal = match expr.as_ref() {
                    Expr::Value(v) => match &v.value {
                        ast::Value::SingleQuotedString(s) => Some(s.clone()),
                        _ => None,
                    },
                    _ => None,
                };
                let number = |n: i64| {
                    Expr::Value(ast::ValueWithSpan::from(ast::Value::Number(
                        n.to_string(),
                        false,
                    )))
                };
                match name.as_str() {
                    "regclass" => {
                        *e = match literal {
                            Some(s) => number(relations.get(&s).copied().unwrap_or(0)),
                            None => (**expr).clone(),
                        };
                    }
                    "oid" | "regtype" | "regproc" | "regprocedure" | "regnamespace" | "regrole"
                    | "regoper" | "xid" | "int2vector" | "oidvector" => {
                        *e = match literal.and_then(|s| s.trim().parse::<i64>().ok()) {
                            Some(n) => number(n),
                            None => (**expr).clone(),
                        };
                    }
                    "text" | "name" | "char" | "varchar" | "bpchar" => {
                        *data_type = ast::DataType::Text;
                        *kind = CastKind::Cast;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        ControlFlow::<()>::Continue(())
    });
}

/// Whether a query certainly yields no row: a plain SELECT without aggregates that reads an empty
/// table through a comma or an inner join.
fn yields_no_row(q: &Query, empty: &[String]) -> bool {
    set_yields_no_row(&q.body, empty)
}

/// [`yields_no_row`] of a query body: a plain SELECT, or a UNION whose every branch yields none.
fn set_yields_no_row(body: &ast::SetExpr, empty: &[String]) -> bool {
    let select = match body {
        ast::SetExpr::Select(select) => select,
        ast::SetExpr::Query(q) => return yields_no_row(q, empty),
        ast::SetExpr::SetOperation {
            op: ast::SetOperator::Union,
            left,
            right,
            ..
        } => return set_yields_no_row(left, empty) && set_yields_no_row(right, empty),
        _ => return false,
    };
    if select.group_by != ast::GroupByExpr::Expressions(vec![], vec![]) || select.having.is_some() {
        return false;
    }
    let mut aggregate = false;
    for item in &select.projection {
        // Aggregates of this SELECT, not of the subqueries in it.
        let mut item = item.clone();
        let _ = ast::visit_expressions_mut(&mut item, |e: &mut Expr| {
            if matches!(e, Expr::Subquery(_)) {
                *e = Expr::Value(ast::ValueWithSpan::from(ast::Value::Null));
            }
            ControlFlow::<()>::Continue(())
        });
        let _ = ast::visit_expressions(&item, |e: &Expr| {
            if let Expr::Function(f) = e
                && f.name
                    .0
                    .last()
                    .and_then(ObjectNamePart::as_ident)
                    .is_some_and(|i| {
                        matches!(
                            i.value.to_ascii_lowercase().as_str(),
                            "count"
                                | "sum"
                                | "min"
                                | "max"
                                | "avg"
                                | "string_agg"
                                | "array_agg"
                                | "bool_and"
                                | "bool_or"
                                | "every"
                                | "json_agg"
                                | "jsonb_agg"
                        )
                    })
            {
                aggregate = true;
            }
            ControlFlow::<()>::Continue(())
        });
    }
    if aggregate {
        return false;
    }
    let is_empty = |f: &ast::TableFactor| match f {
        ast::TableFactor::Table { name, .. } => name
            .0
            .last()
            .and_then(ObjectNamePart::as_ident)
            .is_some_and(|i| empty.iter().any(|t| t.eq_ignore_ascii_case(&i.value))),
        _ => false,
    };
    select.from.iter().any(|t| {
        is_empty(&t.relation)
            || t.joins.iter().any(|j| {
                matches!(
                    j.join_operator,
                    ast::JoinOperator::Inner(_)
                        | ast::JoinOperator::Join(_)
                        | ast::JoinOperator::CrossJoin(_)
                ) && is_empty(&j.relation)
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{ColumnInfo, TableInfo};
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    fn demo() -> Vec<DatasetInfo> {
        vec![DatasetInfo {
            name: "demo".into(),
            version: "v1".into(),
            provider: "general-hospital".into(),
            published_at: "2026-01-01T00:00:00Z".into(),
            accounting: "basic".into(),
            tables: vec![TableInfo {
                name: "encounters".into(),
                columns: vec![
                    ColumnInfo {
                        name: "person_id".into(),
                        data_type: "Utf8".into(),
                        role: "identifier".into(),
                        lower: None,
                        upper: None,
                        domain: None,
                    },
                    ColumnInfo {
                        name: "cost".into(),
                        data_type: "Float64".into(),
                        role: "value".into(),
                        lower: Some(0.0),
                        upper: Some(10_000.0),
                        domain: None,
                    },
                ],
            }],
        }]
    }

    fn parse(sql: &str) -> Statement {
        Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .expect("parses")
            .remove(0)
    }

    async fn ask(sql: &str) -> Vec<Vec<Option<String>>> {
        let view = CatalogView::new(&demo(), "ada", "demo").expect("view");
        let statement = parse(sql);
        let answer = view
            .run(&statement, &[], std::time::Duration::from_secs(10))
            .await
            .expect("answers");
        assert!(answer.supported, "{sql}");
        let mut rows = Vec::new();
        for b in answer.batches {
            for r in 0..b.num_rows() {
                rows.push(
                    b.columns()
                        .iter()
                        .map(|c| {
                            use arrow::array::Array;
                            (!c.is_null(r)).then(|| {
                                arrow::util::display::array_value_to_string(c, r).expect("shows")
                            })
                        })
                        .collect(),
                );
            }
        }
        rows
    }

    fn query(sql: &str) -> Query {
        match parse(sql) {
            Statement::Query(q) => *q,
            _ => panic!("not a query"),
        }
    }

    #[test]
    fn only_queries_on_catalog_tables_or_no_table_are_catalog_queries() {
        assert!(is_catalog_query(&query("SELECT 1")));
        assert!(is_catalog_query(&query(
            "SELECT * FROM pg_catalog.pg_class"
        )));
        assert!(is_catalog_query(&query("SELECT * FROM pg_type")));
        assert!(is_catalog_query(&query(
            "SELECT * FROM information_schema.tables"
        )));
        assert!(is_catalog_query(&query(
            "WITH x AS (SELECT oid FROM pg_class) SELECT * FROM x"
        )));
        assert!(!is_catalog_query(&query("SELECT * FROM encounters")));
        assert!(!is_catalog_query(&query("SELECT * FROM demo.pg_class")));
        assert!(!is_catalog_query(&query(
            "SELECT (SELECT count(*) FROM demo.encounters)"
        )));
        assert!(!is_catalog_query(&query(
            "SELECT * FROM pg_catalog.pg_class c JOIN demo.encounters e ON true"
        )));
    }

    #[tokio::test]
    async fn psql_dt_lists_the_tables_without_row_counts() {
        let rows = ask("SELECT n.nspname as \"Schema\", c.relname as \"Name\", \
             CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' END as \"Type\", \
             pg_catalog.pg_get_userbyid(c.relowner) as \"Owner\" \
             FROM pg_catalog.pg_class c \
             LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam \
             WHERE c.relkind IN ('r','p','') \
             AND n.nspname <> 'pg_catalog' AND n.nspname !~ '^pg_toast' \
             AND n.nspname <> 'information_schema' \
             AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 1,2;")
        .await;
        assert_eq!(
            rows,
            vec![vec![
                Some("demo".into()),
                Some("encounters".into()),
                Some("table".into()),
                Some("ada".into())
            ]]
        );
        let tuples = ask("SELECT reltuples, relpages FROM pg_catalog.pg_class").await;
        assert_eq!(tuples, vec![vec![Some("-1.0".into()), Some("0".into())]]);
    }

    #[tokio::test]
    async fn psql_d_table_finds_the_table_and_its_columns() {
        let found = ask(
            "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c \
             LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname OPERATOR(pg_catalog.~) '^(encounters)$' COLLATE pg_catalog.default \
             AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 2, 3;",
        )
        .await;
        assert_eq!(found.len(), 1);
        let oid = found[0][0].clone().expect("oid");
        let flags = ask(&format!(
            "SELECT c.relchecks, c.relkind, c.relhasindex, c.relhasrules, c.relhastriggers, c.relrowsecurity, \
             c.relforcerowsecurity, false AS relhasoids, c.relispartition, '', c.reltablespace, \
             CASE WHEN c.reloftype = 0 THEN '' ELSE c.reloftype::pg_catalog.regtype::pg_catalog.text END, \
             c.relpersistence, c.relreplident, am.amname \
             FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_class tc ON (c.reltoastrelid = tc.oid) \
             LEFT JOIN pg_catalog.pg_am am ON (c.relam = am.oid) WHERE c.oid = '{oid}';"
        ))
        .await;
        assert_eq!(flags.len(), 1);
        assert_eq!(flags[0][1].as_deref(), Some("r"));
        // `\d+` asks for the options too.
        let flags = ask(&format!(
            "SELECT c.relchecks, c.relkind, pg_catalog.array_to_string(c.reloptions || \
             array(select 'toast.' || x from pg_catalog.unnest(tc.reloptions) x), ', ') \
             FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_class tc ON (c.reltoastrelid = tc.oid) \
             WHERE c.oid = '{oid}';"
        ))
        .await;
        assert_eq!(flags.len(), 1);
        let columns = ask(&format!(
            "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), \
             (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid, true) FROM pg_catalog.pg_attrdef d \
              WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.atthasdef), \
             a.attnotnull, \
             (SELECT c.collname FROM pg_catalog.pg_collation c, pg_catalog.pg_type t \
              WHERE c.oid = a.attcollation AND t.oid = a.atttypid AND a.attcollation <> t.typcollation) AS attcollation, \
             a.attidentity, a.attgenerated, \
             pg_catalog.col_description(a.attrelid, a.attnum) \
             FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid = '{oid}' AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum;"
        ))
        .await;
        assert_eq!(columns.len(), 2);
        assert_eq!(columns[0][0].as_deref(), Some("person_id"));
        assert_eq!(columns[1][1].as_deref(), Some("double precision"));
        assert_eq!(
            columns[1][7].as_deref(),
            Some("role: value; DP bounds [0, 10000]")
        );
        // The follow-ups psql always sends: answered (with no rows), never an error.
        let view = CatalogView::new(&demo(), "ada", "demo").expect("view");
        for sql in [
            format!(
                "SELECT pol.polname, pol.polpermissive, CASE WHEN pol.polroles = '{{0}}' THEN NULL ELSE pg_catalog.array_to_string(array(select rolname from pg_catalog.pg_roles where oid = any (pol.polroles) order by 1),',') END, pg_catalog.pg_get_expr(pol.polqual, pol.polrelid), pg_catalog.pg_get_expr(pol.polwithcheck, pol.polrelid), CASE pol.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' END AS cmd FROM pg_catalog.pg_policy pol WHERE pol.polrelid = '{oid}' ORDER BY 1;"
            ),
            format!(
                "SELECT oid, stxrelid::pg_catalog.regclass, stxnamespace::pg_catalog.regnamespace::pg_catalog.text AS nsp, stxname, pg_catalog.pg_get_statisticsobjdef_columns(oid) AS columns, 'd' = any(stxkind) AS ndist_enabled, 'f' = any(stxkind) AS deps_enabled, 'm' = any(stxkind) AS mcv_enabled, stxstattarget FROM pg_catalog.pg_statistic_ext WHERE stxrelid = '{oid}' ORDER BY nsp, stxname;"
            ),
            format!(
                "SELECT c.oid::pg_catalog.regclass FROM pg_catalog.pg_class c, pg_catalog.pg_inherits i WHERE c.oid = i.inhparent AND i.inhrelid = '{oid}' AND c.relkind != 'p' AND c.relkind != 'I' ORDER BY inhseqno;"
            ),
            format!(
                "SELECT c.oid::pg_catalog.regclass, c.relkind, inhdetachpending, pg_catalog.pg_get_expr(c.relpartbound, c.oid) FROM pg_catalog.pg_class c, pg_catalog.pg_inherits i WHERE c.oid = i.inhrelid AND i.inhparent = '{oid}' ORDER BY pg_catalog.pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT', c.oid::pg_catalog.regclass::pg_catalog.text;"
            ),
        ] {
            let statement = parse(&sql);
            let answer = view
                .run(&statement, &[], std::time::Duration::from_secs(10))
                .await
                .expect("answered");
            let n: usize = answer.batches.iter().map(|b| b.num_rows()).sum();
            assert_eq!(n, 0, "{sql}");
        }
    }

    #[tokio::test]
    async fn regclass_literals_and_connection_functions_are_answered() {
        let rows = ask(
            "SELECT 'pg_namespace'::regclass, current_database(), current_schema(), version() LIKE 'PostgreSQL 16%'",
        )
        .await;
        assert_eq!(rows[0][0].as_deref(), Some("2615"));
        assert_eq!(rows[0][1].as_deref(), Some("demo"));
        assert_eq!(rows[0][2].as_deref(), Some("demo"));
        assert_eq!(rows[0][3].as_deref(), Some("true"));
        let sizes = ask("SELECT pg_catalog.pg_total_relation_size(oid) FROM pg_class").await;
        assert_eq!(sizes, vec![vec![None]]);
    }

    #[test]
    fn table_functions_recursion_and_unknown_pg_names_are_not_catalog_queries() {
        for sql in [
            "SELECT * FROM generate_series(1, 10)",
            "SELECT * FROM LATERAL generate_series(1, 10) g",
            "SELECT * FROM UNNEST(ARRAY[1, 2])",
            "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t) SELECT * FROM t",
            "SELECT * FROM pg_stats",
            "SELECT * FROM pg_catalog.nosuch",
            "SELECT * FROM information_schema.pg_class",
        ] {
            assert!(!is_catalog_query(&query(sql)), "{sql}");
        }
    }

    #[tokio::test]
    async fn big_answers_are_cut_and_unbounded_functions_are_not_offered() {
        let view = CatalogView::new(&demo(), "ada", "demo").expect("view");
        for sql in [
            "SELECT range(1, 2000000000)",
            "SELECT repeat('x', 1000000000)",
            "SELECT * FROM pg_catalog.generate_series(1, 2000000000)",
        ] {
            let statement = parse(sql);
            let answer = view
                .run(&statement, &[], std::time::Duration::from_secs(10))
                .await
                .expect("answered");
            assert!(!answer.supported, "{sql}");
        }
        // A cross join of catalog tables past the row cap: cut, not refused.
        let statement =
            parse("SELECT a.oid FROM pg_type a, pg_type b, pg_type c, pg_type d, pg_type e");
        let answer = view
            .run(&statement, &[], std::time::Duration::from_secs(30))
            .await
            .expect("answered");
        let rows: usize = answer.batches.iter().map(|b| b.num_rows()).sum();
        assert!(rows <= MAX_ROWS, "{rows}");
        // A huge placeholder number does not size anything.
        let statement = parse("SELECT $9999999999 AS a, nosuch FROM pg_class");
        let (params, _) = view.describe(&statement).await;
        assert_eq!(params.len(), MAX_PARAMETERS);
    }

    #[tokio::test]
    async fn a_parameter_takes_the_type_of_its_place() {
        let view = CatalogView::new(&demo(), "ada", "demo").expect("view");
        let statement =
            parse("SELECT db.oid, db.datname FROM pg_catalog.pg_database db WHERE datname = $1");
        let (params, _) = view.describe(&statement).await;
        assert_eq!(params, vec![DataType::Utf8]);
        let answer = view
            .run(
                &statement,
                &[Some("demo".into())],
                std::time::Duration::from_secs(10),
            )
            .await
            .expect("runs");
        assert_eq!(
            answer.batches.iter().map(|b| b.num_rows()).sum::<usize>(),
            1
        );
    }

    #[tokio::test]
    async fn what_datafusion_cannot_answer_gets_no_rows_under_its_named_columns() {
        let view = CatalogView::new(&demo(), "ada", "demo").expect("view");
        let statement =
            parse("SELECT nosuch AS a, c.relname, version() FROM pg_class c WHERE oid = $2");
        let answer = view
            .run(&statement, &[], std::time::Duration::from_secs(10))
            .await
            .expect("answered");
        assert!(!answer.supported);
        assert!(answer.batches.is_empty());
        let names: Vec<&str> = answer
            .schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names, ["a", "relname", "version"]);
        let (params, _) = view.describe(&statement).await;
        assert_eq!(params.len(), 2);
    }
}
