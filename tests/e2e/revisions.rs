//! The revision model end to end: Alembic projects with random hex revision ids, Rails
//! versions merged out of order, long applied histories, drift and forward migrations
//! made by hand, and Deployments that leave the gate while held. Real control plane, real
//! PostgreSQL, real Alembic; workers are Deployments whose pods the test node marks Ready.

use crate::support::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use schemagate_crds::{DatabaseMigration, HELD_FOR_ANNOTATION, HELD_LABEL, RETRY_ANNOTATION};
use schemagate_testenv::harness::{TestNamespace, deployment_available, namespace, wait_for};
use sqlx::Connection as _;
use std::path::PathBuf;
use std::time::Duration;

/// An Alembic project with random 12-hex-digit revision ids in a chain, registered in the
/// image map as an image of its own.
struct HexProject {
    dir: PathBuf,
    image: String,
    ids: Vec<String>,
}

impl HexProject {
    async fn create(ns: &TestNamespace, count: usize) -> Self {
        let tag: String = (0..8).map(|_| fastrand::lowercase()).collect();
        let dir = std::env::temp_dir().join(format!("schemagate-hex-{}-{tag}", std::process::id()));
        let versions = dir.join("migrations/versions");
        std::fs::create_dir_all(&versions).unwrap();
        let example = app_dir();
        std::fs::copy(example.join("alembic.ini"), dir.join("alembic.ini")).unwrap();
        for file in ["env.py", "script.py.mako"] {
            std::fs::copy(
                example.join("migrations").join(file),
                dir.join("migrations").join(file),
            )
            .unwrap();
        }
        let mut ids: Vec<String> = Vec::new();
        while ids.len() < count {
            let id: String = (0..12)
                .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap())
                .collect();
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        for (index, id) in ids.iter().enumerate() {
            let down = match index {
                0 => "None".to_string(),
                _ => format!("{:?}", ids[index - 1]),
            };
            let script = format!(
                "from alembic import op\nimport sqlalchemy as sa\n\nrevision = {id:?}\ndown_revision = {down}\nbranch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n    op.create_table(\"t_{id}\", sa.Column(\"id\", sa.Integer, primary_key=True))\n\n\ndef downgrade():\n    op.drop_table(\"t_{id}\")\n"
            );
            std::fs::write(versions.join(format!("{id}.py")), script).unwrap();
        }
        let image = format!("registry.example/hex-app:{tag}");
        ns.cluster().register_image(&image, &dir, None, None).await;
        HexProject { dir, image, ids }
    }

    /// `alembic ARGS` in the project, as a person would run it by hand.
    async fn alembic(&self, url: &str, args: &[&str]) {
        let output = tokio::process::Command::new("alembic")
            .args(args)
            .current_dir(&self.dir)
            .env("DATABASE_URL", url)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .output()
            .await
            .expect("running alembic");
        assert!(
            output.status.success(),
            "alembic {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for HexProject {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A DatabaseMigration named `app-db` on the namespace's database.
fn migration(tracking: &str, image: &str, command: &str, revision: &str, extra: &str) -> String {
    app_db_yaml(tracking, image, command, revision, extra)
}

/// A worker Deployment that needs `revision` of DatabaseMigration `app-db`. Its image is
/// not in the image map: the test node marks its pod Ready without running anything.
fn worker(name: &str, revision: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  labels: {{ app.kubernetes.io/name: {name}, schemagate.dev/migration: app-db }}
spec:
  replicas: 1
  selector: {{ matchLabels: {{ app.kubernetes.io/name: {name} }} }}
  template:
    metadata:
      labels: {{ app.kubernetes.io/name: {name} }}
      annotations: {{ schemagate.dev/revision: "{revision}" }}
    spec:
      containers: [{{ name: worker, image: "registry.example/worker:1" }}]
"#
    )
}

fn held_for(deployment: &Deployment) -> Option<&str> {
    deployment
        .annotations()
        .get(HELD_FOR_ANNOTATION)
        .map(String::as_str)
}

fn paused(deployment: &Deployment) -> bool {
    deployment.spec.as_ref().and_then(|s| s.paused) == Some(true)
}

async fn await_held(ns: &TestNamespace, name: &str, revision: &str) -> Deployment {
    let held = wait_for(
        &ns.api::<Deployment>(),
        name,
        TIMEOUT,
        &format!("held for {revision}"),
        |d| held_for(d) == Some(revision) && paused(d),
    )
    .await;
    assert_eq!(
        held.labels().get(HELD_LABEL).map(String::as_str),
        Some("true")
    );
    held
}

/// Released by schemagate (marker, label and pause gone) and rolled out.
async fn await_released(ns: &TestNamespace, name: &str) {
    wait_for(&ns.api::<Deployment>(), name, TIMEOUT, "released", |d| {
        held_for(d).is_none() && !paused(d) && !d.labels().contains_key(HELD_LABEL)
    })
    .await;
    deployment_available(&ns.api(), name, TIMEOUT).await;
}

async fn migration_jobs(ns: &TestNamespace) -> Vec<Job> {
    ns.api::<Job>()
        .list(&ListParams::default().labels("schemagate.dev/purpose=migration"))
        .await
        .unwrap()
        .items
}

async fn await_graph(ns: &TestNamespace) -> DatabaseMigration {
    wait_for(
        &ns.api::<DatabaseMigration>(),
        "app-db",
        TIMEOUT,
        "the image's revision graph in the status",
        |m| {
            m.status
                .as_ref()
                .and_then(|s| s.revision_graph.as_ref())
                .is_some_and(|g| !g.revisions.is_empty())
        },
    )
    .await
}

async fn setup(name: &str) -> (TestNamespace, String, Operator) {
    let ns = namespace(name).await;
    prepare(ns.cluster()).await;
    let url = create_postgres_database(ns.cluster(), "pw-revisions-7").await;
    url_secret(&ns, "app-db-url", "url", &url).await;
    let operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    (ns, url, operator)
}

async fn sql(url: &str, statements: &[&str]) {
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connecting");
    for statement in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement.to_string()))
            .execute(&mut connection)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

#[tokio::test]
async fn ancestors_of_an_adopted_alembic_head_are_released() {
    let (ns, url, _operator) = setup("hex-adopted").await;
    let project = HexProject::create(&ns, 3).await;
    let [a, b, c] = [&project.ids[0], &project.ids[1], &project.ids[2]];
    // Migrated by hand to b; the resource adopts b without a Job.
    project.alembic(&url, &["upgrade", b]).await;
    let command = r#"["alembic", "upgrade", "head"]"#;
    let spec = migration("{ tool: alembic }", &project.image, command, b, "");
    apply_migration(&ns, &spec).await;
    let ready = await_ready(&ns).await;
    assert_eq!(
        ready.status.unwrap().history[0].result,
        schemagate_crds::AttemptResult::Adopted
    );
    assert!(migration_jobs(&ns).await.is_empty(), "adopted: no Job");
    await_graph(&ns).await;

    // Older code (needs a, an ancestor) and current code (needs b) roll out.
    apply_yaml(&ns, &worker("old-worker", a)).await;
    apply_yaml(&ns, &worker("web", b)).await;
    await_released(&ns, "old-worker").await;
    await_released(&ns, "web").await;
    // Newer code (needs c, in the graph but not applied) is held.
    apply_yaml(&ns, &worker("next", c)).await;
    await_held(&ns, "next", c).await;
    // A revision the image does not ship is held, and the Event says why.
    apply_yaml(&ns, &worker("typo", "ffffffffffff")).await;
    await_held(&ns, "typo", "ffffffffffff").await;
    let event = await_event(&ns, "typo", "Normal", "RolloutHeld").await;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains("not in the revision graph"),
        "the hold says why: {note}"
    );
    assert!(note.len() <= 1024);
    assert!(migration_jobs(&ns).await.is_empty(), "holds start no Job");
}

#[tokio::test]
async fn one_job_applying_two_revisions_releases_each_deployment() {
    let (ns, url, _operator) = setup("hex-two-step").await;
    let project = HexProject::create(&ns, 2).await;
    let [a, b] = [&project.ids[0], &project.ids[1]];
    // Deployments first: both held, nothing to wait for yet.
    apply_yaml(&ns, &worker("needs-a", a)).await;
    apply_yaml(&ns, &worker("needs-b", b)).await;
    await_held(&ns, "needs-a", a).await;
    await_held(&ns, "needs-b", b).await;

    // One Job applies a then b: the database stores only b.
    let command = r#"["alembic", "upgrade", "head"]"#;
    apply_migration(
        &ns,
        &migration("{ tool: alembic }", &project.image, command, b, ""),
    )
    .await;
    await_released(&ns, "needs-b").await;
    await_released(&ns, "needs-a").await;
    assert_eq!(alembic_version(&url).await.as_deref(), Some(b.as_str()));
    assert_eq!(migration_jobs(&ns).await.len(), 1);
    let event = await_event(&ns, "needs-a", "Normal", "RolloutReleased").await;
    assert!(event.note.unwrap_or_default().contains(a.as_str()));
}

/// Rails: versions merged late from a long-lived branch are missing below newer ones.
#[tokio::test]
async fn a_rails_version_merged_late_is_held_until_applied() {
    let (ns, url, _operator) = setup("rails-out-of-order").await;
    sql(
        &url,
        &[
            "CREATE TABLE schema_migrations (version varchar NOT NULL PRIMARY KEY)",
            "INSERT INTO schema_migrations VALUES ('20250110120000'), ('20250301090000')",
        ],
    )
    .await;
    // The migrator inserts the late version, as `rails db:migrate` would.
    let image = format!(
        "registry.example/rails-app:{}",
        (0..8).map(|_| fastrand::lowercase()).collect::<String>()
    );
    ns.cluster()
        .register_image(&image, &std::env::temp_dir(), None, None)
        .await;
    let command = r#"["sh", "-c", "psql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -c \"INSERT INTO schema_migrations VALUES ('20250214083000')\""]"#;
    let suspended = migration(
        "{ tool: rails }",
        &image,
        command,
        "20250214083000",
        "  suspend: true\n",
    );
    apply_migration(&ns, &suspended).await;
    await_app_db_condition(&ns, "Ready", "False", "Suspended").await;
    // Code needing the late version is held although a newer version is applied.
    apply_yaml(&ns, &worker("billing", "20250214083000")).await;
    await_held(&ns, "billing", "20250214083000").await;
    // Code needing an applied version rolls out.
    apply_yaml(&ns, &worker("reports", "20250110120000")).await;
    await_released(&ns, "reports").await;

    let running = migration("{ tool: rails }", &image, command, "20250214083000", "");
    apply_migration(&ns, &running).await;
    await_ready(&ns).await;
    await_released(&ns, "billing").await;
}

/// The migrator commits the revision and goes on running (a long data backfill after the
/// schema change, say): the Deployment that needs the revision is released from the
/// database's word while the Job is still active, not when Kubernetes marks it Complete.
/// golang-migrate's dirty flag is honoured on the way: a version marked dirty is not
/// applied yet, and the migrator keeps it dirty until the test says go.
#[tokio::test]
async fn a_committed_revision_releases_while_the_migrator_still_runs() {
    let (ns, url, _operator) = setup("released-while-running").await;
    sql(
        &url,
        &[
            "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL)",
            "INSERT INTO schema_migrations VALUES (1, false)",
            "CREATE TABLE go_ahead (at timestamptz NOT NULL)",
        ],
    )
    .await;
    let image = format!(
        "registry.example/backfill:{}",
        (0..8).map(|_| fastrand::lowercase()).collect::<String>()
    );
    ns.cluster()
        .register_image(&image, &std::env::temp_dir(), None, None)
        .await;
    let adopted = migration("{ tool: golang-migrate }", &image, r#"["false"]"#, "1", "");
    apply_migration(&ns, &adopted).await;
    await_ready(&ns).await;
    apply_yaml(&ns, &worker("api", "2")).await;
    await_held(&ns, "api", "2").await;

    // golang-migrate marks the version dirty while it runs a migration: not applied yet.
    // The migrator keeps it dirty until the test lets it go on, then cleans it and goes on
    // for two minutes.
    let command = r#"["sh", "-c", "psql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -c \"UPDATE schema_migrations SET version = 2, dirty = true\" && until psql \"$DATABASE_URL\" -tAc \"SELECT count(*) FROM go_ahead\" | grep -qx 1; do sleep 0.1; done && psql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -c \"UPDATE schema_migrations SET dirty = false\" && exec sleep 120"]"#;
    apply_migration(
        &ns,
        &migration("{ tool: golang-migrate }", &image, command, "2", ""),
    )
    .await;
    let mut db = sqlx::PgConnection::connect(&url).await.expect("connecting");
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let dirty: bool = sqlx::query_scalar("SELECT dirty FROM schema_migrations")
            .fetch_one(&mut db)
            .await
            .expect("reading schema_migrations");
        if dirty {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the migrator never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Version 2 stays dirty until the go-ahead: whatever the watch read meanwhile, the
    // Deployment is still held now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = ns
        .api::<Deployment>()
        .get("api")
        .await
        .expect("the Deployment");
    assert!(
        held_for(&held) == Some("2") && paused(&held),
        "released on a version marked dirty"
    );
    // Every version of the Deployment from here on, as a watch sees it: once released, it
    // is never held again (the release comes before the status says so, and the gate must
    // not take it back when the status arrives).
    let versions = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(bool, String)>::new()));
    let watching = {
        use futures::StreamExt as _;
        use kube::runtime::watcher;
        let config = watcher::Config::default().fields("metadata.name=api");
        let mut stream = watcher::watcher(ns.api::<Deployment>(), config).boxed();
        let versions = versions.clone();
        tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                if let Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) = event {
                    let held = held_for(&d).is_some() || paused(&d);
                    let version = d.resource_version().unwrap_or_default();
                    versions
                        .lock()
                        .expect("versions lock")
                        .push((held, version));
                }
            }
        })
    };
    sqlx::query("INSERT INTO go_ahead VALUES (now())")
        .execute(&mut db)
        .await
        .expect("the go-ahead");
    let released = wait_for(&ns.api::<Deployment>(), "api", TIMEOUT, "released", |d| {
        held_for(d).is_none() && !paused(d)
    })
    .await;
    assert!(!released.labels().contains_key(HELD_LABEL));
    // Released on the database's word: the migrator still runs.
    let jobs = migration_jobs(&ns).await;
    assert_eq!(
        jobs.len(),
        1,
        "revision 1 was adopted: one Job, revision 2's"
    );
    let status = jobs[0].status.clone().unwrap_or_default();
    assert_eq!(status.active, Some(1), "the migrator pod is still running");
    assert!(
        !status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.status == "True" && (c.type_ == "Complete" || c.type_ == "Failed")),
        "the Job has not finished"
    );
    // By the watch of the running Job's database, not a periodic look at the Job.
    let log = String::from_utf8_lossy(&operator_log().lock().expect("log lock")).to_string();
    assert!(
        log.lines().any(|line| line
            .contains("the database reports the revision while its migration Job runs")
            && line.contains(ns.name())),
        "released by the watch of the Job's database"
    );
    let ready = await_ready(&ns).await;
    assert_eq!(
        ready.status.and_then(|s| s.applied_revision).as_deref(),
        Some("2")
    );
    deployment_available(&ns.api(), "api", TIMEOUT).await;
    // The Deployment's versions up to the one rolled out: held, then released for good.
    let rolled_out = ns
        .api::<Deployment>()
        .get("api")
        .await
        .expect("the Deployment")
        .resource_version()
        .unwrap_or_default();
    let deadline = std::time::Instant::now() + TIMEOUT;
    let seen = loop {
        let seen = versions.lock().expect("versions lock").clone();
        if seen.iter().any(|(_, version)| *version == rolled_out) {
            break seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the test's watch never saw version {rolled_out}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    watching.abort();
    let first_released = seen.iter().position(|(held, _)| !held);
    assert!(
        first_released.is_some_and(|at| seen[at..].iter().all(|(held, _)| !held)),
        "held again after the release (held, resourceVersion): {seen:?}"
    );
    // Its pod is not left running for two minutes.
    for job in migration_jobs(&ns).await {
        let _ = ns
            .api::<Job>()
            .delete(&job.name_any(), &kube::api::DeleteParams::background())
            .await;
    }
}

/// 5,000 applied versions: the status keeps the newest 256, and a Deployment needing an
/// older one is held by the webhook, then released from a fresh read of the database.
#[tokio::test]
async fn five_thousand_applied_versions_release_from_a_fresh_read() {
    let (ns, url, _operator) = setup("long-history").await;
    sql(
        &url,
        &[
            "CREATE TABLE schema_migrations (version varchar NOT NULL PRIMARY KEY)",
            "INSERT INTO schema_migrations SELECT (20200101000000 + g)::text FROM generate_series(1, 5000) g",
        ],
    )
    .await;
    let command = r#"["false"]"#;
    let spec = migration("{ tool: rails }", APP_V2, command, "20200101005000", "");
    apply_migration(&ns, &spec).await;
    let ready = await_ready(&ns).await;
    let status = ready.status.unwrap();
    assert_eq!(status.applied_revisions.len(), 256);
    assert!(status.applied_revisions_truncated);
    assert!(migration_jobs(&ns).await.is_empty());

    apply_yaml(&ns, &worker("oldest", "20200101000001")).await;
    await_released(&ns, "oldest").await;
    apply_yaml(&ns, &worker("missing", "20190101000000")).await;
    await_held(&ns, "missing", "20190101000000").await;
    let event = await_event(&ns, "missing", "Normal", "RolloutHeld").await;
    assert!(event.note.unwrap_or_default().contains("20190101000000"));
}

/// A manual downgrade after spec edits that keep the revision (a new migrator image each
/// release): Drifted, the next rollout held, and no migration Job for a minute; the retry
/// annotation runs it.
#[tokio::test]
async fn manual_downgrade_is_drift_that_waits_for_a_person() {
    let (ns, url, _operator) = setup("drift-waits").await;
    let command = r#"["alembic", "upgrade", "head"]"#;
    let spec = migration(
        "{ tool: alembic }",
        APP_V2,
        command,
        "0002",
        "  driftCheckInterval: 1s\n",
    );
    apply_migration(&ns, &spec).await;
    await_ready(&ns).await;
    await_graph(&ns).await;
    // Releases bump the migrator image; the revision stays.
    let bumped = spec.replace(APP_V2, APP_V1);
    let edited = apply_migration(&ns, &bumped).await;
    wait_for(
        &ns.api::<DatabaseMigration>(),
        "app-db",
        TIMEOUT,
        "Ready at the new generation",
        |m| {
            has_condition(m, "Ready", "True", "RevisionApplied")
                && m.status.as_ref().and_then(|s| s.observed_generation)
                    == edited.metadata.generation
        },
    )
    .await;
    let jobs_before = migration_jobs(&ns).await.len();
    assert_eq!(jobs_before, 1);

    alembic(&url, &["downgrade", "0001"]).await;
    await_app_db_condition(&ns, "Drifted", "True", "RevisionMissing").await;
    apply_yaml(&ns, &worker("next-release", "0002")).await;
    await_held(&ns, "next-release", "0002").await;

    // A minute of drift checks every second: still Drifted, and no Job.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        assert_eq!(
            migration_jobs(&ns).await.len(),
            jobs_before,
            "drift re-migrated"
        );
        let current: DatabaseMigration = ns.api().get("app-db").await.unwrap();
        assert!(
            has_condition(&current, "Drifted", "True", "RevisionMissing"),
            "{:?}",
            current.status
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0001"));

    // A person asks for the migration: it runs, and the held rollout goes on.
    let retry =
        serde_json::json!({"metadata": {"annotations": {RETRY_ANNOTATION: "after-downgrade"}}});
    ns.api::<DatabaseMigration>()
        .patch("app-db", &PatchParams::default(), &Patch::Merge(&retry))
        .await
        .unwrap();
    await_released(&ns, "next-release").await;
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0002"));
    assert_eq!(migration_jobs(&ns).await.len(), jobs_before + 1);
}

/// A hotfix migration applied by hand moves the database forward: adopted, not drift, and
/// the code that serves is not paused.
#[tokio::test]
async fn manual_forward_migration_is_adopted_and_serving_code_is_not_paused() {
    let (ns, url, _operator) = setup("forward").await;
    let project = HexProject::create(&ns, 3).await;
    let [a, b, c] = [&project.ids[0], &project.ids[1], &project.ids[2]];
    let command = format!(r#"["alembic", "upgrade", "{b}"]"#);
    let spec = migration(
        "{ tool: alembic }",
        &project.image,
        &command,
        b,
        "  driftCheckInterval: 1s\n",
    );
    apply_migration(&ns, &spec).await;
    await_ready(&ns).await;
    await_graph(&ns).await;
    apply_yaml(&ns, &worker("web", b)).await;
    apply_yaml(&ns, &worker("old-worker", a)).await;
    await_released(&ns, "web").await;
    await_released(&ns, "old-worker").await;

    project.alembic(&url, &["upgrade", c]).await;
    let adopted = wait_for(
        &ns.api::<DatabaseMigration>(),
        "app-db",
        TIMEOUT,
        "the forward head read",
        |m| {
            m.status
                .as_ref()
                .and_then(|s| s.applied_revision.as_deref())
                == Some(c.as_str())
        },
    )
    .await;
    assert!(has_condition(&adopted, "Ready", "True", "RevisionApplied"));
    assert!(!has_condition(
        &adopted,
        "Drifted",
        "True",
        "RevisionMissing"
    ));
    // The gate, asked again through the webhook, holds neither.
    for name in ["web", "old-worker"] {
        let poke =
            serde_json::json!({"metadata": {"annotations": {"e2e.schemagate.dev/poke": "1"}}});
        let params = PatchParams {
            dry_run: true,
            ..Default::default()
        };
        let admitted = ns
            .api::<Deployment>()
            .patch(name, &params, &Patch::Merge(&poke))
            .await
            .unwrap();
        assert!(
            held_for(&admitted).is_none(),
            "{name} held after a forward migration"
        );
        assert!(
            !paused(&admitted),
            "{name} paused after a forward migration"
        );
        let stored: Deployment = ns.api().get(name).await.unwrap();
        assert!(!paused(&stored), "{name} paused after a forward migration");
    }
    let events = events_for(&ns, "app-db").await;
    assert!(
        !events
            .iter()
            .any(|e| e.reason.as_deref() == Some("Drifted")),
        "a forward migration is no drift: {events:?}"
    );
    assert!(migration_jobs(&ns).await.len() == 1);
}

/// A held Deployment that leaves the gate is released by schemagate, with an Event.
#[tokio::test]
async fn leaving_the_gate_while_held_releases_the_hold() {
    let (ns, _url, _operator) = setup("leave-gate").await;
    // No DatabaseMigration: both are held (the Deployment-first apply order).
    apply_yaml(&ns, &worker("unlabelled", "0002")).await;
    apply_yaml(&ns, &worker("unannotated", "0002")).await;
    await_held(&ns, "unlabelled", "0002").await;
    await_held(&ns, "unannotated", "0002").await;

    let api: Api<Deployment> = ns.api();
    let drop_label =
        serde_json::json!({"metadata": {"labels": {"schemagate.dev/migration": null}}});
    api.patch(
        "unlabelled",
        &PatchParams::default(),
        &Patch::Merge(&drop_label),
    )
    .await
    .unwrap();
    await_released(&ns, "unlabelled").await;
    let event = await_event(&ns, "unlabelled", "Normal", "RolloutReleased").await;
    assert!(
        event
            .note
            .unwrap_or_default()
            .contains("no longer carries label schemagate.dev/migration"),
        "the Event says why"
    );

    let drop_annotation = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {"schemagate.dev/revision": null}}}}});
    api.patch(
        "unannotated",
        &PatchParams::default(),
        &Patch::Merge(&drop_annotation),
    )
    .await
    .unwrap();
    await_released(&ns, "unannotated").await;
    let event = await_event(&ns, "unannotated", "Normal", "RolloutReleased").await;
    assert!(
        event
            .note
            .unwrap_or_default()
            .contains("no longer carries annotation schemagate.dev/revision")
    );
}

/// `kubectl rollout resume` on a held Deployment: kubectl prints the webhook's warning
/// naming the revision awaited, and the Deployment stays held.
#[tokio::test]
async fn kubectl_rollout_resume_on_a_held_deployment_says_why_it_stays_paused() {
    let (ns, _url, _operator) = setup("resume-held").await;
    apply_yaml(&ns, &worker("web", "0002")).await;
    await_held(&ns, "web", "0002").await;
    let output = ns
        .cluster()
        .kubectl(["-n", ns.name(), "rollout", "resume", "deployment/web"])
        .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("Warning: schemagate kept this rollout paused")
            && stderr.contains("revision 0002 of DatabaseMigration app-db"),
        "kubectl shows why: {stderr}"
    );
    let still: Deployment = ns.api().get("web").await.unwrap();
    assert!(paused(&still) && held_for(&still) == Some("0002"));
}

/// A Rails database at version 1, adopted by `app-db` (re-read every second).
async fn rails_at_version_one(ns: &TestNamespace, url: &str) {
    sql(
        url,
        &[
            "CREATE TABLE schema_migrations (version varchar NOT NULL PRIMARY KEY)",
            "INSERT INTO schema_migrations VALUES ('1')",
        ],
    )
    .await;
    let spec = migration(
        "{ tool: rails }",
        APP_V2,
        r#"["false"]"#,
        "1",
        "  driftCheckInterval: 1s\n",
    );
    apply_migration(ns, &spec).await;
    await_ready(ns).await;
}

/// The on-call engineer's rollback of a held Deployment: kubectl refuses a paused one,
/// `schemagate undo` writes the serving template back and the gate releases it.
#[tokio::test]
async fn schemagate_undo_rolls_a_held_deployment_back_to_the_serving_version() {
    let (ns, url, _operator) = setup("undo-held").await;
    rails_at_version_one(&ns, &url).await;
    apply_yaml(&ns, &worker("web", "1")).await;
    await_released(&ns, "web").await;
    apply_yaml(&ns, &worker("web", "2")).await;
    await_held(&ns, "web", "2").await;

    let kubectl = ns
        .cluster()
        .kubectl(["-n", ns.name(), "rollout", "undo", "deployment/web"])
        .await;
    assert!(
        !kubectl.status.success(),
        "kubectl refuses a paused Deployment: {}",
        String::from_utf8_lossy(&kubectl.stderr)
    );
    let undo = tokio::process::Command::new(schemagate_bin())
        .args(["undo", "web", "-n", ns.name()])
        .env("KUBECONFIG", ns.cluster().kubeconfig_path())
        .output()
        .await
        .unwrap();
    assert!(
        undo.status.success(),
        "{}",
        String::from_utf8_lossy(&undo.stderr)
    );
    assert!(String::from_utf8_lossy(&undo.stdout).contains("rolled back"));
    await_released(&ns, "web").await;
    let web: Deployment = ns.api().get("web").await.unwrap();
    let template = web.spec.unwrap().template.metadata.unwrap();
    assert_eq!(
        template
            .annotations
            .unwrap()
            .get("schemagate.dev/revision")
            .map(String::as_str),
        Some("1")
    );
}

/// `schemagate.dev/keep-paused=true` on a held Deployment: the release removes the hold but
/// leaves it paused for a person to resume.
#[tokio::test]
async fn a_held_deployment_can_be_kept_paused_after_its_release() {
    let (ns, url, _operator) = setup("keep-paused").await;
    rails_at_version_one(&ns, &url).await;
    apply_yaml(&ns, &worker("web", "2")).await;
    await_held(&ns, "web", "2").await;
    let keep =
        serde_json::json!({"metadata": {"annotations": {"schemagate.dev/keep-paused": "true"}}});
    ns.api::<Deployment>()
        .patch("web", &PatchParams::default(), &Patch::Merge(&keep))
        .await
        .unwrap();
    sql(&url, &["INSERT INTO schema_migrations VALUES ('2')"]).await;
    let released = wait_for(
        &ns.api::<Deployment>(),
        "web",
        TIMEOUT,
        "hold released, still paused",
        |d| held_for(d).is_none() && !d.labels().contains_key(HELD_LABEL),
    )
    .await;
    assert!(paused(&released), "kept paused as asked");
    let event = await_event(&ns, "web", "Normal", "RolloutReleased").await;
    assert!(event.note.unwrap_or_default().contains("keep-paused"));
    // From now on it is the person's pause: schemagate leaves it alone.
    let resume = ns
        .cluster()
        .kubectl(["-n", ns.name(), "rollout", "resume", "deployment/web"])
        .await;
    assert!(resume.status.success());
    await_released(&ns, "web").await;
}
