//! Image lifecycle: active → deprecated → obsolete → retired, with an optional replacement
//! image and scheduled dates, plus the recycle bin ([`recycle`]) and the background job that
//! applies schedules and purges the bin ([`job`]).
//!
//! The state and schedule of an image live in its properties under reserved names
//! ([`crate::catalog::lifecycle::LIFECYCLE_PROPS`]) so that every Glance client sees them and
//! listings can filter on them; users cannot set them with PATCH (403). They change only
//! through [`crate::catalog::lifecycle::LifecycleCatalog::set_lifecycle`], a compare-and-swap
//! on the current state.
//!
//! Semantics: a deprecated image still downloads, with a `Warning: 299` header naming the
//! replacement; an obsolete image refuses downloads to everyone but admins; a retired image is
//! deleted (into the recycle bin when a retention is configured). States only move forward,
//! except that an admin may `undeprecate` an image back to active, which also clears its
//! schedule.

pub mod cli;
pub mod config;
pub mod job;
pub mod recycle;

pub use config::{LifecycleConfig, Span};

use crate::auth::Context;
use crate::catalog::lifecycle::{
    LIFECYCLE_PROPS, PROP_DELETE_AT, PROP_DEPRECATE_AT, PROP_OBSOLETE_AT, PROP_REPLACEMENT,
    PROP_STATE,
};
use crate::error::{RegistryError, Result};
use crate::model::ImageRecord;
use std::fmt;
use std::str::FromStr;

/// Where an image is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LifecycleState {
    /// In use (the default).
    Active,
    /// Still usable, but users are told to move to the replacement.
    Deprecated,
    /// New use refused (downloads only for admins).
    Obsolete,
    /// Deleted.
    Retired,
}

impl LifecycleState {
    /// The name shown in `vmi_lifecycle_state`.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleState::Active => "active",
            LifecycleState::Deprecated => "deprecated",
            LifecycleState::Obsolete => "obsolete",
            LifecycleState::Retired => "retired",
        }
    }
}

impl fmt::Display for LifecycleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LifecycleState {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "active" => Ok(LifecycleState::Active),
            "deprecated" => Ok(LifecycleState::Deprecated),
            "obsolete" => Ok(LifecycleState::Obsolete),
            "retired" => Ok(LifecycleState::Retired),
            _ => Err(format!(
                "invalid lifecycle state '{s}' (active, deprecated, obsolete, retired)"
            )),
        }
    }
}

/// An image's lifecycle state, replacement and schedule, as its properties record them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    /// The current state.
    pub state: LifecycleState,
    /// The image to use instead.
    pub replacement: Option<String>,
    /// When it becomes deprecated.
    pub deprecate_at: Option<String>,
    /// When it becomes obsolete.
    pub obsolete_at: Option<String>,
    /// When it is retired (deleted).
    pub delete_at: Option<String>,
}

impl Lifecycle {
    /// The lifecycle of `img` (an image without lifecycle properties is active).
    pub fn of(img: &ImageRecord) -> Self {
        let p = |k: &str| img.properties.get(k).cloned();
        Lifecycle {
            state: p(PROP_STATE)
                .and_then(|s| s.parse().ok())
                .unwrap_or(LifecycleState::Active),
            replacement: p(PROP_REPLACEMENT),
            deprecate_at: p(PROP_DEPRECATE_AT),
            obsolete_at: p(PROP_OBSOLETE_AT),
            delete_at: p(PROP_DELETE_AT),
        }
    }

    /// The property values to store (`None` removes the property).
    pub fn props(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            (PROP_STATE, Some(self.state.as_str().to_string())),
            (PROP_REPLACEMENT, self.replacement.clone()),
            (PROP_DEPRECATE_AT, self.deprecate_at.clone()),
            (PROP_OBSOLETE_AT, self.obsolete_at.clone()),
            (PROP_DELETE_AT, self.delete_at.clone()),
        ]
    }

    /// The furthest state the schedule has reached at `now` (never behind the current one).
    pub fn due_state(&self, now: &str) -> LifecycleState {
        let reached = |d: &Option<String>| d.as_deref().is_some_and(|d| d <= now);
        let due = if reached(&self.delete_at) {
            LifecycleState::Retired
        } else if reached(&self.obsolete_at) {
            LifecycleState::Obsolete
        } else if reached(&self.deprecate_at) {
            LifecycleState::Deprecated
        } else {
            LifecycleState::Active
        };
        due.max(self.state)
    }

    /// Move to `to`, dropping the dates of the states now reached (they are history).
    pub fn advance(&mut self, to: LifecycleState) {
        self.state = to;
        if to >= LifecycleState::Deprecated {
            self.deprecate_at = None;
        }
        if to >= LifecycleState::Obsolete {
            self.obsolete_at = None;
        }
        if to >= LifecycleState::Retired {
            self.delete_at = None;
        }
    }

    /// Dates must follow the states' order: deprecate ≤ obsolete ≤ delete.
    pub fn check_order(&self) -> Result<()> {
        let dates = [
            (PROP_DEPRECATE_AT, &self.deprecate_at),
            (PROP_OBSOLETE_AT, &self.obsolete_at),
            (PROP_DELETE_AT, &self.delete_at),
        ];
        for (i, (ka, a)) in dates.iter().enumerate() {
            for (kb, b) in dates.iter().skip(i + 1) {
                if let (Some(a), Some(b)) = (a, b) {
                    if a > b {
                        return Err(RegistryError::BadRequest(format!(
                            "{ka} ({a}) must not be later than {kb} ({b})"
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Refuse a user's attempt to set or remove a lifecycle property (server-managed, like
/// Glance's reserved attributes).
pub fn check_user_attr(key: &str) -> Result<()> {
    if LIFECYCLE_PROPS.contains(&key) {
        return Err(RegistryError::Forbidden(format!(
            "Attribute '{key}' is reserved: change it with POST /v2/images/{{id}}/actions/lifecycle"
        )));
    }
    Ok(())
}

/// The download rule: deprecated images download with a warning (returned as the `Warning`
/// header value), obsolete ones only for admins.
pub fn download_warning(ctx: &Context, img: &ImageRecord) -> Result<Option<String>> {
    let lc = Lifecycle::of(img);
    match lc.state {
        LifecycleState::Obsolete | LifecycleState::Retired if !ctx.is_admin() => {
            Err(RegistryError::Forbidden(format!(
                "Image {} is obsolete and can no longer be downloaded{}",
                img.id,
                match &lc.replacement {
                    Some(r) => format!("; use its replacement {r}"),
                    None => String::new(),
                }
            )))
        }
        _ => Ok(state_warning(img)),
    }
}

/// The `Warning` header (RFC 9111 §5.5, code 299) for an image that is no longer active in its
/// lifecycle, naming its replacement: sent with the image's record (`GET /v2/images/{id}`) and
/// its data.
pub fn state_warning(img: &ImageRecord) -> Option<String> {
    let lc = Lifecycle::of(img);
    let instead = lc
        .replacement
        .as_deref()
        .map(|r| format!("; use {r}"))
        .unwrap_or_default();
    let state = match lc.state {
        LifecycleState::Active => return None,
        LifecycleState::Deprecated => "deprecated",
        LifecycleState::Obsolete | LifecycleState::Retired => "obsolete",
    };
    Some(format!("299 - \"image {} is {state}{instead}\"", img.id))
}

/// Parse a client's date (RFC 3339) into the catalog's form.
pub fn parse_date(key: &str, v: &str) -> Result<String> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| crate::clock::format_time(t.with_timezone(&chrono::Utc)))
        .map_err(|_| {
            RegistryError::BadRequest(format!(
                "{key} '{v}' is not an RFC 3339 time such as 2027-01-31T00:00:00Z"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lc() -> Lifecycle {
        Lifecycle {
            state: LifecycleState::Active,
            replacement: None,
            deprecate_at: Some("2026-01-01T00:00:00Z".into()),
            obsolete_at: Some("2026-02-01T00:00:00Z".into()),
            delete_at: Some("2026-03-01T00:00:00Z".into()),
        }
    }

    #[test]
    fn the_due_state_is_the_furthest_date_reached() {
        let l = lc();
        assert_eq!(l.due_state("2025-12-31T00:00:00Z"), LifecycleState::Active);
        assert_eq!(
            l.due_state("2026-01-01T00:00:00Z"),
            LifecycleState::Deprecated
        );
        assert_eq!(
            l.due_state("2026-02-15T00:00:00Z"),
            LifecycleState::Obsolete
        );
        assert_eq!(l.due_state("2027-01-01T00:00:00Z"), LifecycleState::Retired);
    }

    #[test]
    fn dates_out_of_order_are_refused() {
        let mut l = lc();
        assert!(l.check_order().is_ok());
        l.deprecate_at = Some("2026-04-01T00:00:00Z".into());
        assert!(l.check_order().is_err());
    }

    #[test]
    fn advancing_drops_the_dates_of_reached_states() {
        let mut l = lc();
        l.advance(LifecycleState::Obsolete);
        assert_eq!((l.deprecate_at, l.obsolete_at), (None, None));
        assert!(l.delete_at.is_some());
    }

    #[test]
    fn obsolete_images_download_only_for_admins_and_deprecated_ones_warn() {
        let mut img = ImageRecord::new("i".into(), "p".into(), "t".into());
        img.properties
            .insert(PROP_STATE.into(), "deprecated".into());
        img.properties.insert(PROP_REPLACEMENT.into(), "r".into());
        let member = Context::for_tests("p", crate::model::Role::Member);
        let admin = Context::for_tests("p", crate::model::Role::Admin);
        let w = download_warning(&member, &img).unwrap().unwrap();
        assert_eq!(w, "299 - \"image i is deprecated; use r\"");
        img.properties.insert(PROP_STATE.into(), "obsolete".into());
        let e = download_warning(&member, &img).unwrap_err();
        assert!(e.to_string().contains("replacement r"), "{e}");
        assert!(download_warning(&admin, &img).unwrap().is_some());
    }
}
