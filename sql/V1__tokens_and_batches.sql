-- The access tokens, their definition and classifications, custom field definitions and
-- the ledger of batches (SPEC 5). Every column the user does not give has a default.

CREATE TABLE access_token_definition (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    allow_no_identifier_and_pass_code boolean NOT NULL DEFAULT false,
    auto_generate_authentication_code boolean NOT NULL DEFAULT false
);

INSERT INTO access_token_definition DEFAULT VALUES;

CREATE TABLE access_token_classifications (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL UNIQUE,
    auto_generate_authentication_code boolean NOT NULL DEFAULT false,
    credit_card boolean NOT NULL DEFAULT false
);

CREATE TABLE custom_field_definitions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL UNIQUE,
    data_type text NOT NULL DEFAULT 'string'
        CHECK (data_type IN ('string', 'integer', 'float', 'boolean', 'date'))
);

CREATE TABLE access_tokens (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    classification_id uuid REFERENCES access_token_classifications (id),
    authentication_code text NOT NULL UNIQUE,
    identifier text UNIQUE,
    pass_code_hash text,
    card_masked_number text,
    udf_string_1 text,
    udf_string_2 text,
    udf_string_3 text,
    udf_string_4 text,
    udf_string_5 text,
    udf_string_6 text,
    udf_string_7 text,
    udf_string_8 text,
    udf_float_1 double precision,
    udf_float_2 double precision,
    udf_float_3 double precision,
    udf_float_4 double precision,
    udf_date_1 date,
    udf_date_2 date,
    udf_date_3 date,
    udf_date_4 date,
    custom_fields jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX access_tokens_classification_id ON access_tokens (classification_id);

CREATE TABLE batches (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    file_name text NOT NULL,
    sha256 text NOT NULL,
    format text NOT NULL DEFAULT '',
    status text NOT NULL
        CHECK (status IN ('applied', 'partially_applied', 'rejected', 'duplicate')),
    rows_total bigint NOT NULL DEFAULT 0,
    rows_applied bigint NOT NULL DEFAULT 0,
    rows_unchanged bigint NOT NULL DEFAULT 0,
    rows_failed bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz NOT NULL DEFAULT now(),
    -- The name the file was given in paths.archive or paths.failed.
    archive_name text
);

-- The judge of exactly once: a file's content is applied (fully or partly) at most once.
CREATE UNIQUE INDEX batches_applied_sha256 ON batches (sha256)
    WHERE status IN ('applied', 'partially_applied');

CREATE INDEX batches_sha256 ON batches (sha256);
