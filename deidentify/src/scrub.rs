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
    /// Ages over 89.
    Age,
}

impl PhiKind {
    /// Every kind, in declaration order.
    pub const ALL: [PhiKind; 11] = [
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
        }
    }
}

/// The identifiers one person's structured record holds, ready for matching in their notes.
#[derive(Default)]
pub struct KnownIdentifiers {
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
}

/// All of [`PATTERNS`] as one set, in the same order.
static PATTERN_SET: LazyLock<regex::RegexSet> = LazyLock::new(|| {
    // Built from the same sources as PATTERNS, which the unit tests compile and exercise.
    #[allow(clippy::expect_used)]
    regex::RegexSet::new(PATTERNS.iter().map(|p| p.re.as_str()))
        .expect("scrub pattern set compiles")
});

static PATTERNS: LazyLock<Vec<Pattern>> = LazyLock::new(|| {
    const MONTH: &str = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)";
    let specs: Vec<(String, PhiKind, usize)> = vec![
        (r"\b(?:https?://|www\.)[^\s<>()]+".into(), PhiKind::Url, 0),
        (r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b".into(), PhiKind::Email, 0),
        (r"\b(?:\d{1,3}\.){3}\d{1,3}\b".into(), PhiKind::Ip, 0),
        (r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?".into(), PhiKind::Date, 0),
        (r"\b\d{1,2}[/.]\d{1,2}[/.]\d{2,4}\b".into(), PhiKind::Date, 0),
        (format!(r"\b{MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b"), PhiKind::Date, 0),
        (format!(r"\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{MONTH}\.?,?\s+\d{{4}}\b"), PhiKind::Date, 0),
        (format!(r"\b{MONTH}\s+\d{{4}}\b"), PhiKind::Date, 0),
        (r"\d{4}年\d{1,2}月(?:\d{1,2}日)?".into(), PhiKind::Date, 0),
        (r"\b\d{3}-\d{2}-\d{4}\b".into(), PhiKind::Id, 0),
        (r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)\s?|\b\d{2,4}[\s.-])\d{3,4}[\s.-]\d{4}\b".into(), PhiKind::Phone, 0),
        (r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b".into(), PhiKind::Id, 0),
        (
            r"(?i)\b(?:MRN|medical record(?: number| no\.?)?|patient id|hospital number|NHS(?: number| no\.?)?|SSN|social security(?: number)?|insurance(?: id| number| no\.?)?|member id|policy(?: number| no\.?)|account(?: number| no\.?)?|acct|licen[cs]e(?: number| no\.?)?|passport(?: number| no\.?)?|serial(?: number| no\.?)?|VIN)\s*(?:is|:|#|no\.?)?\s*([A-Z0-9][A-Z0-9-]{3,})".into(),
            PhiKind::Id,
            1,
        ),
        (r"\b[A-Z]{1,3}\d{6,}[A-Z]?\b".into(), PhiKind::Id, 0),
        (r"\b\d{7,}\b".into(), PhiKind::Id, 0),
        (r"〒?\b\d{3}-\d{4}\b".into(), PhiKind::Zip, 0),
        (r"\b\d{5}(?:-\d{4})?\b".into(), PhiKind::Zip, 0),
        (
            r"\b(?:[A-Z][A-Za-z.'&-]*\s+){1,5}(?:Hospital|Medical Center|Medical Centre|Clinic|Health Center|Health Centre|Infirmary|Health System|Medical Group)\b".into(),
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
            r"(?i)\b(?:9\d|1[0-2]\d)(?:\s*-?\s*(?:years?|yrs?)[\s-]*old\b|\s*y/?o\b|\s*歳)".into(),
            PhiKind::Age,
            0,
        ),
        (r"(?i)\baged?\s+(?:9\d|1[0-2]\d)\b".into(), PhiKind::Age, 0),
    ];
    specs
        .into_iter()
        .map(|(src, kind, group)| Pattern {
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

/// Replacement counts per kind.
pub type ScrubCounts = BTreeMap<PhiKind, u64>;

/// Scrubs one text. `known` may be empty (no structured record for the person).
pub fn scrub(text: &str, known: &KnownIdentifiers, counts: &mut ScrubCounts) -> String {
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
    // One pass over the text says which patterns occur at all; only those are searched for positions.
    for i in PATTERN_SET.matches(text).iter() {
        let p = &PATTERNS[i];
        for m in p.re.find_iter(text) {
            if p.group == 0 {
                spans.push((m.start(), m.end(), p.kind));
            } else if let Some(g) =
                p.re.captures_at(&text[..m.end()], m.start())
                    .and_then(|c| c.get(p.group))
            {
                // Captures only where the fast search found a match.
                spans.push((g.start(), g.end(), p.kind));
            }
        }
    }
    if spans.is_empty() {
        return text.to_owned();
    }
    // Earliest start first; at equal starts, the longest span (and the known-identifier kind) wins.
    spans.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut out = String::with_capacity(text.len());
    let mut pos = 0;
    let mut current: Option<(usize, usize, PhiKind)> = None;
    for (s, e, k) in spans {
        match &mut current {
            Some(c) if s < c.1 => c.1 = c.1.max(e),
            _ => {
                if let Some((cs, ce, ck)) = current.take() {
                    emit(text, &mut out, &mut pos, cs, ce, ck, counts);
                }
                current = Some((s, e, k));
            }
        }
    }
    if let Some((cs, ce, ck)) = current {
        emit(text, &mut out, &mut pos, cs, ce, ck, counts);
    }
    out.push_str(&text[pos..]);
    out
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

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn clinical_text_without_phi_is_untouched() {
        let k = KnownIdentifiers::default();
        let text = "Hemoglobin 13.2 g/dL, HbA1c 6.1 %. Continue metformin 500 mg twice daily.";
        assert_eq!(scrub(text, &k, &mut ScrubCounts::new()), text);
    }
}
