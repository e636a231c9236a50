-- vmi registry catalog, version 8: leases of direct uploads. The node streaming an upload holds
-- the lease of its image and renews it while the body arrives; when the node dies the lease
-- runs out and any node returns the image from saving to queued and removes the partial data.
CREATE TABLE upload_leases (
    image_id    TEXT PRIMARY KEY,
    node_id     TEXT NOT NULL,
    token       TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);
CREATE INDEX upload_leases_expiry ON upload_leases (expires_at);
