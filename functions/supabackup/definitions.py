"""A fingerprint of every object's definition: what change capture must find unchanged.

DDL is not in the logical change stream, so change capture compares this fingerprint at
every run with the one its base was taken under; a difference ends the epoch. It covers
more than tables' columns because a restore to a time must give back every object as it
was then, and because some catalog changes alter the text form of values without writing
a row: an enum label renamed, an attribute added to a composite type, a column dropped and
added again under the same name. So: relations (kind, persistence, replica identity, row
security, partitioning, owner, grants), columns by position (type, nullability, default,
identity, generation, collation, dropped ones too), constraints, indexes, triggers and
their firing modes, rules, policies, views, functions, types (enum labels in order,
domains, ranges), sequences' parameters and owners, schemas, extensions, comments, default
privileges, event triggers, inheritance, and whether a materialized view holds rows.
Planner statistics, relfilenodes and row counts are left out: VACUUM, ANALYZE and
TRUNCATE change no definition.

It is read with output.STABLE pinned (names qualified, so the text is the same whatever
the session's search_path).
"""

from __future__ import annotations

from typing import Any

from .db import USER_SCHEMAS

DEFINITIONS = f"""
SELECT md5(coalesce(string_agg(d, E'\\n' ORDER BY d), '')) FROM (
  SELECT concat_ws(' ', 'rel', c.oid::regclass::text, c.relkind, c.relpersistence,
         c.relreplident, c.relrowsecurity, c.relforcerowsecurity, c.reloptions::text,
         c.relacl::text, pg_get_userbyid(c.relowner), pg_get_expr(c.relpartbound, c.oid),
         pg_get_partkeydef(c.oid), c.reloftype::regtype::text, c.relispopulated) AS d
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c') AND {USER_SCHEMAS}
  UNION ALL
  SELECT concat_ws(' ', 'col', a.attrelid::regclass::text, a.attnum, a.attname,
         format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity, a.attgenerated,
         a.attisdropped, a.attcollation::regcollation::text, a.attacl::text,
         a.attislocal, a.attinhcount, pg_get_expr(ad.adbin, ad.adrelid))
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum
  WHERE a.attnum > 0 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c') AND {USER_SCHEMAS}
  UNION ALL
  SELECT concat_ws(' ', 'con', co.conrelid::regclass::text, co.contypid::regtype::text,
         co.conname, pg_get_constraintdef(co.oid), co.convalidated, co.conislocal,
         co.coninhcount)
  FROM pg_constraint co JOIN pg_namespace n ON n.oid = co.connamespace
  WHERE {USER_SCHEMAS}
  UNION ALL
  SELECT concat_ws(' ', 'idx', pg_get_indexdef(i.indexrelid), i.indisreplident,
         i.indisclustered)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_SCHEMAS}
  UNION ALL
  SELECT concat_ws(' ', 'trg', pg_get_triggerdef(t.oid), t.tgenabled)
  FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE NOT t.tgisinternal AND {USER_SCHEMAS}
  UNION ALL
  SELECT concat_ws(' ', 'rule', pg_get_ruledef(r.oid), r.ev_enabled)
  FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
  JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE r.rulename <> '_RETURN' AND {USER_SCHEMAS}
  UNION ALL
  SELECT concat_ws(' ', 'pol', p.polrelid::regclass::text, p.polname, p.polcmd,
         p.polpermissive, p.polroles::text, pg_get_expr(p.polqual, p.polrelid),
         pg_get_expr(p.polwithcheck, p.polrelid))
  FROM pg_policy p
  UNION ALL
  SELECT concat_ws(' ', 'view', c.oid::regclass::text, pg_get_viewdef(c.oid))
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('v', 'm') AND {USER_SCHEMAS}
  UNION ALL
  SELECT concat_ws(' ', 'fn', p.oid::regprocedure::text, p.prokind,
         CASE WHEN p.prokind IN ('f', 'p') THEN pg_get_functiondef(p.oid) END,
         p.proacl::text, pg_get_userbyid(p.proowner))
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_SCHEMAS}
  UNION ALL
  SELECT concat_ws(' ', 'type', t.oid::regtype::text, t.typtype, t.typbasetype::regtype::text,
         t.typnotnull, t.typdefault, t.typacl::text, pg_get_userbyid(t.typowner),
         (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder) FROM pg_enum e
          WHERE e.enumtypid = t.oid),
         (SELECT r.rngsubtype::regtype::text FROM pg_range r WHERE r.rngtypid = t.oid))
  FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE {USER_SCHEMAS}
  UNION ALL
  SELECT concat_ws(' ', 'seq', s.seqrelid::regclass::text, s.seqtypid::regtype::text,
         s.seqstart, s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle,
         (SELECT d.refobjid::regclass::text || '.' || d.refobjsubid FROM pg_depend d
          WHERE d.classid = 'pg_class'::regclass AND d.objid = s.seqrelid
            AND d.deptype IN ('a', 'i') LIMIT 1))
  FROM pg_sequence s
  UNION ALL
  SELECT concat_ws(' ', 'inherits', i.inhrelid::regclass::text, i.inhparent::regclass::text,
         i.inhseqno) FROM pg_inherits i
  UNION ALL
  SELECT concat_ws(' ', 'schema', n.nspname, pg_get_userbyid(n.nspowner), n.nspacl::text)
  FROM pg_namespace n WHERE {USER_SCHEMAS}
  UNION ALL
  SELECT concat_ws(' ', 'ext', x.extname, x.extversion) FROM pg_extension x
  UNION ALL
  SELECT concat_ws(' ', 'comment', d.classoid::regclass::text, d.objoid, d.objsubid,
         d.description)
  FROM pg_description d WHERE d.objoid >= 16384
  UNION ALL
  SELECT concat_ws(' ', 'defacl', pg_get_userbyid(a.defaclrole), a.defaclnamespace,
         a.defaclobjtype, a.defaclacl::text) FROM pg_default_acl a
  UNION ALL
  SELECT concat_ws(' ', 'evt', e.evtname, e.evtevent, e.evtenabled, e.evtfoid::regproc::text,
         e.evttags::text) FROM pg_event_trigger e
) defs
"""


def definitions_fingerprint(cur: Any) -> str:
    """md5 of every object's definition, in `cur`'s transaction (STABLE output pinned)."""
    cur.execute(DEFINITIONS)
    return str(cur.fetchone()[0])
