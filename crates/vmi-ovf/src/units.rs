//! Allocation units as OVF writes them: DSP0004 programmatic units (`byte * 2^30`, `byte*10^3`,
//! `hertz * 10^6`) and the older names VMware and VirtualBox wrote (`MegaBytes`, `GigaBytes`, `MB`).

use crate::error::{OvfError, Result};

/// Multiplier in bytes for a byte unit string; `None` or empty means bytes.
pub fn byte_multiplier(units: Option<&str>) -> Result<u64> {
    let Some(u) = units.map(str::trim).filter(|u| !u.is_empty()) else {
        return Ok(1);
    };
    let compact: String = u.chars().filter(|c| !c.is_whitespace()).collect();
    let lower = compact.to_ascii_lowercase();
    let named = match lower.as_str() {
        "byte" | "bytes" | "b" => Some(1),
        "kilobytes" | "kb" | "kib" => Some(1 << 10),
        "megabytes" | "mb" | "mib" => Some(1 << 20),
        "gigabytes" | "gb" | "gib" => Some(1 << 30),
        "terabytes" | "tb" | "tib" => Some(1 << 40),
        _ => None,
    };
    if let Some(m) = named {
        return Ok(m);
    }
    // DSP0004 Annex C.1: "byte" followed by "*" factors "base^exp" (and optional "/" divisors,
    // which OVF capacities never use).
    let Some(rest) = lower.strip_prefix("byte") else {
        return Err(OvfError::Invalid(format!("unknown allocation unit '{u}'")));
    };
    let mut mult: u64 = 1;
    for factor in rest.split('*').skip(1) {
        let (base, exp) = factor
            .split_once('^')
            .ok_or_else(|| OvfError::Invalid(format!("allocation unit '{u}': '{factor}'")))?;
        let base: u64 = base
            .parse()
            .map_err(|_| OvfError::Invalid(format!("allocation unit '{u}': base '{base}'")))?;
        let exp: u32 = exp
            .parse()
            .map_err(|_| OvfError::Invalid(format!("allocation unit '{u}': exponent '{exp}'")))?;
        let f = base
            .checked_pow(exp)
            .ok_or_else(|| OvfError::Invalid(format!("allocation unit '{u}' overflows")))?;
        mult = mult
            .checked_mul(f)
            .ok_or_else(|| OvfError::Invalid(format!("allocation unit '{u}' overflows")))?;
    }
    if !rest.is_empty() && !rest.starts_with('*') {
        return Err(OvfError::Invalid(format!("unknown allocation unit '{u}'")));
    }
    Ok(mult)
}

/// `quantity × unit` in bytes, checked.
pub fn to_bytes(quantity: &str, units: Option<&str>) -> Result<u64> {
    let q: u64 = quantity
        .trim()
        .parse()
        .map_err(|_| OvfError::Invalid(format!("quantity '{quantity}' is not a whole number")))?;
    q.checked_mul(byte_multiplier(units)?)
        .ok_or_else(|| OvfError::Invalid(format!("quantity {quantity} × {units:?} overflows")))
}

/// The unit string vmi writes for a capacity: the largest power of 2^10 that divides it.
pub fn best_unit(bytes: u64) -> (u64, &'static str) {
    for (shift, name) in [
        (30u32, "byte * 2^30"),
        (20, "byte * 2^20"),
        (10, "byte * 2^10"),
    ] {
        if bytes != 0 && bytes % (1u64 << shift) == 0 {
            return (bytes >> shift, name);
        }
    }
    (bytes, "byte")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programmatic_units_multiply_out() {
        assert_eq!(byte_multiplier(Some("byte * 2^30")).unwrap(), 1 << 30);
        assert_eq!(byte_multiplier(Some("byte*2^20")).unwrap(), 1 << 20);
        assert_eq!(byte_multiplier(Some("byte * 10^3")).unwrap(), 1000);
        assert_eq!(byte_multiplier(None).unwrap(), 1);
    }

    #[test]
    fn legacy_unit_names_are_understood() {
        assert_eq!(byte_multiplier(Some("MegaBytes")).unwrap(), 1 << 20);
        assert_eq!(byte_multiplier(Some("GigaBytes")).unwrap(), 1 << 30);
        assert_eq!(byte_multiplier(Some("KB")).unwrap(), 1 << 10);
    }

    #[test]
    fn bad_units_and_overflow_are_errors() {
        assert!(byte_multiplier(Some("furlongs")).is_err());
        assert!(byte_multiplier(Some("byte * 2^99")).is_err());
        assert!(to_bytes("18446744073709551615", Some("byte * 2^10")).is_err());
        assert!(to_bytes("-1", None).is_err());
    }

    #[test]
    fn best_unit_picks_the_largest_exact_power() {
        assert_eq!(best_unit(8 << 30), (8, "byte * 2^30"));
        assert_eq!(best_unit(3 << 20), (3, "byte * 2^20"));
        assert_eq!(best_unit(513), (513, "byte"));
    }
}
