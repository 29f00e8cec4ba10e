//! The migration Job: its deterministic name and its spec, built from the resource alone.

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    SeccompProfile, SecretKeySelector, SecurityContext,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use schemagate_crds::{
    DatabaseMigration, MigratorSpec, RETRY_ANNOTATION, REVISION_ANNOTATION, TrackingTool,
};
use std::collections::BTreeMap;

/// Label on every Job and pod schemagate creates, for label-scoped watches.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "schemagate";
/// Label naming the DatabaseMigration a Job belongs to.
pub const OWNER_LABEL: &str = "schemagate.dev/owner";
/// Label identifying the database (a hash of its server and name, see [`database_key`]),
/// so that only one migration Job runs at a time against one database, in any namespace.
pub const DATABASE_LABEL: &str = "schemagate.dev/database";
/// Annotation on the Job saying what asked for this attempt.
pub const REQUESTED_BY_ANNOTATION: &str = "schemagate.dev/requested-by";
/// Default environment variable carrying the database URL.
pub const DEFAULT_URL_ENV: &str = "DATABASE_URL";
/// Default deadline of one migration.
pub const DEFAULT_ACTIVE_DEADLINE_SECONDS: i64 = 600;
const CONTAINER_NAME: &str = "migrate";
/// The container of a revision-graph Job.
pub const GRAPH_CONTAINER_NAME: &str = "revision-graph";
/// Label saying what a Job schemagate made is for: `migration` or `revision-graph`.
pub const PURPOSE_LABEL: &str = "schemagate.dev/purpose";
/// How long a revision-graph Job may run.
const GRAPH_DEADLINE_SECONDS: i64 = 120;
/// A finished revision-graph Job is removed after this long: its report is in the status.
const GRAPH_TTL_SECONDS: i32 = 600;
/// A finished migration Job (and its pod, with the migrator's output) is removed after a
/// week: long enough to read what it did, short enough that Jobs do not pile up. The
/// status and its history keep the outcome; a later reconcile needs nothing of the Job.
pub const MIGRATION_TTL_SECONDS: i32 = 7 * 24 * 3600;

/// FNV-1a: stable across Rust releases and platforms, unlike `DefaultHasher`, so Job names
/// survive operator upgrades.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The identity of one attempt: everything that, when changed, calls for a new Job. It
/// hashes the spec's JSON, in which every optional field is left out while unset, so a new
/// optional field keeps the names of existing Jobs (pinned by a test).
pub fn attempt_key(migration: &DatabaseMigration) -> String {
    let spec = &migration.spec;
    // The graph command reads, never migrates: changing it is no new migration attempt.
    let migrator = MigratorSpec {
        revision_graph_command: Vec::new(),
        ..spec.migrator.clone()
    };
    let migrator = serde_json::to_string(&migrator).unwrap_or_default();
    let database = serde_json::to_string(&spec.database).unwrap_or_default();
    let retry = retry_token(migration).unwrap_or_default();
    format!(
        "{:016x}",
        fnv1a(&[&spec.revision, &migrator, &database, &retry])
    )
}

/// The value of the retry annotation, if any.
pub fn retry_token(migration: &DatabaseMigration) -> Option<String> {
    migration.annotations().get(RETRY_ANNOTATION).cloned()
}

/// Deterministic Job name for the current attempt: `<name>-<10 hex>`, at most 63 characters
/// (Job names become pod labels).
pub fn job_name(migration: &DatabaseMigration) -> String {
    let name = migration.name_any();
    let prefix: String = name.chars().take(52).collect();
    let prefix = prefix.trim_end_matches('-');
    format!("{prefix}-{}", &attempt_key(migration)[..10])
}

/// A fingerprint of `spec.database` (engine, Secret reference, tracking): revisions read
/// under another fingerprint say nothing about the database the spec names now.
pub fn database_fingerprint(migration: &DatabaseMigration) -> String {
    let database = serde_json::to_string(&migration.spec.database).unwrap_or_default();
    format!("{:016x}", fnv1a(&[&database]))
}

/// Label value identifying the database a migration runs against, the same from every
/// namespace: a hash of the URL's identity (engine, server, port, database; no
/// credentials). While the URL cannot be read or parsed no Job starts, and the key falls
/// back to the Secret reference within the namespace.
pub fn database_key(migration: &DatabaseMigration, url: Option<&str>) -> String {
    let namespace = migration.namespace().unwrap_or_default();
    match url.and_then(|url| crate::probe::DatabaseUrl::parse(url).ok()) {
        Some(url) => format!("{:016x}", fnv1a(&[&url.identity(&namespace)])),
        None => {
            let secret = &migration.spec.database.url_secret_ref;
            format!(
                "{:016x}",
                fnv1a(&["secret", &namespace, &secret.name, &secret.key])
            )
        }
    }
}

/// The database label of Jobs made by earlier builds, before migrations took turns across
/// namespaces: a hash of the URL Secret's name and key, meaningful within one namespace.
pub fn legacy_database_key(migration: &DatabaseMigration) -> String {
    let secret = &migration.spec.database.url_secret_ref;
    format!("{:016x}", fnv1a(&[&secret.name, &secret.key]))
}

/// What asked for the current attempt, for the history: the retry annotation or the spec.
pub fn requested_by(migration: &DatabaseMigration) -> String {
    match retry_token(migration) {
        Some(token) => format!("retry {token}"),
        None => format!(
            "spec generation {}",
            migration.metadata.generation.unwrap_or(0)
        ),
    }
}

/// The migration Job: one container running the migrator, the database URL only through a
/// `secretKeyRef`, Pod Security Standard "restricted" unless the resource overrides it.
/// `database_key` labels it with the database it runs against.
pub fn build_job(migration: &DatabaseMigration, database_key: &str) -> Job {
    let spec = &migration.spec;
    let migrator = &spec.migrator;
    let url_env = migrator
        .url_env_name
        .clone()
        .unwrap_or_else(|| DEFAULT_URL_ENV.to_string());
    let mut env = vec![EnvVar {
        name: url_env.clone(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: spec.database.url_secret_ref.name.clone(),
                key: spec.database.url_secret_ref.key.clone(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    env.extend(migrator.env.iter().filter(|e| e.name != url_env).cloned());

    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (OWNER_LABEL.to_string(), migration.name_any()),
        (DATABASE_LABEL.to_string(), database_key.to_string()),
        (PURPOSE_LABEL.to_string(), "migration".to_string()),
    ]);
    let annotations = BTreeMap::from([
        (REVISION_ANNOTATION.to_string(), spec.revision.clone()),
        (REQUESTED_BY_ANNOTATION.to_string(), requested_by(migration)),
    ]);
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(migration)),
            namespace: migration.namespace(),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            owner_references: migration.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(migrator.backoff_limit.unwrap_or(0)),
            active_deadline_seconds: Some(
                migrator
                    .active_deadline_seconds
                    .unwrap_or(DEFAULT_ACTIVE_DEADLINE_SECONDS),
            ),
            ttl_seconds_after_finished: Some(MIGRATION_TTL_SECONDS),
            template: migrator_pod(
                migrator,
                ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                },
                Container {
                    name: CONTAINER_NAME.to_string(),
                    command: non_empty(&migrator.command),
                    args: non_empty(&migrator.args),
                    env: Some(env),
                    ..Default::default()
                },
            ),
            ..Default::default()
        }),
        status: None,
    }
}

/// The container and pod security contexts of the migrator: Pod Security Standard
/// "restricted" unless the resource overrides them.
fn security(migrator: &MigratorSpec) -> (SecurityContext, PodSecurityContext) {
    let container = migrator
        .security_context
        .clone()
        .unwrap_or_else(|| SecurityContext {
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                ..Default::default()
            }),
            run_as_non_root: Some(true),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..Default::default()
        });
    let pod = migrator
        .pod_security_context
        .clone()
        .unwrap_or_else(|| PodSecurityContext {
            run_as_non_root: Some(true),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..Default::default()
        });
    (container, pod)
}

/// The pod of a Job of this migration: the migrator's image, ServiceAccount, resources and
/// security contexts, no API token (it talks to the database, not to Kubernetes), never
/// restarted, and a failing container's last output as its termination message.
fn migrator_pod(
    migrator: &MigratorSpec,
    metadata: ObjectMeta,
    container: Container,
) -> PodTemplateSpec {
    let (container_security, pod_security) = security(migrator);
    PodTemplateSpec {
        metadata: Some(metadata),
        spec: Some(PodSpec {
            restart_policy: Some("Never".to_string()),
            service_account_name: migrator.service_account_name.clone(),
            automount_service_account_token: Some(false),
            security_context: Some(pod_security),
            containers: vec![Container {
                image: Some(migrator.image.clone()),
                resources: migrator.resources.clone(),
                security_context: Some(container_security),
                termination_message_policy: Some("FallbackToLogsOnError".to_string()),
                ..container
            }],
            ..Default::default()
        }),
    }
}

/// Whether this migration's tool needs the revision graph of the migrator image.
pub fn needs_revision_graph(migration: &DatabaseMigration) -> bool {
    migration.spec.database.tracking.tool == Some(TrackingTool::Alembic)
}

/// Deterministic name of the revision-graph Job of the current image, command and retry:
/// `<name>-graph-<10 hex>`, at most 63 characters.
pub fn graph_job_name(migration: &DatabaseMigration) -> String {
    let command = revision_graph_command(&migration.spec.migrator).join("\u{0}");
    let retry = retry_token(migration).unwrap_or_default();
    let key = fnv1a(&[&migration.spec.migrator.image, &command, &retry]);
    let name = migration.name_any();
    let prefix: String = name.chars().take(46).collect();
    let prefix = prefix.trim_end_matches('-');
    format!("{prefix}-graph-{}", &format!("{key:016x}")[..10])
}

/// The command that reports the revision graph: the resource's own, or `python3` with the
/// built-in script and the Alembic configuration the migrator's command names.
pub fn revision_graph_command(migrator: &MigratorSpec) -> Vec<String> {
    if !migrator.revision_graph_command.is_empty() {
        return migrator.revision_graph_command.clone();
    }
    let words: Vec<&str> = migrator
        .command
        .iter()
        .chain(&migrator.args)
        .map(String::as_str)
        .collect();
    // Options count only after the alembic command itself (`alembic`, a path to it, or
    // `python -m alembic`): `sh -c` or `python -c` before it mean something else.
    let start = words
        .iter()
        .position(|w| *w == "alembic" || w.ends_with("/alembic"))
        .map_or(words.len(), |i| i + 1);
    let words = &words[start..];
    let option = |short: &str, long: &str| -> String {
        let long_eq = format!("{long}=");
        words
            .iter()
            .enumerate()
            .find_map(|(i, word)| {
                if *word == short || *word == long {
                    words.get(i + 1).map(|v| v.to_string())
                } else {
                    word.strip_prefix(long_eq.as_str()).map(str::to_string)
                }
            })
            .unwrap_or_default()
    };
    vec![
        "python3".to_string(),
        "-c".to_string(),
        crate::revision::ALEMBIC_GRAPH_SCRIPT.to_string(),
        option("-c", "--config"),
        option("-n", "--name"),
    ]
}

/// The revision-graph Job: the migrator image runs the graph command, with the migrator's
/// own environment but never the database URL, and writes the graph of its migration
/// scripts as its termination message. It reads files only.
pub fn build_graph_job(migration: &DatabaseMigration) -> Job {
    let migrator = &migration.spec.migrator;
    let url_env = migrator
        .url_env_name
        .clone()
        .unwrap_or_else(|| DEFAULT_URL_ENV.to_string());
    let env: Vec<EnvVar> = migrator
        .env
        .iter()
        .filter(|e| e.name != url_env)
        .cloned()
        .collect();
    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (OWNER_LABEL.to_string(), migration.name_any()),
        (PURPOSE_LABEL.to_string(), "revision-graph".to_string()),
    ]);
    let command = revision_graph_command(migrator);
    Job {
        metadata: ObjectMeta {
            name: Some(graph_job_name(migration)),
            namespace: migration.namespace(),
            labels: Some(labels.clone()),
            owner_references: migration.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(GRAPH_DEADLINE_SECONDS),
            ttl_seconds_after_finished: Some(GRAPH_TTL_SECONDS),
            template: migrator_pod(
                migrator,
                ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                },
                Container {
                    name: GRAPH_CONTAINER_NAME.to_string(),
                    command: Some(command),
                    env: non_empty(&env),
                    termination_message_path: Some("/dev/termination-log".to_string()),
                    ..Default::default()
                },
            ),
            ..Default::default()
        }),
        status: None,
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_string(),
        ..Default::default()
    }
}

fn non_empty<T: Clone>(items: &[T]) -> Option<Vec<T>> {
    (!items.is_empty()).then(|| items.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{MIGRATION, migration_from_yaml};

    #[test]
    fn job_name_is_deterministic_and_changes_with_revision_and_retry() {
        let migration = migration_from_yaml(MIGRATION);
        assert_eq!(job_name(&migration), job_name(&migration.clone()));
        assert!(job_name(&migration).starts_with("app-db-"));
        assert_eq!(job_name(&migration).len(), "app-db-".len() + 10);

        let mut other_revision = migration.clone();
        other_revision.spec.revision = "0003".into();
        assert_ne!(job_name(&migration), job_name(&other_revision));

        let mut retried = migration.clone();
        retried
            .annotations_mut()
            .insert(RETRY_ANNOTATION.into(), "1".into());
        assert_ne!(job_name(&migration), job_name(&retried));
    }

    /// Job names must survive operator upgrades: a renamed Job is a new attempt, which
    /// would re-run a failed migration nobody asked to retry. Changing these literals is a
    /// breaking change; see the note on `DatabaseMigrationSpec` about new fields.
    #[test]
    fn finished_jobs_do_not_pile_up() {
        let migration = migration_from_yaml(MIGRATION);
        let spec = build_job(&migration, "k").spec.unwrap();
        assert_eq!(spec.ttl_seconds_after_finished, Some(MIGRATION_TTL_SECONDS));
        let graph = build_graph_job(&migration).spec.unwrap();
        assert!(graph.ttl_seconds_after_finished.is_some());
    }

    #[test]
    fn job_names_of_a_fixture_are_pinned() {
        let migration = migration_from_yaml(MIGRATION);
        assert_eq!(job_name(&migration), "app-db-8880bcfaad");
        // The graph Job's name follows its command, the built-in script included: a new
        // script reads the graph again, which is harmless (it only reads).
        assert_eq!(graph_job_name(&migration), "app-db-graph-ec6ff8270e");
    }

    #[test]
    fn long_names_stay_within_a_label_value() {
        let mut migration = migration_from_yaml(MIGRATION);
        migration.metadata.name = Some("a".repeat(253));
        assert!(job_name(&migration).len() <= 63);
    }

    #[test]
    fn url_only_from_secret_and_restricted_by_default() {
        let job = build_job(&migration_from_yaml(MIGRATION), "k");
        let pod = job.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        let env = container.env.as_ref().unwrap();
        let url: Vec<_> = env.iter().filter(|e| e.name == "DATABASE_URL").collect();
        assert_eq!(
            url.len(),
            1,
            "a literal DATABASE_URL must not override the Secret"
        );
        assert!(url[0].value.is_none());
        let secret = url[0]
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("app-db-url", "url")
        );
        assert!(env.iter().any(|e| e.name == "LOG"));

        let security = container.security_context.as_ref().unwrap();
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(security.run_as_non_root, Some(true));
        assert_eq!(
            security.capabilities.as_ref().unwrap().drop,
            Some(vec!["ALL".to_string()])
        );
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(
            container.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
    }

    #[test]
    fn graph_job_reads_the_image_without_the_database_url() {
        let migration = migration_from_yaml(MIGRATION);
        let job = build_graph_job(&migration);
        assert_eq!(job.metadata.name, Some(graph_job_name(&migration)));
        assert!(graph_job_name(&migration).starts_with("app-db-graph-"));
        let pod = job.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("registry.example/app:4515ca8")
        );
        let env = container.env.as_ref().unwrap();
        assert!(env.iter().all(|e| e.name != "DATABASE_URL"), "{env:?}");
        let labels = job.metadata.labels.unwrap();
        assert!(!labels.contains_key(DATABASE_LABEL));
        let command = container.command.as_ref().unwrap();
        assert_eq!(command[0], "python3");
        assert_eq!(&command[3..], ["", ""]);
    }

    #[test]
    fn graph_command_follows_the_migrators_alembic_config() {
        let mut migration = migration_from_yaml(MIGRATION);
        migration.spec.migrator.command = vec!["alembic".into()];
        migration.spec.migrator.args = [
            "-c",
            "deploy/alembic.ini",
            "--name=tenants",
            "upgrade",
            "head",
        ]
        .map(String::from)
        .to_vec();
        let command = revision_graph_command(&migration.spec.migrator);
        assert_eq!(&command[3..], ["deploy/alembic.ini", "tenants"]);
        // A shell's -c is not alembic's.
        migration.spec.migrator.command = ["sh", "-c"].map(String::from).to_vec();
        migration.spec.migrator.args = vec!["alembic -c x.ini upgrade head".into()];
        assert_eq!(
            &revision_graph_command(&migration.spec.migrator)[3..],
            ["", ""]
        );
        migration.spec.migrator.command = ["python3", "-m", "alembic", "-c", "a.ini"]
            .map(String::from)
            .to_vec();
        migration.spec.migrator.args = vec!["upgrade".into(), "head".into()];
        assert_eq!(
            &revision_graph_command(&migration.spec.migrator)[3..],
            ["a.ini", ""]
        );
        let before = job_name(&migration);
        let graph_before = graph_job_name(&migration);
        migration.spec.migrator.revision_graph_command = vec!["report-graph".into()];
        assert_eq!(
            revision_graph_command(&migration.spec.migrator),
            ["report-graph"]
        );
        assert_eq!(job_name(&migration), before, "no new migration attempt");
        assert_ne!(graph_job_name(&migration), graph_before);
        migration.metadata.name = Some("a".repeat(253));
        assert!(graph_job_name(&migration).len() <= 63);
    }

    #[test]
    fn owned_by_the_migration() {
        let job = build_job(&migration_from_yaml(MIGRATION), "k");
        let owners = job.metadata.owner_references.unwrap();
        assert_eq!(owners[0].kind, "DatabaseMigration");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(job.spec.unwrap().backoff_limit, Some(0));
    }
}
