//! Per-node limits on expensive work that unauthenticated or ordinary callers can start:
//! password checks ([`crate::login`]) and image conversions ([`ConversionSlots`]).

use crate::config::Config;
use crate::error::{RegistryError, Result};
use crate::login::LoginGuard;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// `Retry-After` of a conversion refused because its project has too many running.
const CONVERSION_RETRY_AFTER_SECS: u64 = 5;
/// Projects whose conversion slots are kept; idle ones are dropped beyond it.
const MAX_TRACKED_PROJECTS: usize = 4096;

/// The limits of one node, shared by every request it serves.
pub struct Guards {
    /// Password hashing slots and login lockout.
    pub login: LoginGuard,
    /// Conversions running per project.
    pub conversions: ConversionSlots,
    /// This node's id in upload leases (random per process).
    pub node_id: String,
}

impl Guards {
    /// The limits `config` sets.
    pub fn new(config: &Config) -> Self {
        Guards {
            login: LoginGuard::new(config.login.clone()),
            conversions: ConversionSlots::new(config.import.max_conversions_per_project),
            node_id: uuid::Uuid::new_v4().simple().to_string(),
        }
    }
}

/// A running conversion's slot; the slot is free again when this drops.
#[derive(Debug)]
pub struct ConversionSlot {
    _permit: Option<OwnedSemaphorePermit>,
}

/// At most `per_project` conversions (downloads in another format, conversion on upload or
/// import) run at once for one project on this node; 0 means no limit.
pub struct ConversionSlots {
    per_project: usize,
    projects: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl ConversionSlots {
    /// Slots for `per_project` conversions per project.
    pub fn new(per_project: usize) -> Self {
        ConversionSlots {
            per_project,
            projects: Mutex::new(HashMap::new()),
        }
    }

    fn semaphore(&self, project: &str) -> Arc<Semaphore> {
        let mut map = self
            .projects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_TRACKED_PROJECTS && !map.contains_key(project) {
            // Idle projects hold every permit and nobody else refers to their semaphore.
            let per = self.per_project;
            map.retain(|_, s| Arc::strong_count(s) > 1 || s.available_permits() < per);
        }
        map.entry(project.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_project)))
            .clone()
    }

    /// A slot for `project` now, or 429 (a download asked for a conversion).
    pub fn try_acquire(&self, project: &str) -> Result<ConversionSlot> {
        if self.per_project == 0 {
            return Ok(ConversionSlot { _permit: None });
        }
        self.semaphore(project)
            .try_acquire_owned()
            .map(|p| ConversionSlot { _permit: Some(p) })
            .map_err(|_| RegistryError::TooManyRequests {
                message: format!(
                    "Project {project} already has {} image conversions running; try again later.",
                    self.per_project
                ),
                retry_after: CONVERSION_RETRY_AFTER_SECS,
            })
    }

    /// A slot for `project`, waiting for one (conversions of uploads and imports, whose data
    /// is already received).
    pub async fn acquire(&self, project: &str) -> Result<ConversionSlot> {
        if self.per_project == 0 {
            return Ok(ConversionSlot { _permit: None });
        }
        self.semaphore(project)
            .acquire_owned()
            .await
            .map(|p| ConversionSlot { _permit: Some(p) })
            .map_err(|e| RegistryError::Config(format!("conversion slots: {e}")))
    }
}
