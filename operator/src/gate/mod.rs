//! The rollout gate: whether a Deployment's required revision is applied, and the change
//! (hold or release) that follows. The same decision serves the admission webhook, the
//! backstop controller and `schemagate check`.

pub mod backstop;
pub mod check;
pub mod undo;
pub mod webhook;
pub mod workload;

pub use workload::Workload;

use crate::probe::AppliedRevisions;
use crate::revision::{self, Answer, Applied, Graph, Scheme};
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use schemagate_crds::{
    DatabaseMigration, HELD_FOR_ANNOTATION, HELD_LABEL, KEEP_PAUSED_ANNOTATION, MIGRATION_LABEL,
    REVISION_ANNOTATION,
};

/// What a Deployment asks of the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// The DatabaseMigration named by the Deployment's label.
    pub migration: String,
    /// The revision named by its pod template's annotation.
    pub revision: String,
}

/// The requirement of an opted-in Deployment; `None` when it carries no label, or no
/// revision annotation on its pod template (nothing to wait for).
pub fn requirement<W: Workload>(workload: &W) -> Option<Requirement> {
    let migration = workload.labels().get(MIGRATION_LABEL)?.clone();
    let revision = workload
        .template_annotations()?
        .get(REVISION_ANNOTATION)?
        .clone();
    Some(Requirement {
        migration,
        revision,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The database reports the revision: the rollout may go on.
    Satisfied,
    /// Not (yet) applied, or not known to be; `message` says why, for Events and
    /// `schemagate check`.
    Held {
        reason: &'static str,
        message: String,
        /// Reading the database itself, rather than the status, may decide it (the status
        /// keeps only part of a long applied set).
        fresh_read_helps: bool,
    },
}

/// Whether `requirement` is met, judged from the DatabaseMigration's status alone: it
/// carries what the database last reported, so a decision takes no database round trip.
pub fn evaluate(
    migration: Option<&DeserializeGuard<DatabaseMigration>>,
    requirement: &Requirement,
) -> Verdict {
    evaluate_with(migration, requirement, None)
}

/// Like [`evaluate`], and when the status holds the workload, with what this replica read
/// from the database since, if the status does not say so yet
/// ([`crate::context::FreshReadings`]): a release need not wait for the status write.
pub fn evaluate_current(
    ctx: &crate::context::Context,
    migration: Option<&DeserializeGuard<DatabaseMigration>>,
    requirement: &Requirement,
) -> Verdict {
    let verdict = evaluate(migration, requirement);
    let (Verdict::Held { .. }, Some(Ok(found))) = (&verdict, migration.map(|guard| &guard.0))
    else {
        return verdict;
    };
    let key = crate::context::key_of(&found.namespace().unwrap_or_default(), &found.name_any());
    match ctx.fresh_readings.covering(
        &key,
        found.uid().as_deref(),
        &crate::migration::job::database_fingerprint(found),
        found.resource_version().as_deref(),
    ) {
        Some(fresh) => evaluate_with(migration, requirement, Some(&fresh)),
        None => verdict,
    }
}

/// Like [`evaluate`], with what the database reports now (`fresh`) in place of the
/// revisions the status keeps.
pub fn evaluate_with(
    migration: Option<&DeserializeGuard<DatabaseMigration>>,
    requirement: &Requirement,
    fresh: Option<&AppliedRevisions>,
) -> Verdict {
    let Requirement {
        migration: name,
        revision,
    } = requirement;
    let migration = match migration.map(|guard| &guard.0) {
        None => {
            return Verdict::Held {
                reason: "MigrationNotFound",
                message: format!(
                    "needs revision {revision}, but DatabaseMigration {name} does not exist in this namespace; the rollout waits until it exists and the database reports {revision}"
                ),
                fresh_read_helps: false,
            };
        }
        Some(Err(invalid)) => {
            return Verdict::Held {
                reason: "InvalidMigration",
                message: format!(
                    "needs revision {revision}, but DatabaseMigration {name} cannot be read: {invalid}"
                ),
                fresh_read_helps: false,
            };
        }
        Some(Ok(migration)) => migration,
    };
    let status = migration.status.clone().unwrap_or_default();
    let scheme = Scheme::of(&migration.spec.database.tracking);
    // Revisions read from another database, or with other tracking settings, say nothing
    // about this one: only a fresh read of the database the spec names decides.
    let current_database = crate::migration::job::database_fingerprint(migration);
    if fresh.is_none() && status.observed_database.as_deref() != Some(current_database.as_str()) {
        return Verdict::Held {
            reason: "RevisionUndetermined",
            message: format!(
                "needs revision {revision} of DatabaseMigration {name}, whose database has not been read with its current spec.database yet"
            ),
            fresh_read_helps: true,
        };
    }
    let applied = match fresh {
        Some(fresh) => Applied {
            revisions: &fresh.revisions,
            complete: true,
        },
        None => Applied {
            revisions: &status.applied_revisions,
            complete: !status.applied_revisions_truncated,
        },
    };
    let graph = status.revision_graph.as_ref().and_then(Graph::from_status);
    let undetermined = match revision::answer(scheme, applied, graph.as_ref(), revision) {
        Answer::Satisfied => return Verdict::Satisfied,
        Answer::NotSatisfied => None,
        Answer::CannotTell { why, kind } => Some((why, kind.fresh_read_helps())),
    };
    let reported = match &status.applied_revision {
        Some(head) => format!("the database reports revision {head}"),
        None => "the database reports no revision yet".to_string(),
    };
    let drifted =
        crate::conditions::is_true(&status.conditions, schemagate_crds::condition::DRIFTED);
    let state = match status.phase {
        Some(schemagate_crds::Phase::Failed) if drifted => {
            "; the database drifted below it and waits for a person (annotation schemagate.dev/retry)"
                .to_string()
        }
        Some(schemagate_crds::Phase::Failed) => {
            let why =
                crate::conditions::find(&status.conditions, schemagate_crds::condition::READY)
                    .map(|c| format!(": {}", c.message))
                    .unwrap_or_default();
            format!("; the migration failed{why}")
        }
        Some(schemagate_crds::Phase::Running) => "; the migration is running".to_string(),
        _ => String::new(),
    };
    match undetermined {
        None => Verdict::Held {
            reason: "RevisionPending",
            message: format!(
                "needs revision {revision} of DatabaseMigration {name}; {reported}{state}"
            ),
            fresh_read_helps: false,
        },
        Some((why, fresh_read_helps)) => Verdict::Held {
            reason: "RevisionUndetermined",
            message: format!(
                "needs revision {revision} of DatabaseMigration {name}, and whether it is applied cannot be told yet: {why}{state}"
            ),
            fresh_read_helps,
        },
    }
}

/// What the gate does to a Deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateChange {
    /// Pause it and mark it held for this revision.
    Hold {
        revision: String,
    },
    /// Unpause it and remove the mark: only for Deployments schemagate paused itself.
    Release,
    None,
}

/// Whether schemagate holds this Deployment (it paused it and marked it).
pub fn held_by_schemagate<W: Workload>(workload: &W) -> bool {
    workload.annotations().contains_key(HELD_FOR_ANNOTATION)
}

/// The change a verdict calls for. A Deployment a person paused is left alone both ways:
/// it is not rolling out, and it must never be unpaused by schemagate.
pub fn decide<W: Workload>(
    deployment: &W,
    requirement: Option<&Requirement>,
    verdict: &Verdict,
) -> GateChange {
    let held = held_by_schemagate(deployment);
    match (requirement, verdict) {
        (Some(requirement), Verdict::Held { .. }) => {
            let marked_for = deployment.annotations().get(HELD_FOR_ANNOTATION);
            let already_held = held && marked_for == Some(&requirement.revision);
            // Paused by a person (no marker) or already held for this revision: nothing to do.
            if deployment.rollout_stopped() && (already_held || !held) {
                GateChange::None
            } else {
                GateChange::Hold {
                    revision: requirement.revision.clone(),
                }
            }
        }
        _ if held => GateChange::Release,
        _ => GateChange::None,
    }
}

/// Which object an Event of the gate is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteOn {
    /// The held workload.
    Workload,
    /// The DatabaseMigration the Deployment names, when it exists.
    Migration,
}

/// An Event the gate publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateNote {
    pub on: NoteOn,
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
}

/// The Events that tell a person about a gate decision: a hold or a release on the
/// Deployment and its DatabaseMigration, and, while a hold lasts, why on the Deployment.
pub fn notes<W: Workload>(
    deployment: &W,
    requirement: Option<&Requirement>,
    verdict: &Verdict,
    change: &GateChange,
) -> Vec<GateNote> {
    let name = deployment.name_any();
    let kind = W::kind(&());
    let both = |reason: &'static str, action: &'static str, message: String| {
        vec![
            GateNote {
                on: NoteOn::Workload,
                reason,
                action,
                message: crate::conditions::event_note(&message),
            },
            GateNote {
                on: NoteOn::Migration,
                reason,
                action,
                message: crate::conditions::event_note(&format!("{kind} {name}: {message}")),
            },
        ]
    };
    match (change, verdict) {
        (
            GateChange::Hold { .. },
            Verdict::Held {
                reason, message, ..
            },
        ) => both(
            "RolloutHeld",
            "Hold",
            format!("rollout paused by schemagate ({reason}): {message}"),
        ),
        // Held already, by the webhook at admission or earlier: say why, with what the
        // database reports now (the backstop publishes it only when the words changed).
        (
            GateChange::None,
            Verdict::Held {
                reason, message, ..
            },
        ) if held_by_schemagate(deployment) => {
            vec![GateNote {
                on: NoteOn::Workload,
                reason: "RolloutHeld",
                action: "Hold",
                message: crate::conditions::event_note(&format!(
                    "rollout paused by schemagate ({reason}): {message}"
                )),
            }]
        }
        (GateChange::Release, _) => {
            let why = match requirement {
                Some(r) => format!(
                    "the database reports revision {} of DatabaseMigration {}",
                    r.revision, r.migration
                ),
                None if !deployment.labels().contains_key(MIGRATION_LABEL) => format!(
                    "the {kind} no longer carries label {MIGRATION_LABEL}, so schemagate no longer gates it"
                ),
                None => format!(
                    "its pod template no longer carries annotation {REVISION_ANNOTATION}, so there is no revision to wait for"
                ),
            };
            let message = if keeps_paused(deployment) {
                format!(
                    "hold released by schemagate: {why}; it stays paused as annotation {KEEP_PAUSED_ANNOTATION} asks: resume it with kubectl rollout resume"
                )
            } else {
                format!("rollout resumed by schemagate: {why}")
            };
            both("RolloutReleased", "Release", message)
        }
        _ => Vec::new(),
    }
}

/// Whether a person asked that the workload stay paused after schemagate's release.
pub fn keeps_paused<W: Workload>(workload: &W) -> bool {
    workload
        .annotations()
        .get(KEEP_PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true")
}

/// The JSON merge patch of a change, guarded by the Deployment's resourceVersion so that a
/// concurrent change (a person pausing it) is never overwritten.
pub fn merge_patch<W: Workload>(deployment: &W, change: &GateChange) -> Option<serde_json::Value> {
    let resource_version = deployment.resource_version();
    match change {
        GateChange::Hold { revision } => Some(serde_json::json!({
            "metadata": {
                "resourceVersion": resource_version,
                "annotations": { HELD_FOR_ANNOTATION: revision },
                "labels": { HELD_LABEL: "true" },
            },
            "spec": W::merge_spec(true),
        })),
        GateChange::Release if keeps_paused(deployment) => Some(serde_json::json!({
            "metadata": {
                "resourceVersion": resource_version,
                "annotations": { HELD_FOR_ANNOTATION: null },
                "labels": { HELD_LABEL: null },
            },
        })),
        GateChange::Release => Some(serde_json::json!({
            "metadata": {
                "resourceVersion": resource_version,
                "annotations": { HELD_FOR_ANNOTATION: null },
                "labels": { HELD_LABEL: null },
            },
            "spec": W::merge_spec(false),
        })),
        GateChange::None => None,
    }
}

/// The same change as RFC 6902 operations, for the admission webhook's response.
pub fn json_patch<W: Workload>(deployment: &W, change: &GateChange) -> Vec<serde_json::Value> {
    // `~1` is how a JSON pointer spells `/` inside a key.
    let pointer = |key: &str| key.replace('~', "~0").replace('/', "~1");
    let held_for = format!("/metadata/annotations/{}", pointer(HELD_FOR_ANNOTATION));
    let held_label = format!("/metadata/labels/{}", pointer(HELD_LABEL));
    let has_annotations = deployment.meta().annotations.is_some();
    let has_labels = deployment.meta().labels.is_some();
    let has_held_label = deployment.labels().contains_key(HELD_LABEL);
    match change {
        GateChange::Hold { revision } => {
            let mut operations = Vec::new();
            if !has_annotations {
                operations.push(
                    serde_json::json!({"op": "add", "path": "/metadata/annotations", "value": {}}),
                );
            }
            operations.push(serde_json::json!({"op": "add", "path": held_for, "value": revision}));
            if !has_labels {
                operations.push(
                    serde_json::json!({"op": "add", "path": "/metadata/labels", "value": {}}),
                );
            }
            operations.push(serde_json::json!({"op": "add", "path": held_label, "value": "true"}));
            operations.push(W::json_operation(true));
            operations
        }
        GateChange::Release => {
            let mut operations = vec![serde_json::json!({"op": "remove", "path": held_for})];
            if has_held_label {
                operations.push(serde_json::json!({"op": "remove", "path": held_label}));
            }
            if !keeps_paused(deployment) {
                operations.push(W::json_operation(false));
            }
            operations
        }
        GateChange::None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::migration_from_yaml;
    use k8s_openapi::api::apps::v1::Deployment;
    use schemagate_crds::{RevisionGraphStatus, RevisionNode};

    fn deployment(yaml: &str) -> Deployment {
        serde_yaml::from_str(yaml).unwrap()
    }

    const APP_V2: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: app, namespace: prod, resourceVersion: "7", labels: { schemagate.dev/migration: app-db } }
spec:
  selector: { matchLabels: { app: app } }
  template:
    metadata: { labels: { app: app }, annotations: { schemagate.dev/revision: "0002" } }
    spec: { containers: [{ name: app, image: app:v2 }] }
"#;

    fn migration_with(
        applied: Option<&str>,
        applied_revisions: &[&str],
    ) -> DeserializeGuard<DatabaseMigration> {
        let mut migration = migration_from_yaml(
            r#"
apiVersion: schemagate.dev/v1alpha1
kind: DatabaseMigration
metadata: { name: app-db, namespace: prod }
spec:
  database: { engine: postgres, urlSecretRef: { name: url }, tracking: { tool: alembic } }
  migrator: { image: app:v2 }
  revision: "0002"
"#,
        );
        let database = crate::migration::job::database_fingerprint(&migration);
        let status = migration.status.get_or_insert_with(Default::default);
        status.observed_database = Some(database);
        status.applied_revision = applied.map(str::to_string);
        status.applied_revisions = applied_revisions.iter().map(|r| r.to_string()).collect();
        DeserializeGuard(Ok(migration))
    }

    fn context() -> crate::context::Context {
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let (store, _writer) = kube::runtime::reflector::store();
        crate::context::Context::new(
            kube::Client::new(service, "default"),
            store,
            std::sync::Arc::new(crate::telemetry::Metrics::default()),
        )
    }

    #[tokio::test]
    async fn a_reading_taken_since_the_status_decides_until_a_newer_status_is_stored() {
        let ctx = context();
        let mut migration = migration_with(Some("0001"), &["0001"]);
        if let Ok(m) = &mut migration.0 {
            m.metadata.uid = Some("uid-1".into());
            m.metadata.resource_version = Some("7".into());
        }
        let found = migration.0.as_ref().unwrap().clone();
        fn held(
            ctx: &crate::context::Context,
            migration: &DeserializeGuard<DatabaseMigration>,
        ) -> bool {
            let requirement = requirement(&deployment(APP_V2)).unwrap();
            matches!(
                evaluate_current(ctx, Some(migration), &requirement),
                Verdict::Held { .. }
            )
        }
        assert!(held(&ctx, &migration), "the status says 0001");
        let read_at = std::time::Instant::now();
        let fresh = |uid: &str, fingerprint: String| crate::context::FreshReading {
            uid: Some(uid.into()),
            fingerprint,
            applied: crate::probe::AppliedRevisions {
                revisions: vec!["0002".into()],
                head_only: true,
            },
            read_at,
        };
        // Read from another database, or for an object of the same name before: no answer.
        ctx.fresh_readings
            .record("prod/app-db".into(), fresh("uid-1", "another".into()));
        assert!(held(&ctx, &migration));
        ctx.fresh_readings.record(
            "prod/app-db".into(),
            fresh("uid-0", crate::migration::job::database_fingerprint(&found)),
        );
        assert!(held(&ctx, &migration));
        // This object's database reports 0002: released, before the status says so.
        ctx.fresh_readings.record(
            "prod/app-db".into(),
            fresh("uid-1", crate::migration::job::database_fingerprint(&found)),
        );
        assert!(!held(&ctx, &migration));
        // A status from a reading as new is written at 8: until the store holds it, the
        // reading speaks; once it does, the status alone (here: it says 0001 again).
        ctx.fresh_readings
            .status_written("prod/app-db", read_at, "8");
        assert!(!held(&ctx, &migration));
        if let Ok(m) = &mut migration.0 {
            m.metadata.resource_version = Some("8".into());
        }
        assert!(held(&ctx, &migration), "the newer status decides");
    }

    #[test]
    fn requirement_from_label_and_template_annotation() {
        let requirement = requirement(&deployment(APP_V2)).unwrap();
        assert_eq!(requirement.migration, "app-db");
        assert_eq!(requirement.revision, "0002");
    }

    #[test]
    fn held_until_the_status_reports_the_revision() {
        let requirement = requirement(&deployment(APP_V2)).unwrap();
        assert!(matches!(
            evaluate(None, &requirement),
            Verdict::Held {
                reason: "MigrationNotFound",
                ..
            }
        ));
        let pending = evaluate(Some(&migration_with(Some("0001"), &["0001"])), &requirement);
        match pending {
            Verdict::Held { message, .. } => {
                assert!(message.contains("needs revision 0002"), "{message}");
                assert!(message.contains("head 0001"), "{message}");
            }
            Verdict::Satisfied => panic!("released early"),
        }
        assert_eq!(
            evaluate(
                Some(&migration_with(Some("0002"), &["0001", "0002"])),
                &requirement
            ),
            Verdict::Satisfied
        );
    }

    #[test]
    fn an_ancestor_of_the_head_in_the_images_graph_is_satisfied() {
        let mut v1 = requirement(&deployment(APP_V2)).unwrap();
        v1.revision = "a1b2c3".into();
        let mut migration = migration_with(Some("ffee00"), &["ffee00"]);
        // Without the graph, only the head itself is known applied: held, saying why.
        match evaluate(Some(&migration), &v1) {
            Verdict::Held {
                reason, message, ..
            } => {
                assert_eq!(reason, "RevisionUndetermined");
                assert!(message.contains("revision graph"), "{message}");
            }
            Verdict::Satisfied => panic!("released on a guess"),
        }
        if let Ok(m) = &mut migration.0 {
            m.status.as_mut().unwrap().revision_graph = Some(RevisionGraphStatus {
                job: "app-db-graph-1".into(),
                image: "app:v2".into(),
                revisions: vec![
                    RevisionNode {
                        revision: "ffee00".into(),
                        parents: vec!["a1b2c3".into()],
                    },
                    RevisionNode {
                        revision: "a1b2c3".into(),
                        parents: vec![],
                    },
                ],
                ..Default::default()
            });
        }
        assert_eq!(evaluate(Some(&migration), &v1), Verdict::Satisfied);
    }

    #[test]
    fn a_status_read_from_another_database_decides_nothing() {
        let mut migration = migration_with(Some("0002"), &["0002"]);
        if let Ok(m) = &mut migration.0 {
            m.spec.database.url_secret_ref.name = "another-db".into();
        }
        let requirement = requirement(&deployment(APP_V2)).unwrap();
        match evaluate(Some(&migration), &requirement) {
            Verdict::Held {
                fresh_read_helps, ..
            } => assert!(fresh_read_helps),
            Verdict::Satisfied => panic!("released from another database's revisions"),
        }
        let fresh = AppliedRevisions {
            revisions: vec!["0002".into()],
            head_only: true,
        };
        assert_eq!(
            evaluate_with(Some(&migration), &requirement, Some(&fresh)),
            Verdict::Satisfied
        );
    }

    #[test]
    fn a_truncated_applied_set_holds_until_a_fresh_read_decides() {
        let mut migration = migration_with(Some("300"), &["299", "300"]);
        if let Ok(m) = &mut migration.0 {
            m.spec.database.tracking.tool = Some(schemagate_crds::TrackingTool::Flyway);
            m.status.as_mut().unwrap().applied_revisions_truncated = true;
        }
        let mut old = requirement(&deployment(APP_V2)).unwrap();
        old.revision = "12".into();
        match evaluate(Some(&migration), &old) {
            Verdict::Held {
                fresh_read_helps, ..
            } => assert!(fresh_read_helps),
            Verdict::Satisfied => panic!("released on a guess"),
        }
        let fresh = AppliedRevisions {
            revisions: (1..=300).map(|v| v.to_string()).collect(),
            head_only: false,
        };
        assert_eq!(
            evaluate_with(Some(&migration), &old, Some(&fresh)),
            Verdict::Satisfied
        );
        old.revision = "301".into();
        assert!(matches!(
            evaluate_with(Some(&migration), &old, Some(&fresh)),
            Verdict::Held {
                reason: "RevisionPending",
                ..
            }
        ));
    }

    #[test]
    fn holds_pauses_and_marks_and_releases_only_its_own_hold() {
        let app = deployment(APP_V2);
        let requirement = requirement(&app).unwrap();
        let held = Verdict::Held {
            reason: "RevisionPending",
            message: String::new(),
            fresh_read_helps: false,
        };
        assert_eq!(
            decide(&app, Some(&requirement), &held),
            GateChange::Hold {
                revision: "0002".into()
            }
        );
        let patch = merge_patch(
            &app,
            &GateChange::Hold {
                revision: "0002".into(),
            },
        )
        .unwrap();
        assert_eq!(patch["spec"]["paused"], true);
        assert_eq!(patch["metadata"]["resourceVersion"], "7");

        let mut paused_by_person = app.clone();
        paused_by_person.spec.as_mut().unwrap().paused = Some(true);
        assert_eq!(
            decide(&paused_by_person, Some(&requirement), &held),
            GateChange::None
        );
        assert_eq!(
            decide(&paused_by_person, Some(&requirement), &Verdict::Satisfied),
            GateChange::None
        );

        let mut held_by_us = paused_by_person.clone();
        held_by_us
            .annotations_mut()
            .insert(HELD_FOR_ANNOTATION.into(), "0002".into());
        assert_eq!(
            decide(&held_by_us, Some(&requirement), &held),
            GateChange::None
        );
        assert_eq!(
            decide(&held_by_us, Some(&requirement), &Verdict::Satisfied),
            GateChange::Release
        );
    }

    #[test]
    fn json_patch_adds_annotations_map_when_missing() {
        let mut app = deployment(APP_V2);
        app.metadata.annotations = None;
        let operations = json_patch(
            &app,
            &GateChange::Hold {
                revision: "0002".into(),
            },
        );
        assert_eq!(operations[0]["path"], "/metadata/annotations");
        assert_eq!(
            operations[1]["path"],
            "/metadata/annotations/schemagate.dev~1held-for"
        );
        assert_eq!(
            operations[2]["path"],
            "/metadata/labels/schemagate.dev~1held"
        );
        assert_eq!(operations[3]["value"], true);
    }
}
