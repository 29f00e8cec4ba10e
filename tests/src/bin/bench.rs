//! `make bench`: the gate's figures on the local control plane with real PostgreSQL and
//! Alembic — release latency (database revision observed / Job Complete → Deployment
//! unpaused), webhook admission latency, and how many early v2 pods appear with the
//! controller backstop alone. `SCHEMAGATE_BENCH_RUNS` sets the releases per mode (20).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark: a failed step ends it"
)]

#[path = "../stats.rs"]
mod stats;
#[path = "../../e2e/support.rs"]
#[allow(dead_code)]
mod support;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::PostParams;
use kube::runtime::watcher::{self, Event};
use schemagate_crds::{DatabaseMigration, HELD_FOR_ANNOTATION};
use schemagate_testenv::harness::namespace;
use stats::*;
use std::time::Instant;
use support::*;

#[derive(Default, Debug)]
struct ReleaseTimes {
    job_complete: Option<Instant>,
    revision_observed: Option<Instant>,
    released: Option<Instant>,
}

/// Watches the Job, the DatabaseMigration and the Deployment of one release and notes when
/// each reached its mark, as seen by a client of the API server.
async fn time_release(ns: &schemagate_testenv::harness::TestNamespace) -> ReleaseTimes {
    let jobs = watcher::watcher(ns.api::<Job>(), watcher::Config::default()).boxed();
    let migrations =
        watcher::watcher(ns.api::<DatabaseMigration>(), watcher::Config::default()).boxed();
    let deployments = watcher::watcher(ns.api::<Deployment>(), watcher::Config::default()).boxed();
    let mut times = ReleaseTimes::default();
    let mut stream = futures::stream::select_all([
        jobs.map(|e| e.map(Seen::Job)).boxed(),
        migrations.map(|e| e.map(Seen::Migration)).boxed(),
        deployments.map(|e| e.map(Seen::Deployment)).boxed(),
    ]);
    let mut held_seen = false;
    apply_manifest(ns, "examples/incident/manifests/release-v2.yaml").await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while times.released.is_none() {
        let Ok(Some(Ok(seen))) = tokio::time::timeout_at(deadline, stream.next()).await else {
            panic!("release not seen within {TIMEOUT:?}: {times:?}");
        };
        let now = Instant::now();
        match seen {
            Seen::Job(Event::Apply(job)) | Seen::Job(Event::InitApply(job)) => {
                let complete = job
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| {
                        c.iter()
                            .any(|c| c.type_ == "Complete" && c.status == "True")
                    });
                if complete
                    && job
                        .annotations()
                        .get("schemagate.dev/revision")
                        .map(String::as_str)
                        == Some("0002")
                {
                    times.job_complete.get_or_insert(now);
                }
            }
            Seen::Migration(Event::Apply(m)) | Seen::Migration(Event::InitApply(m)) => {
                let status = m.status.unwrap_or_default();
                if status.applied_revisions.iter().any(|r| r == "0002") {
                    times.revision_observed.get_or_insert(now);
                }
            }
            Seen::Deployment(Event::Apply(d)) | Seen::Deployment(Event::InitApply(d)) => {
                let held = d.annotations().contains_key(HELD_FOR_ANNOTATION);
                let requires_v2 = d
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.metadata.as_ref())
                    .and_then(|m| m.annotations.as_ref())
                    .and_then(|a| a.get("schemagate.dev/revision"))
                    .map(String::as_str)
                    == Some("0002");
                if held {
                    held_seen = true;
                } else if held_seen
                    && requires_v2
                    && d.spec.as_ref().and_then(|s| s.paused) != Some(true)
                {
                    times.released = Some(now);
                }
            }
            _ => {}
        }
    }
    times
}

enum Seen {
    Job(Event<Job>),
    Migration(Event<DatabaseMigration>),
    Deployment(Event<Deployment>),
}

/// The webhook's decision alone (cache lookup, gate rule, JSON patch), in the process.
async fn admission_decisions(
    ns: &schemagate_testenv::harness::TestNamespace,
    deployment: &Deployment,
    count: usize,
) -> Vec<f64> {
    use kube::core::admission::{AdmissionRequest, AdmissionReview};
    use kube::runtime::reflector;
    let migration = r#"
apiVersion: schemagate.dev/v1alpha1
kind: DatabaseMigration
metadata: { name: app-db }
spec:
  database: { engine: postgres, urlSecretRef: { name: app-db-url }, tracking: { tool: alembic } }
  migrator: { image: app:v2 }
  revision: "0002"
"#;
    let mut migration: DatabaseMigration = serde_yaml::from_str(migration).unwrap();
    migration.metadata.namespace = Some(ns.name().to_string());
    let (store, mut writer) = reflector::store::<kube::core::DeserializeGuard<DatabaseMigration>>();
    writer.apply_watcher_event(&Event::Apply(kube::core::DeserializeGuard(Ok(migration))));
    let ctx = schemagate::context::Context::new(ns.cluster().client(), store, Default::default());
    let review: AdmissionReview<Deployment> = serde_json::from_value(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "bench", "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
            "name": "admission", "namespace": ns.name(), "operation": "CREATE",
            "userInfo": {"username": "bench"}, "object": deployment, "dryRun": false
        }
    }))
    .unwrap();
    let request: AdmissionRequest<Deployment> = review.try_into().unwrap();
    (0..count)
        .map(|_| {
            let start = Instant::now();
            let response = schemagate::gate::webhook::admit(&ctx, &request);
            let elapsed = start.elapsed().as_secs_f64() * 1_000_000.0;
            assert!(response.allowed);
            elapsed
        })
        .collect()
}

fn summary(name: &str, mut values: Vec<f64>, unit: &str) {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "{name:<58} n={:<4} p50={:>8.2}{unit} p99={:>8.2}{unit} max={:>8.2}{unit}",
        values.len(),
        percentile(&values, 50.0),
        percentile(&values, 99.0),
        values.last().copied().unwrap_or(f64::NAN)
    );
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::var("SCHEMAGATE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    println!("schemagate gate benchmark: {runs} releases per mode on the local control plane");

    // Release latency with the webhook (the installation the chart makes).
    let mut from_revision = Vec::new();
    let mut from_job = Vec::new();
    for run in 0..runs {
        let ns = namespace(&format!("bench-release-{run}")).await;
        let _operator = Operator::start(&ns, OperatorOptions::webhook()).await;
        v1_serving(&ns).await;
        let times = time_release(&ns).await;
        let released = times.released.unwrap();
        if let Some(observed) = times.revision_observed {
            from_revision.push(released.saturating_duration_since(observed).as_secs_f64() * 1000.0);
        }
        if let Some(complete) = times.job_complete {
            // The database shows the revision before the Job is marked Complete: negative
            // values are counted as zero.
            from_job.push(released.saturating_duration_since(complete).as_secs_f64() * 1000.0);
        }
    }
    summary(
        "gate release: revision in status -> Deployment unpaused",
        from_revision,
        "ms",
    );
    summary(
        "gate release: Job Complete -> Deployment unpaused",
        from_job,
        "ms",
    );

    // Admission latency through the API server: a dry-run create of an opted-in
    // Deployment in a namespace the webhook covers, and in one it does not.
    let covered = namespace("bench-admission").await;
    let operator = Operator::start(&covered, OperatorOptions::webhook()).await;
    let uncovered = namespace("bench-admission-none").await;
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "admission", "labels": {"schemagate.dev/migration": "app-db"}},
        "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": {
            "metadata": {"labels": {"app": "a"}, "annotations": {"schemagate.dev/revision": "0002"}},
            "spec": {"containers": [{"name": "c", "image": "app:v2"}]}}}
    }))
    .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let mut with_webhook = Vec::new();
    let mut without_webhook = Vec::new();
    for _ in 0..200 {
        let start = Instant::now();
        let held = covered
            .api::<Deployment>()
            .create(&dry_run, &deployment)
            .await
            .unwrap();
        with_webhook.push(start.elapsed().as_secs_f64() * 1000.0);
        assert!(
            held.annotations().contains_key(HELD_FOR_ANNOTATION),
            "the webhook held it"
        );
        let start = Instant::now();
        let admitted = uncovered
            .api::<Deployment>()
            .create(&dry_run, &deployment)
            .await
            .unwrap();
        without_webhook.push(start.elapsed().as_secs_f64() * 1000.0);
        assert!(!admitted.annotations().contains_key(HELD_FOR_ANNOTATION));
    }
    let overhead: Vec<f64> = {
        let mut a = with_webhook.clone();
        let mut b = without_webhook.clone();
        a.sort_by(|x, y| x.partial_cmp(y).unwrap());
        b.sort_by(|x, y| x.partial_cmp(y).unwrap());
        a.iter().zip(&b).map(|(x, y)| x - y).collect()
    };
    summary(
        "admission: dry-run create, webhook in the path",
        with_webhook,
        "ms",
    );
    summary(
        "admission: dry-run create, no webhook",
        without_webhook,
        "ms",
    );
    summary(
        "admission: webhook share (quantile difference)",
        overhead,
        "ms",
    );
    let decision = admission_decisions(&covered, &deployment, 10_000).await;
    summary(
        "admission: webhook decision inside the operator",
        decision,
        "µs",
    );
    drop(operator);

    // The controller backstop alone: how many v2 pods start before the database has 0002.
    let mut early = 0;
    let mut releases_with_early = 0;
    for run in 0..runs {
        let ns = namespace(&format!("bench-backstop-{run}")).await;
        let _operator = Operator::start(&ns, OperatorOptions::backstop_only()).await;
        let url = v1_serving(&ns).await;
        let timeline = release_v2(&ns, &url).await;
        early += timeline.early_pods;
        releases_with_early += usize::from(timeline.early_pods > 0);
    }
    println!(
        "backstop only (no webhook): {early} early v2 pods in {runs} releases ({releases_with_early} releases had any)"
    );
}
