use schemagate_crds::{Engine, Tracking, TrackingTool};

use super::tools::{self, STATE_APPLIED, STATE_FAILED, STATE_IGNORED, STATE_REMOVED, TableName};
use super::*;

/// Raw (percent-encoded) and decoded forms of a password no message may contain.
const PASSWORD_RAW: &str = "Zq81-s3cr%40t";
const PASSWORD: &str = "Zq81-s3cr@t";

fn url_with_password(scheme: &str, host_port: &str) -> String {
    format!("{scheme}://app:{PASSWORD_RAW}@{host_port}/appdb")
}

fn tool(tool: TrackingTool) -> Tracking {
    Tracking {
        tool: Some(tool),
        query: None,
        table: None,
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn heads(revisions: &[&str]) -> AppliedRevisions {
    AppliedRevisions {
        revisions: strings(revisions),
        head_only: true,
    }
}

fn history(revisions: &[&str]) -> AppliedRevisions {
    AppliedRevisions {
        revisions: strings(revisions),
        head_only: false,
    }
}

fn assert_no_secret(text: &str) {
    assert!(!text.contains(PASSWORD), "password in: {text}");
    assert!(!text.contains(PASSWORD_RAW), "encoded password in: {text}");
    assert!(!text.contains("app:"), "userinfo in: {text}");
}

#[test]
fn schemes_map_to_sqlx_schemes_and_engines() {
    let cases = [
        (
            "postgres://u:p@h:5432/db",
            Engine::Postgres,
            "postgres://u:p@h:5432/db",
        ),
        (
            "postgresql://u:p@h/db",
            Engine::Postgres,
            "postgres://u:p@h/db",
        ),
        (
            "postgresql+psycopg2://u:p@h/db",
            Engine::Postgres,
            "postgres://u:p@h/db",
        ),
        (
            "POSTGRESQL+PSYCOPG://u:p@h/db",
            Engine::Postgres,
            "postgres://u:p@h/db",
        ),
        (
            "mysql://u:p@h:3306/db",
            Engine::Mysql,
            "mysql://u:p@h:3306/db",
        ),
        ("mariadb://u:p@h/db", Engine::Mysql, "mysql://u:p@h/db"),
        (
            "mysql+pymysql://u:p@h/db?charset=utf8mb4",
            Engine::Mysql,
            "mysql://u:p@h/db?charset=utf8mb4",
        ),
        (
            "mariadb+mariadbconnector://u:p@h/db",
            Engine::Mysql,
            "mysql://u:p@h/db",
        ),
    ];
    for (url, engine, sqlx_url) in cases {
        let parsed = DatabaseUrl::parse(url).unwrap();
        assert_eq!(parsed.engine(), engine, "{url}");
        assert_eq!(parsed.sqlx_url(), sqlx_url, "{url}");
        assert_eq!(parsed.database(), Some("db"), "{url}");
    }
}

#[test]
fn url_parts_are_checked_and_decoded() {
    let parsed = DatabaseUrl::parse("  postgres://u:p%2Fq@[::1]:5432/my%20db?sslmode=disable\n");
    let parsed = parsed.unwrap();
    assert_eq!(parsed.database(), Some("my db"));
    assert_eq!(
        parsed.sqlx_url(),
        "postgres://u:p%2Fq@[::1]:5432/my%20db?sslmode=disable"
    );
    assert_eq!(DatabaseUrl::parse("mysql://u@h").unwrap().database(), None);
    assert_eq!(
        DatabaseUrl::parse("postgres://h/").unwrap().database(),
        None
    );
}

#[test]
fn invalid_urls_say_which_part_is_wrong_without_the_url() {
    let cases = [
        (format!("app:{PASSWORD_RAW}@host/db"), "no scheme"),
        (
            format!("sqlite://app:{PASSWORD_RAW}@host/db"),
            "scheme `sqlite`",
        ),
        (
            format!("po stgres://app:{PASSWORD_RAW}@host/db"),
            "scheme is not a word",
        ),
        (
            format!("postgres://app:{PASSWORD_RAW}@host:54x2/db"),
            "port",
        ),
        (
            format!("postgres://app:{PASSWORD_RAW}@host:70000/db"),
            "port",
        ),
        // An unencoded `/` in the password cuts the host part short.
        (
            format!("postgres://app:ab/{PASSWORD_RAW}@host/db"),
            "percent-encode",
        ),
        (
            format!("postgres://app:{PASSWORD_RAW}%zz@host/db"),
            "password is not valid",
        ),
        (format!("postgres://app:{PASSWORD_RAW}@[::1/db"), "IPv6"),
        (
            format!("postgres://app:{PASSWORD_RAW}@host/db/extra"),
            "only the database name",
        ),
    ];
    for (url, expected) in cases {
        let error = DatabaseUrl::parse(&url).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, ProbeError::InvalidUrl { .. }), "{url}");
        assert_eq!(error.reason(), "DatabaseUrlInvalid");
        assert!(message.contains(expected), "{url}: {message}");
        assert!(!message.contains(&url), "{message}");
        assert!(!message.contains("@host"), "{message}");
        assert_no_secret(&message);
    }
}

#[test]
fn debug_of_a_url_shows_no_secret() {
    let parsed = DatabaseUrl::parse(&url_with_password("postgres", "db.internal:5432")).unwrap();
    assert_no_secret(&format!("{parsed:?}"));
}

#[tokio::test]
async fn engine_and_scheme_must_agree() {
    let url = url_with_password("mysql", "127.0.0.1:1");
    let error = probe_revisions(Engine::Postgres, &url, &tool(TrackingTool::Flyway))
        .await
        .unwrap_err();
    assert!(matches!(error, ProbeError::InvalidUrl { .. }));
    let message = error.to_string();
    assert!(message.contains("scheme is for mysql but spec.database.engine is postgres"));
    assert_no_secret(&message);
}

#[tokio::test]
async fn refused_connection_names_host_and_port_only() {
    // Port 1 on loopback: nothing listens, the kernel refuses at once.
    for (engine, scheme) in [(Engine::Postgres, "postgres"), (Engine::Mysql, "mysql")] {
        let url = url_with_password(scheme, "127.0.0.1:1");
        let error = probe_revisions(engine, &url, &tool(TrackingTool::Alembic))
            .await
            .unwrap_err();
        assert!(matches!(error, ProbeError::Connect { .. }), "{error:?}");
        assert_eq!(error.reason(), "DatabaseUnreachable");
        let message = error.to_string();
        assert!(message.contains("127.0.0.1:1"), "{message}");
        assert_no_secret(&message);
        assert_no_secret(&format!("{error:?}"));
    }
}

#[tokio::test]
async fn mysql_tool_probe_needs_a_database_in_the_url() {
    let url = format!("mysql://app:{PASSWORD_RAW}@127.0.0.1:1");
    let error = probe_revisions(Engine::Mysql, &url, &tool(TrackingTool::Flyway))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("names no database"), "{error}");
    assert_no_secret(&error.to_string());
}

#[test]
fn every_error_message_is_scrubbed_of_the_password() {
    let url = url_with_password("postgres", "db:5432");
    let leaky = format!("oops {url} and {PASSWORD} and {PASSWORD_RAW} and app:{PASSWORD_RAW}");
    let errors = [
        ProbeError::InvalidUrl {
            problem: leaky.clone(),
        },
        ProbeError::InvalidTracking {
            problem: leaky.clone(),
        },
        ProbeError::Connect {
            endpoint: leaky.clone(),
            detail: leaky.clone(),
        },
        ProbeError::Authentication {
            user: leaky.clone(),
            endpoint: leaky.clone(),
            detail: leaky.clone(),
        },
        ProbeError::DatabaseNotFound {
            database: leaky.clone(),
            endpoint: leaky.clone(),
        },
        ProbeError::Query {
            source_name: leaky.clone(),
            detail: leaky.clone(),
        },
        ProbeError::Dirty {
            tool: "flyway",
            revision: leaky.clone(),
            remedy: "x",
        },
    ];
    let mut reasons = std::collections::HashSet::new();
    for error in errors {
        let reason = error.reason();
        assert!(
            reason
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_uppercase())
        );
        assert!(
            reason.chars().all(|c| c.is_ascii_alphanumeric()),
            "{reason}"
        );
        reasons.insert(reason);
        let scrubbed = scrub_error(error, &url);
        assert_no_secret(&scrubbed.to_string());
        assert_no_secret(&format!("{scrubbed:?}"));
    }
    assert_eq!(reasons.len(), 7, "reasons are distinct");
}

#[test]
fn scrub_secret_removes_url_userinfo_and_password_in_every_form() {
    let url = url_with_password("postgresql+psycopg2", "db.internal:5432");
    let text = format!(
        "connecting to {url}\nas app:{PASSWORD_RAW} with {PASSWORD} (raw {PASSWORD_RAW}); \
         user app on db.internal"
    );
    let scrubbed = scrub_secret(&text, &url);
    assert_no_secret(&scrubbed);
    assert!(
        scrubbed.contains("connecting to [database URL]"),
        "{scrubbed}"
    );
    // The user name alone and the host are not secret and stay readable.
    assert!(scrubbed.contains("user app on db.internal"), "{scrubbed}");

    // A URL whose unencoded `/` broke its structure still has its password removed.
    let broken = "postgres://app:pa/ss@db/x";
    assert_eq!(scrub_secret("pw pa/ss", broken), "pw [redacted]");
    // A password given as a query parameter.
    let query = "postgres://db/x?user=app&password=hunter22";
    assert_eq!(scrub_secret("got hunter22", query), "got [redacted]");
    // A trailing newline in the Secret does not defeat URL removal.
    let with_newline = format!("{url}\n");
    assert_no_secret(&scrub_secret(&format!("at {url}"), &with_newline));
    // No URL userinfo: nothing but the URL itself is removed.
    assert_eq!(scrub_secret("a b", "postgres://db/x"), "a b");
}

#[test]
fn table_names_are_identifiers_or_schema_qualified_identifiers() {
    let ok = [
        "flyway_schema_history",
        "app.history",
        "_t$1",
        "A.B",
        &"t".repeat(63),
    ];
    for name in ok {
        assert!(TableName::parse(name).is_some(), "{name}");
    }
    let qualified = TableName::parse("app.history").unwrap();
    assert_eq!(qualified.schema.as_deref(), Some("app"));
    assert_eq!(qualified.name, "history");
    let bad = [
        "",
        "1table",
        "a.b.c",
        "a.",
        ".b",
        "t; DROP TABLE x",
        "t\"x",
        "t`x",
        "tä",
        "t-x",
        "a b",
        &"t".repeat(64),
    ];
    for name in bad {
        assert!(TableName::parse(name).is_none(), "{name:?}");
    }
}

#[test]
fn tracking_is_validated() {
    let error = |tracking: Tracking| RevisionSource::from_tracking(&tracking).unwrap_err();
    let both = Tracking {
        tool: Some(TrackingTool::Flyway),
        query: Some("SELECT 1".into()),
        table: None,
    };
    assert!(error(both).to_string().contains("not both"));
    let neither = Tracking {
        tool: None,
        query: None,
        table: None,
    };
    assert!(error(neither).to_string().contains("set tool"));
    let table_with_query = Tracking {
        tool: None,
        query: Some("SELECT 1".into()),
        table: Some("t".into()),
    };
    assert!(error(table_with_query).to_string().contains("tool only"));
    let bad_table = Tracking {
        tool: Some(TrackingTool::Flyway),
        query: None,
        table: Some("x; DROP TABLE y".into()),
    };
    let bad_table = error(bad_table);
    assert_eq!(bad_table.reason(), "TrackingInvalid");
    assert!(bad_table.to_string().contains("SCHEMA.TABLE"));

    let custom = Tracking {
        tool: Some(TrackingTool::Flyway),
        query: None,
        table: Some("app.history".into()),
    };
    assert_eq!(
        RevisionSource::from_tracking(&custom).unwrap(),
        RevisionSource::Tool {
            tool: TrackingTool::Flyway,
            table: Some(TableName {
                schema: Some("app".into()),
                name: "history".into()
            })
        }
    );
}

#[test]
fn custom_queries_must_be_a_single_read() {
    let accepted = [
        ("SELECT version FROM t", "SELECT version FROM t"),
        ("  select v from t ;\n", "select v from t"),
        (
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "WITH x AS (SELECT 1) SELECT * FROM x",
        ),
        ("(SELECT 1)", "(SELECT 1)"),
    ];
    for (query, expected) in accepted {
        assert_eq!(checked_query(query).unwrap(), expected);
    }
    let rejected = [
        "DELETE FROM t",
        "UPDATE t SET v = 1",
        "",
        "SELECTED",
        "-- comment\nSELECT 1",
        "SELECT v FROM t INTO OUTFILE 'x.txt'",
        "SELECT v INTO DUMPFILE 'x.bin' FROM t",
    ];
    for query in rejected {
        assert!(checked_query(query).is_err(), "{query:?}");
    }
}

#[test]
fn quoting_doubles_quote_characters() {
    assert_eq!(tools::Dialect::Postgres.quote("a\"b"), "\"a\"\"b\"");
    assert_eq!(tools::Dialect::Mysql.quote("a`b"), "`a``b`");
}

fn rows(items: &[(Option<&str>, &str)]) -> Vec<(Option<String>, String)> {
    items
        .iter()
        .map(|(revision, state)| (revision.map(str::to_string), state.to_string()))
        .collect()
}

#[test]
fn rows_fold_into_applied_revisions() {
    // Flyway: baseline, a repeatable (no version), an undo, and a re-apply.
    let flyway = rows(&[
        (Some("1"), STATE_APPLIED),
        (Some("1.1"), STATE_APPLIED),
        (None, STATE_IGNORED),
        (Some("2"), STATE_APPLIED),
        (Some("2"), STATE_REMOVED),
        (Some("3"), STATE_APPLIED),
        (Some("2"), STATE_APPLIED),
    ]);
    let applied = tools::collect_revisions(TrackingTool::Flyway, flyway).unwrap();
    assert_eq!(applied, history(&["1", "1.1", "3", "2"]));

    let alembic = rows(&[
        (Some("ae1027a6acf"), STATE_APPLIED),
        (Some("b2"), STATE_APPLIED),
    ]);
    let applied = tools::collect_revisions(TrackingTool::Alembic, alembic).unwrap();
    assert_eq!(applied, heads(&["ae1027a6acf", "b2"]));

    let dirty = rows(&[(Some("20251228120000"), STATE_FAILED)]);
    let error = tools::collect_revisions(TrackingTool::GolangMigrate, dirty).unwrap_err();
    assert_eq!(error.reason(), "MigrationDirty");
    let message = error.to_string();
    assert!(
        message.contains("golang-migrate recorded revision 20251228120000"),
        "{message}"
    );
    assert!(message.contains("migrate force"), "{message}");
}

#[test]
fn every_tool_has_a_query_and_a_default_table() {
    for tool in TrackingTool::ALL {
        for (engine, dialect) in [
            (Engine::Postgres, tools::Dialect::Postgres),
            (Engine::Mysql, tools::Dialect::Mysql),
        ] {
            assert!(!tools::default_tables(tool, engine).is_empty());
            let select = tools::select_revisions(tool, dialect, "\"t\"");
            assert!(select.starts_with("SELECT CAST(") || select.starts_with("SELECT COALESCE("));
            assert!(select.contains("FROM \"t\""), "{select}");
        }
    }
    assert!(tools::is_head_only(TrackingTool::Alembic));
    assert!(tools::is_head_only(TrackingTool::GolangMigrate));
    assert!(!tools::is_head_only(TrackingTool::Flyway));
}

#[test]
fn identity_names_the_server_and_database_without_credentials() {
    let identity = |url: &str, namespace: &str| {
        url::DatabaseUrl::parse(url)
            .expect("valid URL")
            .identity(namespace)
    };
    let shop = "postgres://db.shop:5432/app";
    // Every spelling of one Service, any user, options and SQLAlchemy driver.
    for url in [
        "postgres://app:pw@db:5432/app",
        "postgresql+psycopg2://other:pw2@db.shop/app?sslmode=require",
        "postgres://app@db.shop.svc:5432/app",
        "postgres://app:pw@DB.shop.svc.cluster.local.:5432/app",
    ] {
        assert_eq!(identity(url, "shop"), shop, "{url}");
        assert!(!identity(url, "shop").contains("pw"));
    }
    // The same short name in another namespace is another Service.
    assert_eq!(
        identity("postgres://app:pw@db/app", "billing"),
        "postgres://db.billing:5432/app"
    );
    // A name written with its namespace is the same from any namespace.
    assert_eq!(identity("postgres://app:pw@db.shop/app", "billing"), shop);
    // Another database on the same server, another port, another engine: not the same.
    assert_ne!(identity("postgres://app:pw@db/other", "shop"), shop);
    assert_ne!(identity("postgres://app:pw@db:5433/app", "shop"), shop);
    assert_eq!(
        identity("mariadb://app:pw@db/app", "shop"),
        "mysql://db.shop:3306/app"
    );
    // PostgreSQL's default database is the user's name.
    assert_eq!(identity("postgres://app:pw@db.shop/", "x"), shop);
    assert_ne!(
        identity("postgres://alice:pw@db/", "shop"),
        identity("postgres://bob:pw@db/", "shop")
    );
    // Loopback is one server, whatever it is called; addresses and outside names stay.
    assert_eq!(
        identity("postgres://a:pw@127.0.0.1:5432/app", "x"),
        identity("postgres://b:pw@localhost/app", "y")
    );
    assert_eq!(
        identity("mysql://a:pw@[::1]:3306/app", "x"),
        "mysql://localhost:3306/app"
    );
    assert_eq!(
        identity("mysql://a:pw@10.0.0.7/app", "x"),
        "mysql://10.0.0.7:3306/app"
    );
    assert_eq!(
        identity("postgres://a:pw@db.example.com/app", "x"),
        "postgres://db.example.com:5432/app"
    );
}
