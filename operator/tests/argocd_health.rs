//! The Argo CD health check (examples/argocd/argocd-cm-health.yaml) run by a real Lua 5.1
//! interpreter (Argo CD embeds gopher-lua, a Lua 5.1) against the statuses the operator
//! writes for every outcome: Healthy, Progressing, Degraded (failed, drifted, stalled),
//! Suspended, and a status of an older generation.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step fails the test"
)]

use schemagate::error::Error;
use schemagate::migration::observe::{GraphJob, JobState, Observed, ObservedJob};
use schemagate::migration::{job, plan};
use schemagate::probe::AppliedRevisions;
use schemagate_crds::{DatabaseMigration, DatabaseMigrationStatus, RevisionGraphStatus};
use std::path::Path;

const MIGRATION: &str = r#"
apiVersion: schemagate.dev/v1alpha1
kind: DatabaseMigration
metadata: { name: app-db, namespace: prod, uid: 1b4e28ba-2fa1-11d2-883f-0016d3cca427, generation: 3 }
spec:
  database: { engine: postgres, urlSecretRef: { name: app-db-url, key: url }, tracking: { tool: alembic } }
  migrator: { image: "registry.example/app:v2", command: [alembic, upgrade, head] }
  revision: "0002"
"#;

/// The Lua of the health check, as Argo CD reads it from argocd-cm.
fn health_script() -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/argocd/argocd-cm-health.yaml");
    let config_map: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    config_map["data"]["resource.customizations.health.schemagate.dev_DatabaseMigration"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A JSON value as a Lua table constructor.
fn lua_value(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "nil".into(),
        serde_json::Value::Bool(b) => b.to_string(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => format!("{s:?}"),
        serde_json::Value::Array(items) => {
            format!(
                "{{{}}}",
                items.iter().map(lua_value).collect::<Vec<_>>().join(", ")
            )
        }
        serde_json::Value::Object(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(k, v)| format!("[{k:?}] = {}", lua_value(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs the health check on the object; returns (status, message).
fn health(object: &DatabaseMigration) -> (String, String) {
    let object = serde_json::to_value(object).unwrap();
    let program = format!(
        "local obj = {}\nlocal function check(obj)\n{}\nend\nlocal hs = check(obj)\nio.write(hs.status, \"\\n\", hs.message or \"\", \"\\n\")\n",
        lua_value(&object),
        health_script()
    );
    let output = std::process::Command::new("lua5.1")
        .arg("-e")
        .arg(&program)
        .output()
        .expect("running lua5.1 (Debian package lua5.1, installed by make prerequisites)");
    assert!(
        output.status.success(),
        "the health check failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let mut lines = text.lines();
    (
        lines.next().unwrap_or_default().to_string(),
        lines.next().unwrap_or_default().to_string(),
    )
}

fn heads(revisions: &[&str]) -> AppliedRevisions {
    AppliedRevisions {
        revisions: revisions.iter().map(|r| r.to_string()).collect(),
        head_only: true,
    }
}

fn observed(database: Result<AppliedRevisions, Error>, job: Option<ObservedJob>) -> Observed {
    Observed {
        job,
        database_key: "k".into(),
        other_active_job: None,
        stuck_earlier_job: None,
        database,
        held_deployments: vec![],
        graph_job: GraphJob::NotNeeded,
        read_at: None,
    }
}

fn at(migration: &DatabaseMigration, status: DatabaseMigrationStatus) -> DatabaseMigration {
    DatabaseMigration {
        status: Some(status),
        ..migration.clone()
    }
}

fn now() -> k8s_openapi::jiff::Timestamp {
    "2026-11-24T10:00:00Z".parse().unwrap()
}

#[test]
fn argo_cd_health_for_every_outcome() {
    let mut migration: DatabaseMigration = serde_yaml::from_str(MIGRATION).unwrap();
    let graph = schemagate::revision::Graph::parse_report(&format!(
        "{}\n0002\n0001 -\n",
        schemagate::revision::GRAPH_REPORT_HEADER
    ))
    .unwrap();
    migration.status = Some(DatabaseMigrationStatus {
        revision_graph: Some(RevisionGraphStatus {
            job: job::graph_job_name(&migration),
            image: "registry.example/app:v2".into(),
            revisions: graph.nodes(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let job_named = |state| ObservedJob {
        name: job::job_name(&migration),
        state,
        start_time: None,
        completion_time: None,
        message: Some("sqlalchemy.exc.ProgrammingError: type \"integr\" does not exist".into()),
        blocked: None,
        pod_running: true,
    };

    // No status yet, and the CRD's default status: the operator has not looked.
    let mut fresh = migration.clone();
    fresh.status = None;
    assert_eq!(health(&fresh).0, "Progressing");
    let defaulted = at(
        &migration,
        DatabaseMigrationStatus {
            observed_generation: Some(0),
            ..Default::default()
        },
    );
    assert_eq!(health(&defaulted).0, "Progressing");

    let ready = plan::plan(&migration, observed(Ok(heads(&["0002"])), None), now());
    let ready_object = at(&migration, ready.status.clone());
    assert_eq!(
        health(&ready_object),
        (
            "Healthy".into(),
            "the database reports revision 0002".into()
        )
    );

    let running = plan::plan(
        &migration,
        observed(Ok(heads(&["0001"])), Some(job_named(JobState::Active))),
        now(),
    );
    let (status, message) = health(&at(&migration, running.status));
    assert_eq!(status, "Progressing");
    assert!(message.contains("is running"), "{message}");

    let mut blocked_job = job_named(JobState::Active);
    blocked_job.pod_running = false;
    blocked_job.blocked = Some("pod app-db-1: ImagePullBackOff: Back-off pulling image".into());
    let blocked = plan::plan(
        &migration,
        observed(Ok(heads(&["0001"])), Some(blocked_job)),
        now(),
    );
    let (status, message) = health(&at(&migration, blocked.status));
    assert_eq!(status, "Degraded", "a pod that cannot start needs a person");
    assert!(message.contains("ImagePullBackOff"), "{message}");

    let failed = plan::plan(
        &migration,
        observed(
            Ok(heads(&["0001"])),
            Some(job_named(JobState::Failed {
                reason: "BackoffLimitExceeded".into(),
            })),
        ),
        now(),
    );
    let (status, message) = health(&at(&migration, failed.status.clone()));
    assert_eq!(status, "Degraded");
    assert!(
        message.contains("integr"),
        "the migrator's error: {message}"
    );

    let drifted = plan::plan(&ready_object, observed(Ok(heads(&["0001"])), None), now());
    let (status, message) = health(&at(&migration, drifted.status));
    assert_eq!(status, "Degraded", "drift needs a person");
    assert!(message.contains("below revision 0002"), "{message}");

    let missing_secret = plan::plan(
        &migration,
        observed(
            Err(Error::SecretNotFound {
                namespace: "prod".into(),
                name: "app-db-url".into(),
                key: "url".into(),
            }),
            None,
        ),
        now(),
    );
    let (status, message) = health(&at(&migration, missing_secret.status));
    assert_eq!(status, "Degraded");
    assert!(message.contains("app-db-url"), "{message}");

    let mut suspended = migration.clone();
    suspended.spec.suspend = true;
    let plan_suspended = plan::plan(&suspended, observed(Ok(heads(&["0001"])), None), now());
    assert_eq!(
        health(&at(&suspended, plan_suspended.status)).0,
        "Suspended"
    );

    // The status of an older generation, even a failed one, says nothing of the new spec.
    let mut edited = at(&migration, failed.status);
    edited.metadata.generation = Some(4);
    let (status, message) = health(&edited);
    assert_eq!(status, "Progressing");
    assert!(message.contains("generation 4"), "{message}");
}
