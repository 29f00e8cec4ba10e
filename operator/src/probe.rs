//! The revision probe: reads which migrations a database has applied from the migration
//! tool's own version table (never trusting a migrator's exit code alone), and decides
//! whether the revision a Deployment needs is satisfied.
//!
//! - [`probe_revisions`] connects once (no pool is kept), in a read-only transaction with
//!   a statement timeout, and returns [`AppliedRevisions`]. A missing version table means
//!   nothing is applied yet, not an error.
//! - Whether a revision is applied is decided from what it returns by
//!   [`crate::revision`], which needs no database.
//! - [`scrub_secret`] removes a database URL and its password from any text, for messages
//!   that leave the operator (Job messages, events, logs). No [`ProbeError`] message ever
//!   contains the URL or its password.
//!
//! Table layouts per tool, and what counts as applied or failed: `docs/probe.md`.

mod mysql;
mod postgres;
mod tools;
mod url;

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use schemagate_crds::{Engine, Tracking, TrackingTool};

pub use url::{DatabaseUrl, scrub_secret};

/// Connections the probe has opened (or tried to), in this process: exported as
/// `schemagate_database_connections_total`.
pub static CONNECTIONS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// How long connecting (TCP, TLS, authentication) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long each statement of a probe may run, and wait for locks, on the server.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole probe may take, whatever the server does.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// The revisions a database reports as applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppliedRevisions {
    /// For history tools, every applied revision, oldest first. For head-only tools
    /// (`head_only`), the current head(s): Alembic can have several, one per branch.
    pub revisions: Vec<String>,
    /// Whether the tool records only the current head(s) (Alembic, golang-migrate), so a
    /// revision missing from `revisions` may still be applied below the head.
    pub head_only: bool,
}

/// Why the applied revisions could not be read. Messages name what is wrong and what to
/// do, and never contain the database URL or its password.
///
/// The driver's message travels as scrubbed text (`detail`), not as a `#[source]`
/// sqlx error: sqlx errors can echo parts of the URL, and reporters walk `source()` chains.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The URL in the Secret is malformed, of an unknown scheme, or for the other engine.
    #[error("the database URL is invalid: {problem}")]
    InvalidUrl {
        /// Which part is wrong; never the URL itself.
        problem: String,
    },
    /// `spec.database.tracking` cannot be used as given.
    #[error("spec.database.tracking is invalid: {problem}")]
    InvalidTracking {
        /// What is wrong with it.
        problem: String,
    },
    /// The server could not be reached, refused, timed out or dropped the connection.
    #[error(
        "cannot reach the database at {endpoint}: {detail}; check the host and port in the \
         URL, that the database is running, and that network policies let the operator reach it"
    )]
    Connect {
        /// `host:port`, or the socket path.
        endpoint: String,
        /// What the connection attempt reported, secrets removed.
        detail: String,
    },
    /// The server refused the credentials (or the user's access to the database).
    #[error(
        "the database at {endpoint} refused user {user}: {detail}; check the user name and \
         password in the Secret and the user's access to the database"
    )]
    Authentication {
        /// The user name from the URL.
        user: String,
        /// `host:port`, or the socket path.
        endpoint: String,
        /// The server's message, secrets removed.
        detail: String,
    },
    /// The database named in the URL does not exist on the server.
    #[error(
        "database {database} does not exist on {endpoint}; create it, or fix the database \
         name in the URL"
    )]
    DatabaseNotFound {
        /// The database name from the URL.
        database: String,
        /// `host:port`, or the socket path.
        endpoint: String,
    },
    /// Reading the version table or running the custom query failed.
    #[error("reading applied revisions from {source_name} failed: {detail}")]
    Query {
        /// The table read (`tool table schema.name`) or `tracking.query`.
        source_name: String,
        /// The database's message and a hint, secrets removed.
        detail: String,
    },
    /// The tool recorded a failed or half-applied migration: the schema is in an unknown
    /// state until a person repairs it.
    #[error(
        "{tool} recorded revision {revision} as failed or partly applied; the schema needs a \
         person: {remedy}"
    )]
    Dirty {
        /// The tool, as in `tracking.tool`.
        tool: &'static str,
        /// The failed revision (for a Flyway repeatable migration, its description).
        revision: String,
        /// What to do, in the tool's terms.
        remedy: &'static str,
    },
}

impl ProbeError {
    /// A bounded PascalCase reason, for Event and condition reasons and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidUrl { .. } => "DatabaseUrlInvalid",
            Self::InvalidTracking { .. } => "TrackingInvalid",
            Self::Connect { .. } => "DatabaseUnreachable",
            Self::Authentication { .. } => "DatabaseAuthenticationFailed",
            Self::DatabaseNotFound { .. } => "DatabaseNotFound",
            Self::Query { .. } => "RevisionQueryFailed",
            Self::Dirty { .. } => "MigrationDirty",
        }
    }
}

/// Where the revisions are read from: a known tool's table or a custom query.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RevisionSource {
    Tool {
        tool: TrackingTool,
        /// `tracking.table`, when it overrides the tool's default.
        table: Option<tools::TableName>,
    },
    Query(String),
}

impl RevisionSource {
    fn from_tracking(tracking: &Tracking) -> Result<Self, ProbeError> {
        let invalid = |problem: &str| ProbeError::InvalidTracking {
            problem: problem.to_string(),
        };
        match (&tracking.tool, &tracking.query) {
            (Some(_), Some(_)) => Err(invalid("set either tool or query, not both")),
            (None, None) => Err(invalid(&format!(
                "set tool ({}) or a query",
                TrackingTool::names()
            ))),
            (None, Some(_)) if tracking.table.is_some() => Err(invalid(
                "table applies to tool only; name the table in the query instead",
            )),
            (None, Some(query)) => Ok(Self::Query(checked_query(query)?)),
            (Some(tool), None) => {
                let table = match tracking.table.as_deref() {
                    None => None,
                    Some(text) => Some(tools::TableName::parse(text).ok_or_else(|| {
                        invalid(
                            "table must be TABLE or SCHEMA.TABLE, each starting with a letter \
                             or _ and made of letters, digits, _ and $ (at most 63 characters)",
                        )
                    })?),
                };
                Ok(Self::Tool { tool: *tool, table })
            }
        }
    }
}

/// Accepts a single read query: it must start with SELECT or WITH. The read-only
/// transaction and the server's one-statement rule for prepared statements do the rest.
fn checked_query(query: &str) -> Result<String, ProbeError> {
    let query = query.trim().trim_end_matches(';').trim_end();
    let first_word: String = query
        .trim_start_matches('(')
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    if first_word != "SELECT" && first_word != "WITH" {
        return Err(ProbeError::InvalidTracking {
            problem: "query must be a single SELECT (or WITH ... SELECT) statement".to_string(),
        });
    }
    // Read-only transactions do not stop MySQL writing files.
    let upper = query.to_ascii_uppercase();
    if upper.contains("OUTFILE") || upper.contains("DUMPFILE") {
        return Err(ProbeError::InvalidTracking {
            problem: "query must not write files (INTO OUTFILE / DUMPFILE)".to_string(),
        });
    }
    Ok(query.to_string())
}

/// Reads the revisions `tracking` describes from the database at `url`.
///
/// One connection, opened within [`CONNECT_TIMEOUT`] and closed before returning; every
/// statement runs in a read-only transaction under [`STATEMENT_TIMEOUT`]; the whole probe
/// is bounded by [`PROBE_TIMEOUT`]. The version table is found through the catalog
/// (PostgreSQL: along the search path; MySQL: in the URL's database), matching the name
/// exactly or else ignoring case; when it does not exist, nothing is applied yet.
pub async fn probe_revisions(
    engine: Engine,
    url: &str,
    tracking: &Tracking,
) -> Result<AppliedRevisions, ProbeError> {
    let mut session = Session::new(engine, url, tracking)?;
    let result = session.read().await;
    session.close().await;
    result
}

/// A connection to one database kept for reading its revisions again and again (while a
/// migration Job runs, see [`crate::migration::watch`]), opened at the first read and
/// again after a read that failed. Each read is the same as [`probe_revisions`]'s: its own
/// read-only transaction under the same timeouts. Holds the URL: it has no `Debug`.
pub struct Session {
    engine: Engine,
    url: String,
    target: DatabaseUrl,
    source: RevisionSource,
    open: Option<Open>,
}

enum Open {
    /// The connection, its endpoint, and the query of the version table once found.
    Postgres(sqlx::PgConnection, String, Option<String>),
    Mysql(sqlx::MySqlConnection, String),
}

impl Session {
    /// Checks the URL against the engine and the tracking settings; connects nothing yet.
    pub fn new(engine: Engine, url: &str, tracking: &Tracking) -> Result<Self, ProbeError> {
        let target = DatabaseUrl::parse(url).map_err(|error| scrub_error(error, url))?;
        if target.engine() != engine {
            return Err(ProbeError::InvalidUrl {
                problem: format!(
                    "its scheme is for {} but spec.database.engine is {}; make them agree",
                    target.engine().name(),
                    engine.name()
                ),
            });
        }
        let source = RevisionSource::from_tracking(tracking)?;
        Ok(Self {
            engine,
            url: url.to_string(),
            target,
            source,
            open: None,
        })
    }

    /// What the database reports now. A failed read closes the connection: the next one
    /// opens a new one.
    pub async fn read(&mut self) -> Result<AppliedRevisions, ProbeError> {
        let result = match tokio::time::timeout(PROBE_TIMEOUT, self.read_once()).await {
            Ok(result) => result,
            Err(_) => Err(query_failed(
                &self.source,
                format!(
                    "the database did not answer within {}s",
                    PROBE_TIMEOUT.as_secs()
                ),
            )),
        };
        // A dirty migration is the database's answer; any other failure may have left the
        // connection broken. Dropped, not closed: it may not answer a goodbye.
        if matches!(&result, Err(error) if !matches!(error, ProbeError::Dirty { .. })) {
            self.open = None;
        }
        // Messages are built without the URL; this is the belt to those braces.
        result.map_err(|error| scrub_error(error, &self.url))
    }

    async fn read_once(&mut self) -> Result<AppliedRevisions, ProbeError> {
        // Taken while it reads: a read cut short by the timeout drops the connection.
        let mut open = match self.open.take() {
            Some(open) => open,
            None => {
                CONNECTIONS.inc();
                match self.engine {
                    Engine::Postgres => {
                        let (conn, endpoint) = postgres::connect(&self.target).await?;
                        Open::Postgres(conn, endpoint, None)
                    }
                    Engine::Mysql => {
                        let (conn, endpoint) = mysql::connect(&self.target, &self.source).await?;
                        Open::Mysql(conn, endpoint)
                    }
                }
            }
        };
        let result = match &mut open {
            Open::Postgres(conn, endpoint, known) => {
                postgres::read(conn, &self.source, endpoint, known).await
            }
            Open::Mysql(conn, endpoint) => mysql::read(conn, &self.source, endpoint).await,
        };
        self.open = Some(open);
        result
    }

    /// Closes the connection, if one is open. The server rolls back and cleans up on
    /// disconnect too; closing is a courtesy.
    pub async fn close(mut self) {
        use sqlx::Connection as _;
        match self.open.take() {
            Some(Open::Postgres(conn, _, _)) => {
                let _ = conn.close().await;
            }
            Some(Open::Mysql(conn, _)) => {
                let _ = conn.close().await;
            }
            None => {}
        }
    }
}

fn describe_source(source: &RevisionSource) -> String {
    match source {
        RevisionSource::Tool { tool, table } => {
            let tool = tool.name();
            match table {
                Some(tools::TableName {
                    schema: Some(schema),
                    name,
                }) => format!("the {tool} table {schema}.{name}"),
                Some(tools::TableName { schema: None, name }) => {
                    format!("the {tool} table {name}")
                }
                None => format!("the {tool} version table"),
            }
        }
        RevisionSource::Query(_) => "tracking.query".to_string(),
    }
}

/// A failed read of `source`, with a hint for custom queries.
fn query_failed(source: &RevisionSource, detail: String) -> ProbeError {
    let detail = match source {
        RevisionSource::Query(_) => {
            format!("{detail}; fix tracking.query (it runs read-only, as the Secret's user)")
        }
        RevisionSource::Tool { .. } => detail,
    };
    ProbeError::Query {
        source_name: describe_source(source),
        detail,
    }
}

fn scrub_error(error: ProbeError, url: &str) -> ProbeError {
    let scrub = |text: String| scrub_secret(&text, url);
    match error {
        ProbeError::InvalidUrl { problem } => ProbeError::InvalidUrl {
            problem: scrub(problem),
        },
        ProbeError::InvalidTracking { problem } => ProbeError::InvalidTracking {
            problem: scrub(problem),
        },
        ProbeError::Connect { endpoint, detail } => ProbeError::Connect {
            endpoint: scrub(endpoint),
            detail: scrub(detail),
        },
        ProbeError::Authentication {
            user,
            endpoint,
            detail,
        } => ProbeError::Authentication {
            user: scrub(user),
            endpoint: scrub(endpoint),
            detail: scrub(detail),
        },
        ProbeError::DatabaseNotFound { database, endpoint } => ProbeError::DatabaseNotFound {
            database: scrub(database),
            endpoint: scrub(endpoint),
        },
        ProbeError::Query {
            source_name,
            detail,
        } => ProbeError::Query {
            source_name: scrub(source_name),
            detail: scrub(detail),
        },
        ProbeError::Dirty {
            tool,
            revision,
            remedy,
        } => ProbeError::Dirty {
            tool,
            revision: scrub(revision),
            remedy,
        },
    }
}

#[cfg(test)]
mod tests;
