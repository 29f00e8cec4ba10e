//! The two controllers: migrations (DatabaseMigration → Job → revision in the database)
//! and the gate backstop (opted-in Deployment → held or released), and their wiring.

use crate::apply::{apply, publish, update_status};
use crate::context::{Context, FIELD_MANAGER};
use crate::error::{Error, Result};
use crate::gate::{self, GateChange, Verdict};
use crate::job;
use crate::observe::observe;
use crate::plan::{Next, plan};
use crate::telemetry::GateLabels;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use schemagate_crds::{DatabaseMigration, HELD_LABEL, MIGRATION_LABEL};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, instrument, warn};

type GuardedMigration = DeserializeGuard<DatabaseMigration>;

/// How the controllers run.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Only this namespace when set; all namespaces otherwise.
    pub namespace: Option<String>,
    /// Reconciles running at once, per controller.
    pub concurrency: u16,
}

/// Per-object exponential backoff with jitter for failed reconciles.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    const BASE: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(300);

    /// The delay before the next attempt: 2 s doubling to 5 min, ±20 % jitter so objects
    /// failing together do not retry together.
    pub fn next(&self, key: &str) -> Duration {
        let failures = match self.failures.lock() {
            Ok(mut map) => {
                let count = map.entry(key.to_string()).or_insert(0);
                *count = count.saturating_add(1);
                *count
            }
            Err(_) => 1,
        };
        let exponent = failures.saturating_sub(1).min(10);
        let delay = Self::BASE.saturating_mul(1 << exponent).min(Self::MAX);
        delay.mul_f64(0.8 + 0.4 * fastrand::f64())
    }

    pub fn reset(&self, key: &str) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(key);
        }
    }
}

fn key_of<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()).into_owned(),
        object.meta().namespace.clone().unwrap_or_default(),
        object.meta().name.clone().unwrap_or_default()
    )
}

// ---------------------------------------------------------------------------------------
// Migrations

#[instrument(skip_all, fields(namespace = migration.namespace(), name = migration.name_any()))]
async fn reconcile(migration: &DatabaseMigration, ctx: &Context) -> Result<Action> {
    let observed = observe(ctx, migration).await?;
    let plan = plan(migration, observed, ctx.now());
    apply(ctx, migration, &plan).await?;
    update_status(ctx, migration, &plan.status).await?;
    publish(ctx, migration, &plan.notes).await;
    match plan.next {
        Next::Requeue(after) => Ok(Action::requeue(after)),
        Next::AwaitChange => Ok(Action::await_change()),
        Next::Fail(error) => Err(error),
    }
}

pub(crate) async fn reconcile_migration(
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
async fn report(
    ctx: &Context,
    controller: &'static str,
    reference: &ObjectReference,
    error: &Error,
) {
    ctx.metrics.reconcile_failed(controller, error.reason());
    let message = crate::conditions::event_note(&error.chain());
    warn!(
        controller,
        reason = error.reason(),
        namespace = reference.namespace.as_deref().unwrap_or_default(),
        name = reference.name.as_deref().unwrap_or_default(),
        "{message}"
    );
    let event = Event {
        type_: EventType::Warning,
        reason: error.reason().to_string(),
        note: Some(message),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(publish_error) = ctx.recorder.publish(&event, reference).await {
        warn!(error = %publish_error, "cannot publish Event");
    }
}

fn migration_error_policy(
    guard: Arc<GuardedMigration>,
    _error: &Error,
    ctx: Arc<Context>,
) -> Action {
    Action::requeue(ctx.backoff.next(&key_of(guard.as_ref())))
}

// ---------------------------------------------------------------------------------------
// The gate backstop

#[instrument(skip_all, fields(namespace = deployment.namespace(), name = deployment.name_any()))]
async fn reconcile_gate(deployment: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started("gate");
    let result = gate_deployment(&deployment, &ctx).await;
    match &result {
        Ok(_) => ctx.backoff.reset(&key_of(deployment.as_ref())),
        Err(error) => report(&ctx, "gate", &deployment.object_ref(&()), error).await,
    }
    result
}

/// The backstop for one Deployment: observe (requirement, a fresh DatabaseMigration and,
/// when the status cannot decide, the database itself) → decide (pure, with its Events) →
/// apply (a resourceVersion-guarded patch, then the Events).
async fn gate_deployment(deployment: &Deployment, ctx: &Context) -> Result<Action> {
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
        observed.migration.as_ref(),
    )
    .await
}

/// What the backstop read about one Deployment.
struct GateObserved {
    requirement: Option<gate::Requirement>,
    migration: Option<GuardedMigration>,
    verdict: Verdict,
}

async fn observe_gate(ctx: &Context, deployment: &Deployment) -> Result<GateObserved> {
    let namespace = deployment.namespace().unwrap_or_default();
    let Some(requirement) = gate::requirement(deployment) else {
        return Ok(GateObserved {
            requirement: None,
            migration: None,
            verdict: Verdict::Satisfied,
        });
    };
    // Read fresh, not from a cache: a release must follow the status that caused it.
    let api: Api<GuardedMigration> = Api::namespaced(ctx.client.clone(), &namespace);
    let migration = api
        .get_opt(&requirement.migration)
        .await
        .map_err(Error::kube(format!(
            "get DatabaseMigration {}",
            requirement.migration
        )))?;
    let mut verdict = gate::evaluate(migration.as_ref(), &requirement);
    if let (
        Verdict::Held {
            fresh_read_helps: true,
            ..
        },
        Some(Ok(found)),
    ) = (&verdict, migration.as_ref().map(|g| &g.0))
    {
        // The status keeps only part of what the database reports: read the database.
        match crate::observe::probe_database(&ctx.client, &namespace, found).await {
            Ok(applied) => {
                verdict = gate::evaluate_with(migration.as_ref(), &requirement, Some(&applied));
            }
            Err(error) => {
                warn!(error = %error.chain(), "cannot read the database to decide a hold");
            }
        }
    }
    Ok(GateObserved {
        requirement: Some(requirement),
        migration,
        verdict,
    })
}

async fn apply_gate(
    ctx: &Context,
    deployment: &Deployment,
    change: &GateChange,
    notes: &[gate::GateNote],
    migration: Option<&GuardedMigration>,
) -> Result<Action> {
    let name = deployment.name_any();
    if let Some(patch) = gate::merge_patch(deployment, change) {
        let deployments: Api<Deployment> = Api::namespaced(
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
                    action: format!("update Deployment {name}"),
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
        info!(action, "gate changed Deployment");
    }
    let migration_ref = migration
        .and_then(|guard| guard.0.as_ref().ok())
        .map(|m| m.object_ref(&()));
    for note in notes {
        let reference = match note.on {
            gate::NoteOn::Deployment => deployment.object_ref(&()),
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
        }
    }
    Ok(Action::await_change())
}

/// A Deployment schemagate holds (label `schemagate.dev/held`) that no longer opted in: its
/// hold is released here, since the opted-in watch no longer sees it.
async fn reconcile_left_gate(deployment: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action> {
    if deployment.labels().contains_key(MIGRATION_LABEL) {
        return Ok(Action::await_change());
    }
    reconcile_gate(deployment, ctx).await
}

fn gate_error_policy(deployment: Arc<Deployment>, _error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.backoff.next(&key_of(deployment.as_ref())))
}

// ---------------------------------------------------------------------------------------
// Wiring

fn scoped<K>(client: &Client, namespace: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers until `shutdown` completes.
pub async fn run_controllers(
    ctx: Arc<Context>,
    migrations: Controller<GuardedMigration>,
    config: &ControllerConfig,
    shutdown: impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
) {
    let client = ctx.client.clone();
    let jobs: Api<Job> = scoped(&client, &config.namespace);
    let deployments: Api<Deployment> = scoped(&client, &config.namespace);
    let opted_in = watcher::Config::default().labels(MIGRATION_LABEL);
    let managed_jobs = watcher::Config::default().labels(&format!(
        "{}={}",
        job::MANAGED_BY_LABEL,
        job::MANAGED_BY
    ));

    let migration_controller = migrations
        .owns(jobs, managed_jobs)
        .watches(deployments.clone(), opted_in.clone(), |deployment| {
            let namespace = deployment.namespace();
            deployment.labels().get(MIGRATION_LABEL).map(|name| {
                ObjectRef::<GuardedMigration>::new(name)
                    .within(namespace.as_deref().unwrap_or_default())
            })
        })
        .with_config(Config::default().concurrency(config.concurrency))
        .graceful_shutdown_on(shutdown())
        .run(reconcile_migration, migration_error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "migration controller");
            }
        });

    let deployments_for_holds = deployments.clone();
    let ctx_for_holds = ctx.clone();
    let gate_controller = Controller::new(deployments, opted_in);
    let opted_in_deployments = gate_controller.store();
    let gate_controller = gate_controller
        .watches(
            scoped::<GuardedMigration>(&client, &config.namespace),
            watcher::Config::default(),
            move |migration| {
                let namespace = migration.meta().namespace.clone();
                let name = migration.meta().name.clone().unwrap_or_default();
                opted_in_deployments
                    .state()
                    .into_iter()
                    .filter(|d| {
                        d.namespace() == namespace && d.labels().get(MIGRATION_LABEL) == Some(&name)
                    })
                    .map(|d| ObjectRef::from_obj(d.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .with_config(Config::default().concurrency(config.concurrency))
        .graceful_shutdown_on(shutdown())
        .run(reconcile_gate, gate_error_policy, ctx)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "gate controller");
            }
        });

    // Holds whose Deployment left the gate (opt-in label removed): released by their owner.
    let held = watcher::Config::default().labels(HELD_LABEL);
    let left_gate_controller = Controller::new(deployments_for_holds, held)
        .with_config(Config::default().concurrency(config.concurrency))
        .graceful_shutdown_on(shutdown())
        .run(reconcile_left_gate, gate_error_policy, ctx_for_holds)
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "released-hold controller");
            }
        });

    futures::join!(migration_controller, gate_controller, left_gate_controller);
}
