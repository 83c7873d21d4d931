//! Applying a batch in sets: a few statements per chunk of rows instead of a few per row,
//! with the very result of applying the rows one after another (SPEC 1.4).
//!
//! A chunk of rows (in file order) is first *prepared* on the reader thread, while the
//! chunk before it is applied ([`Chunk::prepared`]): its plain rows (see [`crate::plain`])
//! are marked, their new pass codes hashed and their lines of the patch table encoded. Then
//! it goes through these steps:
//!
//! 1. **Resolve** the token of every row that is not plain with two queries (`= ANY` over
//!    the authentication codes and the identifiers named), and verify the pass codes of
//!    rows named by identifier on every core at once.
//! 2. **Split** the rows that depend on each other from those that do not. Two rows depend
//!    on each other when they reach the same token, or when an authentication code or
//!    identifier that one of them names, sets or finds on its token is named, set or found
//!    by the other. Rows that set the authentication code to null (a generated code) count
//!    as dependent too. The dependent rows are applied by the row-by-row [`Applier`], in
//!    file order; nothing they do can change what an independent row sees, and the other
//!    way round.
//! 3. **Check** the independent rows with [`token::next_state`], the rules both paths share,
//!    after one query per column for the new values that other tokens already hold, and
//!    after hashing the new pass codes on every core.
//! 4. **Write** the changed tokens with a binary `COPY` into a temporary staging table and
//!    one `UPDATE … FROM` on the primary key, guarded by each token's `xmin` as read in
//!    step 1. A token that another transaction changed since (no row returned), or a
//!    unique value taken meanwhile (the savepoint is rolled back), sends those rows to the
//!    row-by-row path, which locks and reads afresh.
//!
//! The plain rows that do not depend on another row skip steps 1 and 3: the fast lane
//! finds, checks and writes them with one statement (in a dry run, those no other row of
//! the file can see are only checked; see [`crate::sightings`]).
//!
//! Unchanged rows write nothing, so `updated_at` moves only for real changes, as in the
//! row-by-row path.

use crate::apply::{Applier, RowOutcome};
use crate::db::DbError;
use crate::error::RowError;
use crate::patch;
use crate::plain::{self, PlainOutcome};
use crate::row::Row;
use crate::secret;
use crate::sightings::Sightings;
use crate::token::{self, Definition, RowFacts, Token};
use crate::update::{Patch, Secret, TokenKey, TokenUpdate};
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

const STAGING_SQL: &str = "CREATE TEMPORARY TABLE tokensync_staging (
    id uuid, row_version text, authentication_code text, identifier text,
    pass_code_hash text, card_masked_number text,
    udf_string_1 text, udf_string_2 text, udf_string_3 text, udf_string_4 text,
    udf_string_5 text, udf_string_6 text, udf_string_7 text, udf_string_8 text,
    udf_float_1 float8, udf_float_2 float8, udf_float_3 float8, udf_float_4 float8,
    udf_date_1 date, udf_date_2 date, udf_date_3 date, udf_date_4 date,
    custom_fields jsonb) ON COMMIT DROP";

const COPY_SQL: &str = "COPY tokensync_staging FROM STDIN (FORMAT binary)";

/// The staging table's column types: id, row version, then the writable columns.
fn copy_types() -> Vec<Type> {
    let mut types = vec![Type::UUID];
    types.extend([Type::TEXT; 13]);
    types.extend([Type::FLOAT8; 4]);
    types.extend([Type::DATE; 4]);
    types.push(Type::JSONB);
    types
}

const UPDATE_SQL: &str = "UPDATE access_tokens t SET \
    authentication_code = s.authentication_code, identifier = s.identifier, \
    pass_code_hash = s.pass_code_hash, card_masked_number = s.card_masked_number, \
    udf_string_1 = s.udf_string_1, udf_string_2 = s.udf_string_2, \
    udf_string_3 = s.udf_string_3, udf_string_4 = s.udf_string_4, \
    udf_string_5 = s.udf_string_5, udf_string_6 = s.udf_string_6, \
    udf_string_7 = s.udf_string_7, udf_string_8 = s.udf_string_8, \
    udf_float_1 = s.udf_float_1, udf_float_2 = s.udf_float_2, \
    udf_float_3 = s.udf_float_3, udf_float_4 = s.udf_float_4, \
    udf_date_1 = s.udf_date_1, udf_date_2 = s.udf_date_2, \
    udf_date_3 = s.udf_date_3, udf_date_4 = s.udf_date_4, \
    custom_fields = s.custom_fields, updated_at = now() \
    FROM tokensync_staging s WHERE t.id = s.id AND t.xmin::text = s.row_version \
    RETURNING t.id";

/// A token as resolved in step 1, with the version it was read at. The token is boxed:
/// a chunk keeps an `Option<Found>` for every row, and most rows find theirs elsewhere.
#[derive(Debug, Clone)]
struct Found {
    token: Box<Token>,
    row_version: String,
    /// False for a token found by an identifier whose pass code does not match: it still
    /// counts for the split (a row before may change the pass code), but the rules see no
    /// token, since a wrong pass code is an unknown identifier.
    is_verified: bool,
}

/// A chunk of rows in file order, with what can be worked out of it before the database
/// sees it: which rows are plain, and the plain rows' lines of the patch table, encoded, with
/// their new pass codes hashed. The reader thread prepares a chunk while the one before it
/// is applied, so this work overlaps the database's.
pub struct Chunk {
    /// The rows; those that failed to parse keep their errors.
    pub rows: Vec<Row>,
    /// The plain rows, as positions among the rows that parsed.
    plain_rows: Vec<usize>,
    /// The plain rows' lines of the patch table, in the same order.
    staged: patch::Staged,
}

impl Chunk {
    /// A chunk with nothing worked out: every row goes the general way.
    pub fn new(rows: Vec<Row>) -> Chunk {
        Chunk {
            rows,
            plain_rows: Vec::new(),
            staged: patch::Staged::default(),
        }
    }

    /// A chunk with its plain rows marked and staged. Hashes their new pass codes on every
    /// core (not in a dry run), and blocks until that is done: call it off the async
    /// workers, inside the runtime.
    pub fn prepared(rows: Vec<Row>, is_dry_run: bool) -> Chunk {
        let mut chunk = Chunk::new(rows);
        let updates = chunk.updates();
        let plain_rows: Vec<usize> = (0..updates.len())
            .filter(|&i| plain::is_plain(updates[i]))
            .collect();
        let pass_codes = patch::new_pass_codes(&updates, &plain_rows);
        let hashes =
            tokio::runtime::Handle::current().block_on(secret::hashes_for(pass_codes, is_dry_run));
        let staged = patch::stage(&updates, &plain_rows, hashes);
        chunk.plain_rows = plain_rows;
        chunk.staged = staged;
        chunk
    }

    /// The rows that parsed, in order.
    pub fn updates(&self) -> Vec<&TokenUpdate> {
        self.rows
            .iter()
            .filter_map(|row| row.update.as_ref().ok())
            .collect()
    }
}

/// A part of a chunk's plain rows that goes one way.
#[derive(Default)]
struct Lane {
    /// Their places among the chunk's plain rows, ascending.
    staged: Vec<usize>,
    /// Their places among the chunk's rows that parsed, in the same order.
    rows: Vec<usize>,
}

impl Lane {
    /// Their lines of the patch table.
    fn lines<'c>(&self, chunk: &'c Chunk) -> Cow<'c, patch::Staged> {
        if self.staged.len() == chunk.staged.len() {
            Cow::Borrowed(&chunk.staged)
        } else {
            Cow::Owned(chunk.staged.pick(&self.staged))
        }
    }
}

/// Applies the rows of one batch in chunks, in its transaction.
pub struct BulkApplier {
    definition: Definition,
    rows: Applier,
    is_dry_run: bool,
    /// The transaction's `now()`, which every written token gets as `updated_at`.
    now: DateTime<Utc>,
    /// In a dry run, what tells the plain rows that need no write.
    sightings: Option<Sightings>,
}

impl BulkApplier {
    /// Prepares the staging table and the row-by-row applier for dependent rows. A dry run
    /// may pass the [`Sightings`] of its whole file: plain rows that no other row can see are
    /// then checked, not written.
    ///
    /// # Errors
    /// When the database refuses.
    pub async fn new(
        tx: &Transaction<'_>,
        is_dry_run: bool,
        sightings: Option<Sightings>,
    ) -> Result<BulkApplier, DbError> {
        let rows = Applier::new(tx, is_dry_run).await?;
        let definition = rows.definition();
        // Chunks are small beside the table: a merge join would walk the index from its start
        // for every chunk, and a hash join scan the whole table (the planner still picks one
        // for tables of 100,000 tokens); index lookups scale. Cheaper random reads (as on
        // SSDs) steer the planner to them.
        let settings = "SET LOCAL enable_mergejoin = off; SET LOCAL enable_hashjoin = off; \
                        SET LOCAL random_page_cost = 1.1";
        tx.batch_execute(&format!(
            "{STAGING_SQL}; {}; {settings}",
            patch::PATCH_TABLE_SQL
        ))
        .await
        .map_err(DbError::query("cannot create the staging table"))?;
        let now = tx
            .query_one("SELECT now()", &[])
            .await
            .map_err(DbError::query("cannot read the time"))?
            .get(0);
        Ok(BulkApplier {
            definition,
            rows,
            is_dry_run,
            now,
            sightings: sightings.filter(|_| is_dry_run),
        })
    }

    /// Applies a chunk; gives the outcome of each row that parsed, in file order.
    ///
    /// # Errors
    /// Only when the database fails.
    pub async fn apply_chunk(
        &self,
        tx: &mut Transaction<'_>,
        chunk: &Chunk,
    ) -> Result<Vec<RowOutcome>, DbError> {
        let clock = std::time::Instant::now();
        let updates = chunk.updates();
        let updates = updates.as_slice();
        let mut is_plain = vec![false; updates.len()];
        for &i in &chunk.plain_rows {
            is_plain[i] = true;
        }
        let found = self.resolve(tx, updates, &is_plain).await?;
        let resolved_ms = clock.elapsed().as_millis() as u64;
        let is_dependent = dependent_rows(updates, &found);

        let mut outcomes: Vec<Option<RowOutcome>> = vec![None; updates.len()];
        for (i, update) in updates.iter().enumerate() {
            if is_dependent[i] {
                outcomes[i] = Some(self.rows.apply(tx, update).await?);
            }
        }

        // The plain rows that do not depend on another row. In a dry run, those that no other
        // row of the batch can see are only checked.
        let mut written = Lane::default();
        let mut checked = Lane::default();
        for (k, &i) in chunk.plain_rows.iter().enumerate() {
            if is_dependent[i] {
                continue;
            }
            let lane = match &self.sightings {
                Some(sightings) if !sightings.is_seen_by_others(updates[i]) => &mut checked,
                _ => &mut written,
            };
            lane.staged.push(k);
            lane.rows.push(i);
        }
        let checked_outcomes =
            plain::check(tx, updates, &checked.rows, &checked.lines(chunk)).await?;
        for (&i, outcome) in checked.rows.iter().zip(checked_outcomes) {
            outcomes[i] = Some(outcome);
        }
        let written_outcomes =
            plain::apply(tx, updates, &written.rows, &written.lines(chunk)).await?;
        for (&i, outcome) in written.rows.iter().zip(written_outcomes) {
            outcomes[i] = Some(match outcome {
                PlainOutcome::Done(outcome) => outcome,
                // Changed by another transaction since the statement began: apply it afresh.
                PlainOutcome::Retry => self.rows.apply(tx, updates[i]).await?,
            });
        }

        let independent: Vec<usize> = (0..updates.len())
            .filter(|i| !is_dependent[*i] && !is_plain[*i])
            .collect();
        let mut changed: Vec<(usize, Token, String)> = Vec::new();
        let states = self.check(tx, updates, &found, &independent).await?;
        for (i, state) in independent.into_iter().zip(states) {
            let update = updates[i];
            let Some(found) = found[i].as_ref().filter(|f| f.is_verified) else {
                outcomes[i] = Some(not_found(update.line));
                continue;
            };
            match state {
                Err(error) => outcomes[i] = Some(RowOutcome::Failed(vec![error])),
                Ok(next) if next == *found.token => {
                    let result = update.fields_set.as_ref().map(|f| found.token.result(f));
                    outcomes[i] = Some(RowOutcome::Unchanged(result));
                }
                Ok(next) => changed.push((i, next, found.row_version.clone())),
            }
        }

        let checked_ms = clock.elapsed().as_millis() as u64;
        let written = self.write(tx, &changed).await?;
        let written_ms = clock.elapsed().as_millis() as u64;
        tracing::debug!(
            rows = updates.len(),
            resolved_ms,
            checked_ms,
            written_ms,
            "Chunk applied."
        );
        for (i, next, _) in changed {
            let update = updates[i];
            outcomes[i] = Some(if written.contains(&next.id) {
                let next = Token {
                    updated_at: self.now,
                    ..next
                };
                RowOutcome::Applied(update.fields_set.as_ref().map(|f| next.result(f)))
            } else {
                // Changed by another transaction since it was read: apply it afresh.
                self.rows.apply(tx, update).await?
            });
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every row has an outcome"))
            .collect())
    }

    /// Step 1: each row's token as it is now, or `None` (an unknown key, or an identifier
    /// whose pass code does not match).
    async fn resolve(
        &self,
        tx: &Transaction<'_>,
        updates: &[&TokenUpdate],
        is_plain: &[bool],
    ) -> Result<Vec<Option<Found>>, DbError> {
        let mut codes: Vec<&str> = Vec::new();
        let mut identifiers: Vec<&str> = Vec::new();
        for (update, _) in updates.iter().zip(is_plain).filter(|(_, plain)| !**plain) {
            match &update.key {
                TokenKey::AuthenticationCode(code) => codes.push(code.expose()),
                TokenKey::Identifier { identifier, .. } => identifiers.push(identifier),
            }
        }
        let by_code = fetch(tx, "authentication_code", &codes).await?;
        let by_identifier = fetch(tx, "identifier", &identifiers).await?;

        let mut found = Vec::with_capacity(updates.len());
        let mut to_verify = Vec::new();
        for (i, update) in updates.iter().enumerate() {
            if is_plain[i] {
                // A plain row is found by the fast lane's own statement.
                found.push(None);
                continue;
            }
            let token = match &update.key {
                TokenKey::AuthenticationCode(code) => by_code.get(code.expose()).cloned(),
                TokenKey::Identifier {
                    identifier,
                    pass_code,
                } => {
                    let mut token = by_identifier.get(identifier.as_str()).cloned();
                    if let Some(found) = &mut token {
                        found.is_verified = false;
                        if let Some(hash) = found.token.pass_code_hash.clone() {
                            to_verify.push((i, pass_code.clone(), hash));
                        }
                    }
                    token
                }
            };
            found.push(token);
        }

        let (rows, pairs): (Vec<usize>, Vec<(Secret, String)>) = to_verify
            .into_iter()
            .map(|(i, pass_code, hash)| (i, (pass_code, hash)))
            .unzip();
        let verified = secret::verify_many(pairs).await;
        for (i, is_match) in rows.into_iter().zip(verified) {
            if let Some(found) = &mut found[i] {
                found.is_verified = is_match;
            }
        }
        Ok(found)
    }

    /// Step 3: the rules for every independent row, with the facts found in sets.
    async fn check(
        &self,
        tx: &Transaction<'_>,
        updates: &[&TokenUpdate],
        found: &[Option<Found>],
        rows: &[usize],
    ) -> Result<Vec<Result<Token, RowError>>, DbError> {
        let mut new_codes: Vec<&str> = Vec::new();
        let mut new_identifiers: Vec<&str> = Vec::new();
        let mut pass_codes: Vec<Secret> = Vec::new();
        for &i in rows {
            let (Some(found), update) = (found[i].as_ref().filter(|f| f.is_verified), updates[i])
            else {
                continue;
            };
            if let Patch::Value(code) = &update.authentication_code
                && code.expose() != found.token.authentication_code
            {
                new_codes.push(code.expose());
            }
            if let Patch::Value(identifier) = &update.identifier
                && found.token.identifier.as_ref() != Some(identifier)
            {
                new_identifiers.push(identifier);
            }
            if let Patch::Value(pass_code) = &update.pass_code {
                pass_codes.push(pass_code.clone());
            }
        }
        let taken_codes = taken(tx, "authentication_code", &new_codes).await?;
        let taken_identifiers = taken(tx, "identifier", &new_identifiers).await?;
        let mut hashes = secret::hashes_for(pass_codes, self.is_dry_run)
            .await
            .into_iter();

        let mut states = Vec::with_capacity(rows.len());
        for &i in rows {
            let update = updates[i];
            let Some(found) = found[i].as_ref().filter(|f| f.is_verified) else {
                states.push(Err(token::not_found_error(update.line)));
                continue;
            };
            let facts = RowFacts {
                is_code_taken: match &update.authentication_code {
                    Patch::Value(code) => taken_codes.contains(code.expose()),
                    _ => false,
                },
                is_identifier_taken: match &update.identifier {
                    Patch::Value(identifier) => taken_identifiers.contains(identifier.as_str()),
                    _ => false,
                },
                pass_code_hash: match &update.pass_code {
                    Patch::Value(_) => hashes.next(),
                    _ => None,
                },
                generated_code: None,
            };
            states.push(token::next_state(
                &self.definition,
                &found.token,
                update,
                facts,
            ));
        }
        Ok(states)
    }

    /// Step 4: writes the changed tokens; gives the ids actually written.
    async fn write(
        &self,
        tx: &mut Transaction<'_>,
        changed: &[(usize, Token, String)],
    ) -> Result<HashSet<Uuid>, DbError> {
        if changed.is_empty() {
            return Ok(HashSet::new());
        }
        let savepoint = tx
            .savepoint("bulk")
            .await
            .map_err(DbError::query("cannot start a chunk"))?;
        let result = copy_and_update(&savepoint, changed).await;
        match result {
            Ok(written) => {
                savepoint
                    .commit()
                    .await
                    .map_err(DbError::query("cannot finish a chunk"))?;
                Ok(written)
            }
            Err(error)
                if error.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                // A value was taken by another transaction since it was checked: the
                // row-by-row path sorts out which rows fail.
                savepoint
                    .rollback()
                    .await
                    .map_err(DbError::query("cannot undo a chunk"))?;
                Ok(HashSet::new())
            }
            Err(error) => Err(DbError::Query {
                context: "cannot write a chunk",
                source: error,
            }),
        }
    }
}

fn not_found(line: u64) -> RowOutcome {
    RowOutcome::Failed(vec![token::not_found_error(line)])
}

/// The tokens whose `column` is one of `values`, by that value, with their row versions.
async fn fetch(
    tx: &Transaction<'_>,
    column: &str,
    values: &[&str],
) -> Result<HashMap<String, Found>, DbError> {
    if values.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = token::select_sql(&format!("t.{column} = ANY($1)"));
    let rows = tx
        .query(&sql, &[&values])
        .await
        .map_err(DbError::query("cannot look up access tokens"))?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in rows {
        let token = Token::from_row(&row);
        let key = match column {
            "identifier" => token.identifier.clone().unwrap_or_default(),
            _ => token.authentication_code.clone(),
        };
        let row_version: String = row.get("row_version");
        found.insert(
            key,
            Found {
                token: Box::new(token),
                row_version,
                is_verified: true,
            },
        );
    }
    Ok(found)
}

/// Which of `values` a token holds in `column`.
async fn taken(
    tx: &Transaction<'_>,
    column: &str,
    values: &[&str],
) -> Result<HashSet<String>, DbError> {
    if values.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = format!("SELECT {column} FROM access_tokens WHERE {column} = ANY($1)");
    let rows = tx
        .query(&sql, &[&values])
        .await
        .map_err(DbError::query("cannot check that values are unique"))?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Which rows depend on another row of the chunk (step 2).
fn dependent_rows(updates: &[&TokenUpdate], found: &[Option<Found>]) -> Vec<bool> {
    // Every row counts each value it touches once; a value counted twice is shared.
    let mut codes: HashMap<&str, u32> = HashMap::with_capacity(updates.len());
    let mut identifiers: HashMap<&str, u32> = HashMap::new();
    let mut tokens: HashMap<Uuid, u32> = HashMap::new();
    let touched: Vec<Touched> = updates
        .iter()
        .zip(found)
        .map(|(u, f)| Touched::new(u, f.as_ref()))
        .collect();
    for (row, found) in touched.iter().zip(found) {
        for code in row.codes() {
            *codes.entry(code).or_default() += 1;
        }
        for identifier in row.identifiers() {
            *identifiers.entry(identifier).or_default() += 1;
        }
        if let Some(found) = found {
            *tokens.entry(found.token.id).or_default() += 1;
        }
    }

    let mut dependent = Vec::with_capacity(updates.len());
    for ((update, found), row) in updates.iter().zip(found).zip(&touched) {
        let is_shared = row.codes().any(|c| codes[c] > 1)
            || row.identifiers().any(|i| identifiers[i] > 1)
            || found.as_ref().is_some_and(|f| tokens[&f.token.id] > 1);
        let generates_code = matches!(update.authentication_code, Patch::Null);
        dependent.push(is_shared || generates_code);
    }
    dependent
}

/// The authentication codes and identifiers a row names, sets, or finds on its token, each
/// once. A row touches at most three of each, so they are kept inline: this runs for every
/// row of a chunk.
struct Touched<'a> {
    codes: [Option<&'a str>; 3],
    identifiers: [Option<&'a str>; 3],
}

impl<'a> Touched<'a> {
    fn new(update: &'a TokenUpdate, found: Option<&'a Found>) -> Touched<'a> {
        let mut touched = Touched {
            codes: [None; 3],
            identifiers: [None; 3],
        };
        match &update.key {
            TokenKey::AuthenticationCode(code) => add_once(&mut touched.codes, code.expose()),
            TokenKey::Identifier { identifier, .. } => {
                add_once(&mut touched.identifiers, identifier);
            }
        }
        if let Patch::Value(code) = &update.authentication_code {
            add_once(&mut touched.codes, code.expose());
        }
        if let Patch::Value(identifier) = &update.identifier {
            add_once(&mut touched.identifiers, identifier);
        }
        if let Some(found) = found {
            add_once(&mut touched.codes, &found.token.authentication_code);
            if let Some(identifier) = &found.token.identifier {
                add_once(&mut touched.identifiers, identifier);
            }
        }
        touched
    }

    fn codes(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.codes.iter().flatten().copied()
    }

    fn identifiers(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.identifiers.iter().flatten().copied()
    }
}

/// Puts `value` in the first free place of `values` unless it is there already.
fn add_once<'a>(values: &mut [Option<&'a str>; 3], value: &'a str) {
    for place in values.iter_mut() {
        match place {
            Some(held) if *held == value => return,
            Some(_) => {}
            None => {
                *place = Some(value);
                return;
            }
        }
    }
    unreachable!("a row touches at most three values of a kind");
}

/// Copies the changed tokens into the staging table and updates them from it.
async fn copy_and_update(
    tx: &Transaction<'_>,
    changed: &[(usize, Token, String)],
) -> Result<HashSet<Uuid>, tokio_postgres::Error> {
    tx.batch_execute("TRUNCATE tokensync_staging").await?;
    let sink = tx.copy_in(COPY_SQL).await?;
    let writer = BinaryCopyInWriter::new(sink, &copy_types());
    let mut writer = std::pin::pin!(writer);
    for (_, token, row_version) in changed {
        let custom_fields = Value::Object(token.custom_fields.clone());
        let mut values: Vec<&(dyn ToSql + Sync)> = vec![&token.id, row_version];
        values.extend(token.writable_values(&custom_fields));
        writer.as_mut().write(&values).await?;
    }
    writer.finish().await?;
    let rows = tx.query(UPDATE_SQL, &[]).await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
