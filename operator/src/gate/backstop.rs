//! The gate backstop: the controller that holds an opted-in workload whose revision is
//! not applied (when the webhook did not) and releases the holds schemagate made.
//!
//! Same shape as the migration controller: observe (the requirement, a fresh
//! DatabaseMigration and, when its status cannot decide, the database itself) → decide
//! (pure: [`crate::gate::decide`] and [`crate::gate::notes`]) → apply (a
//! resourceVersion-guarded patch, then the Events).

use crate::backoff::key_of;
use crate::context::GuardedMigration;
use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::gate::{self, GateChange, Verdict, Workload};
use crate::report::report;
use crate::telemetry::GateLabels;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use schemagate_crds::MIGRATION_LABEL;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, instrument, warn};

/// How long a reconcile waits for the DatabaseMigration store's first list before it looks
/// again later.
const STORE_WAIT: Duration = Duration::from_secs(3);

#[instrument(skip_all, fields(namespace = deployment.namespace(), name = deployment.name_any()))]
pub async fn reconcile_gate<W: Workload>(deployment: Arc<W>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started("gate");
    let result = gate_deployment(deployment.as_ref(), &ctx).await;
    match &result {
        Ok(_) => ctx.backoff.reset(&key_of(deployment.as_ref())),
        Err(error) => report(&ctx, "gate", &deployment.object_ref(&()), error).await,
    }
    result
}

/// The backstop for one Deployment: observe (requirement, its DatabaseMigration from the
/// store and, when the status cannot decide, the database itself) → decide (pure, with its
/// Events) → apply (a resourceVersion-guarded patch, then the Events).
async fn gate_deployment<W: Workload>(deployment: &W, ctx: &Context) -> Result<Action> {
    // Until the store has listed the DatabaseMigrations, a missing one is no answer: look
    // again shortly (the webhook holds new rollouts meanwhile).
    if !ctx.migrations_listed(STORE_WAIT).await {
        return Ok(Action::requeue(STORE_WAIT));
    }
    let observed = observe_gate(ctx, deployment).await?;
    let change = gate::decide(deployment, observed.requirement.as_ref(), &observed.verdict);
    let notes = gate::notes(
        deployment,
        observed.requirement.as_ref(),
        &observed.verdict,
        &change,
    );
    apply_gate(
        ctx,
        deployment,
        &change,
        &notes,
        observed.migration.as_deref(),
    )
    .await
}

/// What the backstop read about one Deployment.
struct GateObserved {
    requirement: Option<gate::Requirement>,
    migration: Option<Arc<GuardedMigration>>,
    verdict: Verdict,
}

async fn observe_gate<W: Workload>(ctx: &Context, deployment: &W) -> Result<GateObserved> {
    let namespace = deployment.namespace().unwrap_or_default();
    let Some(requirement) = gate::requirement(deployment) else {
        return Ok(GateObserved {
            requirement: None,
            migration: None,
            verdict: Verdict::Satisfied,
        });
    };
    // From the store every replica keeps: this controller hears of a DatabaseMigration's
    // change only after the store took it, so a release follows the status that caused it.
    let migration = ctx
        .migrations
        .get(&ObjectRef::new(&requirement.migration).within(&namespace));
    let mut verdict = gate::evaluate_current(ctx, migration.as_deref(), &requirement);
    if let (
        Verdict::Held {
            fresh_read_helps: true,
            ..
        },
        Some(Ok(found)),
    ) = (&verdict, migration.as_deref().map(|g| &g.0))
    {
        // The status keeps only part of what the database reports: read the database.
        match crate::migration::observe::probe_database(&ctx.client, &namespace, found).await {
            Ok(applied) => {
                verdict = gate::evaluate_with(migration.as_deref(), &requirement, Some(&applied));
            }
            // Held meanwhile; the reconcile is retried with backoff until a read decides.
            Err(error) => return Err(error),
        }
    }
    Ok(GateObserved {
        requirement: Some(requirement),
        migration,
        verdict,
    })
}

async fn apply_gate<W: Workload>(
    ctx: &Context,
    deployment: &W,
    change: &GateChange,
    notes: &[gate::GateNote],
    migration: Option<&GuardedMigration>,
) -> Result<Action> {
    let name = deployment.name_any();
    if let Some(patch) = gate::merge_patch(deployment, change) {
        let deployments: Api<W> = Api::namespaced(
            ctx.client.clone(),
            &deployment.namespace().unwrap_or_default(),
        );
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        match deployments
            .patch(&name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            // Changed since it was read (a person, the webhook): decide again on the new version.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                return Ok(Action::requeue(Duration::from_millis(50)));
            }
            Err(source) => {
                return Err(Error::Kube {
                    action: format!("update {} {name}", W::kind(&())),
                    source,
                });
            }
        }
        let action = match change {
            GateChange::Hold { .. } => "hold",
            _ => "release",
        };
        ctx.metrics
            .gate_changes
            .get_or_create(&GateLabels {
                action,
                by: "controller",
            })
            .inc();
        info!(action, kind = %W::kind(&()), "gate changed a workload");
    }
    let migration_ref = migration
        .and_then(|guard| guard.0.as_ref().ok())
        .map(|m| m.object_ref(&()));
    let uid = deployment.uid().unwrap_or_default();
    let generation = deployment.meta().generation;
    match change {
        // Held already: say why again only when the words or the spec changed.
        GateChange::None if gate::held_by_schemagate(deployment) => {
            if let Some(note) = notes.first()
                && !ctx.held_notes.is_news(&uid, generation, &note.message)
            {
                return Ok(Action::await_change());
            }
        }
        GateChange::Hold { .. } => {
            if let Some(note) = notes.first() {
                ctx.held_notes.is_news(&uid, generation, &note.message);
            }
        }
        // Released (here, by the webhook, or by a person's undo) or never held.
        _ => ctx.held_notes.forget(&uid),
    }
    for note in notes {
        let reference = match note.on {
            gate::NoteOn::Workload => deployment.object_ref(&()),
            gate::NoteOn::Migration => match &migration_ref {
                Some(reference) => reference.clone(),
                None => continue,
            },
        };
        let event = Event {
            type_: EventType::Normal,
            reason: note.reason.to_string(),
            note: Some(note.message.clone()),
            action: note.action.to_string(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &reference).await {
            warn!(%error, "cannot publish Event");
            // Said again at the next look.
            ctx.held_notes.forget(&uid);
        }
    }
    Ok(Action::await_change())
}

/// A Deployment schemagate holds (label `schemagate.dev/held`) that no longer opted in: its
/// hold is released here, since the opted-in watch no longer sees it.
pub async fn reconcile_left_gate<W: Workload>(
    deployment: Arc<W>,
    ctx: Arc<Context>,
) -> Result<Action> {
    if deployment.labels().contains_key(MIGRATION_LABEL) {
        return Ok(Action::await_change());
    }
    reconcile_gate(deployment, ctx).await
}

pub fn error_policy<W: Workload>(deployment: Arc<W>, _error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.backoff.next(&key_of(deployment.as_ref())))
}
