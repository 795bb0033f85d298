//! Free-text scrubbing under arbitrary text: the first bytes pick the person's age rule and known
//! identifiers (split from the input), the rest is the note. Nothing may panic, whatever the script, and
//! every placeholder stands where text was.
#![no_main]

use deidentify::scrub::{AgeRule, KnownIdentifiers, PhiKind, ScrubCounts, scrub};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (head, note) = text.split_once('\n').unwrap_or(("", text));
    let mut known = KnownIdentifiers::default();
    known.ages = match data.first().map(|b| b % 3) {
        Some(0) => AgeRule::Exact,
        Some(1) => AgeRule::Coarse,
        _ => AgeRule::TopCoded,
    };
    for (i, term) in head.split('|').take(8).enumerate() {
        known.add(term, PhiKind::ALL[i % PhiKind::ALL.len()]);
    }
    known.seal();
    let mut counts = ScrubCounts::new();
    let out = scrub(note, &known, &mut counts);
    let placeholders: u64 = counts.values().sum();
    assert!(
        out.len() <= note.len() + 9 * placeholders as usize,
        "placeholders replace text"
    );
    if placeholders == 0 {
        assert_eq!(out, note);
    }
});
