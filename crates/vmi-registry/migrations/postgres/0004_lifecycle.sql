-- vmi registry catalog, PostgreSQL, version 4: lifecycle leader lease, recycle bin, audit log.
-- Lifecycle states and schedules themselves are image properties (vmi_lifecycle_state, …).

-- One row per background job: the node holding it until expires_at (a compare-and-swap upsert).
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at TEXT NOT NULL
);

-- Images in pending_delete: what they were before, and when their data goes for good.
CREATE TABLE recycle_bin (
    image_id        TEXT PRIMARY KEY REFERENCES images (id),
    previous_status TEXT NOT NULL,
    deleted_at      TEXT NOT NULL,
    purge_at        TEXT NOT NULL,
    deleted_by      TEXT
);
CREATE INDEX recycle_bin_purge_at ON recycle_bin (purge_at);

-- Every change: who, what, when, and how it ended.
CREATE TABLE audit_events (
    id         BIGSERIAL PRIMARY KEY,
    at         TEXT NOT NULL,
    user_id    TEXT,
    project_id TEXT,
    method     TEXT NOT NULL,
    path       TEXT NOT NULL,
    image_id   TEXT,
    action     TEXT NOT NULL,
    status     BIGINT NOT NULL,
    detail     TEXT
);
CREATE INDEX audit_events_project ON audit_events (project_id, id);
CREATE INDEX audit_events_image ON audit_events (image_id, id);
CREATE INDEX audit_events_at ON audit_events (at);
