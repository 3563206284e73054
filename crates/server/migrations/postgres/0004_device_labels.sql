-- The device id a client gave (X-Device-Id / device_id, or `sessions issue --device-id`), kept as a
-- label so operators see "laptop" rather than a hash. NULL for fingerprinted devices (no id given).
ALTER TABLE devices ADD COLUMN label TEXT;
CREATE INDEX sessions_user_device ON sessions(user_id, device_hash);
