//! Upload leases: how any node tells a dead direct upload from a live one.
//!
//! A node that starts `PUT /v2/images/{id}/file` (after the `queued → saving`
//! compare-and-swap) records a lease for the image in the catalog — its node id, a token, an
//! expiry `[uploads] lease_secs` ahead (30 s) — and renews it every `heartbeat_secs` (10 s)
//! while the body streams. It releases the lease when the upload ends either way. A node that
//! dies mid-upload (kill -9, power loss) stops renewing; once the lease has run out, any node
//! reclaims the upload: on the next upload attempt for the image, and in a sweep every
//! heartbeat. Reclaiming takes the lease away first (deleting it by its token, so of several
//! nodes exactly one reclaims), removes the partial data while the image is still `saving` (so
//! no new upload can be writing), then returns the image to `queued`. Resumable upload sessions
//! keep their own rules (idle sessions go after the reaper's grace) and hold no lease.

use crate::catalog::leases::UploadLease;
use crate::catalog::save_changes;
use crate::clock::format_time;
use crate::error::{chain, Result};
use crate::model::{now, Status};
use crate::server::App;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Expired leases reclaimed per sweep.
const SWEEP_BATCH: u32 = 100;

/// `[uploads]`: leases of direct uploads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UploadsConfig {
    /// How long an upload's lease lasts without renewal, seconds.
    pub lease_secs: u64,
    /// How often the uploading node renews it (and every node sweeps for expired ones), seconds.
    pub heartbeat_secs: u64,
}

impl Default for UploadsConfig {
    fn default() -> Self {
        UploadsConfig {
            lease_secs: 30,
            heartbeat_secs: 10,
        }
    }
}

impl UploadsConfig {
    fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs.clamp(1, self.lease_secs.max(1)))
    }
}

fn expiry(app: &App) -> String {
    let secs = i64::try_from(app.config.uploads.lease_secs).unwrap_or(i64::MAX / 2);
    format_time(app.clock.now() + chrono::Duration::seconds(secs))
}

/// The lease of an upload in progress on this node; renewed until released or dropped.
pub struct HeldLease {
    app: Arc<App>,
    image_id: String,
    token: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

/// Record this node's lease on the upload of `image_id` (which it has just moved to `saving`)
/// and keep renewing it.
pub async fn hold(app: &Arc<App>, image_id: &str) -> Result<HeldLease> {
    let lease = UploadLease {
        image_id: image_id.to_string(),
        node_id: app.guards.node_id.clone(),
        token: uuid::Uuid::new_v4().simple().to_string(),
        expires_at: expiry(app),
    };
    app.catalog.put_upload_lease(&lease).await?;
    let (a, id, token) = (app.clone(), lease.image_id.clone(), lease.token.clone());
    let heartbeat = tokio::spawn(async move {
        let every = a.config.uploads.heartbeat();
        loop {
            tokio::time::sleep(every).await;
            match a.catalog.renew_upload_lease(&id, &token, &expiry(&a)).await {
                Ok(true) => {}
                Ok(false) => {
                    eprintln!("vmi registry: the upload lease of image {id} was taken over");
                    return;
                }
                Err(e) => eprintln!(
                    "vmi registry: renewing the upload lease of {id}: {}",
                    chain(&e)
                ),
            }
        }
    });
    Ok(HeldLease {
        app: app.clone(),
        image_id: lease.image_id,
        token: lease.token,
        heartbeat,
    })
}

impl HeldLease {
    /// Stop renewing and remove the lease (the upload ended, either way).
    pub async fn release(self) {
        self.heartbeat.abort();
        if let Err(e) = self
            .app
            .catalog
            .delete_upload_lease(&self.image_id, &self.token)
            .await
        {
            eprintln!(
                "vmi registry: releasing the upload lease of {}: {}",
                self.image_id,
                chain(&e)
            );
        }
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        // A request dropped mid-upload stops renewing; the lease then runs out and is reclaimed.
        self.heartbeat.abort();
    }
}

/// Reclaim the upload of `lease` if it has run out: true when this node did.
pub async fn reclaim(app: &App, lease: &UploadLease) -> Result<bool> {
    if lease.expires_at.as_str() >= format_time(app.clock.now()).as_str() {
        return Ok(false);
    }
    // Taking the lease away by its token: exactly one node gets here per lease.
    if !app
        .catalog
        .delete_upload_lease(&lease.image_id, &lease.token)
        .await?
    {
        return Ok(false);
    }
    let Some(img) = app.catalog.get_image(&lease.image_id).await? else {
        return Ok(true);
    };
    if img.status != Status::Saving {
        return Ok(true);
    }
    let keep: HashSet<String> = app.catalog.live_locations().await?.into_iter().collect();
    let removed = app.data.discard_partial(&img.id, &keep).await?;
    let mut queued = img.clone();
    queued.status = Status::Queued;
    queued.updated_at = now();
    if save_changes(app.catalog.as_ref(), &img, &queued, Status::Saving)
        .await?
        .is_some()
    {
        eprintln!(
            "vmi registry: the upload of image {} on node {} stopped renewing its lease; \
             back to queued ({removed} partial objects removed)",
            img.id, lease.node_id
        );
    }
    Ok(true)
}

/// Reclaim the upload of `image_id` if it holds a lease that has run out.
pub async fn reclaim_image(app: &App, image_id: &str) -> Result<bool> {
    match app.catalog.get_upload_lease(image_id).await? {
        Some(l) => reclaim(app, &l).await,
        None => Ok(false),
    }
}

/// Reclaim every upload whose lease has run out; returns how many.
pub async fn sweep(app: &App) -> Result<usize> {
    let expired = app
        .catalog
        .expired_upload_leases(&format_time(app.clock.now()), SWEEP_BATCH)
        .await?;
    let mut n = 0;
    for l in expired {
        if reclaim(app, &l).await? {
            n += 1;
        }
    }
    Ok(n)
}

/// Sweep for expired upload leases every heartbeat, for as long as the process runs.
pub fn spawn_sweeper(app: Arc<App>) {
    tokio::spawn(async move {
        let every = app.config.uploads.heartbeat();
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = sweep(&app).await {
                eprintln!("vmi registry: reclaiming expired uploads: {}", chain(&e));
            }
        }
    });
}
