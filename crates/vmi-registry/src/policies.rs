//! Operator policies over images (not to be confused with [`crate::policy`], Glance's
//! authorisation rules): a naming convention, required metadata and retention per family.
//!
//! They come from the `[policies]` section of the configuration, with a default for every
//! project and overrides in `[policies.projects.<project name or id>]`:
//!
//! - **Naming**: a regular expression the image name must match, checked when an image is
//!   created and when its name changes (400 naming the rule). An empty rule disables the
//!   default for a project.
//! - **Required metadata**: property names that must be present, each optionally with a
//!   regular expression or a list of allowed values; checked when an image becomes active (its
//!   upload completes) and on every PATCH of an active image (400 naming each missing or invalid
//!   property).
//! - **Retention** per family (the `family` property): keep the newest `keep_newest` versions
//!   and/or those younger than `max_age_days`; the others are reported by the dry run and moved
//!   to the recycle bin by the apply. Versions are ordered by the families' one order,
//!   [`crate::lineage::newest_first`] (semantic or calendar version, then creation time).
//!
//! Regular expressions are unanchored (use `^…$` to match the whole value).

use crate::catalog::{Cmp, Field, Filter, ImageQuery, Viewer};
use crate::error::{RegistryError, Result};
use crate::model::{ImageRecord, Status};
use crate::server::App;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};

/// Most images one retention report or apply considers per family.
pub const MAX_FAMILY_IMAGES: usize = 10_000;
/// Largest compiled size of an operator's regular expression.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Retention for the versions of one family.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Keep this many of the newest versions.
    pub keep_newest: Option<u32>,
    /// Keep versions younger than this many days.
    pub max_age_days: Option<u32>,
}

/// One required property.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PropertyRule {
    /// A regular expression the value must match.
    pub regex: Option<String>,
    /// The allowed values.
    #[serde(rename = "enum")]
    pub allowed: Option<Vec<String>>,
}

/// One project's overrides; unset fields fall back to the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectPolicies {
    /// Naming rule (empty: none).
    pub naming: Option<String>,
    /// Retention.
    pub retention: Option<RetentionPolicy>,
    /// Required metadata (replaces the default set).
    pub required_metadata: Option<BTreeMap<String, PropertyRule>>,
}

/// `[policies]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoliciesConfig {
    /// Default naming rule for image names.
    pub naming: Option<String>,
    /// Default retention.
    pub retention: RetentionPolicy,
    /// Default required metadata.
    pub required_metadata: BTreeMap<String, PropertyRule>,
    /// Overrides per project (by name or id).
    pub projects: BTreeMap<String, ProjectPolicies>,
}

/// The policies that apply to one project.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective<'a> {
    /// The project, as named in messages.
    pub project: String,
    /// Naming rule.
    pub naming: Option<&'a str>,
    /// Retention.
    pub retention: &'a RetentionPolicy,
    /// Required metadata.
    pub required: &'a BTreeMap<String, PropertyRule>,
}

impl PoliciesConfig {
    /// The policies of the project with this id and name.
    pub fn for_project(&self, id: &str, name: Option<&str>) -> Effective<'_> {
        let over = self
            .projects
            .get(id)
            .or_else(|| name.and_then(|n| self.projects.get(n)));
        Effective {
            project: name.unwrap_or(id).to_string(),
            naming: over
                .and_then(|o| o.naming.as_deref())
                .or(self.naming.as_deref())
                .filter(|r| !r.is_empty()),
            retention: over
                .and_then(|o| o.retention.as_ref())
                .unwrap_or(&self.retention),
            required: over
                .and_then(|o| o.required_metadata.as_ref())
                .unwrap_or(&self.required_metadata),
        }
    }

    /// Compile every regular expression, so a bad one fails at start rather than per request.
    pub fn validate(&self) -> Result<()> {
        let rules = |m: &BTreeMap<String, PropertyRule>| -> Vec<String> {
            m.values().filter_map(|r| r.regex.clone()).collect()
        };
        let mut all: Vec<String> = self.naming.iter().cloned().collect();
        all.extend(rules(&self.required_metadata));
        for p in self.projects.values() {
            all.extend(p.naming.iter().cloned());
            if let Some(m) = &p.required_metadata {
                all.extend(rules(m));
            }
        }
        for r in all.iter().filter(|r| !r.is_empty()) {
            compiled(r)?;
        }
        Ok(())
    }
}

/// The compiled form of an operator's regular expression (cached: the set is the config's).
fn compiled(rule: &str) -> Result<Regex> {
    static CACHE: OnceLock<Mutex<HashMap<String, Regex>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(r) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(rule) {
        return Ok(r.clone());
    }
    let re = regex::RegexBuilder::new(rule)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            RegistryError::Config(format!("policies: regular expression '{rule}': {e}"))
        })?;
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(rule.to_string(), re.clone());
    Ok(re)
}

/// The policies of the project owning images as `owner`.
async fn effective<'a>(app: &'a App, owner: &str) -> Result<Effective<'a>> {
    let name = app.catalog.get_project(owner).await?.map(|p| p.name);
    Ok(app.config.policies.for_project(owner, name.as_deref()))
}

/// The naming rule, on create (`before` = `None`) and when the name changes.
pub async fn check_naming(
    app: &App,
    before: Option<&ImageRecord>,
    img: &ImageRecord,
) -> Result<()> {
    if before.is_some_and(|b| b.name == img.name) {
        return Ok(());
    }
    let eff = effective(app, &img.owner).await?;
    let Some(rule) = eff.naming else {
        return Ok(());
    };
    let ok = match &img.name {
        Some(n) => compiled(rule)?.is_match(n),
        None => false,
    };
    if ok {
        return Ok(());
    }
    Err(RegistryError::BadRequest(format!(
        "image name {} does not follow the naming rule of project {}: it must match /{rule}/",
        img.name
            .as_deref()
            .map(|n| format!("'{n}'"))
            .unwrap_or_else(|| "(none)".into()),
        eff.project
    )))
}

/// The required metadata of an image that is (becoming) active.
pub async fn check_metadata(app: &App, img: &ImageRecord) -> Result<()> {
    let eff = effective(app, &img.owner).await?;
    let mut missing = Vec::new();
    let mut invalid = Vec::new();
    for (name, rule) in eff.required {
        let Some(v) = img.properties.get(name) else {
            missing.push(name.as_str());
            continue;
        };
        if let Some(allowed) = &rule.allowed {
            if !allowed.iter().any(|a| a == v) {
                invalid.push(format!("{name} '{v}' is not one of {}", allowed.join(", ")));
                continue;
            }
        }
        if let Some(r) = &rule.regex {
            if !compiled(r)?.is_match(v) {
                invalid.push(format!("{name} '{v}' does not match /{r}/"));
            }
        }
    }
    if missing.is_empty() && invalid.is_empty() {
        return Ok(());
    }
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing {}", missing.join(", ")));
    }
    parts.extend(invalid);
    Err(RegistryError::BadRequest(format!(
        "image {} does not have the metadata project {} requires: {}",
        img.id,
        eff.project,
        parts.join("; ")
    )))
}

/// The `PATCH /v2/images/{id}` hook: naming when the name changed, metadata when active.
pub async fn check_update(app: &App, before: &ImageRecord, after: &ImageRecord) -> Result<()> {
    check_naming(app, Some(before), after).await?;
    if after.status == Status::Active {
        check_metadata(app, after).await?;
    }
    Ok(())
}

/// What the retention policy says about one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetentionItem {
    /// The image.
    pub id: String,
    /// Its name.
    pub name: Option<String>,
    /// Its owner project.
    pub owner: String,
    /// Its family.
    pub family: String,
    /// When it was created.
    pub created_at: String,
    /// 1 for the newest version of the family (in its owner's images).
    pub rank: usize,
    /// Whole days since creation.
    pub age_days: i64,
    /// Whether the policy removes it.
    pub remove: bool,
    /// Why.
    pub reason: String,
}

/// Judge one owner's versions of one family (any order) at `now` under `policy`.
pub fn evaluate(
    policy: &RetentionPolicy,
    family: &str,
    mut imgs: Vec<ImageRecord>,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<RetentionItem> {
    crate::lineage::newest_first(&mut imgs);
    imgs.into_iter()
        .enumerate()
        .map(|(i, img)| {
            let rank = i + 1;
            let age_days = chrono::DateTime::parse_from_rfc3339(&img.created_at)
                .map(|t| (now - t.with_timezone(&chrono::Utc)).num_days())
                .unwrap_or(0);
            let newest = policy
                .keep_newest
                .map(|n| rank <= usize::try_from(n).unwrap_or(usize::MAX));
            let young = policy.max_age_days.map(|d| age_days < i64::from(d));
            let (remove, reason) = if img.protected {
                (false, "protected".to_string())
            } else if newest.is_none() && young.is_none() {
                (false, "no retention policy".to_string())
            } else if newest == Some(true) {
                (
                    false,
                    format!("among the newest {}", policy.keep_newest.unwrap_or(0)),
                )
            } else if young == Some(true) {
                (
                    false,
                    format!("younger than {} days", policy.max_age_days.unwrap_or(0)),
                )
            } else {
                let mut why = Vec::new();
                if let Some(n) = policy.keep_newest {
                    why.push(format!("not among the newest {n} (version {rank})"));
                }
                if let Some(d) = policy.max_age_days {
                    why.push(format!("{age_days} days old (limit {d})"));
                }
                (true, why.join(" and "))
            };
            RetentionItem {
                id: img.id,
                name: img.name,
                owner: img.owner,
                family: family.to_string(),
                created_at: img.created_at,
                rank,
                age_days,
                remove,
                reason,
            }
        })
        .collect()
}

/// The retention verdicts for `family`: every owner's active or deactivated versions (only
/// `project`'s when given), each judged by its owner's policy.
pub async fn retention(
    app: &App,
    family: &str,
    project: Option<&str>,
) -> Result<(Vec<RetentionItem>, Vec<ImageRecord>)> {
    let mut q = ImageQuery::new(Viewer::Admin);
    q.os_hidden = None;
    q.limit = 1000;
    q.properties = vec![(crate::lineage::FAMILY_PROP.into(), family.into())];
    q.filters.push(Filter {
        field: Field::Status,
        cmp: Cmp::In(vec![
            Status::Active.as_str().into(),
            Status::Deactivated.as_str().into(),
        ]),
        value: String::new(),
    });
    if let Some(p) = project {
        q.filters.push(Filter {
            field: Field::Owner,
            cmp: Cmp::Eq,
            value: p.into(),
        });
    }
    let mut all: Vec<ImageRecord> = Vec::new();
    loop {
        let page = app.catalog.list_images(&q).await?;
        let Some(last) = page.last().cloned() else {
            break;
        };
        all.extend(page);
        if all.len() >= MAX_FAMILY_IMAGES {
            return Err(RegistryError::BadRequest(format!(
                "family {family} has more than {MAX_FAMILY_IMAGES} images; apply retention per \
                 project"
            )));
        }
        q.marker = Some(last);
    }
    let mut by_owner: BTreeMap<String, Vec<ImageRecord>> = BTreeMap::new();
    for img in &all {
        by_owner
            .entry(img.owner.clone())
            .or_default()
            .push(img.clone());
    }
    let now = app.clock.now();
    let mut items = Vec::new();
    for (owner, imgs) in by_owner {
        let eff = effective(app, &owner).await?;
        items.extend(evaluate(eff.retention, family, imgs, now));
    }
    Ok((items, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(id: &str, created: &str) -> ImageRecord {
        ImageRecord::new(id.into(), "p".into(), created.into())
    }

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339("2026-06-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc)
    }

    #[test]
    fn retention_keeps_the_newest_n_or_the_young_ones() {
        let imgs = vec![
            img("a", "2026-01-01T00:00:00Z"),
            img("b", "2026-05-01T00:00:00Z"),
            img("c", "2026-05-30T00:00:00Z"),
            img("d", "2026-03-01T00:00:00Z"),
        ];
        let p = RetentionPolicy {
            keep_newest: Some(1),
            max_age_days: Some(60),
        };
        let v = evaluate(&p, "f", imgs, now());
        let removed: Vec<&str> = v
            .iter()
            .filter(|i| i.remove)
            .map(|i| i.id.as_str())
            .collect();
        assert_eq!(removed, ["d", "a"]);
        assert_eq!(v[0].id, "c");
        assert!(v[3].reason.contains("version 4"), "{}", v[3].reason);
    }

    #[test]
    fn protected_images_and_empty_policies_remove_nothing() {
        let mut a = img("a", "2020-01-01T00:00:00Z");
        a.protected = true;
        let p = RetentionPolicy {
            keep_newest: Some(0),
            max_age_days: None,
        };
        assert!(!evaluate(&p, "f", vec![a.clone()], now())[0].remove);
        a.protected = false;
        assert!(!evaluate(&RetentionPolicy::default(), "f", vec![a], now())[0].remove);
    }

    #[test]
    fn project_overrides_fall_back_to_the_defaults() {
        let c: crate::Config = crate::Config::from_toml(
            "[policies]\nnaming = \"^[a-z]\"\n[policies.retention]\nkeep_newest = 3\n\
             [policies.required_metadata]\nos_distro = { enum = [\"ubuntu\"] }\n\
             [policies.projects.web]\nnaming = \"^web-\"\n\
             [policies.projects.free]\nnaming = \"\"\n",
        )
        .unwrap();
        let p = &c.policies;
        assert!(p.validate().is_ok());
        let web = p.for_project("id1", Some("web"));
        assert_eq!(web.naming, Some("^web-"));
        assert_eq!(web.retention.keep_newest, Some(3));
        assert!(web.required.contains_key("os_distro"));
        assert_eq!(p.for_project("id2", Some("free")).naming, None);
        assert_eq!(p.for_project("id3", None).naming, Some("^[a-z]"));
        let bad = PoliciesConfig {
            naming: Some("(".into()),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let printed = c.to_toml().unwrap();
        assert!(printed.contains("[policies.projects.web]"), "{printed}");
        assert_eq!(crate::Config::from_toml(&printed).unwrap(), c, "{printed}");
        let d = crate::Config::default();
        assert_eq!(crate::Config::from_toml(&d.to_toml().unwrap()).unwrap(), d);
    }
}
