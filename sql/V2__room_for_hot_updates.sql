-- Leave a quarter of each page of access_tokens free, so that a partial update that
-- changes no indexed column (UDFs, custom fields, card numbers, pass codes) can write the
-- new row version on the same page: a HOT update, with no index entries to add.
-- This applies to pages written from now on; VACUUM FULL rewrites existing ones.
ALTER TABLE access_tokens SET (fillfactor = 75);
