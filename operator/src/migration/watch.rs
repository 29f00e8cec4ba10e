//! Watching the database while a migration Job runs.
//!
//! A migrator commits its revision before Kubernetes can say it finished: the kubelet
//! reports the pod's end, then the Job controller marks the Job Complete, and in a busy
//! cluster that takes seconds. So while an attempt's Job runs, the leader keeps one
//! connection to its database and reads the revisions every `--revision-poll-interval`.
//! The moment the database reports the spec's revision, the gate releases the Deployments
//! that need it, on that reading ([`crate::context::FreshReadings`]), and the
//! DatabaseMigration is reconciled with it, outside the controller's queue, so that its
//! status says so. It is the same exact predicate as at any other reconcile, read from the
//! database, never the Job's word.
//!
//! - One watch per DatabaseMigration and attempt (the Job's name), started by the reconcile
//!   that creates the Job or finds it running ([`super::plan::Plan::watch_database`]).
//! - Like a reconcile, it reads the Secret before it trusts the database: at its start, and
//!   again every [`SECRET_RECHECK`], beside the reads of the database and never in their
//!   way. A reading that reports the revision at most [`SECRET_NAMED`] after a read of the
//!   Secret that named the same URL began is acted on at once; otherwise a read of the
//!   Secret comes first. When the Secret names another URL, the watch reads the database
//!   it names from then on.
//! - A migrator pod that ended wakes it for a read at once, in place of a reconcile.
//! - It ends when the revision is there, when a reconcile finds the attempt no longer
//!   running, when the resource changes or is deleted, and when this replica stops leading.
//! - A watch and the controller's reconciles of the same DatabaseMigration take turns
//!   ([`crate::context::ObjectLocks`]), as two reconciles of one object never overlap in the
//!   controller; the release on the watch's reading does not wait for that turn.
//! - A read that fails closes the connection; the next ones wait longer, up to
//!   [`MAX_BACKOFF`]. The reconciles report what is wrong, as before.

use crate::context::key_of;
use crate::context::{Context, GuardedMigration};
use crate::migration::job;
use crate::migration::observe::{Reading, read_database_url_with};
use crate::probe::Session;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use schemagate_crds::DatabaseMigration;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Default of `--revision-poll-interval`.
pub use crate::context::DEFAULT_REVISION_POLL as DEFAULT_POLL;
/// How often a watch reads the Secret again while its Job runs.
pub const SECRET_RECHECK: Duration = Duration::from_secs(1);
/// How long before a read of the database the Secret may have been read, naming the same
/// URL, for the watch to act on that reading at once (a reconcile, too, reads the Secret
/// first and the database after it); a reading later than that waits for a read of the
/// Secret first.
pub const SECRET_NAMED: Duration = Duration::from_secs(2);
/// The longest wait between reads of a database that does not answer.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Watches the database of `migration` for its attempt `job`, unless such a watch runs; a
/// watch of an earlier attempt is stopped.
pub fn start(ctx: &Arc<Context>, migration: &DatabaseMigration, job: &str) {
    let namespace = migration.namespace().unwrap_or_default();
    let key = key_of(&namespace, &migration.name_any());
    let reference = ObjectRef::new(&migration.name_any()).within(&namespace);
    let uid = migration.uid();
    ctx.revision_watches
        .ensure(key.clone(), job, |id, poke, finishing| {
            let watched = Watched {
                key,
                reference,
                uid,
                job: job.to_string(),
                id,
            };
            tokio::spawn(watch(ctx.clone(), watched, poke, finishing)).abort_handle()
        });
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
        self.is(migration).then(|| migration.clone())
    }

    /// Whether `migration` is the attempt this watch follows.
    fn is(&self, migration: &DatabaseMigration) -> bool {
        migration.uid() == self.uid
            && migration.metadata.deletion_timestamp.is_none()
            && job::job_name(migration) == self.job
    }
}

async fn watch(
    ctx: Arc<Context>,
    watched: Watched,
    poke: Arc<tokio::sync::Notify>,
    finishing: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut session: Option<(String, Session)> = None;
    // When the last read of the Secret began that found it naming the session's URL.
    let mut named_at: Option<Instant> = None;
    // A read of the Secret under way beside the database's: when it began, and its answer.
    let mut recheck: Option<(Instant, tokio::task::JoinHandle<Option<bool>>)> = None;
    let mut failures = 0u32;
    // Reads begin every poll interval, however long each takes.
    let mut next_read = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next_read) => {}
            () = poke.notified() => {}
        }
        next_read = tokio::time::Instant::now() + ctx.revision_poll;
        let Some(migration) = watched.current(&ctx) else {
            break;
        };
        // What the last read of the Secret found, once it answered.
        if let Some((began, answered)) = recheck.take_if(|(_, task)| task.is_finished()) {
            match answered.await.ok().flatten() {
                Some(true) => named_at = Some(began),
                // The Secret names another database now: a session to that one.
                Some(false) => {
                    debug!(migration = %watched.key, "the Secret names another database URL now");
                    if let Some((_, earlier)) = session.take() {
                        earlier.close().await;
                    }
                }
                // Not read this time (an API hiccup): the next one will.
                None => {}
            }
        }
        if session.is_none() {
            let began = Instant::now();
            match open(&ctx, &migration).await {
                Ok(opened) => {
                    session = Some(opened);
                    named_at = Some(began);
                }
                Err(why) => {
                    debug!(migration = %watched.key, %why, "cannot watch the database yet");
                    failures += 1;
                    next_read = tokio::time::Instant::now() + backoff(ctx.revision_poll, failures);
                    continue;
                }
            }
        }
        let Some((url, open)) = session.as_mut() else {
            continue;
        };
        // The Secret is read again every SECRET_RECHECK, beside the database and never in
        // the way of its reads: a reading that reports the revision is then acted on without
        // another Secret read.
        if recheck.is_none() && named_at.is_none_or(|at| at.elapsed() >= SECRET_RECHECK) {
            let (ctx, migration, url) = (ctx.clone(), migration.clone(), url.clone());
            let task = tokio::spawn(async move { secret_names(&ctx, &migration, &url).await });
            recheck = Some((Instant::now(), task));
        }
        let read_at = Instant::now();
        let read = open.read().await;
        match read {
            Ok(applied) if crate::revision::satisfies_spec(&migration, &applied.revisions) => {
                info!(migration = %watched.key, job = %watched.job, revision = %migration.spec.revision, "the database reports the revision while its migration Job runs");
                let named_lately = named_at
                    .is_some_and(|at| read_at.saturating_duration_since(at) <= SECRET_NAMED);
                let confirmed = named_lately
                    || match recheck.take() {
                        // Under way since before this read: its answer will do.
                        Some((began, answer)) if began <= read_at => {
                            answer.await.ok().flatten() == Some(true)
                        }
                        _ => secret_names(&ctx, &migration, url).await == Some(true),
                    };
                if confirmed {
                    // Not aborted from here on: the gate may release on this reading, and
                    // the status that says so must follow (a new leader would otherwise
                    // hold again until it read the database itself).
                    finishing.store(true, std::sync::atomic::Ordering::Release);
                    super::speak_for_database(&ctx, &migration, &applied, read_at);
                }
                let reading = Reading {
                    url: url.clone(),
                    applied,
                    read_at,
                    confirmed,
                };
                let still_watched = |migration: &DatabaseMigration| watched.is(migration);
                if let Err(error) =
                    super::reconcile_with_reading(&ctx, &watched.reference, still_watched, reading)
                        .await
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
                next_read = tokio::time::Instant::now() + backoff(ctx.revision_poll, failures);
            }
        }
    }
    if let Some((_, task)) = recheck.take() {
        task.abort();
    }
    // Out of the registry first: a reconcile from now on starts a new watch if one is due.
    ctx.revision_watches.ended(&watched.key, watched.id);
    if let Some((_, open)) = session.take() {
        open.close().await;
    }
}

/// Whether the Secret still names `url`; `None` when it cannot be read now (an API error,
/// or no answer within [`SECRET_RECHECK`]: a slow read must not hold up a reading's use).
async fn secret_names(ctx: &Context, migration: &DatabaseMigration, url: &str) -> Option<bool> {
    let namespace = migration.namespace().unwrap_or_default();
    let read = read_database_url_with(&ctx.client, &namespace, migration);
    match tokio::time::timeout(SECRET_RECHECK, read).await {
        Ok(Ok(now)) => Some(now == url),
        Ok(Err(crate::error::Error::Kube { .. })) | Err(_) => None,
        // Gone, or no longer holding a URL: it does not name this one.
        Ok(Err(_)) => Some(false),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_reads_back_off_to_a_limit() {
        let poll = Duration::from_millis(100);
        assert_eq!(backoff(poll, 1), Duration::from_millis(200));
        assert_eq!(backoff(poll, 3), Duration::from_millis(800));
        assert_eq!(backoff(poll, 10), MAX_BACKOFF);
        assert_eq!(backoff(poll, u32::MAX), MAX_BACKOFF);
    }
}
