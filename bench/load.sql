-- Fills a freshly migrated database with :n tokens (authentication codes AC0000001 …,
-- :width digits) and the custom field definitions the batch uses. Each token also has an
-- identifier, a pass code hash and a custom field, like tokens in real use.

INSERT INTO custom_field_definitions (name, data_type)
VALUES ('tier', 'string'),
       ('region', 'string'),
       ('visits', 'integer');

-- A fixed, well-formed Argon2id PHC string: the benchmark never verifies it.
INSERT INTO access_tokens
    (authentication_code, identifier, pass_code_hash, udf_string_2, custom_fields)
SELECT 'AC' || lpad(n::text, :width, '0'),
       'member-' || n,
       '$argon2id$v=19$m=19456,t=2,p=1$YmVuY2hzYWx0YmVuY2g$'
           'Zm9yIHRoZSBiZW5jaG1hcmsgb25seSwgbmV2ZXIgdmVyaWZp',
       'seed',
       jsonb_build_object('region', 'EU')
FROM generate_series(1, :n::bigint) AS n;
