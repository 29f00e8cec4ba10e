//! Reading applied revisions from PostgreSQL.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgDatabaseError, PgRow};
use sqlx::{AssertSqlSafe, Connection, Row};

use super::tools::{self, Dialect, TableName};
use super::{
    AppliedRevisions, CONNECT_TIMEOUT, DatabaseUrl, ProbeError, RevisionSource, STATEMENT_TIMEOUT,
    query_failed,
};

/// Finds a table by name along the search path (or in the given schema), preferring an
/// exact match over one that differs in case. pg_class, unlike information_schema, also
/// shows tables the user may not read, so a missing privilege is an error, not "empty".
const FIND_TABLE: &str = "\
    SELECT n.nspname::text, c.relname::text \
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') \
      AND lower(c.relname) = lower($1) \
      AND CASE WHEN $2::text IS NULL THEN n.nspname = ANY (current_schemas(false)) \
               ELSE lower(n.nspname) = lower($2::text) END \
    ORDER BY c.relname = $1 DESC, n.nspname::text = coalesce($2::text, '') DESC, \
             array_position(current_schemas(false), n.nspname) \
    LIMIT 1";

/// Opens a connection to `target` within [`CONNECT_TIMEOUT`]; returns it with the
/// endpoint it names in messages.
pub(super) async fn connect(target: &DatabaseUrl) -> Result<(PgConnection, String), ProbeError> {
    let options = PgConnectOptions::from_str(target.sqlx_url())
        .map_err(|error| ProbeError::InvalidUrl {
            problem: format!("the PostgreSQL driver did not accept it: {error}"),
        })?
        .application_name("schemagate-probe")
        // A few statements per read: caching prepared statements buys nothing.
        .statement_cache_capacity(0);
    let endpoint = match options.get_socket() {
        Some(socket) => socket.display().to_string(),
        None => format!("{}:{}", options.get_host(), options.get_port()),
    };
    let connecting = PgConnection::connect_with(&options);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => Err(ProbeError::Connect {
            endpoint,
            detail: format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        }),
        Ok(Err(error)) => Err(connect_error(error, &options, endpoint)),
        Ok(Ok(conn)) => Ok((conn, endpoint)),
    }
}

/// Reads the applied revisions. `known`: the query of the version table an earlier read of
/// this connection found, if any; the read then takes one round trip (transaction, query and
/// its end in one message), and looks the table up again only when that fails.
pub(super) async fn read(
    conn: &mut PgConnection,
    source: &RevisionSource,
    endpoint: &str,
    known: &mut Option<String>,
) -> Result<AppliedRevisions, ProbeError> {
    // SET LOCAL inside one transaction also works through PgBouncer in transaction mode,
    // which rejects the startup `options` parameter.
    let millis = STATEMENT_TIMEOUT.as_millis();
    let begin = format!(
        "BEGIN READ ONLY; SET LOCAL statement_timeout = {millis}; SET LOCAL lock_timeout = {millis}"
    );
    if let (Some(select), RevisionSource::Tool { tool, .. }) = (known.as_deref(), source) {
        // The query was built from the catalog's quoted name and constant text.
        let batch = format!("{begin}; {select}; ROLLBACK");
        let rows = match sqlx::raw_sql(AssertSqlSafe(batch))
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => rows
                .iter()
                .map(|row| Ok((row.try_get::<Option<String>, _>(0)?, row.try_get(1)?)))
                .collect::<Result<Vec<(Option<String>, String)>, sqlx::Error>>(),
            Err(error) => {
                // The statements after a failed one did not run: end the transaction.
                let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
                Err(error)
            }
        };
        match rows {
            Ok(rows) => return tools::collect_revisions(*tool, rows),
            // The table may be gone or renamed: the whole read below says what is there.
            Err(_) => *known = None,
        }
    }
    sqlx::raw_sql(AssertSqlSafe(begin))
        .execute(&mut *conn)
        .await
        .map_err(|error| query_error(error, source, endpoint))?;
    let applied = match source {
        RevisionSource::Tool { tool, table } => {
            let candidates = match table {
                Some(table) => vec![table.clone()],
                None => tools::default_tables(*tool, schemagate_crds::Engine::Postgres),
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
                    let dialect = Dialect::Postgres;
                    let table = format!("{}.{}", dialect.quote(&schema), dialect.quote(&name));
                    let select = tools::select_revisions(*tool, dialect, &table);
                    // The table name comes from the catalog and is quoted; the rest is constant.
                    let rows: Vec<(Option<String>, String)> =
                        sqlx::query_as(AssertSqlSafe(select.clone()))
                            .fetch_all(&mut *conn)
                            .await
                            .map_err(|error| table_error(error, *tool, &schema, &name, endpoint))?;
                    *known = Some(select);
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
    conn: &mut PgConnection,
    candidates: &[TableName],
) -> Result<Option<(String, String)>, sqlx::Error> {
    for candidate in candidates {
        let found: Option<(String, String)> = sqlx::query_as(FIND_TABLE)
            .bind(&candidate.name)
            .bind(candidate.schema.as_deref())
            .fetch_optional(&mut *conn)
            .await?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// The first column of a custom query's row as text; `None` for NULL.
fn first_column_text(row: &PgRow) -> Result<Option<String>, ProbeError> {
    if row.columns().is_empty() {
        return Err(custom_query_type_error("no columns"));
    }
    if let Ok(text) = row.try_get::<Option<String>, _>(0) {
        return Ok(text);
    }
    if let Ok(number) = row.try_get::<Option<i64>, _>(0) {
        return Ok(number.map(|n| n.to_string()));
    }
    if let Ok(number) = row.try_get::<Option<i32>, _>(0) {
        return Ok(number.map(|n| n.to_string()));
    }
    if let Ok(number) = row.try_get::<Option<i16>, _>(0) {
        return Ok(number.map(|n| n.to_string()));
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
            "its first column has {what}; return the revision as text, e.g. CAST(x AS TEXT)"
        ),
    }
}

fn connect_error(error: sqlx::Error, options: &PgConnectOptions, endpoint: String) -> ProbeError {
    let code = match &error {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<PgDatabaseError>()
            .map(|e| e.code().to_string()),
        _ => None,
    };
    match code.as_deref() {
        // invalid_password, invalid_authorization_specification (no pg_hba entry),
        // insufficient_privilege (no CONNECT on the database).
        Some("28P01" | "28000" | "42501") => ProbeError::Authentication {
            user: options.get_username().to_string(),
            endpoint,
            detail: server_message(&error),
        },
        // invalid_catalog_name
        Some("3D000") => ProbeError::DatabaseNotFound {
            database: options
                .get_database()
                .unwrap_or(options.get_username())
                .to_string(),
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
    let error = query_error(error, &source, endpoint);
    match error {
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
            let timed_out = matches!(&error, sqlx::Error::Database(db)
                if db.try_downcast_ref::<PgDatabaseError>()
                    .is_some_and(|e| matches!(e.code(), "57014" | "55P03")));
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
        sqlx::Error::Database(db) => match db.try_downcast_ref::<PgDatabaseError>() {
            Some(pg) => format!("{} (SQLSTATE {})", pg.message(), pg.code()),
            None => db.message().to_string(),
        },
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}
