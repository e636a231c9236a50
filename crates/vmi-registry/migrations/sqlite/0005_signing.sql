-- vmi registry catalog, SQLite, version 5: signing keys registered per project (image signatures).
CREATE TABLE signing_keys (
    id          TEXT PRIMARY KEY,
    project_id  TEXT NOT NULL,
    name        TEXT,
    form        TEXT NOT NULL,
    key_type    TEXT NOT NULL,
    pem         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    not_before  TEXT,
    not_after   TEXT,
    subject     TEXT,
    created_by  TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (project_id, fingerprint)
);
CREATE INDEX signing_keys_project ON signing_keys (project_id, created_at);
