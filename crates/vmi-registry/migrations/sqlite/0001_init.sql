-- vmi registry catalog, SQLite, version 1: images, tags, properties, members, identity.
CREATE TABLE images (
    id               TEXT PRIMARY KEY,
    name             TEXT,
    status           TEXT NOT NULL,
    visibility       TEXT NOT NULL,
    owner            TEXT NOT NULL,
    disk_format      TEXT,
    container_format TEXT,
    size             INTEGER,
    virtual_size     INTEGER,
    checksum         TEXT,
    os_hash_algo     TEXT,
    os_hash_value    TEXT,
    sha256           TEXT,
    min_disk         INTEGER NOT NULL DEFAULT 0,
    min_ram          INTEGER NOT NULL DEFAULT 0,
    protected        INTEGER NOT NULL DEFAULT 0,
    os_hidden        INTEGER NOT NULL DEFAULT 0,
    location         TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL
);
CREATE INDEX images_owner ON images (owner);
CREATE INDEX images_status ON images (status);
CREATE INDEX images_visibility ON images (visibility);
CREATE INDEX images_created_at ON images (created_at, id);

CREATE TABLE image_tags (
    image_id TEXT NOT NULL REFERENCES images (id),
    tag      TEXT NOT NULL,
    PRIMARY KEY (image_id, tag)
);
CREATE INDEX image_tags_tag ON image_tags (tag);

CREATE TABLE image_properties (
    image_id TEXT NOT NULL REFERENCES images (id),
    name     TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (image_id, name)
);

CREATE TABLE image_members (
    image_id   TEXT NOT NULL REFERENCES images (id),
    member_id  TEXT NOT NULL,
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (image_id, member_id)
);
CREATE INDEX image_members_member ON image_members (member_id);

CREATE TABLE projects (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE
);

CREATE TABLE users (
    id                 TEXT PRIMARY KEY,
    name               TEXT NOT NULL UNIQUE,
    password_hash      TEXT,
    default_project_id TEXT,
    enabled            INTEGER NOT NULL DEFAULT 1
);

CREATE TABLE role_assignments (
    user_id    TEXT NOT NULL REFERENCES users (id),
    project_id TEXT NOT NULL REFERENCES projects (id),
    role       TEXT NOT NULL,
    PRIMARY KEY (user_id, project_id, role)
);

CREATE TABLE tokens (
    token_hash TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users (id),
    project_id TEXT NOT NULL REFERENCES projects (id),
    kind       TEXT NOT NULL,
    issued_at  TEXT NOT NULL,
    expires_at TEXT
);
