//! National and insurance identifier validation (check digits) and normalisation.

/// The recognised shapes of a national identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdScheme {
    /// UK NHS number: 10 digits, modulus-11 check digit.
    Nhs,
    /// Japanese Individual Number (My Number): 12 digits, modulus-11 check digit.
    MyNumber,
    /// US social security number `ddd-dd-dddd` (no check digit; structure only).
    Ssn,
    /// Anything else: accepted as given, no check possible.
    Other,
}

/// Normalises an identifier (keeps letters and digits, upper case) and validates its check digit.
/// Returns the normalised form and its scheme, or why it is invalid.
pub fn validate_national_id(raw: &str) -> Result<(String, IdScheme), String> {
    let norm: String = raw
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    if norm.is_empty() {
        return Err("national ID is empty".into());
    }
    let digits: Option<Vec<u32>> = norm.chars().map(|c| c.to_digit(10)).collect();
    let trimmed = raw.trim();
    let ssn_shaped =
        trimmed.len() == 11 && trimmed.as_bytes()[3] == b'-' && trimmed.as_bytes()[6] == b'-';
    match digits {
        Some(d) if ssn_shaped && d.len() == 9 => {
            if d[0..3] == [0, 0, 0] || d[3..5] == [0, 0] || d[5..9] == [0, 0, 0, 0] {
                return Err("SSN has an all-zero group".into());
            }
            Ok((norm, IdScheme::Ssn))
        }
        Some(d) if d.len() == 10 => {
            if nhs_check_digit(&d[..9]) == Some(d[9]) {
                Ok((norm, IdScheme::Nhs))
            } else {
                Err("NHS number check digit is invalid".into())
            }
        }
        Some(d) if d.len() == 12 => {
            if my_number_check_digit(&d[..11]) == d[11] {
                Ok((norm, IdScheme::MyNumber))
            } else {
                Err("My Number check digit is invalid".into())
            }
        }
        _ => Ok((norm, IdScheme::Other)),
    }
}

/// The NHS modulus-11 check digit of the first nine digits (`None`: no valid number has them).
pub fn nhs_check_digit(first9: &[u32]) -> Option<u32> {
    let sum: u32 = first9.iter().zip((2..=10).rev()).map(|(d, w)| d * w).sum();
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        c => Some(c),
    }
}

/// The My Number check digit of the first eleven digits.
pub fn my_number_check_digit(first11: &[u32]) -> u32 {
    // Weights run from the digit next to the check digit: q = n + 1 for n ≤ 6, n − 5 for n ≥ 7.
    let sum: u32 = first11
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let n = i as u32 + 1;
            d * if n <= 6 { n + 1 } else { n - 5 }
        })
        .sum();
    match sum % 11 {
        0 | 1 => 0,
        r => 11 - r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_digits() {
        assert_eq!(
            validate_national_id("943 476 5919").map(|v| v.1),
            Ok(IdScheme::Nhs)
        );
        assert!(validate_national_id("943 476 5918").is_err());
        assert_eq!(
            validate_national_id("999-17-5017").map(|v| v.1),
            Ok(IdScheme::Ssn)
        );
        assert!(validate_national_id("999-00-5017").is_err());
        assert_eq!(
            validate_national_id("123456789018").map(|v| v.1),
            Ok(IdScheme::MyNumber)
        );
        assert!(validate_national_id("123456789012").is_err());
        assert_eq!(
            validate_national_id("X53631011X").map(|v| v.1),
            Ok(IdScheme::Other)
        );
    }
}
