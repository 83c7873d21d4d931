-- The hand-written pipeline an expert would write: COPY the CSV (from psql's standard
-- input) into a temporary table, then one UPDATE … FROM, all in one transaction.
-- \timing prints the time of each step, so bench/run can show the COPY and the UPDATE apart.
\timing on

BEGIN;

CREATE TEMP TABLE staged (
    code text,
    udf_string_1 text,
    udf_float_1 double precision,
    udf_date_1 date,
    tier text
) ON COMMIT DROP;

\copy staged FROM pstdin WITH (FORMAT csv, HEADER)

UPDATE access_tokens t
SET udf_string_1 = s.udf_string_1,
    udf_float_1 = s.udf_float_1,
    udf_date_1 = s.udf_date_1,
    custom_fields = t.custom_fields || jsonb_build_object('tier', s.tier),
    updated_at = now()
FROM staged s
WHERE t.authentication_code = s.code;

COMMIT;
