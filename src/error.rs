//! Error codes and the row and file errors that reports carry.
//!
//! A [`RowError`] is data, not text: the line, the field and the code are fields, and the
//! message is a short sentence for people. Messages never quote a value, so no pass code,
//! authentication code or card number can leak through them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The error codes of SPEC 4.5, as they appear in reports and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    MalformedRow,
    UnknownField,
    InvalidType,
    InvalidValue,
    IdentifierRequired,
    PassCodeRequired,
    PassCodeNotApplicable,
    AccessTokenNotFound,
    DuplicateValue,
    NotNullable,
    CardNotApplicable,
    UnmaskedCardNumber,
    UnknownCustomField,
    DuplicateCustomField,
    UnknownFieldInFieldsSet,
    RowTooLarge,
    InvalidEncoding,
    InvalidHeader,
    CorruptFile,
    FileTooLarge,
}

impl ErrorCode {
    /// The code as written in reports, e.g. `ACCESS_TOKEN_NOT_FOUND`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedRow => "MALFORMED_ROW",
            ErrorCode::UnknownField => "UNKNOWN_FIELD",
            ErrorCode::InvalidType => "INVALID_TYPE",
            ErrorCode::InvalidValue => "INVALID_VALUE",
            ErrorCode::IdentifierRequired => "IDENTIFIER_REQUIRED",
            ErrorCode::PassCodeRequired => "PASS_CODE_REQUIRED",
            ErrorCode::PassCodeNotApplicable => "PASS_CODE_NOT_APPLICABLE",
            ErrorCode::AccessTokenNotFound => "ACCESS_TOKEN_NOT_FOUND",
            ErrorCode::DuplicateValue => "DUPLICATE_VALUE",
            ErrorCode::NotNullable => "NOT_NULLABLE",
            ErrorCode::CardNotApplicable => "CARD_NOT_APPLICABLE",
            ErrorCode::UnmaskedCardNumber => "UNMASKED_CARD_NUMBER",
            ErrorCode::UnknownCustomField => "UNKNOWN_CUSTOM_FIELD",
            ErrorCode::DuplicateCustomField => "DUPLICATE_CUSTOM_FIELD",
            ErrorCode::UnknownFieldInFieldsSet => "UNKNOWN_FIELD_IN_FIELDS_SET",
            ErrorCode::RowTooLarge => "ROW_TOO_LARGE",
            ErrorCode::InvalidEncoding => "INVALID_ENCODING",
            ErrorCode::InvalidHeader => "INVALID_HEADER",
            ErrorCode::CorruptFile => "CORRUPT_FILE",
            ErrorCode::FileTooLarge => "FILE_TOO_LARGE",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One error of a batch: a row's (with its line) or the file's (`line` is `None`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RowError {
    /// The 1-based line on which the row starts; `None` for a file-level error.
    pub line: Option<u64>,
    /// The field at fault, in the file's own spelling; `None` when it is not about one field.
    pub field: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

impl RowError {
    /// An error about one field of the row on `line`.
    pub fn field(line: u64, field: &str, code: ErrorCode, message: impl Into<String>) -> Self {
        RowError {
            line: Some(line),
            field: Some(field.to_owned()),
            code,
            message: message.into(),
        }
    }

    /// An error about the row on `line` as a whole.
    pub fn row(line: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        RowError {
            line: Some(line),
            field: None,
            code,
            message: message.into(),
        }
    }

    /// An error about the whole file.
    pub fn file(code: ErrorCode, message: impl Into<String>) -> Self {
        RowError {
            line: None,
            field: None,
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}: {}", self.code, self.message)
    }
}
