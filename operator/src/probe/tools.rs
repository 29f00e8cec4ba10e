//! What each migration tool records, and the one query per tool that reads it.
//!
//! Every query returns rows of `(revision, state)`: the revision as text (numeric versions
//! are cast, so `20251228120000` reads the same on every engine) and one of the `STATE_*`
//! words, computed in SQL so both engines' boolean and timestamp types are read alike.

use schemagate_crds::{Engine, TrackingTool};

use super::{AppliedRevisions, ProbeError};

/// The row counts as applied (moved to the end when seen again, e.g. after an undo).
pub(crate) const STATE_APPLIED: &str = "applied";
/// The row records a failed or half-applied migration.
pub(crate) const STATE_FAILED: &str = "failed";
/// The row undoes an earlier one (Flyway undo and delete markers).
pub(crate) const STATE_REMOVED: &str = "removed";
/// The row is bookkeeping, not a revision (rolled-back Prisma attempts, Flyway markers).
pub(crate) const STATE_IGNORED: &str = "ignored";

/// The SQL flavour of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    Mysql,
}

impl Dialect {
    /// Quotes an identifier read from the catalog, doubling any quote character in it.
    pub(crate) fn quote(self, identifier: &str) -> String {
        match self {
            Self::Postgres => format!("\"{}\"", identifier.replace('"', "\"\"")),
            Self::Mysql => format!("`{}`", identifier.replace('`', "``")),
        }
    }

    /// The type a `CAST(... AS ...)` to text names.
    fn text(self) -> &'static str {
        match self {
            Self::Postgres => "TEXT",
            Self::Mysql => "CHAR",
        }
    }
}

/// A table name as `tracking.table` gives it: `TABLE` or `SCHEMA.TABLE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TableName {
    pub(crate) schema: Option<String>,
    pub(crate) name: String,
}

/// Longest identifier both engines accept (PostgreSQL's NAMEDATALEN - 1).
const MAX_IDENTIFIER_LEN: usize = 63;

impl TableName {
    /// Accepts `TABLE` or `SCHEMA.TABLE`, each a letter or `_` followed by letters, digits,
    /// `_` or `$`, at most 63 characters: the CRD's pattern, checked again because the name
    /// ends up in SQL.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (schema, name) = match text.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, text),
        };
        let valid = |part: &str| {
            let mut chars = part.chars();
            part.len() <= MAX_IDENTIFIER_LEN
                && chars
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        };
        if !valid(name) || !schema.is_none_or(valid) {
            return None;
        }
        Some(Self {
            schema: schema.map(str::to_string),
            name: name.to_string(),
        })
    }

    fn unqualified(name: &str) -> Self {
        Self {
            schema: None,
            name: name.to_string(),
        }
    }

    fn qualified(schema: &str, name: &str) -> Self {
        Self {
            schema: Some(schema.to_string()),
            name: name.to_string(),
        }
    }
}

/// Tools that keep only the current head(s), not a history.
pub(crate) fn is_head_only(tool: TrackingTool) -> bool {
    matches!(tool, TrackingTool::Alembic | TrackingTool::GolangMigrate)
}

/// Where the tool puts its table by default, most likely first. Unqualified names are
/// looked up along the connection's search path (PostgreSQL) or in its database (MySQL).
pub(crate) fn default_tables(tool: TrackingTool, engine: Engine) -> Vec<TableName> {
    let name = match tool {
        TrackingTool::Alembic => "alembic_version",
        TrackingTool::Flyway => "flyway_schema_history",
        TrackingTool::GolangMigrate | TrackingTool::Rails => "schema_migrations",
        TrackingTool::Sqlx => "_sqlx_migrations",
        TrackingTool::Django => "django_migrations",
        // Liquibase writes DATABASECHANGELOG on MySQL, where table names can be
        // case-sensitive.
        TrackingTool::Liquibase => {
            return vec![
                TableName::unqualified("databasechangelog"),
                TableName::unqualified("DATABASECHANGELOG"),
            ];
        }
        TrackingTool::Prisma => "_prisma_migrations",
        TrackingTool::Schemagate => "schemagate_revisions",
        // Atlas uses the URL's schema when it names one (always on MySQL, where the URL
        // names a database), else its own schema `atlas_schema_revisions`.
        TrackingTool::Atlas => {
            let own = TableName::qualified("atlas_schema_revisions", "atlas_schema_revisions");
            let in_url_schema = TableName::unqualified("atlas_schema_revisions");
            return match engine {
                Engine::Postgres => vec![own, in_url_schema],
                Engine::Mysql => vec![in_url_schema, own],
            };
        }
    };
    vec![TableName::unqualified(name)]
}

/// The query reading `(revision, state)` rows from the tool's table, oldest first.
/// `table` is already quoted by [`Dialect::quote`].
pub(crate) fn select_revisions(tool: TrackingTool, dialect: Dialect, table: &str) -> String {
    let text = dialect.text();
    match tool {
        TrackingTool::Alembic => format!(
            "SELECT CAST(version_num AS {text}), '{STATE_APPLIED}' FROM {table} \
             ORDER BY version_num"
        ),
        // Repeatable migrations have no version; a failed one still blocks Flyway, so it
        // is reported by its description.
        TrackingTool::Flyway => format!(
            "SELECT COALESCE(CAST(version AS {text}), CAST(description AS {text})), \
             CASE WHEN NOT success THEN '{STATE_FAILED}' \
                  WHEN type LIKE 'UNDO%' OR type = 'DELETE' THEN '{STATE_REMOVED}' \
                  WHEN version IS NULL OR type = 'SCHEMA' THEN '{STATE_IGNORED}' \
                  ELSE '{STATE_APPLIED}' END \
             FROM {table} ORDER BY installed_rank"
        ),
        TrackingTool::GolangMigrate => format!(
            "SELECT CAST(version AS {text}), \
             CASE WHEN dirty THEN '{STATE_FAILED}' ELSE '{STATE_APPLIED}' END \
             FROM {table} ORDER BY version"
        ),
        TrackingTool::Sqlx => format!(
            "SELECT CAST(version AS {text}), \
             CASE WHEN success THEN '{STATE_APPLIED}' ELSE '{STATE_FAILED}' END \
             FROM {table} ORDER BY version"
        ),
        TrackingTool::Rails => format!(
            "SELECT CAST(version AS {text}), '{STATE_APPLIED}' FROM {table} ORDER BY version"
        ),
        TrackingTool::Django => format!(
            "SELECT CAST(CONCAT(app, '.', name) AS {text}), '{STATE_APPLIED}' FROM {table} \
             ORDER BY id"
        ),
        // EXECTYPE FAILED marks a changeset with failOnError=false that did not apply.
        TrackingTool::Liquibase => format!(
            "SELECT CAST(id AS {text}), \
             CASE WHEN exectype = 'FAILED' THEN '{STATE_IGNORED}' ELSE '{STATE_APPLIED}' END \
             FROM {table} ORDER BY orderexecuted, dateexecuted"
        ),
        // A rolled-back attempt is history; an unfinished one that is not rolled back is
        // what `prisma migrate deploy` refuses to continue past (P3009).
        TrackingTool::Prisma => format!(
            "SELECT CAST(migration_name AS {text}), \
             CASE WHEN rolled_back_at IS NOT NULL THEN '{STATE_IGNORED}' \
                  WHEN finished_at IS NULL THEN '{STATE_FAILED}' \
                  ELSE '{STATE_APPLIED}' END \
             FROM {table} ORDER BY started_at, migration_name"
        ),
        TrackingTool::Atlas => format!(
            "SELECT CAST(version AS {text}), \
             CASE WHEN (error IS NOT NULL AND error <> '') OR applied < total \
                  THEN '{STATE_FAILED}' ELSE '{STATE_APPLIED}' END \
             FROM {table} ORDER BY version"
        ),
        TrackingTool::Schemagate => format!(
            "SELECT CAST(revision AS {text}), '{STATE_APPLIED}' FROM {table} \
             ORDER BY applied_at, revision"
        ),
    }
}

/// Folds `(revision, state)` rows, oldest first, into the applied revisions; a failed row
/// is an error naming the tool and the revision.
pub(crate) fn collect_revisions(
    tool: TrackingTool,
    rows: Vec<(Option<String>, String)>,
) -> Result<AppliedRevisions, ProbeError> {
    let mut revisions: Vec<String> = Vec::new();
    for (revision, state) in rows {
        match (state.as_str(), revision) {
            (STATE_FAILED, revision) => {
                return Err(ProbeError::Dirty {
                    tool: tool.name(),
                    revision: revision.unwrap_or_else(|| "(unnamed)".to_string()),
                    remedy: dirty_remedy(tool),
                });
            }
            (STATE_APPLIED, Some(revision)) => {
                revisions.retain(|r| *r != revision);
                revisions.push(revision);
            }
            (STATE_REMOVED, Some(revision)) => revisions.retain(|r| *r != revision),
            _ => {}
        }
    }
    Ok(AppliedRevisions {
        revisions,
        head_only: is_head_only(tool),
    })
}

/// What a person does about a failed migration, in the tool's own terms.
fn dirty_remedy(tool: TrackingTool) -> &'static str {
    match tool {
        TrackingTool::GolangMigrate => {
            "fix the schema by hand, then run `migrate force VERSION` with the last good version"
        }
        TrackingTool::Flyway => "fix the schema by hand, then run `flyway repair`",
        TrackingTool::Sqlx => {
            "fix the schema by hand, then delete the row with success = false from \
             _sqlx_migrations"
        }
        TrackingTool::Prisma => {
            "fix the schema by hand, then run `prisma migrate resolve --rolled-back NAME` \
             (or `--applied NAME`)"
        }
        TrackingTool::Atlas => {
            "fix the schema by hand, then run `atlas migrate set` or rerun the fixed file"
        }
        TrackingTool::Alembic
        | TrackingTool::Rails
        | TrackingTool::Django
        | TrackingTool::Liquibase
        | TrackingTool::Schemagate => "fix the schema by hand and correct the version table",
    }
}
