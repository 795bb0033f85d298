//! Passkeys (WebAuthn, through `webauthn-rs`): a signed-in user registers one (confirming it with their
//! current TOTP code, so a stolen session alone cannot add a lasting way in), and from then on their name
//! and the passkey open a session on their own — possession of the authenticator and its user
//! verification (fingerprint, face or PIN; required) are the two factors. Token and TOTP stay the
//! fallback.
//!
//! - A ceremony's state stays in this process, keyed by a random id the browser carries from start to
//!   finish; it is used once and lasts [`CEREMONY_LIFETIME`]. The browser gets the challenge, the
//!   relying party and, for a sign-in, the credential ids it may use; no state it could replay or forge.
//!   Ceremonies in progress are capped per address (sign-in) and per user (registration), so nobody can
//!   crowd out everyone else's.
//! - Starting a sign-in answers every name alike: a name that is unknown, disabled or has no passkey
//!   gets stand-in options (a credential id derived from the name under a server key, stable like a real
//!   one) whose finish is refused like a wrong signature, so the answer does not tell which names exist.
//! - Stored passkeys (public key, credential id, signature counter) are sealed like TOTP secrets
//!   (AES-256-GCM, bound to the account and the credential), so a row written into the database by hand
//!   does not open. A sign-in stores the new signature counter only over the state its signature was
//!   checked against (compare and swap), so two racing sign-ins cannot both pass one counter value.
//! - Each session a passkey opens is linked to it: removing the passkey ends those sessions.
//! - Finishing a sign-in counts as an attempt from its address (a failed signature cannot be guessed, so
//!   it does not count against the account: nobody can lock a user out by knowing the name); every
//!   registration, removal and finished sign-in, accepted or refused, is an audit record.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use enclave::audit::{Event, Via};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use webauthn_rs::prelude::{
    CreationChallengeResponse, Passkey, PasskeyAuthentication, PasskeyRegistration,
    PublicKeyCredential, RegisterPublicKeyCredential, Url, Uuid, Webauthn, WebauthnBuilder,
};

use super::{Accounts, AuthError, Caller, Failure, NewSession, Role, draft, now_seconds, rfc3339};

/// How long a started ceremony may take to finish.
pub const CEREMONY_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// Sign-in ceremonies one address (IPv6: its /64) may have in progress.
const MAX_SIGN_INS_PER_ADDRESS: usize = 16;
/// Registrations one user may have in progress.
const MAX_REGISTRATIONS_PER_USER: usize = 4;
/// Ceremonies in progress at most over everyone (expired ones are dropped first).
const MAX_CEREMONIES: usize = 65_536;
/// Passkeys one account may register.
pub const MAX_PASSKEYS: usize = 10;
/// The longest label a passkey may have.
const MAX_LABEL: usize = 64;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS gateway_passkeys (
    credential TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES gateway_users(name),
    label TEXT NOT NULL,
    sealed BLOB NOT NULL,
    created_at TEXT NOT NULL,
    last_used_at TEXT
);
CREATE INDEX IF NOT EXISTS gateway_passkeys_user ON gateway_passkeys(user);
CREATE TABLE IF NOT EXISTS gateway_passkey_sessions (
    session_id TEXT PRIMARY KEY,
    credential TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS gateway_passkey_sessions_credential
    ON gateway_passkey_sessions(credential);
CREATE TRIGGER IF NOT EXISTS gateway_passkey_sessions_end AFTER DELETE ON gateway_sessions
BEGIN
    DELETE FROM gateway_passkey_sessions WHERE session_id = OLD.id;
END;
";

/// The signature count a stored passkey last saw (webauthn-rs keeps it inside; `None` if it cannot be
/// read, which refuses the sign-in).
fn signature_count(passkey: &Passkey) -> Option<u32> {
    serde_json::to_value(passkey).ok()?["cred"]["counter"]
        .as_u64()
        .and_then(|c| u32::try_from(c).ok())
}

/// A registered passkey as stored: what is listed, its state, and the sealed row it came from.
struct Stored {
    info: PasskeyInfo,
    passkey: Passkey,
    sealed: Vec<u8>,
}

/// The relying party (this enclave's web address) and the ceremonies in progress.
pub(super) struct Ceremonies {
    webauthn: Webauthn,
    rp_id: String,
    public_url: String,
    pending: Mutex<HashMap<String, Pending>>,
}

enum Step {
    Register(Box<PasskeyRegistration>),
    SignIn(Box<PasskeyAuthentication>),
    /// A name without a usable passkey: its finish is always refused.
    Decoy,
}

struct Pending {
    user: String,
    peer: String,
    step: Step,
    started: Instant,
}

/// One registered passkey, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct PasskeyInfo {
    /// The credential id (base64url), which names it.
    pub id: String,
    /// The label its user gave it.
    pub label: String,
    /// When it was registered (RFC 3339).
    pub created_at: String,
    /// When it last signed in (RFC 3339), if ever.
    pub last_used_at: Option<String>,
}

fn refused(message: &str) -> AuthError {
    AuthError::Passkey(message.to_owned())
}

/// A refusal raised inside a recording transaction (which then rolled back) as the passkey rule.
fn as_refusal(e: enclave::Error) -> AuthError {
    match e {
        enclave::Error::Config(message) => AuthError::Passkey(message),
        other => AuthError::Enclave(other),
    }
}

/// The WebAuthn user handle of an account: derived from its name (stable, reveals nothing new).
fn user_handle(user: &str) -> Uuid {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("enclave webauthn user\0{user}").as_bytes(),
    );
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    Uuid::from_bytes(b)
}

/// The additional data a passkey is sealed under: the account and the credential.
fn seal_label(user: &str, credential: &str) -> String {
    format!("passkey\0{user}\0{credential}")
}

impl Ceremonies {
    fn new(public_url: &str) -> Result<Ceremonies, AuthError> {
        let url = Url::parse(public_url).map_err(|_| {
            AuthError::Account(format!(
                "the public URL {public_url:?} is not a URL (e.g. https://enclave.example.org)"
            ))
        })?;
        let host = url.host_str().unwrap_or("").to_owned();
        let secure = url.scheme() == "https" || (url.scheme() == "http" && host == "localhost");
        if !secure || url.path() != "/" || url.query().is_some() {
            return Err(AuthError::Account(format!(
                "the public URL {public_url:?} must be https://HOST[:PORT]/ (or http://localhost:PORT/): browsers offer passkeys only there"
            )));
        }
        let webauthn = WebauthnBuilder::new(&host, &url)
            .and_then(|b| b.rp_name("RWD Enclave").timeout(CEREMONY_LIFETIME).build())
            .map_err(|e| {
                AuthError::Account(format!("passkeys cannot be offered at {public_url:?}: {e}"))
            })?;
        Ok(Ceremonies {
            webauthn,
            rp_id: host,
            public_url: url.to_string(),
            pending: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps a started ceremony; refused when its address (sign-ins) or user (registrations) has too
    /// many in progress, or everyone together has.
    fn put(&self, user: &str, peer: &str, step: Step) -> Result<String, AuthError> {
        let id = hex::encode(super::random::<16>()?);
        let mut pending = self.lock();
        pending.retain(|_, p| p.started.elapsed() < CEREMONY_LIFETIME);
        let registering = matches!(step, Step::Register(_));
        let mine = pending
            .values()
            .filter(|p| {
                if registering {
                    matches!(p.step, Step::Register(_)) && p.user == user
                } else {
                    !matches!(p.step, Step::Register(_)) && p.peer == peer
                }
            })
            .count();
        let cap = if registering {
            MAX_REGISTRATIONS_PER_USER
        } else {
            MAX_SIGN_INS_PER_ADDRESS
        };
        if mine >= cap || pending.len() >= MAX_CEREMONIES {
            return Err(refused(
                "too many passkey ceremonies are in progress from here; finish one or try again in a few minutes",
            ));
        }
        pending.insert(
            id.clone(),
            Pending {
                user: user.to_owned(),
                peer: peer.to_owned(),
                step,
                started: Instant::now(),
            },
        );
        Ok(id)
    }

    /// Takes the ceremony `id` out (it can be finished once).
    fn take(&self, id: &str) -> Result<Pending, AuthError> {
        match self.lock().remove(id) {
            Some(p) if p.started.elapsed() < CEREMONY_LIFETIME => Ok(p),
            _ => Err(refused(
                "this passkey ceremony is unknown, finished or expired; start again",
            )),
        }
    }
}

impl Accounts {
    /// Offers passkeys to browsers at `public_url` (the address users open; passkeys are bound to its
    /// host). Until this is called, passkey ceremonies are refused.
    pub fn enable_passkeys(&self, public_url: &str) -> Result<(), AuthError> {
        let ceremonies = Ceremonies::new(public_url)?;
        self.passkeys
            .set(ceremonies)
            .map_err(|_| AuthError::Account("passkeys are enabled already".into()))
    }

    /// The address users open the web UI at, once passkeys are offered there.
    pub fn public_url(&self) -> Option<&str> {
        self.passkeys.get().map(|c| c.public_url.as_str())
    }

    fn ceremonies(&self) -> Result<&Ceremonies, AuthError> {
        self.passkeys
            .get()
            .ok_or_else(|| refused("passkeys are not offered by this server"))
    }

    /// The passkeys `user` registered, with their stored state.
    fn stored_passkeys(&self, user: &str) -> Result<Vec<Stored>, AuthError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT credential, label, sealed, created_at, last_used_at FROM gateway_passkeys
             WHERE user = ?1 ORDER BY created_at, credential",
        )?;
        let rows = stmt.query_map([user], |r| {
            Ok((
                PasskeyInfo {
                    id: r.get(0)?,
                    label: r.get(1)?,
                    created_at: r.get(3)?,
                    last_used_at: r.get(4)?,
                },
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (info, sealed) = row?;
            // A row that does not open under this account is not one of its passkeys.
            let Some(json) = self.open_secret(&seal_label(user, &info.id), &sealed) else {
                continue;
            };
            let Ok(passkey) = serde_json::from_slice::<Passkey>(&json) else {
                continue;
            };
            out.push(Stored {
                info,
                passkey,
                sealed,
            });
        }
        Ok(out)
    }

    /// The passkeys `user` registered.
    pub fn passkeys(&self, user: &str) -> Result<Vec<PasskeyInfo>, AuthError> {
        Ok(self
            .stored_passkeys(user)?
            .into_iter()
            .map(|stored| stored.info)
            .collect())
    }

    /// Starts registering a passkey for the signed-in `caller`: the ceremony's id and the options the
    /// browser passes to `navigator.credentials.create`.
    pub fn start_passkey_registration(
        &self,
        caller: &Caller,
    ) -> Result<(String, CreationChallengeResponse), AuthError> {
        let ceremonies = self.ceremonies()?;
        let existing = self.stored_passkeys(&caller.user)?;
        if existing.len() >= MAX_PASSKEYS {
            return Err(refused(&format!(
                "an account may register at most {MAX_PASSKEYS} passkeys; remove one first"
            )));
        }
        let exclude = existing
            .iter()
            .map(|stored| stored.passkey.cred_id().clone())
            .collect::<Vec<_>>();
        let (options, state) = ceremonies
            .webauthn
            .start_passkey_registration(
                user_handle(&caller.user),
                &caller.user,
                &caller.user,
                Some(exclude),
            )
            .map_err(|_| refused("the passkey registration could not be started"))?;
        let id = ceremonies.put(&caller.user, "", Step::Register(Box::new(state)))?;
        Ok((id, options))
    }

    /// Finishes a registration started by [`Accounts::start_passkey_registration`] in the same
    /// session's user: checks their current TOTP `code` (step-up), then the authenticator's answer, and
    /// stores the passkey, recorded.
    #[allow(clippy::too_many_arguments)]
    pub fn finish_passkey_registration(
        &self,
        caller: &Caller,
        ceremony: &str,
        label: &str,
        code: &str,
        answer: &RegisterPublicKeyCredential,
        via: &Via,
    ) -> Result<PasskeyInfo, AuthError> {
        let label = label.trim();
        if label.is_empty()
            || label.chars().count() > MAX_LABEL
            || label
                .chars()
                .any(|c| c.is_control() || enclave::access::is_invisible(c))
        {
            return Err(refused(&format!(
                "a passkey's label is 1 to {MAX_LABEL} visible characters"
            )));
        }
        let ceremonies = self.ceremonies()?;
        let pending = ceremonies.take(ceremony)?;
        let (Step::Register(state), true) = (pending.step, pending.user == caller.user) else {
            return Err(refused(
                "this passkey ceremony is unknown, finished or expired; start again",
            ));
        };
        self.verify_code(
            &caller.user,
            code,
            &via.peer,
            &via.origin,
            SystemTime::now(),
        )?;

        let passkey = ceremonies
            .webauthn
            .finish_passkey_registration(answer, &state)
            .map_err(|_| {
                refused("the authenticator's answer did not verify (or user verification was not performed)")
            })?;
        let credential = data_encoding::BASE64URL_NOPAD.encode(passkey.cred_id().as_ref());
        let json = serde_json::to_vec(&passkey)
            .map_err(|_| AuthError::Enclave(enclave::Error::Internal("passkey".into())))?;
        let sealed = self.seal(&seal_label(&caller.user, &credential), &json)?;
        let now = rfc3339(now_seconds(SystemTime::now()));
        let via = Via {
            session: caller.session_id.clone(),
            ..via.clone()
        };
        self.ledger.record_event(
            &draft(&caller.user, &via),
            Event::PasskeyAdded,
            &format!("passkey {label:?}"),
            |tx| {
                // Checked in the transaction that inserts: parallel registrations cannot pass the limit
                // or register one credential twice.
                let count: i64 = tx.query_row(
                    "SELECT COUNT(*) FROM gateway_passkeys WHERE user = ?1",
                    [&caller.user],
                    |r| r.get(0),
                )?;
                if usize::try_from(count).unwrap_or(usize::MAX) >= MAX_PASSKEYS {
                    return Err(enclave::Error::Config(format!(
                        "an account may register at most {MAX_PASSKEYS} passkeys; remove one first"
                    )));
                }
                let taken: Option<i64> = tx
                    .query_row(
                        "SELECT 1 FROM gateway_passkeys WHERE credential = ?1",
                        [&credential],
                        |r| r.get(0),
                    )
                    .optional()?;
                if taken.is_some() {
                    return Err(enclave::Error::Config(
                        "this passkey is registered already".into(),
                    ));
                }
                tx.execute(
                    "INSERT INTO gateway_passkeys (credential, user, label, sealed, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![credential, caller.user, label, sealed, now],
                )?;
                Ok(())
            },
        )
        .map_err(as_refusal)?;
        Ok(PasskeyInfo {
            id: credential,
            label: label.to_owned(),
            created_at: now,
            last_used_at: None,
        })
    }

    /// Removes one of `caller`'s passkeys and ends every session it opened (the caller's own too, when
    /// it was opened with it: a passkey removed because it was lost must not keep a way in), recorded.
    pub fn remove_passkey(&self, caller: &Caller, id: &str, via: &Via) -> Result<(), AuthError> {
        let via = Via {
            session: caller.session_id.clone(),
            ..via.clone()
        };
        self.ledger
            .record_event(
                &draft(&caller.user, &via),
                Event::PasskeyRemoved,
                &format!("passkey {id}, with the sessions it opened"),
                |tx| {
                    let n = tx.execute(
                        "DELETE FROM gateway_passkeys WHERE credential = ?1 AND user = ?2",
                        params![id, caller.user],
                    )?;
                    if n == 0 {
                        return Err(enclave::Error::Config(
                            "no such passkey on this account".into(),
                        ));
                    }
                    tx.execute(
                        "DELETE FROM gateway_sessions WHERE id IN
                             (SELECT session_id FROM gateway_passkey_sessions WHERE credential = ?1)",
                        [id],
                    )?;
                    Ok(())
                },
            )
            .map_err(as_refusal)?;
        Ok(())
    }

    /// Starts a passkey sign-in for `user` from `peer` (an address group): the ceremony's id and the
    /// options the browser passes to `navigator.credentials.get`. A name that is unknown, disabled or
    /// has no passkey gets stand-in options alike (see the module's doc).
    pub fn start_passkey_sign_in(
        &self,
        user: &str,
        peer: &str,
    ) -> Result<(String, serde_json::Value), AuthError> {
        let ceremonies = self.ceremonies()?;
        let enabled: Option<i64> = if super::check_name(user).is_ok() {
            self.conn()
                .query_row(
                    "SELECT 1 FROM gateway_users WHERE name = ?1 AND disabled = 0",
                    [user],
                    |r| r.get(0),
                )
                .optional()?
        } else {
            None
        };
        let keys: Vec<Passkey> = if enabled.is_some() {
            self.stored_passkeys(user)?
                .into_iter()
                .map(|stored| stored.passkey)
                .collect()
        } else {
            Vec::new()
        };
        let started = (!keys.is_empty())
            .then(|| ceremonies.webauthn.start_passkey_authentication(&keys).ok())
            .flatten();
        let (options, step) = match started {
            Some((options, state)) => (
                serde_json::to_value(options).map_err(|_| {
                    AuthError::Enclave(enclave::Error::Internal("passkey options".into()))
                })?,
                Step::SignIn(Box::new(state)),
            ),
            None => (self.decoy_options(ceremonies, user)?, Step::Decoy),
        };
        let id = ceremonies.put(user, peer, step)?;
        Ok((id, options))
    }

    /// Options shaped like a real sign-in's, for a name without a usable passkey: a fresh challenge and
    /// one credential id derived from the name (the same every time, like a real one).
    fn decoy_options(
        &self,
        ceremonies: &Ceremonies,
        user: &str,
    ) -> Result<serde_json::Value, AuthError> {
        let b64 = |b: &[u8]| data_encoding::BASE64URL_NOPAD.encode(b);
        let challenge = super::random::<32>()?;
        let credential = ring::hmac::sign(&self.decoy_key, user.as_bytes());
        Ok(serde_json::json!({
            "publicKey": {
                "challenge": b64(&challenge),
                "timeout": u64::try_from(CEREMONY_LIFETIME.as_millis()).unwrap_or(u64::MAX),
                "rpId": ceremonies.rp_id,
                "allowCredentials": [{"type": "public-key", "id": b64(&credential.as_ref()[..16])}],
                "userVerification": "required",
            }
        }))
    }

    /// Finishes a passkey sign-in: the authenticator's signature over the challenge, with user
    /// verification, opens a session like token and code do. Counted and recorded like a code.
    pub fn finish_passkey_sign_in(
        &self,
        ceremony: &str,
        answer: &PublicKeyCredential,
        peer: &str,
        protocol: &str,
        now: SystemTime,
    ) -> Result<NewSession, AuthError> {
        let ceremonies = self.ceremonies()?;
        let pending = ceremonies.take(ceremony)?;
        let user = pending.user;
        let state = match pending.step {
            Step::SignIn(state) => Some(state),
            Step::Decoy => None,
            Step::Register(_) => {
                return Err(refused(
                    "this passkey ceremony is unknown, finished or expired; start again",
                ));
            }
        };
        let at = now_seconds(now);
        let origin = Via {
            origin: protocol.to_owned(),
            peer: peer.to_owned(),
            ..Via::default()
        };
        let attempt = match self.claim_attempt(&user, peer, at) {
            Ok(id) => id,
            Err(AuthError::RateLimited) => return self.refuse_limited(&user, peer, &origin, at),
            Err(e) => return Err(e),
        };
        // A signature that does not verify counts against the address only (it cannot be guessed, and
        // counting it against the account would let anyone lock it out).
        let verified = state
            .and_then(|state| {
                ceremonies
                    .webauthn
                    .finish_passkey_authentication(answer, &state)
                    .ok()
            })
            .filter(webauthn_rs::prelude::AuthenticationResult::user_verified);
        let Some(result) = verified else {
            return self.refuse(&user, &origin, attempt, Failure::Token);
        };
        // The account must still be enabled, and the passkey still its own (not removed meanwhile).
        let role: Option<String> = self
            .conn()
            .query_row(
                "SELECT role FROM gateway_users WHERE name = ?1 AND disabled = 0",
                [&user],
                |r| r.get(0),
            )
            .optional()?;
        let credential = data_encoding::BASE64URL_NOPAD.encode(result.cred_id().as_ref());
        let stored = self
            .stored_passkeys(&user)?
            .into_iter()
            .find(|stored| stored.info.id == credential);
        let (Some(role), Some(mut stored)) = (role, stored) else {
            return self.refuse(&user, &origin, attempt, Failure::Token);
        };
        let role = Role::parse(&role)?;
        // webauthn-rs checked the signature counter against the passkey as it was when the ceremony
        // started; a sign-in may have moved it since (a cloned authenticator answering an old
        // ceremony). Checked again against the stored count: a counting authenticator must move past it.
        let stored_count = signature_count(&stored.passkey);
        let counting = result.counter() > 0 || stored_count.is_none_or(|c| c > 0);
        if counting && stored_count.is_none_or(|c| result.counter() <= c) {
            if stored_count.is_some() {
                tracing::warn!(user = %user, "a passkey's signature counter did not move forward: refused");
            } else {
                tracing::error!(user = %user, "a stored passkey's signature counter cannot be read: refused");
            }
            return self.refuse(&user, &origin, attempt, Failure::Token);
        }
        let sealed = if stored.passkey.update_credential(&result) == Some(true) {
            let json = serde_json::to_vec(&stored.passkey)
                .map_err(|_| AuthError::Enclave(enclave::Error::Internal("passkey".into())))?;
            self.seal(&seal_label(&user, &credential), &json)?
        } else {
            stored.sealed.clone()
        };
        // Only over the state just checked (compare and swap): of two sign-ins racing with one count,
        // the second finds it moved and is refused, and a passkey removed meanwhile is not used.
        let moved = self.conn().execute(
            "UPDATE gateway_passkeys SET sealed = ?3, last_used_at = ?4
             WHERE credential = ?1 AND user = ?2 AND sealed = ?5",
            params![credential, user, sealed, rfc3339(at), stored.sealed],
        )?;
        if moved == 0 {
            return self.refuse(&user, &origin, attempt, Failure::Token);
        }
        self.open_session(&user, role, origin, attempt, at, Some(&credential))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, Accounts) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = enclave::DataDir::new(tmp.path().join("data"));
        dir.init().expect("init");
        let accounts = Accounts::open(&dir, Duration::from_secs(3600)).expect("open");
        (tmp, accounts)
    }

    fn caller(user: &str) -> Caller {
        Caller {
            user: user.into(),
            role: Role::Board,
            session_id: "s1".into(),
        }
    }

    /// A registration answer that parses but was not made for any challenge.
    fn forged_registration() -> RegisterPublicKeyCredential {
        serde_json::from_value(serde_json::json!({
            "id": "AAAA", "rawId": "AAAA", "type": "public-key",
            "response": {"attestationObject": "oA", "clientDataJSON": "e30"}
        }))
        .expect("shape")
    }

    #[test]
    fn passkeys_are_offered_only_at_an_address_browsers_allow_them() {
        let (_t, accounts) = setup();
        for bad in [
            "http://127.0.0.1:8080/",
            "http://enclave.example.org/",
            "https://enclave.example.org/ui/",
            "https://enclave.example.org/?x=1",
            "not a url",
        ] {
            let e = Ceremonies::new(bad).err().expect(bad);
            assert!(matches!(e.cause(), AuthError::Account(_)), "{bad}: {e}");
        }
        assert!(Ceremonies::new("https://enclave.example.org/").is_ok());
        assert!(Ceremonies::new("http://localhost:8080/").is_ok());
        // Before they are enabled every ceremony is refused.
        let e = accounts
            .start_passkey_registration(&caller("board"))
            .expect_err("not enabled");
        assert!(e.to_string().contains("rule 'passkey'"), "{e}");
        accounts
            .enable_passkeys("http://localhost:8080/")
            .expect("enable");
        assert!(accounts.enable_passkeys("http://localhost:8080/").is_err());
    }

    fn code_now(new: &super::super::NewUser) -> String {
        let secret = data_encoding::BASE32_NOPAD
            .decode(new.totp_secret.as_bytes())
            .expect("base32");
        format!(
            "{:06}",
            super::super::totp_code(&secret, super::super::totp_step(SystemTime::now()))
        )
    }

    fn forged_assertion() -> PublicKeyCredential {
        serde_json::from_value(serde_json::json!({
            "id": "AAAA", "rawId": "AAAA", "type": "public-key",
            "response": {"authenticatorData": "AA", "clientDataJSON": "e30", "signature": "AA"}
        }))
        .expect("shape")
    }

    #[test]
    fn a_passkey_sign_in_answers_every_name_alike_and_a_stand_in_never_signs_in() {
        let (_t, accounts) = setup();
        accounts
            .enable_passkeys("http://localhost:8080/")
            .expect("enable");
        let carol = accounts.add("admin", "carol", Role::Board).expect("add");
        accounts.add("admin", "dave", Role::Board).expect("add");
        accounts.disable("admin", "dave").expect("disable");
        let shape = |v: &serde_json::Value| {
            let pk = &v["publicKey"];
            let mut keys: Vec<String> = pk.as_object().expect("object").keys().cloned().collect();
            keys.sort();
            (
                keys,
                pk["allowCredentials"].as_array().map(Vec::len),
                pk["userVerification"].clone(),
                pk["rpId"].clone(),
            )
        };
        let mut shapes = Vec::new();
        for user in ["carol", "dave", "nobody", "", "Robert'); --", "é"] {
            let (id, options) = accounts
                .start_passkey_sign_in(user, "192.0.2.1")
                .expect("options for every name");
            shapes.push(shape(&options));
            // The stand-in's credential id is the same on every start (a real one would be).
            let (_, again) = accounts
                .start_passkey_sign_in(user, "192.0.2.2")
                .expect("again");
            assert_eq!(
                options["publicKey"]["allowCredentials"],
                again["publicKey"]["allowCredentials"]
            );
            assert_ne!(
                options["publicKey"]["challenge"],
                again["publicKey"]["challenge"]
            );
            let e = accounts
                .finish_passkey_sign_in(
                    &id,
                    &forged_assertion(),
                    "192.0.2.1",
                    "http",
                    SystemTime::now(),
                )
                .expect_err("a stand-in never signs in");
            assert!(matches!(e.cause(), AuthError::Credentials), "{user:?}: {e}");
        }
        assert!(shapes.iter().all(|s| s == &shapes[0]), "{shapes:?}");
        assert_eq!(shapes[0].2, "required");
        // Failed passkey finishes count against the address only: carol, named in many of them from
        // another address, still signs in with her token and code.
        for _ in 0..super::super::MAX_FAILURES_PER_USER + 1 {
            let (id, _) = accounts
                .start_passkey_sign_in("carol", "198.51.100.1")
                .expect("start");
            let _ = accounts.finish_passkey_sign_in(
                &id,
                &forged_assertion(),
                "198.51.100.1",
                "http",
                SystemTime::now(),
            );
        }
        accounts
            .sign_in(
                "carol",
                &carol.token,
                &code_now(&carol),
                "203.0.113.5",
                "http",
                SystemTime::now(),
            )
            .expect("not locked out");
    }

    #[test]
    fn sign_in_ceremonies_are_capped_per_address_and_registrations_per_user() {
        let (_t, accounts) = setup();
        accounts
            .enable_passkeys("http://localhost:8080/")
            .expect("enable");
        for _ in 0..MAX_SIGN_INS_PER_ADDRESS {
            accounts
                .start_passkey_sign_in("anyone", "198.51.100.7")
                .expect("within the cap");
        }
        let e = accounts
            .start_passkey_sign_in("anyone", "198.51.100.7")
            .expect_err("over the cap");
        assert!(e.to_string().contains("too many passkey ceremonies"), "{e}");
        // Another address is not crowded out.
        accounts
            .start_passkey_sign_in("anyone", "203.0.113.9")
            .expect("another address");
        for _ in 0..MAX_REGISTRATIONS_PER_USER {
            accounts
                .start_passkey_registration(&caller("carol"))
                .expect("within the cap");
        }
        assert!(
            accounts
                .start_passkey_registration(&caller("carol"))
                .is_err()
        );
        accounts
            .start_passkey_registration(&caller("erin"))
            .expect("another user");
    }

    #[test]
    fn a_registration_finishes_once_for_its_own_user_after_a_fresh_code() {
        let (_t, accounts) = setup();
        accounts
            .enable_passkeys("http://localhost:8080/")
            .expect("enable");
        let carol = accounts.add("admin", "carol", Role::Board).expect("add");
        let via = Via::local("test");
        let (id, options) = accounts
            .start_passkey_registration(&caller("carol"))
            .expect("start");
        // The options ask for user verification, and name the account by its derived handle.
        let json = serde_json::to_value(&options).expect("json");
        assert_eq!(
            json["publicKey"]["authenticatorSelection"]["userVerification"],
            "required"
        );
        assert_eq!(json["publicKey"]["user"]["name"], "carol");
        let finish = |user: &str, id: &str, label: &str, code: &str| {
            accounts.finish_passkey_registration(
                &caller(user),
                id,
                label,
                code,
                &forged_registration(),
                &via,
            )
        };
        // Another user cannot finish carol's ceremony, and the attempt uses it up.
        let code = code_now(&carol);
        let e = finish("mallory", &id, "x", &code).expect_err("other user");
        assert!(
            e.to_string().contains("unknown, finished or expired"),
            "{e}"
        );
        let e = finish("carol", &id, "x", &code).expect_err("used up");
        assert!(
            e.to_string().contains("unknown, finished or expired"),
            "{e}"
        );
        // A wrong code (a session alone) is refused before the answer is looked at.
        let (id, _) = accounts
            .start_passkey_registration(&caller("carol"))
            .expect("start");
        let wrong = format!(
            "{:06}",
            (code.parse::<u32>().expect("digits") + 1) % 1_000_000
        );
        let e = finish("carol", &id, "laptop", &wrong).expect_err("wrong code");
        assert!(matches!(e.cause(), AuthError::Credentials), "{e}");
        // The right code and a forged answer: does not verify, nothing is stored, the code is used.
        let (id, _) = accounts
            .start_passkey_registration(&caller("carol"))
            .expect("start");
        let e = finish("carol", &id, "laptop", &code).expect_err("forged");
        assert!(e.to_string().contains("did not verify"), "{e}");
        assert!(accounts.passkeys("carol").expect("list").is_empty());
        let (id, _) = accounts
            .start_passkey_registration(&caller("carol"))
            .expect("start");
        let e = finish("carol", &id, "laptop", &code).expect_err("replayed code");
        assert!(matches!(e.cause(), AuthError::ReplayedCode), "{e}");
        // Labels: visible text only, within the limit (checked before the ceremony is used).
        let (id, _) = accounts
            .start_passkey_registration(&caller("carol"))
            .expect("start");
        for label in ["", "   ", "a\u{202E}b", "tab\there", &"x".repeat(65)] {
            let e = finish("carol", &id, label, &code).expect_err("label");
            assert!(e.to_string().contains("label"), "{label:?}: {e}");
        }
        // Removing a passkey that is not there is a refusal (not an internal error).
        let e = accounts
            .remove_passkey(&caller("carol"), "AAAA", &via)
            .expect_err("none");
        assert!(matches!(e.cause(), AuthError::Passkey(_)), "{e}");
    }

    #[test]
    fn an_unknown_or_used_sign_in_ceremony_is_refused() {
        let (_t, accounts) = setup();
        accounts
            .enable_passkeys("http://localhost:8080/")
            .expect("enable");
        for id in ["", "0123", &"f".repeat(32)] {
            let e = accounts
                .finish_passkey_sign_in(
                    id,
                    &forged_assertion(),
                    "127.0.0.1",
                    "http",
                    SystemTime::now(),
                )
                .expect_err("unknown");
            assert!(e.to_string().contains("rule 'passkey'"), "{e}");
        }
        // A ceremony is finished once: the second finish finds nothing.
        let (id, _) = accounts
            .start_passkey_sign_in("carol", "127.0.0.1")
            .expect("start");
        let first = accounts
            .finish_passkey_sign_in(
                &id,
                &forged_assertion(),
                "127.0.0.1",
                "http",
                SystemTime::now(),
            )
            .expect_err("forged");
        assert!(matches!(first.cause(), AuthError::Credentials), "{first}");
        let second = accounts
            .finish_passkey_sign_in(
                &id,
                &forged_assertion(),
                "127.0.0.1",
                "http",
                SystemTime::now(),
            )
            .expect_err("used");
        assert!(
            second.to_string().contains("unknown, finished or expired"),
            "{second}"
        );
    }

    #[test]
    fn removing_a_passkey_ends_the_sessions_it_opened_and_a_removed_one_opens_none() {
        let (_t, accounts) = setup();
        let erin = accounts.add("admin", "erin", Role::Board).expect("add");
        // Two passkeys on the row level (their signatures are checked before this point).
        for credential in ["cred-a", "cred-b"] {
            accounts
                .conn()
                .execute(
                    "INSERT INTO gateway_passkeys (credential, user, label, sealed, created_at)
                     VALUES (?1, 'erin', 'key', x'00', '2026-01-01T00:00:00Z')",
                    [credential],
                )
                .expect("row");
        }
        let now = SystemTime::now();
        let at = now_seconds(now);
        let origin = Via {
            origin: "http".into(),
            peer: "127.0.0.1".into(),
            ..Via::default()
        };
        let open = |passkey: Option<&str>| {
            let attempt = accounts
                .claim_attempt("erin", "127.0.0.1", at)
                .expect("claim");
            accounts.open_session("erin", Role::Board, origin.clone(), attempt, at, passkey)
        };
        let by_a = open(Some("cred-a")).expect("by a");
        let by_a_too = open(Some("cred-a")).expect("by a again");
        let by_b = open(Some("cred-b")).expect("by b");
        let by_code = accounts
            .sign_in(
                "erin",
                &erin.token,
                &code_now(&erin),
                "127.0.0.1",
                "http",
                now,
            )
            .expect("by token and code");
        let me = accounts.session(&by_code.session, now).expect("valid");
        accounts
            .remove_passkey(&me, "cred-a", &origin)
            .expect("removed");
        for (s, alive) in [
            (&by_a, false),
            (&by_a_too, false),
            (&by_b, true),
            (&by_code, true),
        ] {
            assert_eq!(accounts.session(&s.session, now).is_ok(), alive, "{}", s.id);
        }
        // A sign-in that raced the removal finds its passkey gone: no session, a recorded refusal.
        let e = open(Some("cred-a")).expect_err("removed meanwhile");
        assert!(matches!(e.cause(), AuthError::Credentials), "{e}");
        assert!(e.receipt().is_some(), "{e:?}");
        // Ending a session (signing out) leaves no link behind.
        accounts.sign_out(&by_b.session, &origin).expect("out");
        let links: i64 = accounts
            .conn()
            .query_row("SELECT COUNT(*) FROM gateway_passkey_sessions", [], |r| {
                r.get(0)
            })
            .expect("count");
        assert_eq!(links, 0);
        // Another account cannot remove erin's passkey.
        let other = Caller {
            user: "frank".into(),
            role: Role::Board,
            session_id: "s2".into(),
        };
        let e = accounts
            .remove_passkey(&other, "cred-b", &origin)
            .expect_err("not frank's");
        assert!(matches!(e.cause(), AuthError::Passkey(_)), "{e}");
    }
}
