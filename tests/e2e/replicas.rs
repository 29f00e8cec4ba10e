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

/// One operator replica as its own process, as the chart's ServiceAccount with the chart's
/// RBAC.
pub struct Replica {
    pub name: &'static str,
    metrics: SocketAddr,
    pub child: Child,
}

impl Replica {
    async fn start(ns: &TestNamespace, name: &'static str) -> Replica {
        Self::start_with(ns, name, None).await
    }

    /// With `webhook_port`, it also serves the webhook on that loopback port (certificate
    /// in the chart's Secret, CA bundle kept in the chart's configuration, which the caller
    /// installs with [`install_webhook_config`]). Its log goes to
    /// `<cluster dir>/<namespace>-<name>.log`, appended across restarts.
    pub async fn start_with(
        ns: &TestNamespace,
        name: &'static str,
        webhook_port: Option<u16>,
    ) -> Replica {
        let kubeconfig = operator_kubeconfig(ns).await;
        let port = schemagate_testenv::cluster::free_port().expect("a free port");
        let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let log = ns.cluster().dir().join(format!("{}-{name}.log", ns.name()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("a log file");
        let fullname = chart_fullname(ns.name());
        let webhook: Vec<String> = match webhook_port {
            Some(port) => vec![
                format!("--webhook-addr=127.0.0.1:{port}"),
                format!("--webhook-config-name={fullname}"),
                format!("--webhook-cert-secret={fullname}-webhook-cert"),
                "--webhook-cert-ip=127.0.0.1".into(),
            ],
            None => vec!["--no-webhook".into()],
        };
        let child = Command::new(schemagate_bin())
            .args(["run", "--leader-elect", "--log-format", "text"])
            .args(webhook)
            // The Lease the chart's Role grants: `<fullname>`.
            .args(["--leader-election-lease", &fullname])
            .args(["--watch-namespace", ns.name()])
            .args(["--webhook-service-namespace", ns.name()])
            .args(["--metrics-addr", &metrics.to_string()])
            .env("KUBECONFIG", &kubeconfig)
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

    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_at(self.metrics, series).await
    }

    pub async fn await_leading(&self, leading: bool, within: Duration) -> Duration {
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
        .get_opt(&chart_fullname(ns.name()))
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

    let mut a = Replica::start(&ns, "replica-a").await;
    a.await_leading(true, Duration::from_secs(60)).await;
    let b = Replica::start(&ns, "replica-b").await;
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
    let c = Replica::start(&ns, "replica-c").await;
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
