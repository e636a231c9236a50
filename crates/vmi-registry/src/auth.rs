//! Authentication: passwords, tokens and the request [`Context`].
//!
//! Tokens are 32 random bytes in hex. Only their SHA-256 is stored, so a copy of the catalog
//! does not leak working tokens. Passwords are stored as Argon2id PHC strings. Every request to
//! the image API presents a token in `X-Auth-Token` (Keystone's header); the token's user,
//! project and the user's roles on that project make up the [`Context`] that the policy
//! decides on. Roles imply the ones below them, as Keystone's default implied roles do:
//! admin implies member implies reader.

use crate::error::{RegistryError, Result};
use crate::model::{Role, TokenKind, TokenRecord};
use crate::server::App;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The header that carries a token (Keystone's).
pub const AUTH_HEADER: &str = "x-auth-token";
/// The header that carries an issued or validated token.
pub const SUBJECT_HEADER: &str = "x-subject-token";
/// Longest password accepted (bounds Argon2 input).
pub const MAX_PASSWORD_LEN: usize = 4096;
/// Longest token accepted in a header.
const MAX_TOKEN_LEN: usize = 512;

/// Who is calling, and with which roles on which project.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    /// User id.
    pub user_id: String,
    /// User name.
    pub user_name: String,
    /// Scoped project id.
    pub project_id: String,
    /// Scoped project name.
    pub project_name: String,
    /// Effective roles (implied ones included).
    pub roles: Vec<Role>,
    /// How the token was issued.
    pub kind: TokenKind,
    /// When the token expires.
    pub expires_at: Option<String>,
    /// When the token was issued.
    pub issued_at: String,
}

impl Context {
    /// Whether the caller is an administrator (admin on any project is a cloud admin, as in
    /// Glance's `context_is_admin`).
    pub fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    /// Whether the caller may write (member or admin).
    pub fn can_write(&self) -> bool {
        self.roles.contains(&Role::Member) || self.is_admin()
    }

    /// A context with one role, for tests.
    pub fn for_tests(project: &str, role: Role) -> Self {
        Context {
            user_id: format!("u-{project}"),
            user_name: format!("u-{project}"),
            project_id: project.into(),
            project_name: project.into(),
            roles: effective_roles(&[role]),
            kind: TokenKind::Api,
            expires_at: None,
            issued_at: String::new(),
        }
    }
}

/// The roles `assigned` grant, implied ones included, highest first.
pub fn effective_roles(assigned: &[Role]) -> Vec<Role> {
    let top = assigned.iter().max().copied();
    Role::ALL
        .into_iter()
        .filter(|r| top.is_some_and(|t| *r <= t))
        .collect()
}

/// A fresh random token.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// The stored form of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random password (printed once for the bootstrap admin).
pub fn new_password() -> String {
    let mut b = [0u8; 18];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Argon2id PHC string of `password`.
pub fn hash_password(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| RegistryError::Config(format!("hashing a password: {e}")))
}

/// Whether `password` matches the PHC string `hash`.
pub fn verify_password(hash: &str, password: &str) -> bool {
    if password.len() > MAX_PASSWORD_LEN {
        return false;
    }
    match PasswordHash::new(hash) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

impl App {
    /// The context of a presented token, or 401.
    pub async fn authenticate(&self, token: &str) -> Result<Context> {
        let unauthorized = || {
            RegistryError::Unauthorized("The request you have made requires authentication.".into())
        };
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(unauthorized());
        }
        let rec: TokenRecord = self
            .catalog
            .get_token(&hash_token(token))
            .await?
            .ok_or_else(unauthorized)?;
        if let Some(exp) = &rec.expires_at {
            if exp.as_str() <= crate::api::identity::keystone_time(chrono::Utc::now()).as_str() {
                return Err(unauthorized());
            }
        }
        let user = self
            .catalog
            .get_user(&rec.user_id)
            .await?
            .filter(|u| u.enabled)
            .ok_or_else(unauthorized)?;
        let project = self
            .catalog
            .get_project(&rec.project_id)
            .await?
            .ok_or_else(unauthorized)?;
        let roles = effective_roles(&self.catalog.roles(&user.id, &project.id).await?);
        if roles.is_empty() {
            return Err(unauthorized());
        }
        Ok(Context {
            user_id: user.id,
            user_name: user.name,
            project_id: project.id,
            project_name: project.name,
            roles,
            kind: rec.kind,
            expires_at: rec.expires_at,
            issued_at: rec.issued_at,
        })
    }
}

impl FromRequestParts<Arc<App>> for Context {
    type Rejection = RegistryError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self> {
        let token = parts
            .headers
            .get(AUTH_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        app.authenticate(token.trim()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_imply_the_ones_below() {
        assert_eq!(
            effective_roles(&[Role::Admin]),
            [Role::Admin, Role::Member, Role::Reader]
        );
        assert_eq!(effective_roles(&[Role::Reader]), [Role::Reader]);
        assert!(effective_roles(&[]).is_empty());
    }

    #[test]
    fn passwords_verify_only_with_the_right_password() {
        let h = hash_password("s3cret").unwrap();
        assert!(verify_password(&h, "s3cret"));
        assert!(!verify_password(&h, "s3cre"));
        assert!(!verify_password("not a hash", "s3cret"));
    }

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let a = new_token();
        assert_ne!(a, new_token());
        assert_eq!(a.len(), 64);
        assert_ne!(hash_token(&a), a);
    }
}
