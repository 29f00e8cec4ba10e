//! The migration controller: DatabaseMigration → Job → revision read from the database.
//!
//! One reconcile reads top to bottom, each step a module that owns its output:
//!
//! 1. [`observe`] reads the world: the attempt's Job, the revision-graph Job, another
//!    migration on the same database, the database's applied revisions, held Deployments.
//! 2. [`plan`] decides, purely (no client, no clock): which Job should exist, the status,
//!    the Events and when to look again. It asks [`crate::revision`] whether the revision
//!    is applied.
//! 3. [`apply`] creates the Jobs, writes the status (only when it changed), publishes the
//!    Events.
//!
//! [`job`] builds the Jobs from the resource alone, with deterministic names. While a Job
//! runs, [`watch`] reads its database for the revision and reconciles the moment it is
//! there.

pub mod apply;
pub mod job;
pub mod observe;
pub mod plan;
pub mod watch;

#[cfg(test)]
mod scenario_tests;

use crate::backoff::key_of;
use crate::context::Context;
use crate::context::GuardedMigration;
use crate::error::{Error, Result};
use crate::report::report;
use apply::{Applied, apply, publish, update_status};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use observe::{Reading, observe};
use plan::{Next, plan};
use schemagate_crds::DatabaseMigration;
use std::sync::Arc;
use tracing::instrument;

/// How soon a migration that lost the race for its database looks again.
const TURN_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

#[instrument(skip_all, fields(namespace = migration.namespace(), name = migration.name_any()))]
async fn reconcile(
    migration: &DatabaseMigration,
    ctx: &Arc<Context>,
    reading: Option<Reading>,
) -> Result<Action> {
    let from_watch = reading.is_some();
    let observed = observe(ctx, migration, reading).await?;
    let read_at = observed.read_at;
    let key = crate::context::key_of(
        &migration.namespace().unwrap_or_default(),
        &migration.name_any(),
    );
    // The database reports the spec's revision and the status does not say so yet: the gate
    // may release on this reading while the status is written (a watch's reading is
    // announced by the watch). A reading that already speaks is renewed, so that it does
    // not lapse while the status cannot be written.
    if let (false, Some(read_at), Ok(applied)) = (from_watch, read_at, &observed.database)
        && (!observed.held_deployments.is_empty() || ctx.fresh_readings.has(&key))
        && crate::revision::satisfies_spec(migration, &applied.revisions)
        && !status_holds_spec_revision(migration)
    {
        speak_for_database(ctx, migration, applied, read_at);
    }
    // What the status keeps of this read, to tell whether the status written carries it.
    let kept = observed
        .database
        .as_ref()
        .ok()
        .map(|applied| crate::revision::for_status(&applied.revisions));
    let plan = plan(migration, observed, ctx.now());
    match apply(ctx, migration, &plan).await {
        Ok(Applied::Done) => {}
        // Lost the race for the database to another reconcile: the next look finds its
        // Job and says so in the status. Nothing was written.
        Ok(Applied::AwaitingTurn(other)) => {
            tracing::info!(%other, "another migration Job started on the same database first");
            return Ok(Action::requeue(TURN_RECHECK));
        }
        Ok(Applied::TurnTimedOut) => {
            tracing::warn!(
                "the Kubernetes API did not answer while the migration Job was being started; trying again"
            );
            return Ok(Action::requeue(TURN_RECHECK * 5));
        }
        Err(error) => {
            if matches!(error, Error::JobRejected { .. }) {
                let status = plan::job_rejected(migration, &plan.status, &error, ctx.now());
                update_status(ctx, migration, &status).await?;
            }
            return Err(error);
        }
    }
    let stored = update_status(ctx, migration, &plan.status).await?;
    // A status that carries this read: the gate decides from it again, instead of an older
    // reading. (A status that does not, an invalid spec's say, leaves the reading speaking.)
    let carries_read = kept.is_some_and(|(revisions, truncated)| {
        plan.status.applied_revisions == revisions
            && plan.status.applied_revisions_truncated == truncated
            && plan.status.observed_database.as_deref()
                == Some(job::database_fingerprint(migration).as_str())
    });
    if let (Some(read_at), Some(stored), true) = (read_at, stored, carries_read) {
        ctx.fresh_readings.status_written(&key, read_at, &stored);
    }
    // A watch's own reconcile leaves the watches alone: the watch ends by itself.
    if !from_watch {
        match plan.status.job.as_ref().map(|job| job.name.as_str()) {
            Some(job) if plan.watch_database && !ctx.revision_poll.is_zero() => {
                watch::start(ctx, migration, job)
            }
            _ => ctx.revision_watches.stop(
                &migration.namespace().unwrap_or_default(),
                &migration.name_any(),
            ),
        }
    }
    publish(ctx, migration, &plan.notes).await;
    match plan.next {
        Next::Requeue(after) => Ok(Action::requeue(after)),
        Next::AwaitChange => Ok(Action::await_change()),
        Next::Fail(error) => Err(error),
    }
}

/// Whether the stored status already reports the spec's revision, read from the spec's
/// database.
pub fn status_holds_spec_revision(migration: &DatabaseMigration) -> bool {
    migration.status.as_ref().is_some_and(|status| {
        status.observed_database.as_deref() == Some(job::database_fingerprint(migration).as_str())
            && crate::revision::satisfies_spec(migration, &status.applied_revisions)
    })
}

/// Lets the gate decide from `applied`, read from the spec's database through the URL its
/// Secret holds, until a status from a reading as new is stored
/// ([`crate::context::FreshReadings`]), and has it look at once.
fn speak_for_database(
    ctx: &Context,
    migration: &DatabaseMigration,
    applied: &crate::probe::AppliedRevisions,
    read_at: std::time::Instant,
) {
    let namespace = migration.namespace().unwrap_or_default();
    let name = migration.name_any();
    ctx.fresh_readings.record(
        crate::context::key_of(&namespace, &name),
        crate::context::FreshReading {
            uid: migration.uid(),
            fingerprint: job::database_fingerprint(migration),
            applied: applied.clone(),
            read_at,
        },
    );
    ctx.announce(ObjectRef::new(&name).within(&namespace));
}

pub async fn reconcile_migration(
    guard: Arc<GuardedMigration>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started("migration");
    let reference = ObjectRef::from_obj(guard.as_ref());
    let _turn = turn(&ctx, &reference).await;
    // After a watch's reconcile took the turn, the store may hold a newer status than the
    // object this reconcile was started with.
    let guard = ctx.migrations.get(&reference).unwrap_or(guard);
    let result = match &guard.0 {
        Ok(migration) => reconcile(migration, &ctx, None).await,
        Err(invalid) => Err(Error::InvalidObject {
            message: invalid.error.clone(),
        }),
    };
    // The guard reads name and namespace from an object that could not be parsed, too.
    match &result {
        Ok(_) => ctx.backoff.reset(&key_of(guard.as_ref())),
        Err(error) => report(&ctx, "migration", &guard.object_ref(&()), error).await,
    }
    result
}

/// The DatabaseMigration's turn: one reconcile of it at a time, the controller's or a
/// watch's.
async fn turn(
    ctx: &Context,
    reference: &ObjectRef<GuardedMigration>,
) -> tokio::sync::OwnedMutexGuard<()> {
    let key = crate::context::key_of(
        reference.namespace.as_deref().unwrap_or_default(),
        &reference.name,
    );
    ctx.migration_locks.lock(&key).await
}

/// The reconcile a watch starts when the database reports the revision: the same steps,
/// with the watch's reading instead of a second one, in the DatabaseMigration's turn, and
/// only while the object is still the attempt the watch read for (`still_watched`, checked
/// again in the turn: the spec may have changed while the watch waited for it).
pub async fn reconcile_with_reading(
    ctx: &Arc<Context>,
    reference: &ObjectRef<GuardedMigration>,
    still_watched: impl Fn(&DatabaseMigration) -> bool,
    reading: Reading,
) -> Result<()> {
    let _timer = ctx.metrics.reconcile_started("migration");
    let _turn = turn(ctx, reference).await;
    let Some(guard) = ctx.migrations.get(reference) else {
        return Ok(());
    };
    match &guard.0 {
        Ok(migration) if still_watched(migration) => {
            reconcile(migration, ctx, Some(reading)).await.map(drop)
        }
        _ => Ok(()),
    }
}

/// The one reporting path for failed reconciles: a log line, a metric and a Warning Event
/// with the reason and the error chain.
pub fn error_policy(guard: Arc<GuardedMigration>, _error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.backoff.next(&key_of(guard.as_ref())))
}
