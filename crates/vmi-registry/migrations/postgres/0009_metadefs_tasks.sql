-- vmi registry catalog, postgres, version 9: metadata definition namespaces and the tasks API.

-- One row per metadata definition namespace; its objects, properties, tags and resource type
-- associations travel with it as one JSON document (`body`), changed by compare-and-swap on
-- `revision`.
CREATE TABLE metadef_namespaces (
    namespace   TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    visibility  TEXT NOT NULL,
    protected   BOOLEAN NOT NULL,
    body        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    revision    BIGINT NOT NULL DEFAULT 0
);

-- Which standard definition sets were loaded (each is loaded once, on the first start).
CREATE TABLE metadef_loads (
    what       TEXT PRIMARY KEY,
    loaded_at  TEXT NOT NULL
);

-- Glance tasks (`/v2/tasks`): one per import request.
CREATE TABLE tasks (
    id          TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    status      TEXT NOT NULL,
    owner       TEXT NOT NULL,
    image_id    TEXT,
    user_id     TEXT,
    request_id  TEXT,
    input       TEXT NOT NULL,
    result      TEXT,
    message     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    expires_at  TEXT
);
CREATE INDEX tasks_image ON tasks (image_id, created_at);
CREATE INDEX tasks_owner ON tasks (owner, created_at);
