//! Authorization with Cedar: every request is decided by the policies in a directory (the schema
//! `enclave.cedarschema` and every `*.cedar` file), deny by default, and the decision names the policies
//! that made it (each policy's `@id`), for the audit record.
//!
//! - The policies are validated against the schema in strict mode when loaded; a set that does not
//!   validate is refused as a whole (the previous set stays in force), so a typo cannot open access.
//! - [`Policies::current`] re-reads the directory when a file in it changed, so an edited policy applies
//!   at the next request without a restart.
//! - Entities and requests are built as values (`EntityUid::from_type_name_and_id`, JSON attributes),
//!   never by formatting names into Cedar text.
//! - The defaults in `policies/cedar/` are compiled in: researchers query a dataset only under an active,
//!   unexpired grant; board members manage grants and read the audit log; providers ingest into their
//!   own datasets.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, EntityId, EntityTypeName, EntityUid, PolicyId,
    PolicySet, Request, Schema, ValidationMode, Validator,
};

use crate::auth::Caller;
#[cfg(test)]
use crate::auth::Role;

/// The default schema.
pub const DEFAULT_SCHEMA: &str = include_str!("../../policies/cedar/enclave.cedarschema");
/// The default policies.
pub const DEFAULT_POLICIES: &str = include_str!("../../policies/cedar/default.cedar");
/// The schema's file name in a policy directory.
pub const SCHEMA_FILE: &str = "enclave.cedarschema";

/// A policy set that cannot be used, with why (file and Cedar's own message).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Io(String, std::io::Error),
    /// The schema does not parse.
    #[error("schema {0}: {1}")]
    Schema(String, String),
    /// A policy file does not parse, or a policy has no `@id`, or two share one.
    #[error("policies {0}: {1}")]
    Parse(String, String),
    /// The policies do not validate against the schema.
    #[error("policies do not validate against the schema: {0}")]
    Invalid(String),
}

/// What a request asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Ask a DP query.
    Query,
    /// File an access request naming a dataset.
    RequestAccess,
    /// Approve, reject or revoke access; set budgets.
    ManageGrants,
    /// Read the audit log.
    ReadAudit,
    /// Ingest a dataset version.
    Ingest,
    /// The board's pages and APIs that span datasets (request queue, audit log, users).
    Administer,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Query => "query",
            Action::RequestAccess => "request_access",
            Action::ManageGrants => "manage_grants",
            Action::ReadAudit => "read_audit",
            Action::Ingest => "ingest",
            Action::Administer => "administer",
        }
    }
}

/// The caller's grant on the dataset, as the ledger has it (for `Query`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantState {
    /// When it expires (seconds since the epoch; `i64::MAX` for no expiry).
    pub expires_at: i64,
}

/// A dataset as Cedar sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatasetRef<'a> {
    /// Its name.
    pub name: &'a str,
    /// The provider that contributed it.
    pub provider: &'a str,
}

/// Cedar's decision and the policies that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Allowed.
    pub allowed: bool,
    /// The `@id`s of the policies that decided (empty: denied by default).
    pub policies: Vec<String>,
}

impl Verdict {
    /// One line for the audit record: `allow [ids]` or `deny [ids]`.
    pub fn summary(&self) -> String {
        format!(
            "{} [{}]",
            if self.allowed { "allow" } else { "deny" },
            self.policies.join(", ")
        )
    }
}

/// A validated schema and policy set.
#[derive(Debug)]
pub struct PolicyStore {
    schema: Schema,
    policies: PolicySet,
}

fn type_name(name: &str) -> Result<EntityTypeName, PolicyError> {
    EntityTypeName::from_str(name).map_err(|e| PolicyError::Schema(name.into(), e.to_string()))
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, PolicyError> {
    Ok(EntityUid::from_type_name_and_id(
        type_name(ty)?,
        EntityId::new(id),
    ))
}

impl PolicyStore {
    /// Parses and validates a schema and policy texts (`(file name, text)` pairs).
    pub fn parse(schema: (&str, &str), policies: &[(String, String)]) -> Result<Self, PolicyError> {
        let (schema, _warnings) = Schema::from_cedarschema_str(schema.1)
            .map_err(|e| PolicyError::Schema(schema.0.into(), e.to_string()))?;
        let mut set = PolicySet::new();
        for (file, text) in policies {
            let parsed = PolicySet::from_str(text)
                .map_err(|e| PolicyError::Parse(file.clone(), e.to_string()))?;
            for p in parsed.policies() {
                let id = p.annotation("id").ok_or_else(|| {
                    PolicyError::Parse(
                        file.clone(),
                        "every policy needs an @id(\"…\") to be named in audit records".into(),
                    )
                })?;
                set.add(p.new_id(PolicyId::new(id)))
                    .map_err(|e| PolicyError::Parse(file.clone(), e.to_string()))?;
            }
        }
        let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            let errors: Vec<String> = result.validation_errors().map(|e| e.to_string()).collect();
            return Err(PolicyError::Invalid(errors.join("; ")));
        }
        Ok(PolicyStore {
            schema,
            policies: set,
        })
    }

    /// The `@id`s of the policies, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .policies
            .policies()
            .map(|p| p.id().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// The compiled-in defaults.
    pub fn builtin() -> Result<Self, PolicyError> {
        Self::parse(
            ("enclave.cedarschema", DEFAULT_SCHEMA),
            &[("default.cedar".into(), DEFAULT_POLICIES.into())],
        )
    }

    /// The schema and every `*.cedar` file of `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, PolicyError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| PolicyError::Io(p.display().to_string(), e))
        };
        let schema_path = dir.join(SCHEMA_FILE);
        let schema = read(&schema_path)?;
        let mut texts = Vec::new();
        for file in policy_files(dir)? {
            texts.push((file.display().to_string(), read(&file)?));
        }
        Self::parse((&schema_path.display().to_string(), &schema), &texts)
    }

    /// Decides whether `caller` (a provider's user: with its provider) may do `action` on `dataset`,
    /// with the caller's grant on it for queries. Any evaluation error denies.
    pub fn decide(
        &self,
        caller: &Caller,
        caller_provider: Option<&str>,
        action: Action,
        dataset: DatasetRef<'_>,
        grant: Option<GrantState>,
        now: SystemTime,
    ) -> Result<Verdict, PolicyError> {
        let entity = serde_json::json!({
            "uid": {"type": "Enclave::Dataset", "id": dataset.name},
            "attrs": {"provider": dataset.provider}, "parents": [],
        });
        let resource = uid("Enclave::Dataset", dataset.name)?;
        self.decide_on(
            caller,
            caller_provider,
            action,
            (resource, entity),
            grant,
            now,
        )
    }

    /// Decides whether `caller` may do `action` (`Administer`) on the enclave itself: the board's
    /// pages and APIs that span datasets. Any evaluation error denies.
    pub fn decide_platform(&self, caller: &Caller, action: Action) -> Result<Verdict, PolicyError> {
        let entity = serde_json::json!({
            "uid": {"type": "Enclave::Platform", "id": "enclave"}, "attrs": {}, "parents": [],
        });
        let resource = uid("Enclave::Platform", "enclave")?;
        self.decide_on(
            caller,
            None,
            action,
            (resource, entity),
            None,
            SystemTime::now(),
        )
    }

    fn decide_on(
        &self,
        caller: &Caller,
        caller_provider: Option<&str>,
        action: Action,
        (resource, resource_entity): (EntityUid, serde_json::Value),
        grant: Option<GrantState>,
        now: SystemTime,
    ) -> Result<Verdict, PolicyError> {
        let role = caller.role.name();
        let mut user_attrs = serde_json::Map::new();
        if let Some(p) = caller_provider {
            user_attrs.insert("provider".into(), p.into());
        }
        let entities = serde_json::json!([
            {"uid": {"type": "Enclave::Role", "id": role}, "attrs": {}, "parents": []},
            {"uid": {"type": "Enclave::User", "id": caller.user}, "attrs": user_attrs,
             "parents": [{"type": "Enclave::Role", "id": role}]},
            resource_entity,
        ]);
        let entities = Entities::from_json_value(entities, Some(&self.schema))
            .map_err(|e| PolicyError::Invalid(e.to_string()))?;
        let action_uid = uid("Enclave::Action", action.name())?;
        let context = if action == Action::Query {
            let now = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            serde_json::json!({
                "has_grant": grant.is_some(),
                "grant_expires_at": grant.map_or(0, |g| g.expires_at),
                "now": now,
            })
        } else {
            serde_json::json!({})
        };
        let context = Context::from_json_value(context, Some((&self.schema, &action_uid)))
            .map_err(|e| PolicyError::Invalid(e.to_string()))?;
        let request = Request::new(
            uid("Enclave::User", &caller.user)?,
            action_uid,
            resource,
            context,
            Some(&self.schema),
        )
        .map_err(|e| PolicyError::Invalid(e.to_string()))?;
        let response = Authorizer::new().is_authorized(&request, &self.policies, &entities);
        let failed = response.diagnostics().errors().next().is_some();
        Ok(Verdict {
            allowed: response.decision() == Decision::Allow && !failed,
            policies: response
                .diagnostics()
                .reason()
                .map(ToString::to_string)
                .collect(),
        })
    }
}

/// The `*.cedar` files of `dir`, sorted.
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| PolicyError::Io(dir.display().to_string(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .collect();
    files.sort();
    Ok(files)
}

/// The policies in force, re-read from their directory when a file in it changed.
pub struct Policies {
    dir: PathBuf,
    state: Mutex<(Stamps, Arc<PolicyStore>)>,
}

/// Each policy file (and the schema) with its modification time.
type Stamps = Vec<(PathBuf, Option<SystemTime>)>;

fn stamps(dir: &Path) -> Stamps {
    let mut files = policy_files(dir).unwrap_or_default();
    files.push(dir.join(SCHEMA_FILE));
    files
        .into_iter()
        .map(|f| {
            let t = std::fs::metadata(&f).and_then(|m| m.modified()).ok();
            (f, t)
        })
        .collect()
}

impl Policies {
    /// Loads the directory (it must validate now).
    pub fn open(dir: &Path) -> Result<Policies, PolicyError> {
        let store = PolicyStore::from_dir(dir)?;
        Ok(Policies {
            dir: dir.to_owned(),
            state: Mutex::new((stamps(dir), Arc::new(store))),
        })
    }

    /// The policies in force: re-read when a file changed; a changed set that does not validate leaves
    /// the previous one in force (and is logged).
    pub fn current(&self) -> Arc<PolicyStore> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = stamps(&self.dir);
        if now != state.0 {
            match PolicyStore::from_dir(&self.dir) {
                Ok(store) => *state = (now, Arc::new(store)),
                Err(e) => {
                    tracing::error!(error = %e, "policy change refused; the previous policies stay in force");
                    state.0 = now;
                }
            }
        }
        state.1.clone()
    }
}

impl Policies {
    /// Re-reads the directory now (SIGHUP), whatever the files' times say; a set that does not validate
    /// leaves the previous one in force.
    pub fn reload(&self) {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match PolicyStore::from_dir(&self.dir) {
            Ok(store) => *state = (stamps(&self.dir), Arc::new(store)),
            Err(e) => {
                tracing::error!(error = %e, "policy reload refused; the previous policies stay in force");
            }
        }
    }
}

/// Writes the default schema and policies into `dir`, or brings an earlier version's up to date. A
/// policy file that is an earlier version's untouched default is replaced; an edited one stays in force
/// with this version's defaults written beside it (`default.cedar.new`). The schema describes the
/// requests this version's engine makes, so it is replaced too, unless the directory's policies (an
/// operator's own included) would not validate against it: then the old one stays, so the gateway
/// still starts, with the new one beside it to merge. Replaced files are kept as `<name>.previous-<time>`.
/// Returns what it changed, to tell the operator.
pub fn write_defaults(dir: &Path) -> Result<Vec<String>, PolicyError> {
    std::fs::create_dir_all(dir).map_err(|e| PolicyError::Io(dir.display().to_string(), e))?;
    let io = |path: &Path, e| PolicyError::Io(path.display().to_string(), e);
    let read = |path: &Path| match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path, e)),
    };
    let is_earlier = |bytes: &[u8]| EARLIER_DEFAULTS.iter().any(|e| bytes == e.as_bytes());
    let (schema_path, policies_path) = (dir.join(SCHEMA_FILE), dir.join("default.cedar"));
    let (schema_now, policies_now) = (read(&schema_path)?, read(&policies_path)?);
    let mut done = Vec::new();

    // Whether the directory would validate with `schema` and `policies` as its `default.cedar`.
    let validates = |schema: &str, policies: &str| -> Result<bool, PolicyError> {
        let mut texts = vec![(policies_path.display().to_string(), policies.to_owned())];
        for file in policy_files(dir)? {
            if file != policies_path {
                let text = std::fs::read_to_string(&file).map_err(|e| io(&file, e))?;
                texts.push((file.display().to_string(), text));
            }
        }
        Ok(PolicyStore::parse(("schema", schema), &texts).is_ok())
    };
    let schema_old = schema_now
        .as_deref()
        .map(|b| String::from_utf8_lossy(b).into_owned());
    let policies_old = policies_now
        .as_deref()
        .map(|b| String::from_utf8_lossy(b).into_owned());
    // What `default.cedar` should be: this version's where it is missing or an earlier version's
    // untouched default; an edited one stays.
    let policies_wanted = match &policies_now {
        None => true,
        Some(bytes) => bytes != DEFAULT_POLICIES.as_bytes() && is_earlier(bytes),
    };
    let policies_then = if policies_wanted {
        DEFAULT_POLICIES.to_owned()
    } else {
        policies_old.clone().unwrap_or_default()
    };
    // The schema: this version's, if the directory as it will be validates against it; otherwise the
    // old one stays (the gateway still starts), with this version's beside it.
    let schema_then = match &schema_old {
        Some(old) if old != DEFAULT_SCHEMA && !validates(DEFAULT_SCHEMA, &policies_then)? => {
            let new = dir.join(format!("{SCHEMA_FILE}.new"));
            write_file(&new, DEFAULT_SCHEMA).map_err(|e| io(&new, e))?;
            done.push(format!(
                "{} is kept: the policies in {} do not validate against this version's schema, which \
                 is in {}: fix the policies and put it in place (until then what this version adds is \
                 denied)",
                schema_path.display(),
                dir.display(),
                new.display()
            ));
            old.clone()
        }
        _ => DEFAULT_SCHEMA.to_owned(),
    };
    // This version's default policies, only where they validate against the schema that stays.
    let policies_replaced = policies_wanted && validates(&schema_then, DEFAULT_POLICIES)?;
    if !policies_replaced && policies_old.as_deref() != Some(DEFAULT_POLICIES) {
        let new = dir.join("default.cedar.new");
        write_file(&new, DEFAULT_POLICIES).map_err(|e| io(&new, e))?;
        done.push(format!(
            "{} {}; this version's defaults are in {}: merge what is new (until then whatever they \
             add is denied)",
            policies_path.display(),
            match (&policies_old, policies_wanted) {
                (None, _) =>
                    "is not written (this version's do not validate against the schema that stays)",
                (Some(_), true) =>
                    "is kept (this version's do not validate against the schema that stays)",
                (Some(_), false) => "was edited, so it is kept",
            },
            new.display()
        ));
    }
    let stamp = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (replace, path, old, text) in [
        (
            schema_then == DEFAULT_SCHEMA && schema_old.as_deref() != Some(DEFAULT_SCHEMA),
            &schema_path,
            &schema_now,
            DEFAULT_SCHEMA,
        ),
        (
            policies_replaced,
            &policies_path,
            &policies_now,
            DEFAULT_POLICIES,
        ),
    ] {
        if !replace {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kept = match old {
            Some(old) => {
                let kept = dir.join(format!("{name}.previous-{stamp}"));
                std::fs::write(&kept, old).map_err(|e| io(&kept, e))?;
                Some(kept)
            }
            None => None,
        };
        write_file(path, text).map_err(|e| io(path, e))?;
        if let Some(kept) = kept {
            done.push(format!(
                "{}: replaced by this version's (the old one is kept as {})",
                path.display(),
                kept.display()
            ));
        }
    }
    Ok(done)
}

/// The schema and default policies that earlier versions wrote at `enclave init` (kept in
/// `policies/cedar/earlier/`): a file with exactly one of these texts was never edited and is upgraded in
/// place.
const EARLIER_DEFAULTS: &[&str] = &[
    include_str!("../../policies/cedar/earlier/default-1.cedar.txt"),
    include_str!("../../policies/cedar/earlier/default-2.cedar.txt"),
    include_str!("../../policies/cedar/earlier/enclave-1.cedarschema.txt"),
    include_str!("../../policies/cedar/earlier/enclave-2.cedarschema.txt"),
    include_str!("../../policies/cedar/earlier/enclave-3.cedarschema.txt"),
];

/// Writes `text` to `path` through a temporary file and a rename, so a reader (the gateway re-reads
/// changed policies) never sees half a file.
fn write_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    // Unique per process and call: two gateways starting at once never rename each other's half file.
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_extension(format!("tmp-{}-{nanos}", std::process::id()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn caller(user: &str, role: Role) -> Caller {
        Caller {
            user: user.to_owned(),
            role,
            session_id: String::new(),
        }
    }

    const DEMO: DatasetRef<'static> = DatasetRef {
        name: "demo",
        provider: "riverside",
    };

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn the_defaults_validate_and_decide_as_documented() {
        let store = PolicyStore::builtin().expect("defaults validate");
        let now = at(1_800_000_000);
        let active = Some(GrantState {
            expires_at: 1_800_000_100,
        });
        let expired = Some(GrantState {
            expires_at: 1_799_999_999,
        });
        let alice = caller("alice", Role::Researcher);
        let decide = |c: &Caller, prov: Option<&str>, a: Action, g: Option<GrantState>| {
            store.decide(c, prov, a, DEMO, g, now).expect("decides")
        };
        let v = decide(&alice, None, Action::Query, active);
        assert!(v.allowed);
        assert_eq!(v.policies, ["researchers-query-under-an-active-grant"]);
        assert_eq!(
            v.summary(),
            "allow [researchers-query-under-an-active-grant]"
        );
        // No grant, an expired grant, another action: denied by default, no policy named.
        for (a, g) in [
            (Action::Query, None),
            (Action::Query, expired),
            (Action::ManageGrants, active),
            (Action::ReadAudit, active),
            (Action::Ingest, active),
        ] {
            let v = decide(&alice, None, a, g);
            assert!(!v.allowed && v.policies.is_empty(), "{a:?} {g:?}: {v:?}");
        }
        let carol = caller("carol", Role::Board);
        assert!(decide(&carol, None, Action::ManageGrants, None).allowed);
        assert!(decide(&carol, None, Action::ReadAudit, None).allowed);
        assert!(!decide(&carol, None, Action::Query, active).allowed);
        let pat = caller("pat", Role::Provider);
        assert!(decide(&pat, Some("riverside"), Action::Ingest, None).allowed);
        assert!(!decide(&pat, Some("lakeside"), Action::Ingest, None).allowed);
        assert!(!decide(&pat, None, Action::Ingest, None).allowed);
        assert!(!decide(&pat, Some("riverside"), Action::Query, active).allowed);
        // Names that would be syntax in Cedar text are values here.
        let odd = caller("x\") || true; //", Role::Researcher);
        assert!(!decide(&odd, None, Action::Query, None).allowed);
    }

    #[test]
    fn an_earlier_versions_policies_are_brought_up_to_date_and_edited_ones_kept() {
        let board = caller("carol", Role::Board);
        let administers = |dir: &Path| {
            PolicyStore::from_dir(dir).and_then(|p| p.decide_platform(&board, Action::Administer))
        };
        // An untouched data directory of the first version: both files upgraded, the old kept beside.
        let tmp = tempfile::tempdir().expect("tempdir");
        let old = tmp.path();
        std::fs::write(old.join(SCHEMA_FILE), EARLIER_DEFAULTS[2]).expect("schema");
        std::fs::write(old.join("default.cedar"), EARLIER_DEFAULTS[0]).expect("policies");
        assert!(
            !administers(old).is_ok_and(|v| v.allowed),
            "the old schema has no administer action"
        );
        let done = write_defaults(old).expect("upgrade");
        assert_eq!(done.len(), 2, "{done:?}");
        assert!(administers(old).expect("decides").allowed);
        let kept = std::fs::read_dir(old)
            .expect("dir")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .find(|n| n.starts_with("default.cedar.previous-"))
            .expect("the old policies kept");
        assert_eq!(
            std::fs::read_to_string(old.join(kept)).expect("kept"),
            EARLIER_DEFAULTS[0]
        );
        // Once up to date, nothing more is done.
        assert!(write_defaults(old).expect("again").is_empty());
        // An edited policy file stays in force, this version's defaults are written beside it; an
        // edited (or older) schema is this version's again.
        let tmp = tempfile::tempdir().expect("tempdir");
        let edited = tmp.path();
        let schema = format!("{}\n// edited\n", EARLIER_DEFAULTS[4]);
        std::fs::write(edited.join(SCHEMA_FILE), schema).expect("schema");
        let mine = format!("{}\n// our own note\n", EARLIER_DEFAULTS[1]);
        std::fs::write(edited.join("default.cedar"), &mine).expect("policies");
        let done = write_defaults(edited).expect("upgrade");
        assert!(done[0].contains("was edited, so it is kept"), "{done:?}");
        assert!(
            done[1].contains("enclave.cedarschema: replaced by this version's"),
            "{done:?}"
        );
        assert_eq!(
            std::fs::read_to_string(edited.join("default.cedar")).expect("kept"),
            mine
        );
        assert_eq!(
            std::fs::read_to_string(edited.join("default.cedar.new")).expect("beside"),
            DEFAULT_POLICIES
        );
        // The edited set still validates; what it lacks (the board's administer) stays denied.
        assert!(!administers(edited).expect("decides").allowed);
        // An operator's policy that uses what this version's schema no longer has: the old schema stays
        // (the gateway still starts) and the new one is put beside it.
        let tmp = tempfile::tempdir().expect("tempdir");
        let own = tmp.path();
        let schema = format!(
            "{}\nnamespace Local {{ entity Ward; }}\n",
            EARLIER_DEFAULTS[4]
        );
        std::fs::write(own.join(SCHEMA_FILE), &schema).expect("schema");
        std::fs::write(own.join("default.cedar"), DEFAULT_POLICIES).expect("policies");
        std::fs::write(
            own.join("ward.cedar"),
            "@id(\"wards\")\npermit(principal, action, resource is Local::Ward);\n",
        )
        .expect("own policy");
        PolicyStore::from_dir(own).expect("valid before the upgrade");
        let done = write_defaults(own).expect("upgrade");
        assert!(done[0].contains("is kept: the policies in"), "{done:?}");
        assert_eq!(
            std::fs::read_to_string(own.join(SCHEMA_FILE)).expect("kept"),
            schema
        );
        assert_eq!(
            std::fs::read_to_string(own.join("enclave.cedarschema.new")).expect("beside"),
            DEFAULT_SCHEMA
        );
        PolicyStore::from_dir(own).expect("still valid after it");
        // The same with an untouched earlier default beside it, which this version's defaults would
        // replace but cannot (they need the new schema): both stay, the directory still validates.
        let tmp = tempfile::tempdir().expect("tempdir");
        let both = tmp.path();
        let schema = format!(
            "{}\nnamespace Local {{ entity Ward; }}\n",
            EARLIER_DEFAULTS[3]
        );
        std::fs::write(both.join(SCHEMA_FILE), &schema).expect("schema");
        std::fs::write(both.join("default.cedar"), EARLIER_DEFAULTS[1]).expect("policies");
        std::fs::write(
            both.join("ward.cedar"),
            "@id(\"wards\")\npermit(principal, action, resource is Local::Ward);\n",
        )
        .expect("own policy");
        PolicyStore::from_dir(both).expect("valid before the upgrade");
        let done = write_defaults(both).expect("upgrade");
        assert_eq!(done.len(), 2, "{done:?}");
        assert!(
            done[1].contains("is kept (this version's do not validate"),
            "{done:?}"
        );
        assert_eq!(
            std::fs::read_to_string(both.join("default.cedar")).expect("kept"),
            EARLIER_DEFAULTS[1]
        );
        PolicyStore::from_dir(both).expect("still valid after it");
        // A fresh directory gets both files, and says nothing.
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(write_defaults(tmp.path()).expect("fresh").is_empty());
        assert!(administers(tmp.path()).expect("decides").allowed);
    }

    #[test]
    fn a_broken_or_unnamed_policy_is_refused_and_an_edit_applies_at_the_next_request() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        write_defaults(dir).expect("defaults");
        let policies = Policies::open(dir).expect("open");
        let alice = caller("alice", Role::Researcher);
        let active = Some(GrantState {
            expires_at: i64::MAX,
        });
        let now = at(1_800_000_000);
        let allowed = |p: &Policies| {
            p.current()
                .decide(&alice, None, Action::Query, DEMO, active, now)
                .expect("decides")
                .allowed
        };
        assert!(allowed(&policies));
        // A forbid added in a new file applies at the next request, and is named.
        std::fs::write(
            dir.join("freeze.cedar"),
            "@id(\"freeze-demo\")\nforbid (principal, action, resource == Enclave::Dataset::\"demo\");\n",
        )
        .expect("write");
        assert!(!allowed(&policies));
        let v = policies
            .current()
            .decide(&alice, None, Action::Query, DEMO, active, now)
            .expect("decides");
        assert_eq!(v.policies, ["freeze-demo"]);
        // A file that does not validate (an unknown attribute) is refused; the last good set stays.
        std::fs::write(
            dir.join("freeze.cedar"),
            "@id(\"typo\")\npermit (principal, action, resource) when { resource.owner == \"x\" };\n",
        )
        .expect("write");
        assert!(
            !allowed(&policies),
            "the previous set (with the freeze) stays in force"
        );
        assert!(matches!(
            PolicyStore::from_dir(dir),
            Err(PolicyError::Invalid(_))
        ));
        // A policy without @id cannot be named in audit records: refused.
        std::fs::write(
            dir.join("freeze.cedar"),
            "permit (principal, action, resource);\n",
        )
        .expect("write");
        assert!(matches!(
            PolicyStore::from_dir(dir),
            Err(PolicyError::Parse(..))
        ));
    }
}
