//! Free-text scrubbing: the person's own known identifiers plus pattern-found PHI become typed placeholders.
//!
//! Two sources of spans are merged: (1) every identifier the structured record holds for the note's
//! patient (names with and without Synthea's numeric suffixes, MRN, national and licence numbers, phone in
//! its usual spellings, e-mail, address, city, ZIP, birth and death dates in several formats), matched
//! case-insensitively on word boundaries; (2) patterns for dates, phones, e-mails, URLs, IP addresses,
//! ID-shaped numbers, postal codes, facility names, names after titles and ages over 89. Overlapping spans
//! merge; each merged span becomes `[KIND]`, and replacements are counted per kind.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use chrono::NaiveDate;
use regex_automata::hybrid::dfa::{Cache as StartsCache, DFA};
use regex_automata::meta::{Cache, Regex};
use regex_automata::nfa::thompson;
use regex_automata::util::captures::Captures;
use regex_automata::{Anchored, Input, MatchError, MatchKind};

/// The kind of PHI a placeholder stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PhiKind {
    /// Person names.
    Name,
    /// Dates.
    Date,
    /// Telephone and fax numbers.
    Phone,
    /// E-mail addresses.
    Email,
    /// Record, national, licence, insurance and account numbers.
    Id,
    /// Street addresses and cities.
    Address,
    /// Postal codes.
    Zip,
    /// Web addresses.
    Url,
    /// IP addresses.
    Ip,
    /// Hospital and clinic names.
    Facility,
    /// Ages that would narrow a released birth year (every age when it is coarsened).
    Age,
    /// Ages over 89, aggregated into one category (HIPAA Safe Harbor).
    AgeOver89,
}

impl PhiKind {
    /// Every kind, in declaration order.
    pub const ALL: [PhiKind; 12] = [
        PhiKind::Name,
        PhiKind::Date,
        PhiKind::Phone,
        PhiKind::Email,
        PhiKind::Id,
        PhiKind::Address,
        PhiKind::Zip,
        PhiKind::Url,
        PhiKind::Ip,
        PhiKind::Facility,
        PhiKind::Age,
        PhiKind::AgeOver89,
    ];

    /// A one-byte code (its position in [`PhiKind::ALL`]).
    pub fn code(self) -> u8 {
        PhiKind::ALL.iter().position(|k| *k == self).unwrap_or(0) as u8
    }

    /// The kind of a [`PhiKind::code`].
    pub fn from_code(code: u8) -> Option<PhiKind> {
        PhiKind::ALL.get(usize::from(code)).copied()
    }

    /// The placeholder's label (`NAME`, `DATE`, …).
    pub fn label(self) -> &'static str {
        match self {
            PhiKind::Name => "NAME",
            PhiKind::Date => "DATE",
            PhiKind::Phone => "PHONE",
            PhiKind::Email => "EMAIL",
            PhiKind::Id => "ID",
            PhiKind::Address => "ADDRESS",
            PhiKind::Zip => "ZIP",
            PhiKind::Url => "URL",
            PhiKind::Ip => "IP",
            PhiKind::Facility => "FACILITY",
            PhiKind::Age => "AGE",
            PhiKind::AgeOver89 => "AGE 90+",
        }
    }
}

/// What a person's released birth value lets an age in their text say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AgeRule {
    /// The birth year is released as it is: ages up to 89 add nothing and stay; an age over 89 cannot
    /// be true of such a person and is withheld (`[AGE]`).
    #[default]
    Exact,
    /// The birth year is released in a band or withheld: any age (with the note's date) would narrow
    /// it, so every age is withheld (`[AGE]`).
    Coarse,
    /// The birth year is top-coded (90 or older): ages over 89 become `[AGE 90+]`, others `[AGE]` (an
    /// age and the note's year would give the birth year the top code hides).
    TopCoded,
}

/// The identifiers one person's structured record holds, ready for matching in their notes.
#[derive(Default)]
pub struct KnownIdentifiers {
    /// What ages in the person's text may say.
    pub ages: AgeRule,
    /// ASCII-lowercased terms (matched against an ASCII-lowercased copy of the text: same byte offsets).
    terms: Vec<(String, PhiKind)>,
    /// One prepared substring searcher per term, built by `seal` (a person's notes reuse them).
    finders: Vec<(memchr::memmem::Finder<'static>, PhiKind)>,
}

impl KnownIdentifiers {
    /// Adds one identifier value (ignored when too short to match safely).
    pub fn add(&mut self, value: &str, kind: PhiKind) {
        let v = value.trim();
        if v.chars().count() < 2 || (kind == PhiKind::Name && v.chars().count() < 3) {
            return;
        }
        self.terms.push((v.to_owned(), kind));
        if kind == PhiKind::Name {
            // Synthea appends digits to names ("Sumiko254"); notes may carry either spelling.
            let alpha = v.trim_end_matches(|c: char| c.is_ascii_digit());
            if alpha.len() != v.len() && alpha.chars().count() >= 3 {
                self.terms.push((alpha.to_owned(), kind));
            }
        }
        if kind == PhiKind::Phone || kind == PhiKind::Id {
            let digits: String = v.chars().filter(char::is_ascii_digit).collect();
            if digits.len() >= 7 && digits != v {
                self.terms.push((digits.clone(), kind));
            }
            if kind == PhiKind::Phone && digits.len() == 10 {
                let (a, b, c) = (&digits[..3], &digits[3..6], &digits[6..]);
                for f in [
                    format!("{a}-{b}-{c}"),
                    format!("({a}) {b}-{c}"),
                    format!("{a}.{b}.{c}"),
                    format!("{a} {b} {c}"),
                ] {
                    self.terms.push((f, kind));
                }
            }
            if kind == PhiKind::Id && digits.len() == 10 {
                self.terms.push((
                    format!("{} {} {}", &digits[..3], &digits[3..6], &digits[6..]),
                    kind,
                ));
            }
        }
    }

    /// Adds a date in the spellings notes use (ISO, US and day-first numeric, month names).
    pub fn add_date(&mut self, d: NaiveDate) {
        for f in [
            "%Y-%m-%d",
            "%m/%d/%Y",
            "%-m/%-d/%Y",
            "%d/%m/%Y",
            "%B %-d, %Y",
            "%b %-d, %Y",
            "%-d %B %Y",
            "%Y年%-m月%-d日",
        ] {
            self.terms.push((d.format(f).to_string(), PhiKind::Date));
        }
    }

    /// Prepares the terms for matching; call after the last `add`.
    pub fn seal(&mut self) {
        for (t, _) in &mut self.terms {
            t.make_ascii_lowercase();
        }
        self.terms.sort();
        self.terms.dedup();
        self.finders = self
            .terms
            .iter()
            .map(|(t, k)| (memchr::memmem::Finder::new(t.as_bytes()).into_owned(), *k))
            .collect();
    }
}

struct Pattern {
    /// The regular expression, as compiled (ASCII word boundaries).
    src: String,
    re: Regex,
    kind: PhiKind,
    /// Capture group holding the PHI (0: the whole match).
    group: usize,
    /// A check of the found span in its text (context the regex cannot express).
    check: Option<fn(&str, usize, usize) -> bool>,
    /// Where the capture group starts in a match (start, end) of the pattern, when that follows from
    /// the match's text alone (the group ends where the match does): no capturing search is needed.
    group_start: Option<fn(&str, usize, usize) -> usize>,
}

/// A title-name match (`Dr. Ann Lee`): the name starts after the whitespace that follows the title
/// (titles and their full stop hold none; the name starts with a capital).
fn after_title(text: &str, start: usize, end: usize) -> usize {
    let m = &text[start..end];
    let gap = m.find(char::is_whitespace).unwrap_or(m.len());
    let name = m[gap..]
        .find(|c: char| !c.is_whitespace())
        .map_or(m.len(), |i| gap + i);
    start + name
}

/// A labelled or placed ZIP match (`MA 02118-1234`, `zip code: 02139`): the code is the match's
/// trailing run of digits (in any script, as `\d` takes them) and hyphens; what comes before it ends in
/// whitespace, `:`, `#` or a letter, none of which a digit is.
fn trailing_code(text: &str, start: usize, end: usize) -> usize {
    let m = &text[start..end];
    let prefix = m.trim_end_matches(|c: char| {
        c == '-' || !(c.is_whitespace() || c.is_alphabetic() || c == ':' || c == '#')
    });
    start + prefix.len()
}

/// A labelled ID's value holds a digit (the match runs from the label; the value is its last word).
fn labelled_value(text: &str, start: usize, end: usize) -> bool {
    text[start..end]
        .rsplit([' ', ':', '#', '.'])
        .next()
        .is_some_and(|v| v.bytes().any(|b| b.is_ascii_digit()))
}

/// A numeric date `d/m/y` or `m/d/y` (one separator throughout) whose parts can be a day and a month,
/// and that is not part of a longer number or ratio ("0.12/0.015 mg", "v1.2.3").
fn numeric_date(text: &str, start: usize, end: usize) -> bool {
    let bytes = text.as_bytes();
    let before = start.checked_sub(1).map(|i| bytes[i]);
    let after = bytes.get(end).copied();
    let after2 = bytes.get(end + 1).copied();
    if before.is_some_and(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
        || after == Some(b'/')
        || (after == Some(b'.') && after2.is_some_and(|b| b.is_ascii_digit()))
    {
        return false;
    }
    let parts: Vec<u32> = text[start..end]
        .split(['/', '.'])
        .filter_map(|p| p.parse().ok())
        .collect();
    match parts[..] {
        [a, b, _] => (1..=31).contains(&a) && (1..=31).contains(&b) && (a <= 12 || b <= 12),
        _ => false,
    }
}

/// Compiles the scrub patterns and builds the name lists now, rather than at the first text: a run calls
/// it on a thread of its own while it reads patients, when the second core has little else to do.
pub fn warm_up() {
    LazyLock::force(&STARTS);
    crate::names::warm_up();
}

/// Index of the names' capitalised-word pattern in [`STARTS`] (after every one of [`PATTERNS`]).
fn word_id() -> usize {
    PATTERNS.len()
}

/// Every one of [`PATTERNS`] and the names' capitalised-word pattern as one reverse lazy DFA that reports
/// each position where a match of each pattern starts (all of them, overlapping): one backward pass over
/// a text says which patterns occur and where each can start. Its states are built as texts need them,
/// in a cache of each thread's own.
static STARTS: LazyLock<DFA> = LazyLock::new(|| {
    let mut sources: Vec<&str> = PATTERNS.iter().map(|p| p.src.as_str()).collect();
    sources.push(crate::names::WORD_SOURCE);
    // Built from the constants of this file and `names`, which the unit tests compile and exercise.
    #[allow(clippy::expect_used)]
    DFA::builder()
        .configure(
            DFA::config()
                .match_kind(MatchKind::All)
                .cache_capacity(STARTS_CACHE),
        )
        .thompson(thompson::Config::new().reverse(true))
        .build_many(&sources)
        .expect("scrub patterns compile into one reverse DFA")
});

/// Bytes of each thread's [`STARTS`] cache: room for the states notes need, so that it is rarely
/// cleared (a cleared cache only costs time).
const STARTS_CACHE: usize = 8 << 20;

static PATTERNS: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    const STATES: &str = "Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware|Florida|Georgia|Hawaii|Idaho|Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland|Massachusetts|Michigan|Minnesota|Mississippi|Missouri|Montana|Nebraska|Nevada|New Hampshire|New Jersey|New Mexico|New York|North Carolina|North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania|Rhode Island|South Carolina|South Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington|West Virginia|Wisconsin|Wyoming";
    const MONTH: &str = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)";
    let specs: Vec<(String, PhiKind, usize)> = vec![
        (r"\b(?:https?://|www\.)[^\s<>()]+".into(), PhiKind::Url, 0),
        (r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b".into(), PhiKind::Email, 0),
        (r"\b(?:\d{1,3}\.){3}\d{1,3}\b".into(), PhiKind::Ip, 0),
        (
            // The label (any case) stays; the value after it must hold a digit (checked below): "Patient
            // identifies as" and "NHS number" alone are words, not labelled values.
            r"(?i:\b(?:MRN|medical record(?: number| no\.?)?|patient id|hospital number|NHS(?: number| no\.?)?|SSN|social security(?: number)?|insurance(?: id| number| no\.?)?|member id|policy(?: number| no\.?)|account(?: number| no\.?)?|acct|licen[cs]e(?: number| no\.?)?|passport(?: number| no\.?)?|serial(?: number| no\.?)?|VIN))\.?\s*(?:(?i:is)\s+|[:#]\s*|(?i:no)\.?\s*)?(\d{3}[ -]\d{3}[ -]\d{4}\b|(?i:[A-Z0-9][A-Z0-9-]{3,}))".into(),
            PhiKind::Id,
            1,
        ),
        (r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?".into(), PhiKind::Date, 0),
        (r"\b\d{1,2}/\d{1,2}/(?:\d{4}|\d{2})\b".into(), PhiKind::Date, 0),
        (r"\b\d{1,2}\.\d{1,2}\.(?:\d{4}|\d{2})\b".into(), PhiKind::Date, 0),
        (format!(r"\b{MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b"), PhiKind::Date, 0),
        (format!(r"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{MONTH}\.?,?\s+\d{{4}}\b"), PhiKind::Date, 0),
        (format!(r"\b{MONTH}\s+\d{{4}}\b"), PhiKind::Date, 0),
        (r"\d{4}年\d{1,2}月(?:\d{1,2}日)?".into(), PhiKind::Date, 0),
        (r"\b\d{3}-\d{2}-\d{4}\b".into(), PhiKind::Id, 0),
        (r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)\s?|\b\d{2,4}[\s.-])\d{3,4}[\s.-]\d{4}\b".into(), PhiKind::Phone, 0),
        (r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b".into(), PhiKind::Id, 0),
        (r"\b[A-Z]{1,3}\d{6,}[A-Z]?\b".into(), PhiKind::Id, 0),
        (r"\b\d{7,}\b".into(), PhiKind::Id, 0),
        (r"〒?\b\d{3}-\d{4}\b".into(), PhiKind::Zip, 0),
        // A street address: a house number, one to three capitalised words and a street type.
        (
            r"\b\d{1,5}[A-Za-z]?\s+(?:[A-Z][A-Za-z'-]+\s+){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Boulevard|Blvd|Court|Ct|Way|Place|Pl|Terrace|Close|Crescent|Square|Sq|Parkway|Pkwy|Highway|Hwy)\b\.?".into(),
            PhiKind::Address,
            0,
        ),
        // A five-digit ZIP after a state abbreviation or a label (a bare five-digit number is a count or a
        // dose far more often).
        (
            format!(r"(?:\b[A-Z]{{2}},?\s+|\b(?:{STATES}),?\s+|(?i:\bzip(?: code)?|\bpostal code|\bpostcode)\s*[:#]?\s*)(\d{{5}}(?:-\d{{4}})?)\b"),
            PhiKind::Zip,
            1,
        ),
        (r"\b\d{5}-\d{4}\b".into(), PhiKind::Zip, 0),
        (
            r"\b(?:(?:[A-Z](?:[a-z]|'[A-Z])[A-Za-z.'&-]*|[A-Z]{2,5})\s+){1,5}(?:Hospital|Medical Center|Medical Centre|Clinic|Health Center|Health Centre|Infirmary|Health System|Medical Group)\b".into(),
            PhiKind::Facility,
            0,
        ),
        (
            r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sr|Sra)\.?\s+((?:[A-Z][A-Za-z'-]*\d*)(?:\s+[A-Z][A-Za-z'-]*\d*){0,2})".into(),
            PhiKind::Name,
            1,
        ),
        (r"[一-龥ぁ-んァ-ヶ]{1,6}(?:様|さん|氏)".into(), PhiKind::Name, 0),
        (
            r"(?i)\b\d{1,3}(?:\s*-?\s*(?:years?|yrs?)[\s-]*old\b|\s*y/?o\b|\s*-?\s*(?:years?|yrs?)\s+of\s+age\b|\s*歳)".into(),
            PhiKind::Age,
            0,
        ),
        (r"(?i)\baged?\s+(?:of\s+)?\d{1,3}\b".into(), PhiKind::Age, 0),
    ];
    specs
        .into_iter()
        .map(|(src, kind, group)| {
            // ASCII word boundaries keep the fast DFA engines usable on text with non-ASCII characters
            // (Unicode `\b` makes them give up on the first such byte).
            let compiled = src.replace(r"\b", r"(?-u:\b)");
            Pattern {
                check: if kind == PhiKind::Date
                    && (src.starts_with(r"\b\d{1,2}/") || src.starts_with(r"\b\d{1,2}\."))
                {
                    Some(numeric_date as fn(&str, usize, usize) -> bool)
                } else if kind == PhiKind::Id && group == 1 {
                    Some(labelled_value as fn(&str, usize, usize) -> bool)
                } else {
                    None
                },
                group_start: match (kind, group) {
                    (PhiKind::Name, 1) => Some(after_title as fn(&str, usize, usize) -> usize),
                    (PhiKind::Zip, 1) => Some(trailing_code as fn(&str, usize, usize) -> usize),
                    _ => None,
                },
                // The patterns are constants of this file, checked by the unit tests below.
                #[allow(clippy::expect_used)]
                re: Regex::new(&compiled).expect("scrub pattern compiles"),
                src: compiled,
                kind,
                group,
            }
        })
        .collect()
});

/// A span of text (byte offsets) and what it is.
pub type Span = (usize, usize, PhiKind);

/// Replacement counts per kind.
pub type ScrubCounts = BTreeMap<PhiKind, u64>;

/// Scrubs one text. `known` may be empty (no structured record for the person).
pub fn scrub(text: &str, known: &KnownIdentifiers, counts: &mut ScrubCounts) -> String {
    render(text, &phi_spans(text, known), counts)
}

/// `text` with each of `spans` (from [`phi_spans`]) replaced by its placeholder, counted.
pub fn render(text: &str, spans: &[(usize, usize, PhiKind)], counts: &mut ScrubCounts) -> String {
    if spans.is_empty() {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    for &(s, e, k) in spans {
        emit(text, &mut out, &mut pos, s, e, k, counts);
    }
    out.push_str(&text[pos..]);
    out
}

/// The spans [`scrub`] replaces, merged where they overlap (each with the kind of its earliest, longest
/// part), in text order.
pub fn phi_spans(text: &str, known: &KnownIdentifiers) -> Vec<(usize, usize, PhiKind)> {
    with_patterns(text, known, &pattern_spans(text))
}

/// A text's spans from its pattern spans (from [`pattern_spans`], found beforehand: on the reading
/// thread, or in a [`PatternCache`]) and the person's own identifiers and age rule.
pub fn with_patterns(
    text: &str,
    known: &KnownIdentifiers,
    patterns: &[(usize, usize, PhiKind)],
) -> Vec<(usize, usize, PhiKind)> {
    let mut spans = known_spans(text, known);
    spans.extend(patterns.iter().filter_map(|&(s, e, kind)| {
        if kind == PhiKind::Age {
            age_span(text, s, e, known.ages).map(|k| (s, e, k))
        } else {
            Some((s, e, kind))
        }
    }));
    merge(spans)
}

/// The spans of the person's own identifiers in `text`.
fn known_spans(text: &str, known: &KnownIdentifiers) -> Vec<(usize, usize, PhiKind)> {
    let mut spans: Vec<(usize, usize, PhiKind)> = Vec::new();
    if !known.finders.is_empty() {
        // A person has a few dozen known strings and a few short notes: SIMD substring search over a
        // lowercased copy beats building any automaton per person. Every occurrence is kept; overlaps
        // merge below.
        let lower = text.to_ascii_lowercase();
        let bytes = lower.as_bytes();
        for (finder, kind) in &known.finders {
            for s in finder.find_iter(bytes) {
                let e = s + finder.needle().len();
                let before_ok = s == 0 || !is_word_byte(bytes[s - 1]);
                let after_ok = e == bytes.len() || !is_word_byte(bytes[e]);
                if before_ok && after_ok {
                    spans.push((s, e, *kind));
                }
            }
        }
    }
    spans
}

/// The spans the patterns and name lists find in `text`, the same for every person (ages as `Age`
/// whatever they say: [`with_patterns`] applies the person's age rule), in no particular order.
pub fn pattern_spans(text: &str) -> Vec<(usize, usize, PhiKind)> {
    thread_local! {
        static MINE: std::cell::RefCell<Patterns> = std::cell::RefCell::new(Patterns::default());
    }
    MINE.with_borrow_mut(|p| p.spans(text))
}

/// One thread's search state for the patterns: caches of its own (threads sharing one take turns at
/// it, which costs more than the search on short texts) and reused buffers.
pub(crate) struct Patterns {
    starts: StartsCache,
    /// Per pattern (and the word pattern last), its cache for anchored searches.
    each: Vec<Cache>,
    /// Per pattern whose group takes a capturing search to find, room for its groups.
    captures: Vec<Option<Captures>>,
    /// (pattern, start) of every match start the reverse pass found.
    found: Vec<(usize, usize)>,
    /// The capitalised words of the text, in order.
    words: Vec<(usize, usize)>,
}

impl Default for Patterns {
    fn default() -> Patterns {
        let word = crate::names::word_regex();
        Patterns {
            starts: StartsCache::new(&STARTS),
            each: PATTERNS
                .iter()
                .map(|p| p.re.create_cache())
                .chain([word.create_cache()])
                .collect(),
            captures: PATTERNS
                .iter()
                .map(|p| (p.group > 0 && p.group_start.is_none()).then(|| p.re.create_captures()))
                .collect(),
            found: Vec::new(),
            words: Vec::new(),
        }
    }
}

impl Patterns {
    /// [`pattern_spans`] with this thread's state.
    pub(crate) fn spans(&mut self, text: &str) -> Vec<(usize, usize, PhiKind)> {
        let mut spans = Vec::new();
        if self.search(text, &mut spans).is_err() {
            // Not expected (with its default configuration the lazy DFA neither quits nor gives up, and
            // unanchored it never dies); the slower way still finds every span.
            spans.clear();
            each_pattern(text, &mut spans);
        }
        spans
    }

    /// Fills `found` with every (pattern, position) where a match of the pattern starts in `text`,
    /// from one backward pass of [`STARTS`]. The pass is driven here, state by state, because a state
    /// can say that several patterns start at one position, and each of them is wanted at that position
    /// (the library's overlapping reverse search reports the second and later of them one byte early).
    fn starts_of_matches(&mut self, text: &str) -> Result<(), MatchError> {
        let dfa = &*STARTS;
        let cache = &mut self.starts;
        self.found.clear();
        let bytes = text.as_bytes();
        let mut sid = dfa.start_state_reverse(cache, &Input::new(text))?;
        // Matches are reported one byte late: in a match state after reading the byte at `at`, the
        // patterns it names start at `at + 1`; after the end-of-input transition, at 0.
        for at in (0..bytes.len()).rev() {
            sid = dfa
                .next_state(cache, sid, bytes[at])
                .map_err(|_| MatchError::gave_up(at))?;
            if sid.is_match() {
                for i in 0..dfa.match_len(cache, sid) {
                    let pattern = dfa.match_pattern(cache, sid, i).as_usize();
                    self.found.push((pattern, at + 1));
                }
            } else if sid.is_dead() || sid.is_quit() {
                // Neither can happen unanchored with this configuration; stop rather than guess.
                return Err(MatchError::quit(bytes[at], at));
            }
        }
        sid = dfa
            .next_eoi_state(cache, sid)
            .map_err(|_| MatchError::gave_up(0))?;
        if sid.is_match() {
            for i in 0..dfa.match_len(cache, sid) {
                self.found
                    .push((dfa.match_pattern(cache, sid, i).as_usize(), 0));
            }
        }
        Ok(())
    }

    /// The spans of `text`: where each pattern's matches start comes from one reverse pass over all
    /// patterns; each match is then taken by an anchored search at its start. That yields exactly the
    /// matches a leftmost-first search of each pattern alone yields (the next match after one ending
    /// at `e` is the one starting at the first start at or after `e`: true because no pattern matches
    /// the empty string, which a unit test checks), while each pattern reads only its own matches
    /// rather than the whole text.
    fn search(&mut self, text: &str, spans: &mut Vec<Span>) -> Result<(), MatchError> {
        self.starts_of_matches(text)?;
        self.found.sort_unstable();
        self.found.dedup();
        self.words.clear();
        let word = word_id();
        let mut next = 0;
        while let Some(&(id, _)) = self.found.get(next) {
            let group_end = next + self.found[next..].partition_point(|f| f.0 == id);
            let mut pos = 0;
            for k in next..group_end {
                let start = self.found[k].1;
                if start < pos {
                    continue;
                }
                let at = Input::new(text).range(start..).anchored(Anchored::Yes);
                if id == word {
                    if let Some(m) = crate::names::word_regex().search_with(&mut self.each[id], &at)
                    {
                        self.words.push((m.start(), m.end()));
                        pos = m.end();
                    }
                    continue;
                }
                let p = &PATTERNS[id];
                let found = match self.captures[id].as_mut() {
                    None => p.re.search_with(&mut self.each[id], &at).map(|m| {
                        let phi = match p.group_start {
                            Some(group_start) => regex_automata::Span::from(
                                group_start(text, m.start(), m.end())..m.end(),
                            ),
                            None => m.span(),
                        };
                        (m.span(), Some(phi))
                    }),
                    Some(caps) => {
                        p.re.search_captures_with(&mut self.each[id], &at, caps);
                        caps.get_match()
                            .map(|m| (m.span(), caps.get_group(p.group)))
                    }
                };
                let Some((m, phi)) = found else { continue };
                // The next match starts after this one, whether or not it is taken.
                pos = m.end;
                let Some(phi) = phi else { continue };
                if p.check.is_none_or(|check| check(text, m.start, m.end)) {
                    spans.push((phi.start, phi.end, p.kind));
                }
            }
            next = group_end;
        }
        crate::names::find_in(text, &self.words, spans);
        Ok(())
    }
}

/// The pattern spans of `text` found by a leftmost-first search of each pattern in turn over the whole
/// text: the definition [`Patterns::search`] meets, and its fallback.
fn each_pattern(text: &str, spans: &mut Vec<Span>) {
    for p in PATTERNS.iter() {
        for caps in p.re.captures_iter(text) {
            let (Some(m), Some(phi)) = (caps.get_match(), caps.get_group(p.group)) else {
                continue;
            };
            if p.check.is_none_or(|check| check(text, m.start(), m.end())) {
                spans.push((phi.start, phi.end, p.kind));
            }
        }
    }
    crate::names::find(text, spans);
}

/// Earliest start first; at equal starts, the longest span (and the known-identifier kind) wins; overlaps
/// merge into one span.
fn merge(mut spans: Vec<(usize, usize, PhiKind)>) -> Vec<(usize, usize, PhiKind)> {
    spans.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut merged: Vec<(usize, usize, PhiKind)> = Vec::with_capacity(spans.len());
    for (s, e, k) in spans {
        match merged.last_mut() {
            Some(c) if s < c.1 => c.1 = c.1.max(e),
            _ => merged.push((s, e, k)),
        }
    }
    merged
}

/// Short texts recur (coded answers, descriptions, templated sentences): their pattern spans are kept,
/// so the regular expressions run once per distinct text rather than once per row. Bounded: texts longer
/// than [`PatternCache::MAX_TEXT`] are not kept, and the cache starts afresh when it holds
/// [`PatternCache::MAX_ENTRIES`]. It lives in memory only, beside the rows being scrubbed.
#[derive(Default)]
pub struct PatternCache {
    spans: ahash::AHashMap<Box<str>, Box<[Span]>>,
    patterns: Patterns,
}

impl PatternCache {
    /// Longest text kept, in bytes.
    pub const MAX_TEXT: usize = 160;
    /// Texts kept at most.
    pub const MAX_ENTRIES: usize = 32 * 1024;

    /// [`pattern_spans`], from the cache when the text was seen before.
    pub fn pattern_spans(&mut self, text: &str) -> Box<[Span]> {
        if text.len() > Self::MAX_TEXT {
            return self.patterns.spans(text).into_boxed_slice();
        }
        if let Some(found) = self.spans.get(text) {
            return found.clone();
        }
        let found = self.patterns.spans(text).into_boxed_slice();
        if self.spans.len() >= Self::MAX_ENTRIES {
            self.spans.clear();
        }
        self.spans.insert(Box::from(text), found.clone());
        found
    }

    /// What [`phi_spans`] gives, with the pattern part from the cache.
    pub fn phi_spans(
        &mut self,
        text: &str,
        known: &KnownIdentifiers,
    ) -> Vec<(usize, usize, PhiKind)> {
        with_patterns(text, known, &self.pattern_spans(text))
    }
}

fn emit(
    text: &str,
    out: &mut String,
    pos: &mut usize,
    s: usize,
    e: usize,
    k: PhiKind,
    counts: &mut ScrubCounts,
) {
    out.push_str(&text[*pos..s]);
    out.push('[');
    out.push_str(k.label());
    out.push(']');
    *pos = e;
    *counts.entry(k).or_default() += 1;
}

/// The placeholder an age mention gets under the person's rule, or `None` when it stays.
fn age_span(text: &str, start: usize, end: usize, rule: AgeRule) -> Option<PhiKind> {
    let years: u32 = text[start..end]
        .split(|c: char| !c.is_ascii_digit())
        .find(|p| !p.is_empty())?
        .parse()
        .ok()?;
    match (rule, years > 89) {
        (AgeRule::TopCoded, true) => Some(PhiKind::AgeOver89),
        (AgeRule::Exact, false) => None,
        _ => Some(PhiKind::Age),
    }
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    /// [`Patterns::spans`] against its definition, [`each_pattern`], sorted.
    fn assert_same_spans(patterns: &mut Patterns, text: &str) {
        let mut fast = patterns.spans(text);
        let mut slow = Vec::new();
        each_pattern(text, &mut slow);
        fast.sort();
        slow.sort();
        assert_eq!(fast, slow, "{text:?}");
    }

    #[test]
    fn one_reverse_pass_and_anchored_searches_find_what_each_pattern_alone_finds() {
        let texts = [
            "Seen by Dr. Ann Lee, MD on 03/14/1962 at Riverside General Hospital; call 555-810-7203.",
            "Her son Kenji Watanabe (MRN: A1234567) lives at 12 Oak Street, Boston, MA 02118.",
            "92 year-old, e-mail ann@example.org, www.example.org, 10.0.0.1, 0.12/0.015 mg.",
            "",
            // Matches of one pattern that touch, nest or overlap (each search resumes at the end of the
            // match before), and matches that overlap another pattern's.
            "12345678901234 1234567 MRN MRN10000003 NHS number 584 000 4251 12/12/12/12 1.2.3.4.5.6.7",
            "Dr. Dr. Mrs Ann Mr.\nSmith Dr. A B C D E MA 02118-1234 02118-1234-5678 zip02139 zip code: 02139",
            "December\n12, 2018 15 May 2024 May 2024 3 May 15, 2024 2024年5月15日 2024年5月",
            "St. Mary General Hospital ABC DEF Clinic Health Center Health Centre \u{2019}Hospital",
            "aged 95 aged of 3 95-year-old 12 y/o 90歳 ＭＲＮ 12345 mrn 1234 ssn 123-45-6789-123",
            // ZIPs in digits of other scripts, ending before a letter (where an ASCII boundary is).
            "MA 0211８x MA ０2118 zip 02139-１２３４a Texas ١٢٣٤٥",
        ];
        // A thread's own state, as the scrubbing workers hold it.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut patterns = Patterns::default();
                    for t in texts {
                        assert_same_spans(&mut patterns, t);
                        assert!(t.is_empty() || !patterns.spans(t).is_empty(), "{t}");
                    }
                })
                .join()
                .expect("thread");
        });
        // The hand-labelled corpus, with its labels as written.
        let corpus = include_str!("../../tests/data/scrub-corpus/notes.txt");
        let mut patterns = Patterns::default();
        for note in corpus.split("\n====\n") {
            assert_same_spans(&mut patterns, note);
        }
    }

    /// Pieces of text the patterns turn on, and their edges: digits and separators of every kind,
    /// titles, labels, month and state names, capitalised words, other scripts (and digits of other
    /// scripts, which `\d` takes: fullwidth, Arabic-Indic, Devanagari).
    #[rustfmt::skip]
    const PIECES: &[&str] = &[
        "1", "12", "123", "1234", "12345", "1234567", "2024", "-", "/", ".", ":", "#", ",", " ",
        "  ", "\n", "(", ")", "+", "@", "年", "月", "日", "歳", "様", "é", "’", "'", "Dr", "Mrs", "Ann",
        "Lee", "Smith", "MD", "RN", "MRN", "NHS", "number", "no", "is", "zip", "code", "MA",
        "Texas", "New York", "May", "December", "Sept", "of", "st", "year", "years", "old", "y/o",
        "aged", "age", "Street", "Hospital", "Medical Center", "www", "http://", "example", "org",
        "A", "B", "x", "son", "Signed", "by", "Linda", "Garcia", "Ms", "Prof", "postal", "postcode",
        "\u{a0}", "\u{2003}", "\t", "０", "８", "１２３４５", "١٢", "४",
    ];

    #[test]
    fn no_pattern_matches_the_empty_string() {
        let sources = PATTERNS
            .iter()
            .map(|p| p.src.as_str())
            .chain([crate::names::WORD_SOURCE]);
        for src in sources {
            let hir = regex_automata::util::syntax::parse(src).expect("parses");
            assert!(
                hir.properties().minimum_len().is_some_and(|n| n > 0),
                "{src}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn pattern_spans_are_each_patterns_own_matches(
            pieces in proptest::collection::vec(proptest::sample::select(PIECES), 0..40)
        ) {
            let text: String = pieces.concat();
            assert_same_spans(&mut Patterns::default(), &text);
        }
    }

    #[test]
    fn known_identifiers_and_patterns_are_replaced() {
        let mut k = KnownIdentifiers::default();
        k.add("Sumiko254", PhiKind::Name);
        k.add("Medhurst46", PhiKind::Name);
        k.add("555-810-7203", PhiKind::Phone);
        k.add("MRN00123456", PhiKind::Id);
        k.add_date(NaiveDate::from_ymd_opt(1927, 5, 21).expect("date"));
        k.seal();
        let mut counts = ScrubCounts::new();
        let text = "Mrs. Sumiko254 Medhurst46 (born May 21, 1927, now 96 years old) seen at St. Mary General Hospital \
                    on 2023-01-27. Call (555) 810-7203 or mail s.m@example.org; MRN: MRN00123456, see \
                    https://portal.example.org/x?id=1 from 10.0.0.12. Sumiko lives at ZIP 02155.";
        let out = scrub(text, &k, &mut counts);
        for leaked in [
            "Sumiko",
            "Medhurst",
            "1927",
            "810-7203",
            "example.org",
            "MRN00123456",
            "10.0.0.12",
            "02155",
            "Mary General",
            "96 years",
        ] {
            assert!(!out.contains(leaked), "{leaked} survived: {out}");
        }
        assert!(out.starts_with("Mrs. [NAME] (born [DATE]"), "{out}");
        assert_eq!(counts.get(&PhiKind::Phone), Some(&1));
        assert!(out.contains("seen at [FACILITY]"), "{out}");
    }

    #[test]
    fn the_over_cuts_of_the_public_sample_are_gone() {
        let k = KnownIdentifiers::default();
        let mut counts = ScrubCounts::new();
        for text in [
            " Patient identifies as heterosexual.",
            "levonorgestrel 0.12/0.015 mg vaginal ring",
            "ethinyl estradiol 0.035 MG / norethindrone 1 MG oral tablet; 1/2 tablet",
            "The NHS number is on file; MRN was checked.",
            "BP 120/80, pulse 72, temperature 36.8, glucose 5.4, version 2.10.1",
            "Platelets 250000, give 10000 units, HbA1c 48 mmol/mol",
            "Patient quit smoking at 20 and has 2 children.",
        ] {
            assert_eq!(scrub(text, &k, &mut counts), text);
        }
        assert!(counts.is_empty(), "{counts:?}");
    }

    #[test]
    fn labels_stay_and_only_their_values_go() {
        let k = KnownIdentifiers::default();
        let mut counts = ScrubCounts::new();
        assert_eq!(
            scrub(
                "NHS number: 943 476 5919. MRN# A1234567, passport no. X71771363X",
                &k,
                &mut counts
            ),
            "NHS number: [ID]. MRN# [ID], passport no. [ID]"
        );
        assert_eq!(
            scrub("Springfield MA 01103; zip code 02139.", &k, &mut counts),
            "Springfield MA [ZIP]; zip code [ZIP]."
        );
        assert_eq!(
            scrub("Seen on 03/04/2021 and 4.5.21.", &k, &mut counts),
            "Seen on [DATE] and [DATE]."
        );
        assert_eq!(
            scrub("Values 13/14/2021 stay.", &k, &mut counts),
            "Values 13/14/2021 stay."
        );
    }

    #[test]
    fn ages_follow_what_the_birth_value_releases() {
        let text = "A 60 year-old woman; her mother died aged 92; 89-year-old at the last visit.";
        let with = |ages| {
            let k = KnownIdentifiers {
                ages,
                ..KnownIdentifiers::default()
            };
            let mut counts = ScrubCounts::new();
            (scrub(text, &k, &mut counts), counts)
        };
        let (exact, _) = with(AgeRule::Exact);
        assert_eq!(
            exact,
            "A 60 year-old woman; her mother died [AGE]; 89-year-old at the last visit."
        );
        let (coarse, _) = with(AgeRule::Coarse);
        assert_eq!(
            coarse,
            "A [AGE] woman; her mother died [AGE]; [AGE] at the last visit."
        );
        let (top, counts) = with(AgeRule::TopCoded);
        assert_eq!(
            top,
            "A [AGE] woman; her mother died [AGE 90+]; [AGE] at the last visit."
        );
        assert_eq!(counts.get(&PhiKind::AgeOver89), Some(&1));
        assert_eq!(counts.get(&PhiKind::Age), Some(&2));
    }

    #[test]
    fn clinical_text_without_phi_is_untouched() {
        let k = KnownIdentifiers::default();
        let text = "Hemoglobin 13.2 g/dL, HbA1c 6.1 %. Continue metformin 500 mg twice daily.";
        assert_eq!(scrub(text, &k, &mut ScrubCounts::new()), text);
    }

    #[test]
    fn the_pattern_cache_answers_as_the_patterns_do_for_every_person() {
        let mut alice = KnownIdentifiers::default();
        alice.add("Zork12", PhiKind::Name);
        alice.seal();
        let mut bob = KnownIdentifiers::default();
        bob.add("Quux34", PhiKind::Name);
        bob.ages = AgeRule::TopCoded;
        bob.seal();
        let texts = [
            "Never smoker",
            "Zork12 and Quux34 seen 2023-01-27, 93 years old",
            "Quux34: 45 y/o, MRN 1234567",
            "",
            "0.12/0.015 mg",
        ];
        let mut cache = PatternCache::default();
        for round in 0..3 {
            for text in texts {
                for person in [&alice, &bob, &KnownIdentifiers::default()] {
                    assert_eq!(
                        cache.phi_spans(text, person),
                        phi_spans(text, person),
                        "round {round}: {text}"
                    );
                }
            }
        }
        // The same text, the same patterns, but the person's own name is found from their record.
        let text = "Zork12 and Quux34 seen 2023-01-27, 93 years old";
        let as_bob = render(text, &cache.phi_spans(text, &bob), &mut ScrubCounts::new());
        assert_eq!(as_bob, "Zork12 and [NAME] seen [DATE], [AGE 90+]");
        let as_alice = render(
            text,
            &cache.phi_spans(text, &alice),
            &mut ScrubCounts::new(),
        );
        assert_eq!(as_alice, "[NAME] and Quux34 seen [DATE], [AGE]");
        // Long texts are not kept; a full cache starts afresh.
        let long = "Seen 2023-01-27. ".repeat(20);
        assert_eq!(cache.phi_spans(&long, &alice), phi_spans(&long, &alice));
        for i in 0..PatternCache::MAX_ENTRIES + 10 {
            let t = format!("dose {i} mg");
            assert_eq!(cache.phi_spans(&t, &alice), phi_spans(&t, &alice));
        }
        assert!(cache.spans.len() <= PatternCache::MAX_ENTRIES);
    }
}
