//! Faults that need a control plane of the test's own, because they would disturb every
//! other test of the shared one:
//!
//! - an operator watching all namespaces (the shared cluster's operators are each confined
//!   to their test's namespace), with two DatabaseMigrations in two namespaces on one
//!   database: their Jobs run one after the other;
//! - the kube-apiserver killed (SIGKILL) and restarted while a migration Job runs and a
//!   Deployment is held;
//! - PostgreSQL restarted while the operator reads it every second.
//!
//! The same operator task lives through all of it: it recovers without a restart, releases
//! nothing before its migration committed, and leaves no hold behind.

use crate::support::*;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use schemagate::certs::CertNames;
use schemagate::controller::ControllerConfig;
use schemagate::run::{CertificateSource, RunConfig, WebhookSettings};
use schemagate_crds::{DatabaseMigration, HELD_FOR_ANNOTATION, MIGRATION_LABEL};
use schemagate_testenv::cluster::{Cluster, ClusterOptions, Databases, IMAGES_NAMESPACE};
use schemagate_testenv::node::ImageEntry;
use sqlx::Connection as _;
use std::time::{Duration, Instant};

const MIGRATOR: &str = "registry.example/psql-migrator:1";
const SLEEPER: &str = "registry.example/sleeper:1";
const FIELD_MANAGER: &str = "schemagate-e2e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_wide_operator_survives_api_server_and_database_restarts() {
    // The operator's log is captured, to be searched for passwords at the end.
    operator_log();
    let dir = std::env::temp_dir().join(format!("schemagate-e2e-restarts-{}", std::process::id()));
    let mut options = ClusterOptions::new(&dir);
    options.databases = Databases {
        postgres: true,
        mariadb: false,
    };
    let mut cluster = Cluster::start(options)
        .await
        .unwrap_or_else(|error| panic!("the test's own control plane did not start: {error}"));
    let client = schemagate_testenv::cluster::admin_client(cluster.kubeconfig_path())
        .await
        .expect("an admin client");
    install_crd(&client).await;
    let images_dir = dir.join("images");
    std::fs::create_dir_all(&images_dir).expect("an image directory");
    for image in [MIGRATOR, SLEEPER] {
        register_image(&client, image, &images_dir).await;
    }
    for name in ["team-a", "team-b", "gated"] {
        create_namespace(&client, name).await;
    }

    // The operator: every namespace, the webhook for namespace `gated`.
    let port = schemagate_testenv::cluster::free_port().expect("a free port");
    install_webhook_config(&client, "gated", port).await;
    let metrics_addr: std::net::SocketAddr = format!(
        "127.0.0.1:{}",
        schemagate_testenv::cluster::free_port().expect("a free port")
    )
    .parse()
    .expect("address");
    let config = RunConfig {
        controller: ControllerConfig {
            namespace: None,
            concurrency: 16,
            revision_poll_interval: schemagate::migration::watch::DEFAULT_POLL,
        },
        leader_election: None,
        metrics_addr: Some(metrics_addr),
        webhook: Some(WebhookSettings {
            addr: format!("127.0.0.1:{port}").parse().expect("address"),
            certificate: CertificateSource::Managed {
                namespace: "gated".into(),
                secret: format!("{}-webhook-cert", chart_fullname("gated")),
                names: CertNames::for_service(
                    "schemagate",
                    "gated",
                    vec!["127.0.0.1".parse().expect("ip")],
                ),
            },
            config_name: Some(chart_fullname("gated")),
        }),
    };
    // The operator as a ServiceAccount of its own: the webhook lets the operator's own
    // writes through, and the test's writes must not look like them.
    let run_client = operator_client(&client, cluster.kubeconfig_path()).await;
    let operator = tokio::spawn(async move {
        schemagate::run::run(run_client, config, std::future::pending::<()>()).await
    });
    await_ca_bundle(&client, &chart_fullname("gated")).await;

    let postgres = cluster.postgres().expect("PostgreSQL runs");
    let shared = postgres.create_database("shared").await.expect("database");
    let gated = postgres.create_database("gated").await.expect("database");

    let admin_url = postgres.admin_url();
    one_database_two_namespaces(&client, &admin_url, &shared).await;
    assert!(!operator.is_finished(), "the operator is still running");

    let (deployments, dbms) = gated_app_at_revision_1(&client, &gated).await;
    api_server_restart_during_a_migration(&mut cluster, &client, &gated, &deployments, &dbms).await;
    assert!(
        !operator.is_finished(),
        "the operator lived through the API server's restart"
    );

    database_restart_while_probing(&mut cluster, &gated, &deployments, &dbms).await;
    assert!(
        !operator.is_finished(),
        "the operator lived through the database's restart"
    );

    let passwords = [password_of(&shared), password_of(&gated), "pw-other-7731"];
    assert_no_password_anywhere(&client, &passwords).await;
    let metrics = metrics_text(metrics_addr).await.expect("the metrics");
    for password in passwords {
        assert!(!metrics.contains(password), "a password is in the metrics");
    }

    operator.abort();
    cluster.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two DatabaseMigrations in two namespaces on one database, created at once: one Job runs,
/// the other waits (and says for which Job, in which namespace), then runs. The URLs name
/// the server differently (`127.0.0.1` and `localhost`) and log in as different users.
async fn one_database_two_namespaces(client: &Client, admin_url: &str, url: &str) {
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("connecting as the administrator");
    sqlx::raw_sql("CREATE ROLE other_user LOGIN PASSWORD 'pw-other-7731'")
        .execute(&mut admin)
        .await
        .expect("a second user");
    let mut db = sqlx::PgConnection::connect(url).await.expect("connecting");
    sqlx::raw_sql(
        "CREATE TABLE runs (who text PRIMARY KEY, started timestamptz, ended timestamptz); \
         GRANT ALL ON runs TO other_user;",
    )
    .execute(&mut db)
    .await
    .expect("the runs table");
    let mut urls = Vec::new();
    for who in ["a", "b"] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA {who}; GRANT ALL ON SCHEMA {who} TO other_user; \
             CREATE TABLE {who}.schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL); \
             INSERT INTO {who}.schema_migrations VALUES (1, false); \
             GRANT ALL ON {who}.schema_migrations TO other_user;"
        )))
        .execute(&mut db)
        .await
        .expect("a schema");
    }
    urls.push(url.to_string());
    let port = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .expect("a port");
    urls.push(format!(
        "postgresql://other_user:pw-other-7731@localhost:{port}/shared"
    ));

    let sql = |who: &str| {
        format!(
            "INSERT INTO runs VALUES ('{who}', clock_timestamp(), NULL); SELECT pg_sleep(3); \
             UPDATE runs SET ended = clock_timestamp() WHERE who = '{who}'; \
             UPDATE {who}.schema_migrations SET version = 2;"
        )
    };
    let mut created = Vec::new();
    for ((who, ns), url) in [("a", "team-a"), ("b", "team-b")].into_iter().zip(&urls) {
        put_secret(client, ns, url).await;
        created.push(migration(
            ns,
            "2",
            &format!("{who}.schema_migrations"),
            &sql(who),
        ));
    }
    // Both at once.
    let apis: Vec<Api<DatabaseMigration>> = ["team-a", "team-b"]
        .iter()
        .map(|ns| Api::namespaced(client.clone(), ns))
        .collect();
    let params = PostParams::default();
    let (a, b) = tokio::join!(
        apis[0].create(&params, &created[0]),
        apis[1].create(&params, &created[1])
    );
    a.expect("creating team-a's DatabaseMigration");
    b.expect("creating team-b's DatabaseMigration");

    // Until both are Ready: what each said while the other ran.
    let mut waited: Vec<String> = Vec::new();
    let started = Instant::now();
    loop {
        let mut ready = 0;
        for api in &apis {
            let dbm = api
                .get("app-db")
                .await
                .expect("reading a DatabaseMigration");
            if let Some(c) = condition(&dbm, "Ready") {
                if c.status == "True" {
                    ready += 1;
                } else if c.reason == "WaitingForOtherMigration" && !waited.contains(&c.message) {
                    waited.push(c.message.clone());
                }
            }
        }
        if ready == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "both DatabaseMigrations Ready within 120 s; waited: {waited:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let runs: Vec<(String, f64, f64)> = sqlx::query_as(
        "SELECT who, extract(epoch FROM started)::float8, extract(epoch FROM ended)::float8 \
         FROM runs ORDER BY started",
    )
    .fetch_all(&mut db)
    .await
    .expect("reading the runs");
    assert_eq!(runs.len(), 2, "each migration ran once: {runs:?}");
    let (first, second) = (&runs[0], &runs[1]);
    assert!(
        first.2 <= second.1,
        "the second migration started after the first ended: {runs:?}"
    );
    // The second is woken when the first one's migrator ends, not at its next recheck.
    println!(
        "one database, two namespaces: the second migration started {:.1} s after the first ended",
        second.1 - first.2
    );
    let other_ns = if second.0 == "a" { "team-b" } else { "team-a" };
    assert!(
        waited
            .iter()
            .any(|m| m.contains(&format!("migration Job {other_ns}/app-db-"))),
        "the second one said it waits for the first one's Job in {other_ns}: {waited:?}"
    );
    // Each namespace's Job exists, both finished.
    for ns in ["team-a", "team-b"] {
        let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
        let list = jobs.list(&ListParams::default()).await.expect("Jobs");
        assert_eq!(list.items.len(), 1, "one Job in {ns}");
    }
}

/// Namespace `gated`: the database at golang-migrate version 1, its DatabaseMigration
/// Ready, and a Deployment needing revision 1 available.
async fn gated_app_at_revision_1(
    client: &Client,
    url: &str,
) -> (Api<Deployment>, Api<DatabaseMigration>) {
    let mut db = sqlx::PgConnection::connect(url).await.expect("connecting");
    sqlx::raw_sql(
        "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL); \
         INSERT INTO schema_migrations VALUES (1, false); \
         CREATE TABLE committed (revision text PRIMARY KEY, at timestamptz NOT NULL);",
    )
    .execute(&mut db)
    .await
    .expect("the tables");
    put_secret(client, "gated", url).await;
    let dbms: Api<DatabaseMigration> = Api::namespaced(client.clone(), "gated");
    dbms.create(
        &PostParams::default(),
        &migration("gated", "1", "schema_migrations", "SELECT 1"),
    )
    .await
    .expect("creating the DatabaseMigration");
    await_ready_at(&dbms, "1", Duration::from_secs(60)).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "gated");
    deployments
        .create(&PostParams::default(), &app("1"))
        .await
        .expect("creating the Deployment");
    await_released(&deployments, "1", Duration::from_secs(60)).await;
    (deployments, dbms)
}

/// The migration to revision 2 runs (its migrator waits 4 s before it writes), the
/// Deployment moves to revision 2 and is held; the API server is killed and stays down for
/// 5 s. Afterwards the operator finds the Job's outcome, reads the database and releases
/// the Deployment, and not before the migration committed.
async fn api_server_restart_during_a_migration(
    cluster: &mut Cluster,
    client: &Client,
    url: &str,
    deployments: &Api<Deployment>,
    dbms: &Api<DatabaseMigration>,
) {
    let sql = migrate_to("2");
    let patch = serde_json::json!({"spec": {"revision": "2", "migrator": migrator_spec(&sql, 4)}});
    dbms.patch("app-db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("moving the DatabaseMigration to revision 2");
    await_migrator_running(client, "gated").await;
    let held = move_app_to(deployments, "2").await;
    assert!(
        held.annotations().contains_key(HELD_FOR_ANNOTATION),
        "the webhook held the Deployment"
    );

    cluster
        .restart_apiserver(Duration::from_secs(5))
        .await
        .unwrap_or_else(|error| panic!("the API server did not come back: {error}"));
    let back = Instant::now();

    await_ready_at(dbms, "2", Duration::from_secs(120)).await;
    await_released(deployments, "2", Duration::from_secs(120)).await;
    println!(
        "API server down 5 s: the Deployment was released {:.1} s after it was back",
        back.elapsed().as_secs_f64()
    );
    assert_released_after_commit(url, client, "2").await;
    // The Job's own outcome reaches the status too, though it was written while the API
    // server was down.
    let started = Instant::now();
    loop {
        let dbm = dbms.get("app-db").await.expect("the DatabaseMigration");
        let job = dbm.status.as_ref().and_then(|s| s.job.clone());
        if job.as_ref().is_some_and(|j| j.completion_time.is_some()) {
            break;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let jobs: Api<Job> = Api::namespaced(client.clone(), "gated");
            let pods: Api<Pod> = Api::namespaced(client.clone(), "gated");
            let jobs = jobs.list(&ListParams::default()).await.map(|l| {
                l.items
                    .into_iter()
                    .map(|j| (j.name_any(), j.status, j.metadata.finalizers))
                    .collect::<Vec<_>>()
            });
            let pods = pods.list(&ListParams::default()).await.map(|l| {
                l.items
                    .into_iter()
                    .map(|p| {
                        (
                            p.name_any(),
                            p.status.and_then(|s| s.phase),
                            p.metadata.finalizers,
                        )
                    })
                    .collect::<Vec<_>>()
            });
            panic!(
                "the migration Job's completion reached the status within 90 s: {job:?}\njobs: {jobs:?}\npods: {pods:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The DatabaseMigration reads the database every second; PostgreSQL goes down for 6 s
/// (connections cut, port closed) and comes back. While it is down the status says so, and
/// a release asked for meanwhile is held; afterwards the migration runs and the Deployment
/// is released after it committed.
async fn database_restart_while_probing(
    cluster: &mut Cluster,
    url: &str,
    deployments: &Api<Deployment>,
    dbms: &Api<DatabaseMigration>,
) {
    let patch = serde_json::json!({"spec": {"driftCheckInterval": "1s"}});
    dbms.patch("app-db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("a drift check every second");
    let client = deployments.clone().into_client();

    // Watch the status while the server is down: a failed read must show.
    let watcher = {
        let dbms = dbms.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let until = Instant::now() + Duration::from_secs(60);
            while Instant::now() < until {
                if let Ok(dbm) = dbms.get("app-db").await
                    && let Some(c) = condition(&dbm, "Ready")
                    && c.status == "False"
                    && !seen.contains(&c.reason)
                {
                    seen.push(c.reason.clone());
                    if c.reason.starts_with("Database") {
                        return (seen, c.message.clone());
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (seen, String::new())
        })
    };
    let restart = async {
        cluster
            .postgres_mut()
            .expect("PostgreSQL runs")
            .restart(Duration::from_secs(6))
            .await
            .expect("PostgreSQL came back");
    };
    let (_, seen) = tokio::join!(restart, watcher);
    let (reasons, message) = seen.expect("the status watcher");
    println!("PostgreSQL down 6 s: the status said {reasons:?}: {message}");
    assert!(
        reasons.iter().any(|r| r.starts_with("Database")),
        "the status said the database could not be read: {reasons:?}"
    );
    let password = password_of(url);
    assert!(
        !message.is_empty() && !message.contains(password),
        "the message names the problem without the password: {message}"
    );
    // Revisions confirmed before the outage still hold: the Deployment stays released.
    let app = deployments.get("app").await.expect("the Deployment");
    assert!(!app.annotations().contains_key(HELD_FOR_ANNOTATION));

    // A release after the restart: held until the migration ran, then released.
    let sql = migrate_to("3");
    let patch = serde_json::json!({"spec": {"revision": "3", "migrator": migrator_spec(&sql, 0)}});
    dbms.patch("app-db", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("moving the DatabaseMigration to revision 3");
    let held = move_app_to(deployments, "3").await;
    assert!(held.annotations().contains_key(HELD_FOR_ANNOTATION));
    await_ready_at(dbms, "3", Duration::from_secs(120)).await;
    await_released(deployments, "3", Duration::from_secs(120)).await;
    assert_released_after_commit(url, &client, "3").await;
}

fn password_of(url: &str) -> &str {
    url.split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(userinfo, _)| userinfo.split_once(':'))
        .map(|(_, password)| password)
        .expect("the URL has a password")
}

/// None of the passwords is in a DatabaseMigration, Event, Job or pod of the test's
/// namespaces, nor in the operator's log.
async fn assert_no_password_anywhere(client: &Client, passwords: &[&str]) {
    use k8s_openapi::api::events::v1::Event;
    for ns in ["team-a", "team-b", "gated"] {
        let lp = ListParams::default();
        let places = [
            (
                "DatabaseMigrations",
                serde_json::to_string(
                    &Api::<DatabaseMigration>::namespaced(client.clone(), ns)
                        .list(&lp)
                        .await
                        .expect("listing")
                        .items,
                ),
            ),
            (
                "Events",
                serde_json::to_string(
                    &Api::<Event>::namespaced(client.clone(), ns)
                        .list(&lp)
                        .await
                        .expect("listing")
                        .items,
                ),
            ),
            (
                "Jobs",
                serde_json::to_string(
                    &Api::<Job>::namespaced(client.clone(), ns)
                        .list(&lp)
                        .await
                        .expect("listing")
                        .items,
                ),
            ),
            (
                "pods",
                serde_json::to_string(
                    &Api::<Pod>::namespaced(client.clone(), ns)
                        .list(&lp)
                        .await
                        .expect("listing")
                        .items,
                ),
            ),
        ];
        for (place, text) in places {
            let text = text.expect("JSON");
            for password in passwords {
                assert!(
                    !text.contains(password),
                    "a password is in the {place} of {ns}"
                );
            }
        }
    }
    let log = String::from_utf8_lossy(&operator_log().lock().expect("log lock")).to_string();
    assert!(!log.is_empty(), "the operator's log was captured");
    for password in passwords {
        assert!(
            !log.contains(password),
            "a password is in the operator's log"
        );
    }
}

/// The migrator's SQL: golang-migrate's version moves to `revision`, and the commit time is
/// recorded in the same transaction.
fn migrate_to(revision: &str) -> String {
    format!(
        "BEGIN; UPDATE schema_migrations SET version = {revision}; \
         INSERT INTO committed VALUES ('{revision}', clock_timestamp()); COMMIT;"
    )
}

fn migrator_spec(sql: &str, sleep: u32) -> serde_json::Value {
    serde_json::json!({
        "image": MIGRATOR,
        "command": ["sh", "-c", format!("sleep {sleep}; psql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -X -q -c \"$0\""), sql],
    })
}

/// DatabaseMigration `app-db`, its URL in Secret `db`, tracked by golang-migrate's `table`.
fn migration(namespace: &str, revision: &str, table: &str, sql: &str) -> DatabaseMigration {
    let spec = serde_json::json!({
        "revision": revision,
        "database": {
            "engine": "postgres",
            "urlSecretRef": {"name": "db", "key": "url"},
            "tracking": {"tool": "golang-migrate", "table": table},
        },
        "migrator": migrator_spec(sql, 0),
    });
    serde_json::from_value(serde_json::json!({
        "apiVersion": "schemagate.dev/v1alpha1",
        "kind": "DatabaseMigration",
        "metadata": {"name": "app-db", "namespace": namespace},
        "spec": spec,
    }))
    .expect("a DatabaseMigration")
}

fn app(revision: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "app", "labels": {MIGRATION_LABEL: "app-db"}},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "app"}},
            "template": {
                "metadata": {"labels": {"app": "app"}, "annotations": {"schemagate.dev/revision": revision}},
                "spec": {"containers": [{"name": "app", "image": SLEEPER, "command": ["sleep", "3600"]}]},
            },
        },
    }))
    .expect("a Deployment")
}

async fn move_app_to(deployments: &Api<Deployment>, revision: &str) -> Deployment {
    let patch = serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {"schemagate.dev/revision": revision}}}}
    });
    deployments
        .patch("app", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("moving the Deployment")
}

async fn await_ready_at(dbms: &Api<DatabaseMigration>, revision: &str, within: Duration) {
    let started = Instant::now();
    loop {
        // The API server may still be coming back: a failed read is retried.
        if let Ok(dbm) = dbms.get("app-db").await {
            let applied = dbm
                .status
                .as_ref()
                .is_some_and(|s| s.applied_revisions.iter().any(|r| r == revision));
            let ready = condition(&dbm, "Ready").is_some_and(|c| c.status == "True");
            if ready && applied && dbm.spec.revision == revision {
                return;
            }
            assert!(
                started.elapsed() < within,
                "DatabaseMigration Ready at {revision} within {within:?}: {:?}",
                dbm.status
            );
        }
        assert!(started.elapsed() < within, "DatabaseMigration readable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Deployment is at `revision`, not paused, not held, and its pod of that revision is
/// Ready.
async fn await_released(deployments: &Api<Deployment>, revision: &str, within: Duration) {
    let started = Instant::now();
    loop {
        if let Ok(d) = deployments.get("app").await {
            let template = d
                .spec
                .as_ref()
                .and_then(|s| s.template.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get("schemagate.dev/revision"))
                .cloned();
            let paused = d.spec.as_ref().and_then(|s| s.paused).unwrap_or(false);
            let held = d.annotations().contains_key(HELD_FOR_ANNOTATION);
            if template.as_deref() == Some(revision)
                && !paused
                && !held
                && schemagate_testenv::harness::deployment_is_available(&d)
            {
                return;
            }
            assert!(
                started.elapsed() < within,
                "Deployment released at {revision} within {within:?}: paused {paused}, held {held}, {:?}",
                d.status
            );
        }
        assert!(started.elapsed() < within, "Deployment readable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// No ReplicaSet of `revision` existed before its migration committed.
async fn assert_released_after_commit(url: &str, client: &Client, revision: &str) {
    let mut db = sqlx::PgConnection::connect(url).await.expect("connecting");
    let committed: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM at)::float8 FROM committed WHERE revision = $1",
    )
    .bind(revision)
    .fetch_one(&mut db)
    .await
    .expect("the migration recorded its commit");
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "gated");
    let list = sets
        .list(&ListParams::default())
        .await
        .expect("ReplicaSets");
    let of_revision: Vec<&ReplicaSet> = list
        .items
        .iter()
        .filter(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .and_then(|t| t.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get("schemagate.dev/revision"))
                .is_some_and(|r| r == revision)
        })
        .collect();
    assert_eq!(
        of_revision.len(),
        1,
        "one ReplicaSet of revision {revision}"
    );
    let created = of_revision[0]
        .creation_timestamp()
        .expect("a creation time")
        .0
        .as_second() as f64;
    // Creation times have whole seconds: the ReplicaSet's second is not before the commit's.
    assert!(
        created >= committed.floor(),
        "the ReplicaSet of revision {revision} was created at {created}, after the commit at {committed}"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "gated");
    let app_pods = ListParams::default().labels("app=app");
    for pod in pods.list(&app_pods).await.expect("pods").items {
        let of_revision = pod
            .annotations()
            .get("schemagate.dev/revision")
            .is_some_and(|r| r == revision);
        if of_revision {
            let created = pod.creation_timestamp().expect("created").0.as_second() as f64;
            assert!(created >= committed.floor(), "pod {} early", pod.name_any());
        }
    }
}

async fn await_migrator_running(client: &Client, namespace: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let started = Instant::now();
    loop {
        let list = pods
            .list(&ListParams::default().labels("schemagate.dev/purpose=migration"))
            .await
            .expect("pods");
        let running = list
            .items
            .iter()
            .any(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"));
        if running {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the migrator pod runs within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client of ServiceAccount `schemagate/operator`, bound to `cluster-admin`.
async fn operator_client(admin: &Client, kubeconfig: &std::path::Path) -> Client {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    create_namespace(admin, "schemagate").await;
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "schemagate");
    let account: ServiceAccount = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "operator"}
    }))
    .expect("a ServiceAccount");
    accounts
        .create(&PostParams::default(), &account)
        .await
        .expect("creating the operator's ServiceAccount");
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "schemagate-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": "schemagate"}],
    }))
    .expect("a ClusterRoleBinding");
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding the operator's ServiceAccount");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = accounts
        .create_token_request("operator", &Default::default(), &request)
        .await
        .expect("a token")
        .status
        .expect("a token status")
        .token;
    let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig).expect("the kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("a client configuration");
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.into()),
        ..Default::default()
    };
    Client::try_from(config).expect("the operator's client")
}

async fn put_secret(client: &Client, namespace: &str, url: &str) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("db".into()),
            ..Default::default()
        },
        string_data: Some([("url".to_string(), url.to_string())].into()),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating the URL Secret");
}

async fn create_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("creating a namespace");
}

async fn install_crd(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::runtime::{conditions, wait::await_condition};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = schemagate_crds::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("installing the CRD");
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(crds, &crd.name_any(), conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .expect("watching the CRD");
}

async fn register_image(client: &Client, image: &str, dir: &std::path::Path) {
    let entry = ImageEntry {
        image: image.to_owned(),
        dir: dir.to_path_buf(),
        path_prefix: None,
        entrypoint: None,
        oci: None,
    };
    let config_map: ConfigMap = entry.to_config_map().expect("an image map entry");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), IMAGES_NAMESPACE);
    api.create(&PostParams::default(), &config_map)
        .await
        .expect("registering an image");
}
