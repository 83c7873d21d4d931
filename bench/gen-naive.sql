-- The naive client's script on standard output: the batch as one UPDATE per row, in one
-- transaction. psql sends each statement of a script on its own, so each is a round trip.
\ir rows.sql

SELECT 'BEGIN;';

SELECT format(
           'UPDATE access_tokens SET udf_string_1 = %L, udf_float_1 = %s, udf_date_1 = %L, '
           'custom_fields = custom_fields || jsonb_build_object(''tier'', %L::text), '
           'updated_at = now() WHERE authentication_code = %L;',
           udf_string_1, udf_float_1, udf_date_1, tier, code)
FROM batch_rows
ORDER BY n;

SELECT 'COMMIT;';
