-- vmi registry catalog, SQLite, version 3: image lineage (what each image was derived from).
-- One row per derived image; the parent stays referenced even once deleted (images keep
-- tombstones), so ancestry survives deletions.
CREATE TABLE image_lineage (
    image_id             TEXT PRIMARY KEY REFERENCES images (id),
    parent_id            TEXT NOT NULL REFERENCES images (id),
    parent_sha256        TEXT,
    parent_os_hash_value TEXT,
    relation             TEXT NOT NULL,
    build                TEXT,
    recorded_by          TEXT NOT NULL,
    recorded_project     TEXT NOT NULL,
    recorded_at          TEXT NOT NULL
);
CREATE INDEX image_lineage_parent ON image_lineage (parent_id, image_id);
-- Family lookups filter image_properties by name and value.
CREATE INDEX image_properties_name_value ON image_properties (name, value);
