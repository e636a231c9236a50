//! `[lifecycle]` configuration: the recycle bin's retention and the background job's pace.
//!
//! Durations are written as a whole number with a unit: `30s`, `15m`, `12h`, `7d`, `2w`
//! (`0` alone means zero).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Default pause between two runs of the lifecycle job.
pub const DEFAULT_JOB_INTERVAL_SECS: u64 = 60;
/// Default lifetime of the job's leader lease (several intervals, so a live leader keeps it).
pub const DEFAULT_LEASE_SECS: u64 = 300;
/// Longest duration accepted (100 years): keeps date arithmetic far from overflow.
pub const MAX_SPAN_SECS: u64 = 100 * 365 * 86_400;

/// A duration in whole seconds, written `7d`, `12h`, `30m`, `45s`, `2w` or `0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Span(pub u64);

impl Span {
    /// The span in seconds.
    pub fn secs(self) -> u64 {
        self.0
    }

    /// As a chrono duration.
    pub fn duration(self) -> chrono::Duration {
        chrono::Duration::seconds(i64::try_from(self.0).unwrap_or(i64::MAX))
    }
}

impl TryFrom<String> for Span {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Span> for String {
    fn from(s: Span) -> String {
        s.to_string()
    }
}

impl std::str::FromStr for Span {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t == "0" {
            return Ok(Span(0));
        }
        let split = t
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration '{s}' needs a unit (s, m, h, d or w)"))?;
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration '{s}' must start with a whole number"))?;
        let mul = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            _ => {
                return Err(format!(
                    "duration '{s}': unknown unit '{unit}' (s, m, h, d, w)"
                ))
            }
        };
        n.checked_mul(mul)
            .filter(|v| *v <= MAX_SPAN_SECS)
            .map(Span)
            .ok_or_else(|| format!("duration '{s}' is longer than 100 years"))
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s == 0 {
            return f.write_str("0");
        }
        for (unit, size) in [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
            if s % size == 0 {
                return write!(f, "{}{unit}", s / size);
            }
        }
        write!(f, "{s}s")
    }
}

/// `[lifecycle]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleConfig {
    /// How long a deleted image stays restorable (`pending_delete`) before its data is removed;
    /// `0` deletes at once, as Glance does by default.
    pub recycle_retention: Span,
    /// Pause between two runs of the lifecycle job (scheduled transitions, recycle bin purge).
    pub job_interval: Span,
    /// Lifetime of the job's leader lease; another node takes over once it lapses.
    pub lease: Span,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            recycle_retention: Span(0),
            job_interval: Span(DEFAULT_JOB_INTERVAL_SECS),
            lease: Span(DEFAULT_LEASE_SECS),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_parse_with_units_and_print_in_the_largest_exact_one() {
        assert_eq!("7d".parse::<Span>().unwrap(), Span(7 * 86_400));
        assert_eq!("0".parse::<Span>().unwrap(), Span(0));
        assert_eq!("90s".parse::<Span>().unwrap().to_string(), "90s");
        assert_eq!("120m".parse::<Span>().unwrap().to_string(), "2h");
        assert_eq!("14d".parse::<Span>().unwrap().to_string(), "2w");
        assert!("7".parse::<Span>().is_err());
        assert!("7y".parse::<Span>().is_err());
        assert!("d".parse::<Span>().is_err());
        assert!("99999999999w".parse::<Span>().is_err());
    }

    #[test]
    fn the_lifecycle_section_reads_from_toml() {
        let c = crate::Config::from_toml("[lifecycle]\nrecycle_retention = \"7d\"\n").unwrap();
        assert_eq!(c.lifecycle.recycle_retention, Span(7 * 86_400));
        assert!(crate::Config::from_toml("[lifecycle]\nrecycle_retention = \"x\"\n").is_err());
        let text = c.to_toml().unwrap();
        assert!(text.contains("recycle_retention = \"1w\""), "{text}");
    }
}
