//! `vmi image deprecate | obsolete | retire | undeprecate | restore | audit | retention`.

use crate::client::RegistryClient;
use crate::error::{RegistryError, Result};
use clap::Subcommand;
use serde_json::{json, Map, Value};
use std::io::Write;

/// Lifecycle, recycle bin and audit subcommands of `vmi image`.
#[derive(Debug, Clone, Subcommand)]
pub enum LifecycleCommand {
    /// Deprecate an image now (or at --at): it still downloads, with a warning.
    Deprecate {
        /// Image id or name.
        image: String,
        /// The image to use instead.
        #[arg(long, value_name = "IMAGE")]
        replacement: Option<String>,
        /// Schedule the deprecation instead of doing it now (RFC 3339 time).
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// Also schedule the image to become obsolete.
        #[arg(long, value_name = "TIME")]
        obsolete_at: Option<String>,
        /// Also schedule the image's retirement (deletion).
        #[arg(long, value_name = "TIME")]
        delete_at: Option<String>,
    },
    /// Make an image obsolete now (or at --at): downloads are refused to non-admins.
    Obsolete {
        /// Image id or name.
        image: String,
        /// The image to use instead.
        #[arg(long, value_name = "IMAGE")]
        replacement: Option<String>,
        /// Schedule it instead of doing it now (RFC 3339 time).
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
        /// Also schedule the image's retirement (deletion).
        #[arg(long, value_name = "TIME")]
        delete_at: Option<String>,
    },
    /// Retire (delete) an image now or at --at.
    Retire {
        /// Image id or name.
        image: String,
        /// Schedule it instead of doing it now (RFC 3339 time).
        #[arg(long, value_name = "TIME")]
        at: Option<String>,
    },
    /// Bring a deprecated or obsolete image back to active, clearing its schedule (admin).
    Undeprecate {
        /// Image id or name.
        image: String,
    },
    /// Bring a deleted image back from the recycle bin.
    Restore {
        /// Image id.
        image: String,
    },
    /// Show which versions the retention policy removes (a dry run), per family; with --apply
    /// (admin) move them to the recycle bin.
    Retention {
        /// Only this family (default: every family you can see).
        #[arg(long)]
        family: Option<String>,
        /// Remove what the report lists.
        #[arg(long)]
        apply: bool,
    },
    /// Read the audit log, newest first.
    Audit {
        /// Only events about this image (id or name).
        #[arg(long)]
        image: Option<String>,
        /// Only this action (e.g. image.delete, lifecycle.deprecated).
        #[arg(long)]
        action: Option<String>,
        /// Only events at or after this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only events before this time (RFC 3339).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

fn out_err(e: std::io::Error) -> RegistryError {
    RegistryError::io("writing output", e)
}

fn print_lifecycle(out: &mut dyn Write, img: &Value, as_json: bool) -> Result<()> {
    if as_json {
        return writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(img).unwrap_or_default()
        )
        .map_err(out_err);
    }
    for k in [
        "id",
        "name",
        "status",
        "vmi_lifecycle_state",
        "vmi_replacement",
        "vmi_deprecate_at",
        "vmi_obsolete_at",
        "vmi_delete_at",
    ] {
        if let Some(v) = img.get(k).and_then(Value::as_str) {
            writeln!(out, "{k:<20} {v}").map_err(out_err)?;
        }
    }
    Ok(())
}

/// One line per version: family, rank, age, keep or remove (removed), id, name and the reason.
fn print_retention(out: &mut dyn Write, v: &Value, applied: bool, as_json: bool) -> Result<()> {
    if as_json {
        return writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(v).unwrap_or_default()
        )
        .map_err(out_err);
    }
    for fam in v["families"].as_array().into_iter().flatten() {
        let removed: Vec<&str> = fam["removed"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for i in fam["images"].as_array().into_iter().flatten() {
            let id = i["id"].as_str().unwrap_or("-");
            let verdict = match (i["remove"].as_bool().unwrap_or(false), applied) {
                (false, _) => "keep",
                (true, false) => "remove",
                (true, true) if removed.contains(&id) => "removed",
                (true, true) => "FAILED",
            };
            writeln!(
                out,
                "{:<24} {:>4} {:>5}d  {:<7} {:<36}  {:<24}  {}",
                fam["family"].as_str().unwrap_or("-"),
                i["rank"].as_u64().unwrap_or(0),
                i["age_days"].as_i64().unwrap_or(0),
                verdict,
                id,
                i["name"].as_str().unwrap_or("-"),
                i["reason"].as_str().unwrap_or("")
            )
            .map_err(out_err)?;
        }
    }
    for f in v["failed"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "failed: {}: {}",
            f["id"].as_str().unwrap_or("-"),
            f["error"].as_str().unwrap_or("")
        )
        .map_err(out_err)?;
    }
    Ok(())
}

/// Run one lifecycle subcommand against `c`.
pub async fn run(
    c: &RegistryClient,
    cmd: &LifecycleCommand,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let mut body = Map::new();
    let mut put = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            body.insert(k.into(), json!(v));
        }
    };
    let (image, state) = match cmd {
        LifecycleCommand::Deprecate {
            image,
            replacement,
            at,
            obsolete_at,
            delete_at,
        } => {
            put("deprecate_at", at);
            put("obsolete_at", obsolete_at);
            put("delete_at", delete_at);
            put("replacement", replacement);
            (image, at.is_none().then_some("deprecated"))
        }
        LifecycleCommand::Obsolete {
            image,
            replacement,
            at,
            delete_at,
        } => {
            put("obsolete_at", at);
            put("delete_at", delete_at);
            put("replacement", replacement);
            (image, at.is_none().then_some("obsolete"))
        }
        LifecycleCommand::Retire { image, at } => {
            put("delete_at", at);
            (image, at.is_none().then_some("retired"))
        }
        LifecycleCommand::Undeprecate { image } => (image, Some("active")),
        LifecycleCommand::Retention { family, apply } => {
            let v = c.retention(family.as_deref(), *apply).await?;
            return print_retention(out, &v, *apply, as_json);
        }
        LifecycleCommand::Restore { image } => {
            let id = c.resolve(image).await?;
            return print_lifecycle(out, &c.restore(&id).await?, as_json);
        }
        LifecycleCommand::Audit {
            image,
            action,
            since,
            until,
            limit,
        } => {
            let mut f = vec![("limit".to_string(), limit.to_string())];
            if let Some(i) = image {
                f.push(("image_id".into(), c.resolve(i).await?));
            }
            for (k, v) in [("action", action), ("since", since), ("until", until)] {
                if let Some(v) = v {
                    f.push((k.into(), v.clone()));
                }
            }
            let page = c.audit(&f).await?;
            if as_json {
                return writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&page["events"]).unwrap_or_default()
                )
                .map_err(out_err);
            }
            for e in page["events"].as_array().into_iter().flatten() {
                let s = |k: &str| e[k].as_str().unwrap_or("-").to_string();
                writeln!(
                    out,
                    "{:<20}  {:<22}  {:>3}  {:<36}  {:<32}  {}",
                    s("at"),
                    s("action"),
                    e["status"].as_u64().unwrap_or(0),
                    s("image_id"),
                    s("user_id"),
                    e["detail"].as_str().unwrap_or("")
                )
                .map_err(out_err)?;
            }
            return Ok(());
        }
    };
    let id = c.resolve(image).await?;
    if let Some(r) = body.get("replacement").and_then(Value::as_str) {
        let r = c.resolve(r).await?;
        body.insert("replacement".into(), json!(r));
    }
    if let Some(s) = state {
        body.insert("state".into(), json!(s));
    }
    let img = c.lifecycle(&id, &Value::Object(body)).await?;
    print_lifecycle(out, &img, as_json)
}
