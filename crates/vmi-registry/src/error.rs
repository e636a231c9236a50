//! The registry's error type and its one mapping to HTTP status codes and JSON bodies.
//!
//! Bodies have Keystone's shape, `{"error": {"code": 404, "title": …, "message": …}}`, which is
//! also what python-glanceclient parses (every top-level value an object with a `message`). Internal failures are logged with
//! their full chain and answered with a generic message.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use vmi_disk::inspect::Violation;

/// A boxed error from a backend library (database, object store).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result with [`RegistryError`].
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// Everything that can go wrong in the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request is malformed or asks for something invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// No valid credentials were presented (401).
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may see the resource but not do this to it (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such resource, or the caller may not see it (404).
    #[error("{0}")]
    NotFound(String),
    /// The resource is in a state that does not allow this, or another writer won (409).
    #[error("{0}")]
    Conflict(String),
    /// The upload exceeds the configured image size cap (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// Too many requests of this kind are in progress; try again after `retry_after` seconds
    /// (429, with `Retry-After`).
    #[error("{message}")]
    TooManyRequests {
        /// What is busy.
        message: String,
        /// Seconds to wait before retrying.
        retry_after: u64,
    },
    /// The request body has the wrong media type (415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The requested byte range lies outside the image (416).
    #[error("requested range not satisfiable for an image of {size} bytes")]
    RangeNotSatisfiable {
        /// The image size, for the `Content-Range: bytes */size` header.
        size: u64,
    },
    /// The uploaded data failed the safety inspection (400, with the violation list).
    #[error("the image data was refused: {}", violation_summary(.violations))]
    Refused {
        /// Each reason the image is unsafe.
        violations: Vec<Violation>,
    },
    /// A registry this process talked to answered with an error (`status` 0: no answer).
    #[error("registry: {message}{}", if *.status > 0 { format!(" (HTTP {status})") } else { String::new() })]
    Remote {
        /// The HTTP status, or 0 when the request failed before an answer.
        status: u16,
        /// The registry's message.
        message: String,
    },
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// The catalog backend failed.
    #[error("catalog: {context}")]
    Catalog {
        /// What the catalog was doing.
        context: String,
        /// The backend's error.
        #[source]
        source: BoxError,
    },
    /// The blob store failed.
    #[error("image store: {context}")]
    Store {
        /// What the store was doing.
        context: String,
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// A local I/O operation failed.
    #[error("{context}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn violation_summary(v: &[Violation]) -> String {
    v.iter()
        .map(|v| v.detail.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

impl RegistryError {
    /// A catalog error with context.
    pub fn catalog(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        RegistryError::Catalog {
            context: context.into(),
            source: source.into(),
        }
    }

    /// A store error with context.
    pub fn store(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        RegistryError::Store {
            context: context.into(),
            source: source.into(),
        }
    }

    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        RegistryError::Io {
            context: context.into(),
            source,
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            RegistryError::BadRequest(_) | RegistryError::Refused { .. } => StatusCode::BAD_REQUEST,
            RegistryError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            RegistryError::Forbidden(_) => StatusCode::FORBIDDEN,
            RegistryError::NotFound(_) => StatusCode::NOT_FOUND,
            RegistryError::Conflict(_) => StatusCode::CONFLICT,
            RegistryError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RegistryError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RegistryError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            RegistryError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            RegistryError::Remote { .. } => StatusCode::BAD_GATEWAY,
            RegistryError::Config(_)
            | RegistryError::Catalog { .. }
            | RegistryError::Store { .. }
            | RegistryError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The full cause chain, for logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let status = self.status();
        let title = status.canonical_reason().unwrap_or("Error");
        let message = if status.is_server_error() {
            eprintln!("vmi-registry: internal error: {}", chain(&self));
            "The server has either erred or is incapable of performing the requested operation."
                .to_string()
        } else {
            self.to_string()
        };
        let mut error = json!({"code": status.as_u16(), "title": title, "message": message});
        if let RegistryError::Refused { violations } = &self {
            error["violations"] = json!(violations);
        }
        let body = json!({ "error": error });
        let mut resp = (status, axum::Json(body)).into_response();
        if let RegistryError::RangeNotSatisfiable { size } = self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
        }
        if let RegistryError::TooManyRequests { retry_after, .. } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Keystone uri=\"/v3\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_error_keeps_its_message_and_server_errors_hide_theirs() {
        let r = RegistryError::NotFound("No image found with ID x".into()).into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = RegistryError::io("writing", std::io::Error::other("secret path")).into_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn range_errors_name_the_image_size() {
        let r = RegistryError::RangeNotSatisfiable { size: 10 }.into_response();
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes */10");
    }
}
