//! Pure decisions of a reconcile: from the resource and what `observe` saw, which Job should
//! exist, what the status says and which Events tell a person about it. No client, no clock.

use crate::conditions::{Status, is_true, set_condition};
use crate::duration::parse_duration;
use crate::error::Error;
use crate::job;
use crate::probe::{self, AppliedRevisions};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use schemagate_crds::{
    DatabaseMigration, DatabaseMigrationStatus, HistoryEntry, MigrationJobStatus, Phase,
    condition::{DRIFTED, FAILED, PROGRESSING, READY},
};
use std::time::Duration;

/// How many revisions `status.appliedRevisions` keeps.
pub const MAX_APPLIED_REVISIONS: usize = 100;
/// How many attempts `status.history` keeps.
pub const MAX_HISTORY: usize = 10;
/// Default of `spec.driftCheckInterval`.
pub const DEFAULT_DRIFT_CHECK: Duration = Duration::from_secs(300);
/// How often a running migration is looked at even without a Job event.
const RUNNING_RECHECK: Duration = Duration::from_secs(60);
/// How soon a migration waiting for another one on the same database looks again.
const WAITING_RECHECK: Duration = Duration::from_secs(10);

/// What `observe` read of the world for one DatabaseMigration.
#[derive(Debug)]
pub struct Observed {
    /// The Job of the current attempt, if it exists.
    pub job: Option<ObservedJob>,
    /// Another migration Job still running against the same database, if any.
    pub other_active_job: Option<String>,
    /// The database's applied revisions, or why they could not be read.
    pub database: Result<AppliedRevisions, Error>,
    /// Names of this migration's Deployments currently held by schemagate.
    pub held_deployments: Vec<String>,
}

/// The migration Job as far as the plan cares.
#[derive(Debug, Clone, PartialEq)]
pub struct ObservedJob {
    pub name: String,
    pub state: JobState,
    pub start_time: Option<Time>,
    pub completion_time: Option<Time>,
    /// Tail of the migrator's termination message, secrets already removed.
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    Active,
    Succeeded,
    /// The Job controller's reason, such as `BackoffLimitExceeded` or `DeadlineExceeded`.
    Failed {
        reason: String,
    },
}

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
    pub status: DatabaseMigrationStatus,
    pub notes: Vec<Note>,
    pub next: Next,
}

/// Decides the Job, status and Events of one reconcile.
pub fn plan(migration: &DatabaseMigration, observed: Observed, now: Timestamp) -> Plan {
    let previous = migration.status.clone().unwrap_or_default();
    let mut draft = Draft {
        migration,
        previous: &previous,
        status: previous.clone(),
        notes: Vec::new(),
        now,
    };
    draft.status.observed_generation = migration.metadata.generation;
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

    let applied = match observed.database {
        Ok(applied) => applied,
        Err(error) => return draft.database_unreadable(observed.job.as_ref(), error),
    };
    let required = migration.spec.revision.as_str();
    let satisfied = probe::is_satisfied(&applied, required, &previous.applied_revisions);
    let forward_to = observed
        .job
        .as_ref()
        .map(|_| migration.spec.revision.as_str());
    draft.status.applied_revisions =
        next_applied_revisions(&applied, &previous.applied_revisions, forward_to);
    draft.status.applied_revision = probe::current_revision(&applied, required);
    let reported = draft.reported();

    if satisfied {
        return draft.satisfied(observed.job.as_ref(), drift_interval);
    }
    if satisfied_before(migration, &previous)
        && !matches!(
            observed.job.as_ref().map(|j| &j.state),
            Some(JobState::Active)
        )
    {
        return draft.drifted(&reported, drift_interval);
    }
    let job_name = job::job_name(migration);
    match observed.job {
        None if draft.attempt_already_failed(&job_name) => draft.keep_failed(),
        None if migration.spec.suspend => draft.pending(
            "Suspended",
            format!(
                "spec.suspend is true: no migration Job is started; the database reports {reported}"
            ),
            Next::AwaitChange,
        ),
        None => match observed.other_active_job {
            Some(other) => draft.pending(
                "WaitingForOtherMigration",
                format!(
                    "migration Job {other} is still running against the same database; this one starts after it"
                ),
                Next::Requeue(WAITING_RECHECK),
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

/// The revisions the gate may release: the tool's applied set, or for head-only tools the
/// heads seen in order. A head seen before cuts the list after it (a downgrade forgets what
/// came after); a new head extends it only when it is the target of this resource's own
/// migration (`forward_to`), whose order is known; any other new head starts the list anew,
/// since nothing says whether it is newer or older.
pub fn next_applied_revisions(
    applied: &AppliedRevisions,
    previous: &[String],
    forward_to: Option<&str>,
) -> Vec<String> {
    let mut revisions = if applied.head_only {
        let heads = &applied.revisions;
        let positions: Option<Vec<usize>> = heads
            .iter()
            .map(|head| previous.iter().position(|r| r == head))
            .collect();
        match positions {
            _ if heads.is_empty() => Vec::new(),
            Some(positions) => {
                let last = positions.into_iter().max().unwrap_or(0);
                previous[..=last].to_vec()
            }
            None if forward_to.is_some_and(|target| heads.iter().any(|h| h == target)) => {
                let mut seen = previous.to_vec();
                seen.extend(heads.iter().filter(|h| !previous.contains(h)).cloned());
                seen
            }
            None => heads.clone(),
        }
    } else {
        applied.revisions.clone()
    };
    if revisions.len() > MAX_APPLIED_REVISIONS {
        revisions.drain(..revisions.len() - MAX_APPLIED_REVISIONS);
    }
    revisions
}

/// Whether the database already reported the revision for the current attempt (this
/// generation, or this retry). Read from the history, which a passing probe error does not
/// change: a database that drifts during an outage is still reported as drifted, and not
/// migrated again without a retry.
fn satisfied_before(migration: &DatabaseMigration, previous: &DatabaseMigrationStatus) -> bool {
    let requested_by = job::requested_by(migration);
    let recorded = previous.history.iter().any(|h| {
        h.revision == migration.spec.revision
            && h.result != "Failed"
            && h.requested_by.as_deref() == Some(requested_by.as_str())
    });
    let ready = is_true(&previous.conditions, READY)
        && previous.observed_generation == migration.metadata.generation;
    recorded || ready
}

/// The status being written, with the helpers that fill it in for each outcome.
struct Draft<'a> {
    migration: &'a DatabaseMigration,
    previous: &'a DatabaseMigrationStatus,
    status: DatabaseMigrationStatus,
    notes: Vec<Note>,
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

    fn history_entry(&self, job: Option<&ObservedJob>, result: &str) -> HistoryEntry {
        HistoryEntry {
            revision: self.migration.spec.revision.clone(),
            job: job.map(|j| j.name.clone()),
            started_at: job
                .and_then(|j| j.start_time.clone())
                .or(Some(Time(self.now))),
            finished_at: job
                .and_then(|j| j.completion_time.clone())
                .or(Some(Time(self.now))),
            result: result.to_string(),
            requested_by: Some(job::requested_by(self.migration)),
        }
    }

    fn attempt_already_failed(&self, job_name: &str) -> bool {
        self.previous
            .history
            .iter()
            .any(|h| h.job.as_deref() == Some(job_name) && h.result == "Failed")
    }

    fn finish(self, create_job: Option<Job>, next: Next) -> Plan {
        Plan {
            create_job,
            status: self.status,
            notes: self.notes,
            next,
        }
    }

    fn invalid_spec(mut self, message: String) -> Plan {
        self.status.phase = Some(Phase::Failed);
        self.set(READY, Status::False, "InvalidSpec", &message);
        self.set(FAILED, Status::True, "InvalidSpec", &message);
        self.set(PROGRESSING, Status::False, "InvalidSpec", &message);
        self.note_on_transition(EventType::Warning, "InvalidSpec", message);
        self.finish(None, Next::AwaitChange)
    }

    fn database_unreadable(mut self, job: Option<&ObservedJob>, error: Error) -> Plan {
        let reason = error.reason();
        let message = error.chain();
        // The last revisions read stay in status: a passing outage does not hold rollouts
        // that were already satisfied, and nothing is released on a guess.
        self.status.phase = Some(match job.map(|j| &j.state) {
            Some(JobState::Active) => Phase::Running,
            _ if self.previous.phase == Some(Phase::Failed) => Phase::Failed,
            _ => Phase::Pending,
        });
        self.set(READY, Status::False, reason, &message);
        self.finish(None, Next::Fail(error))
    }

    fn satisfied(mut self, job: Option<&ObservedJob>, drift_interval: Duration) -> Plan {
        let revision = self.migration.spec.revision.clone();
        let message = format!("the database reports revision {revision}");
        self.status.phase = Some(Phase::Succeeded);
        self.set(READY, Status::True, "RevisionApplied", &message);
        self.set(PROGRESSING, Status::False, "Complete", &message);
        self.set(FAILED, Status::False, "Succeeded", &message);
        self.set(DRIFTED, Status::False, "InSync", &message);
        match job {
            Some(job) if job.state == JobState::Succeeded => {
                // The database may show the revision before the Job is marked complete:
                // the attempt is recorded, and told, once the Job is.
                let entry = self.history_entry(Some(job), "Succeeded");
                if self.push_history(entry) {
                    self.notes.push(Note {
                        type_: EventType::Normal,
                        reason: "MigrationSucceeded",
                        message: format!("migration Job {} applied revision {revision}; Deployments needing it are released", job.name),
                    });
                }
            }
            Some(_) => {
                self.note_on_transition(
                    EventType::Normal,
                    "RevisionApplied",
                    format!("the database reports revision {revision}; Deployments needing it are released"),
                );
            }
            None => {
                let requested_by = job::requested_by(self.migration);
                let adopted = self.status.history.iter().any(|h| {
                    h.revision == revision
                        && h.result != "Failed"
                        && h.requested_by.as_deref() == Some(requested_by.as_str())
                });
                if !adopted {
                    let entry = self.history_entry(None, "Adopted");
                    let _ = self.push_history(entry);
                }
                self.note_on_transition(
                    EventType::Normal,
                    "RevisionAdopted",
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
            "the database now reports {reported}, not revision {revision} it reported before (a restore or a manual downgrade?); Deployments needing {revision} are held again; set annotation schemagate.dev/retry to a new value to run the migration again"
        );
        self.status.phase = Some(Phase::Failed);
        self.set(READY, Status::False, "Drifted", &message);
        self.set(DRIFTED, Status::True, "RevisionMissing", &message);
        self.note_on_transition(EventType::Warning, "Drifted", message);
        self.finish(None, Next::Requeue(drift_interval))
    }

    fn keep_failed(self) -> Plan {
        // The failed attempt's Job is gone; a new attempt needs a spec change or a retry.
        self.finish(None, Next::AwaitChange)
    }

    fn pending(mut self, reason: &'static str, message: String, next: Next) -> Plan {
        self.status.phase = Some(Phase::Pending);
        self.set(READY, Status::False, reason, &message);
        self.set(PROGRESSING, Status::False, reason, &message);
        self.note_on_transition(EventType::Normal, reason, message);
        self.finish(None, next)
    }

    fn start_job(mut self, reported: &str) -> Plan {
        let job = job::build_job(self.migration);
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
        self.set(READY, Status::False, "MigrationRunning", &message);
        self.set(PROGRESSING, Status::True, "JobCreated", &message);
        self.set(FAILED, Status::False, "MigrationRunning", &message);
        self.note_on_transition(EventType::Normal, "JobCreated", message);
        self.finish(Some(job), Next::Requeue(RUNNING_RECHECK))
    }

    fn running(mut self, job: &ObservedJob, reported: &str) -> Plan {
        let message = format!(
            "migration Job {} is running; the database reports {reported}",
            job.name
        );
        self.status.phase = Some(Phase::Running);
        self.set(READY, Status::False, "MigrationRunning", &message);
        self.set(PROGRESSING, Status::True, "JobRunning", &message);
        self.set(FAILED, Status::False, "MigrationRunning", &message);
        self.finish(None, Next::Requeue(RUNNING_RECHECK))
    }

    fn not_applied(self, job: &ObservedJob, reported: &str) -> Plan {
        let revision = &self.migration.spec.revision;
        let message = format!(
            "migration Job {} completed, but the database reports {reported}, not revision {revision}: check that the migrator's command migrates to {revision} and that spec.revision names it as the migration tool records it",
            job.name
        );
        self.failed(job, "RevisionNotApplied", message)
    }

    fn job_failed(self, job: &ObservedJob, reason: &str) -> Plan {
        let revision = &self.migration.spec.revision;
        let output = job
            .message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        let message = format!(
            "migration Job {} failed ({reason}){output} — Deployments needing revision {revision} stay held; fix the migration and update the spec, or set annotation schemagate.dev/retry to a new value to try again",
            job.name
        );
        self.failed(job, "MigrationFailed", message)
    }

    fn failed(mut self, job: &ObservedJob, reason: &'static str, message: String) -> Plan {
        self.status.phase = Some(Phase::Failed);
        self.set(READY, Status::False, reason, &message);
        self.set(PROGRESSING, Status::False, reason, &message);
        self.set(FAILED, Status::True, reason, &message);
        let entry = self.history_entry(Some(job), "Failed");
        let _ = self.push_history(entry);
        self.note_on_transition(EventType::Warning, reason, message);
        let next = if reason == "RevisionNotApplied" {
            // A lagging read replica may catch up; a failed Job will not.
            Next::Requeue(RUNNING_RECHECK)
        } else {
            Next::AwaitChange
        };
        self.finish(None, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            other_active_job: None,
            database,
            held_deployments: vec![],
        }
    }

    fn job(migration: &DatabaseMigration, state: JobState, message: Option<&str>) -> ObservedJob {
        ObservedJob {
            name: job::job_name(migration),
            state,
            start_time: Some(Time(now())),
            completion_time: None,
            message: message.map(str::to_string),
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
        assert_eq!(plan.status.history[0].result, "Adopted");
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
        assert_eq!(plan.status.history[0].result, "Succeeded");
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

    #[test]
    fn seen_order_keeps_heads_and_forgets_after_a_downgrade() {
        let seen = next_applied_revisions(&heads(&["a1"]), &[], None);
        let seen = next_applied_revisions(&heads(&["b2"]), &seen, Some("b2"));
        assert_eq!(seen, vec!["a1", "b2"]);
        let downgraded = next_applied_revisions(&heads(&["a1"]), &seen, None);
        assert_eq!(downgraded, vec!["a1"]);
        // A head nobody here applied may be older or newer: only it is known applied.
        let unknown = next_applied_revisions(&heads(&["c3"]), &seen, None);
        assert_eq!(unknown, vec!["c3"]);
        let history = AppliedRevisions {
            revisions: vec!["1".into(), "2".into()],
            head_only: false,
        };
        assert_eq!(
            next_applied_revisions(&history, &seen, None),
            vec!["1", "2"]
        );
    }
}
