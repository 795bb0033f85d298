//! Sign-in with two factors: user accounts with an API token (stored only as a salted hash) and a TOTP
//! secret (RFC 6238: HMAC-SHA-1, 30-second steps, 6 digits), and the sessions a correct pair opens.
//!
//! - A code is accepted once: each account keeps the last time step it accepted, and a code for that
//!   step or an earlier one is refused as replayed.
//! - Failed attempts are counted per address, and wrong codes also per user (a wrong token does not count
//!   against the account, so knowing a name is not enough to lock it out), over a sliding window, attempts
//!   in flight included; past a limit every attempt is refused before the credentials are checked.
//! - Unknown user, disabled user and wrong token answer the same refusal, so the reply does not tell
//!   which names exist.
//! - Every account change and every sign-in, accepted or refused, is an audit record written in the same
//!   transaction as the change it describes (`Ledger::record_event`).
//! - Session tokens are random 256-bit values; the database keeps only their SHA-256.
//! - TOTP secrets must be kept to check codes: they are stored AES-256-GCM-encrypted under a key in the
//!   keystore (wrapped by the master key), bound to the account name.

mod passkeys;

pub use passkeys::{CEREMONY_LIFETIME, MAX_PASSKEYS, PasskeyInfo};

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use enclave::audit::{Draft, Event, Via};
use enclave::ledger::Ledger;
use ring::rand::{SecureRandom, SystemRandom};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// Why a passkey sign-in's session was not opened: the passkey was removed meanwhile.
const PASSKEY_GONE: &str = "the passkey was removed during the sign-in";

/// Failed sign-ins of one user within [`FAILURE_WINDOW`] after which every attempt is refused.
pub const MAX_FAILURES_PER_USER: i64 = 5;
/// Failed sign-ins from one address within [`FAILURE_WINDOW`] after which every attempt is refused.
pub const MAX_FAILURES_PER_ADDRESS: i64 = 20;
/// The window failures are counted over.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
/// A TOTP time step.
pub const TOTP_STEP_SECONDS: u64 = 30;
/// The longest a session may last, whatever is asked.
pub const MAX_SESSION: Duration = Duration::from_secs(12 * 3600);
/// The issuer shown by authenticator apps.
const ISSUER: &str = "RWD Enclave";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS gateway_users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_salt BLOB NOT NULL,
    token_hash BLOB NOT NULL,
    totp_secret BLOB NOT NULL,
    last_totp_step INTEGER NOT NULL DEFAULT 0,
    disabled INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS gateway_sessions (
    token_hash BLOB PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    user TEXT NOT NULL REFERENCES gateway_users(name),
    peer TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS gateway_sign_in_failures (
    user TEXT NOT NULL,
    peer TEXT NOT NULL,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX IF NOT EXISTS gateway_sign_in_failures_at ON gateway_sign_in_failures(at);
";

/// Why a sign-in or an account change did not happen. The messages name the rule and nothing else.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Unknown user, disabled user or wrong token (one answer for all three).
    #[error("sign-in refused (rule 'credentials'): user, token or code is wrong")]
    Credentials,
    /// The TOTP code was already used, or is for an earlier step than one already used.
    #[error(
        "sign-in refused (rule 'replayed-code'): this code was already used; wait for the next one"
    )]
    ReplayedCode,
    /// Too many failures for this user or from this address.
    #[error("sign-in refused (rule 'rate-limit'): too many failed attempts; try again later")]
    RateLimited,
    /// The session is unknown or has expired.
    #[error("session refused (rule 'session'): unknown or expired session; sign in again")]
    Session,
    /// A name or role that cannot be used.
    #[error("refused (rule 'account'): {0}")]
    Account(String),
    /// A passkey ceremony that cannot go on (expired, unknown, not verified, or no passkey).
    #[error("passkey refused (rule 'passkey'): {0}")]
    Passkey(String),
    /// The enclave's storage or audit log failed.
    #[error(transparent)]
    Enclave(#[from] enclave::Error),
    /// A refusal the audit log holds: `error`, with the signed head of its record (its receipt).
    #[error("{error}")]
    Recorded {
        /// The refusal.
        error: Box<AuthError>,
        /// The signed head of its audit record.
        receipt: Box<enclave::audit::SignedHead>,
    },
}

impl AuthError {
    /// The refusal itself, whether or not it carries a receipt.
    pub fn cause(&self) -> &AuthError {
        match self {
            AuthError::Recorded { error, .. } => error.cause(),
            other => other,
        }
    }

    /// The receipt of a refusal the audit log holds (none where nothing was recorded, such as the
    /// attempts of a rate-limited window after its first).
    pub fn receipt(&self) -> Option<&enclave::audit::SignedHead> {
        match self {
            AuthError::Recorded { receipt, .. } => Some(receipt),
            _ => None,
        }
    }

    /// This refusal with the receipt of `record`, its audit record.
    fn recorded(self, record: &enclave::audit::Record) -> AuthError {
        match record.receipt() {
            Some(receipt) => AuthError::Recorded {
                error: Box::new(self),
                receipt: Box::new(receipt),
            },
            None => self,
        }
    }
}

impl From<rusqlite::Error> for AuthError {
    fn from(e: rusqlite::Error) -> Self {
        AuthError::Enclave(e.into())
    }
}

/// Why a sign-in failed, for counting (the caller sees only [`AuthError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Unknown or disabled user, wrong token: counted against the address only.
    Token,
    /// Right token, wrong code: counted against the user too.
    Code,
    /// Right token, a code already used: counted against the user too.
    Replay,
}

impl Failure {
    fn kind(self) -> &'static str {
        match self {
            Failure::Token => "token",
            Failure::Code | Failure::Replay => "code",
        }
    }

    fn error(self) -> AuthError {
        match self {
            Failure::Token | Failure::Code => AuthError::Credentials,
            Failure::Replay => AuthError::ReplayedCode,
        }
    }
}

/// What a user may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Queries datasets under a grant.
    Researcher,
    /// Manages grants, reads the audit log.
    Board,
    /// Ingests into its own datasets.
    Provider,
}

impl Role {
    /// The role's name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Researcher => "researcher",
            Role::Board => "board",
            Role::Provider => "provider",
        }
    }

    /// The role called `name`.
    pub fn parse(name: &str) -> Result<Role, AuthError> {
        match name {
            "researcher" => Ok(Role::Researcher),
            "board" => Ok(Role::Board),
            "provider" => Ok(Role::Provider),
            other => Err(AuthError::Account(format!(
                "unknown role '{other}' (researcher, board or provider)"
            ))),
        }
    }
}

/// A new account's secrets, shown once.
#[derive(Debug, Serialize)]
pub struct NewUser {
    /// The user name.
    pub user: String,
    /// The role.
    pub role: Role,
    /// The API token (first factor).
    pub token: String,
    /// The TOTP secret, base32 (second factor).
    pub totp_secret: String,
    /// The secret as an `otpauth://` URI for authenticator apps.
    pub otpauth_uri: String,
}

/// One account, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct UserInfo {
    /// The user name.
    pub user: String,
    /// The role.
    pub role: String,
    /// Disabled accounts cannot sign in.
    pub disabled: bool,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// Who created it.
    pub created_by: String,
}

/// An opened session: the bearer secret, shown once.
#[derive(Debug, Serialize)]
pub struct NewSession {
    /// The secret to present (`Authorization: Bearer …`, or the pg password).
    pub session: String,
    /// Its public id (in audit records).
    pub id: String,
    /// When it expires (RFC 3339).
    pub expires_at: String,
}

/// Who a valid session belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The signed-in user.
    pub user: String,
    /// Their role.
    pub role: Role,
    /// The session's public id.
    pub session_id: String,
}

/// The accounts and sessions in the enclave's database.
pub struct Accounts {
    conn: Mutex<Connection>,
    ledger: Ledger,
    session_lifetime: Duration,
    totp_cipher: aes_gcm::Aes256Gcm,
    passkeys: OnceLock<passkeys::Ceremonies>,
    /// Keys the stand-in passkey options a name without passkeys gets (stable per name, like real ones).
    decoy_key: ring::hmac::Key,
}

/// The keystore entry of the key TOTP secrets are encrypted under.
const TOTP_KEY_ID: &str = "gateway-totp";

/// `N` random bytes from the system's generator.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], AuthError> {
    random()
}

fn random<const N: usize>() -> Result<[u8; N], AuthError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| AuthError::Enclave(enclave::Error::Internal("no randomness".into())))?;
    Ok(b)
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// The stored form of an API token: HMAC-SHA-256 keyed by the account's random salt.
fn token_mac(salt: &[u8], token: &str) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, salt);
    ring::hmac::sign(&key, token.as_bytes()).as_ref().to_vec()
}

fn now_seconds(now: SystemTime) -> i64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn rfc3339(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The RFC 6238 code of `secret` at time step `step` (RFC 4226 dynamic truncation, 6 digits).
pub fn totp_code(secret: &[u8], step: u64) -> u32 {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = ring::hmac::sign(&key, &step.to_be_bytes());
    let h = mac.as_ref();
    let offset = usize::from(h[h.len() - 1] & 0x0f);
    let bin = (u32::from(h[offset]) & 0x7f) << 24
        | u32::from(h[offset + 1]) << 16
        | u32::from(h[offset + 2]) << 8
        | u32::from(h[offset + 3]);
    bin % 1_000_000
}

/// The time step of `now`.
pub fn totp_step(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / TOTP_STEP_SECONDS)
}

/// The step whose code `code` is (the current step and one either side, for clock drift), if it is
/// after `last_step` (the last one accepted).
fn code_step(secret: &[u8], last_step: i64, code: &str, now: SystemTime) -> Result<u64, Failure> {
    let code = code.trim();
    let wanted: Option<u32> = (code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()))
        .then(|| code.parse().ok())
        .flatten();
    let Some(wanted) = wanted else {
        return Err(Failure::Code);
    };
    let current = totp_step(now);
    let step = [current.saturating_sub(1), current, current + 1]
        .into_iter()
        .find(|s| totp_code(secret, *s) == wanted)
        .ok_or(Failure::Code)?;
    if i64::try_from(step).unwrap_or(i64::MAX) <= last_step {
        return Err(Failure::Replay);
    }
    Ok(step)
}

/// An account's new factors, as made and as stored.
struct Factors {
    token: String,
    salt: [u8; 16],
    secret: [u8; 20],
    hash: Vec<u8>,
    sealed: Vec<u8>,
}

/// A refusal raised inside an account change's transaction (which rolled back) as the account rule.
fn account_refusal(e: enclave::Error) -> AuthError {
    match e {
        enclave::Error::Config(message) => AuthError::Account(message),
        other => AuthError::Enclave(other),
    }
}

/// A new or reset account's secrets, as shown once.
fn new_user(name: &str, role: Role, token: String, secret: &[u8]) -> NewUser {
    let totp_secret = data_encoding::BASE32_NOPAD.encode(secret);
    let label = format!("{ISSUER}:{name}").replace(' ', "%20");
    NewUser {
        user: name.to_owned(),
        role,
        token,
        otpauth_uri: format!(
            "otpauth://totp/{label}?secret={totp_secret}&issuer={}&algorithm=SHA1&digits=6&period={TOTP_STEP_SECONDS}",
            ISSUER.replace(' ', "%20")
        ),
        totp_secret,
    }
}

/// A user name: 1–64 of `a-z 0-9 . _ -`, starting with a letter or digit.
fn check_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(AuthError::Account(format!(
            "user names are 1 to 64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit: {name:?}"
        )))
    }
}

fn draft(user: &str, via: &Via) -> Draft {
    Draft::query(user, via, "", "")
}

impl Accounts {
    /// Opens the account tables in the data directory's database; sessions last `session_lifetime`
    /// (at most [`MAX_SESSION`]).
    pub fn open(dir: &enclave::DataDir, session_lifetime: Duration) -> Result<Accounts, AuthError> {
        let conn = catalog::open_database(&dir.db())?;
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(passkeys::SCHEMA)?;
        let keystore = dir.keystore()?;
        let key = match keystore.get(TOTP_KEY_ID) {
            Ok(k) => k,
            Err(enclave::Error::Key(_)) => {
                let k = enclave::keys::random_secret()?;
                keystore.put(TOTP_KEY_ID, "gateway TOTP secrets (AES-256-GCM)", &k)?;
                k
            }
            Err(e) => return Err(e.into()),
        };
        use aes_gcm::KeyInit as _;
        Ok(Accounts {
            conn: Mutex::new(conn),
            ledger: dir.ledger(&keystore)?,
            session_lifetime: session_lifetime.min(MAX_SESSION),
            totp_cipher: aes_gcm::Aes256Gcm::new((&*key).into()),
            passkeys: OnceLock::new(),
            decoy_key: ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                ring::hmac::sign(
                    &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_ref()),
                    b"enclave passkey decoy v1",
                )
                .as_ref(),
            ),
        })
    }

    /// `nonce ‖ ciphertext` of a TOTP secret, bound to `user`.
    fn seal(&self, user: &str, secret: &[u8]) -> Result<Vec<u8>, AuthError> {
        use aes_gcm::aead::{Aead as _, Payload};
        let nonce: [u8; 12] = random()?;
        let sealed = self
            .totp_cipher
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: secret,
                    aad: user.as_bytes(),
                },
            )
            .map_err(|_| AuthError::Enclave(enclave::Error::Internal("seal".into())))?;
        Ok([nonce.as_slice(), &sealed].concat())
    }

    /// The TOTP secret sealed by [`Accounts::seal`]; `None` when it does not open (wrong account).
    fn open_secret(&self, user: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        use aes_gcm::aead::{Aead as _, Payload};
        let (nonce, body) = sealed.split_at_checked(12)?;
        let nonce: [u8; 12] = nonce.try_into().ok()?;
        self.totp_cipher
            .decrypt(
                &nonce.into(),
                Payload {
                    msg: body,
                    aad: user.as_bytes(),
                },
            )
            .ok()
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new API token (with its salt and stored MAC) and TOTP secret (and its sealed form) for `name`.
    fn fresh_factors(&self, name: &str) -> Result<Factors, AuthError> {
        let token_bytes: [u8; 32] = random()?;
        let token = format!(
            "rwd_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token_bytes)
        );
        let salt: [u8; 16] = random()?;
        let secret: [u8; 20] = random()?;
        let hash = token_mac(&salt, &token);
        let sealed = self.seal(name, &secret)?;
        Ok(Factors {
            token,
            salt,
            secret,
            hash,
            sealed,
        })
    }

    /// Creates an account; its token and TOTP secret are returned once and stored only as a salted hash
    /// and as the secret the codes are checked against.
    pub fn add(&self, by: &str, name: &str, role: Role) -> Result<NewUser, AuthError> {
        self.add_via(by, name, role, &Via::local(&format!("cli by {by}")))
    }

    /// [`Accounts::add`], recorded as coming through `via` (the web UI names its session and address).
    pub fn add_via(
        &self,
        by: &str,
        name: &str,
        role: Role,
        via: &Via,
    ) -> Result<NewUser, AuthError> {
        check_name(name)?;
        let Factors {
            token,
            salt,
            secret,
            hash,
            sealed,
        } = self.fresh_factors(name)?;
        let now = rfc3339(now_seconds(SystemTime::now()));
        let ((), _) = self.ledger.record_event(
            &draft(name, via),
            Event::UserAdded,
            &format!("role {}", role.name()),
            |tx| {
                let exists: Option<i64> = tx
                    .query_row(
                        "SELECT 1 FROM gateway_users WHERE name = ?1",
                        [name],
                        |r| r.get(0),
                    )
                    .optional()?;
                if exists.is_some() {
                    return Err(enclave::Error::Config(format!("user '{name}' exists already")));
                }
                tx.execute(
                    "INSERT INTO gateway_users (name, role, token_salt, token_hash, totp_secret, created_at, created_by)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![name, role.name(), &salt[..], hash, sealed, now, by],
                )?;
                Ok(())
            },
        )
        .map_err(account_refusal)?;
        Ok(new_user(name, role, token, &secret))
    }

    /// Gives an account a new API token and TOTP secret (shown once), removes its passkeys and ends its
    /// sessions: what the board does when a member's device or token is lost. Recorded.
    pub fn reset_factors(&self, by: &str, name: &str, via: &Via) -> Result<NewUser, AuthError> {
        check_name(name)?;
        let Factors {
            token,
            salt,
            secret,
            hash,
            sealed,
        } = self.fresh_factors(name)?;
        let (role, _) = self
            .ledger
            .record_event(
                &draft(name, via),
                Event::FactorsReset,
                &format!("by {by}: new token and TOTP secret; passkeys removed; sessions ended"),
                |tx| {
                    let role: Option<String> = tx
                        .query_row(
                            "SELECT role FROM gateway_users WHERE name = ?1",
                            [name],
                            |r| r.get(0),
                        )
                        .optional()?;
                    let Some(role) = role else {
                        return Err(enclave::Error::Config(format!("no user '{name}'")));
                    };
                    // A new secret has no code used yet.
                    tx.execute(
                        "UPDATE gateway_users SET token_salt = ?2, token_hash = ?3, totp_secret = ?4, last_totp_step = 0 WHERE name = ?1",
                        params![name, &salt[..], hash, sealed],
                    )?;
                    tx.execute("DELETE FROM gateway_passkeys WHERE user = ?1", [name])?;
                    tx.execute("DELETE FROM gateway_sessions WHERE user = ?1", [name])?;
                    Ok(role)
                },
            )
            .map_err(account_refusal)?;
        Ok(new_user(name, Role::parse(&role)?, token, &secret))
    }

    /// Every account.
    pub fn list(&self) -> Result<Vec<UserInfo>, AuthError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, role, disabled, created_at, created_by FROM gateway_users ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(UserInfo {
                user: r.get(0)?,
                role: r.get(1)?,
                disabled: r.get::<_, i64>(2)? != 0,
                created_at: r.get(3)?,
                created_by: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Disables an account and ends its sessions.
    pub fn disable(&self, by: &str, name: &str) -> Result<(), AuthError> {
        self.disable_via(name, &Via::local(&format!("cli by {by}")))
    }

    /// [`Accounts::disable`], recorded as coming through `via`.
    pub fn disable_via(&self, name: &str, via: &Via) -> Result<(), AuthError> {
        self.ledger
            .record_event(&draft(name, via), Event::UserDisabled, "", |tx| {
                let n = tx.execute(
                    "UPDATE gateway_users SET disabled = 1 WHERE name = ?1",
                    [name],
                )?;
                if n == 0 {
                    return Err(enclave::Error::Config(format!("no user '{name}'")));
                }
                tx.execute("DELETE FROM gateway_sessions WHERE user = ?1", [name])?;
                Ok(())
            })
            .map_err(account_refusal)?;
        Ok(())
    }

    /// Ends the session behind `secret` (signing out), recorded; an unknown or ended session is refused.
    pub fn sign_out(&self, secret: &str, via: &Via) -> Result<(), AuthError> {
        let caller = self.session(secret, SystemTime::now())?;
        let via = Via {
            session: caller.session_id.clone(),
            ..via.clone()
        };
        self.ledger
            .record_event(&draft(&caller.user, &via), Event::SignedOut, "", |tx| {
                tx.execute(
                    "DELETE FROM gateway_sessions WHERE token_hash = ?1",
                    [sha256(secret.as_bytes())],
                )?;
                Ok(())
            })?;
        Ok(())
    }

    /// Opens a session for `user` with their token and the current TOTP code, from `peer` (an address,
    /// or `local`) over `protocol`. Every outcome is audited (a run of rate-limited attempts once per
    /// window).
    pub fn sign_in(
        &self,
        user: &str,
        token: &str,
        code: &str,
        peer: &str,
        protocol: &str,
        now: SystemTime,
    ) -> Result<NewSession, AuthError> {
        let at = now_seconds(now);
        let origin = Via {
            origin: protocol.to_owned(),
            peer: peer.to_owned(),
            ..Via::default()
        };
        if check_name(user).is_err() {
            // Not a name an account can have: recorded without it (it could be anything, a pasted
            // token included), counted against the address.
            let id = self.claim_attempt("", peer, at)?;
            return self.refuse("(invalid name)", &origin, id, Failure::Token);
        }
        let attempt = match self.claim_attempt(user, peer, at) {
            Ok(id) => id,
            Err(AuthError::RateLimited) => return self.refuse_limited(user, peer, &origin, at),
            Err(e) => return Err(e),
        };
        let (role, step) = match self.check(user, token, code, now) {
            Ok(v) => v,
            Err(f) => return self.refuse(user, &origin, attempt, f),
        };
        // The step is claimed in one statement: of two racing sign-ins with one code, only one moves it
        // forward; the other is a replay.
        let moved = self.conn().execute(
            "UPDATE gateway_users SET last_totp_step = ?2 WHERE name = ?1 AND last_totp_step < ?2",
            params![user, i64::try_from(step).unwrap_or(i64::MAX)],
        )?;
        if moved == 0 {
            return self.refuse(user, &origin, attempt, Failure::Replay);
        }
        self.open_session(user, role, origin, attempt, at, None)
    }

    /// Opens a session for `user` after every factor was right (token and code, or the `passkey` with
    /// this credential id, which then ends the session if it is removed), recorded with the attempt
    /// settled.
    fn open_session(
        &self,
        user: &str,
        role: Role,
        origin: Via,
        attempt: i64,
        at: i64,
        passkey: Option<&str>,
    ) -> Result<NewSession, AuthError> {
        let peer = origin.peer.clone();
        let secret: [u8; 32] = random()?;
        let id: [u8; 8] = random()?;
        let session = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret);
        let id = hex::encode(id);
        let expires =
            at.saturating_add(i64::try_from(self.session_lifetime.as_secs()).unwrap_or(i64::MAX));
        let hash = sha256(session.as_bytes());
        let via = Via {
            session: id.clone(),
            ..origin
        };
        let how = if passkey.is_some() {
            "passkey"
        } else {
            "token and code"
        };
        let opened = self.ledger.record_event(
            &draft(user, &via),
            Event::SignedIn,
            &format!("session {id} ({}) by {how}", role.name()),
            |tx| {
                tx.execute(
                    "INSERT INTO gateway_sessions (token_hash, id, user, peer, created_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![hash, id, user, peer, at, expires],
                )?;
                if let Some(credential) = passkey {
                    // Only while the passkey is still there: one removed meanwhile opens nothing.
                    let kept = tx.execute(
                        "INSERT INTO gateway_passkey_sessions (session_id, credential)
                         SELECT ?1, credential FROM gateway_passkeys
                         WHERE credential = ?2 AND user = ?3",
                        params![id, credential, user],
                    )?;
                    if kept == 0 {
                        return Err(enclave::Error::Internal(PASSKEY_GONE.into()));
                    }
                }
                tx.execute(
                    "DELETE FROM gateway_sign_in_failures WHERE rowid = ?1",
                    [attempt],
                )?;
                Ok(())
            },
        );
        match opened {
            Ok(_) => {}
            // The passkey was removed while this sign-in was being checked: refused like a wrong
            // signature, and recorded.
            Err(enclave::Error::Internal(m)) if m == PASSKEY_GONE => {
                let origin = Via {
                    session: String::new(),
                    ..via
                };
                return self.refuse(user, &origin, attempt, Failure::Token);
            }
            Err(e) => return Err(e.into()),
        }
        Ok(NewSession {
            session,
            id,
            expires_at: rfc3339(expires),
        })
    }

    /// Counts the failures of `user` (wrong codes and replays: a wrong token counts only against the
    /// address, so nobody can lock an account out by knowing its name) and from `peer` over the window,
    /// attempts in flight included, and registers this attempt as in flight, all in one transaction:
    /// racing attempts see each other. Returns the attempt's row, or `RateLimited`.
    fn claim_attempt(&self, user: &str, peer: &str, at: i64) -> Result<i64, AuthError> {
        let since = at - i64::try_from(FAILURE_WINDOW.as_secs()).unwrap_or(i64::MAX);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let by_user: i64 = tx.query_row(
            "SELECT COUNT(*) FROM gateway_sign_in_failures
             WHERE user = ?1 AND user <> '' AND kind IN ('pending', 'code') AND at > ?2",
            params![user, since],
            |r| r.get(0),
        )?;
        let by_peer: i64 = tx.query_row(
            "SELECT COUNT(*) FROM gateway_sign_in_failures
             WHERE peer = ?1 AND kind IN ('pending', 'code', 'token') AND at > ?2",
            params![peer, since],
            |r| r.get(0),
        )?;
        if by_user >= MAX_FAILURES_PER_USER || by_peer >= MAX_FAILURES_PER_ADDRESS {
            return Err(AuthError::RateLimited);
        }
        tx.execute(
            "INSERT INTO gateway_sign_in_failures (user, peer, at, kind) VALUES (?1, ?2, ?3, 'pending')",
            params![user, peer, at],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    /// Records a refused sign-in and settles its attempt as a failure of its kind.
    fn refuse(
        &self,
        user: &str,
        origin: &Via,
        attempt: i64,
        why: Failure,
    ) -> Result<NewSession, AuthError> {
        let error = why.error();
        let ((), record) = self.ledger.record_event(
            &draft(user, origin),
            Event::SignInRefused,
            &error.to_string(),
            |tx| {
                tx.execute(
                    "UPDATE gateway_sign_in_failures SET kind = ?2 WHERE rowid = ?1",
                    params![attempt, why.kind()],
                )?;
                Ok(())
            },
        )?;
        Err(error.recorded(&record))
    }

    /// A rate-limited attempt: audited once per user, address and window, so a flood of them writes
    /// nothing more.
    fn refuse_limited(
        &self,
        user: &str,
        peer: &str,
        origin: &Via,
        at: i64,
    ) -> Result<NewSession, AuthError> {
        let since = at - i64::try_from(FAILURE_WINDOW.as_secs()).unwrap_or(i64::MAX);
        // One statement claims the window's marker: of racing limited attempts, one records.
        let first = self.conn().execute(
            "INSERT INTO gateway_sign_in_failures (user, peer, at, kind)
             SELECT ?1, ?2, ?3, 'limited' WHERE NOT EXISTS (
                 SELECT 1 FROM gateway_sign_in_failures
                 WHERE user = ?1 AND peer = ?2 AND kind = 'limited' AND at > ?4)",
            params![user, peer, at, since],
        )?;
        if first == 1 {
            let ((), record) = self.ledger.record_event(
                &draft(user, origin),
                Event::SignInRefused,
                &format!(
                    "{} (further attempts in this window are not recorded)",
                    AuthError::RateLimited
                ),
                |_| Ok(()),
            )?;
            return Err(AuthError::RateLimited.recorded(&record));
        }
        Err(AuthError::RateLimited)
    }

    /// Checks `user`'s current TOTP code again inside a session (a step-up before a change that would
    /// outlive it, such as adding a passkey): counted, rate-limited and used once like a sign-in's code;
    /// a refusal is recorded.
    pub fn verify_code(
        &self,
        user: &str,
        code: &str,
        peer: &str,
        protocol: &str,
        now: SystemTime,
    ) -> Result<(), AuthError> {
        let at = now_seconds(now);
        let origin = Via {
            origin: protocol.to_owned(),
            peer: peer.to_owned(),
            ..Via::default()
        };
        let attempt = match self.claim_attempt(user, peer, at) {
            Ok(id) => id,
            Err(AuthError::RateLimited) => {
                return self.refuse_limited(user, peer, &origin, at).map(|_| ());
            }
            Err(e) => return Err(e),
        };
        let row: Option<(Vec<u8>, i64)> = self
            .conn()
            .query_row(
                "SELECT totp_secret, last_totp_step FROM gateway_users WHERE name = ?1 AND disabled = 0",
                [user],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let step = row.ok_or(Failure::Token).and_then(|(sealed, last)| {
            let secret = self.open_secret(user, &sealed).ok_or(Failure::Token)?;
            code_step(&secret, last, code, now)
        });
        let step = match step {
            Ok(step) => step,
            Err(f) => return self.refuse(user, &origin, attempt, f).map(|_| ()),
        };
        let moved = self.conn().execute(
            "UPDATE gateway_users SET last_totp_step = ?2 WHERE name = ?1 AND last_totp_step < ?2",
            params![user, i64::try_from(step).unwrap_or(i64::MAX)],
        )?;
        if moved == 0 {
            return self
                .refuse(user, &origin, attempt, Failure::Replay)
                .map(|_| ());
        }
        self.conn().execute(
            "DELETE FROM gateway_sign_in_failures WHERE rowid = ?1",
            [attempt],
        )?;
        Ok(())
    }

    /// Checks the account, token and code; returns the role and the code's step.
    fn check(
        &self,
        user: &str,
        token: &str,
        code: &str,
        now: SystemTime,
    ) -> Result<(Role, u64), Failure> {
        let conn = self.conn();
        type Row = (String, Vec<u8>, Vec<u8>, Vec<u8>, i64, i64);
        let row: Option<Row> = conn
            .query_row(
                "SELECT role, token_salt, token_hash, totp_secret, last_totp_step, disabled FROM gateway_users WHERE name = ?1",
                [user],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()
            .map_err(|_| Failure::Token)?;
        // An unknown user costs the same MAC as a known one.
        let (role, salt, hash, secret, last_step, disabled) = row.unwrap_or_else(|| {
            (
                String::new(),
                vec![0; 16],
                vec![0xff; 32],
                Vec::new(),
                i64::MAX,
                1,
            )
        });
        // Constant time: ring's HMAC verification.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &salt);
        let token_ok = ring::hmac::verify(&key, token.as_bytes(), &hash).is_ok();
        if !token_ok || disabled != 0 {
            return Err(Failure::Token);
        }
        let secret = self.open_secret(user, &secret).ok_or(Failure::Token)?;
        let step = code_step(&secret, last_step, code, now)?;
        Ok((Role::parse(&role).map_err(|_| Failure::Token)?, step))
    }

    /// The caller a session secret belongs to, if it is known and unexpired and its user enabled.
    pub fn session(&self, secret: &str, now: SystemTime) -> Result<Caller, AuthError> {
        let conn = self.conn();
        let row: Option<(String, String, String, i64)> = conn
            .query_row(
                "SELECT s.user, u.role, s.id, s.expires_at FROM gateway_sessions s
                 JOIN gateway_users u ON u.name = s.user
                 WHERE s.token_hash = ?1 AND u.disabled = 0",
                [sha256(secret.as_bytes())],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        match row {
            Some((user, role, id, expires)) if expires > now_seconds(now) => Ok(Caller {
                user,
                role: Role::parse(&role)?,
                session_id: id,
            }),
            _ => Err(AuthError::Session),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, enclave::DataDir, Accounts) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = enclave::DataDir::new(tmp.path().join("data"));
        dir.init().expect("init");
        let accounts = Accounts::open(&dir, Duration::from_secs(3600)).expect("open");
        (tmp, dir, accounts)
    }

    fn code_at(new: &NewUser, now: SystemTime) -> String {
        let secret = data_encoding::BASE32_NOPAD
            .decode(new.totp_secret.as_bytes())
            .expect("base32");
        format!("{:06}", totp_code(&secret, totp_step(now)))
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    /// RFC 6238's SHA-1 test vectors, truncated to 6 digits.
    #[test]
    fn codes_match_rfc_6238() {
        let secret = b"12345678901234567890";
        for (t, code) in [
            (59u64, 287_082u32),
            (1_111_111_109, 81_804),
            (1_234_567_890, 5_924),
            (2_000_000_000, 279_037),
        ] {
            assert_eq!(totp_code(secret, totp_step(at(t))), code, "T = {t}");
        }
    }

    #[test]
    fn two_factors_open_a_session_once_per_code() {
        let (_tmp, dir, accounts) = setup();
        let alice = accounts
            .add("admin", "alice", Role::Researcher)
            .expect("add");
        assert!(alice.token.starts_with("rwd_") && alice.token.len() > 40);
        assert!(
            alice
                .otpauth_uri
                .starts_with("otpauth://totp/RWD%20Enclave:alice?secret=")
        );
        assert!(alice.otpauth_uri.contains(&alice.totp_secret));
        let now = at(1_800_000_000);
        let code = code_at(&alice, now);
        let s = accounts
            .sign_in("alice", &alice.token, &code, "127.0.0.1", "http", now)
            .expect("signed in");
        let caller = accounts.session(&s.session, now).expect("valid");
        assert_eq!(
            (caller.user.as_str(), caller.role),
            ("alice", Role::Researcher)
        );
        assert_eq!(caller.session_id, s.id);
        // The same code again, even with the right token: a replay.
        let e = accounts
            .sign_in("alice", &alice.token, &code, "127.0.0.1", "http", now)
            .expect_err("replayed");
        assert!(matches!(e.cause(), AuthError::ReplayedCode), "{e}");
        let replay_receipt = e
            .receipt()
            .expect("a recorded refusal carries its receipt")
            .clone();
        // The code of the step before the one used is a replay too; the next step's is fine.
        let later = now + Duration::from_secs(TOTP_STEP_SECONDS);
        let next = code_at(&alice, later);
        accounts
            .sign_in("alice", &alice.token, &next, "127.0.0.1", "http", later)
            .expect("next step");
        // Sessions expire; an unknown secret is refused alike.
        let expired = now + Duration::from_secs(3601);
        assert!(matches!(
            accounts.session(&s.session, expired),
            Err(AuthError::Session)
        ));
        assert!(matches!(
            accounts.session("forged", now),
            Err(AuthError::Session)
        ));
        // Every step is in the audit log, and the log verifies.
        let ledger = dir.ledger(&dir.keystore().expect("ks")).expect("ledger");
        let outcomes: Vec<String> = ledger
            .tail(10)
            .expect("tail")
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        assert_eq!(
            outcomes,
            ["user-added", "signed-in", "sign-in-refused", "signed-in"]
        );
        let pk = std::fs::read_to_string(dir.audit_public_key_path()).expect("pk");
        ledger.verify(pk.trim()).expect("verifies");
        // The refusal's receipt is signed by the log's key and names the refusal's record.
        assert_eq!(replay_receipt.seq, 3);
        ledger
            .verify_head(pk.trim(), &replay_receipt)
            .expect("the receipt holds");
    }

    #[test]
    fn wrong_unknown_and_disabled_get_one_answer_and_failures_are_rate_limited() {
        let (_tmp, _dir, accounts) = setup();
        let bob = accounts.add("admin", "bob", Role::Board).expect("add");
        let mut now = at(1_800_000_000);
        let code = code_at(&bob, now);
        let answers: Vec<String> = [
            accounts.sign_in("bob", "rwd_wrong", &code, "10.0.0.1", "pg", now),
            accounts.sign_in("nobody", &bob.token, &code, "10.0.0.1", "pg", now),
            accounts.sign_in("bob", &bob.token, "12345", "10.0.0.1", "pg", now),
            accounts.sign_in("bob", &bob.token, "abcdef", "10.0.0.1", "pg", now),
            accounts.sign_in("Bob\n#99 forged", &bob.token, &code, "10.0.0.1", "pg", now),
        ]
        .into_iter()
        .map(|r| {
            let e = r.expect_err("refused");
            assert!(
                e.receipt().is_some(),
                "every refused sign-in is recorded: {e:?}"
            );
            e.to_string()
        })
        .collect();
        assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");
        assert!(answers[0].contains("rule 'credentials'"));
        // Wrong tokens do not count against the account: a stranger who knows the name cannot lock it.
        for i in 0..8 {
            accounts
                .sign_in("bob", "rwd_wrong", &code, &format!("10.1.0.{i}"), "pg", now)
                .expect_err("wrong token");
        }
        // Bob's wrong codes do (two above): three more reach the per-user limit, and now even the
        // right pair is refused, from any address.
        for _ in 0..3 {
            accounts
                .sign_in("bob", &bob.token, "000000", "10.0.0.2", "pg", now)
                .expect_err("wrong code");
        }
        let e = accounts
            .sign_in("bob", &bob.token, &code, "10.0.0.3", "pg", now)
            .expect_err("limited");
        assert!(matches!(e.cause(), AuthError::RateLimited), "{e}");
        // The window's first limited attempt is on the record, with its receipt; the next ones write
        // nothing, so they have none.
        assert!(e.receipt().is_some(), "{e:?}");
        let again = accounts
            .sign_in("bob", &bob.token, &code, "10.0.0.3", "pg", now)
            .expect_err("limited");
        assert!(matches!(again.cause(), AuthError::RateLimited) && again.receipt().is_none());
        // After the window the right pair works again.
        now += FAILURE_WINDOW + Duration::from_secs(TOTP_STEP_SECONDS);
        let code = code_at(&bob, now);
        accounts
            .sign_in("bob", &bob.token, &code, "10.0.0.3", "pg", now)
            .expect("after the window");
        // An address with 20 failures is limited for every name.
        for i in 0..MAX_FAILURES_PER_ADDRESS {
            accounts
                .sign_in(&format!("u{i}"), "rwd_x", "000000", "10.6.6.6", "http", now)
                .expect_err("failure");
        }
        let later = now + Duration::from_secs(TOTP_STEP_SECONDS);
        let e = accounts
            .sign_in(
                "bob",
                &bob.token,
                &code_at(&bob, later),
                "10.6.6.6",
                "http",
                later,
            )
            .expect_err("address limited");
        assert!(matches!(e.cause(), AuthError::RateLimited), "{e}");
        // A disabled account answers like a wrong token, and its sessions end.
        accounts.disable("admin", "bob").expect("disable");
        let e = accounts
            .sign_in(
                "bob",
                &bob.token,
                &code_at(&bob, later),
                "10.0.0.4",
                "pg",
                later,
            )
            .expect_err("disabled");
        assert!(matches!(e.cause(), AuthError::Credentials), "{e}");
        let listed = accounts.list().expect("list");
        assert_eq!(listed.len(), 1);
        assert!(listed[0].disabled && listed[0].role == "board");
    }

    /// Racing guesses see each other: of 16 simultaneous wrong codes, exactly the limit is checked and
    /// the rest are refused by the rate limit; a flood of limited attempts is audited once.
    #[test]
    fn racing_guesses_cannot_outrun_the_limit() {
        let (_tmp, dir, accounts) = setup();
        let dan = accounts.add("admin", "dan", Role::Researcher).expect("add");
        let now = at(1_800_000_000);
        let results: Vec<Result<NewSession, AuthError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let (accounts, token) = (&accounts, dan.token.as_str());
                    scope.spawn(move || {
                        accounts.sign_in("dan", token, &format!("{i:06}"), "10.2.0.1", "pg", now)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let checked = results
            .iter()
            .filter(|r| {
                matches!(
                    r.as_ref().map_err(AuthError::cause),
                    Err(AuthError::Credentials)
                )
            })
            .count();
        let limited = results
            .iter()
            .filter(|r| {
                matches!(
                    r.as_ref().map_err(AuthError::cause),
                    Err(AuthError::RateLimited)
                )
            })
            .count();
        // A guess could be right by chance (1 in 10^6 each): then it opened a session instead.
        assert_eq!(
            checked + limited,
            16 - results.iter().filter(|r| r.is_ok()).count()
        );
        assert!(checked <= usize::try_from(MAX_FAILURES_PER_USER).expect("small"));
        let ledger = dir.ledger(&dir.keystore().expect("ks")).expect("ledger");
        let refused = ledger
            .tail(100)
            .expect("tail")
            .into_iter()
            .filter(|r| r.outcome == "sign-in-refused")
            .count();
        assert_eq!(
            refused,
            checked + 1,
            "each checked failure, and the limit once"
        );
    }

    #[test]
    fn names_and_roles_are_checked_and_accounts_are_unique() {
        let (_tmp, _dir, accounts) = setup();
        for bad in [
            "",
            "Alice",
            "a b",
            "a'; DROP TABLE x; --",
            "-x",
            &"a".repeat(65),
        ] {
            assert!(matches!(
                accounts.add("admin", bad, Role::Researcher),
                Err(AuthError::Account(_))
            ));
        }
        assert!(Role::parse("root").is_err());
        accounts.add("admin", "carol", Role::Provider).expect("add");
        assert!(accounts.add("admin", "carol", Role::Board).is_err());
        // One of 100 random guesses of a 6-digit code is not enough to sign in (limit reached first).
        let now = at(1_800_000_000);
        let mut opened = 0;
        for guess in 0..100u32 {
            let r = accounts.sign_in(
                "carol",
                "rwd_x",
                &format!("{guess:06}"),
                "10.9.9.9",
                "http",
                now,
            );
            opened += usize::from(r.is_ok());
        }
        assert_eq!(opened, 0);
    }
}
