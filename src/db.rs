//! Connections to PostgreSQL and the schema migrations.
//!
//! Every connection sets `search_path` to `database.schema`, so the SQL elsewhere names
//! tables without a schema. `migrate` creates the database named in `database.url` when it
//! does not exist, then the schema, then runs the versioned SQL files of `sql/`, embedded
//! in the binary by refinery, under an advisory lock so that two at once do no harm.

use crate::config::DatabaseConfig;
use crate::tls::{self, TlsError};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

mod embedded {
    refinery::embed_migrations!("sql");
}

/// How long a new connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a task may wait for a free connection of the pool.
const POOL_TIMEOUT: Duration = Duration::from_secs(30);

/// An advisory lock key that serialises concurrent `migrate` runs ("tokensync" in ASCII).
const MIGRATE_LOCK: i64 = 0x746f_6b65_6e73;

/// A failure to reach or use the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database.url is not a valid connection string: {0}")]
    Url(#[source] tokio_postgres::Error),
    #[error("database.url: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot connect to the database")]
    Connect(#[source] tokio_postgres::Error),
    #[error("{context}")]
    Query {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("cannot get a database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("cannot run the migrations")]
    Migrate(#[from] refinery::Error),
}

impl DbError {
    /// Wraps a query error with what was being done.
    pub fn query(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DbError {
        move |source| DbError::Query { context, source }
    }

    /// Whether the error means the database went away or cannot be reached (rather than a
    /// statement being refused).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            DbError::Connect(_) | DbError::Pool(_) => true,
            DbError::Query { source, .. } => source.is_closed() || source.as_db_error().is_none(),
            DbError::Url(_) | DbError::Tls(_) | DbError::Migrate(_) => false,
        }
    }
}

/// The connection settings of `config`, with `search_path` set to its schema, and the TLS
/// connector its `sslmode` asks for.
///
/// # Errors
/// When `database.url` cannot be parsed or its TLS settings cannot be used.
pub fn pg_config(
    config: &DatabaseConfig,
) -> Result<(tokio_postgres::Config, MakeRustlsConnect), DbError> {
    let tls::Connection { url, tls } = tls::connection(&config.url)?;
    let mut pg: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
    // The schema name is checked to be a plain identifier, so it needs no escaping here.
    pg.options(format!("-c search_path={}", config.schema));
    if pg.get_application_name().is_none() {
        pg.application_name("tokensync");
    }
    // An unreachable server fails a connection in seconds, and a silent one is noticed.
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    pg.keepalives(true).keepalives_idle(Duration::from_secs(30));
    Ok((pg, tls))
}

/// Opens one connection, driven by a background task.
///
/// # Errors
/// When the database cannot be reached.
pub async fn connect(config: &DatabaseConfig) -> Result<Client, DbError> {
    let (pg, tls) = pg_config(config)?;
    connect_with(&pg, &tls).await
}

async fn connect_with(
    pg: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
) -> Result<Client, DbError> {
    let (client, connection) = pg.connect(tls.clone()).await.map_err(DbError::Connect)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "Database connection closed.");
        }
    });
    Ok(client)
}

/// A pool of connections for the daemon and `--run-now`.
///
/// # Errors
/// When `database.url` cannot be parsed.
pub fn pool(config: &DatabaseConfig) -> Result<Pool, DbError> {
    let (pg, tls) = pg_config(config)?;
    let manager = Manager::from_config(
        pg,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(config.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .expect("a pool with a runtime always builds");
    Ok(pool)
}

/// Creates the database if needed, then the schema, then applies every migration not yet
/// applied.
///
/// # Errors
/// When the database cannot be reached or created, or a migration fails.
pub async fn migrate(config: &DatabaseConfig) -> Result<(), DbError> {
    let (pg, tls) = pg_config(config)?;
    let mut client = match connect_with(&pg, &tls).await {
        Ok(client) => client,
        Err(error) if is_missing_database(&error) => {
            create_database(&pg, &tls).await?;
            connect_with(&pg, &tls).await?
        }
        Err(error) => return Err(error),
    };

    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(DbError::query("cannot take the migration lock"))?;
    let schema_sql = format!("CREATE SCHEMA IF NOT EXISTS {}", config.schema);
    client
        .batch_execute(&schema_sql)
        .await
        .map_err(DbError::query("cannot create the schema"))?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await?;
    for migration in report.applied_migrations() {
        tracing::info!(
            version = migration.version(),
            name = migration.name(),
            "Migration applied."
        );
    }
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(DbError::query("cannot release the migration lock"))?;
    Ok(())
}

fn is_missing_database(error: &DbError) -> bool {
    let DbError::Connect(source) = error else {
        return false;
    };
    source.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME)
}

/// Creates the database named in `pg` through the `postgres` maintenance database.
async fn create_database(
    pg: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
) -> Result<(), DbError> {
    let name = match pg.get_dbname() {
        Some(name) => name.to_owned(),
        // Like libpq, a connection without a database name goes to the user's database.
        None => pg.get_user().unwrap_or_default().to_owned(),
    };
    let mut maintenance = pg.clone();
    maintenance.dbname("postgres");
    let client = connect_with(&maintenance, tls).await?;
    let sql = format!("CREATE DATABASE {}", quote_identifier(&name));
    match client.batch_execute(&sql).await {
        Ok(()) => {
            tracing::info!(database = %name, "Database created.");
            Ok(())
        }
        // Another process created it in the meantime.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => Ok(()),
        Err(e) => Err(DbError::Query {
            context: "cannot create the database",
            source: e,
        }),
    }
}

/// Quotes an SQL identifier, doubling any quote inside it.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
