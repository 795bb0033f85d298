//! A deterministic generator of realistic synthetic hospital exports, for demos, tests and benchmarks.
//!
//! Output (under `--out`):
//! ```text
//! csv/            Synthea-style CSV: patients, encounters, conditions, observations, medications,
//!                 procedures, notes (plus MRN, PHONE, EMAIL, INSURANCE_ID, DEPARTMENT columns)
//! fhir/ndjson/    FHIR R4 bulk export: Patient.ndjson, Encounter.ndjson, … DocumentReference.ndjson
//! fhir/bundle/    one FHIR R4 transaction Bundle per patient
//! manifest.json   every planted identifier, every PHI string planted in notes, injected errors
//! ```
//! The same seed gives the same bytes. Patients carry names, addresses, phones, e-mails, MRNs, an NHS-style
//! national ID with a valid modulus-11 check digit, licence and passport numbers, birth and death dates,
//! ages over 89 and ZIPs in restricted 3-digit areas; notes mention the patient's name, dates, phone, MRN,
//! national ID and hospital. `inject_errors` corrupts that share of rows (bad dates, broken quoting, wrong
//! field counts, invalid check digits, unknown codes, truncated JSON).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{Value as Json, json};

use enclave::{Error, Result};

/// Which formats to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoFormat {
    /// Synthea-style CSV.
    Csv,
    /// FHIR R4 NDJSON and Bundles.
    Fhir,
    /// Both.
    Both,
}

/// Generator options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Patients to generate.
    pub patients: usize,
    /// Output directory.
    pub out: PathBuf,
    /// Formats.
    pub format: DemoFormat,
    /// Seed.
    pub seed: u64,
    /// Share of rows to corrupt (0 = none).
    pub inject_errors: f64,
    /// The date "today" is taken to be (fixed so output is reproducible).
    pub today: NaiveDate,
}

/// One planted identifier.
#[derive(Debug, Clone, Serialize)]
pub struct Planted {
    /// Source patient ID.
    pub patient_id: String,
    /// What kind (name, national_id, mrn, phone, email, address, zip, birth_date, …).
    pub kind: String,
    /// The value as written.
    pub value: String,
}

/// PHI planted in one note.
#[derive(Debug, Clone, Serialize)]
pub struct NotePhi {
    /// Source note ID.
    pub note_id: String,
    /// Source patient ID.
    pub patient_id: String,
    /// `(kind, text)` pairs as they appear in the note.
    pub planted: Vec<(String, String)>,
}

/// What was generated.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Manifest {
    /// Seed.
    pub seed: u64,
    /// Patients.
    pub patients: usize,
    /// Rows written per table.
    pub rows: BTreeMap<String, u64>,
    /// Rows corrupted, per kind of error.
    pub injected_errors: BTreeMap<String, u64>,
    /// Every direct identifier planted in the structured data.
    pub identifiers: Vec<Planted>,
    /// Every PHI string planted in notes.
    pub notes: Vec<NotePhi>,
}

const FIRST_F: &[&str] = &[
    "Olivia",
    "Emma",
    "Hanako",
    "Yuki",
    "Sofia",
    "Amara",
    "Charlotte",
    "Mei",
    "Aiko",
    "Isabella",
    "Priya",
    "Grace",
    "Lucia",
    "Ingrid",
    "Fatima",
    "Chloe",
    "Sakura",
    "Naomi",
    "Rosalind",
    "Beatrix",
];
const FIRST_M: &[&str] = &[
    "Liam", "Noah", "Hiroshi", "Kenji", "Mateo", "Oliver", "Arjun", "Lucas", "Takeshi", "Elijah",
    "Omar", "Henry", "Santiago", "Magnus", "Kwame", "Felix", "Haruto", "Gabriel", "Desmond",
    "Theodore",
];
const LAST: &[&str] = &[
    "Tanaka",
    "Smith",
    "Garcia",
    "Nakamura",
    "Johnson",
    "Okafor",
    "Williams",
    "Suzuki",
    "Brown",
    "Rossi",
    "Yamamoto",
    "Kowalski",
    "Patel",
    "Andersson",
    "Dubois",
    "Hernandez",
    "Watanabe",
    "Murphy",
    "Schneider",
    "Kobayashi",
    "Fitzgerald",
    "Abernathy",
    "Lindqvist",
    "Moreau",
];
const STREETS: &[&str] = &[
    "Maple",
    "Oak",
    "Cedar",
    "Willow",
    "Harbor",
    "Sakura",
    "Elm",
    "Pine",
    "Lakeview",
    "Hillcrest",
    "Riverside",
    "Birch",
    "Chestnut",
    "Sunset",
    "Kensington",
];
const STREET_KIND: &[&str] = &["Street", "Avenue", "Road", "Lane", "Drive", "Court", "Way"];
/// (city, county, state, ZIP); 036xx, 059xx and 102xx are restricted 3-digit areas under Safe Harbor.
const PLACES: &[(&str, &str, &str, &str)] = &[
    ("Somerville", "Middlesex County", "Massachusetts", "02145"),
    ("Cambridge", "Middlesex County", "Massachusetts", "02139"),
    ("Worcester", "Worcester County", "Massachusetts", "01605"),
    ("Springfield", "Hampden County", "Massachusetts", "01103"),
    ("Lowell", "Middlesex County", "Massachusetts", "01852"),
    ("Quincy", "Norfolk County", "Massachusetts", "02169"),
    ("Walpole", "Cheshire County", "New Hampshire", "03608"),
    ("Charlestown", "Sullivan County", "New Hampshire", "03603"),
    ("Glasgow", "Valley County", "Montana", "59230"),
    ("Brooklyn", "Kings County", "New York", "10201"),
    ("Newton", "Middlesex County", "Massachusetts", "02458"),
    ("Salem", "Essex County", "Massachusetts", "01970"),
];
const HOSPITALS: &[(&str, &str)] = &[
    ("org-0001", "Riverside General Hospital"),
    ("org-0002", "St. Aurelia Medical Center"),
    ("org-0003", "Harborview Community Clinic"),
    ("org-0004", "Kensington University Hospital"),
    ("org-0005", "Northgate Health Center"),
    ("org-0006", "Sakuragaoka Memorial Hospital"),
];
const DEPARTMENTS: &[&str] = &[
    "Cardiology",
    "Emergency",
    "General Medicine",
    "Oncology",
    "Orthopedics",
    "Pediatrics",
    "Obstetrics",
    "Psychiatry",
];
const ENCOUNTER_TYPES: &[(&str, &str, &str)] = &[
    ("ambulatory", "185345009", "Encounter for symptom"),
    ("ambulatory", "185349003", "Encounter for check up"),
    ("wellness", "162673000", "General examination of patient"),
    ("emergency", "50849002", "Emergency room admission"),
    ("inpatient", "32485007", "Hospital admission"),
    ("outpatient", "390906007", "Follow-up encounter"),
];
const CONDITIONS: &[(&str, &str)] = &[
    ("38341003", "Hypertension"),
    ("44054006", "Diabetes mellitus type 2"),
    ("195662009", "Acute viral pharyngitis"),
    ("10509002", "Acute bronchitis"),
    ("55822004", "Hyperlipidemia"),
    ("40055000", "Chronic sinusitis"),
    ("233604007", "Pneumonia"),
    ("49436004", "Atrial fibrillation"),
    ("35489007", "Depressive disorder"),
    ("254837009", "Malignant neoplasm of breast"),
    ("431855005", "Chronic kidney disease stage 1"),
];
/// (LOINC, description, unit, typical, spread, category)
const LABS: &[(&str, &str, &str, f64, f64, &str)] = &[
    ("8302-2", "Body Height", "cm", 168.0, 12.0, "vital-signs"),
    ("29463-7", "Body Weight", "kg", 74.0, 15.0, "vital-signs"),
    (
        "39156-5",
        "Body mass index",
        "kg/m2",
        26.0,
        4.5,
        "vital-signs",
    ),
    ("8867-4", "Heart rate", "/min", 74.0, 11.0, "vital-signs"),
    (
        "8480-6",
        "Systolic blood pressure",
        "mm[Hg]",
        124.0,
        15.0,
        "vital-signs",
    ),
    (
        "8462-4",
        "Diastolic blood pressure",
        "mm[Hg]",
        79.0,
        9.0,
        "vital-signs",
    ),
    ("2339-0", "Glucose", "mg/dL", 98.0, 22.0, "laboratory"),
    ("4548-4", "Hemoglobin A1c", "%", 5.8, 0.9, "laboratory"),
    (
        "2093-3",
        "Cholesterol total",
        "mg/dL",
        190.0,
        35.0,
        "laboratory",
    ),
    ("718-7", "Hemoglobin", "g/dL", 13.8, 1.5, "laboratory"),
    ("2160-0", "Creatinine", "mg/dL", 0.95, 0.25, "laboratory"),
    ("6690-2", "Leukocytes", "10*3/uL", 7.2, 1.9, "laboratory"),
];
const MEDS: &[(&str, &str, f64)] = &[
    ("314076", "lisinopril 10 MG Oral Tablet", 12.5),
    ("860975", "metformin 500 MG Oral Tablet", 9.8),
    ("617311", "atorvastatin 20 MG Oral Tablet", 15.2),
    ("197361", "amlodipine 5 MG Oral Tablet", 8.4),
    ("308136", "amoxicillin 500 MG Oral Capsule", 6.1),
    ("313782", "acetaminophen 325 MG Oral Tablet", 3.2),
    ("855332", "warfarin sodium 5 MG Oral Tablet", 11.0),
    ("312938", "sertraline 50 MG Oral Tablet", 10.3),
];
const PROCEDURES: &[(&str, &str, f64)] = &[
    ("430193006", "Medication reconciliation", 450.0),
    (
        "710824005",
        "Assessment of health and social care needs",
        380.0,
    ),
    ("76601001", "Intramuscular injection", 120.0),
    ("252160004", "Standard pregnancy test", 90.0),
    ("73761001", "Colonoscopy", 2300.0),
    ("40701008", "Echocardiography", 1500.0),
];
const NOTE_TYPES: &[&str] = &[
    "Discharge summary",
    "Progress note",
    "History and physical note",
    "Consult note",
];

struct Person {
    id: String,
    gender: &'static str,
    prefix: &'static str,
    first: &'static str,
    middle: Option<&'static str>,
    last: &'static str,
    maiden: Option<&'static str>,
    birth: NaiveDate,
    death: Option<NaiveDate>,
    national_id: String,
    mrn: String,
    drivers: String,
    passport: String,
    insurance: String,
    phone: String,
    email: String,
    address: String,
    place: (&'static str, &'static str, &'static str, &'static str),
    zip: String,
    lat: f64,
    lon: f64,
    marital: &'static str,
    race: &'static str,
    ethnicity: &'static str,
    expenses: f64,
    coverage: f64,
    income: f64,
}

fn uuid(rng: &mut ChaCha8Rng) -> String {
    let b: [u8; 16] = rng.random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn digits(rng: &mut ChaCha8Rng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

fn nhs_number(rng: &mut ChaCha8Rng) -> String {
    loop {
        let d: Vec<u32> = (0..9)
            .map(|i| {
                if i == 0 {
                    rng.random_range(4..10)
                } else {
                    rng.random_range(0..10)
                }
            })
            .collect();
        if let Some(c) = deidentify::ids::nhs_check_digit(&d) {
            let s: String = d
                .iter()
                .chain(std::iter::once(&c))
                .map(|x| char::from_digit(*x, 10).unwrap_or('0'))
                .collect();
            return format!("{} {} {}", &s[..3], &s[3..6], &s[6..]);
        }
    }
}

fn person(rng: &mut ChaCha8Rng, today: NaiveDate, serial: usize) -> Person {
    let female = rng.random_bool(0.52);
    let first = *if female { FIRST_F } else { FIRST_M }
        .choose(rng)
        .unwrap_or(&"Alex");
    let last = *LAST.choose(rng).unwrap_or(&"Doe");
    // Ages: mostly adults, some children, about 4 % over 89.
    let age_days = if rng.random_bool(0.04) {
        rng.random_range(90 * 365..103 * 365)
    } else {
        rng.random_range(0..89 * 365)
    };
    let birth = today - Duration::days(age_days);
    let death = rng
        .random_bool(0.07)
        .then(|| {
            let lived = rng.random_range(0..=age_days.max(1));
            birth + Duration::days(lived.max(365))
        })
        .filter(|d| *d < today);
    let place = *PLACES.choose(rng).unwrap_or(&PLACES[0]);
    let zip = if rng.random_bool(0.03) {
        String::new()
    } else {
        place.3.to_owned()
    };
    let married = age_days > 20 * 365 && rng.random_bool(0.55);
    let maiden = (female && married).then(|| *LAST.choose(rng).unwrap_or(&"Doe"));
    let phone = format!("555-{}-{}", digits(rng, 3), digits(rng, 4));
    Person {
        id: uuid(rng),
        gender: if female { "F" } else { "M" },
        prefix: if age_days < 18 * 365 {
            ""
        } else if female {
            if married { "Mrs." } else { "Ms." }
        } else {
            "Mr."
        },
        first,
        middle: rng.random_bool(0.4).then(|| {
            *if female { FIRST_F } else { FIRST_M }
                .choose(rng)
                .unwrap_or(&"Lee")
        }),
        last,
        maiden,
        birth,
        death,
        national_id: nhs_number(rng),
        mrn: format!("MRN{:08}", 10_000_000 + serial * 7 + rng.random_range(0..7)),
        drivers: format!("S99{}", digits(rng, 6)),
        passport: format!("X{}X", digits(rng, 8)),
        insurance: format!("INS{}", digits(rng, 9)),
        email: format!(
            "{}.{}{}@example.org",
            first.to_lowercase(),
            last.to_lowercase(),
            rng.random_range(10..999)
        ),
        phone,
        address: format!(
            "{} {} {}",
            rng.random_range(1..9999),
            STREETS.choose(rng).unwrap_or(&"Main"),
            STREET_KIND.choose(rng).unwrap_or(&"Street")
        ),
        place,
        zip,
        lat: 42.0 + rng.random_range(0.0..1.0),
        lon: -71.5 + rng.random_range(0.0..1.0),
        marital: if married { "M" } else { "S" },
        race: ["white", "black", "asian", "native", "other"]
            .choose(rng)
            .unwrap_or(&"other"),
        ethnicity: if rng.random_bool(0.15) {
            "hispanic"
        } else {
            "nonhispanic"
        },
        expenses: (rng.random_range(1_000.0..900_000.0f64) * 100.0).round() / 100.0,
        coverage: (rng.random_range(0.0..50_000.0f64) * 100.0).round() / 100.0,
        income: f64::from(rng.random_range(12_000..250_000)),
    }
}

fn ts(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn age_at(birth: NaiveDate, at: NaiveDate) -> i32 {
    let mut a = at.year() - birth.year();
    if (at.month(), at.day()) < (birth.month(), birth.day()) {
        a -= 1;
    }
    a
}

struct Writers {
    csv: Option<BTreeMap<&'static str, BufWriter<File>>>,
    ndjson: Option<BTreeMap<&'static str, BufWriter<File>>>,
    bundle_dir: Option<PathBuf>,
}

const CSV_HEADERS: &[(&str, &[&str])] = &[
    (
        "patients",
        &[
            "Id",
            "MRN",
            "BIRTHDATE",
            "DEATHDATE",
            "SSN",
            "DRIVERS",
            "PASSPORT",
            "INSURANCE_ID",
            "PREFIX",
            "FIRST",
            "MIDDLE",
            "LAST",
            "SUFFIX",
            "MAIDEN",
            "MARITAL",
            "RACE",
            "ETHNICITY",
            "GENDER",
            "BIRTHPLACE",
            "ADDRESS",
            "CITY",
            "STATE",
            "COUNTY",
            "ZIP",
            "LAT",
            "LON",
            "PHONE",
            "EMAIL",
            "HEALTHCARE_EXPENSES",
            "HEALTHCARE_COVERAGE",
            "INCOME",
        ],
    ),
    (
        "encounters",
        &[
            "Id",
            "START",
            "STOP",
            "PATIENT",
            "ORGANIZATION",
            "PROVIDER",
            "PAYER",
            "DEPARTMENT",
            "ENCOUNTERCLASS",
            "CODE",
            "DESCRIPTION",
            "BASE_ENCOUNTER_COST",
            "TOTAL_CLAIM_COST",
            "PAYER_COVERAGE",
            "REASONCODE",
            "REASONDESCRIPTION",
        ],
    ),
    (
        "conditions",
        &[
            "START",
            "STOP",
            "PATIENT",
            "ENCOUNTER",
            "CODE",
            "DESCRIPTION",
        ],
    ),
    (
        "observations",
        &[
            "DATE",
            "PATIENT",
            "ENCOUNTER",
            "CATEGORY",
            "CODE",
            "DESCRIPTION",
            "VALUE",
            "UNITS",
            "TYPE",
        ],
    ),
    (
        "medications",
        &[
            "START",
            "STOP",
            "PATIENT",
            "PAYER",
            "ENCOUNTER",
            "CODE",
            "DESCRIPTION",
            "BASE_COST",
            "PAYER_COVERAGE",
            "DISPENSES",
            "TOTALCOST",
            "REASONCODE",
            "REASONDESCRIPTION",
        ],
    ),
    (
        "procedures",
        &[
            "START",
            "STOP",
            "PATIENT",
            "ENCOUNTER",
            "CODE",
            "DESCRIPTION",
            "BASE_COST",
            "REASONCODE",
            "REASONDESCRIPTION",
        ],
    ),
    (
        "notes",
        &["Id", "DATE", "PATIENT", "ENCOUNTER", "TYPE", "TEXT"],
    ),
];

const FHIR_TYPES: &[(&str, &str)] = &[
    ("patients", "Patient"),
    ("encounters", "Encounter"),
    ("conditions", "Condition"),
    ("observations", "Observation"),
    ("medications", "MedicationRequest"),
    ("procedures", "Procedure"),
    ("notes", "DocumentReference"),
];

struct Gen<'a> {
    rng: ChaCha8Rng,
    err_rng: ChaCha8Rng,
    opts: &'a DemoOptions,
    w: Writers,
    manifest: Manifest,
}

impl Gen<'_> {
    /// Writes one row: a CSV record (possibly corrupted) and/or an NDJSON resource (possibly corrupted).
    fn emit(
        &mut self,
        table: &'static str,
        mut fields: Vec<String>,
        resource: Json,
        bundle: &mut Vec<Json>,
    ) -> Result<()> {
        *self.manifest.rows.entry(table.to_owned()).or_default() += 1;
        let corrupt = self.opts.inject_errors > 0.0
            && self.err_rng.random_bool(self.opts.inject_errors.min(1.0));
        let kind = corrupt.then(|| {
            let kinds: &[&str] = if table == "patients" {
                &["bad_date", "wrong_field_count", "invalid_check_digit"]
            } else {
                &[
                    "bad_date",
                    "wrong_field_count",
                    "broken_quoting",
                    "unknown_code",
                ]
            };
            *kinds.choose(&mut self.err_rng).unwrap_or(&"bad_date")
        });
        if let Some(k) = kind {
            *self
                .manifest
                .injected_errors
                .entry(k.to_owned())
                .or_default() += 1;
        }
        let mut resource = resource;
        match kind {
            Some("bad_date") => {
                let date_idx = CSV_HEADERS
                    .iter()
                    .find(|(t, _)| *t == table)
                    .and_then(|(_, h)| {
                        h.iter()
                            .position(|c| ["BIRTHDATE", "START", "DATE"].contains(c))
                    });
                if let Some(i) = date_idx {
                    fields[i] = "2023-13-45".into();
                }
                corrupt_fhir_date(&mut resource);
            }
            Some("invalid_check_digit") => {
                let nid = &mut fields[4];
                let last = nid.pop().and_then(|c| c.to_digit(10)).unwrap_or(0);
                nid.push(char::from_digit((last + 1) % 10, 10).unwrap_or('0'));
                if let Some(ids) = resource.get_mut("identifier").and_then(Json::as_array_mut) {
                    for id in ids
                        .iter_mut()
                        .filter(|i| i.pointer("/type/coding/0/code") == Some(&json!("NI")))
                    {
                        id["value"] = json!(fields[4].clone());
                    }
                }
            }
            Some("unknown_code") => {
                if let Some(i) = CSV_HEADERS
                    .iter()
                    .find(|(t, _)| *t == table)
                    .and_then(|(_, h)| h.iter().position(|c| *c == "CODE"))
                {
                    fields[i] = "UNKNOWN-CODE-??".into();
                }
                for p in [
                    "/code/coding/0/code",
                    "/medicationCodeableConcept/coding/0/code",
                    "/type/0/coding/0/code",
                ] {
                    if let Some(v) = resource.pointer_mut(p) {
                        *v = json!("UNKNOWN-CODE-??");
                    }
                }
            }
            _ => {}
        }
        if let Some(csv) = self.w.csv.as_mut().and_then(|m| m.get_mut(table)) {
            let line = match kind {
                Some("wrong_field_count") => {
                    fields.pop();
                    csv_line(&fields)
                }
                Some("broken_quoting") => {
                    // A line whose second field opens a quote it never closes.
                    let mut raw = fields
                        .iter()
                        .map(|f| f.replace([',', '"', '\n'], " "))
                        .collect::<Vec<_>>();
                    raw[1] = format!("\"{}", raw[1]);
                    raw.join(",")
                }
                _ => csv_line(&fields),
            };
            writeln!(csv, "{line}").map_err(|e| Error::Io("demo csv".into(), e))?;
        }
        if let Some(nd) = self.w.ndjson.as_mut().and_then(|m| m.get_mut(table)) {
            let mut line = resource.to_string();
            if matches!(kind, Some("wrong_field_count" | "broken_quoting")) {
                line.truncate(line.len() / 2);
            }
            writeln!(nd, "{line}").map_err(|e| Error::Io("demo ndjson".into(), e))?;
        }
        if self.w.bundle_dir.is_some() {
            bundle.push(json!({"fullUrl": format!("urn:uuid:{}", resource["id"].as_str().unwrap_or("")), "resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}));
        }
        Ok(())
    }

    fn plant(&mut self, p: &Person, kind: &str, value: &str) {
        if !value.is_empty() {
            self.manifest.identifiers.push(Planted {
                patient_id: p.id.clone(),
                kind: kind.into(),
                value: value.into(),
            });
        }
    }

    fn patient(&mut self, serial: usize) -> Result<()> {
        let today = self.opts.today;
        let p = person(&mut self.rng, today, serial);
        let mut bundle = Vec::new();
        for (k, v) in [
            ("first_name", p.first),
            ("last_name", p.last),
            ("middle_name", p.middle.unwrap_or("")),
            ("maiden_name", p.maiden.unwrap_or("")),
            ("national_id", &p.national_id),
            ("mrn", &p.mrn),
            ("drivers_license", &p.drivers),
            ("passport", &p.passport),
            ("insurance_id", &p.insurance),
            ("phone", &p.phone),
            ("email", &p.email),
            ("address", &p.address),
            ("patient_id", &p.id),
        ] {
            self.plant(&p, k, v);
        }
        self.plant(&p, "full_name", &format!("{} {}", p.first, p.last));
        self.plant(&p, "birth_date", &p.birth.to_string());
        if !p.zip.is_empty() {
            self.plant(&p, "zip", &p.zip);
        }
        let birthplace = format!("{} {} US", p.place.0, p.place.2);
        let fields = vec![
            p.id.clone(),
            p.mrn.clone(),
            p.birth.to_string(),
            p.death.map(|d| d.to_string()).unwrap_or_default(),
            p.national_id.clone(),
            p.drivers.clone(),
            p.passport.clone(),
            p.insurance.clone(),
            p.prefix.into(),
            p.first.into(),
            p.middle.unwrap_or("").into(),
            p.last.into(),
            String::new(),
            p.maiden.unwrap_or("").into(),
            p.marital.into(),
            p.race.into(),
            p.ethnicity.into(),
            p.gender.into(),
            birthplace.clone(),
            p.address.clone(),
            p.place.0.into(),
            p.place.2.into(),
            p.place.1.into(),
            p.zip.clone(),
            format!("{:.6}", p.lat),
            format!("{:.6}", p.lon),
            p.phone.clone(),
            p.email.clone(),
            format!("{:.2}", p.expenses),
            format!("{:.2}", p.coverage),
            format!("{:.0}", p.income),
        ];
        let given: Vec<&str> = std::iter::once(p.first).chain(p.middle).collect();
        let mut names = vec![
            json!({"use": "official", "family": p.last, "given": given, "prefix": [p.prefix]}),
        ];
        if let Some(m) = p.maiden {
            names.push(json!({"use": "maiden", "family": m, "given": [p.first]}));
        }
        let mut res = json!({
            "resourceType": "Patient", "id": p.id,
            "identifier": [
                {"system": "https://example.org/enclave-demo", "value": p.id},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}, "system": "urn:demo:mrn", "value": p.mrn},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NI"}]}, "system": "https://fhir.nhs.uk/Id/nhs-number", "value": p.national_id},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "DL"}]}, "value": p.drivers},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PPN"}]}, "value": p.passport},
                {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MB"}]}, "value": p.insurance},
            ],
            "name": names,
            "telecom": [{"system": "phone", "value": p.phone, "use": "home"}, {"system": "email", "value": p.email}],
            "gender": if p.gender == "F" { "female" } else { "male" },
            "birthDate": p.birth.to_string(),
            "maritalStatus": {"coding": [{"code": p.marital}]},
            "address": [{"line": [p.address], "city": p.place.0, "district": p.place.1, "state": p.place.2, "postalCode": p.zip,
                         "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/geolocation", "extension": [{"url": "latitude", "valueDecimal": p.lat}, {"url": "longitude", "valueDecimal": p.lon}]}]}],
            "extension": [
                {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": [{"url": "text", "valueString": p.race}]},
                {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity", "extension": [{"url": "text", "valueString": p.ethnicity}]},
                {"url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace", "valueAddress": {"city": p.place.0, "state": p.place.2, "country": "US"}},
            ],
        });
        if let Some(d) = p.death {
            res["deceasedDateTime"] = json!(format!("{d}T08:00:00Z"));
        }
        self.emit("patients", fields, res, &mut bundle)?;

        let last_day = p.death.unwrap_or(today);
        let first_day = (p.birth + Duration::days(30)).max(last_day - Duration::days(15 * 365));
        let span = (last_day - first_day).num_days().max(1);
        let n_enc = self.rng.random_range(2..=20);
        let mut starts: Vec<i64> = (0..n_enc).map(|_| self.rng.random_range(0..span)).collect();
        starts.sort_unstable();
        for day in starts {
            self.encounter(&p, first_day + Duration::days(day), &mut bundle)?;
        }
        if let Some(dir) = &self.w.bundle_dir {
            let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": bundle});
            let path = dir.join(format!("{}.json", p.id));
            fs::write(&path, b.to_string()).map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    fn encounter(&mut self, p: &Person, day: NaiveDate, bundle: &mut Vec<Json>) -> Result<()> {
        let rng = &mut self.rng;
        let (class, code, desc) = *ENCOUNTER_TYPES.choose(rng).unwrap_or(&ENCOUNTER_TYPES[0]);
        let start = day
            .and_hms_opt(rng.random_range(7..20), rng.random_range(0..60), 0)
            .unwrap_or_default();
        let stop = if class == "inpatient" {
            start + Duration::hours(rng.random_range(24..24 * 14))
        } else {
            start + Duration::minutes(rng.random_range(15..240))
        };
        let dept = if age_at(p.birth, day) < 16 && rng.random_bool(0.7) {
            "Pediatrics"
        } else {
            DEPARTMENTS.choose(rng).unwrap_or(&"General Medicine")
        };
        let (org, hospital) = *HOSPITALS.choose(rng).unwrap_or(&HOSPITALS[0]);
        let id = uuid(rng);
        let provider = format!("prov-{:04}", rng.random_range(1..60));
        let payer = format!("payer-{:02}", rng.random_range(1..9));
        let base = (rng.random_range(60.0..400.0f64) * 100.0).round() / 100.0;
        let total = if class == "inpatient" {
            base * rng.random_range(8.0..60.0)
        } else {
            base * rng.random_range(1.0..4.0)
        };
        let reason = rng
            .random_bool(0.4)
            .then(|| *CONDITIONS.choose(rng).unwrap_or(&CONDITIONS[0]));
        let fields = vec![
            id.clone(),
            ts(start),
            ts(stop),
            p.id.clone(),
            org.into(),
            provider.clone(),
            payer.clone(),
            dept.into(),
            class.into(),
            code.into(),
            desc.into(),
            format!("{base:.2}"),
            format!("{total:.2}"),
            format!("{:.2}", total * 0.7),
            reason.map(|r| r.0).unwrap_or("").into(),
            reason.map(|r| r.1).unwrap_or("").into(),
        ];
        let res = json!({
            "resourceType": "Encounter", "id": id, "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": class},
            "type": [{"coding": [{"system": "http://snomed.info/sct", "code": code, "display": desc}]}],
            "serviceType": {"text": dept},
            "subject": {"reference": format!("Patient/{}", p.id), "display": format!("{} {} {}", p.prefix, p.first, p.last)},
            "participant": [{"individual": {"reference": format!("Practitioner/{provider}")}}],
            "period": {"start": ts(start), "end": ts(stop)},
            "serviceProvider": {"reference": format!("Organization/{org}"), "display": hospital},
            "reasonCode": reason.map(|r| json!([{"coding": [{"system": "http://snomed.info/sct", "code": r.0, "display": r.1}]}])).unwrap_or(json!([])),
        });
        self.emit("encounters", fields, res, bundle)?;
        let subject = json!({"reference": format!("Patient/{}", p.id)});
        let enc_ref = json!({"reference": format!("Encounter/{id}")});

        for _ in 0..self.rng.random_range(0..=2) {
            let (c, d) = *CONDITIONS.choose(&mut self.rng).unwrap_or(&CONDITIONS[0]);
            let stop_day = self
                .rng
                .random_bool(0.5)
                .then(|| day + Duration::days(self.rng.random_range(3..60)));
            let fields = vec![
                day.to_string(),
                stop_day.map(|s| s.to_string()).unwrap_or_default(),
                p.id.clone(),
                id.clone(),
                c.into(),
                d.into(),
            ];
            let mut res = json!({"resourceType": "Condition", "id": uuid(&mut self.rng), "subject": subject, "encounter": enc_ref,
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": c, "display": d}]}, "onsetDateTime": format!("{day}T00:00:00Z")});
            if let Some(s) = stop_day {
                res["abatementDateTime"] = json!(format!("{s}T00:00:00Z"));
            }
            self.emit("conditions", fields, res, bundle)?;
        }
        for _ in 0..self.rng.random_range(3..=8) {
            let (code, desc, unit, mean, sd, cat) = *LABS.choose(&mut self.rng).unwrap_or(&LABS[0]);
            let z: f64 = (0..6)
                .map(|_| self.rng.random_range(-1.0..1.0f64))
                .sum::<f64>()
                / 1.41;
            let value = ((mean + z * sd).max(mean * 0.2) * 10.0).round() / 10.0;
            let fields = vec![
                ts(start),
                p.id.clone(),
                id.clone(),
                cat.into(),
                code.into(),
                desc.into(),
                format!("{value}"),
                unit.into(),
                "numeric".into(),
            ];
            let res = json!({"resourceType": "Observation", "id": uuid(&mut self.rng), "status": "final",
                "category": [{"coding": [{"code": cat}]}], "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": desc}]},
                "subject": subject, "encounter": enc_ref, "effectiveDateTime": ts(start), "valueQuantity": {"value": value, "unit": unit}});
            self.emit("observations", fields, res, bundle)?;
        }
        for _ in 0..self.rng.random_range(0..=2) {
            let (c, d, cost) = *MEDS.choose(&mut self.rng).unwrap_or(&MEDS[0]);
            let dispenses = self.rng.random_range(1..24);
            let fields = vec![
                ts(start),
                String::new(),
                p.id.clone(),
                payer.clone(),
                id.clone(),
                c.into(),
                d.into(),
                format!("{cost:.2}"),
                format!("{:.2}", cost * 0.5),
                dispenses.to_string(),
                format!("{:.2}", cost * f64::from(dispenses)),
                String::new(),
                String::new(),
            ];
            let res = json!({"resourceType": "MedicationRequest", "id": uuid(&mut self.rng), "status": "active", "intent": "order",
                "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": c, "display": d}]},
                "subject": subject, "encounter": enc_ref, "authoredOn": ts(start), "dispenseRequest": {"numberOfRepeatsAllowed": dispenses}});
            self.emit("medications", fields, res, bundle)?;
        }
        if self.rng.random_bool(0.5) {
            let (c, d, cost) = *PROCEDURES.choose(&mut self.rng).unwrap_or(&PROCEDURES[0]);
            let end = start + Duration::minutes(30);
            let fields = vec![
                ts(start),
                ts(end),
                p.id.clone(),
                id.clone(),
                c.into(),
                d.into(),
                format!("{cost:.2}"),
                String::new(),
                String::new(),
            ];
            let res = json!({"resourceType": "Procedure", "id": uuid(&mut self.rng), "status": "completed",
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": c, "display": d}]}, "subject": subject, "encounter": enc_ref,
                "performedPeriod": {"start": ts(start), "end": ts(end)}});
            self.emit("procedures", fields, res, bundle)?;
        }
        if self.rng.random_bool(0.5) {
            self.note(p, &id, start, stop, hospital, bundle)?;
        }
        Ok(())
    }

    fn note(
        &mut self,
        p: &Person,
        enc: &str,
        start: NaiveDateTime,
        stop: NaiveDateTime,
        hospital: &str,
        bundle: &mut Vec<Json>,
    ) -> Result<()> {
        let rng = &mut self.rng;
        let note_id = uuid(rng);
        let mut planted: Vec<(String, String)> = Vec::new();
        let mut put = |kind: &str, text: String| {
            planted.push((kind.to_owned(), text.clone()));
            text
        };
        let age = age_at(p.birth, start.date());
        let date_fmt = *["%Y-%m-%d", "%m/%d/%Y", "%B %-d, %Y", "%-d %B %Y"]
            .choose(rng)
            .unwrap_or(&"%Y-%m-%d");
        let name = if rng.random_bool(0.5) {
            format!("{} {}", p.first, p.last)
        } else {
            format!("{} {}", p.prefix, p.last).trim().to_owned()
        };
        let name = if name.starts_with(p.prefix) && !p.prefix.is_empty() {
            format!("{} {}", p.prefix, put("name", p.last.to_owned()))
        } else {
            put("name", name)
        };
        let mut text = format!(
            "{} — {}\nPatient: {}, MRN {}. Seen at {} on {}.\n",
            NOTE_TYPES.choose(rng).unwrap_or(&"Progress note"),
            put("facility", hospital.to_owned()),
            name,
            put("mrn", p.mrn.clone()),
            put("facility", hospital.to_owned()),
            put("date", start.format(date_fmt).to_string()),
        );
        let age_text = if age >= 90 {
            put("age", format!("{age}-year-old"))
        } else {
            format!("{age}-year-old")
        };
        text += &format!(
            "{} {} presents for follow-up. Date of birth {}. ",
            age_text,
            if p.gender == "F" { "woman" } else { "man" },
            put("date", p.birth.format("%m/%d/%Y").to_string()),
        );
        text += &format!(
            "Vitals stable; labs reviewed. {} reports adherence to medication.\n",
            put("name", p.first.to_owned())
        );
        if rng.random_bool(0.7) {
            text += &format!("Contact: {} (home)", put("phone", p.phone.clone()));
            if rng.random_bool(0.4) {
                text += &format!(", e-mail {}", put("email", p.email.clone()));
            }
            text += ".\n";
        }
        if rng.random_bool(0.3) {
            text += &format!(
                "NHS number {} verified at registration.\n",
                put("national_id", p.national_id.clone())
            );
        }
        if rng.random_bool(0.3) {
            text += &format!(
                "Lives at {}, {}.\n",
                put("address", p.address.clone()),
                put("address", p.place.0.to_owned())
            );
        }
        text += &format!(
            "Plan: continue current regimen, repeat HbA1c in 3 months. Discharged {}. Signed, Dr. {}.\n",
            put("date", stop.format("%Y-%m-%d").to_string()),
            put("name", LAST.choose(rng).unwrap_or(&"House").to_string()),
        );
        let note_type = *NOTE_TYPES.choose(rng).unwrap_or(&"Progress note");
        let fields = vec![
            note_id.clone(),
            ts(start),
            p.id.clone(),
            enc.to_owned(),
            note_type.into(),
            text.clone(),
        ];
        let res = json!({"resourceType": "DocumentReference", "id": note_id, "status": "current",
            "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3", "display": note_type}]},
            "subject": {"reference": format!("Patient/{}", p.id)}, "date": ts(start),
            "context": {"encounter": [{"reference": format!("Encounter/{enc}")}]},
            "content": [{"attachment": {"contentType": "text/plain", "data": base64::engine::general_purpose::STANDARD.encode(text.as_bytes())}}]});
        self.manifest.notes.push(NotePhi {
            note_id,
            patient_id: p.id.clone(),
            planted,
        });
        self.emit("notes", fields, res, bundle)
    }
}

fn corrupt_fhir_date(r: &mut Json) {
    for key in [
        "birthDate",
        "effectiveDateTime",
        "onsetDateTime",
        "authoredOn",
        "date",
    ] {
        if let Some(v) = r.get_mut(key) {
            *v = json!("2023-13-45");
            return;
        }
    }
    for p in ["/period/start", "/performedPeriod/start"] {
        if let Some(v) = r.pointer_mut(p) {
            *v = json!("2023-13-45");
            return;
        }
    }
}

/// One CSV record (RFC 4180 quoting: fields with a comma, quote or line break are quoted, quotes doubled).
fn csv_line(fields: &[String]) -> String {
    fields
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Generates the export and its manifest. Returns the manifest.
pub fn generate(opts: &DemoOptions) -> Result<Manifest> {
    let mkdir = |p: &Path| fs::create_dir_all(p).map_err(|e| Error::io(p, e));
    mkdir(&opts.out)?;
    let mut w = Writers {
        csv: None,
        ndjson: None,
        bundle_dir: None,
    };
    if matches!(opts.format, DemoFormat::Csv | DemoFormat::Both) {
        let dir = opts.out.join("csv");
        mkdir(&dir)?;
        let mut m = BTreeMap::new();
        for (t, h) in CSV_HEADERS {
            let path = dir.join(format!("{t}.csv"));
            let mut wr = BufWriter::new(File::create(&path).map_err(|e| Error::io(&path, e))?);
            writeln!(wr, "{}", h.join(",")).map_err(|e| Error::io(&path, e))?;
            m.insert(*t, wr);
        }
        w.csv = Some(m);
    }
    if matches!(opts.format, DemoFormat::Fhir | DemoFormat::Both) {
        let nd = opts.out.join("fhir").join("ndjson");
        let bundles = opts.out.join("fhir").join("bundle");
        mkdir(&nd)?;
        mkdir(&bundles)?;
        let mut m = BTreeMap::new();
        for (t, r) in FHIR_TYPES {
            let path = nd.join(format!("{r}.ndjson"));
            m.insert(
                *t,
                BufWriter::new(File::create(&path).map_err(|e| Error::io(&path, e))?),
            );
        }
        w.ndjson = Some(m);
        w.bundle_dir = Some(bundles);
    }
    let mut g = Gen {
        rng: ChaCha8Rng::seed_from_u64(opts.seed),
        err_rng: ChaCha8Rng::seed_from_u64(opts.seed ^ 0x5eed_e440),
        opts,
        w,
        manifest: Manifest {
            seed: opts.seed,
            patients: opts.patients,
            ..Manifest::default()
        },
    };
    for i in 0..opts.patients {
        g.patient(i)?;
    }
    for wr in
        g.w.csv
            .iter_mut()
            .chain(g.w.ndjson.iter_mut())
            .flat_map(|m| m.values_mut())
    {
        wr.flush().map_err(|e| Error::Io("demo export".into(), e))?;
    }
    let path = opts.out.join("manifest.json");
    fs::write(&path, serde_json::to_vec(&g.manifest)?).map_err(|e| Error::io(&path, e))?;
    Ok(g.manifest)
}
