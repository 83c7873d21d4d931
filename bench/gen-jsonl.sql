-- The same batch as JSON Lines on standard output: one update-method object per line.
\ir rows.sql

COPY (
    SELECT jsonb_build_object(
               'access_token_identifier', jsonb_build_object('authentication_code', code),
               'udf_string_1', udf_string_1,
               'udf_float_1', udf_float_1,
               'udf_date_1', udf_date_1,
               'custom_field_set', jsonb_build_array(jsonb_build_object('tier', tier)))
    FROM batch_rows
    ORDER BY n
) TO STDOUT;
