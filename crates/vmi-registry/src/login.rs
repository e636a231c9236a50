//! Password checks under load: a bound on concurrent Argon2 hashes, lockout after repeated
//! failures, and answers that do not tell which accounts exist.
//!
//! Every password check costs an Argon2id hash (19 MiB, RFC 9106's second recommended profile
//! as the `argon2` crate's default). Unbounded, a burst of logins with a wrong password makes the
//! service hold one such buffer per request, and the allocator keeps them afterwards. Here at
//! most [`LoginConfig::max_concurrent_hashes`] hashes run at once (one per core by default),
//! each in a buffer kept for its permit and reused, so the memory of password checks is fixed;
//! up to [`LoginConfig::hash_queue`] more requests wait, and the rest are answered 429 with
//! `Retry-After`.
//!
//! Lockout follows Keystone's `[security_compliance] lockout_failure_attempts` and
//! `lockout_duration`: after that many failed logins for one user, further attempts for the user
//! are refused for the duration without checking the password. The same holds per client address
//! ([`LoginConfig::address_lockout_failure_attempts`]). A locked-out attempt is answered as a
//! wrong password is (401). Names of accounts that do not exist (and disabled accounts, and users
//! without a password) are hashed against a dummy hash and counted like existing ones, so neither
//! the answer, its timing nor the lockout tells whether an account exists. The counters live in
//! each node's memory.

use crate::error::{RegistryError, Result};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OnceCell, Semaphore};

/// Largest Argon2 memory a stored hash may ask for (64 MiB in 1 KiB blocks): a hash asking more
/// is treated as not matching rather than allocated.
pub const MAX_HASH_MEMORY_BLOCKS: u32 = 64 * 1024;
/// Longest Argon2 output a stored hash may carry.
const MAX_HASH_OUTPUT: usize = 64;
/// Users and addresses whose failures are remembered at once; beyond it the oldest entry goes.
pub const MAX_TRACKED_FAILURES: usize = 65_536;
/// `Retry-After` of a login answered 429.
const RETRY_AFTER_SECS: u64 = 1;

/// `[login]`: limits on password checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoginConfig {
    /// Password hashes computed at once; 0 means one per CPU core.
    pub max_concurrent_hashes: usize,
    /// Password checks that may wait for a hash slot; more are answered 429.
    pub hash_queue: usize,
    /// Longest wait for a hash slot, seconds, before a 429.
    pub hash_queue_wait: u64,
    /// Failed logins of one user before the user is locked out (Keystone's
    /// `lockout_failure_attempts`); 0 disables the per-user lockout.
    pub lockout_failure_attempts: u32,
    /// How long a lockout lasts, and how long a failure is remembered, seconds (Keystone's
    /// `lockout_duration`).
    pub lockout_duration: u64,
    /// Failed logins from one client address before the address is locked out; 0 disables it.
    pub address_lockout_failure_attempts: u32,
}

impl Default for LoginConfig {
    fn default() -> Self {
        LoginConfig {
            max_concurrent_hashes: 0,
            hash_queue: 16,
            hash_queue_wait: 10,
            lockout_failure_attempts: 10,
            lockout_duration: 300,
            address_lockout_failure_attempts: 50,
        }
    }
}

impl LoginConfig {
    /// The effective number of concurrent hashes.
    pub fn hash_slots(&self) -> usize {
        if self.max_concurrent_hashes > 0 {
            self.max_concurrent_hashes
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Failures of one user or address.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    locked_until: Option<Instant>,
}

/// Who a failure counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    User(String),
    Address(IpAddr),
}

/// The password checker of one node: hash slots with their buffers, and failure counters.
pub struct LoginGuard {
    config: LoginConfig,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    buffers: Arc<Mutex<Vec<Vec<Block>>>>,
    failures: Mutex<HashMap<Key, Failures>>,
    dummy: OnceCell<String>,
}

/// What a password check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The password matched.
    Accepted,
    /// Wrong password, unknown or unusable account, or locked out: answer 401.
    Refused,
}

impl LoginGuard {
    /// A checker with `config`'s limits.
    pub fn new(config: LoginConfig) -> Self {
        let slots = config.hash_slots();
        LoginGuard {
            config,
            slots: Arc::new(Semaphore::new(slots)),
            waiting: AtomicUsize::new(0),
            buffers: Arc::new(Mutex::new(Vec::new())),
            failures: Mutex::new(HashMap::new()),
            dummy: OnceCell::new(),
        }
    }

    /// Check `password` for the account `user_key` (the user id, or the name or id asked for
    /// when no usable account has it) against `stored` (its PHC string; `None` for an unknown,
    /// disabled or password-less account), from `address`.
    pub async fn check(
        &self,
        user_key: &str,
        address: Option<IpAddr>,
        stored: Option<String>,
        password: String,
    ) -> Result<Verdict> {
        let user = Key::User(user_key.to_string());
        let addr = address.map(Key::Address);
        if self.locked(&user) || addr.as_ref().is_some_and(|a| self.locked(a)) {
            return Ok(Verdict::Refused);
        }
        let matched = match stored {
            Some(h) => {
                self.hash_slot(move |buf| verify_with(&h, &password, buf))
                    .await?
            }
            None => {
                let dummy = self.dummy_hash().await?;
                self.hash_slot(move |buf| verify_with(&dummy, &password, buf))
                    .await?;
                false
            }
        };
        if matched {
            self.forget(&user);
            Ok(Verdict::Accepted)
        } else {
            self.fail(user, self.config.lockout_failure_attempts);
            if let Some(a) = addr {
                self.fail(a, self.config.address_lockout_failure_attempts);
            }
            Ok(Verdict::Refused)
        }
    }

    /// The Argon2id PHC string of `password`, computed in a hash slot.
    pub async fn hash(&self, password: String) -> Result<String> {
        self.hash_slot(move |buf| hash_with(&password, buf)).await?
    }

    /// A hash of a random password, computed once, that unknown accounts are checked against.
    async fn dummy_hash(&self) -> Result<String> {
        self.dummy
            .get_or_try_init(|| async {
                let pw = crate::auth::new_password();
                self.hash_slot(move |buf| hash_with(&pw, buf)).await?
            })
            .await
            .cloned()
    }

    /// Run `f` on a blocking thread with a hash slot and its buffer, or answer 429 when the slots
    /// and the queue are full or the wait is too long.
    async fn hash_slot<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static,
    ) -> Result<T> {
        let busy = || RegistryError::TooManyRequests {
            message: "Too many logins are being checked; try again shortly.".into(),
            retry_after: RETRY_AFTER_SECS,
        };
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.config.hash_queue {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    return Err(busy());
                }
                let wait = Duration::from_secs(self.config.hash_queue_wait);
                let got = tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await;
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                match got {
                    Ok(Ok(p)) => p,
                    _ => return Err(busy()),
                }
            }
        };
        let buffers = self.buffers.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = lock(&buffers).pop().unwrap_or_default();
            let out = f(&mut buf);
            lock(&buffers).push(buf);
            drop(permit);
            out
        })
        .await
        .map_err(|e| RegistryError::Config(format!("password check: {e}")))
    }

    fn locked(&self, key: &Key) -> bool {
        let now = Instant::now();
        lock(&self.failures)
            .get(key)
            .and_then(|f| f.locked_until)
            .is_some_and(|until| until > now)
    }

    fn forget(&self, key: &Key) {
        lock(&self.failures).remove(key);
    }

    /// Count a failure against `key`, locking it out at `limit` failures (0: never).
    fn fail(&self, key: Key, limit: u32) {
        if limit == 0 {
            return;
        }
        let now = Instant::now();
        let window = Duration::from_secs(self.config.lockout_duration);
        let mut map = lock(&self.failures);
        if map.len() >= MAX_TRACKED_FAILURES && !map.contains_key(&key) {
            map.retain(|_, f| {
                now.duration_since(f.last) < window || f.locked_until.is_some_and(|u| u > now)
            });
            if map.len() >= MAX_TRACKED_FAILURES {
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
        }
        let f = map.entry(key).or_insert(Failures {
            count: 0,
            last: now,
            locked_until: None,
        });
        let expired_lock = f.locked_until.is_some_and(|u| u <= now);
        if expired_lock || now.duration_since(f.last) >= window {
            f.count = 0;
            f.locked_until = None;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if f.count >= limit {
            f.locked_until = now.checked_add(window);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Make `buf` at least `blocks` long (it keeps its size afterwards, to be reused).
fn ensure_blocks(buf: &mut Vec<Block>, blocks: usize) {
    if buf.len() < blocks {
        buf.resize(blocks, Block::default());
    }
}

/// Argon2id with the default parameters, as [`crate::auth::hash_password`], in `buf`.
fn hash_with(password: &str, buf: &mut Vec<Block>) -> Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    let params = Params::default();
    let mut salt_bytes = [0u8; 64];
    let salt_raw = salt
        .decode_b64(&mut salt_bytes)
        .map_err(|e| RegistryError::Config(format!("hashing a password: {e}")))?;
    ensure_blocks(buf, params.block_count());
    let len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let mut out = [0u8; MAX_HASH_OUTPUT];
    let out = out
        .get_mut(..len)
        .ok_or_else(|| RegistryError::Config("hashing a password: output too long".into()))?;
    let a = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    a.hash_password_into_with_memory(password.as_bytes(), salt_raw, out, &mut buf[..])
        .map_err(|e| RegistryError::Config(format!("hashing a password: {e}")))?;
    let output =
        Output::new(out).map_err(|e| RegistryError::Config(format!("hashing a password: {e}")))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: (&params)
            .try_into()
            .map_err(|e| RegistryError::Config(format!("hashing a password: {e}")))?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the Argon2 PHC string `stored`, computed in `buf`. Hashes that do
/// not parse, or that ask for more than [`MAX_HASH_MEMORY_BLOCKS`], do not match.
pub fn verify_with(stored: &str, password: &str, buf: &mut Vec<Block>) -> bool {
    if password.len() > crate::auth::MAX_PASSWORD_LEN {
        return false;
    }
    let Ok(h) = PasswordHash::new(stored) else {
        return false;
    };
    let (Ok(alg), Ok(params), Some(expected), Some(salt)) = (
        Algorithm::try_from(h.algorithm),
        Params::try_from(&h),
        h.hash,
        h.salt,
    ) else {
        return false;
    };
    let version = h
        .version
        .and_then(|v| Version::try_from(v).ok())
        .unwrap_or_default();
    if params.m_cost() > MAX_HASH_MEMORY_BLOCKS || expected.len() > MAX_HASH_OUTPUT {
        return false;
    }
    let mut salt_bytes = [0u8; 64];
    let Ok(salt_raw) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    ensure_blocks(buf, params.block_count());
    let mut out = [0u8; MAX_HASH_OUTPUT];
    let Some(out) = out.get_mut(..expected.len()) else {
        return false;
    };
    let a = Argon2::new(alg, version, params);
    if a.hash_password_into_with_memory(password.as_bytes(), salt_raw, out, &mut buf[..])
        .is_err()
    {
        return false;
    }
    // `Output`'s equality is constant-time.
    Output::new(out).is_ok_and(|o| o == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_made_here_verify_with_the_argon2_crate_and_back() {
        let mut buf = Vec::new();
        let ours = hash_with("s3cret", &mut buf).unwrap();
        assert!(crate::auth::verify_password(&ours, "s3cret"));
        assert!(!crate::auth::verify_password(&ours, "s3cre"));
        let theirs = crate::auth::hash_password("s3cret").unwrap();
        assert!(verify_with(&theirs, "s3cret", &mut buf));
        assert!(!verify_with(&theirs, "wrong", &mut buf));
        assert!(!verify_with("not a hash", "s3cret", &mut buf));
    }

    #[test]
    fn a_stored_hash_asking_for_too_much_memory_does_not_match() {
        let mut buf = Vec::new();
        let h = "$argon2id$v=19$m=4194304,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$\
                 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(!verify_with(h, "x", &mut buf));
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn a_user_is_locked_out_after_the_configured_failures_even_with_the_right_password() {
        let g = LoginGuard::new(LoginConfig {
            lockout_failure_attempts: 2,
            address_lockout_failure_attempts: 0,
            ..LoginConfig::default()
        });
        let h = g.hash("right".into()).await.unwrap();
        for _ in 0..2 {
            let v = g.check("u1", None, Some(h.clone()), "wrong".into()).await;
            assert_eq!(v.unwrap(), Verdict::Refused);
        }
        let v = g.check("u1", None, Some(h.clone()), "right".into()).await;
        assert_eq!(v.unwrap(), Verdict::Refused);
        let v = g.check("u2", None, Some(h), "right".into()).await;
        assert_eq!(v.unwrap(), Verdict::Accepted);
    }

    #[tokio::test]
    async fn unknown_accounts_are_counted_and_locked_out_like_known_ones() {
        let g = LoginGuard::new(LoginConfig {
            lockout_failure_attempts: 1,
            ..LoginConfig::default()
        });
        assert_eq!(
            g.check("nobody", None, None, "x".into()).await.unwrap(),
            Verdict::Refused
        );
        assert!(g.locked(&Key::User("nobody".into())));
    }

    #[tokio::test]
    async fn an_address_is_locked_out_across_user_names() {
        let g = LoginGuard::new(LoginConfig {
            lockout_failure_attempts: 0,
            address_lockout_failure_attempts: 3,
            ..LoginConfig::default()
        });
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        for n in 0..3 {
            g.check(&format!("n{n}"), Some(a), None, "x".into())
                .await
                .unwrap();
        }
        assert!(g.locked(&Key::Address(a)));
        assert!(!g.locked(&Key::Address("192.0.2.8".parse().unwrap())));
    }

    #[tokio::test]
    async fn checks_beyond_the_slots_and_the_queue_are_answered_429() {
        let g = Arc::new(LoginGuard::new(LoginConfig {
            max_concurrent_hashes: 1,
            hash_queue: 0,
            lockout_failure_attempts: 0,
            address_lockout_failure_attempts: 0,
            ..LoginConfig::default()
        }));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let g2 = g.clone();
        let busy = tokio::spawn(async move { g2.hash_slot(move |_| rx.recv().ok()).await });
        while g.slots.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let r = g.check("u", None, None, "x".into()).await;
        assert!(
            matches!(r, Err(RegistryError::TooManyRequests { .. })),
            "{r:?}"
        );
        tx.send(()).unwrap();
        busy.await.unwrap().unwrap();
    }
}
