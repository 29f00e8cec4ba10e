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

/// Which changes of an opted-in Deployment concern its DatabaseMigration: the held ones
/// (its status lists them) and any change of the opt-in or held label. The status churn of
/// a Deployment that is not held (pods turning Ready, scaling) triggers no reconcile, no
/// database connection.
#[derive(Clone, Default)]
struct DeploymentTriggers {
    /// The opt-in and held labels last seen, per Deployment.
    seen: Arc<std::sync::Mutex<std::collections::HashMap<DeploymentKey, LabelState>>>,
}

/// A Deployment's namespace and name.
type DeploymentKey = (String, String);
/// The DatabaseMigration it opts in to, and whether it is held.
type LabelState = (String, bool);

impl DeploymentTriggers {
    fn migration_to_reconcile(
        &self,
        deployment: &Deployment,
    ) -> Option<ObjectRef<GuardedMigration>> {
        let namespace = deployment.namespace().unwrap_or_default();
        let migration = deployment.labels().get(MIGRATION_LABEL)?.clone();
        let held = deployment.labels().contains_key(HELD_LABEL);
        let key = (namespace.clone(), deployment.name_any());
        let state = (migration.clone(), held);
        let changed = match self.seen.lock() {
            Ok(mut seen) => seen.insert(key, state.clone()) != Some(state),
            Err(_) => true,
        };
        (held || changed).then(|| ObjectRef::<GuardedMigration>::new(&migration).within(&namespace))
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

    let triggers = DeploymentTriggers::default();
    let migration_controller = migrations
        .owns(jobs, managed_jobs)
        .watches(deployments.clone(), opted_in.clone(), move |deployment| {
            triggers.migration_to_reconcile(&deployment)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    fn deployment(labels: &[(&str, &str)], ready: i32) -> Deployment {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": labels},
            "status": {"readyReplicas": ready}
        }))
        .unwrap()
    }

    #[test]
    fn status_churn_of_a_deployment_that_is_not_held_triggers_nothing() {
        let triggers = DeploymentTriggers::default();
        let opted_in = [(MIGRATION_LABEL, "app-db")];
        let first = triggers.migration_to_reconcile(&deployment(&opted_in, 0));
        assert_eq!(
            first,
            Some(ObjectRef::new("app-db").within("shop")),
            "first seen"
        );
        for ready in 1..=100 {
            assert_eq!(
                triggers.migration_to_reconcile(&deployment(&opted_in, ready)),
                None,
                "pods turning Ready"
            );
        }
    }

    #[test]
    fn holds_releases_and_a_new_migration_label_trigger() {
        let triggers = DeploymentTriggers::default();
        let opted_in = [(MIGRATION_LABEL, "app-db")];
        let held = [(MIGRATION_LABEL, "app-db"), (HELD_LABEL, "true")];
        triggers.migration_to_reconcile(&deployment(&opted_in, 2));
        let expected = Some(ObjectRef::new("app-db").within("shop"));
        assert_eq!(
            triggers.migration_to_reconcile(&deployment(&held, 2)),
            expected
        );
        // Every change of a held Deployment counts (its deletion too).
        assert_eq!(
            triggers.migration_to_reconcile(&deployment(&held, 1)),
            expected
        );
        assert_eq!(
            triggers.migration_to_reconcile(&deployment(&opted_in, 1)),
            expected,
            "released"
        );
        let renamed = [(MIGRATION_LABEL, "schema")];
        assert_eq!(
            triggers.migration_to_reconcile(&deployment(&renamed, 1)),
            Some(ObjectRef::new("schema").within("shop"))
        );
        assert_eq!(
            triggers.migration_to_reconcile(&deployment(&[], 1)),
            None,
            "opted out"
        );
    }
}
