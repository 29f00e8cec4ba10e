//! Writes what the plan decided: the migration Job, then the status, then the Events.

use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::migration::job;
use crate::migration::observe::other_active_job;
use crate::migration::plan::{Note, Plan};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::Event;
use kube::{Resource, ResourceExt};
use schemagate_crds::{DatabaseMigration, DatabaseMigrationStatus};

/// What became of the plan's Jobs.
#[derive(Debug, PartialEq)]
pub enum Applied {
    Done,
    /// Another migration Job on the same database started since `observe` looked (named
    /// here): this one was not created, and waits its turn.
    AwaitingTurn(String),
    /// The API server did not answer within [`TURN_LIMIT`] while this migration held its
    /// database's turn: the turn was given up, nothing was created.
    TurnTimedOut,
}

/// How long a reconcile may hold its database's turn: a call that never returns (a
/// connection that died without a reset) must not stop every migration of the databases
/// sharing the turn.
pub const TURN_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Creates the Job if the plan asks for one. The name is deterministic, so a Job that
/// already exists (an operator restart, a second replica) is the same attempt: it is kept.
/// Created, not applied: a Job's template is immutable, and re-applying it after an
/// operator upgrade changed the template would fail instead of keeping the running attempt.
pub async fn apply(ctx: &Context, migration: &DatabaseMigration, plan: &Plan) -> Result<Applied> {
    if let Some(name) = &plan.delete_job {
        let namespace = migration.namespace().unwrap_or_default();
        let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
        // Foreground: the Job stays until its pod is gone, so no attempt overlaps it.
        match jobs
            .delete(name, &kube::api::DeleteParams::foreground())
            .await
        {
            Ok(_) => {
                tracing::info!(job = %name, "deleted an earlier attempt's Job that never started")
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => {
                return Err(Error::Kube {
                    action: format!("delete Job {name}"),
                    source,
                });
            }
        }
    }
    if let Some(job) = &plan.create_graph_job {
        create_job(ctx, migration, job).await?;
    }
    if let Some(job) = &plan.create_job {
        let key = job.labels().get(job::DATABASE_LABEL).cloned();
        let key = key.unwrap_or_default();
        // From the check to the creation, no other reconcile may start a Job on this
        // database; the check is read fresh, as `observe`'s may be stale by now.
        let name = job.name_any();
        let turn = async {
            let _turn = ctx.database_turns.take(&key).await;
            if let Some(other) = other_active_job(ctx, migration, &key, &name).await? {
                return Ok(Applied::AwaitingTurn(other));
            }
            create_job(ctx, migration, job).await?;
            Ok(Applied::Done)
        };
        return match tokio::time::timeout(TURN_LIMIT, turn).await {
            Ok(result) => result,
            Err(_) => Ok(Applied::TurnTimedOut),
        };
    }
    Ok(Applied::Done)
}

async fn create_job(ctx: &Context, migration: &DatabaseMigration, job: &Job) -> Result<()> {
    let namespace = migration.namespace().unwrap_or_default();
    let name = job.name_any();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    match jobs.create(&params, job).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        // Refused by admission (a policy, a quota) or as invalid: no retry of the same
        // request will pass until a person changes something.
        Err(kube::Error::Api(status)) if matches!(status.code, 400 | 403 | 422) => {
            Err(Error::JobRejected {
                job: name,
                message: status.message,
            })
        }
        Err(source) => Err(Error::Kube {
            action: format!("create Job {name}"),
            source,
        }),
    }
}

/// Server-side applies the status when it differs from what is stored, so an unchanged
/// status causes no write and no new watch event. The resourceVersion of the object that
/// holds the status now, when known.
pub async fn update_status(
    ctx: &Context,
    migration: &DatabaseMigration,
    status: &DatabaseMigrationStatus,
) -> Result<Option<String>> {
    if migration.status.as_ref() == Some(status) {
        return Ok(migration.resource_version());
    }
    let namespace = migration.namespace().unwrap_or_default();
    let name = migration.name_any();
    let api: Api<DatabaseMigration> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": DatabaseMigration::api_version(&()),
        "kind": DatabaseMigration::kind(&()),
        "status": status,
    });
    match api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(written) => Ok(written.resource_version()),
        // Deleted while it was reconciled (pruned by a GitOps tool, say): nothing to report.
        Err(kube::Error::Api(response)) if response.code == 404 => {
            tracing::debug!(%name, "DatabaseMigration deleted before its status was written");
            Ok(None)
        }
        Err(source) => Err(Error::Kube {
            action: format!("update status of DatabaseMigration {name}"),
            source,
        }),
    }
}

/// Publishes the plan's Events on the DatabaseMigration. An Event that cannot be written
/// is logged, not fatal: the status already says the same.
pub async fn publish(ctx: &Context, migration: &DatabaseMigration, notes: &[Note]) {
    let reference = migration.object_ref(&());
    for note in notes {
        let event = Event {
            type_: note.type_,
            reason: note.reason.to_string(),
            note: Some(crate::conditions::event_note(&note.message)),
            action: "Migrate".to_string(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(%error, reason = note.reason, "cannot publish Event");
        }
    }
}
