//! The partial update of one access token: what a row asks for, validated.
//!
//! A row of a batch file becomes a [`TokenUpdate`] in two phases: the readers in
//! [`crate::row`] find the raw cells, and an [`UpdateBuilder`] checks every rule that needs
//! no database (types, lengths, masked card numbers, custom field definitions, `fields_set`
//! names). Every field at fault is reported, not just the first. The checks that need the
//! token itself happen in [`crate::apply`].

use crate::error::{ErrorCode, RowError};
use crate::field::{Field, ResultField};
use chrono::NaiveDate;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// One field of a partial update: not specified, specified as null, or given a value.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Patch<T> {
    /// Not specified: the field is not touched.
    #[default]
    Absent,
    /// Specified as null: the field is cleared (subject to the rules of SPEC 1.2).
    Null,
    /// Specified with a value.
    Value(T),
}

impl<T> Patch<T> {
    /// Whether the row left this field alone.
    pub fn is_absent(&self) -> bool {
        matches!(self, Patch::Absent)
    }

    /// Borrows the value, if any.
    pub fn as_ref(&self) -> Patch<&T> {
        match self {
            Patch::Absent => Patch::Absent,
            Patch::Null => Patch::Null,
            Patch::Value(value) => Patch::Value(value),
        }
    }

    /// The value the field takes after this patch, given its current value.
    pub fn resolve(&self, current: Option<T>) -> Option<T>
    where
        T: Clone,
    {
        match self {
            Patch::Absent => current,
            Patch::Null => None,
            Patch::Value(value) => Some(value.clone()),
        }
    }
}

/// A string that must never reach a log or a message: a pass code, an authentication code
/// or a card number. Its `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The clear text, for the database and the argon2 functions only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How a row names its token (`access_token_identifier`).
#[derive(Debug, Clone, PartialEq)]
pub enum TokenKey {
    AuthenticationCode(Secret),
    Identifier {
        identifier: String,
        pass_code: Secret,
    },
}

/// The data type of a custom field, from `custom_field_definitions.data_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    String,
    Integer,
    Float,
    Boolean,
    Date,
}

impl DataType {
    /// Parses the spelling used in `custom_field_definitions.data_type`.
    pub fn parse(name: &str) -> Option<DataType> {
        match name {
            "string" => Some(DataType::String),
            "integer" => Some(DataType::Integer),
            "float" => Some(DataType::Float),
            "boolean" => Some(DataType::Boolean),
            "date" => Some(DataType::Date),
            _ => None,
        }
    }
}

/// The custom fields a batch may set, by name.
pub type CustomFieldDefinitions = BTreeMap<String, DataType>;

/// What a row does to the token's custom fields.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum CustomFieldsPatch {
    /// Not specified, or an empty list: nothing changes.
    #[default]
    Absent,
    /// `custom_field_set` given as null: every custom field is removed.
    Clear,
    /// Each name is set to a typed value, or removed (`None`).
    Change(Vec<(String, Option<Value>)>),
}

/// A validated row: which token, and what to change on it.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenUpdate {
    pub line: u64,
    pub key: TokenKey,
    pub authentication_code: Patch<Secret>,
    pub identifier: Patch<String>,
    pub pass_code: Patch<Secret>,
    pub card_masked_number: Patch<Secret>,
    pub udf_strings: [Patch<String>; 8],
    pub udf_floats: [Patch<f64>; 4],
    pub udf_dates: [Patch<NaiveDate>; 4],
    pub custom_fields: CustomFieldsPatch,
    /// The fields this row's result holds; `None` when the row gave no `fields_set`.
    pub fields_set: Option<Vec<ResultField>>,
}

/// A raw value of a row, before it is checked against its field.
#[derive(Debug, Clone, Copy)]
pub enum RawValue<'a> {
    /// Specified as null (JSON `null`, or the CSV null marker).
    Null,
    /// A CSV cell: the field's type is read from the text.
    Text(&'a str),
    /// A JSON value other than null: its JSON type must match the field's.
    Json(&'a Value),
}

/// Which part of `access_token_identifier` a value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPart {
    AuthenticationCode,
    Identifier,
    PassCode,
}

impl KeyPart {
    /// Parses a key inside `access_token_identifier`.
    pub fn parse(name: &str) -> Option<KeyPart> {
        match name {
            "authentication_code" => Some(KeyPart::AuthenticationCode),
            "identifier" => Some(KeyPart::Identifier),
            "pass_code" => Some(KeyPart::PassCode),
            _ => None,
        }
    }

    /// The dotted name used in reports, e.g. `access_token_identifier.pass_code`.
    pub fn qualified_name(self) -> &'static str {
        match self {
            KeyPart::AuthenticationCode => "access_token_identifier.authentication_code",
            KeyPart::Identifier => "access_token_identifier.identifier",
            KeyPart::PassCode => "access_token_identifier.pass_code",
        }
    }
}

/// Collects the raw values of one row and turns them into a [`TokenUpdate`], gathering
/// every error on the way.
pub struct UpdateBuilder<'d> {
    line: u64,
    definitions: &'d CustomFieldDefinitions,
    key_authentication_code: Option<String>,
    key_identifier: Option<String>,
    key_pass_code: Option<String>,
    custom_changes: Option<Vec<(String, Option<Value>)>>,
    custom_cleared: bool,
    update: TokenUpdate,
    errors: Vec<RowError>,
}

const IDENTIFIER_FIELD: &str = "access_token_identifier";
const CUSTOM_FIELD_SET: &str = "custom_field_set";
const FIELDS_SET: &str = "fields_set";

impl<'d> UpdateBuilder<'d> {
    /// Starts the row that begins on `line`.
    pub fn new(line: u64, definitions: &'d CustomFieldDefinitions) -> Self {
        UpdateBuilder {
            line,
            definitions,
            key_authentication_code: None,
            key_identifier: None,
            key_pass_code: None,
            custom_changes: None,
            custom_cleared: false,
            update: TokenUpdate {
                line,
                key: TokenKey::AuthenticationCode(Secret::new("")),
                authentication_code: Patch::Absent,
                identifier: Patch::Absent,
                pass_code: Patch::Absent,
                card_masked_number: Patch::Absent,
                udf_strings: Default::default(),
                udf_floats: Default::default(),
                udf_dates: Default::default(),
                custom_fields: CustomFieldsPatch::Absent,
                fields_set: None,
            },
            errors: Vec::new(),
        }
    }

    /// Records an error of this row.
    pub fn error(&mut self, field: Option<&str>, code: ErrorCode, message: impl Into<String>) {
        let error = match field {
            Some(field) => RowError::field(self.line, field, code, message),
            None => RowError::row(self.line, code, message),
        };
        self.errors.push(error);
    }

    /// Sets one part of `access_token_identifier`. A null part counts as not given.
    pub fn set_key(&mut self, part: KeyPart, value: RawValue<'_>) {
        let name = part.qualified_name();
        let Some(text) = self.string(name, value) else {
            return;
        };
        // A pass code is only ever hashed and verified here; the other parts are looked up.
        // A part refused here still counts as given: the row fails for that reason alone.
        if part != KeyPart::PassCode {
            self.check_storable(name, &text);
        }
        let slot = match part {
            KeyPart::AuthenticationCode => &mut self.key_authentication_code,
            KeyPart::Identifier => &mut self.key_identifier,
            KeyPart::PassCode => &mut self.key_pass_code,
        };
        *slot = Some(text);
    }

    /// Sets an updatable field (any field of SPEC 1.2 but the custom fields and `fields_set`).
    pub fn set_field(&mut self, field: Field, value: RawValue<'_>) {
        let name = field.name();
        match field {
            Field::AuthenticationCode => {
                let patch = self.patch(value, |b, v| b.code(name, v, 255).map(Secret::new));
                self.update.authentication_code = patch;
            }
            Field::Identifier => {
                self.update.identifier = self.patch(value, |b, v| b.code(name, v, 255));
            }
            Field::PassCode => {
                self.update.pass_code = self.patch(value, |b, v| b.pass_code(name, v));
            }
            Field::CardMaskedNumber => {
                self.update.card_masked_number = self.patch(value, |b, v| b.card(name, v));
            }
            Field::UdfString(i) => {
                let patch = self.patch(value, |b, v| b.udf_string(name, v));
                self.update.udf_strings[usize::from(i)] = patch;
            }
            Field::UdfFloat(i) => {
                self.update.udf_floats[usize::from(i)] = self.patch(value, |b, v| b.float(name, v));
            }
            Field::UdfDate(i) => {
                self.update.udf_dates[usize::from(i)] = self.patch(value, |b, v| b.date(name, v));
            }
        }
    }

    /// Sets (or, with an empty value or null, removes) one custom field.
    pub fn set_custom_field(&mut self, name: &str, value: RawValue<'_>) {
        let qualified = format!("{CUSTOM_FIELD_SET}.{name}");
        let changes = self.custom_changes.get_or_insert_with(Vec::new);
        if changes.iter().any(|(existing, _)| existing == name) {
            let message = "the custom field is given more than once";
            self.error(Some(&qualified), ErrorCode::DuplicateCustomField, message);
            return;
        }
        changes.push((name.to_owned(), None));

        let Some(&data_type) = self.definitions.get(name) else {
            let message = "no custom field of this name is defined";
            self.error(Some(&qualified), ErrorCode::UnknownCustomField, message);
            return;
        };
        let typed = match value {
            RawValue::Null | RawValue::Text("") => None,
            RawValue::Json(Value::String(text)) if text.is_empty() => None,
            value => self.custom_value(&qualified, data_type, value),
        };
        if let Some(last) = self
            .custom_changes
            .as_mut()
            .and_then(|changes| changes.last_mut())
        {
            last.1 = typed;
        }
    }

    /// Marks `custom_field_set` as given (an empty list changes nothing).
    pub fn custom_fields_given(&mut self) {
        self.custom_changes.get_or_insert_with(Vec::new);
    }

    /// `custom_field_set` given as null: every custom field is removed.
    pub fn clear_custom_fields(&mut self) {
        self.custom_cleared = true;
    }

    /// Sets `fields_set`, from a comma-separated string or (JSON) a list of strings.
    /// Null counts as not given: the row's result then holds nothing.
    pub fn set_fields_set(&mut self, value: RawValue<'_>) {
        let names: Vec<String> = match value {
            RawValue::Null => return,
            RawValue::Text(text) => split_names(text),
            RawValue::Json(Value::String(text)) => split_names(text),
            RawValue::Json(Value::Array(items)) => {
                let mut names = Vec::with_capacity(items.len());
                for item in items {
                    let Value::String(name) = item else {
                        let message = "expected a list of field names";
                        self.error(Some(FIELDS_SET), ErrorCode::InvalidType, message);
                        return;
                    };
                    names.push(name.trim().to_owned());
                }
                names
            }
            RawValue::Json(_) => {
                let message = "expected a comma-separated string or a list of field names";
                self.error(Some(FIELDS_SET), ErrorCode::InvalidType, message);
                return;
            }
        };

        let mut fields = Vec::with_capacity(names.len());
        for name in &names {
            match ResultField::parse(name) {
                Some(field) if !fields.contains(&field) => fields.push(field),
                Some(_) => {}
                None => {
                    // The name itself may be a typo of a secret; it is not echoed.
                    let message = "fields_set names a field that a result cannot hold";
                    self.error(
                        Some(FIELDS_SET),
                        ErrorCode::UnknownFieldInFieldsSet,
                        message,
                    );
                    return;
                }
            }
        }
        self.update.fields_set = Some(fields);
    }

    /// Checks the identifier and returns the update, or every error of the row.
    ///
    /// # Errors
    /// Every error recorded for the row, in the order found.
    pub fn finish(mut self) -> Result<TokenUpdate, Vec<RowError>> {
        let key = match (
            self.key_authentication_code.take(),
            self.key_identifier.take(),
            self.key_pass_code.take(),
        ) {
            (Some(code), None, None) => Some(TokenKey::AuthenticationCode(Secret::new(code))),
            (Some(_), None, Some(_)) => {
                let message = "pass_code applies only together with identifier";
                let field = KeyPart::PassCode.qualified_name();
                self.error(Some(field), ErrorCode::PassCodeNotApplicable, message);
                None
            }
            (None, Some(identifier), Some(pass_code)) => Some(TokenKey::Identifier {
                identifier,
                pass_code: Secret::new(pass_code),
            }),
            (None, Some(_), None) => {
                let message = "identifier needs pass_code to identify the token";
                let field = KeyPart::PassCode.qualified_name();
                self.error(Some(field), ErrorCode::PassCodeRequired, message);
                None
            }
            (None, None, _) => {
                let message = "give authentication_code, or identifier with pass_code";
                self.error(
                    Some(IDENTIFIER_FIELD),
                    ErrorCode::IdentifierRequired,
                    message,
                );
                None
            }
            (Some(_), Some(_), _) => {
                let message = "give authentication_code or identifier, not both";
                self.error(
                    Some(IDENTIFIER_FIELD),
                    ErrorCode::IdentifierRequired,
                    message,
                );
                None
            }
        };

        self.update.custom_fields = match self.custom_changes.take() {
            _ if self.custom_cleared => CustomFieldsPatch::Clear,
            Some(mut changes) if !changes.is_empty() => {
                // Rows wait in chunks: keep only the room they use.
                changes.shrink_to_fit();
                CustomFieldsPatch::Change(changes)
            }
            _ => CustomFieldsPatch::Absent,
        };
        match key {
            Some(key) if self.errors.is_empty() => {
                self.update.key = key;
                Ok(self.update)
            }
            _ => {
                self.errors.sort_by_key(|error| error.line);
                Err(self.errors)
            }
        }
    }

    fn patch<T>(
        &mut self,
        value: RawValue<'_>,
        check: impl FnOnce(&mut Self, RawValue<'_>) -> Option<T>,
    ) -> Patch<T> {
        match value {
            RawValue::Null => Patch::Null,
            value => match check(self, value) {
                Some(value) => Patch::Value(value),
                // The error is recorded; the patch is never used.
                None => Patch::Absent,
            },
        }
    }

    /// The value as a string; `None` (with an error unless it was null) otherwise.
    fn string(&mut self, name: &str, value: RawValue<'_>) -> Option<String> {
        match value {
            RawValue::Null => None,
            RawValue::Text(text) => Some(text.to_owned()),
            RawValue::Json(Value::String(text)) => Some(text.clone()),
            RawValue::Json(_) => {
                self.error(Some(name), ErrorCode::InvalidType, "expected a string");
                None
            }
        }
    }

    /// Whether PostgreSQL can store `text`; records the error if not. Its `text` type cannot
    /// hold the NUL character, and a value with one would fail the whole batch there.
    fn check_storable(&mut self, name: &str, text: &str) -> bool {
        let is_storable = !text.contains('\0');
        if !is_storable {
            let message = "must not contain the NUL character";
            self.error(Some(name), ErrorCode::InvalidValue, message);
        }
        is_storable
    }

    /// `text` if PostgreSQL can store it (see [`Self::check_storable`]).
    fn storable(&mut self, name: &str, text: String) -> Option<String> {
        self.check_storable(name, &text).then_some(text)
    }

    /// An authentication code or identifier: 1 to `max_chars` characters.
    fn code(&mut self, name: &str, value: RawValue<'_>, max_chars: usize) -> Option<String> {
        let text = self.string(name, value)?;
        let text = self.storable(name, text)?;
        let chars = text.chars().count();
        if chars == 0 || chars > max_chars {
            let message = format!("must be 1 to {max_chars} characters long");
            self.error(Some(name), ErrorCode::InvalidValue, message);
            return None;
        }
        Some(text)
    }

    fn pass_code(&mut self, name: &str, value: RawValue<'_>) -> Option<Secret> {
        let text = self.string(name, value)?;
        if text.is_empty() || text.len() > 128 {
            self.error(
                Some(name),
                ErrorCode::InvalidValue,
                "must be 1 to 128 bytes long",
            );
            return None;
        }
        Some(Secret::new(text))
    }

    fn card(&mut self, name: &str, value: RawValue<'_>) -> Option<Secret> {
        let text = self.code(name, value, 255)?;
        if is_unmasked_card_number(&text) {
            let message = "card numbers must be masked";
            self.error(Some(name), ErrorCode::UnmaskedCardNumber, message);
            return None;
        }
        Some(Secret::new(text))
    }

    fn udf_string(&mut self, name: &str, value: RawValue<'_>) -> Option<String> {
        let text = self.string(name, value)?;
        let text = self.storable(name, text)?;
        if text.chars().count() > 255 {
            self.error(
                Some(name),
                ErrorCode::InvalidValue,
                "must be at most 255 characters",
            );
            return None;
        }
        Some(text)
    }

    fn float(&mut self, name: &str, value: RawValue<'_>) -> Option<f64> {
        let number = match value {
            RawValue::Null => return None,
            RawValue::Text(text) => text.parse::<f64>().ok(),
            RawValue::Json(Value::Number(number)) => number.as_f64(),
            RawValue::Json(_) => {
                self.error(Some(name), ErrorCode::InvalidType, "expected a number");
                return None;
            }
        };
        match number {
            Some(number) if number.is_finite() => Some(number),
            _ => {
                self.error(
                    Some(name),
                    ErrorCode::InvalidValue,
                    "expected a finite number",
                );
                None
            }
        }
    }

    fn date(&mut self, name: &str, value: RawValue<'_>) -> Option<NaiveDate> {
        let text = match value {
            RawValue::Null => return None,
            RawValue::Text(text) => text,
            RawValue::Json(Value::String(text)) => text.as_str(),
            RawValue::Json(_) => {
                let message = "expected a date string YYYY-MM-DD";
                self.error(Some(name), ErrorCode::InvalidType, message);
                return None;
            }
        };
        let date = parse_date(text);
        if date.is_none() {
            self.error(
                Some(name),
                ErrorCode::InvalidValue,
                "expected a date YYYY-MM-DD",
            );
        }
        date
    }

    /// A non-empty custom field value, typed by its definition for the `jsonb` column.
    fn custom_value(
        &mut self,
        name: &str,
        data_type: DataType,
        value: RawValue<'_>,
    ) -> Option<Value> {
        let (typed, expected) = match (data_type, value) {
            (_, RawValue::Null) => return None,
            (DataType::String, RawValue::Text(text)) => (Some(Value::from(text)), "a string"),
            (DataType::String, RawValue::Json(Value::String(text))) => {
                (Some(Value::from(text.as_str())), "a string")
            }
            (DataType::Integer, RawValue::Text(text)) => {
                (text.parse::<i64>().ok().map(Value::from), "an integer")
            }
            (DataType::Integer, RawValue::Json(Value::Number(number))) => {
                (number.as_i64().map(Value::from), "an integer")
            }
            (DataType::Float, RawValue::Text(text)) => {
                let number = text.parse::<f64>().ok().filter(|n| n.is_finite());
                (number.map(Value::from), "a finite number")
            }
            (DataType::Float, RawValue::Json(Value::Number(number))) => (
                number.as_f64().filter(|n| n.is_finite()).map(Value::from),
                "a finite number",
            ),
            (DataType::Boolean, RawValue::Text(text)) => {
                let flag = match text {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                };
                (flag.map(Value::from), "true or false")
            }
            (DataType::Boolean, RawValue::Json(Value::Bool(flag))) => {
                (Some(Value::from(*flag)), "true or false")
            }
            (DataType::Date, RawValue::Text(text)) => (
                parse_date(text).map(|_| Value::from(text)),
                "a date YYYY-MM-DD",
            ),
            (DataType::Date, RawValue::Json(Value::String(text))) => (
                parse_date(text).map(|_| Value::from(text.as_str())),
                "a date YYYY-MM-DD",
            ),
            (_, RawValue::Json(_)) => {
                let message = "the value's type does not match the custom field's data type";
                self.error(Some(name), ErrorCode::InvalidType, message);
                return None;
            }
        };
        if typed.is_none() {
            self.error(
                Some(name),
                ErrorCode::InvalidValue,
                format!("expected {expected}"),
            );
            return None;
        }
        match typed {
            Some(Value::String(text)) => self.storable(name, text).map(Value::String),
            typed => typed,
        }
    }
}

/// Splits a comma-separated list of field names, ignoring spaces around each name.
fn split_names(text: &str) -> Vec<String> {
    text.split(',').map(|name| name.trim().to_owned()).collect()
}

/// Parses a date written exactly as `YYYY-MM-DD`.
pub fn parse_date(text: &str) -> Option<NaiveDate> {
    let bytes = text.as_bytes();
    let shaped = bytes.len() == 10
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 4 || i == 7 || b.is_ascii_digit());
    if !shaped {
        return None;
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()
}

/// Whether a card number is in clear: once spaces and dashes are removed, it holds 12 to 19
/// digits, or a run of 12 or more digits in a row.
pub fn is_unmasked_card_number(text: &str) -> bool {
    let mut digits = 0usize;
    let mut run = 0usize;
    let mut longest_run = 0usize;
    for c in text.chars().filter(|c| *c != ' ' && *c != '-') {
        if c.is_ascii_digit() {
            digits += 1;
            run += 1;
            longest_run = longest_run.max(run);
        } else {
            run = 0;
        }
    }
    (12..=19).contains(&digits) || longest_run >= 12
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definitions() -> CustomFieldDefinitions {
        let mut definitions = CustomFieldDefinitions::new();
        definitions.insert("tier".into(), DataType::String);
        definitions.insert("visits".into(), DataType::Integer);
        definitions.insert("vip".into(), DataType::Boolean);
        definitions
    }

    fn codes(result: Result<TokenUpdate, Vec<RowError>>) -> Vec<(Option<String>, ErrorCode)> {
        result
            .unwrap_err()
            .into_iter()
            .map(|e| (e.field, e.code))
            .collect()
    }

    #[test]
    fn nul_characters_are_refused_where_postgresql_would_store_them() {
        let defs = definitions();
        let mut builder = UpdateBuilder::new(4, &defs);
        builder.set_key(KeyPart::AuthenticationCode, RawValue::Text("AC\u{0}1"));
        builder.set_field(Field::UdfString(0), RawValue::Text("a\0b"));
        builder.set_custom_field("tier", RawValue::Text("g\0ld"));
        let fields: Vec<Option<String>> = codes(builder.finish())
            .into_iter()
            .map(|(field, code)| {
                assert_eq!(code, ErrorCode::InvalidValue);
                field
            })
            .collect();
        let expected = [
            "access_token_identifier.authentication_code",
            "udf_string_1",
            "custom_field_set.tier",
        ];
        assert_eq!(fields, expected.map(|f| Some(f.to_owned())));

        let mut builder = UpdateBuilder::new(5, &defs);
        builder.set_key(KeyPart::AuthenticationCode, RawValue::Text("AC1"));
        builder.set_field(Field::PassCode, RawValue::Text("p\0ss"));
        assert!(builder.finish().is_ok(), "a pass code is only hashed");
    }

    #[test]
    fn three_states_of_a_field() {
        let defs = definitions();
        let mut builder = UpdateBuilder::new(2, &defs);
        builder.set_key(KeyPart::AuthenticationCode, RawValue::Text("AC1"));
        builder.set_field(Field::UdfString(0), RawValue::Text("gold"));
        builder.set_field(Field::UdfFloat(1), RawValue::Null);
        let update = builder.finish().unwrap();
        assert_eq!(update.udf_strings[0], Patch::Value("gold".to_owned()));
        assert_eq!(update.udf_floats[1], Patch::Null);
        assert_eq!(update.udf_floats[0], Patch::Absent);
        assert_eq!(update.key, TokenKey::AuthenticationCode(Secret::new("AC1")));
    }

    #[test]
    fn every_field_at_fault_is_named() {
        let defs = definitions();
        let mut builder = UpdateBuilder::new(7, &defs);
        builder.set_key(KeyPart::AuthenticationCode, RawValue::Text("AC1"));
        builder.set_field(Field::UdfFloat(0), RawValue::Text("NaN"));
        builder.set_field(Field::UdfDate(0), RawValue::Text("2026-2-30"));
        builder.set_custom_field("nope", RawValue::Text("x"));
        builder.set_custom_field("visits", RawValue::Text("1.5"));
        assert_eq!(
            codes(builder.finish()),
            vec![
                (Some("udf_float_1".into()), ErrorCode::InvalidValue),
                (Some("udf_date_1".into()), ErrorCode::InvalidValue),
                (
                    Some("custom_field_set.nope".into()),
                    ErrorCode::UnknownCustomField
                ),
                (
                    Some("custom_field_set.visits".into()),
                    ErrorCode::InvalidValue
                ),
            ]
        );
    }

    #[test]
    fn identifier_rules() {
        let defs = definitions();
        let cases: [(&[KeyPart], ErrorCode); 4] = [
            (&[], ErrorCode::IdentifierRequired),
            (
                &[KeyPart::AuthenticationCode, KeyPart::Identifier],
                ErrorCode::IdentifierRequired,
            ),
            (&[KeyPart::Identifier], ErrorCode::PassCodeRequired),
            (
                &[KeyPart::AuthenticationCode, KeyPart::PassCode],
                ErrorCode::PassCodeNotApplicable,
            ),
        ];
        for (parts, code) in cases {
            let mut builder = UpdateBuilder::new(2, &defs);
            for part in parts {
                builder.set_key(*part, RawValue::Text("x"));
            }
            assert_eq!(codes(builder.finish())[0].1, code, "{parts:?}");
        }
    }

    #[test]
    fn json_types_are_strict() {
        let defs = definitions();
        let mut builder = UpdateBuilder::new(3, &defs);
        builder.set_key(KeyPart::AuthenticationCode, RawValue::Text("AC1"));
        let text = Value::from("1.5");
        let number = Value::from(7);
        builder.set_field(Field::UdfFloat(0), RawValue::Json(&text));
        builder.set_field(Field::UdfString(0), RawValue::Json(&number));
        builder.set_custom_field("vip", RawValue::Json(&text));
        assert_eq!(
            codes(builder.finish()),
            vec![
                (Some("udf_float_1".into()), ErrorCode::InvalidType),
                (Some("udf_string_1".into()), ErrorCode::InvalidType),
                (Some("custom_field_set.vip".into()), ErrorCode::InvalidType),
            ]
        );
    }

    #[test]
    fn custom_field_given_twice() {
        let defs = definitions();
        let mut builder = UpdateBuilder::new(3, &defs);
        builder.set_key(KeyPart::AuthenticationCode, RawValue::Text("AC1"));
        builder.set_custom_field("tier", RawValue::Text("gold"));
        builder.set_custom_field("tier", RawValue::Text("silver"));
        assert_eq!(
            codes(builder.finish()),
            vec![(
                Some("custom_field_set.tier".into()),
                ErrorCode::DuplicateCustomField
            )]
        );
    }

    #[test]
    fn empty_custom_value_removes() {
        let defs = definitions();
        let mut builder = UpdateBuilder::new(3, &defs);
        builder.set_key(KeyPart::AuthenticationCode, RawValue::Text("AC1"));
        let empty = Value::from("");
        builder.set_custom_field("tier", RawValue::Json(&empty));
        builder.set_custom_field("visits", RawValue::Text("12"));
        let update = builder.finish().unwrap();
        assert_eq!(
            update.custom_fields,
            CustomFieldsPatch::Change(vec![
                ("tier".into(), None),
                ("visits".into(), Some(Value::from(12)))
            ])
        );
    }

    #[test]
    fn card_numbers_in_clear_are_refused() {
        assert!(is_unmasked_card_number("4111 1111 1111 1111"));
        assert!(is_unmasked_card_number("4111-1111-1111-1111"));
        assert!(is_unmasked_card_number("411111111111"));
        assert!(!is_unmasked_card_number("4111 11** **** 1111"));
        assert!(!is_unmasked_card_number("************1111"));
    }

    #[test]
    fn dates_are_exactly_iso() {
        assert!(parse_date("2026-12-03").is_some());
        assert!(parse_date("2026-2-3").is_none());
        assert!(parse_date("2026-02-30").is_none());
        assert!(parse_date("20261203").is_none());
    }

    #[test]
    fn lengths_count_characters() {
        let defs = definitions();
        let mut builder = UpdateBuilder::new(3, &defs);
        builder.set_key(KeyPart::AuthenticationCode, RawValue::Text("AC1"));
        let long = "é".repeat(255);
        builder.set_field(Field::UdfString(0), RawValue::Text(&long));
        builder.set_field(Field::Identifier, RawValue::Text(""));
        assert_eq!(
            codes(builder.finish()),
            vec![(Some("identifier".into()), ErrorCode::InvalidValue)]
        );
    }
}
