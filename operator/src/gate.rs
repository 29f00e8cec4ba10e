//! The rollout gate: whether a Deployment's required revision is applied, and the change
//! (hold or release) that follows. The same decision serves the admission webhook, the
//! backstop controller and `schemagate check`.

use crate::probe::{self, AppliedRevisions};
use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use schemagate_crds::{
    DatabaseMigration, HELD_FOR_ANNOTATION, MIGRATION_LABEL, REVISION_ANNOTATION,
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
pub fn requirement(deployment: &Deployment) -> Option<Requirement> {
    let migration = deployment.labels().get(MIGRATION_LABEL)?.clone();
    let revision = deployment
        .spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
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
    /// Not (yet) applied; `message` says why, for Events and `schemagate check`.
    Held {
        reason: &'static str,
        message: String,
    },
}

/// Whether `requirement` is met, judged from the DatabaseMigration's status alone: it
/// carries what the database last reported, so a decision takes no database round trip.
pub fn evaluate(
    migration: Option<&DeserializeGuard<DatabaseMigration>>,
    requirement: &Requirement,
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
            };
        }
        Some(Err(invalid)) => {
            return Verdict::Held {
                reason: "InvalidMigration",
                message: format!(
                    "needs revision {revision}, but DatabaseMigration {name} cannot be read: {invalid}"
                ),
            };
        }
        Some(Ok(migration)) => migration,
    };
    let status = migration.status.clone().unwrap_or_default();
    let head = status.applied_revision.clone();
    let satisfied = status.applied_revisions.iter().any(|r| r == revision)
        || head.as_ref().is_some_and(|head| {
            probe::is_satisfied(
                &AppliedRevisions {
                    revisions: vec![head.clone()],
                    head_only: true,
                },
                revision,
                &status.applied_revisions,
            )
        });
    if satisfied {
        return Verdict::Satisfied;
    }
    let reported = match &head {
        Some(head) => format!("the database reports revision {head}"),
        None => "the database reports no revision yet".to_string(),
    };
    let state = match status.phase {
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
    Verdict::Held {
        reason: "RevisionPending",
        message: format!(
            "needs revision {revision} of DatabaseMigration {name}; {reported}{state}"
        ),
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
pub fn held_by_schemagate(deployment: &Deployment) -> bool {
    deployment.annotations().contains_key(HELD_FOR_ANNOTATION)
}

fn paused(deployment: &Deployment) -> bool {
    deployment.spec.as_ref().and_then(|s| s.paused) == Some(true)
}

/// The change a verdict calls for. A Deployment a person paused is left alone both ways:
/// it is not rolling out, and it must never be unpaused by schemagate.
pub fn decide(
    deployment: &Deployment,
    requirement: Option<&Requirement>,
    verdict: &Verdict,
) -> GateChange {
    let held = held_by_schemagate(deployment);
    match (requirement, verdict) {
        (Some(requirement), Verdict::Held { .. }) => {
            let marked_for = deployment.annotations().get(HELD_FOR_ANNOTATION);
            let already_held = held && marked_for == Some(&requirement.revision);
            // Paused by a person (no marker) or already held for this revision: nothing to do.
            if paused(deployment) && (already_held || !held) {
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

/// The JSON merge patch of a change, guarded by the Deployment's resourceVersion so that a
/// concurrent change (a person pausing it) is never overwritten.
pub fn merge_patch(deployment: &Deployment, change: &GateChange) -> Option<serde_json::Value> {
    let resource_version = deployment.resource_version();
    match change {
        GateChange::Hold { revision } => Some(serde_json::json!({
            "metadata": {
                "resourceVersion": resource_version,
                "annotations": { HELD_FOR_ANNOTATION: revision },
            },
            "spec": { "paused": true },
        })),
        GateChange::Release => Some(serde_json::json!({
            "metadata": {
                "resourceVersion": resource_version,
                "annotations": { HELD_FOR_ANNOTATION: null },
            },
            "spec": { "paused": false },
        })),
        GateChange::None => None,
    }
}

/// The same change as RFC 6902 operations, for the admission webhook's response.
pub fn json_patch(deployment: &Deployment, change: &GateChange) -> Vec<serde_json::Value> {
    // `~1` is how a JSON pointer spells `/` inside a key.
    let held_for = format!(
        "/metadata/annotations/{}",
        HELD_FOR_ANNOTATION.replace('~', "~0").replace('/', "~1")
    );
    let has_annotations = deployment.metadata.annotations.is_some();
    match change {
        GateChange::Hold { revision } => {
            let mut operations = Vec::new();
            if !has_annotations {
                operations.push(
                    serde_json::json!({"op": "add", "path": "/metadata/annotations", "value": {}}),
                );
            }
            operations.push(serde_json::json!({"op": "add", "path": held_for, "value": revision}));
            operations
                .push(serde_json::json!({"op": "add", "path": "/spec/paused", "value": true}));
            operations
        }
        GateChange::Release => vec![
            serde_json::json!({"op": "remove", "path": held_for}),
            serde_json::json!({"op": "add", "path": "/spec/paused", "value": false}),
        ],
        GateChange::None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::migration_from_yaml;

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
        let status = migration.status.get_or_insert_with(Default::default);
        status.applied_revision = applied.map(str::to_string);
        status.applied_revisions = applied_revisions.iter().map(|r| r.to_string()).collect();
        DeserializeGuard(Ok(migration))
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
                assert!(message.contains("reports revision 0001"), "{message}");
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
    fn older_revision_seen_before_the_head_is_satisfied() {
        let mut v1 = requirement(&deployment(APP_V2)).unwrap();
        v1.revision = "a1b2c3".into();
        let migration = migration_with(Some("ffee00"), &["a1b2c3", "ffee00"]);
        assert_eq!(evaluate(Some(&migration), &v1), Verdict::Satisfied);
    }

    #[test]
    fn holds_pauses_and_marks_and_releases_only_its_own_hold() {
        let app = deployment(APP_V2);
        let requirement = requirement(&app).unwrap();
        let held = Verdict::Held {
            reason: "RevisionPending",
            message: String::new(),
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
        assert_eq!(operations[2]["value"], true);
    }
}
