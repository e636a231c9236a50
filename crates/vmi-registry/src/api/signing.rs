//! `/v2/signing-keys` (a vmi extension): the public keys and certificates a project signs its
//! images with. An image names one in `img_signature_certificate_uuid` (see
//! [`crate::signing`]).
//!
//! Members and admins of a project register and delete its keys; readers list them. A key is
//! public material, so any authenticated caller may fetch one by id (to verify a download);
//! listings show only the caller's project (admins: every project, or `?owner=`).

use super::parse_json;
use crate::auth::Context;
use crate::catalog::signing::SigningKeyRecord;
use crate::clock::format_time;
use crate::error::{RegistryError, Result};
use crate::server::App;
use crate::signing::crypto::{KeyForm, KeyMaterial};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Longest key name.
const MAX_KEY_NAME: usize = 255;

/// A key as the API shows it.
pub fn key_json(k: &SigningKeyRecord) -> Value {
    json!({
        "id": k.id,
        "name": k.name,
        "owner": k.project_id,
        "form": k.form,
        "key_type": k.key_type,
        "fingerprint": k.fingerprint,
        "not_before": k.not_before,
        "not_after": k.not_after,
        "subject": k.subject,
        "created_by": k.created_by,
        "created_at": k.created_at,
        "pem": k.pem,
        "self": format!("/v2/signing-keys/{}", k.id),
    })
}

fn not_found(id: &str) -> RegistryError {
    RegistryError::NotFound(format!("No signing key found with ID {id}"))
}

/// `POST /v2/signing-keys` with `{"key": PEM, "name": …}` (`"certificate"` is accepted for
/// `"key"`; admins may set `"owner"`).
pub async fn create(
    State(app): State<Arc<App>>,
    ctx: Context,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>)> {
    if !ctx.can_write() {
        return Err(RegistryError::Forbidden(
            "You are not authorized to register signing keys".into(),
        ));
    }
    let v = parse_json(&body)?;
    let bad = |m: &str| RegistryError::BadRequest(m.to_string());
    let pem = v
        .get("key")
        .or_else(|| v.get("certificate"))
        .and_then(Value::as_str)
        .ok_or_else(|| bad("\"key\" (a PEM public key or certificate) is required"))?;
    let name = match v.get("name") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= MAX_KEY_NAME => Some(s.clone()),
        Some(_) => return Err(bad("name must be a string of at most 255 characters")),
    };
    let owner = match v.get("owner").and_then(Value::as_str) {
        Some(o) if o != ctx.project_id => {
            if !ctx.is_admin() {
                return Err(RegistryError::Forbidden(
                    "Only admins may register keys for another project".into(),
                ));
            }
            o.to_string()
        }
        _ => ctx.project_id.clone(),
    };
    let material = KeyMaterial::from_pem(pem)?;
    let now = app.clock.now();
    material.check_valid_at(now)?;
    let (form, not_before, not_after, subject) = match &material.form {
        KeyForm::PublicKey => ("public_key", None, None, None),
        KeyForm::Certificate {
            not_before,
            not_after,
            subject,
        } => (
            "certificate",
            Some(format_time(*not_before)),
            Some(format_time(*not_after)),
            Some(subject.clone()),
        ),
    };
    let rec = SigningKeyRecord {
        id: uuid::Uuid::new_v4().hyphenated().to_string(),
        project_id: owner,
        name,
        form: form.into(),
        key_type: material.key.key_type().name().into(),
        pem: pem.trim().to_string() + "\n",
        fingerprint: material.fingerprint,
        not_before,
        not_after,
        subject,
        created_by: ctx.user_id.clone(),
        created_at: format_time(now),
    };
    app.catalog.create_signing_key(&rec).await?;
    Ok((StatusCode::CREATED, Json(key_json(&rec))))
}

/// `GET /v2/signing-keys`
pub async fn list(
    State(app): State<Arc<App>>,
    ctx: Context,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>> {
    let project = match q.get("owner") {
        Some(o) if ctx.is_admin() || *o == ctx.project_id => Some(o.clone()),
        Some(_) => return Ok(Json(json!({"signing_keys": []}))),
        None if ctx.is_admin() => None,
        None => Some(ctx.project_id.clone()),
    };
    let keys = app.catalog.list_signing_keys(project.as_deref()).await?;
    Ok(Json(json!({
        "signing_keys": keys.iter().map(key_json).collect::<Vec<_>>(),
    })))
}

/// `GET /v2/signing-keys/{id}`
pub async fn show(
    State(app): State<Arc<App>>,
    _ctx: Context,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    let k = app
        .catalog
        .get_signing_key(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(key_json(&k)))
}

/// `DELETE /v2/signing-keys/{id}`: images signed with the key keep their data; uploads that
/// name it are refused from now on.
pub async fn delete(
    State(app): State<Arc<App>>,
    ctx: Context,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let k = app
        .catalog
        .get_signing_key(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    if k.project_id != ctx.project_id && !ctx.is_admin() {
        return Err(not_found(&id));
    }
    if !ctx.can_write() {
        return Err(RegistryError::Forbidden(
            "You are not authorized to delete signing keys".into(),
        ));
    }
    if !app.catalog.delete_signing_key(&id).await? {
        return Err(not_found(&id));
    }
    Ok(StatusCode::NO_CONTENT)
}
