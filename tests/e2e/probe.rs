//! The revision probe against real PostgreSQL and MariaDB servers, and real Alembic.
//!
//! These tests need no Kubernetes: the binary's first probe test starts one PostgreSQL and
//! one MariaDB (see `schemagate_testenv::db`) and keeps them in statics for all others. Statics
//! are never dropped; the servers still stop with the process because each runs under a
//! supervisor that stops it when this process's end closes its stdin pipe. Each test works
//! in a database of its own, created with its own user and password. A server that cannot
//! start fails the tests that need it.
//!
//! Every table is created with the DDL the tool itself runs (Flyway's createMetaDataTable,
//! golang-migrate's ensureVersionTable, sqlx's ensure_migrations_table, ...), on each engine.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use schemagate::probe::{self, AppliedRevisions, ProbeError};
use schemagate::revision::{self, Answer, Applied, Graph, Scheme};
use schemagate_crds::{Engine, Tracking, TrackingTool};
use schemagate_testenv::db::DatabaseServer;
use sqlx::{AssertSqlSafe, Connection as _};
use tokio::sync::OnceCell;

static POSTGRES: OnceCell<DatabaseServer> = OnceCell::const_new();
static MARIADB: OnceCell<DatabaseServer> = OnceCell::const_new();

/// The shared server of `engine`, started on first use.
async fn server(engine: Engine) -> Result<&'static DatabaseServer> {
    let dir = |name: &str| {
        std::env::temp_dir().join(format!("schemagate-probe-{}-{name}", std::process::id()))
    };
    match engine {
        Engine::Postgres => {
            let dir = dir("postgres");
            POSTGRES
                .get_or_try_init(|| async move { DatabaseServer::start_postgres(&dir).await })
                .await
        }
        Engine::Mysql => {
            let dir = dir("mariadb");
            MARIADB
                .get_or_try_init(|| async move { DatabaseServer::start_mariadb(&dir).await })
                .await
        }
    }
}

/// A new database of the test's own, named `NAME_pg` or `NAME_my`; returns its owner's URL.
async fn database(engine: Engine, name: &str) -> Result<String> {
    let suffix = match engine {
        Engine::Postgres => "pg",
        Engine::Mysql => "my",
    };
    server(engine)
        .await?
        .create_database(&format!("{name}_{suffix}"))
        .await
}

/// Runs statements as the database's owner.
async fn execute(engine: Engine, url: &str, statements: &[&str]) -> Result<()> {
    async fn run<C>(mut conn: C, statements: &[&str]) -> Result<()>
    where
        C: sqlx::Connection,
        for<'c> &'c mut C: sqlx::Executor<'c>,
    {
        for statement in statements {
            sqlx::raw_sql(AssertSqlSafe(statement.to_string()))
                .execute(&mut conn)
                .await
                .with_context(|| format!("running {statement}"))?;
        }
        conn.close().await?;
        Ok(())
    }
    match engine {
        Engine::Postgres => run(sqlx::PgConnection::connect(url).await?, statements).await,
        Engine::Mysql => run(sqlx::MySqlConnection::connect(url).await?, statements).await,
    }
}

fn tool(tool: TrackingTool) -> Tracking {
    Tracking {
        tool: Some(tool),
        query: None,
        table: None,
    }
}

fn query(text: &str) -> Tracking {
    Tracking {
        tool: None,
        query: Some(text.to_string()),
        table: None,
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The password in a URL made by `create_database` (alphanumeric, never percent-encoded).
fn password_of(url: &str) -> &str {
    let userinfo = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map_or("", |(userinfo, _)| userinfo);
    userinfo
        .split_once(':')
        .map_or("", |(_, password)| password)
}

/// Fails unless `error` is what `expected` says, and its message and Debug form do not
/// contain `password`.
fn assert_error_without(error: &ProbeError, password: &str, expected: &str) -> Result<()> {
    let display = error.to_string();
    let debug = format!("{error:?}");
    ensure!(!password.is_empty(), "test bug: empty password");
    ensure!(
        !display.contains(password),
        "password in message: {display}"
    );
    ensure!(!debug.contains(password), "password in Debug: {debug}");
    ensure!(
        display.contains(expected),
        "expected {expected:?} in: {display}"
    );
    Ok(())
}

/// The predicate on what a probe read, as the gate asks it.
fn answer(
    tracking_tool: TrackingTool,
    applied: &AppliedRevisions,
    graph: Option<&Graph>,
    required: &str,
) -> Answer {
    let applied = Applied {
        revisions: &applied.revisions,
        complete: true,
    };
    revision::answer(Scheme::of(&tool(tracking_tool)), applied, graph, required)
}

/// Generates a `postgres` and a `mariadb` test for a scenario `async fn(Engine)`.
macro_rules! on_both_engines {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn postgres() -> anyhow::Result<()> {
                super::$scenario(schemagate_crds::Engine::Postgres).await
            }
            #[tokio::test]
            async fn mariadb() -> anyhow::Result<()> {
                super::$scenario(schemagate_crds::Engine::Mysql).await
            }
        }
    )*};
}

on_both_engines!(
    session_reads_again_on_one_connection,
    flyway_history,
    flyway_failed_migration,
    golang_migrate_head,
    golang_migrate_dirty,
    sqlx_history,
    sqlx_failed_migration,
    rails_history,
    django_history,
    liquibase_history,
    prisma_history,
    prisma_failed_migration,
    atlas_history,
    atlas_partial_migration,
    schemagate_history,
    alembic_several_heads,
    missing_tables_mean_nothing_applied,
    table_override,
    custom_query,
    custom_query_errors,
    statement_timeout,
    wrong_password,
    unreachable_server,
    missing_database,
    real_alembic,
    alembic_graph_with_branches_and_merges,
    alembic_graph_too_long_for_its_report,
    probe_latency,
);

// --- DDL as each tool creates its table -------------------------------------------------

/// Flyway's createMetaDataTable (flyway-database-postgresql / flyway-mysql).
fn flyway_ddl(engine: Engine, table: &str) -> Vec<String> {
    match engine {
        Engine::Postgres => vec![
            format!(
                "CREATE TABLE {table} (\
                 \"installed_rank\" INT NOT NULL, \"version\" VARCHAR(50), \
                 \"description\" VARCHAR(200) NOT NULL, \"type\" VARCHAR(20) NOT NULL, \
                 \"script\" VARCHAR(1000) NOT NULL, \"checksum\" INTEGER, \
                 \"installed_by\" VARCHAR(100) NOT NULL, \
                 \"installed_on\" TIMESTAMP NOT NULL DEFAULT now(), \
                 \"execution_time\" INTEGER NOT NULL, \"success\" BOOLEAN NOT NULL)"
            ),
            format!(
                "ALTER TABLE {table} ADD CONSTRAINT \"flyway_schema_history_pk\" \
                 PRIMARY KEY (\"installed_rank\")"
            ),
            format!("CREATE INDEX \"flyway_schema_history_s_idx\" ON {table} (\"success\")"),
        ],
        Engine::Mysql => vec![
            format!(
                "CREATE TABLE {table} (\
                 `installed_rank` INT NOT NULL, `version` VARCHAR(50), \
                 `description` VARCHAR(200) NOT NULL, `type` VARCHAR(20) NOT NULL, \
                 `script` VARCHAR(1000) NOT NULL, `checksum` INT, \
                 `installed_by` VARCHAR(100) NOT NULL, \
                 `installed_on` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, \
                 `execution_time` INT NOT NULL, `success` BOOL NOT NULL, \
                 CONSTRAINT `flyway_schema_history_pk` PRIMARY KEY (`installed_rank`)\
                 ) ENGINE=InnoDB"
            ),
            format!("CREATE INDEX `flyway_schema_history_s_idx` ON {table} (`success`)"),
        ],
    }
}

fn flyway_row(table: &str, rank: u32, version: Option<&str>, kind: &str, success: bool) -> String {
    let version = version.map_or("NULL".to_string(), |v| format!("'{v}'"));
    format!(
        "INSERT INTO {table} (installed_rank, version, description, type, script, checksum, \
         installed_by, execution_time, success) \
         VALUES ({rank}, {version}, 'step {rank}', '{kind}', 'V{rank}__step.sql', 12345, \
         'app', 7, {success})"
    )
}

/// golang-migrate's ensureVersionTable: the same statement for both drivers.
const GOLANG_MIGRATE_DDL: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (version bigint not null primary key, dirty boolean not null)";

/// sqlx's ensure_migrations_table (sqlx-postgres / sqlx-mysql 0.9).
fn sqlx_ddl(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => {
            "CREATE TABLE IF NOT EXISTS _sqlx_migrations (version BIGINT PRIMARY KEY, \
             description TEXT NOT NULL, installed_on TIMESTAMPTZ NOT NULL DEFAULT now(), \
             success BOOLEAN NOT NULL, checksum BYTEA NOT NULL, execution_time BIGINT NOT NULL)"
        }
        Engine::Mysql => {
            "CREATE TABLE IF NOT EXISTS _sqlx_migrations (version BIGINT PRIMARY KEY, \
             description TEXT NOT NULL, installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, \
             success BOOLEAN NOT NULL, checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)"
        }
    }
}

/// Active Record's schema_migrations.
fn rails_ddl(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => {
            "CREATE TABLE \"schema_migrations\" (\"version\" character varying NOT NULL PRIMARY KEY)"
        }
        Engine::Mysql => {
            "CREATE TABLE `schema_migrations` (`version` varchar(255) NOT NULL, PRIMARY KEY (`version`))"
        }
    }
}

/// Django's MigrationRecorder table (Django 5).
fn django_ddl(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => {
            "CREATE TABLE \"django_migrations\" (\"id\" bigint NOT NULL PRIMARY KEY GENERATED BY \
             DEFAULT AS IDENTITY, \"app\" varchar(255) NOT NULL, \"name\" varchar(255) NOT NULL, \
             \"applied\" timestamp with time zone NOT NULL)"
        }
        Engine::Mysql => {
            "CREATE TABLE `django_migrations` (`id` bigint AUTO_INCREMENT NOT NULL PRIMARY KEY, \
             `app` varchar(255) NOT NULL, `name` varchar(255) NOT NULL, `applied` datetime(6) NOT NULL)"
        }
    }
}

/// Liquibase's DATABASECHANGELOG: lower case on PostgreSQL, upper case on MySQL.
fn liquibase_ddl(engine: Engine) -> (&'static str, &'static str) {
    match engine {
        Engine::Postgres => (
            "CREATE TABLE public.databasechangelog (ID VARCHAR(255) NOT NULL, AUTHOR VARCHAR(255) \
             NOT NULL, FILENAME VARCHAR(255) NOT NULL, DATEEXECUTED TIMESTAMP WITHOUT TIME ZONE \
             NOT NULL, ORDEREXECUTED INTEGER NOT NULL, EXECTYPE VARCHAR(10) NOT NULL, MD5SUM \
             VARCHAR(35), DESCRIPTION VARCHAR(255), COMMENTS VARCHAR(255), TAG VARCHAR(255), \
             LIQUIBASE VARCHAR(20), CONTEXTS VARCHAR(255), LABELS VARCHAR(255), DEPLOYMENT_ID \
             VARCHAR(10))",
            "databasechangelog",
        ),
        Engine::Mysql => (
            "CREATE TABLE DATABASECHANGELOG (ID VARCHAR(255) NOT NULL, AUTHOR VARCHAR(255) NOT \
             NULL, FILENAME VARCHAR(255) NOT NULL, DATEEXECUTED datetime NOT NULL, ORDEREXECUTED \
             INT NOT NULL, EXECTYPE VARCHAR(10) NOT NULL, MD5SUM VARCHAR(35) NULL, DESCRIPTION \
             VARCHAR(255) NULL, COMMENTS VARCHAR(255) NULL, TAG VARCHAR(255) NULL, LIQUIBASE \
             VARCHAR(20) NULL, CONTEXTS VARCHAR(255) NULL, LABELS VARCHAR(255) NULL, \
             DEPLOYMENT_ID VARCHAR(10) NULL)",
            "DATABASECHANGELOG",
        ),
    }
}

/// Prisma's _prisma_migrations (migration engine, PostgreSQL / MySQL connector).
fn prisma_ddl(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => {
            "CREATE TABLE \"_prisma_migrations\" (\"id\" VARCHAR(36) PRIMARY KEY NOT NULL, \
             \"checksum\" VARCHAR(64) NOT NULL, \"finished_at\" TIMESTAMPTZ, \"migration_name\" \
             VARCHAR(255) NOT NULL, \"logs\" TEXT, \"rolled_back_at\" TIMESTAMPTZ, \"started_at\" \
             TIMESTAMPTZ NOT NULL DEFAULT now(), \"applied_steps_count\" INTEGER NOT NULL DEFAULT 0)"
        }
        Engine::Mysql => {
            "CREATE TABLE _prisma_migrations (id VARCHAR(36) PRIMARY KEY NOT NULL, checksum \
             VARCHAR(64) NOT NULL, finished_at DATETIME(3), migration_name VARCHAR(255) NOT NULL, \
             logs TEXT, rolled_back_at DATETIME(3), started_at DATETIME(3) NOT NULL DEFAULT \
             CURRENT_TIMESTAMP(3), applied_steps_count INTEGER UNSIGNED NOT NULL DEFAULT 0) \
             DEFAULT CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
        }
    }
}

/// Atlas's revisions table: its own schema on PostgreSQL (URL without search_path), the
/// URL's database on MySQL.
fn atlas_ddl(engine: Engine) -> Vec<&'static str> {
    match engine {
        Engine::Postgres => vec![
            "CREATE SCHEMA \"atlas_schema_revisions\"",
            "CREATE TABLE \"atlas_schema_revisions\".\"atlas_schema_revisions\" (\"version\" \
             character varying NOT NULL, \"description\" character varying NOT NULL, \"type\" \
             bigint NOT NULL DEFAULT 2, \"applied\" bigint NOT NULL DEFAULT 0, \"total\" bigint NOT \
             NULL DEFAULT 0, \"executed_at\" timestamptz NOT NULL, \"execution_time\" bigint NOT \
             NULL, \"error\" text NULL, \"error_stmt\" text NULL, \"hash\" character varying NOT \
             NULL, \"partial_hashes\" jsonb NULL, \"operator_version\" character varying NOT NULL, \
             PRIMARY KEY (\"version\"))",
        ],
        Engine::Mysql => vec![
            "CREATE TABLE `atlas_schema_revisions` (`version` varchar(255) NOT NULL, \
             `description` varchar(255) NOT NULL, `type` bigint unsigned NOT NULL DEFAULT 2, \
             `applied` bigint NOT NULL DEFAULT 0, `total` bigint NOT NULL DEFAULT 0, \
             `executed_at` timestamp(6) NOT NULL, `execution_time` bigint NOT NULL, `error` \
             longtext NULL, `error_stmt` longtext NULL, `hash` varchar(255) NOT NULL, \
             `partial_hashes` json NULL, `operator_version` varchar(255) NOT NULL, PRIMARY KEY \
             (`version`)) CHARSET utf8mb4 COLLATE utf8mb4_bin",
        ],
    }
}

fn atlas_table(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => "atlas_schema_revisions.atlas_schema_revisions",
        Engine::Mysql => "atlas_schema_revisions",
    }
}

fn atlas_row(
    engine: Engine,
    version: &str,
    kind: u32,
    applied: u32,
    total: u32,
    error: Option<&str>,
) -> String {
    let error = error.map_or("NULL".to_string(), |e| format!("'{e}'"));
    format!(
        "INSERT INTO {} (version, description, type, applied, total, executed_at, \
         execution_time, error, hash, operator_version) VALUES ('{version}', 'step', {kind}, \
         {applied}, {total}, CURRENT_TIMESTAMP, 1000, {error}, 'h', 'Atlas CLI v0.38.0')",
        atlas_table(engine)
    )
}

/// schemagate's own table for migrators without one (docs/probe.md).
fn schemagate_ddl(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => {
            "CREATE TABLE schemagate_revisions (revision text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        }
        Engine::Mysql => {
            "CREATE TABLE schemagate_revisions (revision varchar(255) PRIMARY KEY, applied_at timestamp(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6))"
        }
    }
}

/// Alembic's version table, as `alembic upgrade` creates it.
const ALEMBIC_DDL: &str = "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL, \
                           CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num))";

fn as_refs(statements: &[String]) -> Vec<&str> {
    statements.iter().map(String::as_str).collect()
}

// --- Scenarios --------------------------------------------------------------------------

async fn flyway_history(engine: Engine) -> Result<()> {
    let url = database(engine, "flyway").await?;
    let table = "flyway_schema_history";
    let mut statements = flyway_ddl(engine, table);
    statements.extend([
        flyway_row(table, 1, Some("1"), "BASELINE", true),
        flyway_row(table, 2, Some("1.1"), "SQL", true),
        flyway_row(table, 3, None, "SQL", true), // repeatable: no version
        flyway_row(table, 4, Some("2"), "SQL", true),
        flyway_row(table, 5, Some("2"), "UNDO_SQL", true),
        flyway_row(table, 6, Some("3"), "JDBC", true),
        flyway_row(table, 7, Some("2"), "SQL", true), // re-applied after the undo
    ]);
    execute(engine, &url, &as_refs(&statements)).await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Flyway)).await?;
    ensure!(
        applied
            == AppliedRevisions {
                revisions: strings(&["1", "1.1", "3", "2"]),
                head_only: false
            },
        "{applied:?}"
    );
    let flyway = TrackingTool::Flyway;
    ensure!(answer(flyway, &applied, None, "1.1") == Answer::Satisfied);
    ensure!(answer(flyway, &applied, None, "4") == Answer::NotSatisfied);
    // Re-applied after the undo: the newest applied, whatever the numbers say.
    ensure!(revision::display(Scheme::History, &applied.revisions, "9").as_deref() == Some("2"));
    Ok(())
}

async fn flyway_failed_migration(engine: Engine) -> Result<()> {
    let url = database(engine, "flyway_failed").await?;
    let table = "flyway_schema_history";
    let mut statements = flyway_ddl(engine, table);
    statements.extend([
        flyway_row(table, 1, Some("1"), "SQL", true),
        flyway_row(table, 2, Some("2"), "SQL", false),
    ]);
    execute(engine, &url, &as_refs(&statements)).await?;
    let error = probe::probe_revisions(engine, &url, &tool(TrackingTool::Flyway))
        .await
        .err()
        .context("a failed Flyway row must be an error")?;
    ensure!(
        matches!(&error, ProbeError::Dirty { tool: "flyway", revision, .. } if revision == "2"),
        "{error:?}"
    );
    assert_error_without(&error, password_of(&url), "flyway repair")
}

/// The server's ids of the other connections to this database (the probe's), read as its
/// owner.
async fn other_connections(engine: Engine, url: &str) -> Result<Vec<i64>> {
    Ok(match engine {
        Engine::Postgres => {
            let mut conn = sqlx::PgConnection::connect(url).await?;
            let ids: Vec<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_all(&mut conn)
            .await?;
            conn.close().await?;
            ids.into_iter().map(i64::from).collect()
        }
        Engine::Mysql => {
            let mut conn = sqlx::MySqlConnection::connect(url).await?;
            let ids: Vec<i64> = sqlx::query_scalar(
                "SELECT CAST(id AS SIGNED) FROM information_schema.processlist WHERE db = DATABASE() AND id <> CONNECTION_ID()",
            )
            .fetch_all(&mut conn)
            .await?;
            conn.close().await?;
            ids
        }
    })
}

/// A golang-migrate table at `version`, clean.
async fn golang_migrate_at(engine: Engine, url: &str, version: u64) -> Result<()> {
    let insert =
        format!("INSERT INTO schema_migrations (version, dirty) VALUES ({version}, false)");
    execute(engine, url, &[GOLANG_MIGRATE_DDL, &insert]).await
}

/// The last statement text PostgreSQL received from the connection with server id `pid`.
async fn last_postgres_query(url: &str, pid: i64) -> Result<String> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let query: String =
        sqlx::query_scalar("SELECT query FROM pg_stat_activity WHERE pid = $1::int")
            .bind(pid)
            .fetch_one(&mut conn)
            .await?;
    conn.close().await?;
    Ok(query)
}

/// A session (the watch of a running migration Job) reads again and again on the one
/// connection it opened: each read ends its transaction, so a table created after the
/// first read and each new version are seen, and a version marked dirty is an answer that
/// keeps the connection. On PostgreSQL, once it has found its table, a read is one message
/// to the server (transaction, query and its end); when the table is gone, it finds out
/// what is there by the whole read.
async fn session_reads_again_on_one_connection(engine: Engine) -> Result<()> {
    let url = database(engine, "session").await?;
    let mut session = probe::Session::new(engine, &url, &tool(TrackingTool::GolangMigrate))?;
    let nothing = session.read().await?;
    ensure!(nothing.revisions.is_empty(), "{nothing:?}");
    let connection = other_connections(engine, &url).await?;
    ensure!(connection.len() == 1, "one connection open: {connection:?}");
    golang_migrate_at(engine, &url, 1).await?;
    let first = session.read().await?;
    ensure!(first.revisions == strings(&["1"]), "{first:?}");
    execute(
        engine,
        &url,
        &["UPDATE schema_migrations SET version = 2, dirty = true"],
    )
    .await?;
    let dirty = session.read().await.err().context("version 2 is dirty")?;
    ensure!(matches!(dirty, ProbeError::Dirty { .. }), "{dirty:?}");
    execute(
        engine,
        &url,
        &["UPDATE schema_migrations SET dirty = false"],
    )
    .await?;
    let second = session.read().await?;
    ensure!(second.revisions == strings(&["2"]), "{second:?}");
    // The table it found goes away: nothing is applied, and the read after it (through the
    // table found again) still ends its transaction.
    execute(engine, &url, &["DROP TABLE schema_migrations"]).await?;
    let dropped = session.read().await?;
    ensure!(dropped.revisions.is_empty(), "{dropped:?}");
    golang_migrate_at(engine, &url, 3).await?;
    let third = session.read().await?;
    ensure!(third.revisions == strings(&["3"]), "{third:?}");
    execute(engine, &url, &["UPDATE schema_migrations SET version = 4"]).await?;
    let fourth = session.read().await?;
    ensure!(fourth.revisions == strings(&["4"]), "{fourth:?}");
    if engine == Engine::Postgres {
        let last = last_postgres_query(&url, connection[0]).await?;
        ensure!(
            last.starts_with("BEGIN READ ONLY")
                && last.contains("schema_migrations")
                && last.ends_with("ROLLBACK"),
            "a read of a found table is one message: {last}"
        );
    }
    ensure!(
        other_connections(engine, &url).await? == connection,
        "the same connection throughout"
    );
    session.close().await;
    // Closed: the server sees it go.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !other_connections(engine, &url).await?.is_empty() {
        ensure!(Instant::now() < deadline, "the connection was not closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn golang_migrate_head(engine: Engine) -> Result<()> {
    let url = database(engine, "gomigrate").await?;
    execute(
        engine,
        &url,
        &[
            GOLANG_MIGRATE_DDL,
            "INSERT INTO schema_migrations (version, dirty) VALUES (20251228120000, false)",
        ],
    )
    .await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::GolangMigrate)).await?;
    ensure!(
        applied
            == AppliedRevisions {
                revisions: strings(&["20251228120000"]),
                head_only: true
            },
        "{applied:?}"
    );
    // Ordered versions: an older requirement is satisfied by a newer head.
    let migrate = TrackingTool::GolangMigrate;
    ensure!(answer(migrate, &applied, None, "20251201000000") == Answer::Satisfied);
    ensure!(answer(migrate, &applied, None, "20260101000000") == Answer::NotSatisfied);
    Ok(())
}

async fn golang_migrate_dirty(engine: Engine) -> Result<()> {
    let url = database(engine, "gomigrate_dirty").await?;
    execute(
        engine,
        &url,
        &[
            GOLANG_MIGRATE_DDL,
            "INSERT INTO schema_migrations (version, dirty) VALUES (7, true)",
        ],
    )
    .await?;
    let error = probe::probe_revisions(engine, &url, &tool(TrackingTool::GolangMigrate))
        .await
        .err()
        .context("a dirty golang-migrate version must be an error")?;
    ensure!(
        matches!(&error, ProbeError::Dirty { tool: "golang-migrate", revision, .. } if revision == "7"),
        "{error:?}"
    );
    ensure!(error.reason() == "MigrationDirty");
    assert_error_without(&error, password_of(&url), "migrate force")
}

async fn sqlx_history(engine: Engine) -> Result<()> {
    let url = database(engine, "sqlx").await?;
    execute(
        engine,
        &url,
        &[
            sqlx_ddl(engine),
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (20251228120000, 'add orders', true, '', 10)",
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (20251201000000, 'init', true, '', 10)",
        ],
    )
    .await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Sqlx)).await?;
    ensure!(
        applied.revisions == strings(&["20251201000000", "20251228120000"]) && !applied.head_only,
        "{applied:?}"
    );
    Ok(())
}

async fn sqlx_failed_migration(engine: Engine) -> Result<()> {
    let url = database(engine, "sqlx_failed").await?;
    execute(
        engine,
        &url,
        &[
            sqlx_ddl(engine),
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (1, 'init', true, '', 10)",
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (2, 'half done', false, '', -1)",
        ],
    )
    .await?;
    let error = probe::probe_revisions(engine, &url, &tool(TrackingTool::Sqlx))
        .await
        .err()
        .context("a failed sqlx migration must be an error")?;
    ensure!(
        matches!(&error, ProbeError::Dirty { tool: "sqlx", revision, .. } if revision == "2"),
        "{error:?}"
    );
    assert_error_without(&error, password_of(&url), "success = false")
}

async fn rails_history(engine: Engine) -> Result<()> {
    let url = database(engine, "rails").await?;
    execute(
        engine,
        &url,
        &[
            rails_ddl(engine),
            "INSERT INTO schema_migrations (version) VALUES ('20251228120000')",
            "INSERT INTO schema_migrations (version) VALUES ('20251201090000')",
        ],
    )
    .await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Rails)).await?;
    ensure!(
        applied.revisions == strings(&["20251201090000", "20251228120000"]) && !applied.head_only,
        "{applied:?}"
    );
    Ok(())
}

async fn django_history(engine: Engine) -> Result<()> {
    let url = database(engine, "django").await?;
    let insert = |app: &str, name: &str| {
        format!(
            "INSERT INTO django_migrations (app, name, applied) VALUES ('{app}', '{name}', CURRENT_TIMESTAMP)"
        )
    };
    let rows = [
        insert("contenttypes", "0001_initial"),
        insert("auth", "0001_initial"),
        insert("billing", "0002_invoice_due_date"),
    ];
    let mut statements = vec![django_ddl(engine)];
    statements.extend(rows.iter().map(String::as_str));
    execute(engine, &url, &statements).await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Django)).await?;
    ensure!(
        applied.revisions
            == strings(&[
                "contenttypes.0001_initial",
                "auth.0001_initial",
                "billing.0002_invoice_due_date"
            ]),
        "{applied:?}"
    );
    ensure!(
        answer(
            TrackingTool::Django,
            &applied,
            None,
            "billing.0002_invoice_due_date"
        ) == Answer::Satisfied
    );
    Ok(())
}

async fn liquibase_history(engine: Engine) -> Result<()> {
    let url = database(engine, "liquibase").await?;
    let (ddl, table) = liquibase_ddl(engine);
    let insert = |id: &str, order: u32, exec_type: &str| {
        format!(
            "INSERT INTO {table} (ID, AUTHOR, FILENAME, DATEEXECUTED, ORDEREXECUTED, EXECTYPE, \
             MD5SUM, DESCRIPTION, LIQUIBASE, DEPLOYMENT_ID) VALUES ('{id}', 'dev', \
             'db/changelog.xml', CURRENT_TIMESTAMP, {order}, '{exec_type}', \
             '9:0123456789abcdef0123456789abcdef', 'createTable', '4.29.2', '2345678901')"
        )
    };
    // Inserted out of order: ORDEREXECUTED decides.
    let rows = [
        insert("add-email", 2, "EXECUTED"),
        insert("create-users", 1, "EXECUTED"),
        insert("seed", 3, "MARK_RAN"),
        insert("optional-index", 4, "FAILED"),
    ];
    let mut statements = vec![ddl];
    statements.extend(rows.iter().map(String::as_str));
    execute(engine, &url, &statements).await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Liquibase)).await?;
    ensure!(
        applied.revisions == strings(&["create-users", "add-email", "seed"]),
        "{applied:?}"
    );
    Ok(())
}

fn prisma_row(name: &str, id: &str, finished: bool, rolled_back: bool) -> String {
    let finished = if finished {
        "CURRENT_TIMESTAMP"
    } else {
        "NULL"
    };
    let rolled_back = if rolled_back {
        "CURRENT_TIMESTAMP"
    } else {
        "NULL"
    };
    format!(
        "INSERT INTO _prisma_migrations (id, checksum, finished_at, migration_name, logs, \
         rolled_back_at, started_at, applied_steps_count) VALUES ('{id}', \
         'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855', {finished}, \
         '{name}', NULL, {rolled_back}, CURRENT_TIMESTAMP, 1)"
    )
}

async fn prisma_history(engine: Engine) -> Result<()> {
    let url = database(engine, "prisma").await?;
    let rows = [
        prisma_row("20251201000000_init", "id-1", true, false),
        // Failed, then `prisma migrate resolve --rolled-back`, then deployed again.
        prisma_row("20251228120000_orders", "id-2", false, true),
        prisma_row("20251228120000_orders", "id-3", true, false),
    ];
    let mut statements = vec![prisma_ddl(engine)];
    statements.extend(rows.iter().map(String::as_str));
    execute(engine, &url, &statements).await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Prisma)).await?;
    ensure!(
        applied.revisions == strings(&["20251201000000_init", "20251228120000_orders"]),
        "{applied:?}"
    );
    Ok(())
}

async fn prisma_failed_migration(engine: Engine) -> Result<()> {
    let url = database(engine, "prisma_failed").await?;
    let rows = [
        prisma_row("20251201000000_init", "id-1", true, false),
        prisma_row("20251228120000_orders", "id-2", false, false),
    ];
    let mut statements = vec![prisma_ddl(engine)];
    statements.extend(rows.iter().map(String::as_str));
    execute(engine, &url, &statements).await?;
    let error = probe::probe_revisions(engine, &url, &tool(TrackingTool::Prisma))
        .await
        .err()
        .context("an unresolved failed Prisma migration must be an error")?;
    ensure!(
        matches!(&error, ProbeError::Dirty { tool: "prisma", revision, .. }
            if revision == "20251228120000_orders"),
        "{error:?}"
    );
    assert_error_without(&error, password_of(&url), "prisma migrate resolve")
}

async fn atlas_history(engine: Engine) -> Result<()> {
    let url = database(engine, "atlas").await?;
    let rows = [
        atlas_row(engine, "20251201000000", 1, 0, 0, None), // baseline
        atlas_row(engine, "20251228120000", 2, 3, 3, None),
        atlas_row(engine, "20251215000000", 2, 1, 1, Some("")),
    ];
    let mut statements = atlas_ddl(engine);
    statements.extend(rows.iter().map(String::as_str));
    execute(engine, &url, &statements).await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Atlas)).await?;
    ensure!(
        applied.revisions == strings(&["20251201000000", "20251215000000", "20251228120000"]),
        "{applied:?}"
    );
    Ok(())
}

async fn atlas_partial_migration(engine: Engine) -> Result<()> {
    let url = database(engine, "atlas_partial").await?;
    let rows = [
        atlas_row(engine, "20251201000000", 2, 2, 2, None),
        atlas_row(
            engine,
            "20251228120000",
            2,
            1,
            3,
            Some("Error 1064: syntax error"),
        ),
    ];
    let mut statements = atlas_ddl(engine);
    statements.extend(rows.iter().map(String::as_str));
    execute(engine, &url, &statements).await?;
    let error = probe::probe_revisions(engine, &url, &tool(TrackingTool::Atlas))
        .await
        .err()
        .context("a partly applied Atlas file must be an error")?;
    ensure!(
        matches!(&error, ProbeError::Dirty { tool: "atlas", revision, .. } if revision == "20251228120000"),
        "{error:?}"
    );
    assert_error_without(&error, password_of(&url), "atlas migrate set")
}

async fn schemagate_history(engine: Engine) -> Result<()> {
    let url = database(engine, "schemagate").await?;
    execute(
        engine,
        &url,
        &[
            schemagate_ddl(engine),
            "INSERT INTO schemagate_revisions (revision, applied_at) VALUES ('b-second', '2025-12-28 12:00:00')",
            "INSERT INTO schemagate_revisions (revision, applied_at) VALUES ('a-first', '2025-12-01 09:00:00')",
        ],
    )
    .await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Schemagate)).await?;
    ensure!(
        applied.revisions == strings(&["a-first", "b-second"]),
        "{applied:?}"
    );
    Ok(())
}

async fn alembic_several_heads(engine: Engine) -> Result<()> {
    let url = database(engine, "alembic_heads").await?;
    execute(
        engine,
        &url,
        &[
            ALEMBIC_DDL,
            "INSERT INTO alembic_version (version_num) VALUES ('e1f2a3b4c5d6')",
            "INSERT INTO alembic_version (version_num) VALUES ('ae1027a6acf')",
        ],
    )
    .await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Alembic)).await?;
    ensure!(
        applied
            == AppliedRevisions {
                revisions: strings(&["ae1027a6acf", "e1f2a3b4c5d6"]),
                head_only: true
            },
        "{applied:?}"
    );
    // Two branches off one base: the base is an ancestor of both heads.
    let graph = Graph::new(
        [
            ("e1f2a3b4c5d6".to_string(), strings(&["1975ea83b712"])),
            ("ae1027a6acf".to_string(), strings(&["1975ea83b712"])),
            ("1975ea83b712".to_string(), vec![]),
        ],
        false,
    );
    let alembic = TrackingTool::Alembic;
    ensure!(answer(alembic, &applied, Some(&graph), "1975ea83b712") == Answer::Satisfied);
    ensure!(matches!(
        answer(alembic, &applied, Some(&graph), "ffffffffffff"),
        Answer::CannotTell { .. }
    ));
    ensure!(
        revision::display(Scheme::Graph, &applied.revisions, "x").as_deref()
            == Some("ae1027a6acf,e1f2a3b4c5d6")
    );
    Ok(())
}

async fn missing_tables_mean_nothing_applied(engine: Engine) -> Result<()> {
    let url = database(engine, "empty").await?;
    for tracking_tool in TrackingTool::ALL {
        let applied = probe::probe_revisions(engine, &url, &tool(tracking_tool))
            .await
            .with_context(|| format!("{tracking_tool:?}"))?;
        ensure!(
            applied.revisions.is_empty(),
            "{tracking_tool:?}: {applied:?}"
        );
        let head_only = matches!(
            tracking_tool,
            TrackingTool::Alembic | TrackingTool::GolangMigrate
        );
        ensure!(applied.head_only == head_only, "{tracking_tool:?}");
        ensure!(answer(tracking_tool, &applied, None, "1") == Answer::NotSatisfied);
    }
    let custom_table = Tracking {
        table: Some("app.no_such_history".to_string()),
        ..tool(TrackingTool::Flyway)
    };
    let applied = probe::probe_revisions(engine, &url, &custom_table).await?;
    ensure!(applied.revisions.is_empty(), "{applied:?}");
    Ok(())
}

async fn table_override(engine: Engine) -> Result<()> {
    let url = database(engine, "override").await?;
    let database_name = url.rsplit('/').next().unwrap_or_default().to_string();
    // PostgreSQL: a schema off the search path. MySQL: schema means database.
    let (setup, qualified, quoted) = match engine {
        Engine::Postgres => (
            vec!["CREATE SCHEMA app".to_string()],
            "app.deploy_history".to_string(),
            "\"app\".\"deploy_history\"".to_string(),
        ),
        Engine::Mysql => (
            Vec::new(),
            format!("{database_name}.deploy_history"),
            "`deploy_history`".to_string(),
        ),
    };
    let mut statements = setup;
    statements.extend(flyway_ddl(engine, &quoted));
    statements.push(flyway_row(&quoted, 1, Some("1"), "SQL", true));
    statements.push(flyway_row(&quoted, 2, Some("2"), "SQL", true));
    execute(engine, &url, &as_refs(&statements)).await?;
    let tracking = Tracking {
        table: Some(qualified),
        ..tool(TrackingTool::Flyway)
    };
    let applied = probe::probe_revisions(engine, &url, &tracking).await?;
    ensure!(applied.revisions == strings(&["1", "2"]), "{applied:?}");
    // The default table name finds nothing there.
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Flyway)).await?;
    ensure!(applied.revisions.is_empty(), "{applied:?}");
    Ok(())
}

async fn custom_query(engine: Engine) -> Result<()> {
    let url = database(engine, "custom").await?;
    execute(
        engine,
        &url,
        &[
            "CREATE TABLE releases (id INTEGER PRIMARY KEY, tag VARCHAR(40), schema_version BIGINT)",
            "INSERT INTO releases VALUES (1, 'v1', 101), (2, NULL, NULL), (3, 'v3', 103)",
        ],
    )
    .await?;
    let applied = probe::probe_revisions(
        engine,
        &url,
        &query("SELECT tag FROM releases ORDER BY id;"),
    )
    .await?;
    ensure!(
        applied
            == AppliedRevisions {
                revisions: strings(&["v1", "v3"]),
                head_only: false
            },
        "{applied:?}"
    );
    // Numbers are read as text.
    let applied = probe::probe_revisions(
        engine,
        &url,
        &query("WITH r AS (SELECT schema_version FROM releases) SELECT schema_version FROM r ORDER BY 1"),
    )
    .await?;
    ensure!(applied.revisions == strings(&["101", "103"]), "{applied:?}");
    Ok(())
}

async fn custom_query_errors(engine: Engine) -> Result<()> {
    let url = database(engine, "custom_errors").await?;
    execute(engine, &url, &["CREATE TABLE releases (tag VARCHAR(40))"]).await?;
    let password = password_of(&url);

    let error = probe::probe_revisions(engine, &url, &query("SELECT tag FROM no_such_table"))
        .await
        .err()
        .context("a failing custom query must be an error")?;
    ensure!(matches!(error, ProbeError::Query { .. }), "{error:?}");
    ensure!(error.reason() == "RevisionQueryFailed");
    assert_error_without(&error, password, "no_such_table")?;

    let error = probe::probe_revisions(engine, &url, &query("DELETE FROM releases"))
        .await
        .err()
        .context("a DELETE must be refused")?;
    ensure!(
        matches!(error, ProbeError::InvalidTracking { .. }),
        "{error:?}"
    );

    // Two statements: the server refuses them in one prepared statement.
    let error = probe::probe_revisions(
        engine,
        &url,
        &query("SELECT tag FROM releases; DELETE FROM releases"),
    )
    .await
    .err()
    .context("two statements must be refused")?;
    ensure!(matches!(error, ProbeError::Query { .. }), "{error:?}");

    match engine {
        // A write hidden in a SELECT runs in the read-only transaction and fails.
        Engine::Postgres => {
            let writing = "WITH gone AS (DELETE FROM releases RETURNING tag) SELECT tag FROM gone";
            let error = probe::probe_revisions(engine, &url, &query(writing))
                .await
                .err()
                .context("a write must fail in the read-only transaction")?;
            assert_error_without(&error, password, "read-only transaction")?;
        }
        // Read-only transactions do not stop MySQL writing files: refused up front.
        Engine::Mysql => {
            let writing = "SELECT tag FROM releases INTO OUTFILE 'revisions.txt'";
            let error = probe::probe_revisions(engine, &url, &query(writing))
                .await
                .err()
                .context("INTO OUTFILE must be refused")?;
            ensure!(
                matches!(error, ProbeError::InvalidTracking { .. }),
                "{error:?}"
            );
        }
    }
    Ok(())
}

async fn statement_timeout(engine: Engine) -> Result<()> {
    let url = database(engine, "slow").await?;
    let sleeping = match engine {
        Engine::Postgres => "SELECT CAST(pg_sleep(30) AS TEXT)",
        Engine::Mysql => "SELECT CAST(SLEEP(30) AS CHAR)",
    };
    let started = Instant::now();
    let result = probe::probe_revisions(engine, &url, &query(sleeping)).await;
    let elapsed = started.elapsed();
    ensure!(
        elapsed < Duration::from_secs(12),
        "the statement timeout did not stop the query: {elapsed:?}"
    );
    let error = result
        .err()
        .context("a query over the timeout must be an error")?;
    ensure!(matches!(error, ProbeError::Query { .. }), "{error:?}");
    assert_error_without(&error, password_of(&url), "limit 5s")
}

async fn wrong_password(engine: Engine) -> Result<()> {
    let url = database(engine, "wrong_password").await?;
    let real_password = password_of(&url).to_string();
    // Percent-encoded `@`: neither form may appear in the message.
    let wrong = "Wr0ng-Pa55%40word";
    let wrong_url = url.replacen(&real_password, wrong, 1);
    let error = probe::probe_revisions(engine, &wrong_url, &tool(TrackingTool::Flyway))
        .await
        .err()
        .context("a wrong password must be an error")?;
    ensure!(
        matches!(error, ProbeError::Authentication { .. }),
        "{error:?}"
    );
    ensure!(error.reason() == "DatabaseAuthenticationFailed");
    let user = "wrong_password_";
    assert_error_without(&error, wrong, user)?;
    assert_error_without(&error, "Wr0ng-Pa55@word", "127.0.0.1")?;
    assert_error_without(&error, &real_password, "password in the Secret")
}

async fn unreachable_server(engine: Engine) -> Result<()> {
    let url = database(engine, "unreachable").await?;
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let server_port = server(engine).await?.port();
    let dead_url = url.replacen(&format!(":{server_port}/"), &format!(":{port}/"), 1);
    ensure!(dead_url != url);
    let error = probe::probe_revisions(engine, &dead_url, &tool(TrackingTool::Alembic))
        .await
        .err()
        .context("an unreachable server must be an error")?;
    ensure!(matches!(error, ProbeError::Connect { .. }), "{error:?}");
    assert_error_without(&error, password_of(&url), &format!("127.0.0.1:{port}"))
}

async fn missing_database(engine: Engine) -> Result<()> {
    let admin_url = server(engine).await?.admin_url();
    let (base, _) = admin_url.rsplit_once('/').context("admin URL has a path")?;
    let url = format!("{base}/no_such_db");
    let error = probe::probe_revisions(engine, &url, &tool(TrackingTool::Flyway))
        .await
        .err()
        .context("a missing database must be an error")?;
    ensure!(
        matches!(error, ProbeError::DatabaseNotFound { .. }),
        "{error:?}"
    );
    ensure!(error.reason() == "DatabaseNotFound");
    assert_error_without(
        &error,
        password_of(&url),
        "database no_such_db does not exist",
    )
}

/// A two-revision Alembic project in a temporary directory, removed on drop.
struct AlembicProject {
    dir: PathBuf,
}

impl AlembicProject {
    fn create(name: &str) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("schemagate-alembic-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let versions = dir.join("migrations/versions");
        std::fs::create_dir_all(&versions)?;
        std::fs::write(
            dir.join("alembic.ini"),
            "[alembic]\nscript_location = %(here)s/migrations\npath_separator = os\n",
        )?;
        std::fs::write(dir.join("migrations/env.py"), ALEMBIC_ENV)?;
        std::fs::write(versions.join("0001_accounts.py"), ALEMBIC_0001)?;
        std::fs::write(versions.join("0002_account_email.py"), ALEMBIC_0002)?;
        Ok(Self { dir })
    }

    /// `alembic upgrade/downgrade TARGET` with the Secret-style URL in DATABASE_URL.
    async fn run(&self, url: &str, command: &str, target: &str) -> Result<()> {
        let output = tokio::process::Command::new("python3")
            .args(["-m", "alembic", "-c"])
            .arg(self.dir.join("alembic.ini"))
            .args([command, target])
            .env("DATABASE_URL", url)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .output()
            .await
            .context("running python3 -m alembic (pip install alembic psycopg2-binary pymysql)")?;
        if !output.status.success() {
            bail!(
                "alembic {command} {target} failed ({}):\n{}",
                output.status,
                probe::scrub_secret(&String::from_utf8_lossy(&output.stderr), url)
            );
        }
        Ok(())
    }
}

impl AlembicProject {
    /// Adds a revision script with this id and parents (random hex ids, branches, merges).
    fn add_revision(&self, revision: &str, parents: &[&str]) -> Result<()> {
        let down = match parents {
            [] => "None".to_string(),
            [one] => format!("{one:?}"),
            many => format!(
                "({})",
                many.iter().map(|p| format!("{p:?},")).collect::<String>()
            ),
        };
        let table = format!("t_{revision}");
        let script = format!(
            "from alembic import op\nimport sqlalchemy as sa\n\nrevision = {revision:?}\ndown_revision = {down}\nbranch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n    op.create_table({table:?}, sa.Column(\"id\", sa.Integer, primary_key=True))\n\n\ndef downgrade():\n    op.drop_table({table:?})\n"
        );
        std::fs::write(
            self.dir
                .join("migrations/versions")
                .join(format!("{revision}.py")),
            script,
        )?;
        Ok(())
    }

    /// What the revision-graph Job reports for this project: the operator's built-in
    /// script, run by real Python and Alembic on the project's scripts.
    async fn revision_graph(&self) -> Result<Graph> {
        let out = self.dir.join("termination-log");
        let output = tokio::process::Command::new("python3")
            .arg("-c")
            .arg(revision::ALEMBIC_GRAPH_SCRIPT)
            .arg(self.dir.join("alembic.ini"))
            .arg("")
            .env("SCHEMAGATE_GRAPH_OUT", &out)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .output()
            .await
            .context("running the revision-graph script")?;
        let report = std::fs::read_to_string(&out).unwrap_or_default();
        ensure!(
            output.status.success(),
            "revision-graph script failed ({}): {report}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        ensure!(
            report.len() <= revision::MAX_GRAPH_REPORT,
            "{} bytes",
            report.len()
        );
        Graph::parse_report(&report).map_err(anyhow::Error::msg)
    }
}

/// Random 12-hex-digit revision ids, as `alembic revision` makes them.
fn hex_ids(count: usize) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    while ids.len() < count {
        let id: String = (0..12)
            .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0'))
            .collect();
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

/// The built-in graph script on real Alembic scripts with random hex ids, a branch point,
/// a merge point and two heads; the gate's answers follow the database through them.
async fn alembic_graph_with_branches_and_merges(engine: Engine) -> Result<()> {
    let url = database(engine, "alembic_graph").await?;
    let project = AlembicProject::create(match engine {
        Engine::Postgres => "graph-postgres",
        Engine::Mysql => "graph-mariadb",
    })?;
    let ids = hex_ids(5);
    let [a, b, c, d, merge] = [&ids[0], &ids[1], &ids[2], &ids[3], &ids[4]].map(String::as_str);
    // 0001 -> 0002 -> a -> (b | c), c -> d; merge joins b and d.
    project.add_revision(a, &["0002"])?;
    project.add_revision(b, &[a])?;
    project.add_revision(c, &[a])?;
    project.add_revision(d, &[c])?;
    project.add_revision(merge, &[b, d])?;
    let graph = project.revision_graph().await?;
    ensure!(!graph.truncated && graph.len() == 7, "{graph:?}");
    let alembic = TrackingTool::Alembic;
    let tracking = tool(TrackingTool::Alembic);
    let read = || probe::probe_revisions(engine, &url, &tracking);

    project.run(&url, "upgrade", b).await?;
    let applied = read().await?;
    ensure!(applied.revisions == [b.to_string()], "{applied:?}");
    for applied_one in ["0001", "0002", a, b] {
        ensure!(answer(alembic, &applied, Some(&graph), applied_one) == Answer::Satisfied);
    }
    for missing in [c, d, merge] {
        ensure!(answer(alembic, &applied, Some(&graph), missing) == Answer::NotSatisfied);
    }
    // The other branch too: two heads in alembic_version.
    project.run(&url, "upgrade", d).await?;
    let applied = read().await?;
    ensure!(applied.revisions.len() == 2, "two heads: {applied:?}");
    ensure!(answer(alembic, &applied, Some(&graph), c) == Answer::Satisfied);
    ensure!(answer(alembic, &applied, Some(&graph), merge) == Answer::NotSatisfied);
    project.run(&url, "upgrade", "heads").await?;
    let applied = read().await?;
    ensure!(applied.revisions == [merge.to_string()], "{applied:?}");
    for every in ["0001", "0002", a, b, c, d, merge] {
        ensure!(answer(alembic, &applied, Some(&graph), every) == Answer::Satisfied);
    }
    Ok(())
}

/// A long history: the report keeps the newest revisions within its 4096 bytes, says it
/// was cut, and nothing below the cut is guessed.
async fn alembic_graph_too_long_for_its_report(engine: Engine) -> Result<()> {
    let url = database(engine, "alembic_long").await?;
    let project = AlembicProject::create(match engine {
        Engine::Postgres => "long-postgres",
        Engine::Mysql => "long-mariadb",
    })?;
    let ids = hex_ids(400);
    let mut parent = "0002".to_string();
    for id in &ids {
        project.add_revision(id, &[parent.as_str()])?;
        parent = id.clone();
    }
    let graph = project.revision_graph().await?;
    ensure!(graph.truncated, "400 revisions do not fit 4096 bytes");
    ensure!(graph.len() > 250, "only {} revisions reported", graph.len());
    let newest = &ids[ids.len() - 1];
    let below_cut = &ids[10];
    ensure!(graph.contains(newest) && !graph.contains(below_cut));
    project.run(&url, "upgrade", "head").await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Alembic)).await?;
    let alembic = TrackingTool::Alembic;
    ensure!(answer(alembic, &applied, Some(&graph), &ids[300]) == Answer::Satisfied);
    ensure!(matches!(
        answer(alembic, &applied, Some(&graph), below_cut),
        Answer::CannotTell { .. }
    ));
    Ok(())
}

impl Drop for AlembicProject {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// env.py: Secrets hold the URL sqlx and psql understand; SQLAlchemy wants its driver named.
const ALEMBIC_ENV: &str = r#"
import os
from alembic import context
from sqlalchemy import create_engine, pool

DRIVERS = {
    "postgres": "postgresql+psycopg2",
    "postgresql": "postgresql+psycopg2",
    "mysql": "mysql+pymysql",
    "mariadb": "mysql+pymysql",
}

scheme, rest = os.environ["DATABASE_URL"].split("://", 1)
engine = create_engine(DRIVERS.get(scheme, scheme) + "://" + rest, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
"#;

const ALEMBIC_0001: &str = r#"
from alembic import op
import sqlalchemy as sa

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
    )


def downgrade():
    op.drop_table("accounts")
"#;

const ALEMBIC_0002: &str = r#"
from alembic import op
import sqlalchemy as sa

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("accounts", sa.Column("email", sa.String(200), nullable=True))


def downgrade():
    op.drop_column("accounts", "email")
"#;

async fn real_alembic(engine: Engine) -> Result<()> {
    let url = database(engine, "alembic").await?;
    let project = AlembicProject::create(match engine {
        Engine::Postgres => "postgres",
        Engine::Mysql => "mariadb",
    })?;
    let heads_of = |applied: &AppliedRevisions| applied.revisions.clone();

    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Alembic)).await?;
    ensure!(
        applied.revisions.is_empty(),
        "before any upgrade: {applied:?}"
    );

    project.run(&url, "upgrade", "head").await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Alembic)).await?;
    ensure!(
        heads_of(&applied) == strings(&["0002"]) && applied.head_only,
        "{applied:?}"
    );
    // The SQLAlchemy form of the same URL, as a Python app's Secret may hold it.
    let sqlalchemy_url = match engine {
        Engine::Postgres => url.replacen("postgres://", "postgresql+psycopg2://", 1),
        Engine::Mysql => url.replacen("mysql://", "mysql+pymysql://", 1),
    };
    let same =
        probe::probe_revisions(engine, &sqlalchemy_url, &tool(TrackingTool::Alembic)).await?;
    ensure!(same == applied, "{same:?}");

    let graph = project.revision_graph().await?;
    let alembic = TrackingTool::Alembic;
    ensure!(answer(alembic, &applied, Some(&graph), "0002") == Answer::Satisfied);
    // Old code rolled back onto the new schema is released: 0001 is an ancestor.
    ensure!(answer(alembic, &applied, Some(&graph), "0001") == Answer::Satisfied);

    project.run(&url, "downgrade", "0001").await?;
    let applied = probe::probe_revisions(engine, &url, &tool(TrackingTool::Alembic)).await?;
    ensure!(heads_of(&applied) == strings(&["0001"]), "{applied:?}");
    ensure!(answer(alembic, &applied, Some(&graph), "0002") == Answer::NotSatisfied);
    ensure!(
        revision::display(Scheme::Graph, &applied.revisions, "0002").as_deref() == Some("0001")
    );
    Ok(())
}

async fn probe_latency(engine: Engine) -> Result<()> {
    let url = database(engine, "latency").await?;
    execute(
        engine,
        &url,
        &[
            GOLANG_MIGRATE_DDL,
            "INSERT INTO schema_migrations (version, dirty) VALUES (3, false)",
        ],
    )
    .await?;
    let mut timings = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        probe::probe_revisions(engine, &url, &tool(TrackingTool::GolangMigrate)).await?;
        timings.push(started.elapsed());
    }
    timings.sort();
    eprintln!(
        "probe latency on {engine:?}: min {:?}, median {:?}, max {:?}",
        timings[0], timings[2], timings[4]
    );
    // Generous: a probe runs on every reconcile and must stay far below the requeue period.
    ensure!(timings[2] < Duration::from_secs(2), "{timings:?}");
    Ok(())
}
