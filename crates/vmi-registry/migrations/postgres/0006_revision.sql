-- vmi registry catalog, PostgreSQL, version 6: a revision per image, bumped by every change to the
-- image, its tags or its properties. update_image compares it (with the status), so a writer
-- that read an older revision cannot overwrite what another request stored since.
ALTER TABLE images ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
-- Derived images share their template's stored object: deletion asks whether another image
-- still refers to a location before removing it.
CREATE INDEX images_location ON images (location);
