//! The fast lane of the set-based path: *plain* rows, applied by one `UPDATE … FROM` per
//! chunk that finds, checks, compares and writes their tokens inside PostgreSQL, with no
//! round trip to read the tokens first.
//!
//! A plain row names its token by authentication code, leaves `identifier` alone, and gives
//! `authentication_code` and `pass_code` a value or nothing. For such a row the rules of
//! [`crate::token::next_state`] that need the token reduce to three, in this order: the
//! token exists; its new authentication code is not held by another token; its
//! classification takes a card number when the row sets one. Every other field is a plain
//! assignment. A row whose values all equal the current ones is not written (it is
//! unchanged).
//!
//! The rows reach PostgreSQL as lines of a temporary patch table (see [`crate::patch`]).
//! The update reports the rows it wrote; a second query, for the rows it left alone (few,
//! usually none), tells why. Since the update finds and writes each token in one step, a
//! token that another transaction changes meanwhile is re-read by PostgreSQL before it is
//! written, as a row-by-row update would see it.

use crate::apply::RowOutcome;
use crate::db::DbError;
use crate::error::RowError;
use crate::patch::Staged;
use crate::token::{self, Token};
use crate::update::{Patch, TokenKey, TokenUpdate};
use std::collections::HashMap;
use tokio_postgres::Transaction;
use uuid::Uuid;

/// Whether a row can take the fast lane.
pub fn is_plain(update: &TokenUpdate) -> bool {
    matches!(update.key, TokenKey::AuthenticationCode(_))
        && update.identifier.is_absent()
        && !matches!(update.authentication_code, Patch::Null)
        && !matches!(update.pass_code, Patch::Null)
}

/// What the statements said of one staged row whose token exists.
enum Verdict {
    /// The row changed its token, which has this id.
    Written(Uuid),
    /// The row did not write its token.
    Left {
        id: Uuid,
        is_code_taken: bool,
        is_credit_card: bool,
        /// The row would change the token as it is now: another transaction changed the
        /// token since the update's snapshot.
        is_changed: bool,
    },
}

impl Verdict {
    fn id(&self) -> Uuid {
        match self {
            Verdict::Written(id) | Verdict::Left { id, .. } => *id,
        }
    }
}

/// The fate of a plain row.
pub enum PlainOutcome {
    /// Decided: applied, unchanged or failed.
    Done(crate::apply::RowOutcome),
    /// Its token changed under it since the statement's snapshot: apply it row by row.
    Retry,
}

/// Applies the plain rows `rows` (indexes into `updates`), whose lines of the patch table
/// are `staged` in the same order; gives their outcomes in that order.
///
/// # Errors
/// Only when the database fails.
pub async fn apply(
    tx: &mut Transaction<'_>,
    updates: &[&TokenUpdate],
    rows: &[usize],
    staged: &Staged,
) -> Result<Vec<PlainOutcome>, DbError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }

    let savepoint = tx
        .savepoint("plain")
        .await
        .map_err(DbError::query("cannot start a chunk"))?;
    let verdicts = match stage_and_apply(&savepoint, updates.len(), staged).await {
        Ok(verdicts) => {
            savepoint
                .commit()
                .await
                .map_err(DbError::query("cannot finish a chunk"))?;
            verdicts
        }
        Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            // A value was taken by another transaction since the statement's snapshot.
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
        .filter(|&&i| updates[i].fields_set.is_some())
        .filter_map(|&i| verdicts[i].as_ref().map(Verdict::id))
        .collect();
    let tokens = fetch_by_id(tx, &wanted).await?;

    let mut outcomes = Vec::with_capacity(rows.len());
    for &i in rows {
        let update = updates[i];
        let line = update.line;
        let failure = |error| PlainOutcome::Done(RowOutcome::Failed(vec![error]));
        let result = |id: &Uuid| {
            update
                .fields_set
                .as_ref()
                .and_then(|fields| tokens.get(id).map(|token| token.result(fields)))
        };
        let outcome = match &verdicts[i] {
            None => failure(token::not_found_error(line)),
            Some(Verdict::Written(id)) => PlainOutcome::Done(RowOutcome::Applied(result(id))),
            Some(Verdict::Left {
                id,
                is_code_taken,
                is_credit_card,
                is_changed,
            }) => match refusal(update, *is_code_taken, *is_credit_card) {
                Some(error) => failure(error),
                None if !is_changed => PlainOutcome::Done(RowOutcome::Unchanged(result(id))),
                // It passes every check and changes its token, yet was not written: the
                // token changed under the statement and no longer matched. Apply it afresh.
                None => PlainOutcome::Retry,
            },
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Checks the plain rows `rows` (indexes into `updates`), whose lines of the patch table are
/// `staged` in the same order, without writing them; gives their outcomes in that order.
/// For a dry run only, and only for rows no other row of the batch can see (see
/// [`crate::sightings`]): an outcome holds no result, since a dry run reports none.
///
/// # Errors
/// Only when the database fails.
pub async fn check(
    tx: &Transaction<'_>,
    updates: &[&TokenUpdate],
    rows: &[usize],
    staged: &Staged,
) -> Result<Vec<RowOutcome>, DbError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let started = std::time::Instant::now();
    let mut verdicts: Vec<Option<Verdict>> = Vec::new();
    verdicts.resize_with(updates.len(), || None);
    let checked = async {
        staged.copy_in(tx).await?;
        explain(tx, staged, rows, &mut verdicts).await
    };
    checked
        .await
        .map_err(DbError::query("cannot check a chunk"))?;
    tracing::debug!(
        rows = rows.len(),
        check_ms = started.elapsed().as_millis() as u64,
        "Plain rows checked."
    );

    let outcomes = rows.iter().map(|&i| {
        let update = updates[i];
        let Some(Verdict::Left {
            is_code_taken,
            is_credit_card,
            is_changed,
            ..
        }) = verdicts[i]
        else {
            return RowOutcome::Failed(vec![token::not_found_error(update.line)]);
        };
        match refusal(update, is_code_taken, is_credit_card) {
            Some(error) => RowOutcome::Failed(vec![error]),
            None if is_changed => RowOutcome::Applied(None),
            None => RowOutcome::Unchanged(None),
        }
    });
    Ok(outcomes.collect())
}

/// The error that refuses a plain row whose token exists, if any, in the order of the rules:
/// its new authentication code is held by another token, or it sets a card number on a token
/// whose classification takes none.
fn refusal(update: &TokenUpdate, is_code_taken: bool, is_credit_card: bool) -> Option<RowError> {
    if is_code_taken {
        Some(token::value_taken_error(update.line, "authentication_code"))
    } else if !update.card_masked_number.is_absent() && !is_credit_card {
        Some(token::card_not_applicable_error(update.line))
    } else {
        None
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

/// Copies the staged rows into the patch table and applies them; gives what the database
/// said of each row of the chunk (`chunk_rows` rows), by its `idx` (`None`: its token does
/// not exist, or the row is not one of the staged).
async fn stage_and_apply(
    tx: &Transaction<'_>,
    chunk_rows: usize,
    staged: &Staged,
) -> Result<Vec<Option<Verdict>>, tokio_postgres::Error> {
    let started = std::time::Instant::now();
    staged.copy_in(tx).await?;
    let copied = std::time::Instant::now();

    let mut verdicts: Vec<Option<Verdict>> = Vec::new();
    verdicts.resize_with(chunk_rows, || None);
    let mut written = 0;
    for row in tx.query(&staged.update_sql(), &[]).await? {
        let idx: i32 = row.get(0);
        verdicts[idx as usize] = Some(Verdict::Written(row.get(1)));
        written += 1;
    }
    let written_ms = copied.elapsed().as_millis() as u64;

    // Usually every row is written; only the others are looked at again.
    if written < staged.len() {
        let left: Vec<usize> = (0..chunk_rows).filter(|&i| verdicts[i].is_none()).collect();
        explain(tx, staged, &left, &mut verdicts).await?;
    }
    tracing::debug!(
        rows = staged.len(),
        copy_ms = (copied - started).as_millis() as u64,
        written_ms,
        "Plain rows applied."
    );
    Ok(verdicts)
}

/// Runs the verdict query for the staged rows `rows` (their `idx`), and records a
/// [`Verdict::Left`] for each whose token exists.
async fn explain(
    tx: &Transaction<'_>,
    staged: &Staged,
    rows: &[usize],
    verdicts: &mut [Option<Verdict>],
) -> Result<(), tokio_postgres::Error> {
    let idx: Vec<i32> = rows.iter().map(|&i| i as i32).collect();
    for row in tx.query(&staged.verdict_sql(), &[&idx]).await? {
        let idx: i32 = row.get(0);
        verdicts[idx as usize] = Some(Verdict::Left {
            id: row.get(1),
            is_code_taken: row.get(2),
            is_credit_card: row.get(3),
            is_changed: row.get(4),
        });
    }
    Ok(())
}
