//! Per-node limits on expensive work that unauthenticated or ordinary callers can start:
//! password checks ([`crate::login`]).

use crate::config::Config;
use crate::login::LoginGuard;

/// The limits of one node, shared by every request it serves.
pub struct Guards {
    /// Password hashing slots and login lockout.
    pub login: LoginGuard,
}

impl Guards {
    /// The limits `config` sets.
    pub fn new(config: &Config) -> Self {
        Guards {
            login: LoginGuard::new(config.login.clone()),
        }
    }
}
