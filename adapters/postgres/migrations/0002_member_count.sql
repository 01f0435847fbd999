-- 0002: servers.member_count, kept by triggers on server_members (PROTOCOL section 14:
-- READY says each server's memberCount and whether it is large; no count(*) per
-- IDENTIFY). Every insert or delete of a membership row, a cascade included, moves the
-- count by one in the same transaction.

ALTER TABLE servers ADD COLUMN member_count integer NOT NULL DEFAULT 0
    CONSTRAINT servers_member_count_check CHECK (member_count >= 0);

UPDATE servers s
SET member_count = c.n
FROM (SELECT server_id, count(*) AS n FROM server_members GROUP BY server_id) c
WHERE s.id = c.server_id;

CREATE FUNCTION server_members_count() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE servers SET member_count = member_count + 1 WHERE id = NEW.server_id;
        RETURN NEW;
    END IF;
    UPDATE servers SET member_count = member_count - 1 WHERE id = OLD.server_id;
    RETURN OLD;
END
$$;

CREATE TRIGGER server_members_count
AFTER INSERT OR DELETE ON server_members
FOR EACH ROW EXECUTE FUNCTION server_members_count();
