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
//! [`job`] builds the Jobs from the resource alone, with deterministic names.

pub mod apply;
pub mod job;
pub mod observe;
pub mod plan;

#[cfg(test)]
mod scenario_tests;

use crate::backoff::key_of;
use crate::context::Context;
use crate::context::GuardedMigration;
use crate::error::{Error, Result};
use crate::report::report;
use apply::{Applied, apply, publish, update_status};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use observe::observe;
use plan::{Next, plan};
use schemagate_crds::DatabaseMigration;
use std::sync::Arc;
use tracing::instrument;

/// How soon a migration that lost the race for its database looks again.
const TURN_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

#[instrument(skip_all, fields(namespace = migration.namespace(), name = migration.name_any()))]
async fn reconcile(migration: &DatabaseMigration, ctx: &Context) -> Result<Action> {
    let observed = observe(ctx, migration).await?;
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
    update_status(ctx, migration, &plan.status).await?;
    publish(ctx, migration, &plan.notes).await;
    match plan.next {
        Next::Requeue(after) => Ok(Action::requeue(after)),
        Next::AwaitChange => Ok(Action::await_change()),
        Next::Fail(error) => Err(error),
    }
}

pub async fn reconcile_migration(
    guard: Arc<GuardedMigration>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started("migration");
    let result = match &guard.0 {
        Ok(migration) => reconcile(migration, &ctx).await,
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

/// The one reporting path for failed reconciles: a log line, a metric and a Warning Event
/// with the reason and the error chain.
pub fn error_policy(guard: Arc<GuardedMigration>, _error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.backoff.next(&key_of(guard.as_ref())))
}
