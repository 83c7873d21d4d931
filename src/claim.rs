//! Exactly once: how a batch file is claimed, judged and recovered, by any number of
//! tokensync instances sharing one database and one set of folders.
//!
//! The design rests on three facts of PostgreSQL and one order of steps.
//!
//! 1. **The claim is a session advisory lock on the file's name**, taken with
//!    `pg_try_advisory_lock` on the connection that then runs the batch. Only one instance
//!    holds it; the others skip the file for this scan. It dies with the connection, so a
//!    process killed at any point (or cut off from the database) frees its files at once,
//!    and no claim can be left behind on disk. After taking it, the instance checks that
//!    the file is still in `paths.incoming` (another may have just finished it).
//! 2. **The ledger is the judge.** Inside the batch's transaction, a transaction advisory
//!    lock on the file's SHA-256 serialises batches of the same content under any name, and
//!    the `batches` ledger (with its unique index on the SHA-256 of applied batches) says
//!    whether that content was applied. The ledger row is inserted in the transaction that
//!    applies the rows: a batch is committed together with its record, or not at all.
//! 3. **Reports are durable before the commit.** The reports are written and flushed in the
//!    work folder `paths.incoming/.tokensync/<file name>/`, and the ledger row names the
//!    archive name chosen for the file, before the commit. After the commit the reports are
//!    moved next to that name, then the file itself.
//!
//! So, wherever a process dies:
//! - before the commit: the transaction is rolled back by PostgreSQL; the file is still in
//!   `paths.incoming`; the next claim removes the stale work folder and applies it again;
//! - after the commit, before the file is moved: the next claim finds the ledger row of
//!   this file name and content whose file is not at its archive name yet, while its report
//!   is in the work folder or already beside that name, and finishes the moves
//!   ([`Judgement::Unfinished`]) instead of calling the file a duplicate;
//! - after the move: the file is gone from `paths.incoming`; nothing is left to do.
//!
//! A rejected or duplicate batch is recorded after its rollback, its reports already
//! flushed: if the process dies before its file is moved, the next claim finishes it the
//! same way, with no second ledger row. If it dies before the record, the file is simply
//! judged again.

use crate::db::DbError;
use crate::report::Status;
use tokio_postgres::{Client, GenericClient};
use uuid::Uuid;

/// The first half of the two-key advisory locks that claim file names ("tok1").
const NAME_LOCK_SPACE: i32 = 0x746f_6b31;

/// A claim on one file name, held by a database session until released.
#[derive(Debug)]
#[must_use = "a claim is held until it is released"]
pub struct Claim {
    key: i32,
}

/// The second key of a file name's lock: a hash of the name. Two names with the same hash
/// only wait for each other.
fn name_key(name: &str) -> i32 {
    // FNV-1a, folded to 32 bits: stable across builds and instances.
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::from_ne_bytes(hash.to_ne_bytes())
}

impl Claim {
    /// Claims `name` for this session, unless another session holds it.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn try_take(client: &Client, name: &str) -> Result<Option<Claim>, DbError> {
        let key = name_key(name);
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&NAME_LOCK_SPACE, &key],
            )
            .await
            .map_err(DbError::query("cannot claim a file"))?;
        Ok(row.get::<_, bool>(0).then_some(Claim { key }))
    }

    /// Releases the claim. A connection that is gone has released it already.
    pub async fn release(self, client: &Client) {
        let sql = "SELECT pg_advisory_unlock($1, $2)";
        if let Err(error) = client.execute(sql, &[&NAME_LOCK_SPACE, &self.key]).await {
            tracing::debug!(%error, "Claim not released: the connection is gone.");
        }
    }
}

/// Serialises the batches of one content, until the transaction ends.
///
/// # Errors
/// When the database fails.
pub async fn lock_content(client: &impl GenericClient, sha256: &str) -> Result<(), DbError> {
    let bytes = hex::decode(&sha256[..16]).expect("a SHA-256 in hex");
    let key = i64::from_be_bytes(bytes.try_into().expect("8 bytes"));
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&key])
        .await
        .map_err(DbError::query("cannot lock the batch"))?;
    Ok(())
}

/// What the ledger says of a file about to be applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    /// The content was never applied: apply it.
    New,
    /// The content was applied before (fully or partly): a duplicate.
    Duplicate,
    /// This very file was recorded, but the process stopped before moving it: finish.
    Unfinished(RecordedBatch),
}

/// The ledger row of a batch whose file is to be moved.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedBatch {
    pub id: Uuid,
    pub status: Status,
    pub archive_name: String,
}

/// Judges a file by its content and name. `is_unmoved` tells whether the file of a ledger
/// row with this name and content is still to be moved (see the module's comment).
///
/// # Errors
/// When the database fails.
pub async fn judge(
    client: &impl GenericClient,
    sha256: &str,
    file_name: &str,
    is_unmoved: impl Fn(&RecordedBatch) -> bool,
) -> Result<Judgement, DbError> {
    let sql = "SELECT id, status, archive_name FROM batches \
               WHERE sha256 = $1 AND file_name = $2 AND archive_name IS NOT NULL \
               ORDER BY started_at DESC LIMIT 1";
    let latest = client
        .query_opt(sql, &[&sha256, &file_name])
        .await
        .map_err(DbError::query("cannot read the ledger"))?;
    // The ledger's check constraint allows only the statuses `Status` knows.
    if let Some(row) = latest
        && let Some(status) = Status::parse(row.get(1))
    {
        let batch = RecordedBatch {
            id: row.get(0),
            status,
            archive_name: row.get(2),
        };
        if is_unmoved(&batch) {
            return Ok(Judgement::Unfinished(batch));
        }
    }

    let sql = "SELECT EXISTS (SELECT FROM batches \
               WHERE sha256 = $1 AND status IN ('applied', 'partially_applied'))";
    let is_applied: bool = client
        .query_one(sql, &[&sha256])
        .await
        .map_err(DbError::query("cannot read the ledger"))?
        .get(0);
    Ok(match is_applied {
        true => Judgement::Duplicate,
        false => Judgement::New,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_keys_are_stable_and_spread() {
        assert_eq!(name_key("tokens.csv"), name_key("tokens.csv"));
        assert_ne!(name_key("tokens-1.csv"), name_key("tokens-2.csv"));
    }
}
