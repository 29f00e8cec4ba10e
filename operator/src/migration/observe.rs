//! Reads the world for one DatabaseMigration: its Job, the database's applied revisions
//! (through the URL in its Secret), and which of its Deployments are held.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::migration::job;
use crate::probe::{self, AppliedRevisions};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use schemagate_crds::{DatabaseMigration, HELD_FOR_ANNOTATION, MIGRATION_LABEL};
use std::time::Duration;

/// What `observe` read of the world for one DatabaseMigration.
#[derive(Debug)]
pub struct Observed {
    /// The Job of the current attempt, if it exists.
    pub job: Option<ObservedJob>,
    /// The database this migration runs against, as its Jobs are labelled
    /// ([`job::database_key`]).
    pub database_key: String,
    /// Another migration Job still running against the same database, if any: its name, or
    /// `namespace/name` when it runs in another namespace.
    pub other_active_job: Option<String>,
    /// An earlier attempt's Job of this DatabaseMigration that is active but never started
    /// its pod (see [`CANNOT_START`]): superseded by the current spec, safe to delete.
    pub stuck_earlier_job: Option<String>,
    /// The database's applied revisions, or why they could not be read.
    pub database: Result<AppliedRevisions, Error>,
    /// Names of this migration's Deployments currently held by schemagate.
    pub held_deployments: Vec<String>,
    /// The revision-graph Job of the current image (Alembic only).
    pub graph_job: GraphJob,
    /// When the read of `database` began, if it answered.
    pub read_at: Option<std::time::Instant>,
}

/// Where the revision graph of the current migrator image stands.
#[derive(Debug, Clone, PartialEq)]
pub enum GraphJob {
    /// Not Alembic, or the status already holds this image's graph.
    NotNeeded,
    /// Not started yet.
    Missing,
    Running {
        name: String,
    },
    /// Finished: its termination message.
    Reported {
        name: String,
        report: String,
    },
    /// Failed: why, with the output tail.
    Failed {
        name: String,
        message: String,
    },
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
    /// Why an active Job's pod cannot start (see [`CANNOT_START`]), secrets removed.
    pub blocked: Option<String>,
    /// Whether an active Job has a pod that runs (is Ready).
    pub pod_running: bool,
}

/// Waiting reasons of a container that will not start until something changes: a kubelet
/// keeps retrying, but only a person can fix the image, its pull secret or the security
/// context.
pub const CANNOT_START: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    Active,
    Succeeded,
    /// The Job controller's reason, such as `BackoffLimitExceeded` or `DeadlineExceeded`.
    Failed {
        reason: String,
    },
}

/// Longest a probe may take before it counts as unreachable.
/// Above the probe's own 15 s cap, so that its more specific error wins.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// How much of a migrator's termination message is kept.
const MESSAGE_TAIL: usize = 700;

/// What the database reported a moment ago, read through `url` by a watch of the running
/// attempt ([`crate::migration::watch`]): the reconcile it starts does not read the database
/// again while the Secret still holds that URL. Holds the URL: it has no `Debug`.
pub struct Reading {
    pub url: String,
    pub applied: AppliedRevisions,
    /// When the read began.
    pub read_at: std::time::Instant,
    /// The watch found the Secret naming `url` in a read that began at most
    /// [`crate::migration::watch::SECRET_NAMED`] before the database read (or after it):
    /// the reconcile takes that read as its own instead of reading the Secret once more.
    pub confirmed: bool,
}

pub async fn observe(
    ctx: &Context,
    migration: &DatabaseMigration,
    reading: Option<Reading>,
) -> Result<Observed> {
    let namespace = migration.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let job_name = job::job_name(migration);

    // Read even with a watch's reading, unless the watch read it beside the database
    // (`confirmed`): a reading through another URL than the Secret's says nothing about
    // the database it names, and the database is read again below.
    let url = match &reading {
        Some(reading) if reading.confirmed => Ok(reading.url.clone()),
        _ => read_database_url_with(&ctx.client, &namespace, migration).await,
    };
    let reading = reading.filter(|reading| url.as_deref().is_ok_and(|url| *url == reading.url));
    // The Job before the database: a Job seen finished was finished before the read, so a
    // database without the revision after it is the migrator's failure, not a race.
    let found = get_job(ctx, &jobs, &namespace, &job_name).await?;
    let (url, database, read_at) = match (reading, url) {
        (Some(reading), Ok(url)) => (Some(url), Ok(reading.applied), Some(reading.read_at)),
        (None, Ok(url)) => {
            let read_at = std::time::Instant::now();
            let database = probe_with_timeout(migration, &url).await;
            (Some(url), database, Some(read_at))
        }
        (_, Err(error)) => (None, Err(error), None),
    };
    let read_at = read_at.filter(|_| database.is_ok());
    // The revision is there: why a running Job's pod has not started does not matter.
    let decided = database
        .as_ref()
        .is_ok_and(|applied| crate::revision::satisfies_spec(migration, &applied.revisions));
    let job = match found {
        Some(found) => Some(observe_job(ctx, &namespace, &found, url.as_deref(), decided).await?),
        None => None,
    };
    let database_key = job::database_key(migration, url.as_deref());
    let other_active_job = if job.is_none() {
        other_active_job(ctx, migration, &database_key, &job_name).await?
    } else {
        None
    };
    let stuck_earlier_job = match &other_active_job {
        // In this namespace: maybe an earlier attempt of this same resource.
        Some(other) if !other.contains('/') => {
            stuck_earlier_job(ctx, &jobs, &namespace, migration, other).await?
        }
        _ => None,
    };
    let held_deployments = held_deployments(ctx, &namespace, &migration.name_any()).await?;
    let graph_job = observe_graph_job(ctx, &jobs, &namespace, migration).await?;
    Ok(Observed {
        job,
        database_key,
        other_active_job,
        stuck_earlier_job,
        database,
        held_deployments,
        graph_job,
        read_at,
    })
}

/// A Job from the controllers' cache, else (not there yet, or no cache) from the API
/// server: a Job that was just created may not have reached the cache, and a Job missing
/// is only believed from the API server.
async fn get_job(
    ctx: &Context,
    jobs: &Api<Job>,
    namespace: &str,
    name: &str,
) -> Result<Option<std::sync::Arc<Job>>> {
    if let Some(cached) = ctx.cached_job(namespace, name) {
        return Ok(Some(cached));
    }
    Ok(jobs
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("get Job {name}")))?
        .map(std::sync::Arc::new))
}

/// The database URL from the referenced Secret, read by name and never cached.
pub async fn read_database_url_with(
    client: &kube::Client,
    namespace: &str,
    migration: &DatabaseMigration,
) -> Result<String> {
    let reference = &migration.spec.database.url_secret_ref;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt(&reference.name)
        .await
        .map_err(Error::kube(format!("get Secret {}", reference.name)))?
        .ok_or_else(|| Error::SecretNotFound {
            namespace: namespace.to_string(),
            name: reference.name.clone(),
            key: reference.key.clone(),
        })?;
    let value = secret
        .data
        .as_ref()
        .and_then(|data| data.get(&reference.key))
        .map(|bytes| bytes.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|data| data.get(&reference.key))
                .map(|text| text.clone().into_bytes())
        })
        .ok_or_else(|| Error::SecretKeyMissing {
            name: reference.name.clone(),
            key: reference.key.clone(),
        })?;
    String::from_utf8(value)
        .map(|url| url.trim().to_string())
        .map_err(|_| Error::SecretNotText {
            name: reference.name.clone(),
            key: reference.key.clone(),
        })
}

/// The revision-graph Job of the current image, when the status has no graph from it yet.
async fn observe_graph_job(
    ctx: &Context,
    jobs: &Api<Job>,
    namespace: &str,
    migration: &DatabaseMigration,
) -> Result<GraphJob> {
    if !job::needs_revision_graph(migration) {
        return Ok(GraphJob::NotNeeded);
    }
    let name = job::graph_job_name(migration);
    let known = migration
        .status
        .as_ref()
        .and_then(|s| s.revision_graph.as_ref())
        .is_some_and(|graph| graph.job == name || graph.failed_job.as_deref() == Some(&name));
    if known {
        return Ok(GraphJob::NotNeeded);
    }
    let Some(found) = get_job(ctx, jobs, namespace, &name).await? else {
        return Ok(GraphJob::Missing);
    };
    if true_condition(&found, "Complete").is_some() {
        let report = termination(ctx, namespace, &name)
            .await?
            .and_then(|(_, message)| message)
            .unwrap_or_default();
        return Ok(GraphJob::Reported { name, report });
    }
    if let Some(failed) = true_condition(&found, "Failed").cloned() {
        let output =
            termination(ctx, namespace, &name)
                .await?
                .map(|(code, message)| match message {
                    Some(message) => format!("exit code {code}: {}", scrub(&message, None)),
                    None => format!("exit code {code}"),
                });
        let reason = failed.reason.unwrap_or_else(|| "Failed".to_string());
        let message = match output {
            Some(output) => format!("Job {name} failed ({reason}): {output}"),
            None => format!("Job {name} failed ({reason})"),
        };
        return Ok(GraphJob::Failed { name, message });
    }
    let started = found
        .status
        .as_ref()
        .is_some_and(|s| s.ready.unwrap_or(0) > 0);
    if !started && let Some(why) = why_not_started(ctx, namespace, &name).await? {
        let message = format!("Job {name} cannot start: {}", scrub(&why, None));
        return Ok(GraphJob::Failed { name, message });
    }
    Ok(GraphJob::Running { name })
}

/// What the database reports now, read through the DatabaseMigration's Secret.
pub async fn probe_database(
    client: &kube::Client,
    namespace: &str,
    migration: &DatabaseMigration,
) -> Result<AppliedRevisions> {
    let url = read_database_url_with(client, namespace, migration).await?;
    probe_with_timeout(migration, &url).await
}

/// The Job's condition of that type, when it is True (Complete, Failed).
fn true_condition<'a>(
    job: &'a Job,
    type_: &str,
) -> Option<&'a k8s_openapi::api::batch::v1::JobCondition> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

async fn probe_with_timeout(migration: &DatabaseMigration, url: &str) -> Result<AppliedRevisions> {
    let database = &migration.spec.database;
    match tokio::time::timeout(
        PROBE_TIMEOUT,
        probe::probe_revisions(database.engine, url, &database.tracking),
    )
    .await
    {
        Ok(result) => result.map_err(Error::from),
        Err(_) => Err(Error::ProbeTimeout {
            seconds: PROBE_TIMEOUT.as_secs(),
        }),
    }
}

async fn observe_job(
    ctx: &Context,
    namespace: &str,
    found: &Job,
    url: Option<&str>,
    revision_applied: bool,
) -> Result<ObservedJob> {
    let name = found.name_any();
    let status = found.status.clone().unwrap_or_default();
    let state = if true_condition(found, "Complete").is_some() {
        JobState::Succeeded
    } else if let Some(failed) = true_condition(found, "Failed") {
        JobState::Failed {
            reason: failed
                .reason
                .clone()
                .unwrap_or_else(|| "Failed".to_string()),
        }
    } else {
        JobState::Active
    };
    let pod_running = status.ready.unwrap_or(0) > 0;
    let blocked = if state == JobState::Active && !pod_running && !revision_applied {
        why_not_started(ctx, namespace, &name)
            .await?
            .map(|why| scrub(&why, url))
    } else {
        None
    };
    let message = if matches!(state, JobState::Failed { .. }) {
        termination(ctx, namespace, &name)
            .await?
            .map(|(code, message)| match message {
                Some(message) => scrub(&format!("exit code {code}: {message}"), url),
                None => format!("exit code {code}"),
            })
    } else {
        None
    };
    Ok(ObservedJob {
        name,
        state,
        start_time: status.start_time,
        completion_time: status.completion_time,
        message,
        blocked,
        pod_running,
    })
}

/// Why an active Job's pod has not started, if a kubelet or the API server says so: the
/// newest pod's container waiting in one of [`CANNOT_START`], or, with no pod at all, the
/// Job controller's `FailedCreate` Event (Pod Security admission, a quota).
async fn why_not_started(ctx: &Context, namespace: &str, job_name: &str) -> Result<Option<String>> {
    let list = job_pods(ctx, namespace, job_name).await?;
    if let Some(pod) = list.last() {
        let status = pod.status.clone().unwrap_or_default();
        let waiting = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .find_map(|c| {
                let waiting = c.state.as_ref()?.waiting.as_ref()?;
                let reason = waiting.reason.as_deref()?;
                CANNOT_START.contains(&reason).then(|| {
                    let detail = waiting.message.as_deref().unwrap_or_default();
                    format!("pod {}: {reason}: {detail}", pod.name_any())
                })
            });
        return Ok(waiting);
    }
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(ctx.client.clone(), namespace);
    let refused = events
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=Job,involvedObject.name={job_name},reason=FailedCreate"
        )))
        .await
        .map_err(Error::kube(format!("list Events of Job {job_name}")))?
        .items
        .into_iter()
        .max_by_key(|e| {
            e.last_timestamp.clone().or(e
                .event_time
                .clone()
                .map(|t| k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t.0)))
        })
        .and_then(|e| e.message)
        .map(|message| format!("its pod was refused: {message}"));
    Ok(refused)
}

/// Removes the URL and its password, then keeps the tail: the end of a log says what failed.
pub fn scrub(text: &str, url: Option<&str>) -> String {
    let scrubbed = match url {
        Some(url) => probe::scrub_secret(text, url),
        None => text.to_string(),
    };
    crate::conditions::truncate_start(scrubbed.trim(), MESSAGE_TAIL)
}

/// The pods of a Job, oldest first.
async fn job_pods(ctx: &Context, namespace: &str, job_name: &str) -> Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let mut list = pods
        .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job_name}")))
        .await
        .map_err(Error::kube(format!("list pods of Job {job_name}")))?
        .items;
    list.sort_by_key(|pod| pod.creation_timestamp());
    Ok(list)
}

/// The exit code and termination message of the newest pod of a Job.
async fn termination(
    ctx: &Context,
    namespace: &str,
    job_name: &str,
) -> Result<Option<(i32, Option<String>)>> {
    let list = job_pods(ctx, namespace, job_name).await?;
    Ok(list.iter().rev().find_map(|pod| {
        pod.status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .iter()
            .find_map(|status| {
                let terminated = status.state.as_ref()?.terminated.as_ref()?;
                let message = terminated.message.clone().filter(|m| !m.trim().is_empty());
                Some((terminated.exit_code, message))
            })
    }))
}

/// Another migration Job, in any namespace, still running against the same database: its
/// name, or `namespace/name` when it is in another namespace. Read from the API server, not
/// a cache, so a Job created a moment ago by another reconcile is seen. An operator
/// confined to one namespace sees that namespace only.
pub async fn other_active_job(
    ctx: &Context,
    migration: &DatabaseMigration,
    database_key: &str,
    job_name: &str,
) -> Result<Option<String>> {
    let namespace = migration.namespace().unwrap_or_default();
    let namespace = namespace.as_str();
    // Jobs started before an upgrade carry the key of earlier releases (the Secret
    // reference, within one namespace): they count in their namespace.
    let legacy = job::legacy_database_key(migration);
    let selector = format!(
        "{}={},{} in ({database_key},{legacy})",
        job::MANAGED_BY_LABEL,
        job::MANAGED_BY,
        job::DATABASE_LABEL,
    );
    let jobs: Api<Job> = match &ctx.watch_namespace {
        Some(watched) => Api::namespaced(ctx.client.clone(), watched),
        None => Api::all(ctx.client.clone()),
    };
    let list = jobs
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(Error::kube("list migration Jobs"))?;
    Ok(list
        .items
        .into_iter()
        // A Job being deleted still counts until it is gone: its pod may still run.
        .filter(|other| {
            other.name_any() != job_name || other.namespace().as_deref() != Some(namespace)
        })
        .filter(|other| {
            other.labels().get(job::DATABASE_LABEL).map(String::as_str) == Some(database_key)
                || other.namespace().as_deref() == Some(namespace)
        })
        .find(|other| {
            let finished = other
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|conditions| {
                    conditions.iter().any(|c| {
                        (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True"
                    })
                });
            !finished
        })
        .map(|other| match other.namespace() {
            Some(theirs) if theirs != namespace => format!("{theirs}/{}", other.name_any()),
            _ => other.name_any(),
        }))
}

/// `other` when it is an earlier attempt of this same DatabaseMigration, not being deleted
/// yet, whose pod never ran and cannot start: nothing of its migration ran.
async fn stuck_earlier_job(
    ctx: &Context,
    jobs: &Api<Job>,
    namespace: &str,
    migration: &DatabaseMigration,
    other: &str,
) -> Result<Option<String>> {
    let Some(found) = jobs
        .get_opt(other)
        .await
        .map_err(Error::kube(format!("get Job {other}")))?
    else {
        return Ok(None);
    };
    let ours = found.labels().get(job::OWNER_LABEL) == Some(&migration.name_any());
    let never_ran = found.status.as_ref().is_none_or(|s| {
        s.ready.unwrap_or(0) == 0 && s.succeeded.unwrap_or(0) == 0 && s.failed.unwrap_or(0) == 0
    });
    if !ours || !never_ran || found.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    let stuck = why_not_started(ctx, namespace, other).await?.is_some();
    Ok(stuck.then(|| other.to_string()))
}

/// Names of this migration's Deployments that schemagate holds: from the gate's cache when
/// it has listed them (a change of a held Deployment reaches this controller only after
/// that cache took it), else listed from the API server.
async fn held_deployments(
    ctx: &Context,
    namespace: &str,
    migration_name: &str,
) -> Result<Vec<String>> {
    if let Some(cache) = ctx.listed_deployments() {
        return Ok(
            crate::context::deployments_of(&cache, namespace, migration_name)
                .iter()
                .filter(|d| d.annotations().contains_key(HELD_FOR_ANNOTATION))
                .map(|d| d.name_any())
                .collect(),
        );
    }
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    // Metadata only: the annotation is all this reads.
    let list = deployments
        .list_metadata(
            &ListParams::default().labels(&format!("{MIGRATION_LABEL}={migration_name}")),
        )
        .await
        .map_err(Error::kube("list Deployments"))?;
    Ok(list
        .items
        .iter()
        .filter(|d| d.annotations().contains_key(HELD_FOR_ANNOTATION))
        .map(|d| d.name_any())
        .collect())
}
