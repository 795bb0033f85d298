//! Passkeys (WebAuthn, through `webauthn-rs`): a signed-in user registers one, and from then on their
//! name and the passkey open a session on their own — possession of the authenticator and its user
//! verification (fingerprint, face or PIN; required) are the two factors. Token and TOTP stay the
//! fallback.
//!
//! - A ceremony's state (the challenge) stays in this process, keyed by a random id the browser carries
//!   from start to finish; it is used once and lasts [`CEREMONY_LIFETIME`]. Nothing of it is sent to
//!   the browser but the challenge, so no state can be replayed or forged.
//! - Stored passkeys (public key, credential id, signature counter) are sealed like TOTP secrets
//!   (AES-256-GCM, bound to the account), so a row written into the database by hand does not open.
//! - Finishing a sign-in counts as an attempt like a TOTP code (rate limits per user and address); every
//!   registration, removal and sign-in, accepted or refused, is an audit record.
//! - Starting a sign-in for a name that is unknown, disabled or has no passkey answers one refusal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use enclave::audit::{Event, Via};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use webauthn_rs::prelude::{
    CreationChallengeResponse, Passkey, PasskeyAuthentication, PasskeyRegistration,
    PublicKeyCredential, RegisterPublicKeyCredential, RequestChallengeResponse, Url, Uuid,
    Webauthn, WebauthnBuilder,
};

use super::{Accounts, AuthError, Caller, Failure, NewSession, Role, draft, now_seconds, rfc3339};

/// How long a started ceremony may take to finish.
pub const CEREMONY_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// Ceremonies in progress at most (older ones are dropped first when expired; past this, new ones are
/// refused until some finish or expire).
const MAX_CEREMONIES: usize = 4096;
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
";

/// The relying party (this enclave's web address) and the ceremonies in progress.
pub(super) struct Ceremonies {
    webauthn: Webauthn,
    pending: Mutex<HashMap<String, Pending>>,
}

enum Step {
    Register(Box<PasskeyRegistration>),
    SignIn(Box<PasskeyAuthentication>),
}

struct Pending {
    user: String,
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
            pending: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn put(&self, user: &str, step: Step) -> Result<String, AuthError> {
        let id = hex::encode(super::random::<16>()?);
        let mut pending = self.lock();
        pending.retain(|_, p| p.started.elapsed() < CEREMONY_LIFETIME);
        if pending.len() >= MAX_CEREMONIES {
            return Err(AuthError::RateLimited);
        }
        pending.insert(
            id.clone(),
            Pending {
                user: user.to_owned(),
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

    fn ceremonies(&self) -> Result<&Ceremonies, AuthError> {
        self.passkeys
            .get()
            .ok_or_else(|| refused("passkeys are not offered by this server"))
    }

    /// The passkeys `user` registered, with their stored state.
    fn stored_passkeys(&self, user: &str) -> Result<Vec<(PasskeyInfo, Passkey)>, AuthError> {
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
            out.push((info, passkey));
        }
        Ok(out)
    }

    /// The passkeys `user` registered.
    pub fn passkeys(&self, user: &str) -> Result<Vec<PasskeyInfo>, AuthError> {
        Ok(self
            .stored_passkeys(user)?
            .into_iter()
            .map(|(info, _)| info)
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
            .map(|(_, p)| p.cred_id().clone())
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
        let id = ceremonies.put(&caller.user, Step::Register(Box::new(state)))?;
        Ok((id, options))
    }

    /// Finishes a registration started by [`Accounts::start_passkey_registration`] in the same
    /// session's user: checks the authenticator's answer and stores the passkey, recorded.
    pub fn finish_passkey_registration(
        &self,
        caller: &Caller,
        ceremony: &str,
        label: &str,
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
        )?;
        Ok(PasskeyInfo {
            id: credential,
            label: label.to_owned(),
            created_at: now,
            last_used_at: None,
        })
    }

    /// Removes one of `caller`'s passkeys, recorded.
    pub fn remove_passkey(&self, caller: &Caller, id: &str, via: &Via) -> Result<(), AuthError> {
        let via = Via {
            session: caller.session_id.clone(),
            ..via.clone()
        };
        self.ledger.record_event(
            &draft(&caller.user, &via),
            Event::PasskeyRemoved,
            &format!("passkey {id}"),
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
                Ok(())
            },
        )?;
        Ok(())
    }

    /// Starts a passkey sign-in for `user`: the ceremony's id and the options the browser passes to
    /// `navigator.credentials.get`. An unknown or disabled name, or one without a passkey, is one
    /// refusal.
    pub fn start_passkey_sign_in(
        &self,
        user: &str,
    ) -> Result<(String, RequestChallengeResponse), AuthError> {
        let ceremonies = self.ceremonies()?;
        let no = || refused("no passkey can sign in this name; use the token and code");
        if super::check_name(user).is_err() {
            return Err(no());
        }
        let enabled: Option<i64> = self
            .conn()
            .query_row(
                "SELECT 1 FROM gateway_users WHERE name = ?1 AND disabled = 0",
                [user],
                |r| r.get(0),
            )
            .optional()?;
        let keys: Vec<Passkey> = if enabled.is_some() {
            self.stored_passkeys(user)?
                .into_iter()
                .map(|(_, p)| p)
                .collect()
        } else {
            Vec::new()
        };
        if keys.is_empty() {
            return Err(no());
        }
        let (options, state) = ceremonies
            .webauthn
            .start_passkey_authentication(&keys)
            .map_err(|_| no())?;
        let id = ceremonies.put(user, Step::SignIn(Box::new(state)))?;
        Ok((id, options))
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
        let Step::SignIn(state) = pending.step else {
            return Err(refused(
                "this passkey ceremony is unknown, finished or expired; start again",
            ));
        };
        let user = pending.user;
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
        let verified = ceremonies
            .webauthn
            .finish_passkey_authentication(answer, &state)
            .ok()
            .filter(webauthn_rs::prelude::AuthenticationResult::user_verified);
        let Some(result) = verified else {
            return self.refuse(&user, &origin, attempt, Failure::Code);
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
            .find(|(info, _)| info.id == credential);
        let (Some(role), Some((_, mut passkey))) = (role, stored) else {
            return self.refuse(&user, &origin, attempt, Failure::Token);
        };
        let role = Role::parse(&role)?;
        // webauthn-rs refused a signature counter that did not move forward (a cloned authenticator);
        // the new count is kept.
        if passkey.update_credential(&result) == Some(true) {
            let json = serde_json::to_vec(&passkey)
                .map_err(|_| AuthError::Enclave(enclave::Error::Internal("passkey".into())))?;
            let sealed = self.seal(&seal_label(&user, &credential), &json)?;
            self.conn().execute(
                "UPDATE gateway_passkeys SET sealed = ?2 WHERE credential = ?1",
                params![credential, sealed],
            )?;
        }
        self.conn().execute(
            "UPDATE gateway_passkeys SET last_used_at = ?2 WHERE credential = ?1",
            params![credential, rfc3339(at)],
        )?;
        self.open_session(&user, role, origin, attempt, at, "passkey")
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
            assert!(matches!(e, AuthError::Account(_)), "{bad}: {e}");
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

    #[test]
    fn a_passkey_sign_in_cannot_start_for_an_unknown_disabled_or_keyless_name() {
        let (_t, accounts) = setup();
        accounts
            .enable_passkeys("http://localhost:8080/")
            .expect("enable");
        accounts.add("admin", "carol", Role::Board).expect("add");
        accounts.add("admin", "dave", Role::Board).expect("add");
        accounts.disable("admin", "dave").expect("disable");
        let messages: Vec<String> = ["carol", "dave", "nobody", "", "Robert'); --", "é"]
            .iter()
            .map(|u| {
                accounts
                    .start_passkey_sign_in(u)
                    .expect_err("no passkey")
                    .to_string()
            })
            .collect();
        // One answer for all: it does not tell which names exist.
        assert!(messages.iter().all(|m| m == &messages[0]), "{messages:?}");
        assert!(messages[0].contains("rule 'passkey'"), "{messages:?}");
    }

    #[test]
    fn a_registration_finishes_once_for_its_own_user_and_a_forged_answer_is_refused() {
        let (_t, accounts) = setup();
        accounts
            .enable_passkeys("http://localhost:8080/")
            .expect("enable");
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
        // Another user cannot finish carol's ceremony, and the attempt uses it up.
        let e = accounts
            .finish_passkey_registration(&caller("mallory"), &id, "x", &forged_registration(), &via)
            .expect_err("other user");
        assert!(
            e.to_string().contains("unknown, finished or expired"),
            "{e}"
        );
        let e = accounts
            .finish_passkey_registration(&caller("carol"), &id, "x", &forged_registration(), &via)
            .expect_err("used up");
        assert!(
            e.to_string().contains("unknown, finished or expired"),
            "{e}"
        );
        // A forged answer to a live ceremony does not verify; nothing is stored.
        let (id, _) = accounts
            .start_passkey_registration(&caller("carol"))
            .expect("start");
        let e = accounts
            .finish_passkey_registration(
                &caller("carol"),
                &id,
                "laptop",
                &forged_registration(),
                &via,
            )
            .expect_err("forged");
        assert!(e.to_string().contains("did not verify"), "{e}");
        assert!(accounts.passkeys("carol").expect("list").is_empty());
        // Labels: visible text only, within the limit (checked before the ceremony is used).
        let (id, _) = accounts
            .start_passkey_registration(&caller("carol"))
            .expect("start");
        for label in ["", "   ", "a\u{202E}b", "tab\there", &"x".repeat(65)] {
            let e = accounts
                .finish_passkey_registration(
                    &caller("carol"),
                    &id,
                    label,
                    &forged_registration(),
                    &via,
                )
                .expect_err("label");
            assert!(e.to_string().contains("label"), "{label:?}: {e}");
        }
        assert!(
            accounts
                .remove_passkey(&caller("carol"), "AAAA", &via)
                .is_err()
        );
    }

    #[test]
    fn an_unknown_or_replayed_sign_in_ceremony_is_refused() {
        let (_t, accounts) = setup();
        accounts
            .enable_passkeys("http://localhost:8080/")
            .expect("enable");
        let answer: PublicKeyCredential = serde_json::from_value(serde_json::json!({
            "id": "AAAA", "rawId": "AAAA", "type": "public-key",
            "response": {"authenticatorData": "AA", "clientDataJSON": "e30", "signature": "AA"}
        }))
        .expect("shape");
        for id in ["", "0123", &"f".repeat(32)] {
            let e = accounts
                .finish_passkey_sign_in(id, &answer, "127.0.0.1", "http", SystemTime::now())
                .expect_err("unknown");
            assert!(e.to_string().contains("rule 'passkey'"), "{e}");
        }
    }
}
