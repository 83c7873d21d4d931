//! tokensync applies bulk partial updates of access tokens, read from CSV and JSON Lines
//! files, to PostgreSQL: one transaction per file, a report per row.

pub mod apply;
pub mod batch;
pub mod bulk;
pub mod claim;
pub mod config;
pub mod copy;
pub mod daemon;
pub mod db;
pub mod error;
pub mod feed;
pub mod field;
pub mod health;
pub mod incoming;
pub mod patch;
pub mod plain;
pub mod report;
pub mod row;
pub mod run;
pub mod secret;
pub mod shutdown;
pub mod sightings;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod update;
