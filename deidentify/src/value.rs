//! Source values and the parsing of export text into them (dates, timestamps, numbers).

use chrono::{DateTime, NaiveDate, NaiveDateTime};
use policies::ColumnType;

/// One parsed source value. Identifiable: it exists only inside the de-identification pipeline.
#[derive(Clone, PartialEq)]
pub enum Value {
    /// Text.
    Text(String),
    /// A date.
    Date(NaiveDate),
    /// A UTC date-time.
    Timestamp(NaiveDateTime),
    /// A float.
    Float(f64),
    /// An integer.
    Int(i64),
}

impl Value {
    /// The text, if this is text.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    /// The calendar date of a date or timestamp.
    pub fn as_date(&self) -> Option<NaiveDate> {
        match self {
            Value::Date(d) => Some(*d),
            Value::Timestamp(t) => Some(t.date()),
            _ => None,
        }
    }
}

/// Parses `text` as a value of type `ty`. Empty text is `Ok(None)`. Errors never quote the value: they
/// end up in the plaintext ingest report, the value only in the encrypted quarantine.
pub fn parse_value(text: &str, ty: ColumnType) -> Result<Option<Value>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let v = match ty {
        ColumnType::Text => Value::Text(t.to_owned()),
        ColumnType::Date => Value::Date(parse_date(t).ok_or("not a valid date")?),
        ColumnType::Timestamp => {
            Value::Timestamp(parse_timestamp(t).ok_or("not a valid date-time")?)
        }
        ColumnType::Float => {
            let f: f64 = t.parse().map_err(|_| "not a number")?;
            if !f.is_finite() {
                return Err("not a finite number".into());
            }
            Value::Float(f)
        }
        ColumnType::Int => Value::Int(t.parse().map_err(|_| "not an integer")?),
    };
    Ok(Some(v))
}

/// A date in ISO form (`2023-01-27`), or the date part of a date-time.
pub fn parse_date(t: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(t, "%Y-%m-%d")
        .ok()
        .or_else(|| parse_timestamp(t).map(|ts| ts.date()))
}

/// An ISO date-time with or without offset (normalised to UTC), or a bare date (midnight).
pub fn parse_timestamp(t: &str) -> Option<NaiveDateTime> {
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Some(dt.naive_utc());
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(t, fmt) {
            return Some(dt);
        }
    }
    NaiveDate::parse_from_str(t, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_export_formats() {
        let ts = parse_timestamp("1989-10-04T02:25:16-04:00").expect("offset");
        assert_eq!(ts.to_string(), "1989-10-04 06:25:16");
        assert_eq!(
            parse_timestamp("2023-01-27T16:17:47Z")
                .expect("z")
                .to_string(),
            "2023-01-27 16:17:47"
        );
        assert_eq!(
            parse_date("2023-01-27T23:30:00Z"),
            NaiveDate::from_ymd_opt(2023, 1, 27)
        );
        assert!(parse_value("2023-13-45", ColumnType::Date).is_err());
        assert!(matches!(parse_value("  ", ColumnType::Float), Ok(None)));
        assert!(parse_value("NaN", ColumnType::Float).is_err());
    }
}
