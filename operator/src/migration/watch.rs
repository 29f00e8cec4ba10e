//! Watching the database while a migration Job runs.
//!
//! A migrator commits its revision before Kubernetes can say it finished: the kubelet
//! reports the pod's end, then the Job controller marks the Job Complete, and in a busy
//! cluster that takes seconds. So while an attempt's Job runs, the leader keeps one
//! connection to its database and reads the revisions every `--revision-poll-interval`.
//! The moment the database reports the spec's revision, the DatabaseMigration is
//! reconciled with that reading, at once and outside the controller's queue: its status
//! says so and the gate releases the Deployments that need it. It is the same exact
//! predicate as at any other reconcile, read from the database, never the Job's word.
//!
//! - One watch per DatabaseMigration and attempt (the Job's name), started by the reconcile
//!   that creates the Job or finds it running ([`super::plan::Plan::watch_database`]).
//! - A migrator pod that ended wakes it for a read at once, in place of a reconcile.
//! - It ends when the revision is there, when a reconcile finds the attempt no longer
//!   running, when the resource changes or is deleted, and when this replica stops leading.
//! - A watch and the controller's reconciles of the same DatabaseMigration take turns
//!   ([`ObjectLocks`]), as two reconciles of one object never overlap in the controller.
//! - A read that fails closes the connection; the next ones wait longer, up to
//!   [`MAX_BACKOFF`]. The reconciles report what is wrong, as before.

use crate::context::{Context, GuardedMigration};
use crate::migration::job;
use crate::migration::observe::{Reading, read_database_url_with};
use crate::probe::Session;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use schemagate_crds::DatabaseMigration;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Default of `--revision-poll-interval`.
pub const DEFAULT_POLL: Duration = Duration::from_millis(100);
/// The longest wait between reads of a database that does not answer.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The key of a DatabaseMigration in [`Watches`] and [`ObjectLocks`].
pub fn key_of(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The running watches, one per DatabaseMigration.
#[derive(Default)]
pub struct Watches {
    running: Mutex<HashMap<String, Running>>,
    serial: AtomicU64,
}

struct Running {
    job: String,
    id: u64,
    task: tokio::task::AbortHandle,
    /// Wakes the watch for a read at once (its migrator pod ended).
    poke: Arc<tokio::sync::Notify>,
}

impl Watches {
    /// Watches the database of `migration` for its attempt `job`, unless such a watch runs;
    /// a watch of an earlier attempt is stopped.
    pub fn ensure(&self, ctx: &Arc<Context>, migration: &DatabaseMigration, job: &str) {
        let key = key_of(
            &migration.namespace().unwrap_or_default(),
            &migration.name_any(),
        );
        let mut running = lock(&self.running);
        if running.get(&key).is_some_and(|r| r.job == job) {
            return;
        }
        let id = self.serial.fetch_add(1, Ordering::Relaxed);
        let watched = Watched {
            key: key.clone(),
            reference: ObjectRef::new(&migration.name_any())
                .within(&migration.namespace().unwrap_or_default()),
            uid: migration.uid(),
            job: job.to_string(),
            id,
        };
        let poke = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(watch(ctx.clone(), watched, poke.clone())).abort_handle();
        if let Some(earlier) = running.insert(
            key,
            Running {
                job: job.to_string(),
                id,
                task,
                poke,
            },
        ) {
            earlier.task.abort();
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
        if let Some(running) = lock(&self.running).remove(&key_of(namespace, name)) {
            running.task.abort();
        }
    }

    /// Stops every watch: this replica no longer runs the controllers.
    pub fn stop_all(&self) {
        for (_, running) in lock(&self.running).drain() {
            running.task.abort();
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
    fn ended(&self, key: &str, id: u64) {
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

/// What one watch follows.
struct Watched {
    key: String,
    reference: ObjectRef<GuardedMigration>,
    uid: Option<String>,
    job: String,
    id: u64,
}

impl Watched {
    /// The DatabaseMigration from the store, while it is still this attempt's: the same
    /// object (UID), not being deleted, and its spec still names the watched Job.
    fn current(&self, ctx: &Context) -> Option<DatabaseMigration> {
        let guard = ctx.migrations.get(&self.reference)?;
        let migration = guard.0.as_ref().ok()?;
        (migration.uid() == self.uid
            && migration.metadata.deletion_timestamp.is_none()
            && job::job_name(migration) == self.job)
            .then(|| migration.clone())
    }
}

async fn watch(ctx: Arc<Context>, watched: Watched, poke: Arc<tokio::sync::Notify>) {
    let mut session = None;
    let mut failures = 0u32;
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = poke.notified() => {}
        }
        wait = ctx.revision_poll;
        let Some(migration) = watched.current(&ctx) else {
            break;
        };
        if session.is_none() {
            match open(&ctx, &migration).await {
                Ok(opened) => session = Some(opened),
                Err(why) => {
                    debug!(migration = %watched.key, %why, "cannot watch the database yet");
                    failures += 1;
                    wait = backoff(ctx.revision_poll, failures);
                    continue;
                }
            }
        }
        let Some((url, open)) = session.as_mut() else {
            continue;
        };
        match open.read().await {
            Ok(applied) if crate::revision::satisfies_spec(&migration, &applied.revisions) => {
                let reading = Reading {
                    url: url.clone(),
                    applied,
                };
                info!(migration = %watched.key, job = %watched.job, revision = %migration.spec.revision, "the database reports the revision while its migration Job runs");
                if let Err(error) =
                    super::reconcile_with_reading(&ctx, &watched.reference, reading).await
                {
                    // The controller's own reconciles (the migrator pod's end, the Job's
                    // completion) come next and report it.
                    warn!(migration = %watched.key, %error, "reconcile after the revision was read failed");
                }
                break;
            }
            // Not yet; a migration marked dirty is under way (or needs a person, which the
            // reconciles say): the connection stays.
            Ok(_) | Err(crate::probe::ProbeError::Dirty { .. }) => failures = 0,
            Err(error) => {
                // A read that fails may mean a new URL in the Secret: read it again too.
                debug!(migration = %watched.key, %error, "reading the database while its Job runs failed");
                if let Some((_, failed)) = session.take() {
                    failed.close().await;
                }
                failures += 1;
                wait = backoff(ctx.revision_poll, failures);
            }
        }
    }
    if let Some((_, open)) = session.take() {
        open.close().await;
    }
    ctx.revision_watches.ended(&watched.key, watched.id);
}

/// A session to the database the Secret names now.
async fn open(ctx: &Context, migration: &DatabaseMigration) -> Result<(String, Session), String> {
    let namespace = migration.namespace().unwrap_or_default();
    let url = read_database_url_with(&ctx.client, &namespace, migration)
        .await
        .map_err(|error| error.to_string())?;
    let database = &migration.spec.database;
    let session = Session::new(database.engine, &url, &database.tracking)
        .map_err(|error| error.to_string())?;
    Ok((url, session))
}

/// The wait after `failures` failed reads in a row: doubling from the poll interval, at
/// most [`MAX_BACKOFF`].
fn backoff(poll: Duration, failures: u32) -> Duration {
    poll.saturating_mul(2u32.saturating_pow(failures.min(16)))
        .min(MAX_BACKOFF)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    #[test]
    fn failed_reads_back_off_to_a_limit() {
        let poll = Duration::from_millis(100);
        assert_eq!(backoff(poll, 1), Duration::from_millis(200));
        assert_eq!(backoff(poll, 3), Duration::from_millis(800));
        assert_eq!(backoff(poll, 10), MAX_BACKOFF);
        assert_eq!(backoff(poll, u32::MAX), MAX_BACKOFF);
    }

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
    async fn locks_nobody_holds_are_forgotten() {
        let locks = ObjectLocks::default();
        for i in 0..(ObjectLocks::PRUNE_AT * 3) {
            drop(locks.lock(&format!("ns/m{i}")).await);
        }
        assert!(lock(&locks.locks).len() <= ObjectLocks::PRUNE_AT);
    }
}
