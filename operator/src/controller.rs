//! The wiring of the controllers: migrations ([`crate::migration`]), the gate backstop and
//! the release of holds that left the gate ([`crate::gate::backstop`]).

use crate::context::Context;
use crate::gate::backstop;
use crate::migration::{self, job};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::api::Api;
use kube::runtime::controller::{Config, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use schemagate_crds::{HELD_LABEL, MIGRATION_LABEL};
use std::future::Future;
use std::sync::Arc;
use tracing::warn;

use crate::context::GuardedMigration;

/// How the controllers run.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Only this namespace when set; all namespaces otherwise.
    pub namespace: Option<String>,
    /// Reconciles running at once, per controller.
    pub concurrency: u16,
}

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
        .run(
            migration::reconcile_migration,
            migration::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            match result {
                // An opted-in Deployment names a DatabaseMigration that does not exist (yet):
                // the gate holds it and says so; nothing to reconcile here.
                Err(kube::runtime::controller::Error::ObjectNotFound(_)) | Ok(_) => {}
                Err(error) => warn!(%error, "migration controller"),
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
        .run(
            backstop::reconcile_gate::<Deployment>,
            backstop::error_policy,
            ctx,
        )
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
        .run(
            backstop::reconcile_left_gate::<Deployment>,
            backstop::error_policy,
            ctx_for_holds,
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                warn!(%error, "released-hold controller");
            }
        });

    futures::join!(migration_controller, gate_controller, left_gate_controller);
}
