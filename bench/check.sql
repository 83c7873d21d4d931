-- One line about access_tokens after a run, fields separated by '|': rows carrying the
-- batch's three UDFs and tier, updates, HOT updates, dead tuples, table size, fill factor.
-- The update counters come from the cumulative statistics, which a backend flushes when it
-- ends; bench/run waits a moment before running this.
SELECT (SELECT count(*)
        FROM access_tokens
        WHERE udf_string_1 LIKE 'segment-%'
          AND udf_float_1 IS NOT NULL
          AND udf_date_1 IS NOT NULL
          AND custom_fields ? 'tier'),
       s.n_tup_upd,
       s.n_tup_hot_upd,
       s.n_dead_tup,
       pg_size_pretty(pg_table_size('access_tokens')),
       coalesce((SELECT array_to_string(reloptions, ',')
                 FROM pg_class
                 WHERE oid = 'access_tokens'::regclass), 'fillfactor=100 (default)')
FROM pg_stat_user_tables s
WHERE s.relid = 'access_tokens'::regclass;
