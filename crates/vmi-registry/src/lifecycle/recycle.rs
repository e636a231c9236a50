//! The recycle bin: with `[lifecycle] recycle_retention` above zero, deleting an image moves it
//! to Glance's `pending_delete` status with its data kept; the owner or an admin can bring it
//! back (`POST /v2/images/{id}/actions/restore`) until the retention ends, when the lifecycle
//! job removes its data and marks it `deleted`. Deleting a `pending_delete` image again removes
//! it at once. The reaper keeps the data of `pending_delete` images (they are not deleted).
//!
//! Recycled images are hidden from default listings; their owner and admins list them with
//! `?status=pending_delete`.

use crate::auth::Context;
use crate::catalog::lifecycle::RecycleEntry;
use crate::catalog::{Cmp, Field, Filter, ImageQuery};
use crate::clock::format_time;
use crate::error::{RegistryError, Result};
use crate::model::{ImageRecord, Status};
use crate::server::App;

/// What happened to a deleted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// Moved to the recycle bin.
    Recycled,
    /// Deleted for good.
    Deleted,
}

/// The `DELETE /v2/images/{id}` hook: handles the deletion when the recycle bin is involved
/// (returns true), or leaves it to the plain Glance deletion (false).
pub async fn intercept_delete(app: &App, ctx: &Context, img: &ImageRecord) -> Result<bool> {
    if img.status == Status::PendingDelete {
        purge_now(app, &img.id).await?;
        return Ok(true);
    }
    if app.config.lifecycle.recycle_retention.secs() == 0 {
        return Ok(false);
    }
    recycle(app, img, Some(ctx.user_id.clone())).await?;
    Ok(true)
}

/// Delete `img` the configured way: into the recycle bin, or for good when the retention is 0.
pub async fn remove(app: &App, img: &ImageRecord, by: Option<String>) -> Result<Removal> {
    if app.config.lifecycle.recycle_retention.secs() > 0 {
        recycle(app, img, by).await?;
        return Ok(Removal::Recycled);
    }
    let mut gone = img.clone();
    let location = gone.location.take();
    gone.status = Status::Deleted;
    gone.updated_at = app.clock.now_string();
    if crate::catalog::save_changes(app.catalog.as_ref(), img, &gone, img.status)
        .await?
        .is_none()
    {
        return Err(changed(&img.id));
    }
    delete_data(app, &img.id, location).await;
    Ok(Removal::Deleted)
}

fn changed(id: &str) -> RegistryError {
    RegistryError::Conflict(format!("Image {id} was changed by another request; retry"))
}

async fn recycle(app: &App, img: &ImageRecord, by: Option<String>) -> Result<()> {
    let now = app.clock.now();
    let entry = RecycleEntry {
        image_id: img.id.clone(),
        previous_status: img.status,
        deleted_at: format_time(now),
        purge_at: format_time(now + app.config.lifecycle.recycle_retention.duration()),
        deleted_by: by,
    };
    if !app
        .catalog
        .recycle(&entry, img.status, &entry.deleted_at)
        .await?
    {
        return Err(changed(&img.id));
    }
    Ok(())
}

/// Remove a `pending_delete` image for good now; false if it was not in the recycle bin.
pub async fn purge_now(app: &App, id: &str) -> Result<bool> {
    match app.catalog.purge(id, &app.clock.now_string()).await? {
        Some(location) => {
            delete_data(app, id, location).await;
            Ok(true)
        }
        None => Ok(false),
    }
}

async fn delete_data(app: &App, id: &str, location: Option<String>) {
    if let Some(loc) = location {
        app.release_data(id, &loc).await;
    }
}

/// Bring a recycled image back to the status it had; 409 if it is not in the recycle bin.
pub async fn restore(app: &App, id: &str) -> Result<Status> {
    app.catalog
        .restore(id, &app.clock.now_string())
        .await?
        .ok_or_else(|| RegistryError::Conflict(format!("Image {id} is not in the recycle bin")))
}

/// The `GET /v2/images` hook: hide recycled images unless the listing asks for them by status,
/// and then show only the caller's own (admins see all).
pub fn scope_listing(ctx: &Context, q: &mut ImageQuery) {
    let pending = Status::PendingDelete.as_str();
    let asks = q.filters.iter().any(|f| {
        f.field == Field::Status
            && match &f.cmp {
                Cmp::Eq => f.value == pending,
                Cmp::In(v) => v.iter().any(|s| s == pending),
                _ => false,
            }
    });
    if !asks {
        q.filters.push(Filter {
            field: Field::Status,
            cmp: Cmp::Neq,
            value: pending.into(),
        });
    } else if !ctx.is_admin() {
        q.filters.push(Filter {
            field: Field::Owner,
            cmp: Cmp::Eq,
            value: ctx.project_id.clone(),
        });
    }
}
