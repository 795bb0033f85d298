//! Keyed pseudonyms and per-person date shifts, derived from the enclave's linkage key.
//!
//! `person_id = HMAC-SHA256(K_person, "nid:" + normalised national ID)` when the national ID is present
//! and valid, else `HMAC(K_person, "pid:" + provider + ":" + patient ID)`. The same national ID therefore
//! gives the same `person_id` at every provider of one enclave. Other identifiers become
//! `HMAC(K_token, column + provider + value)`. The date shift is `HMAC(K_shift, person_id)` reduced to
//! `[-n, n] \ {0}` days. The three keys come from the linkage key through HKDF-SHA256, so one secret
//! serves all and none can be computed from another.

use ring::{hkdf, hmac};
use zeroize::Zeroizing;

/// The linkage secret: 32 bytes, zeroised on drop, never printed.
pub struct LinkageKey(Zeroizing<[u8; 32]>);

impl LinkageKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> LinkageKey {
        LinkageKey(Zeroizing::new(bytes))
    }
}

struct HmacLen;
impl hkdf::KeyType for HmacLen {
    fn len(&self) -> usize {
        32
    }
}

/// The derived keys the pipeline uses.
#[derive(Clone)]
pub struct Pseudonymizer {
    person: hmac::Key,
    token: hmac::Key,
    shift: hmac::Key,
}

impl Pseudonymizer {
    /// Derives the pseudonymisation keys from the linkage key.
    pub fn new(key: &LinkageKey) -> Pseudonymizer {
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, b"rwd-enclave/linkage/v1").extract(key.0.as_ref());
        let derive = |label: &'static [u8]| {
            let mut out = Zeroizing::new([0u8; 32]);
            let labels = [label];
            // Both calls only fail for an output longer than 255 hash lengths; 32 bytes is fixed here.
            #[allow(clippy::expect_used)]
            prk.expand(&labels, HmacLen)
                .and_then(|okm| okm.fill(out.as_mut()))
                .expect("HKDF of 32 bytes");
            hmac::Key::new(hmac::HMAC_SHA256, out.as_ref())
        };
        Pseudonymizer {
            person: derive(b"person"),
            token: derive(b"token"),
            shift: derive(b"date-shift"),
        }
    }

    /// The `person_id` for a validated, normalised national ID (provider-independent).
    pub fn person_from_national_id(&self, normalised: &str) -> String {
        tag_hex(&self.person, &[b"nid:", normalised.as_bytes()])
    }

    /// The `person_id` for a provider-local patient ID.
    pub fn person_from_local_id(&self, provider: &str, patient_id: &str) -> String {
        tag_hex(
            &self.person,
            &[
                b"pid:",
                provider.as_bytes(),
                b":",
                patient_id.trim().as_bytes(),
            ],
        )
    }

    /// A keyed token for another identifier column.
    pub fn token(&self, column: &str, provider: &str, value: &str) -> String {
        tag_hex(
            &self.token,
            &[
                column.as_bytes(),
                b"\0",
                provider.as_bytes(),
                b"\0",
                value.trim().as_bytes(),
            ],
        )
    }

    /// The person's date shift in days, in `[-max_days, max_days]` and never 0 (0 when `max_days` is 0).
    pub fn shift_days(&self, person_id: &str, max_days: u32) -> i64 {
        if max_days == 0 {
            return 0;
        }
        let tag = hmac::sign(&self.shift, person_id.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&tag.as_ref()[..8]);
        let r = u64::from_be_bytes(b) % (2 * u64::from(max_days));
        let r = i64::try_from(r).unwrap_or(0) - i64::from(max_days);
        if r >= 0 { r + 1 } else { r }
    }
}

fn tag_hex(key: &hmac::Key, parts: &[&[u8]]) -> String {
    let mut ctx = hmac::Context::with_key(key);
    for p in parts {
        ctx.update(p);
    }
    // 128 bits of the tag: collision-free for any realistic population, short enough to read.
    let tag = ctx.sign();
    let tag = &tag.as_ref()[..16];
    // `encode_to_slice` writes through a table; `encode` goes a char at a time through an iterator,
    // which showed in the ingest profile (one tag per pseudonymised value).
    let mut out = [0u8; 32];
    if hex::encode_to_slice(tag, &mut out).is_ok()
        && let Ok(s) = std::str::from_utf8(&out)
    {
        return s.to_owned();
    }
    hex::encode(tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(seed: u8) -> Pseudonymizer {
        Pseudonymizer::new(&LinkageKey::from_bytes([seed; 32]))
    }

    #[test]
    fn national_id_links_across_providers_but_not_across_keys() {
        let a = p(1);
        assert_eq!(
            a.person_from_national_id("9434765919"),
            p(1).person_from_national_id("9434765919")
        );
        assert_ne!(
            a.person_from_national_id("9434765919"),
            p(2).person_from_national_id("9434765919")
        );
        assert_ne!(
            a.person_from_local_id("H1", "17"),
            a.person_from_local_id("H2", "17")
        );
        assert_eq!(a.person_from_local_id("H1", "17").len(), 32);
    }

    proptest! {
        #[test]
        fn pseudonyms_are_stable_and_shifts_bounded(id in "[0-9]{10}", max in 1u32..400) {
            let (a, b) = (p(7), p(7));
            let person = a.person_from_national_id(&id);
            prop_assert_eq!(&person, &b.person_from_national_id(&id));
            let s = a.shift_days(&person, max);
            prop_assert_eq!(s, b.shift_days(&person, max));
            prop_assert!(s != 0 && s.unsigned_abs() <= u64::from(max));
        }
    }
}
