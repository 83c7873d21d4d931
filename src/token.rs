//! An access token as stored, and the rules of SPEC 1.2 that need it: from a token, a
//! validated row and a few facts found in the database, the token as the row leaves it.
//!
//! Both ways of applying a batch, row by row ([`crate::apply`]) and in sets
//! ([`crate::bulk`]), run these same rules; they differ only in how they find the facts.

use crate::error::{ErrorCode, RowError};
use crate::field::{Field, ResultField};
use crate::update::{CustomFieldsPatch, Patch, TokenUpdate};
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use serde_json::{Map, Value};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

/// `access_token_definition`: the settings that decide which fields may be null.
#[derive(Debug, Clone, Copy, Default)]
pub struct Definition {
    pub allow_no_identifier_and_pass_code: bool,
    pub auto_generate_authentication_code: bool,
}

/// The columns [`Token::from_row`] reads, from `access_tokens t` joined with
/// `access_token_classifications c`.
const TOKEN_COLUMNS: &str = "t.id, t.classification_id, t.authentication_code, t.identifier, \
    t.pass_code_hash, t.card_masked_number, \
    t.udf_string_1, t.udf_string_2, t.udf_string_3, t.udf_string_4, \
    t.udf_string_5, t.udf_string_6, t.udf_string_7, t.udf_string_8, \
    t.udf_float_1, t.udf_float_2, t.udf_float_3, t.udf_float_4, \
    t.udf_date_1, t.udf_date_2, t.udf_date_3, t.udf_date_4, \
    t.custom_fields, t.created_at, t.updated_at, \
    coalesce(c.auto_generate_authentication_code, false), coalesce(c.credit_card, false)";

/// A query of tokens with `TOKEN_COLUMNS`, then their version as `row_version` (for
/// writes guarded by `xmin`), where `condition` holds (it may end with a locking clause).
pub fn select_sql(condition: &str) -> String {
    format!(
        "SELECT {TOKEN_COLUMNS}, t.xmin::text AS row_version FROM access_tokens t \
         LEFT JOIN access_token_classifications c ON c.id = t.classification_id \
         WHERE {condition}"
    )
}

/// `ACCESS_TOKEN_NOT_FOUND`: no token has the key, or the pass code does not match (the
/// same error, so a report never tells which).
pub fn not_found_error(line: u64) -> RowError {
    let message = "no access token matches the identifier";
    RowError::field(
        line,
        "access_token_identifier",
        ErrorCode::AccessTokenNotFound,
        message,
    )
}

/// `DUPLICATE_VALUE`: another token holds the value the row sets in `field`.
pub fn value_taken_error(line: u64, field: &str) -> RowError {
    let message = "another access token already has this value";
    RowError::field(line, field, ErrorCode::DuplicateValue, message)
}

/// `CARD_NOT_APPLICABLE`: the row sets a card number on a token that takes none.
pub fn card_not_applicable_error(line: u64) -> RowError {
    let message = "the token's classification is not a credit card";
    RowError::field(
        line,
        "card_masked_number",
        ErrorCode::CardNotApplicable,
        message,
    )
}

/// An access token as stored, with the flags of its classification.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: Uuid,
    pub classification_id: Option<Uuid>,
    pub authentication_code: String,
    pub identifier: Option<String>,
    pub pass_code_hash: Option<String>,
    pub card_masked_number: Option<String>,
    pub udf_strings: [Option<String>; 8],
    pub udf_floats: [Option<f64>; 4],
    pub udf_dates: [Option<NaiveDate>; 4],
    pub custom_fields: Map<String, Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub is_auto_generated_by_classification: bool,
    pub is_credit_card: bool,
}

impl Token {
    /// Reads a token from a row of `TOKEN_COLUMNS`.
    pub fn from_row(row: &Row) -> Token {
        let custom_fields = match row.get::<_, Value>(22) {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        Token {
            id: row.get(0),
            classification_id: row.get(1),
            authentication_code: row.get(2),
            identifier: row.get(3),
            pass_code_hash: row.get(4),
            card_masked_number: row.get(5),
            udf_strings: std::array::from_fn(|i| row.get(6 + i)),
            udf_floats: std::array::from_fn(|i| row.get(14 + i)),
            udf_dates: std::array::from_fn(|i| row.get(18 + i)),
            custom_fields,
            created_at: row.get(23),
            updated_at: row.get(24),
            is_auto_generated_by_classification: row.get(25),
            is_credit_card: row.get(26),
        }
    }

    /// The values of the columns a row may change, in table order from
    /// `authentication_code` to `custom_fields` (`custom_fields` given as a JSON object).
    pub fn writable_values<'a>(&'a self, custom_fields: &'a Value) -> Vec<&'a (dyn ToSql + Sync)> {
        let mut values: Vec<&(dyn ToSql + Sync)> = vec![
            &self.authentication_code,
            &self.identifier,
            &self.pass_code_hash,
            &self.card_masked_number,
        ];
        values.extend(self.udf_strings.iter().map(|v| v as &(dyn ToSql + Sync)));
        values.extend(self.udf_floats.iter().map(|v| v as &(dyn ToSql + Sync)));
        values.extend(self.udf_dates.iter().map(|v| v as &(dyn ToSql + Sync)));
        values.push(custom_fields);
        values
    }

    /// The row's result: the listed fields of the token as it is now.
    pub fn result(&self, fields: &[ResultField]) -> Value {
        let mut object = Map::new();
        for field in fields {
            object.insert(field.name().to_owned(), self.field_value(*field));
        }
        Value::Object(object)
    }

    fn field_value(&self, field: ResultField) -> Value {
        let date = |date: &Option<NaiveDate>| match date {
            Some(date) => Value::from(date.format("%Y-%m-%d").to_string()),
            None => Value::Null,
        };
        match field {
            ResultField::Id => Value::from(self.id.to_string()),
            ResultField::ClassificationId => self
                .classification_id
                .map_or(Value::Null, |id| Value::from(id.to_string())),
            ResultField::Field(Field::AuthenticationCode) => {
                Value::from(self.authentication_code.as_str())
            }
            ResultField::Field(Field::Identifier) => Value::from(self.identifier.clone()),
            // A result never holds the pass code; `ResultField::parse` refuses it.
            ResultField::Field(Field::PassCode) => Value::Null,
            ResultField::Field(Field::CardMaskedNumber) => {
                Value::from(self.card_masked_number.clone())
            }
            ResultField::Field(Field::UdfString(i)) => {
                Value::from(self.udf_strings[usize::from(i)].clone())
            }
            ResultField::Field(Field::UdfFloat(i)) => Value::from(self.udf_floats[usize::from(i)]),
            ResultField::Field(Field::UdfDate(i)) => date(&self.udf_dates[usize::from(i)]),
            ResultField::CustomFieldSet => {
                let mut fields: Vec<_> = self.custom_fields.iter().collect();
                fields.sort_by(|a, b| a.0.cmp(b.0));
                let one_key = |(name, value): (&String, &Value)| {
                    Value::Object(Map::from_iter([(name.clone(), value.clone())]))
                };
                Value::Array(fields.into_iter().map(one_key).collect())
            }
            ResultField::CreatedAt => Value::from(timestamp(self.created_at)),
            ResultField::UpdatedAt => Value::from(timestamp(self.updated_at)),
        }
    }
}

fn timestamp(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// What the rules need to know beyond the token and the row, found in the database first.
#[derive(Debug, Clone, Default)]
pub struct RowFacts {
    /// Another token holds the authentication code the row sets.
    pub is_code_taken: bool,
    /// Another token holds the identifier the row sets.
    pub is_identifier_taken: bool,
    /// The hash of the pass code the row sets, when it sets one.
    pub pass_code_hash: Option<String>,
    /// A new code that no token holds, when the row sets `authentication_code` to null.
    pub generated_code: Option<String>,
}

/// The token as the row leaves it, or the first rule the row breaks, in a fixed order:
/// `authentication_code`, `identifier`, `pass_code`, the pass code rule,
/// `card_masked_number`. The facts that need the database come in `facts`.
///
/// # Errors
/// The first rule the row breaks.
pub fn next_state(
    definition: &Definition,
    token: &Token,
    update: &TokenUpdate,
    facts: RowFacts,
) -> Result<Token, RowError> {
    let line = update.line;
    let fail = |field: &str, code: ErrorCode, message: &str| {
        Err(RowError::field(line, field, code, message))
    };
    let mut next = token.clone();

    match &update.authentication_code {
        Patch::Absent => {}
        Patch::Value(code) => {
            if code.expose() != token.authentication_code && facts.is_code_taken {
                return Err(value_taken_error(line, "authentication_code"));
            }
            next.authentication_code = code.expose().to_owned();
        }
        Patch::Null => {
            let is_generated = definition.auto_generate_authentication_code
                || token.is_auto_generated_by_classification;
            if !is_generated {
                let message = "authentication codes are not generated automatically here";
                return fail("authentication_code", ErrorCode::NotNullable, message);
            }
            let Some(code) = facts.generated_code else {
                unreachable!("a code is generated for every row that sets it to null")
            };
            next.authentication_code = code;
        }
    }

    match &update.identifier {
        Patch::Absent => {}
        Patch::Value(identifier) => {
            if token.identifier.as_ref() != Some(identifier) && facts.is_identifier_taken {
                return Err(value_taken_error(line, "identifier"));
            }
            next.identifier = Some(identifier.clone());
        }
        Patch::Null => {
            if !definition.allow_no_identifier_and_pass_code {
                let message = "access tokens must have an identifier here";
                return fail("identifier", ErrorCode::NotNullable, message);
            }
            next.identifier = None;
        }
    }

    match &update.pass_code {
        Patch::Absent => {}
        Patch::Value(_) => {
            let Some(hash) = facts.pass_code_hash else {
                unreachable!("a hash is made for every row that sets a pass code")
            };
            next.pass_code_hash = Some(hash);
        }
        Patch::Null => {
            if !definition.allow_no_identifier_and_pass_code {
                let message = "access tokens must have a pass code here";
                return fail("pass_code", ErrorCode::NotNullable, message);
            }
            next.pass_code_hash = None;
        }
    }
    let sets_identifier = matches!(update.identifier, Patch::Value(_));
    if sets_identifier && next.pass_code_hash.is_none() {
        let message = "a token with an identifier needs a pass code";
        return fail("pass_code", ErrorCode::PassCodeRequired, message);
    }
    if matches!(update.pass_code, Patch::Null) && next.identifier.is_some() {
        let message = "a token with an identifier needs a pass code";
        return fail("pass_code", ErrorCode::PassCodeRequired, message);
    }

    if !update.card_masked_number.is_absent() {
        if !token.is_credit_card {
            return Err(card_not_applicable_error(line));
        }
        let card = update.card_masked_number.as_ref().resolve(None);
        next.card_masked_number = card.map(|card| card.expose().to_owned());
    }

    for (slot, patch) in next.udf_strings.iter_mut().zip(&update.udf_strings) {
        *slot = patch.resolve(slot.take());
    }
    for (slot, patch) in next.udf_floats.iter_mut().zip(&update.udf_floats) {
        *slot = patch.resolve(*slot);
    }
    for (slot, patch) in next.udf_dates.iter_mut().zip(&update.udf_dates) {
        *slot = patch.resolve(*slot);
    }

    match &update.custom_fields {
        CustomFieldsPatch::Absent => {}
        CustomFieldsPatch::Clear => next.custom_fields.clear(),
        CustomFieldsPatch::Change(changes) => {
            for (name, value) in changes {
                match value {
                    Some(value) => next.custom_fields.insert(name.clone(), value.clone()),
                    None => next.custom_fields.remove(name),
                };
            }
        }
    }
    Ok(next)
}
