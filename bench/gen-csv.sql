-- The benchmark batch as CSV on standard output, keyed by authentication code.
\ir rows.sql

COPY (
    SELECT code AS "access_token_identifier.authentication_code",
           udf_string_1,
           udf_float_1,
           udf_date_1,
           tier AS "custom_field_set.tier"
    FROM batch_rows
    ORDER BY n
) TO STDOUT (FORMAT csv, HEADER);
