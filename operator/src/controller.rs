//! The wiring of the controllers: migrations ([`crate::migration`]), the gate backstop and
//! the release of holds that left the gate ([`crate::gate::backstop`]).

use crate::context::Context;
use crate::gate::backstop;
use crate::migration::{self, job, observe};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::controller::{Config, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use schemagate_crds::{HELD_FOR_ANNOTATION, HELD_LABEL, MIGRATION_LABEL, condition, reason};
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
    /// How often the database of a running migration Job is read for its revision.
    pub revision_poll_interval: std::time::Duration,
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

/// Which changes of an opted-in Deployment concern its DatabaseMigration (whose status
/// lists the Deployments it holds): any change of the opt-in or held label, and of a held
/// Deployment its spec, what it is held for, and its deletion. The status churn of a
/// Deployment (pods turning Ready, scaling; the Deployment controller's updates of a paused
/// one) triggers no reconcile, no database connection. [`DeploymentTriggers`] remembers the
/// hash per cached Deployment.
fn deployment_trigger(deployment: &Deployment) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    deployment.labels().get(MIGRATION_LABEL).hash(&mut hasher);
    let held = deployment.labels().contains_key(HELD_LABEL);
    held.hash(&mut hasher);
    if held {
        deployment.meta().uid.hash(&mut hasher);
        deployment.meta().generation.hash(&mut hasher);
        deployment
            .annotations()
            .get(HELD_FOR_ANNOTATION)
            .hash(&mut hasher);
        deployment
            .meta()
            .deletion_timestamp
            .is_some()
            .hash(&mut hasher);
    }
    Some(hasher.finish())
}

/// A Deployment the watch reports deleted, marked so ([`deployment_trigger`] tells its
/// deletion from its last update).
fn marked_deleted(event: watcher::Event<Deployment>) -> watcher::Event<Deployment> {
    match event {
        watcher::Event::Delete(mut deployment) => {
            deployment
                .metadata
                .deletion_timestamp
                .get_or_insert_with(|| {
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        k8s_openapi::jiff::Timestamp::now(),
                    )
                });
            watcher::Event::Delete(deployment)
        }
        other => other,
    }
}

/// The DatabaseMigration an opted-in Deployment names.
fn migration_of(deployment: &Deployment) -> Option<ObjectRef<GuardedMigration>> {
    let migration = deployment.labels().get(MIGRATION_LABEL)?;
    Some(
        ObjectRef::<GuardedMigration>::new(migration)
            .within(&deployment.namespace().unwrap_or_default()),
    )
}

/// Drops what no controller reads from an object before it is cached: its managed fields
/// and kubectl's last-applied configuration (a copy of the whole object). At a thousand
/// objects that is most of a cache's memory.
pub fn slim<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    if let Some(annotations) = object.meta_mut().annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// [`slim`], and for the gate's cache of opted-in Deployments also their status and pod
/// spec: the gate reads labels, annotations, the pod template's annotations and
/// `spec.paused`, never containers or status.
fn slim_deployment(deployment: &mut Deployment) {
    slim(deployment);
    deployment.status = None;
    if let Some(template) = deployment.spec.as_mut().map(|s| &mut s.template) {
        template.spec = None;
    }
}

/// [`slim`], and for the cache of migration Jobs also their spec: the reconcile reads a
/// Job's labels, owner and status, never its pod template.
fn slim_job(job: &mut Job) {
    slim(job);
    job.spec = None;
}

/// What of an object calls for a reconcile when it changes: its spec (the generation),
/// labels, annotations, finalizers and deletion, not its status.
/// - For a DatabaseMigration (`schemagate.dev/retry` is an annotation): the operator writes
///   its status itself at the end of a reconcile, and reading the database again because of
///   it would double the connections for nothing.
/// - For an opted-in Deployment, what the gate decides on (pod template, `paused`, labels,
///   annotations): a rollout's status churn would otherwise cost a reconcile per update.
fn spec_and_metadata_trigger<K: Resource>(object: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let meta = object.meta();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    meta.uid.hash(&mut hasher);
    meta.generation.hash(&mut hasher);
    meta.labels.hash(&mut hasher);
    meta.annotations.hash(&mut hasher);
    meta.finalizers.hash(&mut hasher);
    meta.deletion_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// Tells the migration controller which DatabaseMigration changed in the Context's store
/// (every replica keeps that one store for the webhook and the gate; the controller reads
/// the same objects instead of caching a second copy).
pub type MigrationChanges = tokio::sync::broadcast::Sender<ObjectRef<GuardedMigration>>;

/// The DatabaseMigration controller over the Context's store, triggered by
/// [`spec_and_metadata_trigger`] changes: every DatabaseMigration in the store when it starts (a
/// new leader reconciles them all), then each one the store reports changed. When it
/// falls behind the store's reports, it takes the whole store again; the filter lets
/// through only what changed.
fn migration_controller(
    store: Store<GuardedMigration>,
    changes: &MigrationChanges,
) -> Controller<GuardedMigration> {
    let triggers = store_changes(store.clone(), changes)
        .predicate_filter(spec_and_metadata_trigger, Default::default());
    Controller::for_stream(triggers, store)
}

/// Every DatabaseMigration in the store, then each one the store reports changed, read
/// from the store after it took the change (so a reader of the store sees at least what
/// the change brought). One that falls behind the reports takes the whole store again.
fn store_changes(
    store: Store<GuardedMigration>,
    changes: &MigrationChanges,
) -> impl futures::Stream<Item = Result<GuardedMigration, watcher::Error>> + Send + 'static {
    use tokio::sync::broadcast::error::RecvError;
    // Subscribed before the snapshot is taken, so no change falls between the two.
    let receiver = changes.subscribe();
    let snapshot =
        |store: &Store<GuardedMigration>| -> Vec<Result<GuardedMigration, watcher::Error>> {
            store
                .state()
                .iter()
                .map(|m| Ok(m.as_ref().clone()))
                .collect()
        };
    let initial = futures::stream::iter(snapshot(&store));
    let live = futures::stream::unfold(
        (receiver, store.clone()),
        move |(mut receiver, store)| async move {
            loop {
                match receiver.recv().await {
                    Ok(changed) => {
                        if let Some(migration) = store.get(&changed) {
                            let next = vec![Ok(migration.as_ref().clone())];
                            return Some((next, (receiver, store)));
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        let next = snapshot(&store);
                        return Some((next, (receiver, store)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    )
    .flat_map(futures::stream::iter);
    initial.chain(live)
}

/// What of a migration Job the reconcile reads: its conditions (Complete, Failed and their
/// reasons), its start and completion times, and its deletion. The Job controller's other
/// bookkeeping (active, ready and terminating counts, pods not yet counted) triggers
/// nothing; that its pod became ready is told apart ([`job_ready`]).
fn job_trigger(job: &Job) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    job.metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .hash(&mut hasher);
    if let Some(status) = &job.status {
        for condition in status.conditions.iter().flatten() {
            (&condition.type_, &condition.status, &condition.reason).hash(&mut hasher);
        }
        status
            .start_time
            .as_ref()
            .map(|t| t.0.to_string())
            .hash(&mut hasher);
        status
            .completion_time
            .as_ref()
            .map(|t| t.0.to_string())
            .hash(&mut hasher);
    }
    hasher.finish()
}

/// Whether a Job's pod is ready.
fn job_ready(job: &Job) -> bool {
    job.status
        .as_ref()
        .is_some_and(|status| status.ready.unwrap_or(0) > 0)
}

/// Whether the Job controller has not written a Job's status yet: a Job just created.
fn not_started(job: &Job) -> bool {
    job.status.as_ref().is_none_or(|status| {
        status.start_time.is_none() && status.conditions.as_ref().is_none_or(Vec::is_empty)
    })
}

/// Passes a Job on when [`job_trigger`] changed since it was last seen, when its pod became
/// ready (not when it stops being ready: its end, or its failure, is told by the pod and
/// then by the Job's conditions), and always when it is deleted (a Job deleted
/// mid-migration is reported at once). A Job seen for the first time as it is created is
/// not passed on: the reconcile that created it knows, and reads it next when it starts.
/// The Jobs of a list are passed on when the list is done, when the cache has them.
#[derive(Default)]
struct JobTriggers {
    /// The last hash and readiness per Job UID (cleared when it grows large; a repeat
    /// costs one reconcile).
    seen: std::collections::HashMap<String, (u64, bool)>,
    /// The changed Jobs of a list under way.
    listed: Vec<Job>,
}

impl JobTriggers {
    const REMEMBERED: usize = 4096;

    fn pass(&mut self, event: watcher::Event<Job>) -> Vec<Job> {
        match event {
            watcher::Event::Delete(job) => {
                self.seen.remove(&job.uid().unwrap_or_default());
                vec![job]
            }
            watcher::Event::Apply(job) => self.changed(job, true).into_iter().collect(),
            watcher::Event::InitApply(job) => {
                if let Some(job) = self.changed(job, false) {
                    self.listed.push(job);
                }
                Vec::new()
            }
            watcher::Event::Init => {
                self.listed.clear();
                Vec::new()
            }
            watcher::Event::InitDone => std::mem::take(&mut self.listed),
        }
    }

    /// `live`: seen as it changed, not in a list.
    fn changed(&mut self, job: Job, live: bool) -> Option<Job> {
        if self.seen.len() >= Self::REMEMBERED {
            self.seen.clear();
        }
        let now = (job_trigger(&job), job_ready(&job));
        let pass = match self.seen.insert(job.uid().unwrap_or_default(), now) {
            None => !(live && not_started(&job) && job.metadata.deletion_timestamp.is_none()),
            Some((hash, ready)) => hash != now.0 || (now.1 && !ready),
        };
        pass.then_some(job)
    }
}

/// What of a migrator pod calls for a reconcile, each noticed once per pod:
/// - that it ended: the database is read again as soon as a migrator's process ends, not
///   only when the Job controller marks its Job Complete (that comes up to a second later,
///   batched). Whether the revision is applied is still decided by that read alone. While
///   a watch of the Job's database runs ([`crate::migration::watch`]), that watch reads at
///   once instead, on its open connection;
/// - each reason it cannot start (`ErrImagePull`, `CreateContainerConfigError`, ... see
///   [`observe::CANNOT_START`]): the status says so as soon as the kubelet reports it,
///   not at the reconcile's next recheck.
#[derive(Clone, Default)]
struct MigratorPodTriggers {
    /// What was acted on: a pod's UID when it ended, `UID/reason` for a reason it cannot
    /// start (cleared when it grows large; a repeat costs one reconcile).
    seen: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl MigratorPodTriggers {
    const REMEMBERED: usize = 4096;

    fn migration_to_reconcile(&self, pod: &Pod) -> Option<ObjectRef<GuardedMigration>> {
        let owner = pod.labels().get(job::OWNER_LABEL)?;
        let status = pod.status.as_ref()?;
        let containers = || {
            status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
        };
        let ended = pod_ended(pod);
        let uid = pod.uid().unwrap_or_default();
        let news = if ended {
            uid
        } else {
            let reason = containers().find_map(|c| {
                let reason = c.state.as_ref()?.waiting.as_ref()?.reason.as_deref()?;
                observe::CANNOT_START.contains(&reason).then_some(reason)
            })?;
            format!("{uid}/{reason}")
        };
        let first_time = match self.seen.lock() {
            Ok(mut seen) => {
                if seen.len() >= Self::REMEMBERED {
                    seen.clear();
                }
                seen.insert(news)
            }
            Err(_) => true,
        };
        first_time.then(|| {
            ObjectRef::<GuardedMigration>::new(owner).within(&pod.namespace().unwrap_or_default())
        })
    }
}

/// Whether a migrator pod's process ended (its phase, or a container terminated).
fn pod_ended(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
        || status
            .container_statuses
            .iter()
            .flatten()
            .any(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()))
}

/// Tells the migration controller of the opted-in Deployment changes [`deployment_trigger`]
/// sees, from the gate's own watch, after the gate's cache took each change: a reconcile
/// that lists its held Deployments from that cache sees at least what caused it. The
/// changes of a list are told when the list is done (the cache takes a list's objects all
/// at once then), with the Deployments the list no longer finds. One hash per cached
/// Deployment, with the DatabaseMigration it names: dropped when the Deployment is deleted.
struct DeploymentTriggers {
    seen: std::collections::HashMap<ObjectRef<Deployment>, (u64, Option<String>)>,
    /// The Deployments of a list under way, and the changed ones among them.
    listed: std::collections::HashSet<ObjectRef<Deployment>>,
    changed_in_list: Vec<Deployment>,
    to_migrations: tokio::sync::mpsc::UnboundedSender<Deployment>,
    /// Set when the first list is done: the cache holds every opted-in Deployment.
    listed_once: Arc<std::sync::atomic::AtomicBool>,
}

impl DeploymentTriggers {
    fn new(to_migrations: tokio::sync::mpsc::UnboundedSender<Deployment>) -> Self {
        DeploymentTriggers {
            seen: Default::default(),
            listed: Default::default(),
            changed_in_list: Vec::new(),
            to_migrations,
            listed_once: Default::default(),
        }
    }

    fn pass(&mut self, event: &watcher::Event<Deployment>) {
        match event {
            watcher::Event::Apply(deployment) => {
                if self.changed(deployment, false) {
                    self.tell(deployment.clone());
                }
            }
            watcher::Event::Delete(deployment) => {
                if self.changed(deployment, true) {
                    self.tell(deployment.clone());
                }
            }
            watcher::Event::InitApply(deployment) => {
                self.listed.insert(ObjectRef::from_obj(deployment));
                if self.changed(deployment, false) {
                    self.changed_in_list.push(deployment.clone());
                }
            }
            watcher::Event::Init => {
                self.listed.clear();
                self.changed_in_list.clear();
            }
            watcher::Event::InitDone => {
                self.listed_once
                    .store(true, std::sync::atomic::Ordering::Release);
                let listed = std::mem::take(&mut self.listed);
                let mut gone = Vec::new();
                self.seen.retain(|key, (_, migration)| {
                    let kept = listed.contains(key);
                    if !kept && let Some(migration) = migration.take() {
                        gone.push(Deployment {
                            metadata: kube::api::ObjectMeta {
                                name: Some(key.name.clone()),
                                namespace: key.namespace.clone(),
                                labels: Some([(MIGRATION_LABEL.to_string(), migration)].into()),
                                ..Default::default()
                            },
                            ..Default::default()
                        });
                    }
                    kept
                });
                for deployment in std::mem::take(&mut self.changed_in_list)
                    .into_iter()
                    .chain(gone)
                {
                    self.tell(deployment);
                }
            }
        }
    }

    /// Whether the Deployment's hash changed; remembers it (forgets it when deleted).
    fn changed(&mut self, deployment: &Deployment, deleted: bool) -> bool {
        let Some(hash) = deployment_trigger(deployment) else {
            return false;
        };
        let key = ObjectRef::from_obj(deployment);
        let before = if deleted {
            self.seen.remove(&key)
        } else {
            let migration = deployment.labels().get(MIGRATION_LABEL).cloned();
            self.seen.insert(key, (hash, migration))
        };
        before.map(|(hash, _)| hash) != Some(hash)
    }

    fn tell(&self, deployment: Deployment) {
        // No receiver: the controllers are stopping.
        let _ = self.to_migrations.send(deployment);
    }
}

/// Whether a Job is Complete or Failed.
fn job_finished(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

/// The DatabaseMigrations waiting for another migration of their database to end: when a
/// migration Job finishes, they look again at once rather than at their next recheck.
fn waiting_for_turn(store: &Store<GuardedMigration>) -> Vec<ObjectRef<GuardedMigration>> {
    store
        .state()
        .iter()
        .filter(|guarded| {
            guarded.0.as_ref().is_ok_and(|migration| {
                migration.status.as_ref().is_some_and(|status| {
                    status.conditions.iter().any(|c| {
                        c.type_ == condition::READY
                            && c.reason == reason::WAITING_FOR_OTHER_MIGRATION
                    })
                })
            })
        })
        .map(|guarded| ObjectRef::from_obj(guarded.as_ref()))
        .collect()
}

/// How long the end of a term waits for watches writing the status of a release.
const WATCH_FINISH_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs both controllers until `shutdown` completes.
pub async fn run_controllers(
    ctx: Arc<Context>,
    migrations: &MigrationChanges,
    config: &ControllerConfig,
    shutdown: impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
) {
    ctx.held_notes.clear();
    ctx.fresh_readings.clear();
    // The watches of running Jobs' databases stop with the controllers' term (a lost
    // Lease, shutdown) at once, not after the last reconcile has finished; their readings
    // no longer speak for the databases (another replica writes the statuses now).
    let term_ended = shutdown();
    let watches_ctx = ctx.clone();
    tokio::spawn(async move {
        term_ended.await;
        watches_ctx.revision_watches.stop_all();
        watches_ctx.fresh_readings.clear();
    });
    let client = ctx.client.clone();
    let jobs: Api<Job> = scoped(&client, &config.namespace);
    let deployments: Api<Deployment> = scoped(&client, &config.namespace);
    let opted_in = watcher::Config::default().labels(MIGRATION_LABEL);
    let managed_jobs = watcher::Config::default().labels(&format!(
        "{}={}",
        job::MANAGED_BY_LABEL,
        job::MANAGED_BY
    ));

    // One watch of the opted-in Deployments for both controllers: the gate caches them,
    // and the migration controller hears of the changes that concern it once the cache has
    // them (its reconcile lists a migration's held Deployments from that cache).
    let (reader, writer) = reflector::store();
    let (to_migrations, from_gate) = tokio::sync::mpsc::unbounded_channel();
    let mut deployment_triggers = DeploymentTriggers::new(to_migrations);
    let deployments_listed = deployment_triggers.listed_once.clone();
    let opted_in_changes = watcher::watcher(deployments.clone(), opted_in)
        .default_backoff()
        .map_ok(marked_deleted)
        .modify(slim_deployment)
        .reflect(writer)
        .inspect_ok(move |event| deployment_triggers.pass(event));
    let deployment_changes = futures::stream::unfold(from_gate, |mut from_gate| async move {
        let deployment = from_gate.recv().await?;
        Some((Ok::<_, watcher::Error>(deployment), from_gate))
    });
    let pod_triggers = MigratorPodTriggers::default();
    let watches_ctx = ctx.clone();
    let pods: Api<Pod> = scoped(&client, &config.namespace);
    let migrator_pods = watcher::Config::default().labels(&format!(
        "{}={},{}",
        job::MANAGED_BY_LABEL,
        job::MANAGED_BY,
        job::OWNER_LABEL
    ));
    let mut job_triggers = JobTriggers::default();
    let (jobs_cached, job_writer) = reflector::store();
    ctx.set_caches(Some(crate::context::Caches {
        deployments: reader.clone(),
        deployments_listed,
        jobs: jobs_cached,
    }));
    let job_changes = watcher::watcher(jobs, managed_jobs)
        .default_backoff()
        .modify(slim_job)
        .reflect(job_writer)
        .flat_map(move |event| {
            futures::stream::iter(match event {
                Ok(event) => job_triggers.pass(event).into_iter().map(Ok).collect(),
                Err(error) => vec![Err(error)],
            })
        });
    let store = ctx.migrations.clone();
    let migration_controller = migration_controller(ctx.migrations.clone(), migrations)
        .watches_stream(job_changes, move |job| {
            // Its owner; and when it finished (or went), those waiting for their turn.
            let owner = job
                .owner_references()
                .iter()
                .find(|o| o.kind == "DatabaseMigration")
                .map(|o| ObjectRef::new(&o.name).within(&job.namespace().unwrap_or_default()));
            // Only migration Jobs hold a database's turn.
            let migration_job = job.labels().contains_key(job::DATABASE_LABEL);
            let waiting = if migration_job
                && (job_finished(&job) || job.metadata.deletion_timestamp.is_some())
            {
                waiting_for_turn(&store)
            } else {
                Vec::new()
            };
            owner.into_iter().chain(waiting)
        })
        .watches(pods, migrator_pods, {
            let pods_store = ctx.migrations.clone();
            move |pod| {
                let migration = pod_triggers.migration_to_reconcile(&pod)?;
                // A watch of its database runs: it reads at once on its open connection, and
                // reconciles if the revision is there. Or the status already reports the
                // revision: an early read has nothing to add. The Job's end reconciles in any
                // case.
                let early_read_needed = !pod_ended(&pod)
                    || !(watches_ctx.revision_watches.poke(
                        migration.namespace.as_deref().unwrap_or_default(),
                        &migration.name,
                    ) || pods_store.get(&migration).is_some_and(|guard| {
                        guard
                            .0
                            .as_ref()
                            .is_ok_and(migration::status_holds_spec_revision)
                    }));
                early_read_needed.then_some(migration)
            }
        })
        .watches_stream(deployment_changes, |deployment| migration_of(&deployment))
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

    let deployments_for_holds = deployments;
    let ctx_for_holds = ctx.clone();
    let gate_controller = Controller::for_stream(
        opted_in_changes
            .applied_objects()
            .predicate_filter(spec_and_metadata_trigger, Default::default()),
        reader,
    );
    let opted_in_deployments = gate_controller.store();
    // The backstop decides from the DatabaseMigration store, told of each change after the
    // store took it: a release follows the status that caused it.
    let gate_controller = gate_controller
        .watches_stream(
            store_changes(ctx.migrations.clone(), migrations),
            move |migration| {
                crate::context::deployments_of(
                    &opted_in_deployments,
                    migration.meta().namespace.as_deref().unwrap_or_default(),
                    &migration.name_any(),
                )
                .iter()
                .map(|d| ObjectRef::from_obj(d.as_ref()))
                .collect::<Vec<_>>()
            },
        )
        .with_config(Config::default().concurrency(config.concurrency))
        .graceful_shutdown_on(shutdown())
        .run(
            backstop::reconcile_gate::<Deployment>,
            backstop::error_policy,
            ctx.clone(),
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
    ctx.revision_watches.stop_all();
    // A watch whose reading the gate may have released on writes its status first.
    ctx.revision_watches.finished(WATCH_FINISH_LIMIT).await;
    // Reconciles that were finishing after the term ended may have recorded readings.
    ctx.fresh_readings.clear();
    ctx.set_caches(None);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    fn deployment(labels: &[(&str, &str)], ready: i32, resource_version: &str) -> Deployment {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "labels": labels,
                "resourceVersion": resource_version},
            "status": {"readyReplicas": ready}
        }))
        .unwrap()
    }

    #[test]
    fn the_migration_controller_hears_from_the_gates_watch_only_what_concerns_it() {
        let (to_migrations, mut heard) = tokio::sync::mpsc::unbounded_channel();
        let mut triggers = DeploymentTriggers::new(to_migrations);
        let mut count = || std::iter::from_fn(|| heard.try_recv().ok()).count();
        let opted_in = [(MIGRATION_LABEL, "app-db")];
        let held = [(MIGRATION_LABEL, "app-db"), (HELD_LABEL, "true")];

        triggers.pass(&watcher::Event::Init);
        triggers.pass(&watcher::Event::InitApply(deployment(&opted_in, 0, "1")));
        triggers.pass(&watcher::Event::InitDone);
        assert_eq!(count(), 1, "first seen");
        for ready in 1..=100 {
            let churned = deployment(&opted_in, ready, &format!("{}", ready + 1));
            triggers.pass(&watcher::Event::Apply(churned));
        }
        assert_eq!(count(), 0, "pods turning Ready");

        triggers.pass(&watcher::Event::Apply(deployment(&held, 100, "200")));
        assert_eq!(count(), 1, "held");
        triggers.pass(&watcher::Event::Apply(deployment(&held, 99, "201")));
        assert_eq!(count(), 0, "a held Deployment's status");
        let deleted = marked_deleted(watcher::Event::Delete(deployment(&held, 0, "202")));
        triggers.pass(&deleted);
        assert_eq!(count(), 1, "deleted while held");
        assert!(triggers.seen.is_empty(), "forgotten when deleted");

        // A new list: what it brings is told when it is done (when the cache has it).
        triggers.pass(&watcher::Event::Apply(deployment(&opted_in, 0, "300")));
        assert_eq!(count(), 1, "created again");
        triggers.pass(&watcher::Event::Init);
        triggers.pass(&watcher::Event::InitApply(deployment(&held, 0, "301")));
        assert_eq!(count(), 0, "not before the list is done");
        triggers.pass(&watcher::Event::InitDone);
        assert_eq!(count(), 1, "held while the watch was down");

        // Deleted while the watch was down: a new list that lacks it forgets it, and its
        // DatabaseMigration hears of it.
        triggers.pass(&watcher::Event::Init);
        triggers.pass(&watcher::Event::InitDone);
        assert!(triggers.seen.is_empty(), "not in the new list");
        let gone: Vec<Deployment> = std::iter::from_fn(|| heard.try_recv().ok()).collect();
        assert_eq!(gone.len(), 1);
        assert_eq!(
            migration_of(&gone[0]),
            Some(ObjectRef::new("app-db").within("shop"))
        );
    }

    #[test]
    fn status_churn_of_a_deployment_that_is_not_held_triggers_nothing() {
        let opted_in = [(MIGRATION_LABEL, "app-db")];
        let first = deployment_trigger(&deployment(&opted_in, 0, "1"));
        for ready in 1..=100 {
            assert_eq!(
                deployment_trigger(&deployment(&opted_in, ready, &format!("{}", ready + 1))),
                first,
                "pods turning Ready"
            );
        }
        assert_eq!(
            migration_of(&deployment(&opted_in, 0, "1")),
            Some(ObjectRef::new("app-db").within("shop"))
        );
    }

    #[test]
    fn the_gate_ignores_a_deployments_status_churn() {
        let opted_in = [(MIGRATION_LABEL, "app-db")];
        let mut first = deployment(&opted_in, 0, "1");
        first.metadata.generation = Some(1);
        let base = spec_and_metadata_trigger(&first);
        let mut churned = deployment(&opted_in, 3, "2");
        churned.metadata.generation = Some(1);
        assert_eq!(
            spec_and_metadata_trigger(&churned),
            base,
            "pods turning Ready"
        );
        let mut new_spec = churned.clone();
        new_spec.metadata.generation = Some(2);
        assert_ne!(
            spec_and_metadata_trigger(&new_spec),
            base,
            "a new pod template or paused"
        );
        let held = deployment(&[(MIGRATION_LABEL, "app-db"), (HELD_LABEL, "true")], 3, "3");
        let mut held = held;
        held.metadata.generation = Some(1);
        assert_ne!(spec_and_metadata_trigger(&held), base, "a label");
    }

    #[test]
    fn holds_releases_and_a_new_migration_label_trigger() {
        let opted_in = [(MIGRATION_LABEL, "app-db")];
        let held = [(MIGRATION_LABEL, "app-db"), (HELD_LABEL, "true")];
        let not_held = deployment_trigger(&deployment(&opted_in, 2, "1"));
        let held_1 = deployment_trigger(&deployment(&held, 2, "2"));
        assert_ne!(held_1, not_held, "held");
        // A held Deployment's status churn does not count; its spec, what it is held for
        // and its deletion do.
        assert_eq!(
            deployment_trigger(&deployment(&held, 1, "3")),
            held_1,
            "the Deployment controller's status update of a paused Deployment"
        );
        let mut new_spec = deployment(&held, 1, "4");
        new_spec.metadata.generation = Some(2);
        assert_ne!(deployment_trigger(&new_spec), held_1, "a new pod template");
        let mut held_for = deployment(&held, 1, "4");
        held_for
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(HELD_FOR_ANNOTATION.into(), "app-db@3".into());
        assert_ne!(
            deployment_trigger(&held_for),
            held_1,
            "held for another revision"
        );
        let watcher::Event::Delete(deleted) =
            marked_deleted(watcher::Event::Delete(deployment(&held, 1, "5")))
        else {
            panic!("still a deletion")
        };
        assert_ne!(deployment_trigger(&deleted), held_1, "deleted while held");
        assert_eq!(
            deployment_trigger(&deployment(&opted_in, 1, "4")),
            not_held,
            "released: back to the hash of an opted-in Deployment"
        );
        let renamed = [(MIGRATION_LABEL, "schema")];
        assert_ne!(
            deployment_trigger(&deployment(&renamed, 1, "5")),
            not_held,
            "another migration"
        );
        assert_eq!(
            migration_of(&deployment(&renamed, 1, "5")),
            Some(ObjectRef::new("schema").within("shop"))
        );
        assert_eq!(migration_of(&deployment(&[], 1, "6")), None, "opted out");
    }

    fn migration(value: serde_json::Value) -> GuardedMigration {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_status_write_is_no_trigger_but_spec_and_retry_are() {
        let base = serde_json::json!({
            "apiVersion": "schemagate.dev/v1alpha1", "kind": "DatabaseMigration",
            "metadata": {"name": "app-db", "namespace": "shop", "uid": "u1", "generation": 1,
                "managedFields": [{"manager": "kubectl"}]},
            "spec": {"database": {"engine": "postgres", "urlSecretRef": {"name": "db"}},
                "migrator": {"image": "app:v1"}, "revision": "1"}
        });
        let first = spec_and_metadata_trigger(&migration(base.clone()));
        let mut status = base.clone();
        status["status"] = serde_json::json!({"appliedRevision": "1"});
        status["metadata"]["managedFields"] = serde_json::json!([{"manager": "schemagate"}]);
        assert_eq!(
            spec_and_metadata_trigger(&migration(status)),
            first,
            "status only"
        );
        let mut spec = base.clone();
        spec["metadata"]["generation"] = 2.into();
        assert_ne!(spec_and_metadata_trigger(&migration(spec)), first, "spec");
        let mut retry = base.clone();
        retry["metadata"]["annotations"] = serde_json::json!({"schemagate.dev/retry": "1"});
        assert_ne!(spec_and_metadata_trigger(&migration(retry)), first, "retry");
        let mut deleting = base.clone();
        deleting["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z".into();
        assert_ne!(
            spec_and_metadata_trigger(&migration(deleting)),
            first,
            "deletion"
        );
        let mut recreated = base;
        recreated["metadata"]["uid"] = "u2".into();
        assert_ne!(
            spec_and_metadata_trigger(&migration(recreated)),
            first,
            "recreated"
        );
    }

    #[test]
    fn slim_drops_managed_fields_and_the_last_applied_copy_only() {
        let mut object = migration(serde_json::json!({
            "apiVersion": "schemagate.dev/v1alpha1", "kind": "DatabaseMigration",
            "metadata": {"name": "app-db", "namespace": "shop",
                "managedFields": [{"manager": "kubectl"}],
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}",
                    "schemagate.dev/retry": "2"}},
            "spec": {"database": {"engine": "postgres", "urlSecretRef": {"name": "db"}},
                "migrator": {"image": "app:v1"}, "revision": "1"}
        }));
        slim(&mut object);
        assert!(object.meta().managed_fields.is_none());
        assert_eq!(
            object.meta().annotations.clone().unwrap_or_default(),
            [("schemagate.dev/retry".to_string(), "2".to_string())].into()
        );
    }

    #[test]
    fn the_gate_cache_keeps_what_the_gate_reads() {
        let mut cached: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop",
                "labels": {MIGRATION_LABEL: "app-db"},
                "annotations": {"schemagate.dev/held-for": "2"},
                "managedFields": [{"manager": "kubectl"}]},
            "spec": {"paused": true, "selector": {},
                "template": {"metadata": {"annotations": {"schemagate.dev/revision": "2"}},
                    "spec": {"containers": [{"name": "app", "image": "app:v2"}]}}},
            "status": {"readyReplicas": 2}
        }))
        .unwrap();
        let original = cached.clone();
        slim_deployment(&mut cached);
        assert!(cached.status.is_none() && cached.meta().managed_fields.is_none());
        assert_eq!(cached.labels(), original.labels());
        assert_eq!(cached.annotations(), original.annotations());
        let spec = cached.spec.as_ref().unwrap();
        assert_eq!(spec.paused, Some(true));
        assert!(spec.template.spec.is_none());
        assert_eq!(
            spec.template.metadata,
            original.spec.as_ref().unwrap().template.metadata
        );
    }

    #[test]
    fn job_bookkeeping_is_no_trigger_but_its_outcome_and_deletion_are() {
        let job = |status: serde_json::Value| -> Job {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "app-db-1", "namespace": "shop", "uid": "j1"},
                "status": status
            }))
            .unwrap()
        };
        let mut triggers = JobTriggers::default();
        let apply = |status| watcher::Event::Apply(job(status));
        assert!(
            triggers.pass(apply(serde_json::json!({}))).is_empty(),
            "created: its creator knows"
        );
        let started = serde_json::json!({"startTime": "2026-11-30T00:00:00Z", "active": 1});
        assert_eq!(triggers.pass(apply(started.clone())).len(), 1, "started");
        let mut ready = started.clone();
        ready["ready"] = 1.into();
        assert_eq!(triggers.pass(apply(ready)).len(), 1, "its pod is ready");
        let mut counted = started.clone();
        counted["uncountedTerminatedPods"] = serde_json::json!({"succeeded": ["p"]});
        counted["active"] = 0.into();
        assert!(triggers.pass(apply(counted)).is_empty(), "bookkeeping");
        let mut complete = started.clone();
        complete["conditions"] = serde_json::json!([{"type": "Complete", "status": "True"}]);
        assert_eq!(triggers.pass(apply(complete.clone())).len(), 1, "complete");
        assert!(
            triggers.pass(apply(complete.clone())).is_empty(),
            "no change"
        );
        assert_eq!(
            triggers
                .pass(watcher::Event::Delete(job(complete.clone())))
                .len(),
            1,
            "deleted"
        );

        // A new list: its changes are passed on when it is done (the cache has them then),
        // a Job not started yet too (its creator may be gone).
        assert!(triggers.pass(watcher::Event::Init).is_empty());
        let mut other = job(serde_json::json!({}));
        other.metadata.uid = Some("j2".into());
        assert!(triggers.pass(watcher::Event::InitApply(other)).is_empty());
        assert!(
            triggers
                .pass(watcher::Event::InitApply(job(complete)))
                .is_empty(),
            "not before the list is done"
        );
        assert_eq!(triggers.pass(watcher::Event::InitDone).len(), 2);
        assert!(triggers.pass(watcher::Event::InitDone).is_empty());
    }

    #[test]
    fn a_migrator_pod_that_ended_triggers_its_migration_once() {
        let pod = |phase: &str, uid: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "m-1", "namespace": "shop", "uid": uid,
                    "labels": {job::OWNER_LABEL: "app-db"}},
                "status": {"phase": phase}
            }))
            .unwrap()
        };
        let triggers = MigratorPodTriggers::default();
        assert_eq!(triggers.migration_to_reconcile(&pod("Running", "a")), None);
        let expected = Some(ObjectRef::new("app-db").within("shop"));
        assert_eq!(
            triggers.migration_to_reconcile(&pod("Succeeded", "a")),
            expected
        );
        assert_eq!(
            triggers.migration_to_reconcile(&pod("Succeeded", "a")),
            None,
            "already acted on"
        );
        assert_eq!(
            triggers.migration_to_reconcile(&pod("Failed", "b")),
            expected
        );
        let waiting = |uid: &str, reason: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "m-2", "namespace": "shop", "uid": uid,
                    "labels": {job::OWNER_LABEL: "app-db"}},
                "status": {"phase": "Pending", "containerStatuses": [{"name": "migrate",
                    "image": "m:1", "imageID": "", "ready": false, "restartCount": 0,
                    "state": {"waiting": {"reason": reason}}}]}
            }))
            .unwrap()
        };
        assert_eq!(
            triggers.migration_to_reconcile(&waiting("c", "ContainerCreating")),
            None,
            "starting"
        );
        assert_eq!(
            triggers.migration_to_reconcile(&waiting("c", "ErrImagePull")),
            expected,
            "cannot start"
        );
        assert_eq!(
            triggers.migration_to_reconcile(&waiting("c", "ErrImagePull")),
            None,
            "the same reason again"
        );
        assert_eq!(
            triggers.migration_to_reconcile(&waiting("c", "ImagePullBackOff")),
            expected,
            "a new reason"
        );
    }

    #[test]
    fn only_migrations_waiting_for_their_turn_are_woken_when_a_job_finishes() {
        let migration = |name: &str, reason: &str| -> GuardedMigration {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "schemagate.dev/v1alpha1",
                "kind": "DatabaseMigration",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"revision": "2", "database": {"engine": "postgres",
                    "urlSecretRef": {"name": "db", "key": "url"},
                    "tracking": {"tool": "flyway"}},
                    "migrator": {"image": "m:1"}},
                "status": {"conditions": [{"type": "Ready", "status": "False", "reason": reason,
                    "message": "m", "lastTransitionTime": "2026-11-30T00:00:00Z"}]}
            }))
            .unwrap()
        };
        let (store, mut writer) = reflector::store::<GuardedMigration>();
        for (name, reason) in [
            ("waits", reason::WAITING_FOR_OTHER_MIGRATION),
            ("runs", reason::MIGRATION_RUNNING),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(migration(name, reason)));
        }
        assert_eq!(
            waiting_for_turn(&store),
            vec![ObjectRef::new("waits").within("shop")]
        );
    }
}
