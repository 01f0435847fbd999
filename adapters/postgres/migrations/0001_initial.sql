-- 0001: the directory (PROTOCOL section 11) and the users' status.
--
-- Ids are opaque strings compared byte for byte: they use the "C" collation, so
-- that equality and ORDER BY mean the same thing as in Python (code point order)
-- and their indexes are as cheap as text indexes get.

CREATE TABLE users (
    id           text COLLATE "C" PRIMARY KEY,
    username     text NOT NULL,
    display_name text,
    avatar_url   text,
    status       text NOT NULL DEFAULT 'offline',
    -- Deferrable so that one load may swap two usernames.
    CONSTRAINT users_username_key UNIQUE (username) DEFERRABLE INITIALLY IMMEDIATE,
    CONSTRAINT users_status_check
        CHECK (status IN ('online', 'idle', 'dnd', 'invisible', 'offline'))
);

CREATE TABLE servers (
    id       text COLLATE "C" PRIMARY KEY,
    name     text NOT NULL,
    owner_id text COLLATE "C" NOT NULL REFERENCES users (id),
    icon_url text
);
CREATE INDEX servers_owner_id_idx ON servers (owner_id);

CREATE TABLE server_members (
    server_id text COLLATE "C" NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    user_id   text COLLATE "C" NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    PRIMARY KEY (server_id, user_id)
);
-- IDENTIFY: the servers of one user (covering, for index-only scans).
CREATE INDEX server_members_user_id_idx ON server_members (user_id, server_id);

CREATE TABLE roles (
    id          text COLLATE "C" PRIMARY KEY,
    server_id   text COLLATE "C" NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    name        text NOT NULL,
    permissions bigint NOT NULL DEFAULT 0 CHECK (permissions >= 0),
    -- The target of member_roles' foreign key: a member's role is of the same server.
    CONSTRAINT roles_server_id_id_key UNIQUE (server_id, id)
);

CREATE TABLE member_roles (
    server_id text COLLATE "C" NOT NULL,
    user_id   text COLLATE "C" NOT NULL,
    role_id   text COLLATE "C" NOT NULL,
    PRIMARY KEY (server_id, user_id, role_id),
    FOREIGN KEY (server_id, user_id)
        REFERENCES server_members (server_id, user_id) ON DELETE CASCADE,
    FOREIGN KEY (server_id, role_id)
        REFERENCES roles (server_id, id) ON DELETE CASCADE
);
-- For the cascade when a role is deleted.
CREATE INDEX member_roles_role_idx ON member_roles (server_id, role_id);

CREATE TABLE channels (
    id        text COLLATE "C" PRIMARY KEY,
    server_id text COLLATE "C" NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    name      text NOT NULL,
    type      text NOT NULL DEFAULT 'text'
);
CREATE INDEX channels_server_id_idx ON channels (server_id);

CREATE TABLE channel_overwrites (
    channel_id  text COLLATE "C" NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    target_id   text COLLATE "C" NOT NULL,  -- a role id or a user id
    target_type text NOT NULL CHECK (target_type IN ('role', 'member')),
    allow       bigint NOT NULL DEFAULT 0 CHECK (allow >= 0),
    deny        bigint NOT NULL DEFAULT 0 CHECK (deny >= 0),
    PRIMARY KEY (channel_id, target_id, target_type)
);
