//! Names in free text that the person's own record does not hold (relatives, clinicians named without a
//! title, signatures), found from public name lists and the context they stand in — no model download.
//!
//! The lists (`data/names/`, with their provenance) are the US Census Bureau's 1990 name frequency files
//! (public domain): 5,163 first names and the 20,000 most frequent surnames, and a list of first names
//! that are also words (`not-names.txt`: common English words and words of the clinical vocabulary of
//! the public samples), which never count as a name on their own. A capitalised word is part of a name
//! when:
//! - it is a listed first name followed by a capitalised listed first name or surname (`Maria Garcia`);
//! - it follows a word that introduces a person (`daughter`, `wife`, `signed by`, `seen by`, `Attending:`,
//!   …), up to three capitalised words (`her son Kenji Watanabe`);
//! - it precedes a credential (`Ann Lee, MD`, `J. Ortiz RN`);
//! - it is a listed first name that is not a word, alone (`called Linda`).
//!
//! Upper-case words (`NHS`, `MRN`) are never taken: names here are capitalised, not shouted.

use std::sync::LazyLock;

use ahash::AHashSet as HashSet;

use regex::Regex;
use regex_automata::meta::Regex as Automaton;

use crate::scrub::PhiKind;

fn list(text: &'static str) -> HashSet<&'static str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

static FIRST: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| list(include_str!("../data/names/first.txt")));
static LAST: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| list(include_str!("../data/names/last.txt")));
static NOT_NAMES: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| list(include_str!("../data/names/not-names.txt")));

/// Builds the name lists and compiles the patterns now (see [`crate::scrub::warm_up`]).
pub(crate) fn warm_up() {
    for set in [&FIRST, &LAST, &NOT_NAMES] {
        LazyLock::force(set);
    }
    LazyLock::force(&WORD);
    for re in [&INTRODUCER, &CREDENTIAL] {
        LazyLock::force(re);
    }
}

/// A capitalised word (with Synthea's numeric suffix, if any), or an initial (`J.`).
pub(crate) const WORD_SOURCE: &str = r"(?-u:\b)(?:[A-Z][A-Za-z'’-]*[a-z][A-Za-z'’-]*\d*|[A-Z]\.)";

/// [`WORD_SOURCE`], compiled.
static WORD: LazyLock<Automaton> = LazyLock::new(|| {
    // A constant of this file, exercised by the unit tests below.
    #[allow(clippy::expect_used)]
    Automaton::new(WORD_SOURCE).expect("word pattern")
});

/// [`WORD_SOURCE`], compiled (for searches with a cache of the caller's: see `scrub::Patterns`).
pub(crate) fn word_regex() -> &'static Automaton {
    &WORD
}

/// Words that introduce a person's name: the name follows them. The word boundary before each word is
/// spelt as the character before it (none, or one that is not a word character): the test a Unicode
/// `\b` makes there, which the fast engines cannot run on text outside ASCII (a slow one would take
/// over). Only whether it matches is asked, so what it consumes is moot.
static INTRODUCER: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(
        r"(?i)(?:(?:^|\W)(?:son|daughter|wife|husband|mother|father|brother|sister|partner|spouse|fianc[eé]e?|friend|neighbou?r|caregiver|carer|aunt|uncle|niece|nephew|cousin|grandson|granddaughter|grandmother|grandfather|guardian|stepson|stepdaughter|boyfriend|girlfriend|surgeon|assistant|physiotherapist|therapist|pharmacist|midwife|consultant|registrar|resident|interpreter)(?:'s)?(?:,|:|\s+named|\s+called)?|(?:^|\W)(?:signed|dictated|transcribed|reviewed|seen|examined|referred|discussed with|spoke with|spoke to|called|per)(?:\s+by)?\s*:?|(?:^|\W)(?:attending|provider|physician|nurse|clinician|author|cc|pcp|gp|patient|name)\s*:)\s*$",
    )
    .expect("introducer pattern")
});

/// The last word of every text [`INTRODUCER`] matches (lower case, without `'s`): a window whose last
/// word is not one of these cannot match, and is not searched.
const INTRODUCER_ENDS: &[&str] = &[
    "son",
    "daughter",
    "wife",
    "husband",
    "mother",
    "father",
    "brother",
    "sister",
    "partner",
    "spouse",
    "fiance",
    "fiancé",
    "fiancee",
    "fiancée",
    "friend",
    "neighbor",
    "neighbour",
    "caregiver",
    "carer",
    "aunt",
    "uncle",
    "niece",
    "nephew",
    "cousin",
    "grandson",
    "granddaughter",
    "grandmother",
    "grandfather",
    "guardian",
    "stepson",
    "stepdaughter",
    "boyfriend",
    "girlfriend",
    "surgeon",
    "assistant",
    "physiotherapist",
    "therapist",
    "pharmacist",
    "midwife",
    "consultant",
    "registrar",
    "resident",
    "interpreter",
    "named",
    "called",
    "signed",
    "dictated",
    "transcribed",
    "reviewed",
    "seen",
    "examined",
    "referred",
    "with",
    "to",
    "per",
    "by",
    "attending",
    "provider",
    "physician",
    "nurse",
    "clinician",
    "author",
    "cc",
    "pcp",
    "gp",
    "patient",
    "name",
];

/// True when `window` (the text before a word) ends with words that introduce a person.
fn introduces(window: &str) -> bool {
    let tail = window.trim_end();
    let tail = tail.strip_suffix([',', ':']).unwrap_or(tail).trim_end();
    let start = tail
        .char_indices()
        .rev()
        .take_while(|(_, c)| !c.is_whitespace() && !c.is_ascii_punctuation() || *c == '\'')
        .last()
        .map_or(tail.len(), |(i, _)| i);
    let last = &tail[start..];
    // An apostrophe (`son's`, or a word boundary before `'son`) or a letter outside ASCII (which
    // case-insensitive matching may fold into one: `ſ` is an `s`) goes to the pattern itself.
    if !last.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return INTRODUCER.is_match(window);
    }
    // Letters and digits only: a listed word, or (with a digit in it) nothing the pattern ends on.
    INTRODUCER_ENDS.iter().any(|w| last.eq_ignore_ascii_case(w)) && INTRODUCER.is_match(window)
}

/// A credential after a name (one ending in a full stop needs nothing after it; the others end where a
/// word does, tested as for `INTRODUCER`).
static CREDENTIAL: LazyLock<Regex> = LazyLock::new(|| {
    #[allow(clippy::expect_used)]
    Regex::new(r"^(?:M\.D\.|D\.O\.|(?:MD|DO|RN|NP|PA-C|PA|PhD|PharmD|MBBS|MBChB|FRCP|FRCS|CNM|LPN|DDS|OT|PT|SLP)(?:$|\W))")
        .expect("credential pattern")
});

/// True when `rest` (the text after a name) starts with a credential, after a comma and spaces.
fn credential_follows(rest: &str) -> bool {
    let rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    // Every credential starts with one of these letters.
    if !rest.starts_with(['M', 'D', 'R', 'N', 'P', 'F', 'C', 'L', 'O', 'S']) {
        return false;
    }
    // The longest credential and the character after it (for the word boundary) fit in 16 bytes: the
    // search never reads on through the rest of the text.
    let mut end = rest.len().min(16);
    while !rest.is_char_boundary(end) {
        end += 1;
    }
    CREDENTIAL.is_match(&rest[..end])
}

/// The word without its numeric suffix or full stop, in lower case, looked up in `set` (no allocation
/// for the words of ordinary length).
fn bare_in(word: &str, set: &dyn Fn(&str) -> bool) -> bool {
    let word = word.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    let mut buf = [0u8; 32];
    match buf.get_mut(..word.len()) {
        Some(lower) => {
            lower.copy_from_slice(word.as_bytes());
            lower.make_ascii_lowercase();
            // Lower-casing ASCII letters keeps UTF-8 valid.
            std::str::from_utf8(lower).is_ok_and(set)
        }
        None => set(&word.to_ascii_lowercase()),
    }
}

fn is_first(w: &str) -> bool {
    bare_in(w, &|b| FIRST.contains(b))
}

fn is_last(w: &str) -> bool {
    bare_in(w, &|b| LAST.contains(b))
}

fn is_word(w: &str) -> bool {
    bare_in(w, &|b| NOT_NAMES.contains(b))
}

/// Titles: a name follows them (the title patterns of `scrub` take it), they are not one.
fn is_title(w: &str) -> bool {
    bare_in(w, &|b| {
        matches!(
            b,
            "dr" | "mr" | "mrs" | "ms" | "miss" | "mx" | "prof" | "sr" | "sra" | "st"
        )
    })
}

/// Adds a span per name found in `text`.
pub(crate) fn find(text: &str, spans: &mut Vec<(usize, usize, PhiKind)>) {
    let words: Vec<(usize, usize)> = WORD.find_iter(text).map(|m| (m.start(), m.end())).collect();
    find_in(text, &words, spans);
}

/// [`find`], given the matches of [`WORD_SOURCE`] in `text` (in order, as its `find_iter` gives them).
pub(crate) fn find_in(
    text: &str,
    words: &[(usize, usize)],
    spans: &mut Vec<(usize, usize, PhiKind)>,
) {
    // Word i and i + 1 are one name's parts when only a space (or a hyphen-free line break) is between.
    let joined = |i: usize| {
        words.get(i + 1).is_some_and(|&(s, _)| {
            let gap = &text[words[i].1..s];
            !gap.is_empty() && gap.len() <= 2 && gap.chars().all(|c| c == ' ')
        })
    };
    let word = |i: usize| &text[words[i].0..words[i].1];
    let mut i = 0;
    while i < words.len() {
        if is_title(word(i)) {
            i += 1;
            continue;
        }
        let (start, _) = words[i];
        // How many capitalised words from i on form one run (at most three).
        let mut run = 1;
        while run < 3 && joined(i + run - 1) {
            run += 1;
        }
        let mut from = start.saturating_sub(40);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let introduced = introduces(&text[from..start]);
        let credentialed = (1..=run)
            .rev()
            .find(|&n| credential_follows(&text[words[i + n - 1].1..]));
        let taken = if introduced || credentialed.is_some() {
            // Every capitalised word of the run, or up to the credential.
            credentialed.unwrap_or(run)
        } else if run >= 2
            && is_first(word(i))
            && (is_last(word(i + 1)) || is_first(word(i + 1)))
            && !(is_word(word(i)) && is_word(word(i + 1)))
        {
            let third = run >= 3 && is_last(word(i + 2)) && !is_word(word(i + 2));
            2 + usize::from(third)
        } else if is_first(word(i))
            && !is_word(word(i))
            && word(i).len() >= 3
            && !word(i).ends_with('.')
        {
            1
        } else {
            0
        };
        if taken > 0 {
            spans.push((start, words[i + taken - 1].1, PhiKind::Name));
            i += taken;
        } else {
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> Vec<&str> {
        let mut spans = Vec::new();
        find(text, &mut spans);
        spans.iter().map(|(s, e, _)| &text[*s..*e]).collect()
    }

    #[test]
    fn names_outside_the_record_are_found_by_list_and_context() {
        assert_eq!(
            names("Seen with her daughter Anna Kowalczyk today."),
            ["Anna Kowalczyk"]
        );
        assert_eq!(
            names("Maria Garcia called about the results."),
            ["Maria Garcia"]
        );
        assert_eq!(names("Discussed with son, Tomasz."), ["Tomasz"]);
        assert_eq!(
            names("Electronically signed by Priya Raman, MD"),
            ["Priya Raman"]
        );
        assert_eq!(names("Plan reviewed with J. Ortiz RN."), ["J. Ortiz"]);
        assert_eq!(names("Left a message for Linda."), ["Linda"]);
        assert_eq!(names("Attending: Okonkwo"), ["Okonkwo"]);
        assert_eq!(names("Reviewed, Zyx Qwerty, M.D. today"), ["Zyx Qwerty"]);
        assert_eq!(names("Seen with her \u{17f}on Zyx today."), ["Zyx"]);
    }

    #[test]
    fn text_in_any_script_around_a_name_is_safe() {
        assert_eq!(names("Discharge — 息子 signed by — Anna Lee"), ["Anna Lee"]);
        assert_eq!(names("——————————————————————— Linda"), ["Linda"]);
        assert_eq!(names("é".repeat(50).as_str()), Vec::<&str>::new());
    }

    #[test]
    fn words_that_are_also_names_and_clinical_terms_stay() {
        for text in [
            "May return in June if the rash persists.",
            "Will follow up. Grace period for the bill.",
            "Patient identifies as heterosexual. History of Present Illness.",
            "NHS number and MRN are on file.",
            "Chief Complaint: Cough. Medications: camila 0.35 mg oral tablet.",
            "Brown discharge, no fever.",
        ] {
            assert!(names(text).is_empty(), "{text}: {:?}", names(text));
        }
    }

    #[test]
    fn the_introducer_prefilter_never_turns_away_a_match() {
        let corpus = include_str!("../../tests/data/scrub-corpus/notes.txt");
        let phrases = "Seen with her son Ken. His daughter's: Ann. Wife, Lee. Husband named Bo. FIANCÉE Jo. \
            Fiancee called Al. neighbour: Sam. Signed by: Ray. Dictated by Tom. Discussed with Eve. Spoke to \
            Max. Per Liz. Attending : Ng. PCP: Ito. cc: Orr. Name: Ada. Patient: Oz. Carer Pat. \
            Grandmother's Meg. The interpreter, Ali. Reviewed  Bob. seen by : Guy. the 'son Ike. w/ \
            pt'son Ona. from 'friend, Uma. o'per Ivy. ſon Eli. daughter'ſ Ada. \u{212A}en per: Zed. \
            2son Kai. son ,Lu. son,:Mo.";
        let mut checked = 0;
        for text in [corpus, phrases] {
            for (start, _) in text.char_indices() {
                let mut from = start.saturating_sub(40);
                while !text.is_char_boundary(from) {
                    from -= 1;
                }
                let window = &text[from..start];
                assert_eq!(
                    introduces(window),
                    INTRODUCER.is_match(window),
                    "{window:?}"
                );
                checked += usize::from(INTRODUCER.is_match(window));
            }
        }
        assert!(checked > 40, "the windows include matches: {checked}");
    }
}
