-- vmi registry catalog, sqlite, version 2: interoperable import tasks and converted-download cache.
-- Stands alone on version 1 (no foreign keys to other branches' tables).

-- One import per image at a time: the staged data, the method, and the lease of the node
-- running it (a node that dies leaves an expired lease that another node takes over).
CREATE TABLE import_tasks (
    image_id          TEXT PRIMARY KEY,
    method            TEXT NOT NULL,
    uri               TEXT,
    staging_location  TEXT,
    staging_size      INTEGER,
    state             TEXT NOT NULL,
    lease_token       TEXT,
    lease_expires     TEXT,
    attempts          INTEGER NOT NULL DEFAULT 0,
    message           TEXT,
    created_at        TEXT NOT NULL,
    updated_at        TEXT NOT NULL
);
CREATE INDEX import_tasks_lease ON import_tasks (state, lease_expires);

-- Converted copies of an image's data served by GET …/file?format=, keyed by the source digest.
CREATE TABLE image_conversions (
    image_id       TEXT NOT NULL,
    source_sha256  TEXT NOT NULL,
    format         TEXT NOT NULL,
    location       TEXT NOT NULL,
    size           INTEGER NOT NULL,
    md5            TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (image_id, source_sha256, format)
);
