//! API types of schemagate. Every doc comment here becomes `kubectl explain` text.

use k8s_openapi::api::core::v1::{
    EnvVar, PodSecurityContext, ResourceRequirements, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every schemagate resource, label and annotation.
pub const GROUP: &str = "schemagate.dev";
/// Deployment label naming the DatabaseMigration whose revision it needs.
pub const MIGRATION_LABEL: &str = "schemagate.dev/migration";
/// Pod-template annotation naming the revision the Deployment's code needs.
pub const REVISION_ANNOTATION: &str = "schemagate.dev/revision";
/// Deployment annotation set while schemagate holds its rollout; the value is the revision awaited.
pub const HELD_FOR_ANNOTATION: &str = "schemagate.dev/held-for";
/// DatabaseMigration annotation: a new value starts a new attempt of a failed migration.
pub const RETRY_ANNOTATION: &str = "schemagate.dev/retry";
/// Deployment label set together with [`HELD_FOR_ANNOTATION`] while schemagate holds its
/// rollout. It lets the operator watch the Deployments it holds by label, so a hold is
/// released even after the Deployment left the gate (its opt-in label removed).
pub const HELD_LABEL: &str = "schemagate.dev/held";
/// Deployment annotation: when schemagate releases its hold, it leaves the Deployment
/// paused (a person resumes it with `kubectl rollout resume`). The way to say "keep it
/// paused after the release" on a Deployment that schemagate already holds.
pub const KEEP_PAUSED_ANNOTATION: &str = "schemagate.dev/keep-paused";

/// A database migration that must be applied before the code that needs it rolls out.
///
/// schemagate runs `spec.migrator` as a Job inside the cluster, then reads the applied
/// revision from the database itself. Deployments labelled
/// `schemagate.dev/migration: <name>` whose pod template carries the annotation
/// `schemagate.dev/revision` stay paused until that revision is in the database.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "schemagate.dev",
    version = "v1alpha1",
    kind = "DatabaseMigration",
    plural = "databasemigrations",
    shortname = "dbm",
    namespaced,
    status = "DatabaseMigrationStatus",
    doc = "A database migration run in the cluster and verified in the database; Deployments that need its revision are held until the database reports it.",
    printcolumn = r#"{"name":"Revision","type":"string","jsonPath":".spec.revision","description":"Revision the migrator brings the database to"}"#,
    printcolumn = r#"{"name":"Applied","type":"string","jsonPath":".status.appliedRevision","description":"Revision read from the database"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Pending, Running, Succeeded or Failed"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status","description":"Whether the database reports the revision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
// Migration Job names hash `migrator` and `database` as JSON (operator/src/migration/job.rs):
// a new field must be optional and skipped while unset (`skip_serializing_if`), or every
// Job is renamed on upgrade and a failed migration runs again without a retry.
pub struct DatabaseMigrationSpec {
    /// The database to migrate and how to read its applied revision.
    pub database: DatabaseSpec,
    /// The program that migrates the database, run as a Kubernetes Job.
    pub migrator: MigratorSpec,
    /// The revision the migrator brings the database to, as the migration tool records it
    /// (for Alembic the revision id in `alembic_version`, for Flyway the version, ...).
    #[schemars(length(min = 1))]
    pub revision: String,
    /// How often the applied revision is read again once Ready, to notice drift (a restore,
    /// a manual downgrade). A Go-style duration such as `30s`, `5m` or `1h`. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"))]
    pub drift_check_interval: Option<String>,
    /// When true, no new migration Job is started; the applied revision is still read and
    /// Deployments are still held or released by it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

/// Where the database is and how its migration tool records what is applied.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSpec {
    /// The database server's kind: `postgres`, or `mysql` (MySQL and MariaDB).
    pub engine: Engine,
    /// The Secret key holding the database URL, such as
    /// `postgres://user:password@host:5432/app`. The URL reaches the migrator only as the
    /// environment variable named by `migrator.urlEnvName`, and is never logged.
    pub url_secret_ref: SecretKeySelector,
    /// Which migration tool's version table holds the applied revisions.
    pub tracking: Tracking,
}

/// Database server kinds.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// PostgreSQL.
    Postgres,
    /// MySQL or MariaDB.
    Mysql,
}

/// A key of a Secret in the DatabaseMigration's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within the Secret. Default `url`.
    #[serde(default = "default_url_key")]
    pub key: String,
}

fn default_url_key() -> String {
    "url".to_string()
}

/// How the applied revision is read: a known tool's version table, or a query.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.tool) != has(self.query)",
    "message": "set exactly one of tracking.tool or tracking.query"
}]))]
pub struct Tracking {
    /// The migration tool whose version table is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<TrackingTool>,
    /// A read-only SQL query returning the applied revisions, one per row in the first
    /// column (text). Use it for tools not listed in `tool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The version table's name when the tool was configured with a non-default one
    /// (for example Flyway's `flyway.table`). Optionally schema-qualified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$"))]
    pub table: Option<String>,
}

/// Migration tools whose version tables schemagate reads.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
// To add a tool: a variant here (and in `ALL` and `name`), its table and query in
// operator/src/probe/tools.rs, its scheme in operator/src/revision.rs.
pub enum TrackingTool {
    /// Alembic: `alembic_version.version_num`, the current head(s).
    Alembic,
    /// Flyway: `flyway_schema_history`, versions with `success`.
    Flyway,
    /// golang-migrate: `schema_migrations.version`, the current head and its `dirty` flag.
    GolangMigrate,
    /// sqlx: `_sqlx_migrations.version` with `success`.
    Sqlx,
    /// Rails (Active Record): `schema_migrations.version`.
    Rails,
    /// Django: `django_migrations`, revisions as `app.name`.
    Django,
    /// Liquibase: `databasechangelog.id`.
    Liquibase,
    /// Prisma: `_prisma_migrations.migration_name`, finished and not rolled back.
    Prisma,
    /// Atlas: `atlas_schema_revisions.version`, fully applied.
    Atlas,
    /// schemagate's own table `schemagate_revisions(revision)`, for migrators without one.
    Schemagate,
}

impl TrackingTool {
    /// Every tool, in the order the docs list them: the one list the operator, its CLI and
    /// its messages use.
    pub const ALL: [TrackingTool; 10] = [
        TrackingTool::Alembic,
        TrackingTool::Flyway,
        TrackingTool::GolangMigrate,
        TrackingTool::Sqlx,
        TrackingTool::Rails,
        TrackingTool::Django,
        TrackingTool::Liquibase,
        TrackingTool::Prisma,
        TrackingTool::Atlas,
        TrackingTool::Schemagate,
    ];

    /// The name users write in `tracking.tool`.
    pub fn name(self) -> &'static str {
        match self {
            TrackingTool::Alembic => "alembic",
            TrackingTool::Flyway => "flyway",
            TrackingTool::GolangMigrate => "golang-migrate",
            TrackingTool::Sqlx => "sqlx",
            TrackingTool::Rails => "rails",
            TrackingTool::Django => "django",
            TrackingTool::Liquibase => "liquibase",
            TrackingTool::Prisma => "prisma",
            TrackingTool::Atlas => "atlas",
            TrackingTool::Schemagate => "schemagate",
        }
    }

    /// Every tool's name, comma-separated, for messages.
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl Engine {
    /// Every engine.
    pub const ALL: [Engine; 2] = [Engine::Postgres, Engine::Mysql];

    /// The name users write in `database.engine`.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
        }
    }
}

/// The migrator: a container run once as a Job for each new revision or spec.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigratorSpec {
    /// Container image holding the migration tool and the migrations, usually the
    /// application's own image at the version that needs the revision.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Entrypoint, such as `["alembic", "upgrade", "head"]`. The image's entrypoint when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment variables for the migrator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Name of the environment variable that carries the database URL. Default `DATABASE_URL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env_name: Option<String>,
    /// Compute resources of the migrator container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// ServiceAccount the migrator pod runs as. The namespace's default when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Retries of a failed migrator pod before the migration counts as failed. Default 0:
    /// a failed migration waits for a person (see the `schemagate.dev/retry` annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10))]
    pub backoff_limit: Option<i32>,
    /// Seconds the migration may run before it is stopped and counted as failed. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Container security context. The default meets the Pod Security Standard
    /// "restricted" (non-root, no privilege escalation, all capabilities dropped,
    /// RuntimeDefault seccomp); override it for images that must run as root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// Pod security context. Default: `runAsNonRoot: true` and RuntimeDefault seccomp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security_context: Option<PodSecurityContext>,
    /// Alembic only: the command, run from `image` without the database URL, that writes
    /// the revision graph of the image's migration scripts to `/dev/termination-log`
    /// (format: docs/probe.md). The default runs `python3` with a built-in script that
    /// reads the Alembic configuration the migrator's `-c`/`--config` names (else
    /// `$ALEMBIC_CONFIG`, else `alembic.ini`). Set it when the image has no `python3`
    /// that can import alembic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revision_graph_command: Vec<String>,
}

/// What schemagate observed of the migration.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseMigrationStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The revision the database reports as applied (its current head, or the spec's
    /// revision when the tool records many and that one is among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_revision: Option<String>,
    /// What the database's version table reports, in the tool's order: for tools that
    /// record every applied migration, the applied set (oldest first; only the newest 256
    /// when `appliedRevisionsTruncated`); for golang-migrate the current version; for
    /// Alembic the current head(s). Whether a Deployment's revision is applied is decided
    /// from this, and for Alembic from `revisionGraph` (docs/probe.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied_revisions: Vec<String>,
    /// A fingerprint of the `spec.database` the applied revisions were read with. When the
    /// spec names another database or tracking setting, they are not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_database: Option<String>,
    /// True when the database reported more applied revisions than `appliedRevisions`
    /// keeps. A Deployment needing a revision not listed is then held until the operator
    /// reads the database again itself; it is never released on a guess.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub applied_revisions_truncated: bool,
    /// Alembic only: the revision graph defined by the migration scripts in
    /// `spec.migrator.image`, read by a short Job from that image. A required revision is
    /// applied when it is a current head or an ancestor of one in this graph.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_graph: Option<RevisionGraphStatus>,
    /// Summary of the migration: Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Ready, Progressing, Failed and Drifted, after the Kubernetes condition conventions,
    /// and Reconciling and Stalled, which kstatus (Helm 4 `--wait`, Flux, kpt) reads.
    /// Reasons: RevisionApplied, MigrationRunning, JobCreated, JobRunning, Complete,
    /// Succeeded, MigrationFailed, RevisionNotApplied, Drifted, RevisionMissing, InSync,
    /// RevisionUndetermined, ReadingRevisionGraph, Suspended, WaitingForOtherMigration,
    /// InvalidSpec, and, while the database cannot be read, the error's reason (such as
    /// SecretNotFound, DatabaseUnreachable, DatabaseAuthenticationFailed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The migration Job of the current attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<MigrationJobStatus>,
    /// Deployments (names) in this namespace held until the revision they need is applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held_deployments: Vec<String>,
    /// The value of the `schemagate.dev/retry` annotation the current attempt answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_retry: Option<String>,
    /// Past attempts, newest first, at most 10.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
}

/// Summary phases of a DatabaseMigration.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Nothing runs yet: waiting for input (a Secret, the database) or for another migration.
    Pending,
    /// The migration Job runs.
    Running,
    /// The database reports the revision.
    Succeeded,
    /// The migration failed; see the Failed condition.
    Failed,
}

/// The migration Job of the current attempt.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationJobStatus {
    /// Name of the Job.
    pub name: String,
    /// When the Job started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the Job finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// How the Job ended: the reason, and the tail of the migrator's termination message
    /// with anything secret removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The revision graph of a migrator image (Alembic), as its revision-graph Job reported it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionGraphStatus {
    /// The Job that read the graph; a new image, command or retry gets a new one.
    pub job: String,
    /// The image the graph was read from.
    pub image: String,
    /// Revisions with their parents (down revisions), from the heads down. A revision with
    /// no parents is a base.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revisions: Vec<RevisionNode>,
    /// True when the graph was longer than its report may be (a termination message holds
    /// at most 4096 bytes): the oldest revisions are missing, and a Deployment needing one
    /// of them is held with a message that says so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Why the graph could not be read, when it could not; the migrator's output tail,
    /// secrets removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A newer revision-graph Job that failed, when the graph shown is an earlier good one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_job: Option<String>,
}

/// One revision of a revision graph.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionNode {
    /// The revision id.
    pub revision: String,
    /// Its parents (Alembic's `down_revision`): none for a base, several for a merge point.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<String>,
}

/// One finished attempt.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// The revision the attempt was to apply.
    pub revision: String,
    /// The Job that ran it; empty when the database already had the revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// When the attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// When the attempt ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// How the attempt ended.
    pub result: AttemptResult,
    /// What asked for the attempt: `spec` (generation N) or `retry` (the annotation's value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_by: Option<String>,
    /// The fingerprint of the `spec.database` the attempt applied the revision to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
}

/// How an attempt ended.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AttemptResult {
    /// The migration Job ran and the database reports the revision.
    Succeeded,
    /// The database already reported the revision: no Job was needed.
    Adopted,
    /// The Job failed, or completed without the database reporting the revision.
    Failed,
}

/// The CustomResourceDefinition to install: the derived one, with one addition the derive
/// cannot express. `status` defaults to `{observedGeneration: 0}`, so a DatabaseMigration the
/// operator has not looked at yet reads as "not yet observed" (generation 1 ≠ 0) to kstatus,
/// Helm 4 `--wait` and Argo CD, rather than as done.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON;
    use kube::CustomResourceExt;
    let mut crd = DatabaseMigration::crd();
    for version in &mut crd.spec.versions {
        let status = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("status"));
        if let Some(status) = status {
            status.default = Some(JSON(serde_json::json!({ "observedGeneration": 0 })));
        }
    }
    crd
}

/// The standard condition types of a DatabaseMigration.
pub mod condition {
    /// The database reports the revision; Deployments needing it are released.
    pub const READY: &str = "Ready";
    /// A migration is under way.
    pub const PROGRESSING: &str = "Progressing";
    /// The last attempt failed.
    pub const FAILED: &str = "Failed";
    /// The database no longer reports a revision it reported before.
    pub const DRIFTED: &str = "Drifted";
    /// kstatus: work is under way (a Job runs, the graph is read, the database is retried).
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: nothing more happens without a person (a failed migration, drift, an
    /// invalid spec, a Secret or credentials to fix).
    pub const STALLED: &str = "Stalled";
}

/// Condition and Event reasons of a DatabaseMigration, in one place. Errors that stop a
/// reconcile carry their own reasons (`Error::reason` in the operator).
pub mod reason {
    /// Ready: the database reports the revision.
    pub const REVISION_APPLIED: &str = "RevisionApplied";
    /// Ready: the database already reported it; no Job was needed (Event).
    pub const REVISION_ADOPTED: &str = "RevisionAdopted";
    /// A migration Job was created.
    pub const JOB_CREATED: &str = "JobCreated";
    /// Progressing: the migration Job runs.
    pub const JOB_RUNNING: &str = "JobRunning";
    /// Ready and Failed while the migration Job runs.
    pub const MIGRATION_RUNNING: &str = "MigrationRunning";
    /// The migration Job succeeded and the database reports the revision (Event).
    pub const MIGRATION_SUCCEEDED: &str = "MigrationSucceeded";
    /// Progressing: done.
    pub const COMPLETE: &str = "Complete";
    /// Failed is False: the last attempt succeeded.
    pub const SUCCEEDED: &str = "Succeeded";
    /// The migration Job failed.
    pub const MIGRATION_FAILED: &str = "MigrationFailed";
    /// The migration Job was deleted before it finished: a failed attempt, never re-run
    /// on its own.
    pub const JOB_DELETED: &str = "JobDeleted";
    /// The migration Job's pod cannot start: its image cannot be pulled, its security
    /// context cannot be met, or the API server refuses the pod (Pod Security, a quota).
    pub const MIGRATOR_CANNOT_START: &str = "MigratorCannotStart";
    /// The API server refused to create the migration Job (an admission policy, a quota,
    /// an invalid field).
    pub const JOB_REJECTED: &str = "JobRejected";
    /// The migration Job completed, but the database does not report the revision.
    pub const REVISION_NOT_APPLIED: &str = "RevisionNotApplied";
    /// Ready: the database moved below a revision it reported before.
    pub const DRIFTED: &str = "Drifted";
    /// Drifted: the revision is missing.
    pub const REVISION_MISSING: &str = "RevisionMissing";
    /// Drifted is False.
    pub const IN_SYNC: &str = "InSync";
    /// What the database reports cannot be placed against the revision (an Alembic head
    /// the image's revision graph does not contain).
    pub const REVISION_UNDETERMINED: &str = "RevisionUndetermined";
    /// Waiting for the revision graph of the migrator image.
    pub const READING_REVISION_GRAPH: &str = "ReadingRevisionGraph";
    /// The revision-graph Job failed (Event).
    pub const REVISION_GRAPH_FAILED: &str = "RevisionGraphFailed";
    /// `spec.suspend` is true.
    pub const SUSPENDED: &str = "Suspended";
    /// Another migration Job runs against the same database.
    pub const WAITING_FOR_OTHER_MIGRATION: &str = "WaitingForOtherMigration";
    /// The spec cannot be used as it is.
    pub const INVALID_SPEC: &str = "InvalidSpec";
}
