//! CSV column mappings: which canonical table a CSV export is, and which header feeds which column.
//!
//! Synthea's CSV layout is built in. Other layouts come from a mapping file (`--mapping FILE`):
//!
//! ```toml
//! [[table]]
//! table = "patients"
//! ignore = ["Notes"]            # headers present in the file that are deliberately not read
//! [table.columns]
//! PersonID = "patient_id"
//! GivenName = "first_name"
//! ```
//!
//! A file matches a mapping when every header it has is known to the mapping (mapped or ignored) and every
//! required header is present, so `careplans.csv` is never mistaken for `conditions.csv`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use crate::schema::Table;
use crate::{Error, Result, line_of};

/// Pseudo-column of `observations`: the raw value, split into `value_numeric` / `value_text` by the reader.
pub const OBS_VALUE: &str = "value";
/// Pseudo-column of `observations`: the value's declared type (`numeric` or `text`).
pub const OBS_VALUE_TYPE: &str = "value_type";

/// How one CSV layout maps onto one canonical table.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvMapping {
    /// The canonical table.
    pub table: Table,
    /// Source header → canonical column (or one of the observation pseudo-columns).
    pub columns: Vec<(String, String)>,
    /// Headers that must be present.
    pub required: Vec<String>,
    /// Headers that may be present and are not read.
    pub ignore: Vec<String>,
}

impl CsvMapping {
    /// True when a CSV with these headers has this layout.
    pub fn matches(&self, headers: &[String]) -> bool {
        let known =
            |h: &String| self.columns.iter().any(|(s, _)| s == h) || self.ignore.contains(h);
        headers.iter().all(known) && self.required.iter().all(|r| headers.contains(r))
    }

    /// The built-in mappings for Synthea's CSV export (plus the MRN/phone/e-mail/note columns the demo adds).
    pub fn synthea() -> Vec<CsvMapping> {
        fn m(
            table: Table,
            cols: &[(&str, &str)],
            required: &[&str],
            ignore: &[&str],
        ) -> CsvMapping {
            CsvMapping {
                table,
                columns: cols
                    .iter()
                    .map(|(s, c)| ((*s).to_owned(), (*c).to_owned()))
                    .collect(),
                required: required.iter().map(|s| (*s).to_owned()).collect(),
                ignore: ignore.iter().map(|s| (*s).to_owned()).collect(),
            }
        }
        vec![
            m(
                Table::Patients,
                &[
                    ("Id", "patient_id"),
                    ("MRN", "mrn"),
                    ("SSN", "national_id"),
                    ("DRIVERS", "drivers_license"),
                    ("PASSPORT", "passport"),
                    ("INSURANCE_ID", "insurance_id"),
                    ("PREFIX", "prefix"),
                    ("FIRST", "first_name"),
                    ("MIDDLE", "middle_name"),
                    ("LAST", "last_name"),
                    ("SUFFIX", "suffix"),
                    ("MAIDEN", "maiden_name"),
                    ("BIRTHDATE", "birth_date"),
                    ("DEATHDATE", "death_date"),
                    ("MARITAL", "marital"),
                    ("RACE", "race"),
                    ("ETHNICITY", "ethnicity"),
                    ("GENDER", "gender"),
                    ("BIRTHPLACE", "birthplace"),
                    ("ADDRESS", "address"),
                    ("CITY", "city"),
                    ("STATE", "state"),
                    ("COUNTY", "county"),
                    ("ZIP", "zip"),
                    ("LAT", "lat"),
                    ("LON", "lon"),
                    ("PHONE", "phone"),
                    ("EMAIL", "email"),
                    ("HEALTHCARE_EXPENSES", "healthcare_expenses"),
                    ("HEALTHCARE_COVERAGE", "healthcare_coverage"),
                    ("INCOME", "income"),
                ],
                &["Id", "BIRTHDATE", "GENDER", "FIRST", "LAST"],
                &["FIPS"],
            ),
            m(
                Table::Encounters,
                &[
                    ("Id", "encounter_id"),
                    ("START", "start"),
                    ("STOP", "stop"),
                    ("PATIENT", "patient_id"),
                    ("ORGANIZATION", "organization_id"),
                    ("PROVIDER", "provider_id"),
                    ("PAYER", "payer_id"),
                    ("DEPARTMENT", "department"),
                    ("ENCOUNTERCLASS", "encounter_class"),
                    ("CODE", "code"),
                    ("DESCRIPTION", "description"),
                    ("BASE_ENCOUNTER_COST", "base_cost"),
                    ("TOTAL_CLAIM_COST", "total_cost"),
                    ("PAYER_COVERAGE", "payer_coverage"),
                    ("REASONCODE", "reason_code"),
                    ("REASONDESCRIPTION", "reason_description"),
                ],
                &["Id", "START", "PATIENT", "ENCOUNTERCLASS"],
                &[],
            ),
            m(
                Table::Conditions,
                &[
                    ("START", "start"),
                    ("STOP", "stop"),
                    ("PATIENT", "patient_id"),
                    ("ENCOUNTER", "encounter_id"),
                    ("CODE", "code"),
                    ("DESCRIPTION", "description"),
                ],
                &["START", "PATIENT", "CODE", "DESCRIPTION"],
                &["SYSTEM"],
            ),
            m(
                Table::Observations,
                &[
                    ("DATE", "date"),
                    ("PATIENT", "patient_id"),
                    ("ENCOUNTER", "encounter_id"),
                    ("CATEGORY", "category"),
                    ("CODE", "code"),
                    ("DESCRIPTION", "description"),
                    ("VALUE", OBS_VALUE),
                    ("UNITS", "units"),
                    ("TYPE", OBS_VALUE_TYPE),
                ],
                &["DATE", "PATIENT", "CODE", "VALUE"],
                &[],
            ),
            m(
                Table::Medications,
                &[
                    ("START", "start"),
                    ("STOP", "stop"),
                    ("PATIENT", "patient_id"),
                    ("PAYER", "payer_id"),
                    ("ENCOUNTER", "encounter_id"),
                    ("CODE", "code"),
                    ("DESCRIPTION", "description"),
                    ("BASE_COST", "base_cost"),
                    ("PAYER_COVERAGE", "payer_coverage"),
                    ("DISPENSES", "dispenses"),
                    ("TOTALCOST", "total_cost"),
                    ("REASONCODE", "reason_code"),
                    ("REASONDESCRIPTION", "reason_description"),
                ],
                &["START", "PATIENT", "CODE", "DISPENSES"],
                &[],
            ),
            m(
                Table::Procedures,
                &[
                    ("START", "start"),
                    ("STOP", "stop"),
                    ("PATIENT", "patient_id"),
                    ("ENCOUNTER", "encounter_id"),
                    ("CODE", "code"),
                    ("DESCRIPTION", "description"),
                    ("BASE_COST", "base_cost"),
                    ("REASONCODE", "reason_code"),
                    ("REASONDESCRIPTION", "reason_description"),
                ],
                &["START", "PATIENT", "CODE", "BASE_COST"],
                &["SYSTEM"],
            ),
            m(
                Table::Notes,
                &[
                    ("Id", "note_id"),
                    ("DATE", "date"),
                    ("PATIENT", "patient_id"),
                    ("ENCOUNTER", "encounter_id"),
                    ("TYPE", "note_type"),
                    ("TEXT", "text"),
                ],
                &["Id", "DATE", "PATIENT", "TEXT"],
                &[],
            ),
        ]
    }

    /// Parses a mapping file. Every named column must exist in its table.
    pub fn parse_file(text: &str, file: &str) -> Result<Vec<CsvMapping>> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            table: Vec<RawTable>,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RawTable {
            table: Spanned<String>,
            #[serde(default)]
            ignore: Vec<String>,
            columns: BTreeMap<String, Spanned<String>>,
        }
        let invalid = |offset: usize, reason: String| Error::Invalid {
            file: file.to_owned(),
            line: line_of(text, offset),
            reason,
        };
        let raw: Raw = toml::from_str(text).map_err(|e| {
            invalid(
                e.span().map(|s| s.start).unwrap_or(0),
                e.message().to_owned(),
            )
        })?;
        let mut out = Vec::new();
        for t in raw.table {
            let table = Table::from_name(t.table.get_ref()).ok_or_else(|| {
                invalid(
                    t.table.span().start,
                    format!("unknown table '{}'", t.table.get_ref()),
                )
            })?;
            let mut columns = Vec::new();
            for (header, column) in t.columns {
                let c = column.get_ref();
                let pseudo =
                    table == Table::Observations && (c == OBS_VALUE || c == OBS_VALUE_TYPE);
                if table.column_index(c).is_none() && !pseudo {
                    return Err(invalid(
                        column.span().start,
                        format!("table {table} has no column '{c}'"),
                    ));
                }
                columns.push((header, c.clone()));
            }
            if !columns.iter().any(|(_, c)| c == crate::schema::PATIENT_REF) {
                return Err(invalid(
                    t.table.span().start,
                    format!("mapping for {table} does not map patient_id"),
                ));
            }
            let required = columns.iter().map(|(h, _)| h.clone()).collect();
            out.push(CsvMapping {
                table,
                columns,
                required,
                ignore: t.ignore,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(s: &str) -> Vec<String> {
        s.split(',').map(str::to_owned).collect()
    }

    #[test]
    fn synthea_layouts_are_recognised_by_header_alone() {
        let maps = CsvMapping::synthea();
        let find = |h: &str| {
            maps.iter()
                .filter(|m| m.matches(&headers(h)))
                .map(|m| m.table)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            find("START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION"),
            vec![Table::Conditions]
        );
        assert_eq!(
            find("DATE,PATIENT,ENCOUNTER,CATEGORY,CODE,DESCRIPTION,VALUE,UNITS,TYPE"),
            vec![Table::Observations]
        );
        // careplans and allergies share columns with conditions but are not conditions.
        assert!(
            find("Id,START,STOP,PATIENT,ENCOUNTER,CODE,DESCRIPTION,REASONCODE,REASONDESCRIPTION")
                .is_empty()
        );
        assert!(
            find("START,STOP,PATIENT,ENCOUNTER,CODE,SYSTEM,DESCRIPTION,TYPE,CATEGORY,REACTION1")
                .is_empty()
        );
    }

    #[test]
    fn mapping_files_are_checked_against_the_model() {
        let ok = "[[table]]\ntable = \"patients\"\n[table.columns]\nPID = \"patient_id\"\nGiven = \"first_name\"\n";
        let maps = CsvMapping::parse_file(ok, "m.toml").expect("valid");
        assert!(maps[0].matches(&headers("PID,Given")));
        let bad = ok.replace("\"first_name\"", "\"firstname\"");
        let e = CsvMapping::parse_file(&bad, "m.toml").expect_err("unknown column");
        assert_eq!(
            e.to_string(),
            "m.toml:5: table patients has no column 'firstname'"
        );
    }
}
