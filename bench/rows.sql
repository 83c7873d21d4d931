-- The rows of the benchmark batch, as the temporary view batch_rows: token n (from :lo to
-- :hi) gets three UDFs and the custom field `tier`. Every generator (gen-*.sql) includes
-- this file, so the CSV, the JSON Lines file and the naive client's statements carry the
-- same values. Variables: lo, hi, width (digits of the authentication code).
-- The values hold no backslash, tab or line break, so COPY's text format writes them as is.

SET datestyle = ISO;

CREATE TEMP VIEW batch_rows AS
SELECT n,
       'AC' || lpad(n::text, :width, '0') AS code,
       'segment-' || (n % 1000) AS udf_string_1,
       (n % 10000) / 4.0::float8 AS udf_float_1,
       date '2026-01-01' + (n % 365)::int AS udf_date_1,
       (ARRAY['bronze', 'silver', 'gold', 'platinum'])[n % 4 + 1] AS tier
FROM generate_series(:lo::bigint, :hi::bigint) AS n;
