//! Applying validated updates to `access_tokens`, one row after another, inside the batch's
//! transaction.
//!
//! This is the reference implementation of SPEC 1.4: each row runs in a savepoint, finds
//! its token (`FOR UPDATE`), checks the rules that need the database in a fixed order and
//! stops at the first failure, then writes the whole row back. A failed row's savepoint is
//! rolled back, so it leaves no trace and the rows after it see the state without it.

use crate::db::DbError;
use crate::error::RowError;
use crate::secret;
use crate::token::{self, Definition, RowFacts, Token};
use crate::update::{CustomFieldDefinitions, DataType, Patch, Secret};
use crate::update::{TokenKey, TokenUpdate};
use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Statement, Transaction};
use uuid::Uuid;

/// What applying one row came to.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutcome {
    /// The token changed. Holds the row's result when it gave `fields_set`.
    Applied(Option<Value>),
    /// The token was found but no value changed.
    Unchanged(Option<Value>),
    /// The row failed and left no trace.
    Failed(Vec<RowError>),
}

/// Reads `access_token_definition` (its one row; defaults when it is missing).
///
/// # Errors
/// When the query fails.
pub async fn load_definition(client: &impl GenericClient) -> Result<Definition, DbError> {
    let sql = "SELECT allow_no_identifier_and_pass_code, auto_generate_authentication_code \
               FROM access_token_definition LIMIT 1";
    let row = client
        .query_opt(sql, &[])
        .await
        .map_err(DbError::query("cannot read the definition"))?;
    Ok(row.map_or_else(Definition::default, |row| Definition {
        allow_no_identifier_and_pass_code: row.get(0),
        auto_generate_authentication_code: row.get(1),
    }))
}

/// Reads `custom_field_definitions`. A definition with an unknown data type is left out, so
/// a row that uses it fails with `UNKNOWN_CUSTOM_FIELD`.
///
/// # Errors
/// When the query fails.
pub async fn load_custom_fields(
    client: &impl GenericClient,
) -> Result<CustomFieldDefinitions, DbError> {
    let sql = "SELECT name, data_type FROM custom_field_definitions";
    let rows = client
        .query(sql, &[])
        .await
        .map_err(DbError::query("cannot read custom field definitions"))?;
    let mut definitions = CustomFieldDefinitions::new();
    for row in rows {
        let name: String = row.get(0);
        let data_type: String = row.get(1);
        match DataType::parse(&data_type) {
            Some(data_type) => {
                definitions.insert(name, data_type);
            }
            None => {
                tracing::warn!(field = %name, %data_type, "Custom field has an unknown data type.")
            }
        }
    }
    Ok(definitions)
}

/// The statements one row needs, prepared once per batch.
struct Statements {
    by_authentication_code: Statement,
    by_identifier: Statement,
    authentication_code_taken: Statement,
    identifier_taken: Statement,
    update: Statement,
}

/// Applies the rows of one batch, one after another, in its transaction.
pub struct Applier {
    definition: Definition,
    statements: Statements,
    is_dry_run: bool,
}

impl Applier {
    /// Prepares the statements and reads the definition. A dry run (`validate`) does not
    /// hash new pass codes: its transaction is never committed.
    ///
    /// # Errors
    /// When the database refuses to prepare or read.
    pub async fn new(tx: &Transaction<'_>, is_dry_run: bool) -> Result<Applier, DbError> {
        let definition = load_definition(tx).await?;
        let select = |key: &str| token::select_sql(&format!("t.{key} = $1 FOR UPDATE OF t"));
        let statements = Statements {
            by_authentication_code: prepare(tx, &select("authentication_code")).await?,
            by_identifier: prepare(tx, &select("identifier")).await?,
            authentication_code_taken: prepare(
                tx,
                "SELECT 1 FROM access_tokens WHERE authentication_code = $1 AND id <> $2",
            )
            .await?,
            identifier_taken: prepare(
                tx,
                "SELECT 1 FROM access_tokens WHERE identifier = $1 AND id <> $2",
            )
            .await?,
            update: prepare(tx, UPDATE_SQL).await?,
        };
        Ok(Applier {
            definition,
            statements,
            is_dry_run,
        })
    }

    /// The definition read when the applier was made.
    pub fn definition(&self) -> Definition {
        self.definition
    }

    /// Applies one row in a savepoint of `tx`.
    ///
    /// # Errors
    /// Only when the database fails; a row the rules refuse is a [`RowOutcome::Failed`].
    pub async fn apply(
        &self,
        tx: &mut Transaction<'_>,
        update: &TokenUpdate,
    ) -> Result<RowOutcome, DbError> {
        let savepoint = tx
            .savepoint("row")
            .await
            .map_err(DbError::query("cannot start a row"))?;
        let outcome = self.apply_in(&savepoint, update).await;
        let keep = matches!(
            outcome,
            Ok(RowOutcome::Applied(_) | RowOutcome::Unchanged(_))
        );
        if keep {
            savepoint
                .commit()
                .await
                .map_err(DbError::query("cannot finish a row"))?;
        } else {
            savepoint
                .rollback()
                .await
                .map_err(DbError::query("cannot undo a failed row"))?;
        }
        outcome
    }

    async fn apply_in(
        &self,
        tx: &Transaction<'_>,
        update: &TokenUpdate,
    ) -> Result<RowOutcome, DbError> {
        let line = update.line;
        let Some(token) = self.find(tx, &update.key).await? else {
            return Ok(RowOutcome::Failed(vec![token::not_found_error(line)]));
        };

        let facts = self.facts(tx, &token, update).await?;
        let next = match token::next_state(&self.definition, &token, update, facts) {
            Ok(next) => next,
            Err(error) => return Ok(RowOutcome::Failed(vec![error])),
        };
        let result = |token: &Token| {
            update
                .fields_set
                .as_ref()
                .map(|fields| token.result(fields))
        };
        if next == token {
            return Ok(RowOutcome::Unchanged(result(&token)));
        }

        match self.write(tx, &next).await {
            Ok(updated_at) => {
                let next = Token { updated_at, ..next };
                Ok(RowOutcome::Applied(result(&next)))
            }
            Err(error) => match unique_violation_field(&error) {
                Some(field) => Ok(RowOutcome::Failed(vec![token::value_taken_error(
                    line, field,
                )])),
                None => Err(DbError::Query {
                    context: "cannot update an access token",
                    source: error,
                }),
            },
        }
    }

    /// Finds the token a row names, verifying the pass code when it names one by
    /// identifier. A wrong pass code looks exactly like an unknown identifier.
    async fn find(&self, tx: &Transaction<'_>, key: &TokenKey) -> Result<Option<Token>, DbError> {
        let lookup_error = DbError::query("cannot look up an access token");
        match key {
            TokenKey::AuthenticationCode(code) => {
                let statement = &self.statements.by_authentication_code;
                let row = tx
                    .query_opt(statement, &[&code.expose()])
                    .await
                    .map_err(lookup_error)?;
                Ok(row.as_ref().map(Token::from_row))
            }
            TokenKey::Identifier {
                identifier,
                pass_code,
            } => {
                let statement = &self.statements.by_identifier;
                let row = tx
                    .query_opt(statement, &[identifier])
                    .await
                    .map_err(lookup_error)?;
                let Some(token) = row.as_ref().map(Token::from_row) else {
                    return Ok(None);
                };
                let Some(hash) = token.pass_code_hash.clone() else {
                    return Ok(None);
                };
                let is_match = secret::verify_pass_code(pass_code.clone(), hash).await;
                Ok(is_match.then_some(token))
            }
        }
    }

    /// Finds what the rules need to know of the database for this row: whether its new
    /// values are taken, a generated code, the hash of its new pass code.
    async fn facts(
        &self,
        tx: &Transaction<'_>,
        token: &Token,
        update: &TokenUpdate,
    ) -> Result<RowFacts, DbError> {
        let mut facts = RowFacts::default();
        match &update.authentication_code {
            Patch::Value(code) if code.expose() != token.authentication_code => {
                let statement = &self.statements.authentication_code_taken;
                facts.is_code_taken = self
                    .is_taken(tx, statement, code.expose(), token.id)
                    .await?;
            }
            Patch::Null => facts.generated_code = Some(self.unused_code(tx, token.id).await?),
            _ => {}
        }
        if let Patch::Value(identifier) = &update.identifier
            && token.identifier.as_ref() != Some(identifier)
        {
            let statement = &self.statements.identifier_taken;
            facts.is_identifier_taken = self.is_taken(tx, statement, identifier, token.id).await?;
        }
        if let Patch::Value(pass_code) = &update.pass_code {
            facts.pass_code_hash = Some(self.hash(pass_code).await);
        }
        Ok(facts)
    }

    async fn is_taken(
        &self,
        tx: &Transaction<'_>,
        statement: &Statement,
        value: &str,
        id: Uuid,
    ) -> Result<bool, DbError> {
        let row = tx
            .query_opt(statement, &[&value, &id])
            .await
            .map_err(DbError::query("cannot check that a value is unique"))?;
        Ok(row.is_some())
    }

    /// A generated authentication code that no other token has.
    async fn unused_code(&self, tx: &Transaction<'_>, id: Uuid) -> Result<String, DbError> {
        loop {
            let code = secret::generate_authentication_code();
            let statement = &self.statements.authentication_code_taken;
            if !self.is_taken(tx, statement, &code, id).await? {
                return Ok(code);
            }
        }
    }

    async fn hash(&self, pass_code: &Secret) -> String {
        if self.is_dry_run {
            return secret::DRY_RUN_HASH.to_owned();
        }
        secret::hash_pass_code(pass_code.clone()).await
    }

    /// Writes every column of the token back; gives the new `updated_at`.
    async fn write(
        &self,
        tx: &Transaction<'_>,
        token: &Token,
    ) -> Result<DateTime<Utc>, tokio_postgres::Error> {
        let custom_fields = Value::Object(token.custom_fields.clone());
        let mut values: Vec<&(dyn ToSql + Sync)> = vec![&token.id];
        values.extend(token.writable_values(&custom_fields));
        let row = tx.query_one(&self.statements.update, &values).await?;
        Ok(row.get(0))
    }
}

async fn prepare(tx: &Transaction<'_>, sql: &str) -> Result<Statement, DbError> {
    tx.prepare(sql)
        .await
        .map_err(DbError::query("cannot prepare the update statements"))
}

const UPDATE_SQL: &str = "UPDATE access_tokens SET \
    authentication_code = $2, identifier = $3, pass_code_hash = $4, card_masked_number = $5, \
    udf_string_1 = $6, udf_string_2 = $7, udf_string_3 = $8, udf_string_4 = $9, \
    udf_string_5 = $10, udf_string_6 = $11, udf_string_7 = $12, udf_string_8 = $13, \
    udf_float_1 = $14, udf_float_2 = $15, udf_float_3 = $16, udf_float_4 = $17, \
    udf_date_1 = $18, udf_date_2 = $19, udf_date_3 = $20, udf_date_4 = $21, \
    custom_fields = $22, updated_at = now() \
    WHERE id = $1 RETURNING updated_at";

/// The field whose unique constraint an error broke, if it is a unique violation.
fn unique_violation_field(error: &tokio_postgres::Error) -> Option<&'static str> {
    if error.code() != Some(&SqlState::UNIQUE_VIOLATION) {
        return None;
    }
    let constraint = error
        .as_db_error()
        .and_then(|e| e.constraint())
        .unwrap_or_default();
    if constraint.contains("identifier") {
        Some("identifier")
    } else {
        Some("authentication_code")
    }
}
