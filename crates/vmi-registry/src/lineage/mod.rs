//! Image families, versions, lineage and templates (vmi extensions to the Glance model).
//!
//! - **Families and versions.** The user-settable properties [`FAMILY_PROP`], [`VERSION_PROP`],
//!   [`EXCLUDE_PROP`] and [`TEMPLATE_PROP`] are ordinary image properties (Glance clients set and
//!   filter them with `--property`), validated by [`check_image_update`] on create and PATCH:
//!   family names follow GCP's image family rules, versions are semantic or calendar versions
//!   ([`version`]), a version is unique within one owner's family, and family and version freeze
//!   once the image has data. [`newest_first`] and [`latest`] are the one place that orders a
//!   family and resolves its latest image.
//! - **Lineage.** What an image was derived from (parent, the parent's digests at that moment,
//!   the relation and a build record) is server-managed state in the catalog's
//!   `image_lineage` table ([`crate::catalog::lineage::LineageCatalog`]), mirrored into the
//!   reserved, read-only properties [`PARENT_PROP`] and [`DERIVATION_PROP`] so that Glance clients
//!   see it and can list an image's children with `?vmi_parent_id=ID`.
//! - **Templates.** An active image with `template=true` can be derived from
//!   (`POST /v2/images/{id}/actions/derive`); see [`crate::api::lineage`].

pub mod version;

use crate::auth::Context;
use crate::catalog::{ImageQuery, Viewer};
use crate::error::{RegistryError, Result};
use crate::model::{ImageRecord, Status};
use crate::server::App;
use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
pub use version::Version;

/// The property naming an image's family.
pub const FAMILY_PROP: &str = "family";
/// The property holding an image's version within its family.
pub const VERSION_PROP: &str = "version";
/// `true` keeps an image from being resolved as its family's latest (Azure Compute Gallery's
/// `excludeFromLatest`).
pub const EXCLUDE_PROP: &str = "exclude_from_latest";
/// `true` marks an active image as a template (golden image) that others derive from.
pub const TEMPLATE_PROP: &str = "template";
/// Reserved, server-set: the parent image id from the lineage record.
pub const PARENT_PROP: &str = "vmi_parent_id";
/// Reserved, server-set: the relation to the parent from the lineage record.
pub const DERIVATION_PROP: &str = "vmi_derivation";
/// Properties only the server sets; create and PATCH that touch them get 403.
pub const RESERVED_PROPS: [&str; 2] = [PARENT_PROP, DERIVATION_PROP];
/// The lifecycle state property the lifecycle feature maintains.
pub const LIFECYCLE_PROP: &str = "vmi_lifecycle_state";
/// Lifecycle states that keep an image from being a family's latest.
const LIFECYCLE_EXCLUDED: [&str; 3] = ["deprecated", "obsolete", "retired"];
/// Lifecycle states that refuse new use (no derivation from them).
const LIFECYCLE_REFUSED: [&str; 2] = ["obsolete", "retired"];
/// GCP's limit on image family names.
pub const MAX_FAMILY_LEN: usize = 63;
/// Largest build record (serialized JSON) stored with a lineage record.
pub const MAX_BUILD_RECORD: usize = 16 * 1024;
/// Ancestors returned by default by `GET …/lineage`.
pub const DEFAULT_DEPTH: u32 = 16;
/// Most ancestors one `GET …/lineage` walks.
pub const MAX_DEPTH: u32 = 64;
/// Most parent links followed when checking a new link for a cycle; deeper chains are refused.
pub const MAX_CYCLE_WALK: u32 = 4096;
/// Most images one family query considers (per owner).
pub const MAX_FAMILY_SIZE: u32 = 10_000;
/// Most families one `GET /v2/families` lists.
pub const MAX_FAMILIES: u32 = 1000;
/// Families on one page of `GET /v2/families` when the request gives no `limit`.
pub const DEFAULT_FAMILY_PAGE: u32 = 100;

/// How an image was made from its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relation {
    /// A snapshot of a running instance of the parent.
    Snapshot,
    /// A copy of the parent's data.
    Clone,
    /// Rebuilt from the parent's build recipe.
    Rebuild,
    /// Imported from the parent (another registry or format).
    Import,
    /// The parent's data converted to another format.
    Conversion,
    /// Derived from a template with `actions/derive`.
    Derive,
}

impl Relation {
    /// Every relation.
    pub const ALL: [Relation; 6] = [
        Relation::Snapshot,
        Relation::Clone,
        Relation::Rebuild,
        Relation::Import,
        Relation::Conversion,
        Relation::Derive,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Relation::Snapshot => "snapshot",
            Relation::Clone => "clone",
            Relation::Rebuild => "rebuild",
            Relation::Import => "import",
            Relation::Conversion => "conversion",
            Relation::Derive => "derive",
        }
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Relation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Relation::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "invalid relation '{s}' (one of snapshot, clone, rebuild, import, \
                     conversion, derive)"
                )
            })
    }
}

/// One image's lineage: which image it was derived from, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LineageRecord {
    /// The derived image.
    pub image_id: String,
    /// The image it was derived from.
    pub parent_id: String,
    /// The parent's SHA-256 when the link was recorded.
    pub parent_sha256: Option<String>,
    /// The parent's `os_hash_value` (SHA-512) when the link was recorded.
    pub parent_os_hash_value: Option<String>,
    /// How.
    pub relation: Relation,
    /// The client's build record (tool, source spec, …), serialized JSON; bounded by
    /// [`MAX_BUILD_RECORD`].
    pub build: Option<String>,
    /// User id of who recorded it.
    pub recorded_by: String,
    /// Project id of who recorded it.
    pub recorded_project: String,
    /// When.
    pub recorded_at: String,
}

/// Whether the lifecycle state keeps `img` from being its family's latest (deprecated,
/// obsolete or retired). The lifecycle feature sets [`LIFECYCLE_PROP`].
pub fn excluded_by_lifecycle(img: &ImageRecord) -> bool {
    img.properties
        .get(LIFECYCLE_PROP)
        .is_some_and(|s| LIFECYCLE_EXCLUDED.contains(&s.as_str()))
}

/// Whether the lifecycle state refuses new use of `img` (obsolete or retired).
pub fn refused_by_lifecycle(img: &ImageRecord) -> bool {
    img.properties
        .get(LIFECYCLE_PROP)
        .is_some_and(|s| LIFECYCLE_REFUSED.contains(&s.as_str()))
}

/// Whether boolean property `key` is set to true.
pub fn flag(img: &ImageRecord, key: &str) -> bool {
    img.properties
        .get(key)
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The image's parsed version, if it has a valid one.
pub fn version_of(img: &ImageRecord) -> Option<Version> {
    img.properties
        .get(VERSION_PROP)
        .and_then(|v| Version::parse(v).ok())
}

/// Check a family name: 1 to 63 characters from `[a-z0-9._-]`, starting with a letter or digit.
pub fn check_family(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= MAX_FAMILY_LEN
        && s.bytes().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-._".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadRequest(format!(
            "invalid family '{s}': use 1 to {MAX_FAMILY_LEN} lowercase letters, digits, '-', \
             '.' or '_', starting with a letter or digit"
        )))
    }
}

/// Order a family newest first: by version (SemVer precedence, dates by day), images without a
/// version after every versioned one, then newest created first, then id.
pub fn newest_first(imgs: &mut [ImageRecord]) {
    let mut keyed: Vec<(Option<Version>, ImageRecord)> =
        imgs.iter().map(|i| (version_of(i), i.clone())).collect();
    keyed.sort_by(|(va, a), (vb, b)| {
        let by_version = match (va, vb) {
            (Some(x), Some(y)) => y.cmp(x),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        by_version
            .then_with(|| b.created_at.cmp(&a.created_at))
            .then_with(|| b.id.cmp(&a.id))
    });
    for (slot, (_, img)) in imgs.iter_mut().zip(keyed) {
        *slot = img;
    }
}

/// Whether `img` may be resolved as its family's latest: active, not excluded from latest, and
/// not deprecated, obsolete or retired.
pub fn eligible_for_latest(img: &ImageRecord) -> bool {
    img.status == Status::Active && !flag(img, EXCLUDE_PROP) && !excluded_by_lifecycle(img)
}

/// The latest of a family already ordered by [`newest_first`].
pub fn latest(ordered: &[ImageRecord]) -> Option<&ImageRecord> {
    ordered.iter().find(|i| eligible_for_latest(i))
}

/// Refuse anything that would change the data of an image that has data: only a `queued` image
/// accepts uploads, staging or upload sessions. Active images are immutable.
pub fn check_data_mutable(img: &ImageRecord) -> Result<()> {
    if img.status == Status::Queued {
        return Ok(());
    }
    Err(RegistryError::Conflict(format!(
        "Image status transition from {} to saving is not allowed: the data of an image \
         never changes once stored",
        img.status
    )))
}

fn check_bool(img: &ImageRecord, key: &str) -> Result<()> {
    match img.properties.get(key) {
        Some(v) if !v.eq_ignore_ascii_case("true") && !v.eq_ignore_ascii_case("false") => Err(
            RegistryError::BadRequest(format!("property {key} must be true or false, not '{v}'")),
        ),
        _ => Ok(()),
    }
}

/// The create/PATCH hook: validate the family, version, template and exclusion properties of
/// `img` (`before` is the stored image on PATCH, `None` on create) and refuse changes to the
/// reserved lineage properties.
///
/// Errors: 400 for malformed values, 403 for reserved properties, for changing family or
/// version once the image has data, and for marking a non-active image a template; 409 when the
/// owner's family already has this version in a non-deleted image.
pub async fn check_image_update(
    app: &App,
    _ctx: &Context,
    before: Option<&ImageRecord>,
    img: &ImageRecord,
) -> Result<()> {
    let prop = |i: Option<&ImageRecord>, k: &str| i.and_then(|i| i.properties.get(k).cloned());
    for k in RESERVED_PROPS {
        if prop(before, k) != prop(Some(img), k) {
            return Err(RegistryError::Forbidden(format!(
                "Attribute '{k}' is reserved: it is set by POST /v2/images/{{id}}/lineage"
            )));
        }
    }
    check_bool(img, EXCLUDE_PROP)?;
    check_bool(img, TEMPLATE_PROP)?;
    let family = img.properties.get(FAMILY_PROP);
    if let Some(f) = family {
        check_family(f)?;
    }
    let version = match img.properties.get(VERSION_PROP) {
        Some(v) => Some(Version::parse(v).map_err(RegistryError::BadRequest)?),
        None => None,
    };
    if version.is_some() && family.is_none() {
        return Err(RegistryError::BadRequest(format!(
            "property {VERSION_PROP} needs property {FAMILY_PROP}"
        )));
    }
    let changed = |k: &str| prop(before, k) != prop(Some(img), k);
    if let Some(b) = before {
        let has_data =
            matches!(b.status, Status::Active | Status::Deactivated) || b.location.is_some();
        if has_data && (changed(FAMILY_PROP) || changed(VERSION_PROP)) {
            return Err(RegistryError::Forbidden(format!(
                "The family and version of image {} cannot change once it has data",
                img.id
            )));
        }
    }
    if flag(img, TEMPLATE_PROP)
        && !before.is_some_and(|b| flag(b, TEMPLATE_PROP))
        && img.status != Status::Active
    {
        return Err(RegistryError::Forbidden(format!(
            "Only an active image can be marked a template; image {} is {}",
            img.id, img.status
        )));
    }
    let moved = before.is_none_or(|b| b.owner != img.owner);
    if let (Some(f), Some(v)) = (family, &version) {
        if moved || changed(FAMILY_PROP) || changed(VERSION_PROP) {
            let mut q = ImageQuery::new(Viewer::Admin);
            q.filters = vec![crate::catalog::Filter {
                field: crate::catalog::Field::Owner,
                cmp: crate::catalog::Cmp::Eq,
                value: img.owner.clone(),
            }];
            q.properties = vec![(FAMILY_PROP.to_string(), f.clone())];
            q.os_hidden = None;
            q.limit = MAX_FAMILY_SIZE;
            let same = app.catalog.list_images(&q).await?;
            if let Some(other) = same
                .iter()
                .find(|o| o.id != img.id && version_of(o).as_ref() == Some(v))
            {
                return Err(RegistryError::Conflict(format!(
                    "Version {v} of family {f} already exists in project {}: image {}",
                    img.owner, other.id
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(id: &str, version: Option<&str>, created: &str) -> ImageRecord {
        let mut i = ImageRecord::new(id.into(), "p".into(), created.into());
        i.status = Status::Active;
        i.properties.insert(FAMILY_PROP.into(), "f".into());
        if let Some(v) = version {
            i.properties.insert(VERSION_PROP.into(), v.into());
        }
        i
    }

    #[test]
    fn family_names_follow_gcp_rules() {
        assert!(check_family("ubuntu-22.04-web").is_ok());
        assert!(check_family("a_b").is_ok());
        for bad in ["", "Ubuntu", "-x", "a b", "ä", &"a".repeat(64)] {
            assert!(check_family(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn newest_first_puts_unversioned_images_last_and_latest_skips_ineligible_ones() {
        let mut v = vec![
            img("a", Some("1.0.0"), "2020-01-01T00:00:00Z"),
            img("b", None, "2030-01-01T00:00:00Z"),
            img("c", Some("1.1.0-rc.1"), "2020-01-02T00:00:00Z"),
            img("d", Some("1.0.1"), "2020-01-01T00:00:00Z"),
        ];
        newest_first(&mut v);
        let ids: Vec<&str> = v.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["c", "d", "a", "b"]);
        v[0].properties
            .insert(LIFECYCLE_PROP.into(), "deprecated".into());
        v[1].properties.insert(EXCLUDE_PROP.into(), "True".into());
        assert_eq!(latest(&v).map(|i| i.id.as_str()), Some("a"));
    }

    #[test]
    fn only_queued_images_accept_data() {
        let mut i = img("a", None, "t");
        assert!(check_data_mutable(&i).is_err());
        i.status = Status::Deactivated;
        assert!(check_data_mutable(&i).is_err());
        i.status = Status::Queued;
        assert!(check_data_mutable(&i).is_ok());
    }

    #[test]
    fn relations_round_trip() {
        for r in Relation::ALL {
            assert_eq!(r.as_str().parse::<Relation>(), Ok(r));
        }
        assert!("fork".parse::<Relation>().is_err());
    }
}
