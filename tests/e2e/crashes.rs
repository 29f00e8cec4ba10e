//! The operator SIGKILLed mid-migration, 20 times at random moments: every attempt's
//! migration runs exactly once, the status converges, no pod of a release starts before
//! its revision is in the database, and no hold is left behind.

use crate::replicas::Replica;
use crate::support::*;
use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use schemagate_crds::{DatabaseMigration, HELD_LABEL, REVISION_ANNOTATION};
use schemagate_testenv::harness::{TestNamespace, namespace, wait_for};
use sqlx::Connection as _;
use std::collections::HashSet;
use std::time::Duration;

const RELEASES: usize = 20;
const PASSWORD: &str = "pw-crash-6620";

/// The DatabaseMigration of release `n`: its migrator inserts `r<n>` after a second, so
/// that a kill often lands while it runs.
fn migration(n: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "schemagate.dev/v1alpha1", "kind": "DatabaseMigration",
        "metadata": {"name": "app-db"},
        "spec": {
            "database": {
                "engine": "postgres",
                "urlSecretRef": {"name": "app-db-url", "key": "url"},
                "tracking": {"query": "SELECT version FROM schema_versions"}
            },
            "migrator": {
                "image": "registry.example/migrator:v1",
                "command": ["sh", "-c", format!(
                    "sleep 1; psql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -qc \"INSERT INTO schema_versions(version) VALUES ('r{n}')\""
                )]
            },
            "revision": format!("r{n}")
        }
    })
}

/// The opted-in Deployment of release `n`: its pods need `r<n>` (simulated pods).
fn deployment(n: usize) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "labels": {"schemagate.dev/migration": "app-db"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}, "annotations": {"schemagate.dev/revision": format!("r{n}")}},
                "spec": {"containers": [{"name": "web", "image": "registry.example/web:v1"}]}
            }
        }
    })
}

async fn apply(ns: &TestNamespace, n: usize) {
    let params = PatchParams::apply("schemagate-e2e").force();
    ns.api::<DatabaseMigration>()
        .patch("app-db", &params, &Patch::Apply(migration(n)))
        .await
        .expect("applying the DatabaseMigration");
    ns.api::<Deployment>()
        .patch("web", &params, &Patch::Apply(deployment(n)))
        .await
        .expect("applying the Deployment");
}

async fn applied(url: &str) -> Vec<String> {
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connecting");
    sqlx::query_scalar("SELECT version FROM schema_versions ORDER BY version")
        .fetch_all(&mut connection)
        .await
        .expect("reading schema_versions")
}

#[tokio::test]
async fn the_operator_killed_mid_migration_twenty_times() {
    let ns = namespace("crashes").await;
    prepare(ns.cluster()).await;
    let url = create_postgres_database(ns.cluster(), PASSWORD).await;
    url_secret(&ns, "app-db-url", "url", &url).await;
    let mut connection = sqlx::PgConnection::connect(&url).await.expect("connecting");
    sqlx::query("CREATE TABLE schema_versions (version text NOT NULL)")
        .execute(&mut connection)
        .await
        .expect("creating schema_versions");
    sqlx::query("INSERT INTO schema_versions VALUES ('r0')")
        .execute(&mut connection)
        .await
        .expect("revision r0");

    let webhook_port = schemagate_testenv::cluster::free_port().expect("a free port");
    install_webhook_config(&ns.cluster().client(), ns.name(), webhook_port).await;
    let mut operator = Replica::start_with(&ns, "operator", Some(webhook_port)).await;
    operator.await_leading(true, TIMEOUT).await;
    // The API server trusts the webhook only once its CA bundle is in the configuration.
    await_ca_bundle(&ns.cluster().client(), &chart_fullname(ns.name())).await;

    // Every pod of the Deployment, checked against the database when first seen.
    let pods: Api<Pod> = ns.api();
    let watch_url = url.clone();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let watch = tokio::spawn(async move {
        let mut connection = sqlx::PgConnection::connect(&watch_url)
            .await
            .expect("connecting");
        let mut seen = HashSet::new();
        let mut early = Vec::new();
        let stream = watcher::watcher(pods, watcher::Config::default().labels("app=web"));
        futures::pin_mut!(stream);
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = &mut stopped => break,
            };
            let Some(Ok(Event::Apply(pod) | Event::InitApply(pod))) = event else {
                continue;
            };
            if !seen.insert(pod.name_any()) {
                continue;
            }
            let revision = pod
                .annotations()
                .get(REVISION_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            let present: i64 =
                sqlx::query_scalar("SELECT count(*) FROM schema_versions WHERE version = $1")
                    .bind(&revision)
                    .fetch_one(&mut connection)
                    .await
                    .expect("checking the revision");
            if present == 0 {
                early.push((pod.name_any(), revision));
            }
        }
        early
    });

    let mut rng = fastrand::Rng::with_seed(0x6620);
    let mut kills_while_running = 0;
    for n in 0..=RELEASES {
        apply(&ns, n).await;
        if n > 0 {
            if n % 2 == 1 {
                // Odd releases: kill while the migration Job runs, for certain.
                wait_for(
                    &ns.api::<DatabaseMigration>(),
                    "app-db",
                    TIMEOUT,
                    &format!("r{n}'s Job running"),
                    |m| {
                        m.status.as_ref().and_then(|s| s.phase)
                            == Some(schemagate_crds::Phase::Running)
                    },
                )
                .await;
            } else {
                // Even releases: at a random moment, before, during or after the Job.
                tokio::time::sleep(Duration::from_millis(rng.u64(0..2500))).await;
            }
            let phase = ns
                .api::<DatabaseMigration>()
                .get("app-db")
                .await
                .ok()
                .and_then(|m| m.status)
                .and_then(|s| s.phase);
            if phase == Some(schemagate_crds::Phase::Running) {
                kills_while_running += 1;
            }
            operator.child.kill().await.expect("SIGKILL");
            operator = Replica::start_with(&ns, "operator", Some(webhook_port)).await;
            // The status may have been Ready before the kill: wait for the new process
            // itself, leading and serving its webhook, before the next release.
            operator.await_leading(true, TIMEOUT).await;
            let deadline = std::time::Instant::now() + TIMEOUT;
            while tokio::net::TcpStream::connect(("127.0.0.1", webhook_port))
                .await
                .is_err()
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the webhook never listened again"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let revision = format!("r{n}");
        wait_for(
            &ns.api::<DatabaseMigration>(),
            "app-db",
            TIMEOUT,
            &format!("Ready for {revision}"),
            |m| {
                m.status.as_ref().and_then(|s| s.observed_generation) == m.metadata.generation
                    && has_condition(m, "Ready", "True", "RevisionApplied")
            },
        )
        .await;
        schemagate_testenv::harness::deployment_available(&ns.api(), "web", TIMEOUT).await;
    }
    let _ = stop.send(());
    let early = watch.await.expect("the pod watch");

    // Each release's migration ran exactly once, kills or not.
    let expected: Vec<String> = {
        let mut all: Vec<String> = (0..=RELEASES).map(|n| format!("r{n}")).collect();
        all.sort();
        all
    };
    assert_eq!(applied(&url).await, expected, "one row per release");
    assert!(early.is_empty(), "pods before their revision: {early:?}");
    let web: Deployment = ns.api().get("web").await.expect("the Deployment");
    assert!(!web.labels().contains_key(HELD_LABEL), "no hold left");
    assert_ne!(web.spec.and_then(|s| s.paused), Some(true), "not paused");
    assert!(
        kills_while_running >= RELEASES / 2,
        "every odd release's kill landed while its migration ran: {kills_while_running}"
    );
    assert_no_password(&ns, PASSWORD, None).await;
    let log = ns
        .cluster()
        .dir()
        .join(format!("{}-operator.log", ns.name()));
    let log = std::fs::read_to_string(log).expect("the operator's log");
    assert!(
        !log.contains(PASSWORD),
        "the password is in the operator's log"
    );
    eprintln!("e2e: {RELEASES} releases, {kills_while_running} kills while the migration ran");
    let _ = operator.child.kill().await;
}
