-- A batch that sets one field, :"field" (pass_code, or a UDF for the control run), on the
-- tokens :lo to :hi, keyed by authentication code, as CSV on standard output.
\ir rows.sql

COPY (
    SELECT code AS "access_token_identifier.authentication_code",
           'pw-' || n || '-' || :'field' AS :"field"
    FROM batch_rows
    ORDER BY n
) TO STDOUT (FORMAT csv, HEADER);
