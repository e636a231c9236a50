//! Image stores as Glance's multi-store API shows them: `GET /v2/info/stores`, and the `stores`
//! attribute of images (the comma-separated ids of the stores holding the image's data).
//!
//! The store the registry was configured with (`store`, or `<data-dir>/images`) has the id
//! [`DEFAULT_STORE`]; its locations are plain object keys. Data in another store is recorded
//! as `<store id>:<key>`.

use crate::auth::Context;
use crate::model::{ImageRecord, Status};
use axum::Json;
use serde_json::{json, Value};

/// Id of the store that `store` (or the data directory) configures.
pub const DEFAULT_STORE: &str = "default";

/// The store id a location belongs to.
pub fn store_of(location: &str) -> &str {
    match location.split_once(':') {
        Some((id, _)) if is_store_id(id) => id,
        _ => DEFAULT_STORE,
    }
}

/// Whether `id` is well-formed as a store id (letters, digits, `_` and `-`, at most 64).
pub fn is_store_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The `stores` attribute of an image: present once it has data (active or deactivated).
pub fn image_stores(img: &ImageRecord) -> Option<String> {
    if !matches!(img.status, Status::Active | Status::Deactivated) {
        return None;
    }
    let loc = img.location.as_deref()?;
    Some(store_of(loc).to_string())
}

/// `GET /v2/info/stores`: the stores, the default one flagged with the string `"true"` as
/// Glance flags it.
pub async fn info(_ctx: Context) -> Json<Value> {
    Json(
        json!({"stores": [{"id": DEFAULT_STORE, "description": "vmi image store",
                            "default": "true"}]}),
    )
}
