-- vmi registry catalog, version 7: a version is unique within one owner's family, enforced by
-- the database so that two nodes creating the same version at once cannot both succeed. One
-- row per image that is not deleted and has a family and a version; version_key is the
-- version's canonical text (equal versions, such as 2024.06.01 and 20240601, share it). The
-- rows of existing images are added by the catalog right after this script (the key is
-- computed in Rust).
CREATE TABLE family_versions (
    image_id    TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    family      TEXT NOT NULL,
    version_key TEXT NOT NULL,
    UNIQUE (owner, family, version_key)
);
