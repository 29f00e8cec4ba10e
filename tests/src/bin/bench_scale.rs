//! `make bench-scale`: schemagate at scale on the local control plane — memory, how fast a
//! thousand DatabaseMigrations become Ready, quiet at steady state, release latency with
//! many releases at once, webhook latency, and the cost of pod churn. The operator is the
//! release build, run as its own process with the chart's RBAC and webhook.
//!
//! Scale tricks (stated in docs/benchmarks.md beside the figures): every DatabaseMigration
//! has its own schema (its own golang-migrate table) and its own Secret, all in one
//! PostgreSQL database, except the ones released at once: each of those has a database of
//! its own, as migrations of one database take turns; the other Deployments have 0
//! replicas. Sizes come from the
//! environment:
//!
//! | variable | default |
//! |---|---|
//! | `SCHEMAGATE_SCALE_MIGRATIONS` | 1000 (each with one gated Deployment) |
//! | `SCHEMAGATE_SCALE_OTHER` | 10000 Deployments that do not opt in |
//! | `SCHEMAGATE_SCALE_QUIET` | 300 (seconds of steady state: the default drift interval) |
//! | `SCHEMAGATE_SCALE_RELEASES` | 100 releases at once |

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
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use schemagate_crds::{DatabaseMigration, HELD_FOR_ANNOTATION, MIGRATION_LABEL};
use schemagate_testenv::harness::{TestNamespace, deployment_available, namespace};
use sqlx::Connection;
use stats::*;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};
use support::*;
use tokio::process::{Child, Command};

const MIGRATOR_IMAGE: &str = "registry.example/scale-migrator:v1";
/// Requests sent at once while creating objects.
const PARALLEL: usize = 32;

/// The figures, each also printed as soon as it is measured.
#[derive(Default)]
struct Table(Vec<(String, String, String)>);

impl Table {
    fn push(&mut self, (figure, measured, goal): (String, String, String)) {
        println!("figure: {figure}: {measured} (goal {goal})");
        self.0.push((figure, measured, goal));
    }

    fn print(&self) {
        println!();
        println!("| figure | measured | goal |");
        println!("|---|---|---|");
        for (figure, measured, goal) in &self.0 {
            println!("| {figure} | {measured} | {goal} |");
        }
    }
}

/// Waits until the Deployment controller has seen every Deployment of the namespace (its
/// ReplicaSet exists, its status is current): steady state.
async fn await_deployments_observed(api: &Api<Deployment>, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let list = api
            .list(&Default::default())
            .await
            .expect("listing Deployments");
        let observed = list
            .items
            .iter()
            .filter(|d| {
                d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation
            })
            .count();
        if observed >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{observed} of {count} Deployments observed by the Deployment controller"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The release build of the operator as its own process.
struct OperatorProcess {
    child: Child,
    metrics: SocketAddr,
}

impl OperatorProcess {
    async fn start(ns: &TestNamespace, webhook_port: u16) -> OperatorProcess {
        let bin = std::env::var("SCHEMAGATE_SCALE_OPERATOR").unwrap_or_else(|_| {
            repo_root()
                .join("target/release/schemagate")
                .display()
                .to_string()
        });
        assert!(
            std::path::Path::new(&bin).exists(),
            "{bin} is missing: run `cargo build --release -p schemagate` (make bench-scale does)"
        );
        let kubeconfig = operator_kubeconfig(ns).await;
        let port = schemagate_testenv::cluster::free_port().expect("a free port");
        let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let fullname = chart_fullname(ns.name());
        let log = ns
            .cluster()
            .dir()
            .join(format!("{}-operator.log", ns.name()));
        let log = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(bin)
            .args(["run", "--log-format", "text"])
            .arg(format!("--webhook-addr=127.0.0.1:{webhook_port}"))
            .arg(format!("--webhook-config-name={fullname}"))
            .arg(format!("--webhook-cert-secret={fullname}-webhook-cert"))
            .arg("--webhook-cert-ip=127.0.0.1")
            .args(["--watch-namespace", ns.name()])
            .args(["--webhook-service-namespace", ns.name()])
            .args(["--metrics-addr", &metrics.to_string()])
            .env("KUBECONFIG", &kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("SCHEMAGATE_SCALE_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("starting schemagate run");
        let operator = OperatorProcess { child, metrics };
        let deadline = Instant::now() + Duration::from_secs(60);
        while operator.metric("schemagate_leader").await != Some(1.0) {
            assert!(Instant::now() < deadline, "the operator did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        operator
    }

    async fn metric(&self, series: &str) -> Option<f64> {
        metric_at(self.metrics, series).await
    }

    async fn counter(&self, series: &str) -> f64 {
        self.metric(series).await.unwrap_or(0.0)
    }

    /// The operator's requests to the API server so far, reads and writes.
    async fn api_requests(&self) -> f64 {
        self.counter("schemagate_api_requests_total{kind=\"read\"}")
            .await
            + self
                .counter("schemagate_api_requests_total{kind=\"write\"}")
                .await
    }

    /// RSS with its parts: heap and stacks (anonymous) and the binary's pages (file).
    fn rss(&self) -> String {
        let pid = self.child.id().expect("operator running");
        format!(
            "{:.1} MiB (anonymous {:.1}, file {:.1})",
            rss_mib(pid),
            status_mib(pid, "RssAnon:"),
            status_mib(pid, "RssFile:")
        )
    }

    /// Waits until every reconcile started has finished and none started for `idle`.
    async fn settle(&self, idle: Duration) {
        let mut last = None;
        let mut since = Instant::now();
        loop {
            let sample = (
                self.counter("schemagate_reconciles_total{controller=\"migration\"}")
                    .await,
                self.counter(
                    "schemagate_reconcile_duration_seconds_count{controller=\"migration\"}",
                )
                .await,
                self.counter("schemagate_reconciles_total{controller=\"gate\"}")
                    .await,
                self.counter("schemagate_reconcile_duration_seconds_count{controller=\"gate\"}")
                    .await,
            );
            if sample.0 != sample.1 || sample.2 != sample.3 || Some(sample) != last {
                last = Some(sample);
                since = Instant::now();
            } else if since.elapsed() >= idle {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

/// A memory line of /proc/PID/status, in MiB.
fn status_mib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// RSS of the control plane's processes (etcd, kube-apiserver, kube-controller-manager)
/// of this cluster.
fn control_plane_mib(ns: &TestNamespace) -> Vec<(String, f64)> {
    let dir = ns.cluster().dir().display().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        let Some(component) = args.get(1) else {
            continue;
        };
        if ["etcd", "kube-apiserver", "kube-controller-manager"].contains(&component.as_str())
            && args.iter().any(|a| a.contains(&dir))
        {
            found.push((component.clone(), rss_mib(pid)));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// The API server's own metrics, in Prometheus' text format.
async fn api_server_metrics(client: &kube::Client) -> String {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("a request");
    client
        .request_text(request)
        .await
        .expect("the API server's metrics")
}

/// The API server's `apiserver_admission_webhook_admission_duration_seconds` buckets for
/// mutating calls, summed over webhooks: (upper bound in seconds, cumulative count).
async fn webhook_histogram(client: &kube::Client) -> Vec<(f64, f64)> {
    let text = api_server_metrics(client).await;
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines().filter(|l| {
        l.starts_with("apiserver_admission_webhook_admission_duration_seconds_bucket{")
            && l.contains("type=\"admit\"")
    }) {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(le) = labels
            .split("le=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        match buckets.iter_mut().find(|(l, _)| *l == le) {
            Some(bucket) => bucket.1 += value,
            None => buckets.push((le, value)),
        }
    }
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    buckets
}

/// The API server's time spent on requests, by verb, resource and subresource: (seconds,
/// requests) from `apiserver_request_duration_seconds`, cumulative since it started.
async fn request_seconds(client: &kube::Client) -> HashMap<String, (f64, f64)> {
    let text = api_server_metrics(client).await;
    let label = |labels: &str, name: &str| {
        labels
            .split(&format!("{name}=\""))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default()
            .to_string()
    };
    let mut totals: HashMap<String, (f64, f64)> = HashMap::new();
    for line in text.lines() {
        let (sum, rest) = if let Some(rest) =
            line.strip_prefix("apiserver_request_duration_seconds_sum{")
        {
            (true, rest)
        } else if let Some(rest) = line.strip_prefix("apiserver_request_duration_seconds_count{") {
            (false, rest)
        } else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let (resource, subresource) = (label(labels, "resource"), label(labels, "subresource"));
        let key = format!(
            "{} {resource}{}{subresource}",
            label(labels, "verb"),
            if subresource.is_empty() { "" } else { "/" }
        );
        let value: f64 = value.parse().unwrap_or(0.0);
        let entry = totals.entry(key).or_default();
        if sum {
            entry.0 += value;
        } else {
            entry.1 += value;
        }
    }
    totals
}

/// The requests the API server spent most time on between two [`request_seconds`] readings
/// (watches left out).
fn print_busiest(before: &HashMap<String, (f64, f64)>, after: &HashMap<String, (f64, f64)>) {
    let mut rows: Vec<(String, f64, f64)> = after
        .iter()
        .map(|(key, (seconds, count))| {
            let (s0, c0) = before.get(key).copied().unwrap_or_default();
            (key.clone(), seconds - s0, count - c0)
        })
        // A watch's time is how long it stayed open, not work.
        .filter(|(key, _, count)| *count > 0.0 && !key.starts_with("WATCH"))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = rows.iter().map(|r| r.2).sum();
    println!("API server requests during the releases: {total:.0}; the most time spent on:");
    for (key, seconds, count) in rows.iter().take(10) {
        println!(
            "  {key:<40} {count:>6.0} requests, {seconds:>6.1} s, mean {:.0} ms",
            seconds / count * 1000.0
        );
    }
}

fn schema(i: usize) -> String {
    format!("m{i:05}")
}

/// The schema of DatabaseMigration `i`: golang-migrate's table at version 1, and a table
/// where the migrator records when it committed.
fn schema_sql(i: usize) -> String {
    let s = schema(i);
    format!(
        "CREATE SCHEMA {s}; \
         CREATE TABLE {s}.schema_migrations (version bigint not null primary key, dirty boolean not null); \
         INSERT INTO {s}.schema_migrations VALUES (1, false); \
         CREATE TABLE {s}.committed (at timestamptz not null);"
    )
}

fn migration_yaml(i: usize) -> String {
    let schema = schema(i);
    // The migrator moves its schema's golang-migrate version from 1 to 2 and records the
    // commit's time in the same transaction.
    let sql = format!(
        "BEGIN; UPDATE {schema}.schema_migrations SET version = 2; \
         INSERT INTO {schema}.committed VALUES (clock_timestamp()); COMMIT;"
    );
    format!(
        r#"
apiVersion: schemagate.dev/v1alpha1
kind: DatabaseMigration
metadata: {{ name: {schema} }}
spec:
  database:
    engine: postgres
    urlSecretRef: {{ name: {schema}, key: url }}
    tracking: {{ tool: golang-migrate, table: {schema}.schema_migrations }}
  migrator:
    image: {MIGRATOR_IMAGE}
    command: [sh, -c, 'psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -X -q -c "$0"', "{sql}"]
  revision: "1"
"#
    )
}

fn deployment(name: &str, migration: Option<&str>, revision: &str) -> Deployment {
    let labels = match migration {
        Some(m) => serde_json::json!({ MIGRATION_LABEL: m }),
        None => serde_json::json!({}),
    };
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {"schemagate.dev/revision": revision}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/scale-app:v1"}]}
            }
        }
    }))
    .unwrap()
}

async fn create_all<T, F>(api: &Api<T>, count: usize, make: F)
where
    T: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    F: Fn(usize) -> T,
{
    futures::stream::iter((0..count).map(|i| {
        let object = make(i);
        async move {
            api.create(&PostParams::default(), &object)
                .await
                .unwrap_or_else(|e| panic!("creating {}: {e}", object.name_any()))
        }
    }))
    .buffer_unordered(PARALLEL)
    .for_each(|_| async {})
    .await;
}

/// Waits until `count` DatabaseMigrations are Ready; returns when the last was seen.
async fn await_all_ready(api: &Api<DatabaseMigration>, count: usize) -> Instant {
    let mut ready = std::collections::HashSet::new();
    let mut stream = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
    while ready.len() < count {
        let Ok(Some(event)) = tokio::time::timeout_at(deadline, stream.next()).await else {
            panic!("{} of {count} DatabaseMigrations Ready", ready.len());
        };
        if let Ok(Event::Apply(m) | Event::InitApply(m)) = event
            && has_condition(&m, "Ready", "True", "RevisionApplied")
        {
            ready.insert(m.name_any());
        }
    }
    Instant::now()
}

#[tokio::main]
async fn main() {
    let migrations = setting("SCHEMAGATE_SCALE_MIGRATIONS", 1000);
    let others = setting("SCHEMAGATE_SCALE_OTHER", 10_000);
    let quiet = setting("SCHEMAGATE_SCALE_QUIET", 300);
    let releases = setting("SCHEMAGATE_SCALE_RELEASES", 100).min(migrations);
    println!(
        "schemagate scale benchmark: {migrations} DatabaseMigrations (one gated Deployment each), \
         {others} other Deployments, {quiet} s steady state, {releases} releases at once"
    );
    let mut table = Table::default();

    let ns = namespace("scale").await;
    prepare(ns.cluster()).await;
    let client = ns.cluster().client();
    let webhook_port = schemagate_testenv::cluster::free_port().expect("a free port");
    install_webhook_config(&client, ns.name(), webhook_port).await;
    let operator = OperatorProcess::start(&ns, webhook_port).await;
    await_ca_bundle(&client, &chart_fullname(ns.name())).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    table.push((
        "operator RSS idle (CRD installed, nothing else)".into(),
        operator.rss(),
        "< 15 MiB".into(),
    ));
    println!("control plane idle: {:?}", control_plane_mib(&ns));

    // The databases: one schema and one Secret per DatabaseMigration, at revision 1. The
    // ones released at once each get a database of their own: migrations of one database
    // take turns, and these are to run side by side.
    let url = create_postgres_database(ns.cluster(), "pw-scale-5521").await;
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connecting");
    let mut release_urls = Vec::new();
    for i in 0..releases {
        let own = create_postgres_database(ns.cluster(), "pw-scale-5521").await;
        let mut conn = sqlx::PgConnection::connect(&own).await.expect("connecting");
        sqlx::raw_sql(sqlx::AssertSqlSafe(schema_sql(i)))
            .execute(&mut conn)
            .await
            .expect("creating a schema");
        release_urls.push(own);
    }
    for chunk in (releases..migrations).collect::<Vec<_>>().chunks(100) {
        let sql: String = chunk.iter().map(|i| schema_sql(*i)).collect();
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut db)
            .await
            .expect("creating schemas");
    }
    let migrator_dir = ns.cluster().dir().join("scale-migrator");
    std::fs::create_dir_all(&migrator_dir).unwrap();
    ns.cluster()
        .register_image(MIGRATOR_IMAGE, &migrator_dir, None, None)
        .await;
    let secrets: Api<Secret> = ns.api();
    create_all(&secrets, migrations, |i| Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(schema(i)),
            ..Default::default()
        },
        string_data: Some(
            [(
                "url".to_string(),
                release_urls.get(i).unwrap_or(&url).clone(),
            )]
            .into(),
        ),
        ..Default::default()
    })
    .await;

    // 1. DatabaseMigrations whose databases already hold their revisions → all Ready.
    let dbms: Api<DatabaseMigration> = ns.api();
    let reads_before = operator
        .counter("schemagate_database_connections_total")
        .await;
    let started = Instant::now();
    let ready = tokio::spawn({
        let dbms = dbms.clone();
        async move { await_all_ready(&dbms, migrations).await }
    });
    create_all(&dbms, migrations, |i| {
        serde_yaml::from_str(&migration_yaml(i)).unwrap()
    })
    .await;
    let applied = started.elapsed();
    let all_ready = ready.await.unwrap().duration_since(started);
    let rate = migrations as f64 / all_ready.as_secs_f64();
    println!(
        "{migrations} DatabaseMigrations: created in {:.1} s, all Ready after {:.1} s; {} database connections",
        applied.as_secs_f64(),
        all_ready.as_secs_f64(),
        operator
            .counter("schemagate_database_connections_total")
            .await
            - reads_before
    );
    table.push((
        format!("{migrations} DatabaseMigrations already at their revisions → all Ready"),
        format!("{rate:.1} per second ({:.1} s)", all_ready.as_secs_f64()),
        "≥ 50 per second".into(),
    ));

    // 2. Gated and other Deployments, then memory at steady state.
    let deployments: Api<Deployment> = ns.api();
    let started = Instant::now();
    create_all(&deployments, migrations, |i| {
        deployment(&format!("gated-{i:05}"), Some(&schema(i)), "1")
    })
    .await;
    create_all(&deployments, others, |i| {
        deployment(&format!("other-{i:05}"), None, "1")
    })
    .await;
    println!(
        "{} Deployments created in {:.1} s",
        migrations + others,
        started.elapsed().as_secs_f64()
    );
    await_deployments_observed(&deployments, migrations + others).await;
    println!(
        "... and observed by the Deployment controller after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    operator.settle(Duration::from_secs(10)).await;
    table.push((
        format!(
            "operator RSS with {migrations} DatabaseMigrations, {migrations} gated Deployments, {others} other Deployments"
        ),
        operator.rss(),
        "< 40 MiB".into(),
    ));
    println!("control plane at scale: {:?}", control_plane_mib(&ns));

    // 3. Steady state: API writes and database connections over one drift interval.
    let writes = "schemagate_api_requests_total{kind=\"write\"}";
    let connections = "schemagate_database_connections_total";
    let (writes_before, connections_before) = (
        operator.counter(writes).await,
        operator.counter(connections).await,
    );
    tokio::time::sleep(Duration::from_secs(quiet as u64)).await;
    let quiet_writes = operator.counter(writes).await - writes_before;
    let quiet_connections = operator.counter(connections).await - connections_before;
    table.push((
        format!("API writes during {quiet} quiet seconds with all of the above"),
        format!("{quiet_writes}"),
        "0".into(),
    ));
    table.push((
        "database connections per DatabaseMigration per drift interval at steady state".into(),
        format!(
            "{:.2} ({quiet_connections} in {quiet} s; drift interval 300 s)",
            quiet_connections / migrations as f64
        ),
        "≤ 1".into(),
    ));
    println!("operator RSS after the quiet period: {}", operator.rss());

    // 4. Releases at once: each gated Deployment moves to revision 2 (held by the webhook),
    // then its DatabaseMigration; latency from the migrator's commit to the Deployment seen
    // unpaused.
    let released = tokio::spawn({
        let deployments = deployments.clone();
        async move {
            let mut seen: HashMap<String, SystemTime> = HashMap::new();
            let mut held = std::collections::HashSet::new();
            let config = watcher::Config::default().labels(MIGRATION_LABEL);
            let mut stream = watcher::watcher(deployments, config).boxed();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
            while seen.len() < releases {
                let Ok(Some(event)) = tokio::time::timeout_at(deadline, stream.next()).await else {
                    panic!("{} of {releases} releases seen", seen.len());
                };
                if let Ok(Event::Apply(d)) = event {
                    let wants_2 = d
                        .spec
                        .as_ref()
                        .and_then(|s| s.template.metadata.as_ref())
                        .and_then(|m| m.annotations.as_ref())
                        .and_then(|a| a.get("schemagate.dev/revision"))
                        .is_some_and(|r| r == "2");
                    let is_held = d.annotations().contains_key(HELD_FOR_ANNOTATION)
                        || d.spec.as_ref().and_then(|s| s.paused) == Some(true);
                    if wants_2 && is_held {
                        held.insert(d.name_any());
                    } else if wants_2 && held.contains(&d.name_any()) {
                        seen.entry(d.name_any()).or_insert_with(SystemTime::now);
                    }
                }
            }
            seen
        }
    });
    // When each DatabaseMigration's status first showed revision 2, and when each migrator
    // pod was first seen ended: where the time goes.
    let stages = tokio::spawn({
        let dbms = dbms.clone();
        let pods: Api<k8s_openapi::api::core::v1::Pod> = ns.api();
        async move {
            let mut status: HashMap<String, SystemTime> = HashMap::new();
            let mut ended: HashMap<String, SystemTime> = HashMap::new();
            let migrations = watcher::watcher(dbms, watcher::Config::default())
                .map(|e| e.map(futures::future::Either::Left));
            let pods = watcher::watcher(pods, watcher::Config::default())
                .map(|e| e.map(futures::future::Either::Right));
            let mut stream = futures::stream::select(migrations.boxed(), pods.boxed());
            let deadline = tokio::time::Instant::now() + Duration::from_secs(1800);
            while status.len() < releases || ended.len() < releases {
                let Ok(Some(event)) = tokio::time::timeout_at(deadline, stream.next()).await else {
                    break;
                };
                match event {
                    Ok(futures::future::Either::Left(Event::Apply(m))) => {
                        let applied = m
                            .status
                            .as_ref()
                            .is_some_and(|s| s.applied_revisions.iter().any(|r| r == "2"));
                        if applied {
                            status.entry(m.name_any()).or_insert_with(SystemTime::now);
                        }
                    }
                    Ok(futures::future::Either::Right(Event::Apply(p))) => {
                        let done =
                            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded");
                        if let (true, Some(owner)) = (done, p.labels().get("schemagate.dev/owner"))
                        {
                            ended.entry(owner.clone()).or_insert_with(SystemTime::now);
                        }
                    }
                    _ => {}
                }
            }
            (status, ended)
        }
    });
    let template_2 = Patch::Merge(serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {"schemagate.dev/revision": "2"}}}}
    }));
    futures::stream::iter((0..releases).map(|i| {
        let (deployments, patch) = (&deployments, &template_2);
        async move {
            let d = deployments
                .patch(&format!("gated-{i:05}"), &PatchParams::default(), patch)
                .await
                .expect("moving a Deployment to revision 2");
            assert!(
                d.annotations().contains_key(HELD_FOR_ANNOTATION),
                "the webhook held {}",
                d.name_any()
            );
        }
    }))
    .buffer_unordered(PARALLEL)
    .for_each(|_| async {})
    .await;
    let requests_before = request_seconds(&client).await;
    let operator_before = operator.api_requests().await;
    let reconciles_before = operator
        .counter("schemagate_reconciles_total{controller=\"migration\"}")
        .await;
    let started = Instant::now();
    let revision_2 = Patch::Merge(serde_json::json!({"spec": {"revision": "2"}}));
    futures::stream::iter((0..releases).map(|i| {
        let (dbms, patch) = (&dbms, &revision_2);
        async move {
            dbms.patch(&schema(i), &PatchParams::default(), patch)
                .await
                .expect("moving a DatabaseMigration to revision 2");
        }
    }))
    .buffer_unordered(PARALLEL)
    .for_each(|_| async {})
    .await;
    let seen = released.await.unwrap();
    print_busiest(&requests_before, &request_seconds(&client).await);
    println!(
        "the operator's share: {:.0} requests, {:.0} migration reconciles",
        operator.api_requests().await - operator_before,
        operator
            .counter("schemagate_reconciles_total{controller=\"migration\"}")
            .await
            - reconciles_before
    );
    println!(
        "{releases} releases done {:.1} s after their DatabaseMigrations changed",
        started.elapsed().as_secs_f64()
    );
    let mut latencies = Vec::new();
    let mut committed_at = Vec::new();
    for (i, own) in release_urls.iter().enumerate() {
        let mut conn = sqlx::PgConnection::connect(own).await.expect("connecting");
        let at: f64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT extract(epoch FROM at)::float8 FROM {}.committed",
            schema(i)
        )))
        .fetch_one(&mut conn)
        .await
        .expect("the migrator recorded its commit");
        let released = seen[&format!("gated-{i:05}")]
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        latencies.push((released - at) * 1000.0);
        committed_at.push(at);
    }
    let (status_seen, pod_ended) = stages.await.unwrap();
    let since = |at: &HashMap<String, SystemTime>, i: usize, from: f64| {
        at.get(&schema(i)).map(|t| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64()
                - from
        })
    };
    let (mut to_pod, mut to_status) = (Vec::new(), Vec::new());
    for (i, committed) in committed_at.iter().enumerate() {
        to_pod.extend(since(&pod_ended, i, *committed).map(|s| s * 1000.0));
        to_status.extend(since(&status_seen, i, *committed).map(|s| s * 1000.0));
    }
    let (pod50, pod99) = p50_p99(to_pod);
    let (st50, st99) = p50_p99(to_status);
    println!(
        "commit → migrator pod seen Succeeded: p50 {pod50:.0} ms, p99 {pod99:.0} ms; \
         commit → revision in the status: p50 {st50:.0} ms, p99 {st99:.0} ms"
    );
    let (p50, p99) = p50_p99(latencies);
    table.push((
        format!(
            "gate release, migrator commits the revision → Deployment unpaused, {releases} releases at once"
        ),
        format!("p50 {p50:.0} ms, p99 {p99:.0} ms"),
        "p99 < 0.5 s".into(),
    ));

    // 5. Webhook admission latency through the API server: a dry-run create of an opted-in
    // Deployment in the covered namespace, and the same in one the webhook does not cover.
    let uncovered = namespace("scale-uncovered").await;
    let probe = deployment("admission", Some(&schema(migrations - 1)), "3");
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let (mut covered_ms, mut uncovered_ms) = (Vec::new(), Vec::new());
    let before = webhook_histogram(&client).await;
    for _ in 0..300 {
        let start = Instant::now();
        let held = deployments.create(&dry_run, &probe).await.unwrap();
        covered_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        assert!(held.annotations().contains_key(HELD_FOR_ANNOTATION));
        let start = Instant::now();
        uncovered
            .api::<Deployment>()
            .create(&dry_run, &probe)
            .await
            .unwrap();
        uncovered_ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let after = webhook_histogram(&client).await;
    let (c50, c99) = p50_p99(covered_ms);
    let (u50, u99) = p50_p99(uncovered_ms);
    // The API server's own histogram of the webhook calls it made (TLS, the operator, the
    // answer), for these admissions only.
    let calls: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            (
                *le,
                n - before.iter().find(|(l, _)| l == le).map_or(0.0, |b| b.1),
            )
        })
        .collect();
    let total = calls.last().map_or(0.0, |c| c.1);
    let p99_bucket = calls
        .iter()
        .find(|(_, n)| *n >= 0.99 * total)
        .map_or(f64::NAN, |c| c.0);
    let under_5ms = calls
        .iter()
        .find(|(le, _)| (*le - 0.005).abs() < 1e-9)
        .map_or(f64::NAN, |c| c.1);
    table.push((
        "webhook admission latency through the API server, release build".into(),
        format!(
            "p99 ≤ {:.0} ms by the API server's histogram ({under_5ms} of {total} calls under 5 ms); \
             dry-run create p50/p99 {c50:.1}/{c99:.1} ms with the webhook, {u50:.1}/{u99:.1} ms without",
            p99_bucket * 1000.0
        ),
        "p99 < 5 ms".into(),
    ));

    // 6. 100 pods of a gated Deployment (not held) turning Ready, on an operator of its own
    // (the drift checks of the thousand above would blur the count).
    drop(operator);
    let churn_ns = namespace("scale-churn").await;
    let webhook_port = schemagate_testenv::cluster::free_port().expect("a free port");
    install_webhook_config(&client, churn_ns.name(), webhook_port).await;
    let operator = OperatorProcess::start(&churn_ns, webhook_port).await;
    await_ca_bundle(&client, &chart_fullname(churn_ns.name())).await;
    let churn_schema = migrations;
    let churn_api: Api<Secret> = churn_ns.api();
    churn_api
        .create(
            &PostParams::default(),
            &Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(schema(churn_schema)),
                    ..Default::default()
                },
                string_data: Some([("url".to_string(), url.clone())].into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Its own schema, at revision 1.
    sqlx::raw_sql(sqlx::AssertSqlSafe(schema_sql(churn_schema)))
        .execute(&mut db)
        .await
        .expect("creating the schema");
    let churn_dbms: Api<DatabaseMigration> = churn_ns.api();
    let churn_dbm: DatabaseMigration = serde_yaml::from_str(&migration_yaml(churn_schema)).unwrap();
    churn_dbms
        .create(&PostParams::default(), &churn_dbm)
        .await
        .unwrap();
    await_all_ready(&churn_dbms, 1).await;
    let churn = "churn";
    let churn_deployments: Api<Deployment> = churn_ns.api();
    churn_deployments
        .create(
            &PostParams::default(),
            &deployment(churn, Some(&schema(churn_schema)), "1"),
        )
        .await
        .unwrap();
    deployment_available(&churn_deployments, churn, Duration::from_secs(300)).await;
    operator.settle(Duration::from_secs(3)).await;
    let reconciles = "schemagate_reconciles_total{controller=\"migration\"}";
    let (r0, c0) = (
        operator.counter(reconciles).await,
        operator.counter(connections).await,
    );
    churn_deployments
        .patch(
            churn,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 100}})),
        )
        .await
        .unwrap();
    deployment_available(&churn_deployments, churn, Duration::from_secs(600)).await;
    operator.settle(Duration::from_secs(3)).await;
    table.push((
        "100 pods of a gated Deployment turning Ready: reconciles, database connections".into(),
        format!(
            "{} reconciles, {} connections",
            operator.counter(reconciles).await - r0,
            operator.counter(connections).await - c0
        ),
        "0, 0".into(),
    ));

    table.print();
    println!(
        "\ncontrol plane at the end (RSS MiB): {:?}",
        control_plane_mib(&ns)
    );
}
