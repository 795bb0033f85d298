//! The canonical clinical data model every provider export is mapped onto.
//!
//! One dataset holds up to seven tables. Each table has a fixed list of *source* columns (what a reader
//! produces from an export, identifiers included); a profile then says, per source column, what the
//! de-identified output keeps of it. Every table except `patients` refers to its patient through
//! `patient_id`, which the pipeline always replaces by the keyed `person_id` (the privacy unit).

use std::fmt;

/// The value type of a canonical source column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// UTF-8 text.
    Text,
    /// A calendar date.
    Date,
    /// A date and time (normalised to UTC).
    Timestamp,
    /// A 64-bit float.
    Float,
    /// A 64-bit integer.
    Int,
}

impl ColumnType {
    /// True for the types a date action (`date_shift`, `generalize` to year/month) applies to.
    pub fn is_temporal(self) -> bool {
        matches!(self, ColumnType::Date | ColumnType::Timestamp)
    }

    /// True for the numeric types DP bounds apply to.
    pub fn is_numeric(self) -> bool {
        matches!(self, ColumnType::Float | ColumnType::Int)
    }
}

/// One canonical table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// One row per patient: demographics and direct identifiers.
    Patients,
    /// Visits and admissions.
    Encounters,
    /// Diagnoses (SNOMED CT).
    Conditions,
    /// Labs and vitals (LOINC), numeric or coded values.
    Observations,
    /// Prescriptions (RxNorm).
    Medications,
    /// Procedures (SNOMED CT).
    Procedures,
    /// Free-text clinical notes.
    Notes,
}

impl Table {
    /// Every table, patients first (the order the pipeline processes them in).
    pub const ALL: [Table; 7] = [
        Table::Patients,
        Table::Encounters,
        Table::Conditions,
        Table::Observations,
        Table::Medications,
        Table::Procedures,
        Table::Notes,
    ];

    /// The canonical (and output) table name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Patients => "patients",
            Table::Encounters => "encounters",
            Table::Conditions => "conditions",
            Table::Observations => "observations",
            Table::Medications => "medications",
            Table::Procedures => "procedures",
            Table::Notes => "notes",
        }
    }

    /// The table with this canonical name.
    pub fn from_name(name: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The source columns of this table, in order.
    pub fn columns(self) -> &'static [ColumnDef] {
        use ColumnType::*;
        macro_rules! cols {
            ($($name:literal : $ty:ident),* $(,)?) => { &[$(ColumnDef { name: $name, ty: $ty }),*] };
        }
        match self {
            Table::Patients => cols![
                "patient_id": Text, "mrn": Text, "national_id": Text, "drivers_license": Text,
                "passport": Text, "insurance_id": Text, "prefix": Text, "first_name": Text,
                "middle_name": Text, "last_name": Text, "suffix": Text, "maiden_name": Text,
                "birth_date": Date, "death_date": Date, "marital": Text, "race": Text,
                "ethnicity": Text, "gender": Text, "birthplace": Text, "address": Text, "city": Text,
                "state": Text, "county": Text, "zip": Text, "lat": Float, "lon": Float,
                "phone": Text, "email": Text, "healthcare_expenses": Float,
                "healthcare_coverage": Float, "income": Float,
            ],
            Table::Encounters => cols![
                "encounter_id": Text, "patient_id": Text, "start": Timestamp, "stop": Timestamp,
                "organization_id": Text, "provider_id": Text, "payer_id": Text, "department": Text,
                "encounter_class": Text, "code": Text, "description": Text, "base_cost": Float,
                "total_cost": Float, "payer_coverage": Float, "reason_code": Text,
                "reason_description": Text, "length_of_stay_days": Float,
            ],
            Table::Conditions => cols![
                "patient_id": Text, "encounter_id": Text, "start": Date, "stop": Date,
                "code": Text, "description": Text,
            ],
            Table::Observations => cols![
                "patient_id": Text, "encounter_id": Text, "date": Timestamp, "category": Text,
                "code": Text, "description": Text, "value_numeric": Float, "value_text": Text,
                "units": Text,
            ],
            Table::Medications => cols![
                "patient_id": Text, "encounter_id": Text, "payer_id": Text, "start": Timestamp,
                "stop": Timestamp, "code": Text, "description": Text, "base_cost": Float,
                "payer_coverage": Float, "dispenses": Int, "total_cost": Float,
                "reason_code": Text, "reason_description": Text,
            ],
            Table::Procedures => cols![
                "patient_id": Text, "encounter_id": Text, "start": Timestamp, "stop": Timestamp,
                "code": Text, "description": Text, "base_cost": Float, "reason_code": Text,
                "reason_description": Text,
            ],
            Table::Notes => cols![
                "note_id": Text, "patient_id": Text, "encounter_id": Text, "date": Timestamp,
                "note_type": Text, "text": Text,
            ],
        }
    }

    /// The position of a source column in [`Table::columns`].
    pub fn column_index(self, name: &str) -> Option<usize> {
        self.columns().iter().position(|c| c.name == name)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One canonical source column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnDef {
    /// Canonical name.
    pub name: &'static str,
    /// Source value type.
    pub ty: ColumnType,
}

/// Derived by the reader, never mapped from a source column: `encounters.length_of_stay_days` is
/// `(stop − start)` in days, computed before any date is shifted or generalised (a duration is not a date).
pub const LENGTH_OF_STAY: &str = "length_of_stay_days";

/// The column every non-patient table uses to point at its patient.
pub const PATIENT_REF: &str = "patient_id";
/// The output column holding the keyed pseudonym of the patient: the privacy unit.
pub const PERSON_ID: &str = "person_id";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_refers_to_its_patient_and_names_round_trip() {
        for t in Table::ALL {
            assert!(
                t.column_index(PATIENT_REF).is_some(),
                "{t} lacks {PATIENT_REF}"
            );
            assert_eq!(Table::from_name(t.name()), Some(t));
            let mut names: Vec<_> = t.columns().iter().map(|c| c.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), t.columns().len(), "{t} has a duplicate column");
        }
    }
}
