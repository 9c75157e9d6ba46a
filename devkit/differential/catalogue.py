"""The catalogue a differential case draws its source from: types, row identities, shapes.

Every entry is data, not a test: a case picks from it with a seeded random generator, so
the same seed builds the same source. Values are SQL literals chosen for their hazards
(extreme precision, special values, every escaping problem of COPY, JSON and SQL, time
zones and calendar edges), not for being typical.
"""

from __future__ import annotations

from dataclasses import dataclass

# Types that live in another schema than the tables that use them.
TYPES_SQL = """
CREATE SCHEMA kinds;
CREATE TYPE kinds.mood AS ENUM ('sad', 'ok', 'happy', 'it''s "complicated"');
CREATE TYPE kinds.pair AS (a integer, b text);
CREATE DOMAIN kinds.positive AS integer CHECK (VALUE > 0);
CREATE DOMAIN kinds.label AS text COLLATE "C" CHECK (VALUE <> '');
CREATE TYPE kinds.floatrange AS RANGE (subtype = float8);
CREATE TYPE public.colour AS ENUM ('red', 'green', 'blue');
CREATE TABLE kinds.holder (id integer PRIMARY KEY, note text);
"""


@dataclass(frozen=True)
class TypeCase:
    family: str
    sql_type: str
    values: tuple[str, ...]  # SQL literals, each valid for sql_type


TEXT_HAZARDS = (
    "''", "'plain'", "E'tab\\there'", "E'new\\nline\\r\\n'", "'back\\slash \\N \\.'",
    "'quote '' \" double'", "'naïve 日本語 🎉 \u00a0'", "'NULL'", "'\\x41'", "E'\\u0001ctl'",
    "'{\"json\": \"lookalike\"}'", "'  padded  '", "'$$dollar$$'", "repeat('long ', 700)",
    # too random to compress inline: stored out of line (TOAST), and an UPDATE of another
    # column leaves it unchanged in the stream
    "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 300) g)",
)

TYPES: tuple[TypeCase, ...] = (
    TypeCase("number", "smallint", ("-32768", "32767", "0")),
    TypeCase("number", "integer", ("-2147483648", "2147483647", "42")),
    TypeCase("number", "bigint", ("-9223372036854775808", "9223372036854775807", "1")),
    TypeCase("number", "numeric", (
        "'123456789012345678901234567890.123456789012345678901234567890'", "'NaN'",
        "'-0.000'", "'1e-100'", "'0.10'", "'Infinity'", "'-Infinity'")),
    TypeCase("number", "numeric(12,2)", ("'9999999999.99'", "'-0.01'", "'0'")),
    TypeCase("number", "real", ("'NaN'", "'Infinity'", "'-Infinity'", "'-0'",
                                "'1.17549435e-38'", "'3.4028235e38'", "'0.1'")),
    TypeCase("number", "double precision", (
        "'4.9e-324'", "'1.7976931348623157e308'", "'0.1'", "'-0'", "'NaN'", "'-Infinity'",
        "'3.141592653589793'")),
    TypeCase("number", "money", ("'12.34'", "'-92233720368547758.08'", "'0'")),
    TypeCase("binary", "bytea", ("'\\x'", "'\\x00ff5c27'", "decode(repeat('ab', 3000), 'hex')",
                                 "'\\x0a0d09'")),
    TypeCase("binary", "bit(5)", ("B'10101'", "B'00000'")),
    TypeCase("binary", "bit varying", ("B''", "B'1'", "B'0101010101010101010101'")),
    TypeCase("text", "text", TEXT_HAZARDS),
    TypeCase("text", "character varying(40)", ("'short'", "'x'", "'tab\there'", "''")),
    TypeCase("text", "character(6)", ("'ab'", "'abcdef'", "''")),
    TypeCase("text", '"char"', ("'a'", "'\"'", "''")),
    TypeCase("text", "name", ("'a name'", "'Üñí'")),
    TypeCase("text", "uuid", ("'00000000-0000-0000-0000-000000000000'",
                              "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'")),
    TypeCase("array", "integer[]", ("'{}'", "'{1,NULL,3}'", "'{{1,2},{3,4}}'",
                                    "'[0:1]={7,8}'")),
    TypeCase("array", "text[]", ("'{\"a,b\",\"c\\\"d\",NULL,\"NULL\",\"\"}'", "'{}'",
                                 "ARRAY[E'new\\nline', '}{']")),
    TypeCase("array", "kinds.mood[]", ("'{sad,happy}'", "'{}'")),
    TypeCase("composite", "kinds.pair", ("'(1,\"x,y\")'", "'(,)'", "ROW(NULL, 'q\"uote')")),
    TypeCase("composite", "kinds.pair[]", ("ARRAY['(1,a)'::kinds.pair, '(,)']",)),
    TypeCase("domain", "kinds.positive", ("1", "2147483647")),
    TypeCase("domain", "kinds.label", ("'label'", "'Ω'")),
    TypeCase("enum", "kinds.mood", ("'sad'", "'happy'", "'it''s \"complicated\"'")),
    TypeCase("enum", "public.colour", ("'red'", "'blue'")),
    TypeCase("range", "int4range", ("'[1,5)'", "'empty'", "'(,)'", "'[3,]'")),
    TypeCase("range", "numrange", ("'(0.1,0.2]'", "'empty'")),
    TypeCase("range", "tstzrange", ("'[2026-01-01 00:00+00,2026-03-29 01:30+01)'",
                                    "'(,infinity)'")),
    TypeCase("range", "kinds.floatrange", ("'[0.1,0.3)'", "'empty'")),
    TypeCase("range", "int4multirange", ("'{}'", "'{[1,3),[5,7)}'")),
    TypeCase("json", "json", ("'{\"b\": 1,   \"a\": [1, 2.50]}'", "'\"\\u0000 in json\"'",
                              "'[]'", "'null'", "'{\"a\":1,\"a\":2}'")),
    TypeCase("json", "jsonb", ("'{\"a\": {\"b\": null}, \"n\": 1.500}'", "'\"snow ☃\"'",
                               "'[1, \"two\", [3]]'", "'{}'")),
    TypeCase("geometric", "point", ("'(1.5,-2)'", "'(0,0)'")),
    TypeCase("geometric", "line", ("'{1,-1,0}'",)),
    TypeCase("geometric", "lseg", ("'[(0,0),(1,1)]'",)),
    TypeCase("geometric", "box", ("'(1,1),(0,0)'",)),
    TypeCase("geometric", "path", ("'[(0,0),(1,1),(2,0)]'", "'((0,0),(1,1))'")),
    TypeCase("geometric", "polygon", ("'((0,0),(1,1),(1,0))'",)),
    TypeCase("geometric", "circle", ("'<(0,0),1.5>'",)),
    TypeCase("network", "inet", ("'192.168.0.1/24'", "'::1'", "'10.0.0.1'")),
    TypeCase("network", "cidr", ("'10.0.0.0/8'", "'2001:db8::/32'")),
    TypeCase("network", "macaddr", ("'08:00:2b:01:02:03'",)),
    TypeCase("network", "macaddr8", ("'08:00:2b:01:02:03:04:05'",)),
    TypeCase("oid", "oid", ("0", "4294967295")),
    TypeCase("oid", "regclass", ("'pg_class'", "'kinds.holder'")),
    TypeCase("oid", "regtype", ("'integer'", "'kinds.pair'")),
    TypeCase("oid", "regproc", ("'now'",)),
    TypeCase("oid", "regnamespace", ("'kinds'",)),
    TypeCase("time", "date", ("'2026-02-28'", "'infinity'", "'-infinity'", "'4713-01-01 BC'",
                              "'0001-01-01'")),
    TypeCase("time", "time", ("'00:00'", "'23:59:59.999999'", "'24:00'")),
    TypeCase("time", "time with time zone", ("'04:05:06+05:30'", "'23:00-12'")),
    TypeCase("time", "timestamp", ("'2026-03-29 02:30:00'", "'infinity'",
                                   "'2000-01-01 00:00:00.000001'", "'1999-12-31 23:59:60'")),
    TypeCase("time", "timestamp with time zone", (
        "'2026-10-25 01:30:00 Europe/London'", "'2026-03-08 02:30 America/New_York'",
        "'-infinity'", "'2026-06-01 12:00+05:45'", "now()")),
    TypeCase("time", "interval", ("'1 year 2 mons -3 days 04:05:06.789'", "'-178000000 years'",
                                  "'PT0S'", "'1 day -1 second'")),
    TypeCase("other", "boolean", ("true", "false")),
    TypeCase("other", "tsvector", ("'a:1 fat:2 cat:3'", "''")),
    TypeCase("other", "tsquery", ("'fat & (rat | cat)'",)),
    TypeCase("other", "xml", ("'<a b=\"1\">x &amp; y</a>'", "'text only'")),
    TypeCase("other", "pg_lsn", ("'0/0'", "'FFFFFFFF/FFFFFFFF'")),
)

# How a table identifies its rows to logical replication.
IDENTITIES = ("pk", "pk_identity", "serial", "unique_index", "full", "none")

# Session and database settings that change the text form of values or how names resolve.
SETTINGS = {
    "DateStyle": ("'SQL, DMY'", "'German'", "'Postgres, YMD'", "'ISO, DMY'"),
    "TimeZone": ("'Asia/Kolkata'", "'America/St_Johns'", "'Pacific/Chatham'", "'UTC'"),
    "IntervalStyle": ("'sql_standard'", "'iso_8601'", "'postgres_verbose'"),
    "extra_float_digits": ("0", "-3", "1"),
    "bytea_output": ("'escape'",),
    "search_path": ("kinds, public", "public, kinds", "\"$user\""),
    "lc_monetary": ("'C'",),
}
