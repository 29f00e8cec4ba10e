//! Reading applied revisions from MySQL and MariaDB.

use std::str::FromStr;

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlDatabaseError, MySqlRow};
use sqlx::{AssertSqlSafe, Connection, Row};

use super::tools::{self, Dialect, TableName};
use super::{
    AppliedRevisions, CONNECT_TIMEOUT, DatabaseUrl, ProbeError, RevisionSource, STATEMENT_TIMEOUT,
    query_failed,
};

/// Finds a table in the given schema or the URL's database. The comparison follows the
/// server's rules for table names (case-insensitive on MariaDB's information_schema);
/// an exact match wins. information_schema lists only tables the user has a privilege on.
const FIND_TABLE: &str = "\
    SELECT CAST(table_schema AS CHAR), CAST(table_name AS CHAR) \
    FROM information_schema.tables \
    WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ? \
    ORDER BY CAST(table_name AS BINARY) = CAST(? AS BINARY) DESC \
    LIMIT 1";

/// Opens a connection to `target` within [`CONNECT_TIMEOUT`]; returns it with the
/// endpoint it names in messages.
pub(super) async fn connect(
    target: &DatabaseUrl,
    source: &RevisionSource,
) -> Result<(MySqlConnection, String), ProbeError> {
    if matches!(source, RevisionSource::Tool { .. }) && target.database().is_none() {
        return Err(ProbeError::InvalidUrl {
            problem: "it names no database; add /DATABASE after host:port, the database \
                      the migration tool uses"
                .to_string(),
        });
    }
    let options = MySqlConnectOptions::from_str(target.sqlx_url())
        .map_err(|error| ProbeError::InvalidUrl {
            problem: format!("the MySQL driver did not accept it: {error}"),
        })?
        // A few statements per read: caching prepared statements buys nothing.
        .statement_cache_capacity(0);
    let endpoint = match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    let connecting = MySqlConnection::connect_with(&options);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => Err(ProbeError::Connect {
            endpoint,
            detail: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        }),
        Ok(Err(error)) => Err(connect_error(error, &options, endpoint)),
        Ok(Ok(conn)) => Ok((conn, endpoint)),
    }
}

pub(super) async fn read(
    conn: &mut MySqlConnection,
    source: &RevisionSource,
    endpoint: &str,
) -> Result<AppliedRevisions, ProbeError> {
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&mut *conn)
        .await
        .map_err(|error| query_error(error, source, endpoint))?;
    // MariaDB and MySQL name their statement timeouts differently (and in other units).
    let statement_timeout = if version.contains("MariaDB") {
        format!(
            "SET SESSION max_statement_time = {}",
            STATEMENT_TIMEOUT.as_secs()
        )
    } else {
        format!(
            "SET SESSION max_execution_time = {}",
            STATEMENT_TIMEOUT.as_millis()
        )
    };
    // lock_wait_timeout bounds the wait for a metadata lock held by a running ALTER.
    let begin = format!(
        "{statement_timeout}; SET SESSION lock_wait_timeout = {}; START TRANSACTION READ ONLY",
        STATEMENT_TIMEOUT.as_secs()
    );
    sqlx::raw_sql(AssertSqlSafe(begin))
        .execute(&mut *conn)
        .await
        .map_err(|error| query_error(error, source, endpoint))?;
    let applied = match source {
        RevisionSource::Tool { tool, table } => {
            let candidates = match table {
                Some(table) => vec![table.clone()],
                None => tools::default_tables(*tool, schemagate_crds::Engine::Mysql),
            };
            match find_table(conn, &candidates)
                .await
                .map_err(|error| query_error(error, source, endpoint))?
            {
                // No version table yet: nothing is applied.
                None => Ok(AppliedRevisions {
                    revisions: Vec::new(),
                    head_only: tools::is_head_only(*tool),
                }),
                Some((schema, name)) => {
                    let dialect = Dialect::Mysql;
                    let table = format!("{}.{}", dialect.quote(&schema), dialect.quote(&name));
                    let select = tools::select_revisions(*tool, dialect, &table);
                    // The table name comes from the catalog and is quoted; the rest is constant.
                    let rows: Vec<(Option<String>, String)> = sqlx::query_as(AssertSqlSafe(select))
                        .fetch_all(&mut *conn)
                        .await
                        .map_err(|error| table_error(error, *tool, &schema, &name, endpoint))?;
                    // A failed or dirty migration is an answer, not a broken connection:
                    // the transaction still ends below.
                    tools::collect_revisions(*tool, rows)
                }
            }
        }
        RevisionSource::Query(query) => {
            // Checked to be one SELECT/WITH statement; runs read-only, prepared (so the
            // server rejects a second statement), under the statement timeout.
            let rows = sqlx::query(AssertSqlSafe(query.clone()))
                .fetch_all(&mut *conn)
                .await
                .map_err(|error| query_error(error, source, endpoint))?;
            let revisions = rows
                .iter()
                .map(first_column_text)
                .filter_map(Result::transpose)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(AppliedRevisions {
                revisions,
                head_only: false,
            })
        }
    };
    let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
    applied
}

async fn find_table(
    conn: &mut MySqlConnection,
    candidates: &[TableName],
) -> Result<Option<(String, String)>, sqlx::Error> {
    for candidate in candidates {
        let found: Option<(String, String)> = sqlx::query_as(FIND_TABLE)
            .bind(candidate.schema.as_deref())
            .bind(&candidate.name)
            .bind(&candidate.name)
            .fetch_optional(&mut *conn)
            .await?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// The first column of a custom query's row as text; `None` for NULL.
fn first_column_text(row: &MySqlRow) -> Result<Option<String>, ProbeError> {
    if row.columns().is_empty() {
        return Err(custom_query_type_error("no columns"));
    }
    if let Ok(text) = row.try_get::<Option<String>, _>(0) {
        return Ok(text);
    }
    if let Ok(number) = row.try_get::<Option<i64>, _>(0) {
        return Ok(number.map(|n| n.to_string()));
    }
    if let Ok(number) = row.try_get::<Option<u64>, _>(0) {
        return Ok(number.map(|n| n.to_string()));
    }
    // VARBINARY and BLOB columns holding text.
    if let Ok(bytes) = row.try_get::<Option<Vec<u8>>, _>(0)
        && let Ok(text) = bytes.map(String::from_utf8).transpose()
    {
        return Ok(text);
    }
    let type_name = row
        .columns()
        .first()
        .map(|column| sqlx::TypeInfo::name(sqlx::Column::type_info(column)).to_string())
        .unwrap_or_default();
    Err(custom_query_type_error(&format!("type {type_name}")))
}

fn custom_query_type_error(what: &str) -> ProbeError {
    ProbeError::Query {
        source_name: "tracking.query".to_string(),
        detail: format!(
            "its first column has {what}; return the revision as text, e.g. CAST(x AS CHAR)"
        ),
    }
}

fn connect_error(
    error: sqlx::Error,
    options: &MySqlConnectOptions,
    endpoint: String,
) -> ProbeError {
    let number = match &error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number),
        _ => None,
    };
    match number {
        // ER_ACCESS_DENIED_ERROR, ER_DBACCESS_DENIED_ERROR, ER_HOST_NOT_PRIVILEGED,
        // ER_ACCESS_DENIED_NO_PASSWORD_ERROR.
        Some(1045 | 1044 | 1130 | 1698) => ProbeError::Authentication {
            user: options.get_username().to_string(),
            endpoint,
            detail: server_message(&error),
        },
        // ER_BAD_DB_ERROR
        Some(1049) => ProbeError::DatabaseNotFound {
            database: options.get_database().unwrap_or_default().to_string(),
            endpoint,
        },
        _ => ProbeError::Connect {
            endpoint,
            detail: server_message(&error),
        },
    }
}

fn table_error(
    error: sqlx::Error,
    tool: schemagate_crds::TrackingTool,
    schema: &str,
    name: &str,
    endpoint: &str,
) -> ProbeError {
    let source = RevisionSource::Tool {
        tool,
        table: Some(TableName {
            schema: Some(schema.to_string()),
            name: name.to_string(),
        }),
    };
    match query_error(error, &source, endpoint) {
        ProbeError::Query {
            source_name,
            detail,
        } => ProbeError::Query {
            source_name,
            detail: format!(
                "{detail}; check that tracking.tool matches the tool that created the table \
                 and that the user may read it"
            ),
        },
        other => other,
    }
}

fn query_error(error: sqlx::Error, source: &RevisionSource, endpoint: &str) -> ProbeError {
    match error {
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::Protocol(_) => {
            ProbeError::Connect {
                endpoint: endpoint.to_string(),
                detail: format!("the connection broke: {}", server_message(&error)),
            }
        }
        error => {
            // ER_STATEMENT_TIMEOUT (MariaDB), ER_QUERY_TIMEOUT (MySQL), ER_LOCK_WAIT_TIMEOUT.
            let timed_out = matches!(&error, sqlx::Error::Database(db)
                if db.try_downcast_ref::<MySqlDatabaseError>()
                    .is_some_and(|e| matches!(e.number(), 1969 | 3024 | 1205)));
            let detail = if timed_out {
                format!(
                    "{} (limit {}s: the table may be locked by a running migration)",
                    server_message(&error),
                    STATEMENT_TIMEOUT.as_secs()
                )
            } else {
                server_message(&error)
            };
            query_failed(source, detail)
        }
    }
}

/// The server's message without sqlx's "error returned from database:" prefix.
fn server_message(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => match db.try_downcast_ref::<MySqlDatabaseError>() {
            Some(my) => format!("{} (error {})", my.message(), my.number()),
            None => db.message().to_string(),
        },
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}
