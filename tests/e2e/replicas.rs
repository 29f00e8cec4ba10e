//! Several replicas: `schemagate run --leader-elect` processes share one Lease. Only the
//! holder runs the controllers (creates Jobs, writes status); a replica that is killed
//! is replaced once its Lease expires, one that stops releases it at once.

use crate::support::*;
use k8s_openapi::api::coordination::v1::Lease;
use schemagate_testenv::harness::{TestNamespace, namespace};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

const LEASE: &str = "schemagate";

/// One operator replica as its own process, with the admin's kubeconfig.
struct Replica {
    name: &'static str,
    metrics: SocketAddr,
    child: Child,
}

impl Replica {
    fn start(ns: &TestNamespace, name: &'static str) -> Replica {
        let port = schemagate_testenv::cluster::free_port().expect("a free port");
        let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let log = ns.cluster().dir().join(format!("{}-{name}.log", ns.name()));
        let log = std::fs::File::create(log).expect("a log file");
        let child = Command::new(schemagate_bin())
            .args([
                "run",
                "--no-webhook",
                "--leader-elect",
                "--log-format",
                "text",
            ])
            .args(["--leader-election-lease", LEASE])
            .args(["--watch-namespace", ns.name()])
            .args(["--webhook-service-namespace", ns.name()])
            .args(["--metrics-addr", &metrics.to_string()])
            .env("KUBECONFIG", ns.cluster().kubeconfig_path())
            .env("POD_NAME", name)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("starting schemagate run");
        Replica {
            name,
            metrics,
            child,
        }
    }

    async fn metric(&self, series: &str) -> Option<f64> {
        metric_at(self.metrics, series).await
    }

    async fn await_leading(&self, leading: bool, within: Duration) -> Duration {
        let started = Instant::now();
        let want = if leading { 1.0 } else { 0.0 };
        loop {
            if self.metric("schemagate_leader").await == Some(want) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "{} not leading={leading} after {within:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reconciles of DatabaseMigrations this replica ran.
    async fn migration_reconciles(&self) -> f64 {
        self.metric("schemagate_reconciles_total{controller=\"migration\"}")
            .await
            .unwrap_or(0.0)
    }
}

async fn holder(ns: &TestNamespace) -> Option<String> {
    ns.api::<Lease>()
        .get_opt(LEASE)
        .await
        .expect("reading the Lease")
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

#[tokio::test]
async fn only_the_leader_runs_the_controllers_and_another_takes_over() {
    let ns = namespace("replicas").await;
    prepare(ns.cluster()).await;
    let url = create_postgres_database(ns.cluster(), "pw-replicas-7781").await;
    url_secret(&ns, "app-db-url", "url", &url).await;

    let mut a = Replica::start(&ns, "replica-a");
    a.await_leading(true, Duration::from_secs(60)).await;
    let b = Replica::start(&ns, "replica-b");
    // b is up (its metrics answer) and follows.
    b.await_leading(false, Duration::from_secs(60)).await;
    assert_eq!(holder(&ns).await.as_deref(), Some("replica-a"));

    apply_manifest(&ns, "examples/incident/manifests/migration-v1.yaml").await;
    await_ready(&ns).await;
    assert!(
        a.migration_reconciles().await > 0.0,
        "the leader reconciled"
    );
    assert_eq!(b.migration_reconciles().await, 0.0, "the follower did not");
    assert_eq!(b.metric("schemagate_leader").await, Some(0.0));

    // SIGKILL the leader: its Lease is not released and expires.
    a.child.kill().await.expect("killing replica-a");
    let takeover = b.await_leading(true, Duration::from_secs(60)).await;
    assert_eq!(holder(&ns).await.as_deref(), Some("replica-b"));
    apply_manifest(&ns, "examples/incident/manifests/migration.yaml").await;
    schemagate_testenv::harness::wait_for(
        &ns.api::<schemagate_crds::DatabaseMigration>(),
        "app-db",
        TIMEOUT,
        "Ready for revision 0002",
        |m| {
            m.status.as_ref().and_then(|s| s.observed_generation) == m.metadata.generation
                && has_condition(m, "Ready", "True", "RevisionApplied")
        },
    )
    .await;
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0002"));
    assert!(
        b.migration_reconciles().await > 0.0,
        "the new leader reconciles"
    );

    // A replica that stops (SIGTERM) releases the Lease: the other takes over at once.
    let c = Replica::start(&ns, "replica-c");
    c.await_leading(false, Duration::from_secs(60)).await;
    let pid = b.child.id().expect("replica-b's pid");
    let stopping = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await
        .expect("kill -TERM");
    assert!(status.success());
    c.await_leading(true, Duration::from_secs(60)).await;
    let handover = stopping.elapsed();
    assert!(
        handover < Duration::from_secs(10),
        "released at once, not expired: {handover:?}"
    );
    eprintln!(
        "e2e: leader killed → the other replica leads after {takeover:?}; leader stopped → after {handover:?}"
    );
}
