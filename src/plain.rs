//! The fast lane of the set-based path: *plain* rows, applied by one statement per chunk
//! that finds, checks, compares and updates their tokens inside PostgreSQL, with no round
//! trip to read the tokens first.
//!
//! A plain row names its token by authentication code, leaves `identifier` alone, and gives
//! `authentication_code` and `pass_code` a value or nothing. For such a row the rules of
//! [`crate::token::next_state`] that need the token reduce to three, in this order: the
//! token exists; its new authentication code is not held by another token (found first,
//! with one query); its classification takes a card number when the row sets one. Every
//! other field is a plain assignment, which the statement makes with a `CASE` on a bit of
//! the row's mask, keeping the current value where the row did not specify the column.
//! A row whose values all equal the current ones is not written (it is unchanged), and a
//! token that another transaction changed since the statement's snapshot is left to the
//! row-by-row path, as in [`crate::bulk`].

use crate::bulk;
use crate::db::DbError;
use crate::secret;
use crate::token::{self, Token};
use crate::update::{CustomFieldsPatch, Patch, Secret, TokenKey, TokenUpdate};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

/// Whether a row can take the fast lane.
pub fn is_plain(update: &TokenUpdate) -> bool {
    matches!(update.key, TokenKey::AuthenticationCode(_))
        && update.identifier.is_absent()
        && !matches!(update.authentication_code, Patch::Null)
        && !matches!(update.pass_code, Patch::Null)
}

pub const PATCH_TABLE_SQL: &str = "CREATE TEMPORARY TABLE tokensync_patch (
    idx int4, key_code text, mask int4, is_code_taken bool,
    authentication_code text, pass_code_hash text, card_masked_number text,
    udf_string_1 text, udf_string_2 text, udf_string_3 text, udf_string_4 text,
    udf_string_5 text, udf_string_6 text, udf_string_7 text, udf_string_8 text,
    udf_float_1 float8, udf_float_2 float8, udf_float_3 float8, udf_float_4 float8,
    udf_date_1 date, udf_date_2 date, udf_date_3 date, udf_date_4 date,
    custom_fields_clear bool, custom_fields_remove text[], custom_fields_set jsonb
    ) ON COMMIT DROP";

const COPY_SQL: &str = "COPY tokensync_patch FROM STDIN (FORMAT binary)";

/// The bit of each assignable column in a row's mask, in table order after the key.
const CODE_BIT: i32 = 1;
const PASS_CODE_BIT: i32 = 1 << 1;
const CARD_BIT: i32 = 1 << 2;
const FIRST_UDF_BIT: u32 = 3;

/// The assignable columns, with the bit that says the row specified them.
fn columns() -> Vec<(String, i32)> {
    let mut columns = vec![
        ("authentication_code".to_owned(), CODE_BIT),
        ("pass_code_hash".to_owned(), PASS_CODE_BIT),
        ("card_masked_number".to_owned(), CARD_BIT),
    ];
    let udfs = (1..=8)
        .map(|i| format!("udf_string_{i}"))
        .chain((1..=4).map(|i| format!("udf_float_{i}")))
        .chain((1..=4).map(|i| format!("udf_date_{i}")));
    for (n, name) in udfs.enumerate() {
        columns.push((name, 1 << (FIRST_UDF_BIT + n as u32)));
    }
    columns
}

/// The statement that applies the staged rows: one line per row whose token exists, saying
/// whether the token takes card numbers, whether the row changes it, and whether it was
/// written. Built once.
fn apply_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(build_apply_sql)
}

fn build_apply_sql() -> String {
    let columns = columns();
    let new_values: Vec<String> = columns
        .iter()
        .map(|(name, bit)| {
            format!("CASE WHEN p.mask & {bit} <> 0 THEN p.{name} ELSE t.{name} END AS {name}")
        })
        .collect();
    let names: Vec<&str> = columns.iter().map(|(name, _)| name.as_str()).collect();
    let old_row: Vec<String> = names.iter().map(|name| format!("n.old_{name}")).collect();
    let new_row: Vec<String> = names.iter().map(|name| format!("n.{name}")).collect();
    let old_values: Vec<String> = names
        .iter()
        .map(|name| format!("t.{name} AS old_{name}"))
        .collect();
    let assignments: Vec<String> = names
        .iter()
        .map(|name| format!("{name} = v.{name}"))
        .collect();
    format!(
        "WITH n AS (
            SELECT p.idx, p.mask, p.is_code_taken, t.id, t.xmin::text AS row_version,
                coalesce(c.credit_card, false) AS is_credit_card,
                {new_values},
                (CASE WHEN p.custom_fields_clear THEN '{{}}'::jsonb ELSE t.custom_fields END
                    - p.custom_fields_remove) || p.custom_fields_set AS custom_fields,
                {old_values}, t.custom_fields AS old_custom_fields
            FROM tokensync_patch p
            JOIN access_tokens t ON t.authentication_code = p.key_code
            LEFT JOIN access_token_classifications c ON c.id = t.classification_id
        ), v AS (
            SELECT n.*,
                NOT n.is_code_taken AND (n.mask & {CARD_BIT} = 0 OR n.is_credit_card) AS is_valid,
                ROW({new_row}, n.custom_fields) IS DISTINCT FROM
                    ROW({old_row}, n.old_custom_fields) AS is_changed
            FROM n
        ), u AS (
            UPDATE access_tokens t SET {assignments}, custom_fields = v.custom_fields,
                updated_at = now()
            FROM v
            WHERE t.id = v.id AND v.is_valid AND v.is_changed AND t.xmin::text = v.row_version
            RETURNING t.id
        )
        SELECT v.idx, v.id, v.is_credit_card, v.is_changed FROM v
        UNION ALL SELECT NULL, u.id, NULL, NULL FROM u",
        new_values = new_values.join(",\n                "),
        old_values = old_values.join(", "),
        new_row = new_row.join(", "),
        old_row = old_row.join(", "),
        assignments = assignments.join(", "),
    )
}

/// What the statement said of one staged row.
struct Applied {
    id: Uuid,
    is_credit_card: bool,
    is_changed: bool,
    is_written: bool,
}

/// The fate of a plain row.
pub enum PlainOutcome {
    /// Decided: applied, unchanged or failed.
    Done(crate::apply::RowOutcome),
    /// Its token changed under it since the statement's snapshot: apply it row by row.
    Retry,
}

/// Applies the plain rows `rows` (indexes into `updates`); gives their outcomes in the same
/// order. `is_dry_run` skips the hashing of new pass codes.
///
/// # Errors
/// Only when the database fails.
pub async fn apply(
    tx: &mut Transaction<'_>,
    updates: &[&TokenUpdate],
    rows: &[usize],
    is_dry_run: bool,
) -> Result<Vec<PlainOutcome>, DbError> {
    use crate::apply::RowOutcome;
    if rows.is_empty() {
        return Ok(Vec::new());
    }

    let mut new_codes = Vec::new();
    let mut pass_codes = Vec::new();
    for &i in rows {
        let update = updates[i];
        if let (Patch::Value(code), TokenKey::AuthenticationCode(key)) =
            (&update.authentication_code, &update.key)
            && code != key
        {
            new_codes.push(code.expose());
        }
        if let Patch::Value(pass_code) = &update.pass_code {
            pass_codes.push(pass_code.clone());
        }
    }
    let taken = bulk::taken(tx, "authentication_code", &new_codes).await?;
    let hashes = if is_dry_run {
        vec![secret::DRY_RUN_HASH.to_owned(); pass_codes.len()]
    } else {
        secret::hash_many(pass_codes).await
    };

    let savepoint = tx
        .savepoint("plain")
        .await
        .map_err(DbError::query("cannot start a chunk"))?;
    let applied = match stage_and_apply(&savepoint, updates, rows, &taken, hashes).await {
        Ok(applied) => {
            savepoint
                .commit()
                .await
                .map_err(DbError::query("cannot finish a chunk"))?;
            applied
        }
        Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            // A value was taken by another transaction since it was checked.
            savepoint
                .rollback()
                .await
                .map_err(DbError::query("cannot undo a chunk"))?;
            return Ok(rows.iter().map(|_| PlainOutcome::Retry).collect());
        }
        Err(error) => {
            return Err(DbError::Query {
                context: "cannot apply a chunk",
                source: error,
            });
        }
    };

    let wanted: Vec<Uuid> = rows
        .iter()
        .enumerate()
        .filter(|(_, i)| updates[**i].fields_set.is_some())
        .filter_map(|(n, _)| applied.get(&(n as i32)).map(|a| a.id))
        .collect();
    let tokens = fetch_by_id(tx, &wanted).await?;

    let mut outcomes = Vec::with_capacity(rows.len());
    for (n, &i) in rows.iter().enumerate() {
        let update = updates[i];
        let line = update.line;
        let failure = |error| PlainOutcome::Done(RowOutcome::Failed(vec![error]));
        let Some(applied) = applied.get(&(n as i32)) else {
            outcomes.push(failure(token::not_found_error(line)));
            continue;
        };
        if is_code_taken(update, &taken) {
            outcomes.push(failure(token::value_taken_error(
                line,
                "authentication_code",
            )));
            continue;
        }
        if !update.card_masked_number.is_absent() && !applied.is_credit_card {
            outcomes.push(failure(token::card_not_applicable_error(line)));
            continue;
        }
        let result = |token: Option<&Token>| {
            update
                .fields_set
                .as_ref()
                .and_then(|fields| token.map(|token| token.result(fields)))
        };
        let outcome = match (applied.is_changed, applied.is_written) {
            (false, _) => {
                PlainOutcome::Done(RowOutcome::Unchanged(result(tokens.get(&applied.id))))
            }
            (true, true) => {
                PlainOutcome::Done(RowOutcome::Applied(result(tokens.get(&applied.id))))
            }
            (true, false) => PlainOutcome::Retry,
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

fn is_code_taken(update: &TokenUpdate, taken: &HashSet<String>) -> bool {
    match (&update.authentication_code, &update.key) {
        (Patch::Value(code), TokenKey::AuthenticationCode(key)) => {
            code != key && taken.contains(code.expose())
        }
        _ => false,
    }
}

/// The tokens with these ids, as they are now.
async fn fetch_by_id(tx: &Transaction<'_>, ids: &[Uuid]) -> Result<HashMap<Uuid, Token>, DbError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let sql = token::select_sql("t.id = ANY($1)");
    let rows = tx
        .query(&sql, &[&ids])
        .await
        .map_err(DbError::query("cannot read access tokens"))?;
    Ok(rows
        .iter()
        .map(Token::from_row)
        .map(|token| (token.id, token))
        .collect())
}

/// Copies the rows into the patch table and runs the statement; gives what it said of each
/// row whose token exists, by the row's position in `rows`.
async fn stage_and_apply(
    tx: &Transaction<'_>,
    updates: &[&TokenUpdate],
    rows: &[usize],
    taken: &HashSet<String>,
    hashes: Vec<String>,
) -> Result<HashMap<i32, Applied>, tokio_postgres::Error> {
    let started = std::time::Instant::now();
    tx.batch_execute("TRUNCATE tokensync_patch").await?;
    let types = copy_types();
    let sink = tx.copy_in(COPY_SQL).await?;
    let writer = BinaryCopyInWriter::new(sink, &types);
    let mut writer = std::pin::pin!(writer);
    let mut hashes = hashes.into_iter();
    for (n, &i) in rows.iter().enumerate() {
        let update = updates[i];
        let staged = Staged::new(n as i32, update, is_code_taken(update, taken), &mut hashes);
        writer.as_mut().write(&staged.values()).await?;
    }
    writer.finish().await?;
    let copied = std::time::Instant::now();
    let copy_ms = (copied - started).as_millis() as u64;
    tracing::debug!(copy_ms, "Plain rows staged.");

    // The statement lists the staged rows whose token exists, then the ids it wrote (with
    // no index): joining the two in SQL would cost a pass over one per row of the other.
    let rows = tx.query(apply_sql(), &[]).await?;
    let mut applied = HashMap::with_capacity(rows.len());
    let mut written = HashSet::new();
    for row in rows {
        match row.get::<_, Option<i32>>(0) {
            Some(idx) => {
                let entry = Applied {
                    id: row.get(1),
                    is_credit_card: row.get(2),
                    is_changed: row.get(3),
                    is_written: false,
                };
                applied.insert(idx, entry);
            }
            None => {
                written.insert(row.get::<_, Uuid>(1));
            }
        }
    }
    for entry in applied.values_mut() {
        entry.is_written = written.contains(&entry.id);
    }
    let statement_ms = copied.elapsed().as_millis() as u64;
    tracing::debug!(rows = applied.len(), statement_ms, "Plain rows applied.");
    Ok(applied)
}

fn copy_types() -> Vec<Type> {
    let mut types = vec![Type::INT4, Type::TEXT, Type::INT4, Type::BOOL];
    types.extend([Type::TEXT; 3]);
    types.extend([Type::TEXT; 8]);
    types.extend([Type::FLOAT8; 4]);
    types.extend([Type::DATE; 4]);
    types.extend([Type::BOOL, Type::TEXT_ARRAY, Type::JSONB]);
    types
}

/// One row of the patch table.
struct Staged<'a> {
    idx: i32,
    key_code: &'a str,
    mask: i32,
    is_code_taken: bool,
    authentication_code: Option<&'a str>,
    pass_code_hash: Option<String>,
    card_masked_number: Option<&'a str>,
    udf_strings: [Option<&'a str>; 8],
    udf_floats: [Option<f64>; 4],
    udf_dates: [Option<chrono::NaiveDate>; 4],
    custom_fields_clear: bool,
    custom_fields_remove: Vec<&'a str>,
    custom_fields_set: Value,
}

impl<'a> Staged<'a> {
    fn new(
        idx: i32,
        update: &'a TokenUpdate,
        is_code_taken: bool,
        hashes: &mut impl Iterator<Item = String>,
    ) -> Staged<'a> {
        let udfs_absent = update
            .udf_strings
            .iter()
            .map(Patch::is_absent)
            .chain(update.udf_floats.iter().map(Patch::is_absent))
            .chain(update.udf_dates.iter().map(Patch::is_absent));
        let mut mask = 0;
        for (is_absent, bit) in [
            (update.authentication_code.is_absent(), CODE_BIT),
            (update.pass_code.is_absent(), PASS_CODE_BIT),
            (update.card_masked_number.is_absent(), CARD_BIT),
        ]
        .into_iter()
        .chain(udfs_absent.zip((FIRST_UDF_BIT..).map(|n| 1 << n)))
        {
            if !is_absent {
                mask |= bit;
            }
        }

        let (custom_fields_clear, custom_fields_remove, custom_fields_set) =
            match &update.custom_fields {
                CustomFieldsPatch::Absent => (false, Vec::new(), Map::new()),
                CustomFieldsPatch::Clear => (true, Vec::new(), Map::new()),
                CustomFieldsPatch::Change(changes) => {
                    let mut remove = Vec::new();
                    let mut set = Map::new();
                    for (name, value) in changes {
                        match value {
                            Some(value) => {
                                set.insert(name.clone(), value.clone());
                            }
                            None => remove.push(name.as_str()),
                        }
                    }
                    (false, remove, set)
                }
            };
        let TokenKey::AuthenticationCode(key_code) = &update.key else {
            unreachable!("plain rows name their token by authentication code")
        };
        Staged {
            idx,
            key_code: key_code.expose(),
            mask,
            is_code_taken,
            authentication_code: value(&update.authentication_code).map(Secret::expose),
            pass_code_hash: match update.pass_code {
                Patch::Value(_) => hashes.next(),
                _ => None,
            },
            card_masked_number: value(&update.card_masked_number).map(Secret::expose),
            udf_strings: std::array::from_fn(|i| value(&update.udf_strings[i]).map(String::as_str)),
            udf_floats: std::array::from_fn(|i| value(&update.udf_floats[i]).copied()),
            udf_dates: std::array::from_fn(|i| value(&update.udf_dates[i]).copied()),
            custom_fields_clear,
            custom_fields_remove,
            custom_fields_set: Value::Object(custom_fields_set),
        }
    }

    fn values(&self) -> Vec<&(dyn ToSql + Sync)> {
        let mut values: Vec<&(dyn ToSql + Sync)> = vec![
            &self.idx,
            &self.key_code,
            &self.mask,
            &self.is_code_taken,
            &self.authentication_code,
            &self.pass_code_hash,
            &self.card_masked_number,
        ];
        values.extend(self.udf_strings.iter().map(|v| v as &(dyn ToSql + Sync)));
        values.extend(self.udf_floats.iter().map(|v| v as &(dyn ToSql + Sync)));
        values.extend(self.udf_dates.iter().map(|v| v as &(dyn ToSql + Sync)));
        values.push(&self.custom_fields_clear);
        values.push(&self.custom_fields_remove);
        values.push(&self.custom_fields_set);
        values
    }
}

/// The value of a patch, or `None` when it is absent or null (the mask tells which).
fn value<T>(patch: &Patch<T>) -> Option<&T> {
    match patch {
        Patch::Value(value) => Some(value),
        _ => None,
    }
}
