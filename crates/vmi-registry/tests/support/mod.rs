//! Helpers shared by the registry's integration test files (each file includes this module).

/// The catalog a test uses: with the `postgres` feature and `VMI_TEST_POSTGRES_URL`
/// (`postgres://user@host:port`, see tests/postgres.sh) a fresh PostgreSQL database made for the
/// test; otherwise `None`, i.e. SQLite in the test's data directory.
pub async fn test_database() -> Option<String> {
    #[cfg(feature = "postgres")]
    if let Ok(base) = std::env::var("VMI_TEST_POSTGRES_URL") {
        let name = format!("vmi_t_{}", uuid::Uuid::new_v4().simple());
        let (client, conn) =
            tokio_postgres::connect(&format!("{base}/postgres"), tokio_postgres::NoTls)
                .await
                .expect("connect to the test PostgreSQL server");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a test database");
        return Some(format!("{base}/{name}"));
    }
    None
}

/// Point `c` at a fresh bucket of the S3-compatible server named by `VMI_TEST_S3_ENDPOINT`
/// (CI and tests/s3.sh start one; any credentials it accepts). False, with a note, when the
/// variable is not set: the caller skips its test.
#[cfg(feature = "s3")]
#[allow(dead_code)] // Not every test file has an S3 test.
pub async fn s3_store(c: &mut vmi_registry::Config) -> bool {
    let Ok(endpoint) = std::env::var("VMI_TEST_S3_ENDPOINT") else {
        eprintln!("s3 test skipped: VMI_TEST_S3_ENDPOINT is not set");
        return false;
    };
    let bucket = format!("vmi-test-{}", uuid::Uuid::new_v4().simple());
    let r = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("reach the S3 server");
    assert!(
        r.status().is_success(),
        "creating the bucket: {}",
        r.status()
    );
    c.store = Some(format!("s3://{bucket}/registry"));
    c.s3.endpoint = Some(endpoint);
    c.s3.region = Some("us-east-1".into());
    c.s3.access_key_id = Some("testing".into());
    c.s3.secret_access_key = Some("testing".into());
    c.s3.allow_http = true;
    true
}

/// A response of the in-process router, body collected.
#[allow(dead_code)] // Each test file uses what it needs.
pub struct Resp {
    pub status: axum::http::StatusCode,
    pub headers: axum::http::HeaderMap,
    pub body: bytes::Bytes,
}

#[allow(dead_code)]
impl Resp {
    /// The body as JSON (`null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON, after asserting the status.
    #[track_caller]
    pub fn expect(self, status: axum::http::StatusCode) -> serde_json::Value {
        assert_eq!(self.status, status, "{}", self.text());
        self.json()
    }
}

/// Send one request through `reg`'s router in process: `token` (when not empty) as
/// `X-Auth-Token`, `ctype` as `Content-Type`, then the `extra` headers.
pub async fn send(
    reg: &vmi_registry::Registry,
    method: axum::http::Method,
    uri: &str,
    token: Option<&str>,
    ctype: Option<&str>,
    body: axum::body::Body,
    extra: &[(&str, &str)],
) -> Resp {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut b = axum::http::Request::builder().method(method).uri(uri);
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        b = b.header("x-auth-token", t);
    }
    if let Some(c) = ctype {
        b = b.header("content-type", c);
    }
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let r = reg.router().oneshot(b.body(body).unwrap()).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    Resp {
        status,
        headers,
        body,
    }
}
