//! The one state shared by the controllers and the webhook.

use crate::telemetry::Metrics;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use schemagate_crds::DatabaseMigration;
use std::sync::Arc;

/// The field manager of every write schemagate makes.
pub const FIELD_MANAGER: &str = "schemagate";

/// A DatabaseMigration as the controllers and the webhook read it: one that cannot be
/// parsed still has a name and a namespace to report on.
pub type GuardedMigration = DeserializeGuard<DatabaseMigration>;

/// A clock that tests can replace.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Every DatabaseMigration the operator watches, for gate decisions in the controller
    /// and the webhook alike.
    pub migrations: Store<DeserializeGuard<DatabaseMigration>>,
    pub clock: Clock,
    /// The operator's own user name, from a SelfSubjectReview at start-up.
    pub identity: std::sync::OnceLock<String>,
    /// Per-object backoff of failed reconciles.
    pub backoff: crate::backoff::Backoff,
    /// Turns on databases: held from "is another migration running on it?" to the Job's
    /// creation.
    pub database_turns: DatabaseTurns,
    /// The one namespace the operator watches, when it is confined to one; all otherwise.
    pub watch_namespace: Option<String>,
    /// The gate's cache of opted-in Deployments (slimmed: labels, annotations, spec without
    /// its pod spec), while this replica runs the controllers.
    pub deployments: std::sync::RwLock<Option<Store<Deployment>>>,
}

/// Migration Jobs start one at a time per database. Only the leader starts Jobs; within it,
/// reconciles of two DatabaseMigrations on one database take turns here, so the check for
/// a running Job and the creation of the next one cannot interleave. Locks are shared by
/// hash of the database key: two databases that share one merely start their Jobs one
/// after the other, which takes milliseconds.
#[derive(Default)]
pub struct DatabaseTurns {
    shards: [tokio::sync::Mutex<()>; 16],
}

impl DatabaseTurns {
    pub async fn take(&self, database_key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let shard = database_key.bytes().fold(0usize, |hash, byte| {
            hash.wrapping_mul(31).wrapping_add(usize::from(byte))
        });
        self.shards[shard % self.shards.len()].lock().await
    }
}

impl Context {
    pub fn new(
        client: Client,
        migrations: Store<DeserializeGuard<DatabaseMigration>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: "schemagate".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            migrations,
            clock: Arc::new(Timestamp::now),
            identity: Default::default(),
            backoff: Default::default(),
            database_turns: Default::default(),
            watch_namespace: None,
            deployments: Default::default(),
        }
    }

    pub fn set_deployments(&self, deployments: Option<Store<Deployment>>) {
        match self.deployments.write() {
            Ok(mut slot) => *slot = deployments,
            Err(poisoned) => *poisoned.into_inner() = deployments,
        }
    }

    /// The gate's cache of opted-in Deployments, once it has listed them.
    pub fn listed_deployments(&self) -> Option<Store<Deployment>> {
        let store = match self.deployments.read() {
            Ok(slot) => slot.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }?;
        let listed = futures::FutureExt::now_or_never(store.wait_until_ready());
        matches!(listed, Some(Ok(()))).then_some(store)
    }

    pub fn now(&self) -> Timestamp {
        (self.clock)()
    }

    /// Whether the DatabaseMigrations are listed, waiting at most `limit`. Polls in short
    /// slices: the store's readiness future wakes only its latest waiter, so a wait next to
    /// the controller's own would otherwise never end.
    pub async fn migrations_listed(&self, limit: std::time::Duration) -> bool {
        let slice = std::time::Duration::from_millis(50);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(result) =
                tokio::time::timeout(slice, self.migrations.wait_until_ready()).await
            {
                return result.is_ok();
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
        }
    }
}
