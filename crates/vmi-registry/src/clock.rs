//! The registry's notion of "now", replaceable in tests.
//!
//! Everything that compares times (token expiry, scheduled lifecycle transitions, retention) asks
//! [`App::clock`](crate::App) rather than the system clock, so tests can move time forward
//! deterministically with [`ManualClock`].

use chrono::{DateTime, Utc};
use std::sync::Mutex;

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> DateTime<Utc>;

    /// The current instant in Glance's `YYYY-MM-DDTHH:MM:SSZ` form (sorts as text).
    fn now_string(&self) -> String {
        format_time(self.now())
    }
}

/// Format an instant the way the catalog stores timestamps.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock {
            now: Mutex::new(start),
        }
    }

    /// Set the time.
    pub fn set(&self, t: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    /// Move the time forward (or back, with a negative duration).
    pub fn advance(&self, d: chrono::Duration) {
        let mut g = self.now.lock().unwrap_or_else(|p| p.into_inner());
        *g += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap();
        let c = ManualClock::new(start);
        assert_eq!(c.now_string(), "2026-01-02T03:04:05Z");
        c.advance(chrono::Duration::days(1));
        assert_eq!(c.now_string(), "2026-01-03T03:04:05Z");
    }
}
