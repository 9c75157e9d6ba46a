-- supabase_platform.sql
--
-- A FRESH Supabase project, as the platform leaves it, modelled on plain
-- PostgreSQL 15/17 (no Supabase extensions; contrib only).  Run as a superuser
-- (our test clusters: the bootstrap superuser "postgres") inside an already
-- created database:
--
--   psql -v ON_ERROR_STOP=1 -d <db> -f supabase_platform.sql
--
-- Roles are cluster-wide and are created idempotently, so this file can be
-- loaded into several databases of one cluster.  Everything else is per
-- database and expects an empty database.
--
-- Sources (read, then re-written small):
--   supabase/postgres  migrations/db/init-scripts/0000000000000{0,1,2,3}-*.sql,
--                      migrations/db/migrations/*.sql (demote-postgres,
--                      revoke_admin_roles_from_postgres, enable_webhooks_by_default,
--                      grant_storage_*_to_postgres_with_grant_option, ...),
--                      ansible/files/pgbouncer_config/pgbouncer_auth_schema.sql
--   supabase/auth      migrations/* (users, identities, auth.jwt(), RLS on auth tables)
--   supabase/storage   migrations/tenant/0002-storage-schema.sql, 0010-...updated_at...
--   supabase/cli       pkg/migration/history.go (supabase_migrations.*)
--
-- Deliberate simplifications: only the tables a backup cares about; no
-- pg_graphql / pg_net / pgsodium / supabase_vault (not in contrib), hence no
-- "graphql", "net" or "vault" schemas; real Supabase's postgres role is NOT a
-- superuser (here it is, because it bootstraps the test cluster).

SET client_min_messages = warning;

-------------------------------------------------------------------------------
-- 1. Reserved roles (cluster-wide, idempotent).  Attributes follow the
--    init-scripts plus later migrations (API roles made INHERIT in
--    20230529180330; CREATEROLE revoked from supabase_auth_admin in 20260821...).
-------------------------------------------------------------------------------
DO $roles$
DECLARE
  r record;
BEGIN
  FOR r IN SELECT * FROM (VALUES
    -- platform superuser; owns the platform schemas
    ('supabase_admin',             'LOGIN SUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS'),
    -- PostgREST roles: anon / authenticated / service_role are switched to by authenticator
    ('anon',                       'NOLOGIN INHERIT'),
    ('authenticated',              'NOLOGIN INHERIT'),
    ('service_role',               'NOLOGIN INHERIT BYPASSRLS'),
    ('authenticator',              'LOGIN NOINHERIT'),
    -- service roles (GoTrue, Storage, Realtime, webhooks)
    ('supabase_auth_admin',        'LOGIN NOINHERIT NOREPLICATION'),
    ('supabase_storage_admin',     'LOGIN NOINHERIT CREATEROLE NOREPLICATION'),
    ('supabase_realtime_admin',    'LOGIN NOINHERIT CREATEROLE REPLICATION'),
    ('supabase_functions_admin',   'LOGIN NOINHERIT CREATEROLE NOREPLICATION'),
    ('supabase_replication_admin', 'LOGIN REPLICATION'),
    ('supabase_etl_admin',         'LOGIN REPLICATION'),
    ('supabase_read_only_user',    'LOGIN BYPASSRLS'),
    ('supabase_superuser',         'NOLOGIN'),
    ('dashboard_user',             'NOLOGIN NOSUPERUSER CREATEDB CREATEROLE REPLICATION'),
    ('pgbouncer',                  'LOGIN')
  ) AS v(name, attrs)
  LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.name) THEN
      EXECUTE format('CREATE ROLE %I %s', r.name, r.attrs);
    END IF;
  END LOOP;
END
$roles$;

-- Memberships (re-granting only raises a NOTICE, so these are idempotent too).
GRANT anon, authenticated, service_role TO authenticator;
GRANT anon, authenticated, service_role TO supabase_realtime_admin;
GRANT pg_read_all_data TO supabase_read_only_user;
GRANT pg_monitor, pg_signal_backend TO supabase_superuser;
GRANT supabase_superuser TO postgres;
GRANT supabase_functions_admin TO postgres;
-- 20250605172253: on PG16+ postgres administers the API roles.
DO $$
BEGIN
  IF current_setting('server_version_num')::int >= 160000 THEN
    GRANT anon, authenticated, service_role TO postgres WITH ADMIN OPTION;
  END IF;
END
$$;

-- Per-role settings (global: they live in pg_db_role_setting with no database).
ALTER ROLE anon                     SET statement_timeout = '3s';
ALTER ROLE authenticated            SET statement_timeout = '8s';
ALTER ROLE authenticator            SET statement_timeout = '8s';
ALTER ROLE authenticator            SET lock_timeout = '8s';
ALTER ROLE supabase_admin           SET search_path = "$user", public, auth, extensions;
ALTER ROLE postgres                 SET search_path = "$user", public, extensions;
ALTER ROLE supabase_auth_admin      SET search_path = auth;
ALTER ROLE supabase_storage_admin   SET search_path = storage;
ALTER ROLE supabase_functions_admin SET search_path = supabase_functions;
ALTER ROLE supabase_realtime_admin  SET search_path = public, extensions, realtime;

-- Database-level grants (the project database is "postgres" on Supabase; here
-- whatever database we are loaded into).
DO $$
BEGIN
  EXECUTE format('GRANT ALL ON DATABASE %I TO dashboard_user', current_database());
  EXECUTE format('GRANT CREATE ON DATABASE %I TO supabase_auth_admin, supabase_storage_admin, supabase_realtime_admin',
                 current_database());
END
$$;

-------------------------------------------------------------------------------
-- 2. public schema and the project's DEFAULT PRIVILEGES.
--    The init-scripts run as postgres, so "alter default privileges in schema
--    public ..." is recorded FOR ROLE postgres; the same is set FOR ROLE
--    supabase_admin.  Every table/sequence/function the user creates in public
--    is therefore born with ALL granted to anon, authenticated, service_role.
-------------------------------------------------------------------------------
GRANT USAGE ON SCHEMA public TO postgres, anon, authenticated, service_role;
GRANT CREATE, USAGE ON SCHEMA public TO supabase_realtime_admin;

ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
  GRANT ALL ON TABLES    TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
  GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
  GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA public
  GRANT ALL ON TABLES    TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA public
  GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA public
  GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;

-------------------------------------------------------------------------------
-- 3. extensions schema (created by the init-scripts as postgres) and the
--    extensions Supabase installs there.
-------------------------------------------------------------------------------
-- A fresh project has uuid-ossp, pgcrypto and pg_stat_statements here (plus
-- pg_graphql/supabase_vault elsewhere).  uuid-ossp is left out: the portable
-- PG17 binaries we test with lack libossp-uuid, so it cannot be loaded there.
CREATE SCHEMA extensions;
CREATE EXTENSION IF NOT EXISTS pgcrypto           WITH SCHEMA extensions;
CREATE EXTENSION IF NOT EXISTS pg_stat_statements WITH SCHEMA extensions;
GRANT USAGE ON SCHEMA extensions TO postgres, anon, authenticated, service_role, supabase_realtime_admin;
GRANT ALL ON SCHEMA extensions TO dashboard_user;
-- ACLs on extension member functions: pg_dump emits these as GRANTs.
GRANT ALL ON ALL ROUTINES IN SCHEMA extensions TO dashboard_user;

-- PostgREST schema-cache event triggers (owned by supabase_admin since
-- 20250402065937).  They only NOTIFY; harmless but they show up in dumps.
SET ROLE supabase_admin;
CREATE FUNCTION extensions.pgrst_ddl_watch() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE cmd record;
BEGIN
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    IF cmd.schema_name IS DISTINCT FROM 'pg_temp' THEN
      NOTIFY pgrst, 'reload schema';
    END IF;
  END LOOP;
END $$;
CREATE FUNCTION extensions.pgrst_drop_watch() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE obj record;
BEGIN
  FOR obj IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP
    IF obj.is_temporary IS false THEN
      NOTIFY pgrst, 'reload schema';
    END IF;
  END LOOP;
END $$;
CREATE EVENT TRIGGER pgrst_ddl_watch ON ddl_command_end EXECUTE FUNCTION extensions.pgrst_ddl_watch();
CREATE EVENT TRIGGER pgrst_drop_watch ON sql_drop EXECUTE FUNCTION extensions.pgrst_drop_watch();
RESET ROLE;

-------------------------------------------------------------------------------
-- 4. auth (GoTrue).  Schema owned by supabase_admin, tables and functions
--    owned by supabase_auth_admin.
-------------------------------------------------------------------------------
CREATE SCHEMA auth AUTHORIZATION supabase_admin;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role, postgres, supabase_realtime_admin;
GRANT ALL ON SCHEMA auth TO supabase_auth_admin, dashboard_user;

SET ROLE supabase_auth_admin;

CREATE TABLE auth.users (
  instance_id                 uuid,
  id                          uuid NOT NULL PRIMARY KEY,
  aud                         varchar(255),
  role                        varchar(255),
  email                       varchar(255),
  encrypted_password          varchar(255),
  email_confirmed_at          timestamptz,
  invited_at                  timestamptz,
  confirmation_token          varchar(255),
  confirmation_sent_at        timestamptz,
  recovery_token              varchar(255),
  recovery_sent_at            timestamptz,
  email_change_token_new      varchar(255),
  email_change                varchar(255),
  email_change_sent_at        timestamptz,
  last_sign_in_at             timestamptz,
  raw_app_meta_data           jsonb,
  raw_user_meta_data          jsonb,
  is_super_admin              boolean,
  created_at                  timestamptz,
  updated_at                  timestamptz,
  phone                       text UNIQUE DEFAULT NULL,
  phone_confirmed_at          timestamptz,
  phone_change                text DEFAULT '',
  phone_change_token          varchar(255) DEFAULT '',
  phone_change_sent_at        timestamptz,
  -- generated column: a dump must not carry its values
  confirmed_at                timestamptz GENERATED ALWAYS AS (LEAST(email_confirmed_at, phone_confirmed_at)) STORED,
  email_change_token_current  varchar(255) DEFAULT '',
  email_change_confirm_status smallint DEFAULT 0 CHECK (email_change_confirm_status >= 0 AND email_change_confirm_status <= 2),
  banned_until                timestamptz,
  reauthentication_token      varchar(255) DEFAULT '',
  reauthentication_sent_at    timestamptz,
  is_sso_user                 boolean NOT NULL DEFAULT false,
  deleted_at                  timestamptz,
  is_anonymous                boolean NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX users_email_partial_key ON auth.users (email) WHERE is_sso_user = false;
CREATE INDEX users_instance_id_idx ON auth.users (instance_id);
COMMENT ON TABLE auth.users IS 'Auth: Stores user login data within a secure schema.';

CREATE TABLE auth.identities (
  provider_id     text NOT NULL,
  user_id         uuid NOT NULL REFERENCES auth.users (id) ON DELETE CASCADE,
  identity_data   jsonb NOT NULL,
  provider        text NOT NULL,
  last_sign_in_at timestamptz,
  created_at      timestamptz,
  updated_at      timestamptz,
  email           text GENERATED ALWAYS AS (lower(identity_data ->> 'email')) STORED,
  id              uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
  CONSTRAINT identities_provider_id_provider_unique UNIQUE (provider_id, provider)
);
CREATE INDEX identities_user_id_idx ON auth.identities (user_id);
COMMENT ON TABLE auth.identities IS 'Auth: Stores identities associated to a user.';

-- a serial-backed table, so the platform schema owns a sequence too
CREATE TABLE auth.refresh_tokens (
  instance_id uuid,
  id          bigserial PRIMARY KEY,
  token       varchar(255) UNIQUE,
  user_id     varchar(255),
  revoked     boolean,
  created_at  timestamptz,
  updated_at  timestamptz,
  parent      varchar(255),
  session_id  uuid
);

-- GoTrue's migration bookkeeping
CREATE TABLE auth.schema_migrations (
  version varchar(255) NOT NULL PRIMARY KEY
);
COMMENT ON TABLE auth.schema_migrations IS 'Auth: Manages updates to the auth system.';

-- Helpers used in RLS policies.  Current GoTrue versions read both the legacy
-- per-claim settings and request.jwt.claims (set by PostgREST).
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;
CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;
CREATE FUNCTION auth.email() RETURNS text LANGUAGE sql STABLE AS $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.email', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
  )::text
$$;
CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;
COMMENT ON FUNCTION auth.uid() IS 'Deprecated. Use auth.jwt() -> ''sub'' instead.';

-- RLS is enabled (no policies) on every auth table since 20240612123726.
ALTER TABLE auth.users             ENABLE ROW LEVEL SECURITY;
ALTER TABLE auth.identities        ENABLE ROW LEVEL SECURITY;
ALTER TABLE auth.refresh_tokens    ENABLE ROW LEVEL SECURITY;
ALTER TABLE auth.schema_migrations ENABLE ROW LEVEL SECURITY;

-- The GoTrue migrations already applied in a fresh project (a subset).
INSERT INTO auth.schema_migrations (version) VALUES
  ('20171026211738'), ('20171026211808'), ('20171026211834'), ('20180103212743'),
  ('20180108183307'), ('20180119214651'), ('20180125194653'), ('00'),
  ('20210710035447'), ('20210722035447'), ('20210730183235'), ('20210909172000'),
  ('20220531120530'), ('20231117164230'), ('20240612123726'), ('20240624145325');

RESET ROLE;

-- postgres and dashboard_user get everything (demote-postgres / post-setup);
-- postgres also holds SELECT WITH GRANT OPTION (auth 20240612123726).  The
-- migration table is locked down (20250421084701) except for that SELECT.
GRANT ALL ON ALL TABLES    IN SCHEMA auth TO postgres, dashboard_user;
GRANT ALL ON ALL SEQUENCES IN SCHEMA auth TO postgres, dashboard_user;
GRANT ALL ON ALL ROUTINES  IN SCHEMA auth TO postgres, dashboard_user;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA auth TO supabase_realtime_admin;
GRANT SELECT ON auth.users, auth.identities, auth.refresh_tokens TO postgres WITH GRANT OPTION;
REVOKE ALL ON auth.schema_migrations FROM postgres, dashboard_user;
GRANT SELECT ON auth.schema_migrations TO postgres WITH GRANT OPTION;

-------------------------------------------------------------------------------
-- 5. storage.  Schema owned by supabase_admin; objects created by
--    supabase_storage_admin, whose default privileges hand ALL to the API roles.
-------------------------------------------------------------------------------
CREATE SCHEMA storage AUTHORIZATION supabase_admin;
GRANT USAGE ON SCHEMA storage TO postgres WITH GRANT OPTION;
GRANT USAGE ON SCHEMA storage TO anon, authenticated, service_role;
GRANT ALL ON SCHEMA storage TO supabase_storage_admin WITH GRANT OPTION;
GRANT ALL ON SCHEMA storage TO dashboard_user;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_storage_admin IN SCHEMA storage
  GRANT ALL ON TABLES    TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_storage_admin IN SCHEMA storage
  GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_storage_admin IN SCHEMA storage
  GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;

SET ROLE supabase_storage_admin;

-- Storage API's migration bookkeeping
CREATE TABLE storage.migrations (
  id          integer PRIMARY KEY,
  name        varchar(100) UNIQUE NOT NULL,
  hash        varchar(40) NOT NULL,
  executed_at timestamp DEFAULT current_timestamp
);

CREATE TYPE storage.buckettype AS ENUM ('STANDARD', 'ANALYTICS');

CREATE TABLE storage.buckets (
  id                 text NOT NULL PRIMARY KEY,
  name               text NOT NULL,
  owner              uuid,            -- deprecated, see owner_id
  created_at         timestamptz DEFAULT now(),
  updated_at         timestamptz DEFAULT now(),
  public             boolean DEFAULT false,
  avif_autodetection boolean DEFAULT false,
  file_size_limit    bigint,
  allowed_mime_types text[],
  owner_id           text,
  type               storage.buckettype NOT NULL DEFAULT 'STANDARD'
);
CREATE UNIQUE INDEX bname ON storage.buckets (name);

CREATE TABLE storage.objects (
  id               uuid NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
  bucket_id        text CONSTRAINT "objects_bucketId_fkey" REFERENCES storage.buckets (id),
  name             text,
  owner            uuid,              -- deprecated, see owner_id
  created_at       timestamptz DEFAULT now(),
  updated_at       timestamptz DEFAULT now(),
  last_accessed_at timestamptz DEFAULT now(),
  metadata         jsonb,
  path_tokens      text[] GENERATED ALWAYS AS (string_to_array(name, '/')) STORED,
  version          text,
  owner_id         text,
  user_metadata    jsonb
);
CREATE UNIQUE INDEX bucketid_objname ON storage.objects (bucket_id, name);
CREATE INDEX name_prefix_search ON storage.objects (name text_pattern_ops);

-- A fresh project: RLS enabled, no policies (users add their own).
ALTER TABLE storage.buckets    ENABLE ROW LEVEL SECURITY;
ALTER TABLE storage.objects    ENABLE ROW LEVEL SECURITY;
ALTER TABLE storage.migrations ENABLE ROW LEVEL SECURITY;

-- Helpers used in storage policies.
CREATE FUNCTION storage.foldername(name text) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE _parts text[];
BEGIN
  select string_to_array(name, '/') into _parts;
  return _parts[1:array_length(_parts, 1) - 1];
END $$;
CREATE FUNCTION storage.filename(name text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE _parts text[];
BEGIN
  select string_to_array(name, '/') into _parts;
  return _parts[array_length(_parts, 1)];
END $$;
CREATE FUNCTION storage.extension(name text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE _parts text[]; _filename text;
BEGIN
  select string_to_array(name, '/') into _parts;
  select _parts[array_length(_parts, 1)] into _filename;
  return reverse(split_part(reverse(_filename), '.', 1));
END $$;

-- Platform trigger (storage migration 0010).
CREATE FUNCTION storage.update_updated_at_column() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  NEW.updated_at = now();
  RETURN NEW;
END $$;
CREATE TRIGGER update_objects_updated_at BEFORE UPDATE ON storage.objects
  FOR EACH ROW EXECUTE FUNCTION storage.update_updated_at_column();

-- Platform guard (storage migration 0055-prevent-direct-deletes): rows of storage's
-- tables are deleted by the Storage server only, which sets storage.allow_delete_query.
CREATE FUNCTION storage.protect_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF coalesce(current_setting('storage.allow_delete_query', true), 'false') <> 'true' THEN
    RAISE EXCEPTION 'Direct deletion from storage tables is not allowed. Use the Storage API instead.'
      USING HINT = 'This prevents accidental data loss from orphaned objects.',
            ERRCODE = '42501';
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER protect_objects_delete BEFORE DELETE ON storage.objects
  FOR EACH STATEMENT EXECUTE FUNCTION storage.protect_delete();
CREATE TRIGGER protect_buckets_delete BEFORE DELETE ON storage.buckets
  FOR EACH STATEMENT EXECUTE FUNCTION storage.protect_delete();

-- Migrations the Storage API has applied in a fresh project (a subset).
-- The hash is sha1(file) in reality; any fixed 40 hex digits will do here.
INSERT INTO storage.migrations (id, name, hash, executed_at)
SELECT ord - 1, n, left(encode(sha256(convert_to(n, 'UTF8')), 'hex'), 40),
       timestamp '2024-01-01 00:00:00' + (ord - 1) * interval '1 second'
FROM unnest(ARRAY['create-migrations-table', 'initialmigration', 'storage-schema',
                  'pathtoken-column', 'add-migrations-rls', 'add-size-functions',
                  'change-column-name-in-get-size', 'add-rls-to-buckets',
                  'add-public-to-buckets', 'fix-search-function',
                  'search-files-search-function', 'add-trigger-to-auto-update-updated_at-column',
                  'prevent-direct-deletes'])
     WITH ORDINALITY AS m(n, ord);

RESET ROLE;

-- 20250421084701: the migration table is not for the API roles nor postgres;
-- 20250623125453: postgres may grant on buckets/objects.
REVOKE ALL ON storage.migrations FROM anon, authenticated, service_role, postgres;
GRANT SELECT ON storage.migrations TO postgres;
GRANT ALL ON storage.buckets, storage.objects TO postgres WITH GRANT OPTION;
GRANT ALL ON ALL SEQUENCES IN SCHEMA storage TO dashboard_user;
GRANT ALL ON ALL ROUTINES  IN SCHEMA storage TO dashboard_user;

-------------------------------------------------------------------------------
-- 6. realtime (schema only + its migration table), graphql_public,
--    supabase_functions (webhooks), pgbouncer, supabase_migrations.
-------------------------------------------------------------------------------
CREATE SCHEMA realtime AUTHORIZATION supabase_admin;
GRANT USAGE ON SCHEMA realtime TO postgres, anon, authenticated, service_role;
GRANT ALL ON SCHEMA realtime TO supabase_realtime_admin WITH GRANT OPTION;
SET ROLE supabase_admin;
CREATE TABLE realtime.schema_migrations (
  version     bigint NOT NULL PRIMARY KEY,
  inserted_at timestamp(0) without time zone
);
INSERT INTO realtime.schema_migrations VALUES
  (20211116024918, '2024-01-01 00:00:00'), (20211116045059, '2024-01-01 00:00:01'),
  (20211116050929, '2024-01-01 00:00:02'), (20211116051442, '2024-01-01 00:00:03');
RESET ROLE;
REVOKE ALL ON realtime.schema_migrations FROM anon, authenticated, service_role, postgres;

-- Realtime's publication (empty in a fresh project; users add tables to it).
-- (client_min_messages: hide the wal_level warning of test clusters)
SET client_min_messages = error;
CREATE PUBLICATION supabase_realtime;
SET client_min_messages = warning;

CREATE SCHEMA graphql_public AUTHORIZATION supabase_admin;
GRANT USAGE ON SCHEMA graphql_public TO postgres WITH GRANT OPTION;
GRANT USAGE ON SCHEMA graphql_public TO anon, authenticated, service_role;
SET ROLE supabase_admin;
-- placeholder installed while pg_graphql is not enabled
CREATE FUNCTION graphql_public.graphql("operationName" text DEFAULT NULL, query text DEFAULT NULL,
                                       variables jsonb DEFAULT NULL, extensions jsonb DEFAULT NULL)
RETURNS jsonb LANGUAGE plpgsql AS $$
BEGIN
  RETURN jsonb_build_object('errors', jsonb_build_array(
           jsonb_build_object('message', 'pg_graphql extension is not enabled.')));
END $$;
RESET ROLE;

-- Database webhooks (enable_webhooks_by_default): schema by supabase_admin,
-- tables then handed to supabase_functions_admin.
CREATE SCHEMA supabase_functions AUTHORIZATION supabase_admin;
GRANT USAGE ON SCHEMA supabase_functions TO postgres, anon, authenticated, service_role;
GRANT ALL ON SCHEMA supabase_functions TO supabase_functions_admin;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA supabase_functions
  GRANT ALL ON TABLES    TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA supabase_functions
  GRANT ALL ON FUNCTIONS TO postgres, anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE supabase_admin IN SCHEMA supabase_functions
  GRANT ALL ON SEQUENCES TO postgres, anon, authenticated, service_role;
SET ROLE supabase_admin;
CREATE TABLE supabase_functions.migrations (
  version     text PRIMARY KEY,
  inserted_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO supabase_functions.migrations (version, inserted_at) VALUES
  ('initial', '2024-01-01 00:00:00+00'), ('20210809183423_update_grants', '2024-01-01 00:00:01+00');
CREATE TABLE supabase_functions.hooks (
  id            bigserial PRIMARY KEY,
  hook_table_id integer NOT NULL,
  hook_name     text NOT NULL,
  created_at    timestamptz NOT NULL DEFAULT now(),
  request_id    bigint
);
COMMENT ON TABLE supabase_functions.hooks IS 'Supabase Functions Hooks: Audit trail for triggered hooks.';
RESET ROLE;
ALTER TABLE supabase_functions.migrations OWNER TO supabase_functions_admin;
ALTER TABLE supabase_functions.hooks      OWNER TO supabase_functions_admin;

-- PgBouncer auth_query support (ansible/files/pgbouncer_config).
CREATE SCHEMA pgbouncer AUTHORIZATION pgbouncer;
SET ROLE supabase_admin;
CREATE FUNCTION pgbouncer.get_auth(p_usename text) RETURNS TABLE (username text, password text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = '' AS $$
BEGIN
  RETURN QUERY
  SELECT rolname::text, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword::text END
  FROM pg_catalog.pg_authid WHERE rolname = p_usename AND rolcanlogin;
END $$;
RESET ROLE;
REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO pgbouncer;

-- Supabase CLI migration history (`supabase db push` creates it as postgres;
-- see supabase/cli pkg/migration/history.go).  Empty until the user pushes.
CREATE SCHEMA supabase_migrations;
CREATE TABLE supabase_migrations.schema_migrations (
  version    text NOT NULL PRIMARY KEY,
  statements text[],
  name       text
);
CREATE TABLE supabase_migrations.seed_files (
  path text NOT NULL PRIMARY KEY,
  hash text NOT NULL
);

RESET client_min_messages;
