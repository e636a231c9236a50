//! Image signatures end to end: signing keys registered through `/v2/signing-keys`, uploads
//! carrying Glance's `img_signature*` properties verified (ed25519, RSA-PSS, ECDSA; tampered
//! data, wrong and unknown keys, expired certificates refused), the per-project "signed only"
//! policy, images signed with `openssl dgst` as Glance's documentation shows, and the client's
//! `vmi image download --verify` over a real socket.
//!
//! With the `postgres` feature and `VMI_TEST_POSTGRES_URL` set (see tests/postgres.sh), every
//! test runs on a fresh PostgreSQL database instead of SQLite.

mod support;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use bytes::Bytes;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use vmi_registry::clock::ManualClock;
use vmi_registry::signing::crypto::{encode_signature, HashMethod, PrivateKey};
use vmi_registry::{Config, Registry};

const ADMIN_TOKEN: &str = "admin-static-token";
const PATCH: &str = "application/openstack-images-v2.1-json-patch";

use support::Resp;

struct T {
    reg: Registry,
    clock: Arc<ManualClock>,
    dir: tempfile::TempDir,
}

async fn setup_with(f: impl FnOnce(&mut Config)) -> T {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    c.admin.password = Some("adminpw".into());
    c.admin.token = Some(ADMIN_TOKEN.into());
    if let Some(db) = support::test_database().await {
        c.database = Some(db);
    }
    f(&mut c);
    let clock = Arc::new(ManualClock::new(chrono::Utc::now()));
    let reg = Registry::open(c).await.unwrap().with_clock(clock.clone());
    reg.bootstrap().await.unwrap();
    T { reg, clock, dir }
}

async fn setup() -> T {
    setup_with(|_| {}).await
}

impl T {
    async fn req(
        &self,
        method: Method,
        uri: &str,
        token: &str,
        ctype: Option<&str>,
        body: impl Into<Body>,
    ) -> Resp {
        self.req_with(method, uri, token, ctype, body, &[]).await
    }

    async fn req_with(
        &self,
        method: Method,
        uri: &str,
        token: &str,
        ctype: Option<&str>,
        body: impl Into<Body>,
        extra: &[(&str, &str)],
    ) -> Resp {
        support::send(
            &self.reg,
            method,
            uri,
            Some(token),
            ctype,
            body.into(),
            extra,
        )
        .await
    }

    async fn post(&self, uri: &str, token: &str, v: Value) -> Resp {
        self.req(
            Method::POST,
            uri,
            token,
            Some("application/json"),
            v.to_string(),
        )
        .await
    }

    async fn get(&self, uri: &str, token: &str) -> Resp {
        self.req(Method::GET, uri, token, None, Body::empty()).await
    }

    /// Register `pem` with the token's project; returns the key id.
    async fn add_key(&self, token: &str, pem: &str) -> String {
        let r = self
            .post("/v2/signing-keys", token, json!({"key": pem, "name": "k"}))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    /// Create a raw image with `props`, upload `data`; returns (id, upload response).
    async fn create_and_upload(&self, token: &str, props: Value, data: &[u8]) -> (String, Resp) {
        let mut attrs = json!({"disk_format": "raw", "container_format": "bare"});
        for (k, v) in props.as_object().unwrap() {
            attrs[k] = v.clone();
        }
        let r = self.post("/v2/images", token, attrs).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_string();
        let r = self
            .req(
                Method::PUT,
                &format!("/v2/images/{id}/file"),
                token,
                Some("application/octet-stream"),
                data.to_vec(),
            )
            .await;
        (id, r)
    }

    async fn status(&self, id: &str) -> String {
        self.get(&format!("/v2/images/{id}"), ADMIN_TOKEN)
            .await
            .json()["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn stored_objects(&self) -> usize {
        fn count(p: &Path) -> usize {
            std::fs::read_dir(p)
                .map(|d| {
                    d.flatten()
                        .map(|e| {
                            if e.path().is_dir() {
                                count(&e.path())
                            } else {
                                1
                            }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        count(&self.dir.path().join("images"))
    }

    /// A project with a user of `role`; returns (project id, token).
    async fn user(&self, project: &str, user: &str, role: &str) -> (String, String) {
        let r = self
            .post(
                "/v3/projects",
                ADMIN_TOKEN,
                json!({"project": {"name": project}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        let pid = r.json()["project"]["id"].as_str().unwrap().to_string();
        let r = self
            .post(
                "/v3/users",
                ADMIN_TOKEN,
                json!({"user": {"name": user, "password": "pw", "default_project_id": pid}}),
            )
            .await;
        let uid = r.json()["user"]["id"].as_str().unwrap().to_string();
        let r = self
            .req(
                Method::PUT,
                &format!("/v3/projects/{pid}/users/{uid}/roles/{role}"),
                ADMIN_TOKEN,
                None,
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        let token = self.token(user, project).await;
        (pid, token)
    }

    /// A password token of `user` scoped to `project`.
    async fn token(&self, user: &str, project: &str) -> String {
        let r = self
            .post(
                "/v3/auth/tokens",
                "",
                json!({"auth": {
                    "identity": {"methods": ["password"], "password": {"user": {
                        "name": user, "domain": {"name": "Default"}, "password": "pw"}}},
                    "scope": {"project": {"name": project, "domain": {"name": "Default"}}}}}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
        r.headers["x-subject-token"].to_str().unwrap().to_string()
    }
}

fn ed25519_key(seed: u8) -> PrivateKey {
    PrivateKey::Ed25519(Box::new(ed25519_dalek::SigningKey::from_bytes(&[seed; 32])))
}

fn p256_key() -> PrivateKey {
    PrivateKey::P256(p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng))
}

fn rsa_key() -> PrivateKey {
    PrivateKey::Rsa(Box::new(
        rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap(),
    ))
}

/// The four signature properties for `data` signed with `key`, naming `key_id`.
fn signed(key: &PrivateKey, key_id: &str, hash: HashMethod, data: &[u8]) -> Value {
    let mut h = hash.hasher();
    h.update(data);
    let sig = key.sign_digest(hash, &h.finish()).unwrap();
    json!({
        "img_signature": encode_signature(&sig),
        "img_signature_hash_method": hash.name(),
        "img_signature_key_type": key.key_type().name(),
        "img_signature_certificate_uuid": key_id,
    })
}

fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn signatures_from_ed25519_rsa_pss_and_ecdsa_p256_keys_are_accepted() {
    let t = setup().await;
    let d = data(300_000, 1);
    for (key, hash) in [
        (ed25519_key(1), HashMethod::Sha256),
        (rsa_key(), HashMethod::Sha256),
        (p256_key(), HashMethod::Sha256),
        (ed25519_key(2), HashMethod::Sha512),
        (p256_key(), HashMethod::Sha384),
    ] {
        let kid = t.add_key(ADMIN_TOKEN, &key.public_key_pem().unwrap()).await;
        let (id, r) = t
            .create_and_upload(ADMIN_TOKEN, signed(&key, &kid, hash, &d), &d)
            .await;
        assert_eq!(
            r.status,
            StatusCode::NO_CONTENT,
            "{:?} {}: {}",
            key.key_type(),
            hash.name(),
            r.text()
        );
        assert_eq!(t.status(&id).await, "active");
    }
}

#[tokio::test]
async fn tampered_data_is_refused_and_the_image_stays_queued_without_data() {
    let t = setup().await;
    let key = p256_key();
    let kid = t.add_key(ADMIN_TOKEN, &key.public_key_pem().unwrap()).await;
    let d = data(100_000, 2);
    let mut tampered = d.clone();
    tampered[5000] ^= 1;
    let before = t.stored_objects();
    let (id, r) = t
        .create_and_upload(
            ADMIN_TOKEN,
            signed(&key, &kid, HashMethod::Sha256, &d),
            &tampered,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.text()
            .contains(&format!("Signature verification failed for image {id}")),
        "{}",
        r.text()
    );
    assert!(r.text().contains("does not match"), "{}", r.text());
    assert_eq!(t.status(&id).await, "queued");
    assert_eq!(t.stored_objects(), before);
    // The right data can still be uploaded afterwards.
    let r = t
        .req(
            Method::PUT,
            &format!("/v2/images/{id}/file"),
            ADMIN_TOKEN,
            Some("application/octet-stream"),
            d,
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(t.status(&id).await, "active");
}

#[tokio::test]
async fn a_signature_from_another_key_or_of_another_type_is_refused() {
    let t = setup().await;
    let (registered, other) = (ed25519_key(3), ed25519_key(4));
    let kid = t
        .add_key(ADMIN_TOKEN, &registered.public_key_pem().unwrap())
        .await;
    let d = data(10_000, 3);
    let (id, r) = t
        .create_and_upload(
            ADMIN_TOKEN,
            signed(&other, &kid, HashMethod::Sha256, &d),
            &d,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(t.status(&id).await, "queued");
    let mut props = signed(&registered, &kid, HashMethod::Sha256, &d);
    props["img_signature_key_type"] = json!("RSA-PSS");
    let (_, r) = t.create_and_upload(ADMIN_TOKEN, props, &d).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.text()
            .contains("img_signature_key_type is RSA-PSS but the key is Ed25519"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn an_unknown_or_foreign_key_id_is_refused() {
    let t = setup().await;
    let key = ed25519_key(5);
    let d = data(10_000, 4);
    let unknown = "0b5c5e43-0000-4000-8000-000000000000";
    let (_, r) = t
        .create_and_upload(
            ADMIN_TOKEN,
            signed(&key, unknown, HashMethod::Sha256, &d),
            &d,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.text().contains(&format!("no signing key {unknown}")),
        "{}",
        r.text()
    );
    // A key registered by another project does not verify this project's images.
    let (_, other) = t.user("other", "olga", "member").await;
    let foreign = t.add_key(&other, &key.public_key_pem().unwrap()).await;
    let (_, r) = t
        .create_and_upload(
            ADMIN_TOKEN,
            signed(&key, &foreign, HashMethod::Sha256, &d),
            &d,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

#[tokio::test]
async fn incomplete_or_malformed_signature_properties_are_refused() {
    let t = setup().await;
    let key = ed25519_key(6);
    let kid = t.add_key(ADMIN_TOKEN, &key.public_key_pem().unwrap()).await;
    let d = data(1000, 5);
    let good = signed(&key, &kid, HashMethod::Sha256, &d);
    let cases = [
        (
            "img_signature_hash_method",
            None,
            "but not img_signature_hash_method",
        ),
        (
            "img_signature_hash_method",
            Some("SHA-1"),
            "SHA-1' is not supported",
        ),
        (
            "img_signature_key_type",
            Some("DSA"),
            "'DSA' is not supported",
        ),
        ("img_signature", Some("%%%"), "not valid base64"),
    ];
    for (prop, value, want) in cases {
        let mut props = good.clone();
        match value {
            Some(v) => props[prop] = json!(v),
            None => {
                props.as_object_mut().unwrap().remove(prop);
            }
        }
        let (id, r) = t.create_and_upload(ADMIN_TOKEN, props, &d).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{prop}: {}", r.text());
        assert!(r.text().contains(want), "{prop}: {}", r.text());
        assert_eq!(t.status(&id).await, "queued");
    }
}

#[tokio::test]
async fn projects_that_require_signatures_refuse_unsigned_images() {
    let t = setup_with(|c| c.signing.require_signed_projects = vec!["signers".into()]).await;
    let (_, signer) = t.user("signers", "sam", "member").await;
    let (_, free) = t.user("free", "fred", "member").await;
    let d = data(20_000, 6);
    let (id, r) = t.create_and_upload(&signer, json!({}), &d).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert!(
        r.text()
            .contains("Project signers accepts only signed images"),
        "{}",
        r.text()
    );
    assert_eq!(t.status(&id).await, "queued");
    // Refused before a byte is received: upload, stage and resumable sessions never read the
    // body of an unsigned image.
    for (method, uri) in [
        (Method::PUT, format!("/v2/images/{id}/file")),
        (Method::PUT, format!("/v2/images/{id}/stage")),
        (Method::POST, format!("/v2/images/{id}/uploads")),
    ] {
        let polled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p = polled.clone();
        let body = Body::from_stream(futures_util::stream::once(async move {
            p.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from_static(b"data"))
        }));
        let r = t
            .req(
                method,
                &uri,
                &signer,
                Some("application/octet-stream"),
                body,
            )
            .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{uri}: {}", r.text());
        assert!(r.text().contains("accepts only signed images"), "{uri}");
        assert!(
            !polled.load(std::sync::atomic::Ordering::SeqCst),
            "{uri} read the body"
        );
        assert_eq!(t.status(&id).await, "queued");
    }
    // A signature naming a key the project does not have is refused up front too.
    let r = t
        .req(
            Method::PATCH,
            &format!("/v2/images/{id}"),
            &signer,
            Some(PATCH),
            json!([
                {"op": "add", "path": "/img_signature", "value": "AAAA"},
                {"op": "add", "path": "/img_signature_hash_method", "value": "SHA-256"},
                {"op": "add", "path": "/img_signature_key_type", "value": "ED25519"},
                {"op": "add", "path": "/img_signature_certificate_uuid",
                 "value": "00000000-0000-0000-0000-000000000000"}
            ])
            .to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = t
        .req(
            Method::PUT,
            &format!("/v2/images/{id}/file"),
            &signer,
            Some("application/octet-stream"),
            Body::empty(),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(r.text().contains("no signing key"), "{}", r.text());
    let key = ed25519_key(7);
    let kid = t.add_key(&signer, &key.public_key_pem().unwrap()).await;
    let (id, r) = t
        .create_and_upload(&signer, signed(&key, &kid, HashMethod::Sha256, &d), &d)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(t.status(&id).await, "active");
    let (id, r) = t.create_and_upload(&free, json!({}), &d).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(t.status(&id).await, "active");
}

#[tokio::test]
async fn signing_keys_are_registered_by_members_listed_by_readers_and_deleted_by_owners() {
    let t = setup().await;
    let (_, member) = t.user("team", "mia", "member").await;
    let reader_token = {
        let r = t
            .post(
                "/v3/users",
                ADMIN_TOKEN,
                json!({"user": {"name": "rita", "password": "pw"}}),
            )
            .await;
        let uid = r.json()["user"]["id"].as_str().unwrap().to_string();
        let projects = t.get("/v3/projects", ADMIN_TOKEN).await.json();
        let pid = projects["projects"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "team")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let r = t
            .req(
                Method::PUT,
                &format!("/v3/projects/{pid}/users/{uid}/roles/reader"),
                ADMIN_TOKEN,
                None,
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        t.token("rita", "team").await
    };
    let pem = ed25519_key(8).public_key_pem().unwrap();
    let r = t
        .post("/v2/signing-keys", &reader_token, json!({"key": pem}))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let kid = t.add_key(&member, &pem).await;
    let r = t
        .post("/v2/signing-keys", &member, json!({"key": pem}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.text());
    let r = t
        .post("/v2/signing-keys", &member, json!({"key": "not a key"}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let list = t.get("/v2/signing-keys", &reader_token).await.json();
    assert_eq!(list["signing_keys"][0]["id"], kid.as_str());
    assert_eq!(list["signing_keys"][0]["key_type"], "ED25519");
    assert_eq!(list["signing_keys"][0]["form"], "public_key");
    // Another project sees no keys in its list, may fetch the public key, may not delete it.
    let (_, other) = t.user("other", "otto", "member").await;
    let list = t.get("/v2/signing-keys", &other).await.json();
    assert_eq!(list["signing_keys"], json!([]));
    let r = t.get(&format!("/v2/signing-keys/{kid}"), &other).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["pem"].as_str().unwrap().trim(), pem.trim());
    let uri = format!("/v2/signing-keys/{kid}");
    let r = t
        .req(Method::DELETE, &uri, &other, None, Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = t
        .req(Method::DELETE, &uri, &reader_token, None, Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = t
        .req(Method::DELETE, &uri, &member, None, Body::empty())
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(t.get(&uri, &member).await.status, StatusCode::NOT_FOUND);
}

/// Run openssl with `args` in `dir`; `None` when openssl is not installed.
fn openssl(dir: &Path, args: &[&str]) -> Option<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

#[tokio::test]
async fn images_signed_with_openssl_as_glance_documents_are_verified() {
    let t = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let d = data(200_000, 9);
    std::fs::write(p.join("image.raw"), &d).unwrap();
    // Glance's documentation: an RSA key and certificate, `openssl dgst -sha256 -sign key
    // -sigopt rsa_padding_mode:pss`, the base64 signature in img_signature.
    if openssl(
        p,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "rsa.pem",
            "-out",
            "rsa.crt",
            "-days",
            "30",
            "-subj",
            "/CN=vmi image signer",
        ],
    )
    .is_none()
    {
        eprintln!("openssl is not installed; skipping");
        return;
    }
    // The certificate starts now; the registry's clock was set when it started.
    t.clock.set(chrono::Utc::now());
    let cert = std::fs::read_to_string(p.join("rsa.crt")).unwrap();
    let r = t
        .post(
            "/v2/signing-keys",
            ADMIN_TOKEN,
            json!({"certificate": cert}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.json()["form"], "certificate");
    assert_eq!(r.json()["subject"], "CN=vmi image signer");
    let kid = r.json()["id"].as_str().unwrap().to_string();
    for (dgst, method, extra) in [
        ("-sha256", "SHA-256", &[][..]),
        ("-sha384", "SHA-384", &[][..]),
        (
            "-sha512",
            "SHA-512",
            &["-sigopt", "rsa_pss_saltlen:digest"][..],
        ),
    ] {
        let mut args = vec![
            "dgst",
            dgst,
            "-sign",
            "rsa.pem",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-out",
            "image.sig",
        ];
        args.extend_from_slice(extra);
        args.push("image.raw");
        openssl(p, &args).unwrap();
        let sig = std::fs::read(p.join("image.sig")).unwrap();
        let props = json!({
            "img_signature": encode_signature(&sig),
            "img_signature_hash_method": method,
            "img_signature_key_type": "RSA-PSS",
            "img_signature_certificate_uuid": kid,
        });
        let (id, r) = t.create_and_upload(ADMIN_TOKEN, props, &d).await;
        assert_eq!(r.status, StatusCode::NO_CONTENT, "{method}: {}", r.text());
        assert_eq!(t.status(&id).await, "active");
    }
    // ECDSA on P-384 the same way (a DER signature).
    openssl(
        p,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:secp384r1",
            "-nodes",
            "-keyout",
            "ec.pem",
            "-out",
            "ec.crt",
            "-days",
            "30",
            "-subj",
            "/CN=ec",
        ],
    )
    .unwrap();
    openssl(
        p,
        &[
            "dgst",
            "-sha384",
            "-sign",
            "ec.pem",
            "-out",
            "ec.sig",
            "image.raw",
        ],
    )
    .unwrap();
    t.clock.set(chrono::Utc::now());
    let cert = std::fs::read_to_string(p.join("ec.crt")).unwrap();
    let kid = t.add_key(ADMIN_TOKEN, &cert).await;
    let props = json!({
        "img_signature": encode_signature(&std::fs::read(p.join("ec.sig")).unwrap()),
        "img_signature_hash_method": "SHA-384",
        "img_signature_key_type": "ECC_SECP384R1",
        "img_signature_certificate_uuid": kid,
    });
    let (_, r) = t.create_and_upload(ADMIN_TOKEN, props, &d).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let t = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    if openssl(
        p,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "k.pem",
            "-out",
            "c.pem",
            "-days",
            "1",
            "-subj",
            "/CN=short",
        ],
    )
    .is_none()
    {
        eprintln!("openssl is not installed; skipping");
        return;
    }
    t.clock.set(chrono::Utc::now());
    let key = PrivateKey::from_pem(&std::fs::read_to_string(p.join("k.pem")).unwrap()).unwrap();
    let kid = t
        .add_key(
            ADMIN_TOKEN,
            &std::fs::read_to_string(p.join("c.pem")).unwrap(),
        )
        .await;
    let d = data(50_000, 10);
    let (_, r) = t
        .create_and_upload(ADMIN_TOKEN, signed(&key, &kid, HashMethod::Sha256, &d), &d)
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    t.clock.advance(chrono::Duration::days(3));
    let (id, r) = t
        .create_and_upload(ADMIN_TOKEN, signed(&key, &kid, HashMethod::Sha256, &d), &d)
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert!(
        r.text().contains("the signing certificate expired at"),
        "{}",
        r.text()
    );
    assert_eq!(t.status(&id).await, "queued");
    // Registering an expired certificate is refused outright.
    let r = t
        .post(
            "/v2/signing-keys",
            ADMIN_TOKEN,
            json!({"key": std::fs::read_to_string(p.join("c.pem")).unwrap(), "name": "again"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

#[tokio::test]
async fn resumable_uploads_are_verified_when_they_finish() {
    use sha2::Digest;
    let t = setup().await;
    let key = ed25519_key(11);
    let kid = t.add_key(ADMIN_TOKEN, &key.public_key_pem().unwrap()).await;
    let d = data(70_000, 11);
    let wrong = data(70_000, 12);
    for (payload, want) in [
        (&wrong, StatusCode::BAD_REQUEST),
        (&d, StatusCode::NO_CONTENT),
    ] {
        let mut attrs = json!({"disk_format": "raw", "container_format": "bare"});
        for (k, v) in signed(&key, &kid, HashMethod::Sha256, &d)
            .as_object()
            .unwrap()
        {
            attrs[k] = v.clone();
        }
        let id = t.post("/v2/images", ADMIN_TOKEN, attrs).await.json()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let r = t
            .req(
                Method::POST,
                &format!("/v2/images/{id}/uploads"),
                ADMIN_TOKEN,
                None,
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
        let loc = r.headers["location"].to_str().unwrap().to_string();
        let r = t
            .req_with(
                Method::PATCH,
                &loc,
                ADMIN_TOKEN,
                None,
                payload.clone(),
                &[("upload-offset", "0")],
            )
            .await;
        assert!(r.status.is_success(), "{}", r.text());
        let sha = hex::encode(sha2::Sha256::digest(payload));
        let r = t
            .req(
                Method::PUT,
                &format!("{loc}?digest=sha256:{sha}"),
                ADMIN_TOKEN,
                None,
                Body::empty(),
            )
            .await;
        assert_eq!(r.status, want, "{}", r.text());
        let status = if want.is_success() {
            "active"
        } else {
            "queued"
        };
        assert_eq!(t.status(&id).await, status);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_signs_registers_uploads_and_verifies_downloads() {
    use clap::Parser;
    use vmi_registry::cli::{image_command, ImageArgs};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        image: ImageArgs,
    }

    let t = setup().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(t.reg.clone().serve(listener, async {
        let _ = stop_rx.await;
    }));
    let scratch = tempfile::tempdir().unwrap();
    let s = scratch.path();
    let src = s.join("disk.raw");
    let d = data(1_500_000, 13);
    std::fs::write(&src, &d).unwrap();
    let key = p256_key();
    std::fs::write(s.join("pub.pem"), key.public_key_pem().unwrap()).unwrap();
    let priv_pem = {
        use p256::pkcs8::EncodePrivateKey;
        let PrivateKey::P256(k) = &key else {
            unreachable!()
        };
        k.to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string()
    };
    std::fs::write(s.join("priv.pem"), priv_pem).unwrap();
    let env = vec![("VMI_TOKEN".to_string(), ADMIN_TOKEN.to_string())];
    let run = |argv: Vec<String>| {
        let url = url.clone();
        let env = env.clone();
        async move {
            let mut full = vec!["vmi-image".to_string(), "--url".to_string(), url];
            full.extend(argv);
            let cli = Cli::try_parse_from(full).unwrap();
            let mut out = Vec::new();
            let r = image_command(&cli.image, &env, &mut out, false).await;
            (r, String::from_utf8(out).unwrap())
        }
    };
    let p = |x: &str| s.join(x).display().to_string();
    let args = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    let (r, out) = run(args(&[
        "--json",
        "keys",
        "add",
        &p("pub.pem"),
        "--name",
        "ci",
    ]))
    .await;
    r.unwrap();
    let kid = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (r, out) = run(args(&["keys", "list"])).await;
    r.unwrap();
    assert!(out.contains(&kid) && out.contains("ECC_SECP256R1"), "{out}");

    // `vmi image sign` prints the properties; `create --sign` sets them itself.
    let (r, out) = run(args(&[
        "sign",
        &p("disk.raw"),
        "--key",
        &p("priv.pem"),
        "--key-id",
        &kid,
    ]))
    .await;
    r.unwrap();
    assert!(
        out.contains("img_signature_key_type=ECC_SECP256R1"),
        "{out}"
    );
    assert!(
        out.contains(&format!("img_signature_certificate_uuid={kid}")),
        "{out}"
    );
    let (r, out) = run(args(&[
        "--json",
        "create",
        "signed",
        "--file",
        &p("disk.raw"),
        "--sign",
        &p("priv.pem"),
        "--sign-key-id",
        &kid,
    ]))
    .await;
    r.unwrap();
    let img: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(img["status"], "active", "{out}");
    let id = img["id"].as_str().unwrap().to_string();

    // Download and verify with the registry's key, then with a local key.
    let (r, out) = run(args(&["download", &id, "-o", &p("out.raw"), "--verify"])).await;
    r.unwrap();
    assert!(
        out.contains("ECC_SECP256R1 SHA-256 signature verified"),
        "{out}"
    );
    let (r, out) = run(args(&[
        "download",
        &id,
        "-o",
        &p("out2.raw"),
        "--verify",
        "--key",
        &p("pub.pem"),
    ]))
    .await;
    r.unwrap();
    assert!(out.contains("verified with"), "{out}");

    // A signature that no longer matches (changed after activation) fails the client check.
    let other = signed(&p256_key(), &kid, HashMethod::Sha256, &d);
    let r = t
        .req(
            Method::PATCH,
            &format!("/v2/images/{id}"),
            ADMIN_TOKEN,
            Some(PATCH),
            json!([{"op": "replace", "path": "/img_signature",
                    "value": other["img_signature"]}])
            .to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let (r, _) = run(args(&["download", &id, "-o", &p("out3.raw"), "--verify"])).await;
    let e = r.unwrap_err();
    assert!(e.to_string().contains("signature verification of"), "{e}");
    // An unsigned image cannot be verified.
    let (r, out) = run(args(&[
        "--json",
        "create",
        "plain",
        "--file",
        &p("disk.raw"),
    ]))
    .await;
    r.unwrap();
    let plain = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (r, _) = run(args(&[
        "download",
        &plain,
        "-o",
        &p("out4.raw"),
        "--verify",
    ]))
    .await;
    assert!(r.unwrap_err().to_string().contains("is not signed"));

    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}

/// Many concurrent requests through a small connection pool all succeed (on PostgreSQL with
/// `VMI_TEST_POSTGRES_URL`, the pool of `pool_size=3` connections is shared by 48 requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_a_small_connection_pool() {
    let t = setup_with(|c| {
        if let Some(db) = &mut c.database {
            db.push_str("?pool_size=3");
        }
    })
    .await;
    let key = ed25519_key(20);
    let kid = t.add_key(ADMIN_TOKEN, &key.public_key_pem().unwrap()).await;
    let t = Arc::new(t);
    let mut tasks = Vec::new();
    for i in 0..48u8 {
        let t = t.clone();
        let key_id = kid.clone();
        tasks.push(tokio::spawn(async move {
            let d = data(4096, i);
            let key = ed25519_key(20);
            let (id, r) = t
                .create_and_upload(
                    ADMIN_TOKEN,
                    signed(&key, &key_id, HashMethod::Sha256, &d),
                    &d,
                )
                .await;
            assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
            assert_eq!(
                t.get("/v2/signing-keys", ADMIN_TOKEN).await.status,
                StatusCode::OK
            );
            id
        }));
    }
    for task in tasks {
        let id = task.await.unwrap();
        assert_eq!(t.status(&id).await, "active");
    }
}

/// With `VMI_TEST_POSTGRES_TLS_URL` (a server with `ssl=on`, e.g. `postgres://postgres@localhost:PORT`)
/// and `VMI_TEST_POSTGRES_TLS_ROOT` (the CA that issued its certificate), as tests/postgres.sh
/// sets them:
/// `sslmode=verify-full` with the right root connects over TLS, with another root it is refused,
/// and `sslmode=require` encrypts without a root.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_connections_use_tls_as_sslmode_asks() {
    use vmi_registry::catalog::postgres::PostgresCatalog;
    use vmi_registry::catalog::postgres_tls::ConnectOptions;
    let (Ok(base), Ok(root)) = (
        std::env::var("VMI_TEST_POSTGRES_TLS_URL"),
        std::env::var("VMI_TEST_POSTGRES_TLS_ROOT"),
    ) else {
        eprintln!("VMI_TEST_POSTGRES_TLS_URL/ROOT not set; skipping");
        return;
    };
    let ssl_in_use = |url: String| async move {
        let o = ConnectOptions::parse(&url).unwrap();
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(o.tls_config().unwrap());
        let (client, conn) = o.pg.connect(tls).await?;
        tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?;
        Ok::<bool, tokio_postgres::Error>(row.get(0))
    };
    let full = format!("{base}/postgres?sslmode=verify-full&sslrootcert={root}");
    assert!(ssl_in_use(full.clone()).await.unwrap());
    assert!(ssl_in_use(format!("{base}/postgres?sslmode=require"))
        .await
        .unwrap());
    assert!(!ssl_in_use(format!("{base}/postgres?sslmode=disable"))
        .await
        .unwrap());
    // The catalog itself over verify-full.
    let cat = PostgresCatalog::connect(&full).await.unwrap();
    assert_eq!(cat.pool_size(), 16);
    // Over the Unix-domain socket (no TLS there, as with libpq).
    if let Ok(sock) = std::env::var("VMI_TEST_POSTGRES_SOCKET") {
        let cat = PostgresCatalog::connect(&format!("{sock} user=postgres dbname=postgres"))
            .await
            .unwrap();
        assert_eq!(cat.pool_size(), 16);
        // sslmode does not apply to a local socket (libpq ignores it there too).
        PostgresCatalog::connect(&format!(
            "{sock} user=postgres dbname=postgres sslmode=verify-full sslrootcert={root}"
        ))
        .await
        .unwrap();
    }
    // A root that did not sign the server's certificate is refused.
    let other = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "k.pem",
            "-out",
            "c.pem",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .current_dir(other.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let wrong = format!(
        "{base}/postgres?sslmode=verify-full&sslrootcert={}",
        other.path().join("c.pem").display()
    );
    let e = PostgresCatalog::connect(&wrong).await.unwrap_err();
    assert!(
        vmi_registry::error::chain(&e)
            .to_lowercase()
            .contains("certificate"),
        "{}",
        vmi_registry::error::chain(&e)
    );
}

/// With `VMI_TEST_POSTGRES_CERT_URL` (a role the server authenticates with `cert` in
/// `pg_hba.conf`), `VMI_TEST_POSTGRES_CLIENT_CERT`/`_KEY` (a certificate for it from the CA the
/// server trusts) and `VMI_TEST_POSTGRES_TLS_ROOT`, as tests/postgres.sh and CI set them: the
/// catalog connects with `sslcert`/`sslkey`, is refused without them, and a key file others may
/// read is refused before connecting.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_client_certificates_authenticate_the_catalog() {
    use std::os::unix::fs::PermissionsExt;
    use vmi_registry::catalog::postgres::PostgresCatalog;
    use vmi_registry::catalog::postgres_tls::ConnectOptions;
    let (Ok(url), Ok(cert), Ok(key), Ok(root)) = (
        std::env::var("VMI_TEST_POSTGRES_CERT_URL"),
        std::env::var("VMI_TEST_POSTGRES_CLIENT_CERT"),
        std::env::var("VMI_TEST_POSTGRES_CLIENT_KEY"),
        std::env::var("VMI_TEST_POSTGRES_TLS_ROOT"),
    ) else {
        eprintln!("VMI_TEST_POSTGRES_CERT_URL/CLIENT_CERT/CLIENT_KEY not set; skipping");
        return;
    };
    let tls = format!("sslmode=verify-full&sslrootcert={root}");
    let with_cert = format!("{url}?{tls}&sslcert={cert}&sslkey={key}");
    let o = ConnectOptions::parse(&with_cert).unwrap();
    let (client, conn) =
        o.pg.connect(tokio_postgres_rustls::MakeRustlsConnect::new(
            o.tls_config().unwrap(),
        ))
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    let dn: Option<String> = row.get(0);
    assert!(dn.unwrap_or_default().contains("CN=vmi_cert"));
    PostgresCatalog::connect(&with_cert).await.unwrap();
    // The server wants the certificate.
    assert!(PostgresCatalog::connect(&format!("{url}?{tls}"))
        .await
        .is_err());
    // A key that others may read is refused before any connection.
    let dir = tempfile::tempdir().unwrap();
    let loose = dir.path().join("loose.key");
    std::fs::copy(&key, &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = PostgresCatalog::connect(&format!(
        "{url}?{tls}&sslcert={cert}&sslkey={}",
        loose.display()
    ))
    .await
    .unwrap_err();
    assert!(
        vmi_registry::error::chain(&e).contains("group or world access"),
        "{}",
        vmi_registry::error::chain(&e)
    );
}
