//! tokensync applies bulk partial updates of access tokens, read from CSV and JSON Lines
//! files, to PostgreSQL: one transaction per file, a report per row.

pub mod error;
pub mod field;
pub mod row;
pub mod update;
