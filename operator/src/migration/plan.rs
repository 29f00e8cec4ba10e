//! Pure decisions of a reconcile: from the resource and what `observe` saw, which Job should
//! exist, what the status says and which Events tell a person about it. No client, no clock.

use crate::conditions::{Status, is_true, set_condition};
use crate::duration::parse_duration;
use crate::error::Error;
use crate::migration::job;
use crate::migration::observe::{GraphJob, JobState, Observed, ObservedJob};
use crate::probe::ProbeError;
use crate::revision::{self, Answer, Applied, Graph, Scheme, Undecided};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use schemagate_crds::{
    AttemptResult, DatabaseMigration, DatabaseMigrationStatus, HistoryEntry, MigrationJobStatus,
    Phase, RevisionGraphStatus,
    condition::{DRIFTED, FAILED, PROGRESSING, READY, RECONCILING, STALLED},
    reason,
};
use std::time::Duration;

/// How many attempts `status.history` keeps.
pub const MAX_HISTORY: usize = 10;
/// Default of `spec.driftCheckInterval`.
pub const DEFAULT_DRIFT_CHECK: Duration = Duration::from_secs(300);
/// How often a running migration is looked at even without a Job event.
const RUNNING_RECHECK: Duration = Duration::from_secs(60);
/// How soon an active Job whose pod does not run yet is looked at again.
const STARTING_RECHECK: Duration = Duration::from_secs(5);
/// How soon a migration waiting for another one on the same database looks again.
const WAITING_RECHECK: Duration = Duration::from_secs(10);

/// An Event to publish on the DatabaseMigration.
#[derive(Debug, Clone, PartialEq)]
pub struct Note {
    pub type_: EventType,
    pub reason: &'static str,
    pub message: String,
}

/// When to look at the resource again.
#[derive(Debug)]
pub enum Next {
    Requeue(Duration),
    /// Only a change of the resource or its Job helps.
    AwaitChange,
    /// A problem a person must fix: status is written, then the error goes to the
    /// reporting path (Warning Event) and per-object backoff.
    Fail(Error),
}

#[derive(Debug)]
pub struct Plan {
    pub create_job: Option<Job>,
    /// The revision-graph Job to start (Alembic), beside any migration Job.
    pub create_graph_job: Option<Job>,
    /// An earlier attempt's Job to delete first (one that never started its pod).
    pub delete_job: Option<String>,
    pub status: DatabaseMigrationStatus,
    pub notes: Vec<Note>,
    pub next: Next,
    /// The attempt's Job runs (or was just created): watch its database for the revision
    /// meanwhile ([`crate::migration::watch`]).
    pub watch_database: bool,
}

/// The status after the API server refused to create a Job the plan asked for: the attempt
/// did not start (the last status's Job stays), Ready and Progressing say why, Stalled
/// says a person must act. The error goes on to the per-object backoff.
pub fn job_rejected(
    migration: &DatabaseMigration,
    planned: &DatabaseMigrationStatus,
    error: &Error,
    now: Timestamp,
) -> DatabaseMigrationStatus {
    let previous = migration.status.clone().unwrap_or_default();
    let mut status = planned.clone();
    status.job = previous.job;
    status.phase = Some(Phase::Pending);
    let message = error.chain();
    let generation = migration.metadata.generation;
    for (type_, value) in [
        (READY, Status::False),
        (PROGRESSING, Status::False),
        (FAILED, Status::False),
        (STALLED, Status::True),
        (RECONCILING, Status::False),
    ] {
        set_condition(
            &mut status.conditions,
            type_,
            value,
            error.reason(),
            &message,
            generation,
            now,
        );
    }
    status
}

/// Decides the Job, status and Events of one reconcile.
pub fn plan(migration: &DatabaseMigration, observed: Observed, now: Timestamp) -> Plan {
    let previous = migration.status.clone().unwrap_or_default();
    let mut draft = Draft {
        migration,
        previous: &previous,
        status: previous.clone(),
        notes: Vec::new(),
        create_graph_job: None,
        database_key: observed.database_key.clone(),
        now,
    };
    draft.status.observed_generation = migration.metadata.generation;
    draft.status.observed_retry = job::retry_token(migration);
    draft.status.held_deployments = {
        let mut held = observed.held_deployments.clone();
        held.sort();
        held
    };
    if let Some(job) = &observed.job {
        draft.record_job(job);
    }

    if let Err(message) = validate(migration) {
        return draft.invalid_spec(message);
    }
    let drift_interval = migration
        .spec
        .drift_check_interval
        .as_deref()
        .and_then(parse_duration)
        .unwrap_or(DEFAULT_DRIFT_CHECK);

    let graph_pending = draft.record_graph(&observed.graph_job);
    let applied = match (observed.database, &observed.job) {
        (Ok(applied), _) => applied,
        // A migration marked dirty while its Job runs is the migrator at work, not a
        // schema that needs a person.
        (
            Err(Error::Probe {
                source: ProbeError::Dirty { tool, revision, .. },
            }),
            Some(job),
        ) if job.state == JobState::Active && job.blocked.is_none() => {
            let reported = format!(
                "revision {revision} under way ({tool} marks it dirty until it is applied)"
            );
            return draft.running(job, &reported);
        }
        (Err(error), job) => return draft.database_unreadable(job.as_ref(), error),
    };
    let required = migration.spec.revision.as_str();
    let scheme = Scheme::of(&migration.spec.database.tracking);
    let graph = draft
        .status
        .revision_graph
        .as_ref()
        .and_then(Graph::from_status);
    let answer = revision::answer(
        scheme,
        Applied {
            revisions: &applied.revisions,
            complete: true,
        },
        graph.as_ref(),
        required,
    );
    let (kept, truncated) = revision::for_status(&applied.revisions);
    draft.status.observed_database = Some(job::database_fingerprint(migration));
    draft.status.applied_revisions = kept;
    draft.status.applied_revisions_truncated = truncated;
    draft.status.applied_revision = revision::display(scheme, &applied.revisions, required);
    let reported = draft.reported();
    let job_active = matches!(
        observed.job.as_ref().map(|j| &j.state),
        Some(JobState::Active)
    );

    match answer {
        Answer::Satisfied => return draft.satisfied(observed.job.as_ref(), drift_interval),
        Answer::NotSatisfied if applied_before(migration, &previous) && !job_active => {
            return draft.drifted(&reported, drift_interval);
        }
        Answer::NotSatisfied => {}
        Answer::CannotTell { .. } if job_active => {}
        Answer::CannotTell { why, .. } if graph_pending => {
            return draft.pending(
                reason::READING_REVISION_GRAPH,
                format!(
                    "reading the revision graph of image {} before deciding whether to migrate: {why}",
                    migration.spec.migrator.image
                ),
                Next::Requeue(WAITING_RECHECK),
                Work::UnderWay,
            );
        }
        Answer::CannotTell { why, .. } if applied_before(migration, &previous) => {
            return draft.undetermined(&why, drift_interval);
        }
        // No graph to be had (its Job failed): the migrator decides, and the database is
        // read again after it.
        Answer::CannotTell {
            kind: Undecided::NoGraph,
            ..
        } => {}
        // The image cannot bring the database to the revision as far as anyone can tell
        // (the revision is not in its graph, the database is ahead of it): no Job.
        Answer::CannotTell { why, .. } => return draft.undetermined(&why, drift_interval),
    }
    let job_name = job::job_name(migration);
    match observed.job {
        None if draft.attempt_already_failed(&job_name) => draft.keep_failed(),
        None if draft.job_was_running(&job_name) => draft.job_deleted(&job_name, &reported),
        None if migration.spec.suspend => draft.pending(
            reason::SUSPENDED,
            format!(
                "spec.suspend is true: no migration Job is started; the database reports {reported}"
            ),
            Next::AwaitChange,
            // Waits for a person's choice, not for a fix: neither under way nor stalled.
            Work::Done,
        ),
        None => match observed.other_active_job {
            Some(other) if observed.stuck_earlier_job.as_ref() == Some(&other) => {
                let mut plan = draft.pending(
                    reason::WAITING_FOR_OTHER_MIGRATION,
                    format!(
                        "deleting Job {other} of an earlier attempt, whose pod never started; this attempt starts once it is gone"
                    ),
                    Next::Requeue(STARTING_RECHECK),
                    Work::UnderWay,
                );
                plan.delete_job = Some(other);
                plan
            }
            Some(other) => draft.pending(
                reason::WAITING_FOR_OTHER_MIGRATION,
                format!(
                    "migration Job {other} is still running against the same database; this one starts after it"
                ),
                Next::Requeue(WAITING_RECHECK),
                Work::UnderWay,
            ),
            None => draft.start_job(&reported),
        },
        Some(job) => match &job.state {
            JobState::Active => draft.running(&job, &reported),
            JobState::Succeeded => draft.not_applied(&job, &reported),
            JobState::Failed { reason } => draft.job_failed(&job, reason),
        },
    }
}

/// Checks what the schema cannot say; the CRD's own validation catches the rest.
pub fn validate(migration: &DatabaseMigration) -> Result<(), String> {
    let spec = &migration.spec;
    if spec.revision.trim().is_empty() {
        return Err(
            "spec.revision is empty: name the revision the migrator brings the database to".into(),
        );
    }
    match (&spec.database.tracking.tool, &spec.database.tracking.query) {
        (Some(_), Some(_)) => {
            return Err(
                "set only one of spec.database.tracking.tool and spec.database.tracking.query"
                    .into(),
            );
        }
        (None, None) => {
            return Err("set spec.database.tracking.tool (alembic, flyway, ...) or spec.database.tracking.query".into());
        }
        _ => {}
    }
    if spec.database.tracking.tool == Some(schemagate_crds::TrackingTool::GolangMigrate)
        && !spec.revision.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!(
            "spec.revision {:?} is not a golang-migrate version: they are integers, such as 20251228120000",
            spec.revision
        ));
    }
    if let Some(interval) = &spec.drift_check_interval
        && parse_duration(interval).is_none_or(|d| d.is_zero())
    {
        return Err(format!(
            "spec.driftCheckInterval {interval:?} is not a duration such as 30s, 5m or 1h"
        ));
    }
    if let Some(name) = &spec.migrator.url_env_name
        && (name.is_empty()
            || name.starts_with(|c: char| c.is_ascii_digit())
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(format!(
            "spec.migrator.urlEnvName {name:?} is not an environment variable name"
        ));
    }
    Ok(())
}

/// Whether the database already reported `spec.revision` to this resource, for the current
/// retry token: a spec edit that keeps the revision (a new image) changes nothing, while a
/// new value of the retry annotation or a new revision asks for a migration again. Read
/// from the history, which a passing probe error does not change: a database that drifts
/// during an outage is still reported as drifted, and not migrated again by itself.
fn applied_before(migration: &DatabaseMigration, previous: &DatabaseMigrationStatus) -> bool {
    let token = job::retry_token(migration);
    let database = job::database_fingerprint(migration);
    let recorded = previous.history.iter().any(|h| {
        h.revision == migration.spec.revision
            && h.result != AttemptResult::Failed
            && retry_of(h) == token.as_deref()
            && h.database.as_ref().is_none_or(|d| *d == database)
    });
    let ready = is_true(&previous.conditions, READY)
        && previous.observed_generation == migration.metadata.generation
        && previous.observed_retry == token
        && previous.observed_database.as_ref() == Some(&database);
    recorded || ready
}

/// The retry token a history entry answered (`retry X`), if any.
fn retry_of(entry: &HistoryEntry) -> Option<&str> {
    entry.requested_by.as_deref()?.strip_prefix("retry ")
}

/// Where the work on a resource stands, for kstatus's Reconciling and Stalled conditions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    UnderWay,
    NeedsPerson,
    Done,
}

/// The status being written, with the helpers that fill it in for each outcome.
struct Draft<'a> {
    migration: &'a DatabaseMigration,
    previous: &'a DatabaseMigrationStatus,
    status: DatabaseMigrationStatus,
    notes: Vec<Note>,
    create_graph_job: Option<Job>,
    database_key: String,
    now: Timestamp,
}

impl Draft<'_> {
    fn set(&mut self, type_: &str, status: Status, reason: &str, message: &str) {
        let generation = self.migration.metadata.generation;
        set_condition(
            &mut self.status.conditions,
            type_,
            status,
            reason,
            message,
            generation,
            self.now,
        );
    }

    /// kstatus's two conditions: work under way, or waiting for a person, or neither.
    fn work(&mut self, work: Work, reason: &str, message: &str) {
        let (reconciling, stalled) = match work {
            Work::UnderWay => (Status::True, Status::False),
            Work::NeedsPerson => (Status::False, Status::True),
            Work::Done => (Status::False, Status::False),
        };
        self.set(RECONCILING, reconciling, reason, message);
        self.set(STALLED, stalled, reason, message);
    }

    /// What the database reports, in words.
    fn reported(&self) -> String {
        match &self.status.applied_revision {
            Some(revision) => format!("revision {revision}"),
            None => "no applied revision".to_string(),
        }
    }

    /// A Normal or Warning Event, only when the Ready condition's reason changes.
    fn note_on_transition(&mut self, type_: EventType, reason: &'static str, message: String) {
        let previous_reason =
            crate::conditions::find(&self.previous.conditions, READY).map(|c| c.reason.as_str());
        let current_reason =
            crate::conditions::find(&self.status.conditions, READY).map(|c| c.reason.as_str());
        if previous_reason != current_reason
            || self.previous.observed_generation != self.status.observed_generation
        {
            self.notes.push(Note {
                type_,
                reason,
                message,
            });
        }
    }

    fn record_job(&mut self, job: &ObservedJob) {
        self.status.job = Some(MigrationJobStatus {
            name: job.name.clone(),
            start_time: job.start_time.clone(),
            completion_time: job.completion_time.clone(),
            message: job.message.clone(),
        });
    }

    /// Adds an attempt to the history unless it is there already; says whether it was new.
    fn push_history(&mut self, entry: HistoryEntry) -> bool {
        let already = self.status.history.iter().any(|h| {
            h.revision == entry.revision && h.job == entry.job && h.result == entry.result
        });
        if !already {
            self.status.history.insert(0, entry);
            self.status.history.truncate(MAX_HISTORY);
        }
        !already
    }

    fn history_entry(&self, job: Option<&ObservedJob>, result: AttemptResult) -> HistoryEntry {
        HistoryEntry {
            revision: self.migration.spec.revision.clone(),
            job: job.map(|j| j.name.clone()),
            started_at: job
                .and_then(|j| j.start_time.clone())
                .or(Some(Time(self.now))),
            finished_at: job
                .and_then(|j| j.completion_time.clone())
                .or(Some(Time(self.now))),
            result,
            requested_by: Some(job::requested_by(self.migration)),
            database: Some(job::database_fingerprint(self.migration)),
        }
    }

    /// Takes in what the revision-graph Job reported and starts it when the current image's
    /// graph is not known; says whether the graph is still to come.
    fn record_graph(&mut self, graph_job: &GraphJob) -> bool {
        let image = self.migration.spec.migrator.image.clone();
        match graph_job {
            GraphJob::NotNeeded => false,
            GraphJob::Running { .. } => true,
            GraphJob::Missing => {
                self.create_graph_job = Some(job::build_graph_job(self.migration));
                true
            }
            GraphJob::Reported { name, report } => match Graph::parse_report(report) {
                Ok(graph) => {
                    self.status.revision_graph = Some(RevisionGraphStatus {
                        job: name.clone(),
                        image,
                        revisions: graph.nodes(),
                        truncated: graph.truncated,
                        ..Default::default()
                    });
                    false
                }
                Err(problem) => {
                    self.graph_failed(
                        name,
                        format!("Job {name} reported no revision graph: {problem}"),
                    );
                    false
                }
            },
            GraphJob::Failed { name, message } => {
                self.graph_failed(name, message.clone());
                false
            }
        }
    }

    /// A revision-graph Job that gave no graph: a Warning Event that says what to do, and
    /// the last good graph kept (ancestry does not change between images), or the error.
    fn graph_failed(&mut self, job: &str, message: String) {
        let message = format!(
            "{message}; set spec.migrator.revisionGraphCommand if the image has no python3 that can import alembic, then set annotation schemagate.dev/retry"
        );
        self.notes.push(Note {
            type_: EventType::Warning,
            reason: reason::REVISION_GRAPH_FAILED,
            message: message.clone(),
        });
        let good = self
            .status
            .revision_graph
            .as_ref()
            .is_some_and(|g| g.error.is_none() && !g.revisions.is_empty());
        match self.status.revision_graph.as_mut() {
            Some(graph) if good => graph.failed_job = Some(job.to_string()),
            _ => {
                self.status.revision_graph = Some(RevisionGraphStatus {
                    job: job.to_string(),
                    image: self.migration.spec.migrator.image.clone(),
                    error: Some(message),
                    ..Default::default()
                })
            }
        }
    }

    /// Whether the spec changed since the status was last written.
    fn new_generation(&self) -> bool {
        self.previous.observed_generation != self.migration.metadata.generation
    }

    fn attempt_already_failed(&self, job_name: &str) -> bool {
        self.previous
            .history
            .iter()
            .any(|h| h.job.as_deref() == Some(job_name) && h.result == AttemptResult::Failed)
    }

    /// The last status said this attempt's Job was running: if it is gone now, someone
    /// deleted it (with its pod, perhaps midway through the migration).
    fn job_was_running(&self, job_name: &str) -> bool {
        self.previous.phase == Some(Phase::Running)
            && self
                .previous
                .job
                .as_ref()
                .is_some_and(|j| j.name == job_name)
    }

    fn finish(self, create_job: Option<Job>, next: Next) -> Plan {
        Plan {
            create_job,
            create_graph_job: self.create_graph_job,
            delete_job: None,
            status: self.status,
            notes: self.notes,
            next,
            watch_database: false,
        }
    }

    fn invalid_spec(mut self, message: String) -> Plan {
        self.status.phase = Some(Phase::Failed);
        self.set(READY, Status::False, reason::INVALID_SPEC, &message);
        self.set(FAILED, Status::True, reason::INVALID_SPEC, &message);
        self.set(PROGRESSING, Status::False, reason::INVALID_SPEC, &message);
        self.work(Work::NeedsPerson, reason::INVALID_SPEC, &message);
        self.note_on_transition(EventType::Warning, reason::INVALID_SPEC, message);
        self.finish(None, Next::AwaitChange)
    }

    fn database_unreadable(mut self, job: Option<&ObservedJob>, error: Error) -> Plan {
        let reason = error.reason();
        let message = error.chain();
        if self.status.observed_database.as_deref()
            != Some(job::database_fingerprint(self.migration).as_str())
        {
            // Read from another database or with other tracking: none of it holds now.
            self.status.applied_revisions.clear();
            self.status.applied_revisions_truncated = false;
            self.status.applied_revision = None;
            self.status.observed_database = None;
        }
        // The last revisions read stay in status: a passing outage does not hold rollouts
        // that were already satisfied, and nothing is released on a guess.
        self.status.phase = Some(match job.map(|j| &j.state) {
            Some(JobState::Active) => Phase::Running,
            _ if self.previous.phase == Some(Phase::Failed) && !self.new_generation() => {
                Phase::Failed
            }
            _ => Phase::Pending,
        });
        self.set(READY, Status::False, reason, &message);
        if self.status.phase != Some(Phase::Failed) {
            // A failure of an earlier spec says nothing about this one.
            self.set(FAILED, Status::False, reason, &message);
        }
        let work = if error.needs_person() {
            Work::NeedsPerson
        } else {
            Work::UnderWay
        };
        self.work(work, reason, &message);
        let running = job.is_some_and(|j| j.state == JobState::Active && j.blocked.is_none());
        let mut plan = self.finish(None, Next::Fail(error));
        // The Job goes on: its database is watched for the revision, as it comes back.
        plan.watch_database = running;
        plan
    }

    fn satisfied(mut self, job: Option<&ObservedJob>, drift_interval: Duration) -> Plan {
        let revision = self.migration.spec.revision.clone();
        let message = format!("the database reports revision {revision}");
        self.status.phase = Some(Phase::Succeeded);
        self.set(READY, Status::True, reason::REVISION_APPLIED, &message);
        self.set(PROGRESSING, Status::False, reason::COMPLETE, &message);
        self.set(FAILED, Status::False, reason::SUCCEEDED, &message);
        self.set(DRIFTED, Status::False, reason::IN_SYNC, &message);
        self.work(Work::Done, reason::REVISION_APPLIED, &message);
        match job {
            Some(job) if job.state == JobState::Succeeded => {
                // The database may show the revision before the Job is marked complete:
                // the attempt is recorded, and told, once the Job is.
                let entry = self.history_entry(Some(job), AttemptResult::Succeeded);
                if self.push_history(entry) {
                    self.notes.push(Note {
                        type_: EventType::Normal,
                        reason: reason::MIGRATION_SUCCEEDED,
                        message: format!("migration Job {} applied revision {revision}; Deployments needing it are released", job.name),
                    });
                }
            }
            Some(_) => {
                self.note_on_transition(
                    EventType::Normal,
                    reason::REVISION_APPLIED,
                    format!("the database reports revision {revision}; Deployments needing it are released"),
                );
            }
            None => {
                // One entry per revision and retry token: a new image is no new attempt.
                let token = job::retry_token(self.migration);
                let adopted = self.status.history.iter().any(|h| {
                    h.revision == revision
                        && h.result != AttemptResult::Failed
                        && retry_of(h) == token.as_deref()
                });
                if !adopted {
                    let entry = self.history_entry(None, AttemptResult::Adopted);
                    let _ = self.push_history(entry);
                }
                self.note_on_transition(
                    EventType::Normal,
                    reason::REVISION_ADOPTED,
                    format!(
                        "the database already reports revision {revision}: no migration Job needed"
                    ),
                );
            }
        }
        self.finish(None, Next::Requeue(drift_interval))
    }

    fn drifted(mut self, reported: &str, drift_interval: Duration) -> Plan {
        let revision = &self.migration.spec.revision;
        let message = format!(
            "the database now reports {reported}, below revision {revision} it reported before (a restore or a manual downgrade?); Deployments needing {revision} are held again, and no migration runs until a person asks: set annotation schemagate.dev/retry to a new value to run the migration again"
        );
        self.status.phase = Some(Phase::Failed);
        self.set(READY, Status::False, reason::DRIFTED, &message);
        self.set(DRIFTED, Status::True, reason::REVISION_MISSING, &message);
        self.work(Work::NeedsPerson, reason::DRIFTED, &message);
        self.note_on_transition(EventType::Warning, reason::DRIFTED, message);
        self.finish(None, Next::Requeue(drift_interval))
    }

    /// The revision was applied here before, and what the database reports now cannot be
    /// placed (an Alembic head the image's graph does not contain): no Job, no guess.
    fn undetermined(mut self, why: &str, drift_interval: Duration) -> Plan {
        let revision = &self.migration.spec.revision;
        let message = format!(
            "cannot tell whether revision {revision} is still applied: {why}; Deployments needing it are held"
        );
        self.status.phase = Some(Phase::Pending);
        self.set(
            READY,
            Status::False,
            reason::REVISION_UNDETERMINED,
            &message,
        );
        self.set(
            PROGRESSING,
            Status::False,
            reason::REVISION_UNDETERMINED,
            &message,
        );
        self.work(Work::NeedsPerson, reason::REVISION_UNDETERMINED, &message);
        self.note_on_transition(EventType::Warning, reason::REVISION_UNDETERMINED, message);
        self.finish(None, Next::Requeue(drift_interval))
    }

    fn keep_failed(self) -> Plan {
        // The failed attempt's Job is gone; a new attempt needs a spec change or a retry.
        self.finish(None, Next::AwaitChange)
    }

    fn pending(mut self, reason: &'static str, message: String, next: Next, work: Work) -> Plan {
        self.status.phase = Some(Phase::Pending);
        self.set(READY, Status::False, reason, &message);
        self.set(PROGRESSING, Status::False, reason, &message);
        self.set(FAILED, Status::False, reason, &message);
        self.work(work, reason, &message);
        self.note_on_transition(EventType::Normal, reason, message);
        self.finish(None, next)
    }

    fn start_job(mut self, reported: &str) -> Plan {
        let job = job::build_job(self.migration, &self.database_key);
        let name = job.metadata.name.clone().unwrap_or_default();
        let revision = &self.migration.spec.revision;
        let message = format!(
            "migration Job {name} started to bring the database from {reported} to revision {revision}"
        );
        self.status.phase = Some(Phase::Running);
        self.status.job = Some(MigrationJobStatus {
            name,
            ..Default::default()
        });
        self.set(READY, Status::False, reason::MIGRATION_RUNNING, &message);
        self.set(PROGRESSING, Status::True, reason::JOB_CREATED, &message);
        self.set(FAILED, Status::False, reason::MIGRATION_RUNNING, &message);
        self.work(Work::UnderWay, reason::JOB_CREATED, &message);
        self.note_on_transition(EventType::Normal, reason::JOB_CREATED, message);
        let mut plan = self.finish(Some(job), Next::Requeue(RUNNING_RECHECK));
        plan.watch_database = true;
        plan
    }

    fn running(mut self, job: &ObservedJob, reported: &str) -> Plan {
        if let Some(why) = &job.blocked {
            return self.cannot_start(job, why);
        }
        let message = format!(
            "migration Job {} is running; the database reports {reported}",
            job.name
        );
        self.status.phase = Some(Phase::Running);
        self.set(READY, Status::False, reason::MIGRATION_RUNNING, &message);
        self.set(PROGRESSING, Status::True, reason::JOB_RUNNING, &message);
        self.set(FAILED, Status::False, reason::MIGRATION_RUNNING, &message);
        self.work(Work::UnderWay, reason::JOB_RUNNING, &message);
        // Pod events do not wake this controller: look again soon until the pod runs, so
        // that a pod that cannot start is reported within seconds.
        let next = if job.pod_running {
            RUNNING_RECHECK
        } else {
            STARTING_RECHECK
        };
        let mut plan = self.finish(None, Next::Requeue(next));
        plan.watch_database = true;
        plan
    }

    /// An active Job whose pod cannot start: Stalled, with the kubelet's or the API
    /// server's reason. The Job stays (a pushed image or a fixed pull secret lets it go
    /// on); it is looked at again soon.
    fn cannot_start(mut self, job: &ObservedJob, why: &str) -> Plan {
        let message = format!(
            "migration Job {} cannot start: {why} — fix spec.migrator.image, its pull secret, spec.migrator.securityContext or the namespace's policy; the Job keeps trying, or set annotation schemagate.dev/retry after changing the spec",
            job.name
        );
        let reason = reason::MIGRATOR_CANNOT_START;
        self.status.phase = Some(Phase::Running);
        self.set(READY, Status::False, reason, &message);
        self.set(PROGRESSING, Status::False, reason, &message);
        self.set(FAILED, Status::False, reason, &message);
        self.work(Work::NeedsPerson, reason, &message);
        self.note_on_transition(EventType::Warning, reason, message);
        self.finish(None, Next::Requeue(STARTING_RECHECK))
    }

    fn not_applied(self, job: &ObservedJob, reported: &str) -> Plan {
        let revision = &self.migration.spec.revision;
        let message = format!(
            "migration Job {} completed, but the database reports {reported}, not revision {revision}: check that the migrator's command migrates to {revision} and that spec.revision names it as the migration tool records it",
            job.name
        );
        // A lagging read replica may catch up: look again.
        let next = Next::Requeue(RUNNING_RECHECK);
        self.failed(job, reason::REVISION_NOT_APPLIED, message, next)
    }

    fn job_deleted(self, job_name: &str, reported: &str) -> Plan {
        let revision = &self.migration.spec.revision;
        let message = format!(
            "migration Job {job_name} was deleted before it finished; the database reports {reported}, not revision {revision}. It may have stopped midway, so schemagate does not run it again on its own: check the database, then set annotation schemagate.dev/retry to a new value to try again"
        );
        let job = ObservedJob {
            name: job_name.to_string(),
            state: JobState::Failed {
                reason: reason::JOB_DELETED.to_string(),
            },
            start_time: self
                .previous
                .job
                .as_ref()
                .and_then(|j| j.start_time.clone()),
            completion_time: None,
            message: None,
            blocked: None,
            pod_running: false,
        };
        self.failed(&job, reason::JOB_DELETED, message, Next::AwaitChange)
    }

    fn job_failed(self, job: &ObservedJob, job_reason: &str) -> Plan {
        let revision = &self.migration.spec.revision;
        let output = job
            .message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        let message = format!(
            "migration Job {} failed ({job_reason}){output} — Deployments needing revision {revision} stay held; fix the migration and update the spec, or set annotation schemagate.dev/retry to a new value to try again",
            job.name
        );
        // A failed Job will not recover by itself: a person fixes it and asks again.
        self.failed(job, reason::MIGRATION_FAILED, message, Next::AwaitChange)
    }

    fn failed(mut self, job: &ObservedJob, why: &'static str, message: String, next: Next) -> Plan {
        self.status.phase = Some(Phase::Failed);
        self.set(READY, Status::False, why, &message);
        self.set(PROGRESSING, Status::False, why, &message);
        self.set(FAILED, Status::True, why, &message);
        self.work(Work::NeedsPerson, why, &message);
        let entry = self.history_entry(Some(job), AttemptResult::Failed);
        let _ = self.push_history(entry);
        self.note_on_transition(EventType::Warning, why, message);
        self.finish(None, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::AppliedRevisions;
    use crate::testing::{MIGRATION, migration_from_yaml};

    fn now() -> Timestamp {
        "2026-11-24T10:00:00Z".parse().unwrap()
    }

    fn heads(revisions: &[&str]) -> AppliedRevisions {
        AppliedRevisions {
            revisions: revisions.iter().map(|r| r.to_string()).collect(),
            head_only: true,
        }
    }

    fn observed(database: Result<AppliedRevisions, Error>, job: Option<ObservedJob>) -> Observed {
        Observed {
            job,
            database_key: "k".into(),
            other_active_job: None,
            stuck_earlier_job: None,
            database,
            held_deployments: vec![],
            graph_job: GraphJob::NotNeeded,
            read_at: None,
        }
    }

    fn job(migration: &DatabaseMigration, state: JobState, message: Option<&str>) -> ObservedJob {
        ObservedJob {
            name: job::job_name(migration),
            state,
            start_time: Some(Time(now())),
            completion_time: None,
            message: message.map(str::to_string),
            blocked: None,
            pod_running: true,
        }
    }

    fn condition<'a>(
        plan: &'a Plan,
        type_: &str,
    ) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        crate::conditions::find(&plan.status.conditions, type_).unwrap()
    }

    #[test]
    fn already_applied_is_ready_without_a_job() {
        let migration = migration_from_yaml(MIGRATION);
        let plan = plan(&migration, observed(Ok(heads(&["0002"])), None), now());
        assert!(plan.create_job.is_none());
        assert_eq!(plan.status.phase, Some(Phase::Succeeded));
        assert_eq!(plan.status.applied_revision.as_deref(), Some("0002"));
        assert_eq!(condition(&plan, READY).status, "True");
        assert_eq!(condition(&plan, READY).observed_generation, Some(3));
        assert_eq!(plan.status.history[0].result, AttemptResult::Adopted);
        assert_eq!(plan.notes[0].reason, "RevisionAdopted");
        assert!(matches!(plan.next, Next::Requeue(d) if d == DEFAULT_DRIFT_CHECK));
    }

    #[test]
    fn not_applied_creates_exactly_the_attempts_job() {
        let migration = migration_from_yaml(MIGRATION);
        let first = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        let again = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        let name = first.create_job.as_ref().unwrap().metadata.name.clone();
        assert_eq!(name, again.create_job.unwrap().metadata.name);
        assert_eq!(name.as_deref(), Some(job::job_name(&migration).as_str()));
        assert_eq!(first.status.phase, Some(Phase::Running));
        assert_eq!(condition(&first, PROGRESSING).reason, "JobCreated");
        assert!(
            first.notes[0]
                .message
                .contains("from revision 0001 to revision 0002")
        );
    }

    #[test]
    fn running_job_is_not_created_again() {
        let migration = migration_from_yaml(MIGRATION);
        let running = job(&migration, JobState::Active, None);
        let plan = plan(
            &migration,
            observed(Ok(heads(&["0001"])), Some(running)),
            now(),
        );
        assert!(plan.create_job.is_none());
        assert_eq!(plan.status.phase, Some(Phase::Running));
    }

    #[test]
    fn the_database_is_watched_exactly_while_the_attempts_job_runs() {
        let migration = migration_from_yaml(MIGRATION);
        let not_yet = || Ok(heads(&["0001"]));
        let created = plan(&migration, observed(not_yet(), None), now());
        assert!(created.create_job.is_some() && created.watch_database);
        let active = job(&migration, JobState::Active, None);
        let running = plan(&migration, observed(not_yet(), Some(active.clone())), now());
        assert!(running.watch_database);
        // Unreachable for a moment: the Job goes on, so does the watch (with its backoff).
        let unreachable = Err(Error::from(ProbeError::Connect {
            endpoint: "db:5432".into(),
            detail: "refused".into(),
        }));
        assert!(
            plan(
                &migration,
                observed(unreachable, Some(active.clone())),
                now()
            )
            .watch_database
        );
        let applied = plan(
            &migration,
            observed(Ok(heads(&["0002"])), Some(active.clone())),
            now(),
        );
        assert_eq!(applied.status.phase, Some(Phase::Succeeded));
        assert!(
            !applied.watch_database,
            "the revision is there: nothing to watch for"
        );
        let done = job(&migration, JobState::Succeeded, None);
        assert!(
            !plan(
                &migration,
                observed(Ok(heads(&["0002"])), Some(done)),
                now()
            )
            .watch_database
        );
        let mut blocked = active.clone();
        blocked.blocked = Some("ErrImagePull: not found".into());
        blocked.pod_running = false;
        assert!(
            !plan(&migration, observed(not_yet(), Some(blocked)), now()).watch_database,
            "a pod that cannot start commits nothing"
        );
        let failed = job(
            &migration,
            JobState::Failed {
                reason: "BackoffLimitExceeded".into(),
            },
            Some("boom"),
        );
        assert!(!plan(&migration, observed(not_yet(), Some(failed)), now()).watch_database);
    }

    #[test]
    fn a_version_marked_dirty_while_its_job_runs_is_work_under_way() {
        let mut migration = migration_from_yaml(MIGRATION);
        migration.spec.database.tracking = schemagate_crds::Tracking {
            tool: Some(schemagate_crds::TrackingTool::GolangMigrate),
            query: None,
            table: None,
        };
        let dirty = || {
            Err(Error::from(ProbeError::Dirty {
                tool: "golang-migrate",
                revision: "2".into(),
                remedy: "run `migrate force VERSION`",
            }))
        };
        let active = job(&migration, JobState::Active, None);
        let running = plan(&migration, observed(dirty(), Some(active)), now());
        assert_eq!(running.status.phase, Some(Phase::Running));
        assert!(
            matches!(running.next, Next::Requeue(_)),
            "no error, no Warning"
        );
        assert_eq!(condition(&running, PROGRESSING).reason, "JobRunning");
        assert!(
            condition(&running, READY)
                .message
                .contains("revision 2 under way")
        );
        assert!(running.watch_database);
        // No Job runs: a dirty version needs a person.
        let alone = plan(&migration, observed(dirty(), None), now());
        assert!(matches!(alone.next, Next::Fail(_)));
        assert_eq!(condition(&alone, READY).reason, "MigrationDirty");
    }

    #[test]
    fn job_succeeded_and_database_agrees_is_ready_with_history() {
        let migration = migration_from_yaml(MIGRATION);
        let done = job(&migration, JobState::Succeeded, None);
        let plan = plan(
            &migration,
            observed(Ok(heads(&["0002"])), Some(done.clone())),
            now(),
        );
        assert_eq!(plan.status.phase, Some(Phase::Succeeded));
        assert_eq!(
            plan.status.history[0].job.as_deref(),
            Some(done.name.as_str())
        );
        assert_eq!(plan.status.history[0].result, AttemptResult::Succeeded);
        assert_eq!(plan.notes[0].reason, "MigrationSucceeded");
    }

    #[test]
    fn job_succeeded_but_database_disagrees_fails_naming_both_revisions() {
        let migration = migration_from_yaml(MIGRATION);
        let done = job(&migration, JobState::Succeeded, None);
        let plan = plan(
            &migration,
            observed(Ok(heads(&["0001"])), Some(done)),
            now(),
        );
        assert_eq!(plan.status.phase, Some(Phase::Failed));
        let failed = condition(&plan, FAILED);
        assert_eq!(failed.reason, "RevisionNotApplied");
        assert!(
            failed.message.contains("revision 0001"),
            "{}",
            failed.message
        );
        assert!(
            failed.message.contains("not revision 0002"),
            "{}",
            failed.message
        );
        assert!(plan.create_job.is_none());
        assert_eq!(plan.notes[0].type_, EventType::Warning);
    }

    #[test]
    fn job_failed_reports_the_scrubbed_tail_and_starts_no_second_job() {
        let mut migration = migration_from_yaml(MIGRATION);
        let failed_job = job(
            &migration,
            JobState::Failed {
                reason: "BackoffLimitExceeded".into(),
            },
            Some("exit code 1: syntax error at or near \"COLUMNN\""),
        );
        let first = plan(
            &migration,
            observed(Ok(heads(&["0001"])), Some(failed_job)),
            now(),
        );
        assert_eq!(first.status.phase, Some(Phase::Failed));
        let message = &condition(&first, READY).message;
        assert!(message.contains("BackoffLimitExceeded"), "{message}");
        assert!(message.contains("syntax error"), "{message}");
        assert!(message.contains("schemagate.dev/retry"), "{message}");

        // The failed Job was deleted: still no new attempt without a retry.
        migration.status = Some(first.status.clone());
        let after_delete = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert!(after_delete.create_job.is_none());

        // A retry annotation is a new attempt with a new Job name.
        migration
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(schemagate_crds::RETRY_ANNOTATION.into(), "1".into());
        let retried = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        let retry_job = retried.create_job.expect("retry starts a Job");
        assert_ne!(
            retry_job.metadata.name,
            Some(first.status.job.unwrap().name)
        );
    }

    #[test]
    fn a_job_whose_pod_cannot_start_is_stalled_with_the_kubelets_reason() {
        let mut migration = migration_from_yaml(MIGRATION);
        let started = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        migration.status = Some(started.status.clone());
        let mut pending = job(&migration, JobState::Active, None);
        pending.pod_running = false;
        let starting = plan(
            &migration,
            observed(Ok(heads(&["0001"])), Some(pending.clone())),
            now(),
        );
        assert!(matches!(starting.next, Next::Requeue(d) if d == STARTING_RECHECK));
        assert_eq!(
            condition(&starting, PROGRESSING).reason,
            reason::JOB_RUNNING
        );

        pending.blocked =
            Some("pod app-db-1-x: ErrImagePull: image registry.invalid/app:v2 not found".into());
        let blocked = plan(
            &migration,
            observed(Ok(heads(&["0001"])), Some(pending)),
            now(),
        );
        assert!(blocked.create_job.is_none(), "the Job stays");
        let stalled = condition(&blocked, STALLED);
        assert_eq!(stalled.status, "True");
        assert_eq!(stalled.reason, reason::MIGRATOR_CANNOT_START);
        assert!(
            stalled.message.contains("ErrImagePull"),
            "{}",
            stalled.message
        );
        assert!(stalled.message.contains("spec.migrator.image"));
        assert_eq!(
            condition(&blocked, READY).reason,
            reason::MIGRATOR_CANNOT_START
        );
        assert_eq!(blocked.notes.len(), 1, "one Warning Event");
        assert!(matches!(blocked.next, Next::Requeue(d) if d == STARTING_RECHECK));
    }

    #[test]
    fn a_running_job_deleted_is_a_failed_attempt_never_run_again_on_its_own() {
        let mut migration = migration_from_yaml(MIGRATION);
        let started = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        let job_name = started.create_job.as_ref().unwrap().metadata.name.clone();
        migration.status = Some(started.status.clone());
        let running = job(&migration, JobState::Active, None);
        let running = plan(
            &migration,
            observed(Ok(heads(&["0001"])), Some(running)),
            now(),
        );
        migration.status = Some(running.status.clone());

        // Someone deletes the running Job (and its pod): no new Job under the same name.
        let deleted = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert!(deleted.create_job.is_none(), "not re-run on its own");
        assert_eq!(deleted.status.phase, Some(Phase::Failed));
        let failed = condition(&deleted, FAILED);
        assert_eq!(failed.reason, reason::JOB_DELETED);
        assert!(failed.message.contains("was deleted before it finished"));
        assert!(failed.message.contains("schemagate.dev/retry"));
        assert!(matches!(deleted.next, Next::AwaitChange));
        assert_eq!(deleted.notes.len(), 1, "one Warning Event");
        let entry = deleted
            .status
            .history
            .last()
            .expect("the attempt is in the history");
        assert_eq!(entry.job, job_name);
        assert_eq!(entry.result, AttemptResult::Failed);

        // Later reconciles keep it failed; a retry starts a new attempt.
        migration.status = Some(deleted.status.clone());
        let later = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert!(later.create_job.is_none());
        migration
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(schemagate_crds::RETRY_ANNOTATION.into(), "1".into());
        let retried = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert!(retried.create_job.is_some(), "a retry starts a new Job");
        assert_ne!(retried.create_job.unwrap().metadata.name, job_name);
    }

    #[test]
    fn unreadable_database_is_a_condition_and_an_error_for_backoff() {
        let migration = migration_from_yaml(MIGRATION);
        let missing = Error::SecretNotFound {
            namespace: "prod".into(),
            name: "app-db-url".into(),
            key: "url".into(),
        };
        let plan = plan(&migration, observed(Err(missing), None), now());
        assert!(plan.create_job.is_none());
        assert_eq!(plan.status.phase, Some(Phase::Pending));
        let ready = condition(&plan, READY);
        assert_eq!(ready.reason, "SecretNotFound");
        assert!(ready.message.contains("app-db-url"));
        assert!(matches!(
            plan.next,
            Next::Fail(Error::SecretNotFound { .. })
        ));
    }

    #[test]
    fn invalid_spec_fails_without_a_job() {
        let mut migration = migration_from_yaml(MIGRATION);
        migration.spec.database.tracking.query = Some("SELECT 1".into());
        let plan = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert!(plan.create_job.is_none());
        assert_eq!(condition(&plan, READY).reason, "InvalidSpec");
        assert!(matches!(plan.next, Next::AwaitChange));
    }

    #[test]
    fn drift_after_ready_is_reported() {
        let mut migration = migration_from_yaml(MIGRATION);
        with_graph(&mut migration);
        let ready = plan(&migration, observed(Ok(heads(&["0002"])), None), now());
        migration.status = Some(ready.status);
        // A passing probe error in between does not make the drift look like a new attempt.
        let outage = plan(
            &migration,
            observed(Err(Error::ProbeTimeout { seconds: 20 }), None),
            now(),
        );
        migration.status = Some(outage.status);
        let drifted = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert_eq!(condition(&drifted, DRIFTED).status, "True");
        assert_eq!(condition(&drifted, READY).status, "False");
        assert!(drifted.create_job.is_none());
        assert_eq!(drifted.status.applied_revisions, vec!["0001".to_string()]);
    }

    #[test]
    fn suspended_starts_no_job_but_still_reports_the_database() {
        let mut migration = migration_from_yaml(MIGRATION);
        migration.spec.suspend = true;
        let plan = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert!(plan.create_job.is_none());
        assert_eq!(condition(&plan, READY).reason, "Suspended");
        assert_eq!(plan.status.applied_revision.as_deref(), Some("0001"));
    }

    #[test]
    fn waits_for_another_migration_of_the_same_database() {
        let migration = migration_from_yaml(MIGRATION);
        let mut seen = observed(Ok(heads(&["0001"])), None);
        seen.other_active_job = Some("other-1234567890".into());
        let plan = plan(&migration, seen, now());
        assert!(plan.create_job.is_none());
        assert_eq!(condition(&plan, READY).reason, "WaitingForOtherMigration");
    }

    /// The incident's graph, as the revision-graph Job of the image reports it.
    fn with_graph(migration: &mut DatabaseMigration) {
        let job = job::graph_job_name(migration);
        let status = migration.status.get_or_insert_with(Default::default);
        status.revision_graph = Some(RevisionGraphStatus {
            job,
            image: migration.spec.migrator.image.clone(),
            revisions: Graph::parse_report(&format!(
                "{}\n0003\n0002\n0001 -\n",
                revision::GRAPH_REPORT_HEADER
            ))
            .unwrap()
            .nodes(),
            ..Default::default()
        });
    }

    #[test]
    fn drift_waits_for_a_person_even_after_spec_edits_that_keep_the_revision() {
        let mut migration = migration_from_yaml(MIGRATION);
        with_graph(&mut migration);
        let ready = plan(&migration, observed(Ok(heads(&["0002"])), None), now());
        migration.status = Some(ready.status);
        // Each release bumps the migrator image: a new generation, the same revision.
        for generation in 4..7 {
            migration.metadata.generation = Some(generation);
            migration.spec.migrator.image = format!("registry.example/app:{generation}");
            let again = plan(&migration, observed(Ok(heads(&["0002"])), None), now());
            assert!(again.create_job.is_none());
            migration.status = Some(again.status);
        }
        with_graph(&mut migration);
        let drifted = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert_eq!(condition(&drifted, DRIFTED).status, "True");
        assert!(drifted.create_job.is_none(), "drift starts no migration");
        migration.status = Some(drifted.status);
        let later = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert!(later.create_job.is_none(), "nor a reconcile later");
        // A person asks: a new retry value runs the migration.
        migration
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                schemagate_crds::RETRY_ANNOTATION.into(),
                "after-restore".into(),
            );
        let retried = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert!(retried.create_job.is_some());
    }

    #[test]
    fn a_database_moved_forward_out_of_band_is_adopted_not_drift() {
        let mut migration = migration_from_yaml(MIGRATION);
        with_graph(&mut migration);
        let ready = plan(&migration, observed(Ok(heads(&["0002"])), None), now());
        migration.status = Some(ready.status);
        let forward = plan(&migration, observed(Ok(heads(&["0003"])), None), now());
        assert_eq!(condition(&forward, READY).status, "True");
        assert_eq!(forward.status.applied_revision.as_deref(), Some("0003"));
        assert!(forward.create_job.is_none());

        // A history tool: one more applied version is still a superset.
        let mut flyway = migration_from_yaml(MIGRATION);
        flyway.spec.database.tracking.tool = Some(schemagate_crds::TrackingTool::Flyway);
        let history = |versions: &[&str]| AppliedRevisions {
            revisions: versions.iter().map(|v| v.to_string()).collect(),
            head_only: false,
        };
        let ready = plan(
            &flyway,
            observed(Ok(history(&["0001", "0002"])), None),
            now(),
        );
        flyway.status = Some(ready.status);
        let hotfix = plan(
            &flyway,
            observed(Ok(history(&["0001", "0002", "0002.1"])), None),
            now(),
        );
        assert_eq!(condition(&hotfix, READY).status, "True");
    }

    #[test]
    fn alembic_waits_for_the_images_graph_before_deciding_to_migrate() {
        let mut migration = migration_from_yaml(MIGRATION);
        // The database is at 0003 (migrated by hand); the resource asks for 0002.
        let mut seen = observed(Ok(heads(&["0003"])), None);
        seen.graph_job = GraphJob::Missing;
        let first = plan(&migration, seen, now());
        assert!(first.create_job.is_none(), "no migration on a guess");
        let graph_job = first
            .create_graph_job
            .clone()
            .expect("the graph is read first");
        assert_eq!(
            graph_job.metadata.name,
            Some(job::graph_job_name(&migration))
        );
        assert_eq!(condition(&first, READY).reason, "ReadingRevisionGraph");
        migration.status = Some(first.status);

        let mut reported = observed(Ok(heads(&["0003"])), None);
        reported.graph_job = GraphJob::Reported {
            name: job::graph_job_name(&migration),
            report: format!("{}\n0003\n0002\n0001 -\n", revision::GRAPH_REPORT_HEADER),
        };
        let adopted = plan(&migration, reported, now());
        assert!(adopted.create_job.is_none());
        assert_eq!(condition(&adopted, READY).reason, "RevisionApplied");
        assert_eq!(adopted.status.history[0].result, AttemptResult::Adopted);
        assert_eq!(adopted.status.revision_graph.unwrap().revisions.len(), 3);
    }

    #[test]
    fn a_failed_graph_job_says_what_to_do_and_the_migrator_decides() {
        let migration = migration_from_yaml(MIGRATION);
        let mut seen = observed(Ok(heads(&["0001"])), None);
        seen.graph_job = GraphJob::Failed {
            name: job::graph_job_name(&migration),
            message: "exit code 127: python3: not found".into(),
        };
        let plan = plan(&migration, seen, now());
        let graph = plan.status.revision_graph.as_ref().unwrap();
        assert!(
            graph
                .error
                .as_ref()
                .unwrap()
                .contains("revisionGraphCommand")
        );
        assert_eq!(plan.notes[0].reason, "RevisionGraphFailed");
        assert!(plan.create_job.is_some());
    }

    #[test]
    fn a_long_applied_set_is_kept_newest_first_and_marked() {
        let mut migration = migration_from_yaml(MIGRATION);
        migration.spec.database.tracking.tool = Some(schemagate_crds::TrackingTool::Rails);
        let applied = AppliedRevisions {
            revisions: (1..=5000).map(|v| format!("{v:014}")).collect(),
            head_only: false,
        };
        migration.spec.revision = format!("{:014}", 12);
        let plan = plan(&migration, observed(Ok(applied), None), now());
        assert_eq!(condition(&plan, READY).status, "True");
        assert_eq!(
            plan.status.applied_revisions.len(),
            revision::MAX_STATUS_REVISIONS
        );
        assert!(plan.status.applied_revisions_truncated);
        assert_eq!(
            plan.status.applied_revisions.last().map(String::as_str),
            Some("00000000005000")
        );
    }

    /// kstatus's rules for a resource it has no special rules for (cli-utils
    /// `pkg/kstatus/status`, generic properties), as Helm 4 `--wait`, Flux and kpt apply them.
    fn kstatus(generation: Option<i64>, status: &DatabaseMigrationStatus) -> &'static str {
        if status
            .observed_generation
            .is_some_and(|observed| Some(observed) != generation)
        {
            return "InProgress";
        }
        let is = |type_| crate::conditions::is_true(&status.conditions, type_);
        if is(RECONCILING) {
            return "InProgress";
        }
        if is(STALLED) {
            return "Failed";
        }
        "Current"
    }

    #[test]
    fn kstatus_reads_every_outcome_of_the_plan_as_a_person_would() {
        let migration = migration_from_yaml(MIGRATION);
        let generation = migration.metadata.generation;
        // A new resource: only the CRD's status default, {observedGeneration: 0}.
        let new = DatabaseMigrationStatus {
            observed_generation: Some(0),
            ..Default::default()
        };
        assert_eq!(kstatus(generation, &new), "InProgress", "never done unseen");

        let mut graphed = migration.clone();
        with_graph(&mut graphed);
        let ready = plan(&graphed, observed(Ok(heads(&["0002"])), None), now());
        let mut was_ready = graphed.clone();
        was_ready.status = Some(ready.status.clone());
        let mut suspended = migration.clone();
        suspended.spec.suspend = true;
        let mut invalid = migration.clone();
        invalid.spec.database.tracking.query = Some("SELECT 1".into());
        let mut other = observed(Ok(heads(&["0001"])), None);
        other.other_active_job = Some("other-1".into());
        let mut graph_pending = observed(Ok(heads(&["0003"])), None);
        graph_pending.graph_job = GraphJob::Running {
            name: job::graph_job_name(&migration),
        };
        let secret_missing = Error::SecretNotFound {
            namespace: "prod".into(),
            name: "app-db-url".into(),
            key: "url".into(),
        };
        let failed_job = job(
            &migration,
            JobState::Failed {
                reason: "BackoffLimitExceeded".into(),
            },
            Some("boom"),
        );
        let outcomes: Vec<(&str, Plan, &str)> = vec![
            ("ready", ready, "Current"),
            (
                "job started",
                plan(&migration, observed(Ok(heads(&[])), None), now()),
                "InProgress",
            ),
            (
                "job running",
                plan(
                    &migration,
                    observed(
                        Ok(heads(&["0001"])),
                        Some(job(&migration, JobState::Active, None)),
                    ),
                    now(),
                ),
                "InProgress",
            ),
            (
                "job failed",
                plan(
                    &migration,
                    observed(Ok(heads(&["0001"])), Some(failed_job)),
                    now(),
                ),
                "Failed",
            ),
            (
                "job done, revision missing",
                plan(
                    &graphed,
                    observed(
                        Ok(heads(&["0001"])),
                        Some(job(&migration, JobState::Succeeded, None)),
                    ),
                    now(),
                ),
                "Failed",
            ),
            (
                "drifted",
                plan(&was_ready, observed(Ok(heads(&["0001"])), None), now()),
                "Failed",
            ),
            (
                "invalid spec",
                plan(&invalid, observed(Ok(heads(&["0001"])), None), now()),
                "Failed",
            ),
            (
                "secret missing",
                plan(&migration, observed(Err(secret_missing), None), now()),
                "Failed",
            ),
            (
                "database timing out",
                plan(
                    &migration,
                    observed(Err(Error::ProbeTimeout { seconds: 20 }), None),
                    now(),
                ),
                "InProgress",
            ),
            (
                "suspended",
                plan(&suspended, observed(Ok(heads(&["0001"])), None), now()),
                "Current",
            ),
            (
                "waiting for another migration",
                plan(&migration, other, now()),
                "InProgress",
            ),
            (
                "reading the revision graph",
                plan(&migration, graph_pending, now()),
                "InProgress",
            ),
            (
                "undetermined head",
                plan(&was_ready, observed(Ok(heads(&["f00d"])), None), now()),
                "Failed",
            ),
        ];
        for (name, plan, expected) in outcomes {
            assert_eq!(kstatus(generation, &plan.status), expected, "{name}");
            let ready = crate::conditions::is_true(&plan.status.conditions, READY);
            assert_eq!(
                ready,
                expected == "Current" && name != "suspended",
                "{name}: Ready"
            );
            for type_ in [READY, RECONCILING, STALLED] {
                let condition = crate::conditions::find(&plan.status.conditions, type_)
                    .unwrap_or_else(|| panic!("{name}: no {type_}"));
                assert_eq!(condition.observed_generation, generation, "{name}");
            }
        }
    }

    #[test]
    fn a_failure_of_an_earlier_spec_is_not_shown_for_a_new_one() {
        let mut migration = migration_from_yaml(MIGRATION);
        let failed_job = job(
            &migration,
            JobState::Failed {
                reason: "BackoffLimitExceeded".into(),
            },
            None,
        );
        let failed = plan(
            &migration,
            observed(Ok(heads(&["0001"])), Some(failed_job)),
            now(),
        );
        migration.status = Some(failed.status);
        // A new revision, to be applied later: the earlier failure is not this attempt's.
        migration.metadata.generation = Some(4);
        migration.spec.revision = "0003".into();
        migration.spec.suspend = true;
        let suspended = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert_eq!(condition(&suspended, FAILED).status, "False");
        migration.status = Some(suspended.status);
        migration.metadata.generation = Some(5);
        let unreadable = plan(
            &migration,
            observed(Err(Error::ProbeTimeout { seconds: 20 }), None),
            now(),
        );
        assert_eq!(condition(&unreadable, FAILED).status, "False");
        assert_eq!(unreadable.status.phase, Some(Phase::Pending));
    }

    #[test]
    fn revisions_of_another_database_are_not_used_for_the_new_one() {
        let mut migration = migration_from_yaml(MIGRATION);
        with_graph(&mut migration);
        let ready = plan(&migration, observed(Ok(heads(&["0002"])), None), now());
        migration.status = Some(ready.status);
        // Pointed at another database whose Secret is missing: nothing of the old one stays.
        migration.spec.database.url_secret_ref.name = "other-db-url".into();
        let missing = Error::SecretNotFound {
            namespace: "prod".into(),
            name: "other-db-url".into(),
            key: "url".into(),
        };
        let unreadable = plan(&migration, observed(Err(missing), None), now());
        assert!(unreadable.status.applied_revisions.is_empty());
        assert_eq!(unreadable.status.applied_revision, None);
        assert_eq!(unreadable.status.observed_database, None);
        // Once readable, the new database lacks the revision: a migration, not drift.
        migration.status = Some(unreadable.status);
        let new_database = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert!(
            !crate::conditions::is_true(&new_database.status.conditions, DRIFTED),
            "another database is no drift"
        );
        assert!(new_database.create_job.is_some());
    }

    #[test]
    fn a_failed_graph_job_keeps_the_last_good_graph() {
        let mut migration = migration_from_yaml(MIGRATION);
        with_graph(&mut migration);
        migration.spec.migrator.image = "registry.example/app:no-python".into();
        let mut seen = observed(Ok(heads(&["0002"])), None);
        seen.graph_job = GraphJob::Reported {
            name: job::graph_job_name(&migration),
            report: "Traceback (most recent call last): ...".into(),
        };
        let plan = plan(&migration, seen, now());
        let graph = plan.status.revision_graph.as_ref().unwrap();
        assert_eq!(graph.error, None);
        assert_eq!(graph.revisions.len(), 3, "the good graph stays");
        assert_eq!(
            graph.failed_job.as_deref(),
            Some(job::graph_job_name(&migration).as_str())
        );
        assert_eq!(plan.notes[0].reason, reason::REVISION_GRAPH_FAILED);
    }

    #[test]
    fn a_revision_the_image_does_not_ship_starts_no_job() {
        let mut migration = migration_from_yaml(MIGRATION);
        with_graph(&mut migration);
        migration.spec.revision = "0009".into();
        let plan = plan(&migration, observed(Ok(heads(&["0001"])), None), now());
        assert!(plan.create_job.is_none());
        assert_eq!(
            condition(&plan, READY).reason,
            reason::REVISION_UNDETERMINED
        );
        assert!(
            condition(&plan, READY)
                .message
                .contains("not in the revision graph")
        );
        assert_eq!(condition(&plan, STALLED).status, "True");
    }

    #[test]
    fn golang_migrate_revisions_must_be_integers() {
        let mut migration = migration_from_yaml(MIGRATION);
        migration.spec.database.tracking.tool = Some(schemagate_crds::TrackingTool::GolangMigrate);
        migration.spec.revision = "v3".into();
        let plan = plan(&migration, observed(Ok(heads(&["2"])), None), now());
        assert!(plan.create_job.is_none());
        assert_eq!(condition(&plan, READY).reason, reason::INVALID_SPEC);
    }
}
