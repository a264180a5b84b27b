-- hmis-flow 0005: every record the broker can deliver has a dead letter that fits.
--
-- A record without a value (a tombstone) is stored with payload_encoding 'null' and an
-- empty payload: before this, the sink's insert broke the CHECK and the pipeline stopped on
-- that record at every restart (issue 11). A key that is not UTF-8 (or holds NUL, which
-- text cannot store) is stored as base64, said by key_encoding; keys that are text stay
-- as they were ('utf8').

ALTER TABLE dead_letters DROP CONSTRAINT IF EXISTS dead_letters_payload_encoding_check;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_payload_encoding_check
    CHECK (payload_encoding IN ('utf8', 'base64', 'null'));
ALTER TABLE dead_letters ADD COLUMN key_encoding text NOT NULL DEFAULT 'utf8'
    CHECK (key_encoding IN ('utf8', 'base64'));
