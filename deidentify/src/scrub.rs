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
use regex::Regex;

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
    re: Regex,
    kind: PhiKind,
    /// Capture group holding the PHI (0: the whole match).
    group: usize,
    /// A check of the found span in its text (context the regex cannot express).
    check: Option<fn(&str, usize, usize) -> bool>,
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
    LazyLock::force(&PATTERNS);
    LazyLock::force(&PATTERN_SET);
    crate::names::warm_up();
}

/// All of [`PATTERNS`] as one set, in the same order.
static PATTERN_SET: LazyLock<regex::RegexSet> = LazyLock::new(|| {
    // Built from the same sources as PATTERNS, which the unit tests compile and exercise.
    #[allow(clippy::expect_used)]
    regex::RegexSet::new(PATTERNS.iter().map(|p| p.re.as_str()))
        .expect("scrub pattern set compiles")
});

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
        .map(|(src, kind, group)| Pattern {
            check: if kind == PhiKind::Date
                && (src.starts_with(r"\b\d{1,2}/") || src.starts_with(r"\b\d{1,2}\."))
            {
                Some(numeric_date as fn(&str, usize, usize) -> bool)
            } else if kind == PhiKind::Id && group == 1 {
                Some(labelled_value as fn(&str, usize, usize) -> bool)
            } else {
                None
            },
            // ASCII word boundaries keep the fast DFA engines usable on text with non-ASCII characters
            // (Unicode `\b` makes them give up on the first such byte). The patterns are constants of this
            // file, checked by the unit tests below.
            #[allow(clippy::expect_used)]
            re: Regex::new(&src.replace(r"\b", r"(?-u:\b)")).expect("scrub pattern compiles"),
            kind,
            group,
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
    let mut spans = Vec::new();
    spans_with(&PATTERN_SET, |i| &PATTERNS[i].re, text, &mut spans);
    crate::names::find(text, &mut spans);
    spans
}

/// The compiled patterns, copied for one thread. A copy has search caches of its own: threads sharing
/// one regex take turns at its cache pool, which costs more than the search on short texts.
#[derive(Clone)]
pub(crate) struct Patterns {
    set: regex::RegexSet,
    each: Vec<Regex>,
    word: Regex,
}

impl Default for Patterns {
    fn default() -> Patterns {
        Patterns {
            set: PATTERN_SET.clone(),
            each: PATTERNS.iter().map(|p| p.re.clone()).collect(),
            word: crate::names::word_pattern(),
        }
    }
}

impl Patterns {
    /// [`pattern_spans`] with this copy.
    pub(crate) fn spans(&self, text: &str) -> Vec<(usize, usize, PhiKind)> {
        let mut spans = Vec::new();
        spans_with(&self.set, |i| &self.each[i], text, &mut spans);
        crate::names::find_with(&self.word, text, &mut spans);
        spans
    }
}

/// The pattern spans of `text`, searched with `set` and `re` (the `i`th pattern's regex).
fn spans_with<'r>(
    set: &regex::RegexSet,
    re: impl Fn(usize) -> &'r Regex,
    text: &str,
    spans: &mut Vec<(usize, usize, PhiKind)>,
) {
    // One pass over the text says which patterns occur at all; only those are searched for positions.
    for i in set.matches(text).iter() {
        let p = &PATTERNS[i];
        let re = re(i);
        for m in re.find_iter(text) {
            if p.check
                .is_some_and(|check| !check(text, m.start(), m.end()))
            {
                continue;
            }
            if p.group == 0 {
                spans.push((m.start(), m.end(), p.kind));
            } else if let Some(g) = re
                .captures_at(&text[..m.end()], m.start())
                .and_then(|c| c.get(p.group))
            {
                // Captures only where the fast search found a match.
                spans.push((g.start(), g.end(), p.kind));
            }
        }
    }
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

    #[test]
    fn a_threads_copy_of_the_patterns_finds_what_the_shared_ones_find() {
        let texts = [
            "Seen by Dr. Ann Lee, MD on 03/14/1962 at Riverside General Hospital; call 555-810-7203.",
            "Her son Kenji Watanabe (MRN: A1234567) lives at 12 Oak Street, Boston, MA 02118.",
            "92 year-old, e-mail ann@example.org, www.example.org, 10.0.0.1, 0.12/0.015 mg.",
            "",
        ];
        let copy = Patterns::default();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    for t in texts {
                        let mut a = copy.spans(t);
                        let mut b = pattern_spans(t);
                        a.sort();
                        b.sort();
                        assert_eq!(a, b, "{t}");
                        assert!(t.is_empty() || !a.is_empty(), "{t}");
                    }
                })
                .join()
                .expect("thread");
        });
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
