//! The one state shared by the controllers and the webhook.

use crate::telemetry::Metrics;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use schemagate_crds::DatabaseMigration;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

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
    /// The last "still held" Event per held workload, so that an unchanged one is not
    /// published again at each change of its DatabaseMigration.
    pub held_notes: HeldNotes,
    /// The controllers' caches, while this replica runs them.
    pub caches: std::sync::RwLock<Option<Caches>>,
    /// The databases watched while their migration Jobs run.
    pub revision_watches: Watches,
    /// How often a watched database is read (`--revision-poll-interval`).
    pub revision_poll: std::time::Duration,
    /// One turn per DatabaseMigration, for the controller's reconciles and the watches'.
    pub migration_locks: ObjectLocks,
    /// What databases reported a moment ago, before the statuses can say so.
    pub fresh_readings: FreshReadings,
    /// Tells the controllers a DatabaseMigration changed without a change in the store (a
    /// [`FreshReading`] of its database).
    pub migration_changes: Option<tokio::sync::broadcast::Sender<ObjectRef<GuardedMigration>>>,
}

/// What the controllers cache, for the migration reconcile to read instead of asking the
/// API server. Each is filled by a watch whose changes reach the controllers only after the
/// cache took them.
#[derive(Clone)]
pub struct Caches {
    /// The gate's opted-in Deployments (slimmed: labels, annotations, spec without its pod
    /// spec).
    pub deployments: Store<Deployment>,
    /// Whether that cache has taken its first list (set by the watch itself: a wait on the
    /// store's readiness here would take the wake-up from the controller waiting on it).
    pub deployments_listed: Arc<std::sync::atomic::AtomicBool>,
    /// Migration and revision-graph Jobs (slimmed: metadata and status).
    pub jobs: Store<Job>,
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

/// The opted-in Deployments of one DatabaseMigration in a cache of them.
pub fn deployments_of(
    cache: &Store<Deployment>,
    namespace: &str,
    migration: &str,
) -> Vec<Arc<Deployment>> {
    cache.state_filter(|d| {
        d.metadata.namespace.as_deref() == Some(namespace)
            && d.metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(schemagate_crds::MIGRATION_LABEL))
                .map(String::as_str)
                == Some(migration)
    })
}

/// What the backstop last said of each workload it holds ("rollout paused by schemagate
/// (...)"): the same words again are no news. Keyed by the workload's UID, with a hash of
/// the message; forgotten at the release, and all of it when it grows large (a repeat then
/// costs one Event).
#[derive(Default)]
pub struct HeldNotes {
    last: std::sync::Mutex<std::collections::HashMap<String, u64>>,
}

impl HeldNotes {
    const REMEMBERED: usize = 16_384;

    /// Whether `message` differs from what was last said of `uid` at this generation of
    /// its spec; remembers it.
    pub fn is_news(&self, uid: &str, generation: Option<i64>, message: &str) -> bool {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        generation.hash(&mut hasher);
        message.hash(&mut hasher);
        let hash = hasher.finish();
        let mut last = match self.last.lock() {
            Ok(last) => last,
            Err(poisoned) => poisoned.into_inner(),
        };
        if last.len() >= Self::REMEMBERED {
            last.clear();
        }
        last.insert(uid.to_string(), hash) != Some(hash)
    }

    pub fn forget(&self, uid: &str) {
        match self.last.lock() {
            Ok(mut last) => last.remove(uid),
            Err(poisoned) => poisoned.into_inner().remove(uid),
        };
    }

    /// Forgets everything: a replica that starts leading says everything once again.
    pub fn clear(&self) {
        match self.last.lock() {
            Ok(mut last) => last.clear(),
            Err(poisoned) => poisoned.into_inner().clear(),
        }
    }
}

/// Default of `--revision-poll-interval`.
pub const DEFAULT_REVISION_POLL: Duration = Duration::from_millis(50);

/// The key of a DatabaseMigration in [`Watches`] and [`ObjectLocks`].
pub fn key_of(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The running watches of migration Jobs' databases ([`crate::migration::watch`]), one per
/// DatabaseMigration.
#[derive(Default)]
pub struct Watches {
    running: Mutex<HashMap<String, Running>>,
    serial: AtomicU64,
    /// Watches stopped while finishing, let run to their end.
    finishing: Mutex<Vec<tokio::task::AbortHandle>>,
}

struct Running {
    job: String,
    id: u64,
    task: tokio::task::AbortHandle,
    /// Wakes the watch for a read at once (its migrator pod ended).
    poke: Arc<tokio::sync::Notify>,
    /// Set by the watch once the gate may have released on its reading: from then on it is
    /// not aborted, so that the status that says so is written.
    finishing: Arc<std::sync::atomic::AtomicBool>,
}

impl Running {
    fn is_finishing(&self) -> bool {
        self.finishing.load(Ordering::Acquire)
    }
}

impl Watches {
    /// Runs the watch `start` spawns (given its id and wake-up) for attempt `job` of the
    /// DatabaseMigration `key`, unless a watch of that attempt runs; a watch of an earlier
    /// attempt is stopped.
    pub fn ensure(
        &self,
        key: String,
        job: &str,
        start: impl FnOnce(
            u64,
            Arc<tokio::sync::Notify>,
            Arc<std::sync::atomic::AtomicBool>,
        ) -> tokio::task::AbortHandle,
    ) {
        let mut running = lock(&self.running);
        if running
            .get(&key)
            .is_some_and(|r| r.job == job && !r.task.is_finished())
        {
            return;
        }
        let id = self.serial.fetch_add(1, Ordering::Relaxed);
        let poke = Arc::new(tokio::sync::Notify::new());
        let finishing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = start(id, poke.clone(), finishing.clone());
        if let Some(earlier) = running.insert(
            key,
            Running {
                job: job.to_string(),
                id,
                task,
                poke,
                finishing,
            },
        ) {
            self.end(earlier);
        }
    }

    /// Aborts a watch, unless it is finishing: that one runs to its end.
    fn end(&self, running: Running) {
        if running.is_finishing() {
            let mut finishing = lock(&self.finishing);
            finishing.retain(|task| !task.is_finished());
            finishing.push(running.task);
        } else {
            running.task.abort();
        }
    }

    /// Waits, at most `limit`, for the watches stopped while finishing to end.
    pub async fn finished(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while lock(&self.finishing).iter().any(|task| !task.is_finished())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Has the watch of this DatabaseMigration, if one runs, read its database at once;
    /// whether one runs.
    pub fn poke(&self, namespace: &str, name: &str) -> bool {
        match lock(&self.running).get(&key_of(namespace, name)) {
            Some(running) => {
                running.poke.notify_one();
                true
            }
            None => false,
        }
    }

    /// Stops the watch of this DatabaseMigration, if one runs.
    pub fn stop(&self, namespace: &str, name: &str) {
        let removed = lock(&self.running).remove(&key_of(namespace, name));
        if let Some(running) = removed {
            self.end(running);
        }
    }

    /// Stops every watch: this replica no longer runs the controllers.
    pub fn stop_all(&self) {
        let drained: Vec<Running> = lock(&self.running).drain().map(|(_, r)| r).collect();
        for running in drained {
            self.end(running);
        }
    }

    /// How many watches run.
    pub fn len(&self) -> usize {
        lock(&self.running).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A watch that ended on its own leaves the registry, unless a newer one took its place.
    pub fn ended(&self, key: &str, id: u64) {
        let mut running = lock(&self.running);
        if running.get(key).is_some_and(|r| r.id == id) {
            running.remove(key);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// How long a [`FreshReading`] may speak for a database without a status written after it:
/// past this, the status decides again (a replica whose status writes keep failing must not
/// trust an old reading for long).
pub const FRESH_READING_LIMIT: Duration = Duration::from_secs(60);

/// The revisions a database reported a moment ago, read by this replica through the URL its
/// Secret names (read first, as at any reconcile; by the watch of a running Job, at most two
/// seconds before the database), before the DatabaseMigration's status can say so. The gate
/// decides from it, as it does from the status, until the store holds a status written from
/// a reading at least as new ([`FreshReadings::covering`]).
#[derive(Clone, Debug)]
pub struct FreshReading {
    /// The DatabaseMigration it was read for, and the database its spec named then (its
    /// fingerprint, as the status's `observedDatabase`).
    pub uid: Option<String>,
    pub fingerprint: String,
    pub applied: crate::probe::AppliedRevisions,
    /// When the read began.
    pub read_at: std::time::Instant,
}

/// The [`FreshReading`]s of this replica, one per DatabaseMigration.
#[derive(Default)]
pub struct FreshReadings {
    readings: Mutex<HashMap<String, Fresh>>,
}

struct Fresh {
    reading: FreshReading,
    /// The resourceVersion of the first status written since from a reading at least as
    /// new: once the store holds it (or newer), the status speaks again.
    superseded_by: Option<String>,
}

impl FreshReadings {
    const REMEMBERED: usize = 4096;

    /// Remembers what the database of DatabaseMigration `key` reports now.
    pub fn record(&self, key: String, reading: FreshReading) {
        let mut readings = lock(&self.readings);
        if readings.len() >= Self::REMEMBERED {
            readings.retain(|_, fresh| fresh.reading.read_at.elapsed() < FRESH_READING_LIMIT);
        }
        readings.insert(
            key,
            Fresh {
                reading,
                superseded_by: None,
            },
        );
    }

    /// A status of DatabaseMigration `key` is stored at `resource_version`, written (or
    /// found unchanged) from a database read that began at `read_at`.
    pub fn status_written(&self, key: &str, read_at: std::time::Instant, resource_version: &str) {
        if let Some(fresh) = lock(&self.readings).get_mut(key)
            && fresh.superseded_by.is_none()
            && read_at >= fresh.reading.read_at
        {
            fresh.superseded_by = Some(resource_version.to_string());
        }
    }

    /// The revisions the reading of DatabaseMigration `key` reports, while it still speaks
    /// for the object the store holds: the same object (`uid`) and database
    /// (`fingerprint`), no status from a newer reading in the store yet (`resource_version`
    /// is the stored object's), and younger than [`FRESH_READING_LIMIT`].
    pub fn covering(
        &self,
        key: &str,
        uid: Option<&str>,
        fingerprint: &str,
        resource_version: Option<&str>,
    ) -> Option<crate::probe::AppliedRevisions> {
        let mut readings = lock(&self.readings);
        let fresh = readings.get(key)?;
        let stored_holds = |written: &str| match (
            resource_version.and_then(|rv| rv.parse::<u64>().ok()),
            written.parse::<u64>().ok(),
        ) {
            (Some(stored), Some(written)) => stored >= written,
            _ => resource_version == Some(written),
        };
        let lapsed = fresh.reading.read_at.elapsed() >= FRESH_READING_LIMIT
            || fresh.superseded_by.as_deref().is_some_and(stored_holds);
        if lapsed {
            readings.remove(key);
            return None;
        }
        // Read for another object or database: no answer here, and kept (the caller's copy
        // of the object may be the older one).
        (fresh.reading.uid.as_deref() == uid && fresh.reading.fingerprint == fingerprint)
            .then(|| fresh.reading.applied.clone())
    }

    /// Whether a reading of DatabaseMigration `key` is kept (it may have lapsed).
    pub fn has(&self, key: &str) -> bool {
        lock(&self.readings).contains_key(key)
    }

    /// Forgets them all: this replica's term as leader began or ended.
    pub fn clear(&self) {
        lock(&self.readings).clear();
    }
}

/// One lock per DatabaseMigration, taken by every reconcile of it: the controller never
/// runs two reconciles of one object at once, and a watch's reconcile joins that rule.
/// Locks nobody holds or waits for are forgotten.
#[derive(Default)]
pub struct ObjectLocks {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl ObjectLocks {
    const PRUNE_AT: usize = 1024;

    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let mutex = {
            let mut locks = lock(&self.locks);
            match locks.get(key).and_then(Weak::upgrade) {
                Some(mutex) => mutex,
                None => {
                    if locks.len() >= Self::PRUNE_AT {
                        locks.retain(|_, weak| weak.strong_count() > 0);
                    }
                    let mutex = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key.to_string(), Arc::downgrade(&mutex));
                    mutex
                }
            }
        };
        mutex.lock_owned().await
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
            held_notes: Default::default(),
            caches: Default::default(),
            revision_watches: Default::default(),
            revision_poll: DEFAULT_REVISION_POLL,
            migration_locks: Default::default(),
            fresh_readings: Default::default(),
            migration_changes: None,
        }
    }

    pub fn set_caches(&self, caches: Option<Caches>) {
        match self.caches.write() {
            Ok(mut slot) => *slot = caches,
            Err(poisoned) => *poisoned.into_inner() = caches,
        }
    }

    fn caches(&self) -> Option<Caches> {
        match self.caches.read() {
            Ok(slot) => slot.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The gate's cache of opted-in Deployments, once it has listed them.
    pub fn listed_deployments(&self) -> Option<Store<Deployment>> {
        let caches = self.caches()?;
        caches
            .deployments_listed
            .load(std::sync::atomic::Ordering::Acquire)
            .then_some(caches.deployments)
    }

    /// A migration Job from the cache, if it is there. One that is not may be newer than
    /// the cache: ask the API server.
    pub fn cached_job(&self, namespace: &str, name: &str) -> Option<Arc<Job>> {
        self.caches()?
            .jobs
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// Has the controllers look at DatabaseMigration `reference` again as if it changed:
    /// the gate decides its workloads anew (a [`FreshReading`] of its database), the
    /// migration controller sees nothing new in it.
    pub fn announce(&self, reference: ObjectRef<GuardedMigration>) {
        if let Some(changes) = &self.migration_changes {
            // No receiver (not leading) is no error.
            let _ = changes.send(reference);
        }
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

#[cfg(test)]
mod tests {
    use super::HeldNotes;

    #[test]
    fn the_same_words_of_a_held_workload_are_no_news() {
        let notes = HeldNotes::default();
        let needs = "rollout paused by schemagate: needs 0002";
        let failed = "rollout paused by schemagate: the Job failed";
        assert!(notes.is_news("uid-1", Some(1), needs));
        assert!(!notes.is_news("uid-1", Some(1), needs));
        assert!(notes.is_news("uid-2", Some(1), needs));
        assert!(notes.is_news("uid-1", Some(1), failed));
        assert!(notes.is_news("uid-1", Some(2), failed), "a new spec");
        notes.forget("uid-1");
        assert!(notes.is_news("uid-1", Some(2), failed));
        notes.clear();
        assert!(notes.is_news("uid-2", Some(1), needs));
    }
}

#[cfg(test)]
mod lock_tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[tokio::test]
    async fn reconciles_of_one_object_take_turns_and_others_do_not_wait() {
        let locks = Arc::new(ObjectLocks::default());
        let held = locks.lock("ns/a").await;
        // Another object: not blocked.
        let other = tokio::time::timeout(Duration::from_millis(100), locks.lock("ns/b")).await;
        assert!(other.is_ok(), "a lock of another object does not wait");
        // The same object waits until the first guard is dropped.
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _guard = locks.lock("ns/a").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the same object waits its turn");
        drop(held);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_watch_that_is_finishing_runs_to_its_end_when_stopped() {
        let watches = Watches::default();
        // Each watch says it ended on its channel; an aborted one drops the sender unsaid.
        let start = |finish: bool, ended: tokio::sync::oneshot::Sender<()>| {
            move |_id, _poke, finishing: Arc<std::sync::atomic::AtomicBool>| {
                finishing.store(finish, Ordering::Release);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = ended.send(());
                })
                .abort_handle()
            }
        };
        let (ended, mut finished) = tokio::sync::oneshot::channel();
        watches.ensure("ns/a".into(), "job-1", start(true, ended));
        watches.stop_all();
        assert!(watches.is_empty());
        watches.finished(Duration::from_secs(30)).await;
        assert!(
            finished.try_recv().is_ok(),
            "ran to its end, and the wait for it did not return before"
        );

        let (ended, aborted) = tokio::sync::oneshot::channel();
        watches.ensure("ns/b".into(), "job-1", start(false, ended));
        watches.stop("ns", "b");
        assert!(aborted.await.is_err(), "a watch still reading is aborted");
    }

    #[tokio::test]
    async fn locks_nobody_holds_are_forgotten() {
        let locks = ObjectLocks::default();
        for i in 0..(ObjectLocks::PRUNE_AT * 3) {
            drop(locks.lock(&format!("ns/m{i}")).await);
        }
        assert!(lock(&locks.locks).len() <= ObjectLocks::PRUNE_AT);
    }
}

#[cfg(test)]
mod fresh_reading_tests {
    use super::*;
    use crate::probe::AppliedRevisions;
    use std::time::Instant;

    fn reading(read_at: Instant) -> FreshReading {
        FreshReading {
            uid: Some("uid-1".into()),
            fingerprint: "db-a".into(),
            applied: AppliedRevisions {
                revisions: vec!["2".into()],
                head_only: true,
            },
            read_at,
        }
    }

    fn covers(readings: &FreshReadings, uid: &str, fingerprint: &str, rv: &str) -> bool {
        readings
            .covering("ns/app-db", Some(uid), fingerprint, Some(rv))
            .is_some()
    }

    #[test]
    fn a_reading_speaks_until_the_store_holds_a_status_from_one_as_new() {
        let readings = FreshReadings::default();
        let earlier = Instant::now();
        let read_at = earlier + Duration::from_millis(5);
        readings.record("ns/app-db".into(), reading(read_at));
        assert!(covers(&readings, "uid-1", "db-a", "10"));
        // A reconcile that read the database before the reading wrote its (older) status:
        // the store taking it does not end the reading, whatever it says.
        readings.status_written("ns/app-db", earlier, "11");
        assert!(covers(&readings, "uid-1", "db-a", "11"));
        // The status from the reading itself (or a newer one) is written at 12...
        readings.status_written("ns/app-db", read_at, "12");
        readings.status_written("ns/app-db", read_at + Duration::from_millis(1), "13");
        // ...and speaks from the moment the store holds it.
        assert!(covers(&readings, "uid-1", "db-a", "11"));
        assert!(!covers(&readings, "uid-1", "db-a", "12"));
        assert!(
            !covers(&readings, "uid-1", "db-a", "11"),
            "forgotten once superseded"
        );
    }

    #[test]
    fn a_reading_speaks_only_for_its_object_and_database() {
        let readings = FreshReadings::default();
        readings.record("ns/app-db".into(), reading(Instant::now()));
        assert!(
            !covers(&readings, "uid-1", "db-b", "10"),
            "another database"
        );
        assert!(!covers(&readings, "uid-2", "db-a", "10"), "a new object");
        assert!(
            covers(&readings, "uid-1", "db-a", "10"),
            "kept: the copy asked about may be the older one"
        );
        assert!(
            readings
                .covering("ns/other", Some("uid-1"), "db-a", Some("10"))
                .is_none()
        );
    }

    #[test]
    fn a_reading_without_a_status_after_it_lapses() {
        let readings = FreshReadings::default();
        let Some(long_ago) = Instant::now().checked_sub(FRESH_READING_LIMIT) else {
            return;
        };
        readings.record("ns/app-db".into(), reading(long_ago));
        assert!(!covers(&readings, "uid-1", "db-a", "10"));
        readings.record("ns/app-db".into(), reading(Instant::now()));
        readings.clear();
        assert!(!covers(&readings, "uid-1", "db-a", "10"), "a term ended");
    }

    #[test]
    fn resource_versions_that_are_not_numbers_compare_only_as_equal() {
        let readings = FreshReadings::default();
        let read_at = Instant::now();
        readings.record("ns/app-db".into(), reading(read_at));
        readings.status_written("ns/app-db", read_at, "b");
        assert!(covers(&readings, "uid-1", "db-a", "a"));
        assert!(!covers(&readings, "uid-1", "db-a", "b"));
    }
}
