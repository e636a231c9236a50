//! The lifecycle job: applies scheduled transitions and purges the recycle bin.
//!
//! Every node of a service runs [`spawn`], but only one works at a time: the leader, which holds
//! the `lifecycle` lease row (holder + expiry) in the catalog, taken and renewed with one
//! compare-and-swap upsert at the start of each run. When the leader stops renewing, the lease
//! lapses and another node's next run takes it. Each transition is itself a compare-and-swap
//! on the image's state, so two runs that overlap (a lease lapsing mid-run) change each image
//! once. Tests drive [`Job::run_once`] with a [`crate::clock::ManualClock`].

use super::recycle;
use super::{Lifecycle, LifecycleState};
use crate::clock::format_time;
use crate::error::{chain, Result};
use crate::model::{ImageRecord, Status};
use crate::server::App;
use std::sync::Arc;

/// The lease row's name.
pub const LEASE_NAME: &str = "lifecycle";
/// Images handled per step and run (the rest wait for the next run).
pub const BATCH: u32 = 500;
/// Who the recycle bin names as the deleter of images the job retires.
pub const JOB_ACTOR: &str = "lifecycle-job";

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunReport {
    /// Whether this node held the lease (nothing else is done otherwise).
    pub leader: bool,
    /// Images moved, with the state reached.
    pub transitions: Vec<(String, LifecycleState)>,
    /// Recycled images whose retention ended and that were removed for good.
    pub purged: Vec<String>,
    /// Images that could not be handled, with the reason (retried next run).
    pub errors: Vec<String>,
}

/// The job as one node runs it.
pub struct Job {
    app: Arc<App>,
    node: String,
}

impl Job {
    /// The job for `app`, identified as `node` in the lease.
    pub fn new(app: Arc<App>, node: impl Into<String>) -> Self {
        Job {
            app,
            node: node.into(),
        }
    }

    /// This node's lease holder name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Take (or renew) the leader lease; true if this node holds it.
    pub async fn lead(&self) -> Result<bool> {
        let now = self.app.clock.now();
        let until = now + self.app.config.lifecycle.lease.duration();
        self.app
            .catalog
            .try_lease(
                LEASE_NAME,
                &self.node,
                &format_time(now),
                &format_time(until),
            )
            .await
    }

    /// Give the lease up (on shutdown), so another node takes over at its next run.
    pub async fn release(&self) -> Result<bool> {
        self.app.catalog.release_lease(LEASE_NAME, &self.node).await
    }

    /// One run: lead or do nothing; then apply due transitions and purge expired recycled
    /// images.
    pub async fn run_once(&self) -> Result<RunReport> {
        let mut report = RunReport {
            leader: self.lead().await?,
            ..RunReport::default()
        };
        if !report.leader {
            return Ok(report);
        }
        let app = &*self.app;
        let now = app.clock.now_string();
        for id in app.catalog.due_lifecycle(&now, BATCH).await? {
            let Some(img) = app.catalog.get_image(&id).await? else {
                continue;
            };
            let from = Lifecycle::of(&img);
            let target = from.due_state(&now);
            if target == from.state && target != LifecycleState::Retired {
                continue;
            }
            let mut to = from.clone();
            to.advance(target);
            match transition(app, &img, &from, &to, Some(JOB_ACTOR.into())).await {
                Ok(true) => {
                    crate::audit::record_job(
                        app,
                        &img,
                        &format!("lifecycle.{target}"),
                        format!("scheduled: {} → {target}", from.state),
                    )
                    .await;
                    report.transitions.push((id, target));
                }
                Ok(false) => {}
                Err(e) => report.errors.push(format!("{id}: {}", chain(&e))),
            }
        }
        for entry in app.catalog.expired_recycled(&now, BATCH).await? {
            let img = app.catalog.get_image(&entry.image_id).await?;
            match recycle::purge_now(app, &entry.image_id).await {
                Ok(true) => {
                    if let Some(img) = img {
                        crate::audit::record_job(
                            app,
                            &img,
                            "image.purge",
                            format!("recycle bin retention ended at {}", entry.purge_at),
                        )
                        .await;
                    }
                    report.purged.push(entry.image_id);
                }
                Ok(false) => {}
                Err(e) => report
                    .errors
                    .push(format!("{}: {}", entry.image_id, chain(&e))),
            }
        }
        Ok(report)
    }
}

/// Move `img` from lifecycle `from` to `to` (a compare-and-swap on `from.state`); a retirement
/// then deletes the image the configured way. Returns false when another writer moved it first.
pub async fn transition(
    app: &App,
    img: &ImageRecord,
    from: &Lifecycle,
    to: &Lifecycle,
    by: Option<String>,
) -> Result<bool> {
    if from != to
        && !app
            .catalog
            .set_lifecycle(
                &img.id,
                from.state.as_str(),
                &to.props(),
                &app.clock.now_string(),
            )
            .await?
    {
        return Ok(false);
    }
    if to.state == LifecycleState::Retired {
        // Re-read: the retirement may have been recorded by an earlier, interrupted run.
        let Some(current) = app.catalog.get_image(&img.id).await? else {
            return Ok(false);
        };
        if !matches!(current.status, Status::Active | Status::Deactivated) || current.protected {
            return Ok(false);
        }
        recycle::remove(app, &current, by).await?;
    }
    Ok(true)
}

/// Run the job on this node every `[lifecycle] job_interval` until the process ends.
pub fn spawn(app: Arc<App>) -> tokio::task::JoinHandle<()> {
    let node = format!("node-{}", uuid::Uuid::new_v4().simple());
    let cfg = &app.config.lifecycle;
    if cfg.lease <= cfg.job_interval {
        eprintln!(
            "vmi registry: [lifecycle] lease ({}) should be longer than job_interval ({}), or \
             the leader changes at every run",
            cfg.lease, cfg.job_interval
        );
    }
    let interval = std::time::Duration::from_secs(cfg.job_interval.secs().max(1));
    let job = Job::new(app, node);
    tokio::spawn(async move {
        loop {
            match job.run_once().await {
                Ok(r) => {
                    for e in &r.errors {
                        eprintln!("vmi registry: lifecycle job: {e}");
                    }
                }
                Err(e) => eprintln!("vmi registry: lifecycle job: {}", chain(&e)),
            }
            tokio::time::sleep(interval).await;
        }
    })
}
