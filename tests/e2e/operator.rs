//! The operator end to end: real control plane, real PostgreSQL, real Alembic.

use crate::support::*;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams};
use schemagate_crds::{DatabaseMigration, Phase};
use schemagate_testenv::harness::{namespace, wait_for};
use std::time::Duration;

const MIGRATION_TIMEOUT: Duration = Duration::from_secs(90);

fn migration_yaml(image: &str, command: &str, revision: &str) -> String {
    app_db_yaml("{ tool: alembic }", image, command, revision, "")
}

/// A fresh namespace with a database of its own (its URL in Secret `app-db-url`) and an
/// operator watching the namespace.
async fn with_database_and_operator(
    name: &str,
    password: &str,
    webhook: bool,
) -> (schemagate_testenv::harness::TestNamespace, String, Operator) {
    let ns = namespace(name).await;
    prepare(ns.cluster()).await;
    let url = create_postgres_database(ns.cluster(), password).await;
    url_secret(&ns, "app-db-url", "url", &url).await;
    let operator = Operator::start(
        &ns,
        OperatorOptions {
            webhook,
            ..Default::default()
        },
    )
    .await;
    (ns, url, operator)
}

/// The migration Jobs (not the revision-graph Jobs, which only read the image).
async fn jobs(api: &Api<Job>) -> Vec<Job> {
    api.list(&ListParams::default().labels("schemagate.dev/purpose=migration"))
        .await
        .expect("listing jobs")
        .items
}

/// Every Job schemagate made: migrations and revision graphs.
async fn all_jobs(api: &Api<Job>) -> Vec<Job> {
    api.list(&ListParams::default())
        .await
        .expect("listing jobs")
        .items
}

#[tokio::test]
async fn alembic_migration_ends_ready_with_the_revision_from_the_database() {
    let (ns, url, _operator) =
        with_database_and_operator("alembic-ready", "pw-ready-4711", false).await;

    apply_migration(
        &ns,
        &migration_yaml(APP_V2, r#"["alembic", "upgrade", "head"]"#, "0002"),
    )
    .await;
    let migrations: Api<DatabaseMigration> = ns.api();
    let ready = wait_for(
        &migrations,
        "app-db",
        MIGRATION_TIMEOUT,
        "Ready and the attempt recorded",
        |m| {
            has_condition(m, "Ready", "True", "RevisionApplied")
                && m.status.as_ref().is_some_and(|s| !s.history.is_empty())
        },
    )
    .await;

    let status = ready.status.clone().unwrap();
    assert_eq!(status.applied_revision.as_deref(), Some("0002"));
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0002"));
    assert_eq!(status.phase, Some(Phase::Succeeded));
    let columns = columns(&url, "documents").await;
    assert!(
        columns.contains(&"uploaded_by_user_id".to_string()),
        "{columns:?}"
    );
    assert!(columns.contains(&"upload_notes".to_string()), "{columns:?}");
    let all_jobs = jobs(&ns.api()).await;
    assert_eq!(all_jobs.len(), 1, "exactly one migration Job");
    assert_eq!(
        status.history[0].result,
        schemagate_crds::AttemptResult::Succeeded
    );
    assert_eq!(
        status.history[0].job.as_deref(),
        all_jobs[0].metadata.name.as_deref()
    );
    assert_eq!(
        condition(&ready, "Ready").unwrap().observed_generation,
        ready.metadata.generation
    );
    await_event(&ns, "app-db", "Normal", "JobCreated").await;
    await_event(&ns, "app-db", "Normal", "MigrationSucceeded").await;

    // The image's revision graph, read by a Job of its own without the database URL.
    let with_graph = wait_for(
        &migrations,
        "app-db",
        MIGRATION_TIMEOUT,
        "revision graph",
        |m| {
            m.status
                .as_ref()
                .and_then(|s| s.revision_graph.as_ref())
                .is_some_and(|g| !g.revisions.is_empty())
        },
    )
    .await;
    let graph = with_graph.status.unwrap().revision_graph.unwrap();
    assert_eq!(graph.error, None);
    assert_eq!(graph.image, APP_V2);
    let nodes: Vec<(String, Vec<String>)> = graph
        .revisions
        .iter()
        .map(|n| (n.revision.clone(), n.parents.clone()))
        .collect();
    assert_eq!(
        nodes,
        vec![
            ("0002".to_string(), vec!["0001".to_string()]),
            ("0001".to_string(), vec![])
        ]
    );
    let graph_job: Job = ns.api().get(&graph.job).await.unwrap();
    let spec = serde_json::to_string(&graph_job.spec).unwrap();
    assert!(!spec.contains("secretKeyRef"), "no database URL: {spec}");
}

#[tokio::test]
async fn already_migrated_database_is_ready_without_a_job() {
    let (ns, url, _operator) =
        with_database_and_operator("already-migrated", "pw-adopt-4711", false).await;
    alembic(&url, &["upgrade", "head"]).await;

    apply_migration(
        &ns,
        &migration_yaml(APP_V2, r#"["alembic", "upgrade", "head"]"#, "0002"),
    )
    .await;
    let ready = await_ready(&ns).await;
    assert_eq!(
        ready.status.as_ref().unwrap().history[0].result,
        schemagate_crds::AttemptResult::Adopted
    );
    assert!(
        jobs(&ns.api()).await.is_empty(),
        "no Job for an already migrated database"
    );
}

#[tokio::test]
async fn failing_migration_fails_readably_and_waits_for_a_retry() {
    let (ns, _url, _operator) =
        with_database_and_operator("failing-migration", "pw-broken-4711", false).await;

    apply_migration(
        &ns,
        &migration_yaml(BROKEN_V2, r#"["alembic", "upgrade", "head"]"#, "0002"),
    )
    .await;
    let migrations: Api<DatabaseMigration> = ns.api();
    let failed = wait_for(&migrations, "app-db", MIGRATION_TIMEOUT, "Failed", |m| {
        has_condition(m, "Failed", "True", "MigrationFailed")
    })
    .await;
    let message = &condition(&failed, "Failed").unwrap().message;
    assert!(message.contains("failed"), "{message}");
    assert!(
        message.contains(r#"type "integr" does not exist"#),
        "the database's error reaches the status: {message}"
    );
    assert!(
        message.contains("schemagate.dev/retry"),
        "the message says what to do: {message}"
    );
    assert!(
        !message.contains("pw-broken-4711"),
        "password leaked: {message}"
    );
    assert_eq!(failed.status.as_ref().unwrap().phase, Some(Phase::Failed));
    await_event(&ns, "app-db", "Warning", "MigrationFailed").await;

    // Another reconcile (any change to the object) starts no second Job.
    migrations
        .patch(
            "app-db",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .unwrap();
    wait_for(
        &migrations,
        "app-db",
        MIGRATION_TIMEOUT,
        "reconciled after the touch",
        |m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.phase == Some(Phase::Failed))
                && m.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key("touched"))
        },
    )
    .await;
    assert_eq!(
        jobs(&ns.api()).await.len(),
        1,
        "no second Job until a retry"
    );

    // The retry annotation starts a new attempt.
    migrations
        .patch(
            "app-db",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"annotations": {"schemagate.dev/retry": "1"}}}),
            ),
        )
        .await
        .unwrap();
    let job_api: Api<Job> = ns.api();
    let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
    loop {
        if jobs(&job_api).await.len() == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retry started no new Job"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn migrator_that_exits_zero_without_migrating_fails_naming_both_revisions() {
    let (ns, _url, _operator) =
        with_database_and_operator("exit-zero", "pw-exit-4711", false).await;

    // The migrator stops at 0001 and exits 0: its exit code alone would say "done".
    apply_migration(
        &ns,
        &migration_yaml(APP_V2, r#"["alembic", "upgrade", "0001"]"#, "0002"),
    )
    .await;
    let failed = wait_for(
        &ns.api::<DatabaseMigration>(),
        "app-db",
        MIGRATION_TIMEOUT,
        "RevisionNotApplied",
        |m| has_condition(m, "Failed", "True", "RevisionNotApplied"),
    )
    .await;
    let message = &condition(&failed, "Failed").unwrap().message;
    assert!(message.contains("revision 0001"), "{message}");
    assert!(message.contains("revision 0002"), "{message}");
    assert_eq!(
        failed.status.unwrap().applied_revision.as_deref(),
        Some("0001")
    );
}

#[tokio::test]
async fn operator_restarted_while_the_job_runs_keeps_exactly_one_job() {
    let (ns, url, operator) = with_database_and_operator("restart", "pw-restart-4711", false).await;

    apply_migration(
        &ns,
        &migration_yaml(
            APP_V2,
            r#"["sh", "-c", "sleep 4 && alembic upgrade head"]"#,
            "0002",
        ),
    )
    .await;
    let migrations: Api<DatabaseMigration> = ns.api();
    wait_for(&migrations, "app-db", MIGRATION_TIMEOUT, "Running", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.phase == Some(Phase::Running))
    })
    .await;
    operator.stop().await;
    let _second = Operator::start(&ns, OperatorOptions::backstop_only()).await;
    wait_for(&migrations, "app-db", MIGRATION_TIMEOUT, "Ready", |m| {
        has_condition(m, "Ready", "True", "RevisionApplied")
    })
    .await;
    assert_eq!(
        jobs(&ns.api()).await.len(),
        1,
        "a restart must not start a second Job"
    );
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0002"));
}

/// Each bad input ends in a condition and a Warning Event that say what is wrong, the
/// operator keeps running, and fixing the input makes it Ready.
#[tokio::test]
async fn bad_input_gets_a_clear_condition_and_event() {
    let password = "pw-Secret-Leak-8841";
    let (ns, url, operator) = with_database_and_operator("bad-input", password, false).await;
    alembic(&url, &["upgrade", "head"]).await;
    let migrations: Api<DatabaseMigration> = ns.api();
    apply_migration(
        &ns,
        &migration_yaml(APP_V2, r#"["alembic", "upgrade", "head"]"#, "0002"),
    )
    .await;

    let wrong_password = url.replace(password, "not-the-password");
    let unreachable = format!("postgres://nobody:{password}@127.0.0.1:1/app");
    // (case, Secret key and value if any, expected reason, text the message must name)
    type Case<'a> = (&'a str, Option<(&'a str, String)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        ("missing Secret", None, "SecretNotFound", "app-db-url"),
        (
            "missing key",
            Some(("other", url.clone())),
            "SecretKeyMissing",
            "url",
        ),
        (
            "malformed URL",
            Some(("url", format!("not a url {password}"))),
            "DatabaseUrlInvalid",
            "URL",
        ),
        (
            "unreachable host",
            Some(("url", unreachable)),
            "DatabaseUnreachable",
            "127.0.0.1:1",
        ),
        (
            "wrong password",
            Some(("url", wrong_password)),
            "DatabaseAuthenticationFailed",
            "db_",
        ),
    ];
    for (case, secret, reason, mentions) in cases {
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = ns.api();
        let _ = secrets.delete("app-db-url", &Default::default()).await;
        if let Some((key, value)) = &secret {
            url_secret(&ns, "app-db-url", key, value).await;
        }
        // A change to the resource asks for a reconcile now rather than after the backoff.
        migrations
            .patch(
                "app-db",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": {"case": reason}}})),
            )
            .await
            .unwrap();
        let seen = wait_for(
            &migrations,
            "app-db",
            Duration::from_secs(60),
            reason,
            |m| condition(m, "Ready").is_some_and(|c| c.status == "False" && c.reason == reason),
        )
        .await;
        let message = &condition(&seen, "Ready").unwrap().message;
        assert!(message.contains(mentions), "{case}: {message}");
        assert!(
            !message.contains(password),
            "{case}: password leaked: {message}"
        );
        let event = await_event(&ns, "app-db", "Warning", reason).await;
        let note = event.note.unwrap_or_default();
        assert!(
            !note.contains(password),
            "{case}: password in the Event: {note}"
        );
    }

    // A custom query that errors.
    let mut with_query: DatabaseMigration = serde_yaml::from_str(&migration_yaml(
        APP_V2,
        r#"["alembic", "upgrade", "head"]"#,
        "0002",
    ))
    .unwrap();
    with_query.spec.database.tracking.tool = None;
    with_query.spec.database.tracking.query = Some("SELECT version FROM no_such_table".into());
    url_secret(&ns, "app-db-url", "url", &url).await;
    migrations
        .patch(
            "app-db",
            &PatchParams::apply("schemagate-e2e").force(),
            &Patch::Apply(&with_query),
        )
        .await
        .unwrap();
    let seen = wait_for(
        &migrations,
        "app-db",
        Duration::from_secs(60),
        "query error",
        |m| {
            condition(m, "Ready")
                .is_some_and(|c| c.status == "False" && c.reason == "RevisionQueryFailed")
        },
    )
    .await;
    assert!(
        condition(&seen, "Ready")
            .unwrap()
            .message
            .contains("no_such_table")
    );

    // An unknown tool is refused by the API server with the allowed values.
    let mut unknown = serde_json::to_value(&with_query).unwrap();
    unknown["spec"]["database"]["tracking"] = serde_json::json!({"tool": "liquibase-classic"});
    let refused = migrations
        .patch(
            "app-db",
            &PatchParams::apply("schemagate-e2e").force(),
            &Patch::Apply(&unknown),
        )
        .await
        .expect_err("unknown tool refused");
    assert!(refused.to_string().contains("alembic"), "{refused}");

    // Fixed: Ready again, so the operator survived every case.
    let mut fixed = with_query.clone();
    fixed.spec.database.tracking.query = None;
    fixed.spec.database.tracking.tool = Some(schemagate_crds::TrackingTool::Alembic);
    migrations
        .patch(
            "app-db",
            &PatchParams::apply("schemagate-e2e").force(),
            &Patch::Apply(&fixed),
        )
        .await
        .unwrap();
    wait_for(
        &migrations,
        "app-db",
        Duration::from_secs(60),
        "Ready after the fix",
        |m| has_condition(m, "Ready", "True", "RevisionApplied"),
    )
    .await;
    assert!(jobs(&ns.api()).await.is_empty());

    // The password appears nowhere: status, Events, Jobs, pods, operator log, metrics.
    assert_no_password(&ns, password, Some(&operator)).await;
}

#[tokio::test]
async fn password_never_reaches_the_job_spec() {
    let password = "pw-Job-Leak-5521";
    let (ns, _url, _operator) = with_database_and_operator("no-leak-job", password, false).await;
    apply_migration(
        &ns,
        &migration_yaml(APP_V2, r#"["alembic", "upgrade", "head"]"#, "0002"),
    )
    .await;
    let ready = await_ready(&ns).await;
    let job_json = serde_json::to_string(&all_jobs(&ns.api()).await).unwrap();
    assert!(!job_json.contains(password), "password in the Job");
    assert!(
        job_json.contains("secretKeyRef"),
        "the URL comes from the Secret"
    );
    assert!(!serde_json::to_string(&ready).unwrap().contains(password));
    let log = String::from_utf8_lossy(&operator_log().lock().unwrap()).to_string();
    assert!(!log.contains(password), "password in the operator log");
}

/// A database taken back below the revision (a restore, a manual downgrade) is noticed at
/// the next drift check: Drifted, not Ready, and Deployments needing the revision are held
/// again.
#[tokio::test]
async fn drift_is_noticed_and_rollouts_are_held_again() {
    let (ns, url, _operator) = with_database_and_operator("drift", "pw-drift-4711", true).await;
    alembic(&url, &["upgrade", "head"]).await;
    let mut yaml = migration_yaml(APP_V2, r#"["alembic", "upgrade", "head"]"#, "0002");
    yaml.push_str("  driftCheckInterval: 1s\n");
    apply_migration(&ns, &yaml).await;
    let migrations: Api<DatabaseMigration> = ns.api();
    wait_for(&migrations, "app-db", MIGRATION_TIMEOUT, "Ready", |m| {
        has_condition(m, "Ready", "True", "RevisionApplied")
    })
    .await;

    alembic(&url, &["downgrade", "0001"]).await;
    let drifted = wait_for(&migrations, "app-db", MIGRATION_TIMEOUT, "Drifted", |m| {
        has_condition(m, "Drifted", "True", "RevisionMissing")
    })
    .await;
    assert_eq!(condition(&drifted, "Ready").unwrap().status, "False");
    let message = &condition(&drifted, "Drifted").unwrap().message;
    assert!(
        message.contains("revision 0001") && message.contains("0002"),
        "{message}"
    );
    assert!(
        jobs(&ns.api()).await.is_empty(),
        "drift alone starts no migration"
    );

    // A new rollout needing 0002 is held again.
    apply_manifest(&ns, "examples/incident/manifests/app-v2.yaml").await;
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        ns.api().get("admin-dashboard").await.unwrap();
    assert_eq!(deployment.spec.unwrap().paused, Some(true));
    assert_eq!(
        deployment
            .metadata
            .annotations
            .unwrap()
            .get(schemagate_crds::HELD_FOR_ANNOTATION)
            .map(String::as_str),
        Some("0002")
    );
}

/// A migration Job deleted while it runs is a failed attempt that waits for a person: the
/// migration may have stopped midway, so it is never re-run under the same name on its
/// own. A retry runs it again.
#[tokio::test]
async fn a_running_job_deleted_is_a_failed_attempt_that_waits_for_a_retry() {
    use sqlx::Connection as _;
    let ns = namespace("job-deleted").await;
    let operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    let url = v1_serving(&ns).await;
    // Migration 0002 blocks on this lock while the test deletes its Job.
    let mut lock = sqlx::PgConnection::connect(&url).await.expect("connecting");
    let mut lock_tx = lock.begin().await.expect("BEGIN");
    sqlx::query("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock_tx)
        .await
        .expect("locking documents");
    apply_manifest(&ns, "examples/incident/manifests/migration.yaml").await;
    let running = wait_for(
        &ns.api::<DatabaseMigration>(),
        "app-db",
        MIGRATION_TIMEOUT,
        "its Job running",
        |m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.phase == Some(Phase::Running))
        },
    )
    .await;
    let job_name = running.status.unwrap().job.unwrap().name;
    let job_api: Api<Job> = ns.api();
    schemagate_testenv::harness::job_pods(&ns.api(), &job_name).await;
    job_api
        .delete(&job_name, &kube::api::DeleteParams::background())
        .await
        .expect("deleting the running Job");

    let failed = await_app_db_condition(&ns, "Failed", "True", "JobDeleted").await;
    let message = &condition(&failed, "Failed").unwrap().message;
    assert!(message.contains(&job_name), "{message}");
    assert!(message.contains("schemagate.dev/retry"), "{message}");
    await_event(&ns, "app-db", "Warning", "JobDeleted").await;
    // The reconcile that wrote this status created no Job first (Jobs are created before
    // the status is written): the attempt is not re-run on its own.
    let names: Vec<String> = jobs(&job_api)
        .await
        .into_iter()
        .filter(|j| j.metadata.deletion_timestamp.is_none())
        .filter_map(|j| j.metadata.name)
        .collect();
    assert!(!names.contains(&job_name), "not re-created: {names:?}");
    lock_tx.rollback().await.expect("releasing the lock");
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0001"));

    // A retry runs the migration again, under a new name.
    ns.api::<DatabaseMigration>()
        .patch(
            "app-db",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"annotations": {"schemagate.dev/retry": "after-delete"}}}),
            ),
        )
        .await
        .unwrap();
    await_ready(&ns).await;
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0002"));
    // v1_serving's throw-away password.
    assert_no_password(&ns, "pw-gate-1234", Some(&operator)).await;
}

/// A migrator image that cannot be pulled is named within seconds, not after a deadline:
/// the DatabaseMigration is Stalled with the kubelet's reason. Fixing the image in the
/// spec recovers: the stuck Job of the earlier attempt (its pod never ran) is deleted
/// before the new one starts, so two attempts never overlap.
#[tokio::test]
async fn a_migrator_image_that_cannot_be_pulled_is_named_within_seconds() {
    let (ns, url, operator) = with_database_and_operator("image-pull", "pw-pull-9931", false).await;
    let unpullable = "registry.invalid/admin-dashboard:v1";
    let applied = std::time::Instant::now();
    apply_migration(
        &ns,
        &migration_yaml(unpullable, r#"["alembic", "upgrade", "0001"]"#, "0001"),
    )
    .await;
    let stalled = await_app_db_condition(&ns, "Stalled", "True", "MigratorCannotStart").await;
    let named_in = applied.elapsed();
    let message = &condition(&stalled, "Stalled").unwrap().message;
    assert!(
        message.contains("ErrImagePull") || message.contains("ImagePullBackOff"),
        "{message}"
    );
    assert!(message.contains(unpullable), "{message}");
    assert!(message.contains("spec.migrator.image"), "{message}");
    await_event(&ns, "app-db", "Warning", "MigratorCannotStart").await;
    let stuck_job = stalled
        .status
        .as_ref()
        .unwrap()
        .job
        .as_ref()
        .unwrap()
        .name
        .clone();
    eprintln!("e2e: an unpullable migrator image was named {named_in:?} after the apply");

    // The fix is a new image in the spec: a new attempt, after the stuck Job is gone.
    apply_migration(
        &ns,
        &migration_yaml(APP_V1, r#"["alembic", "upgrade", "0001"]"#, "0001"),
    )
    .await;
    await_ready(&ns).await;
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0001"));
    let remaining: Vec<String> = jobs(&ns.api())
        .await
        .into_iter()
        .filter_map(|j| j.metadata.name)
        .collect();
    assert!(
        !remaining.contains(&stuck_job),
        "the stuck Job was deleted: {remaining:?}"
    );
    assert_no_password(&ns, "pw-pull-9931", Some(&operator)).await;
}

/// A namespace enforcing Pod Security "restricted" refuses a root migrator's pod: the
/// Job controller cannot create it, and the DatabaseMigration says so, quoting Pod
/// Security's reasons, instead of "running" until a deadline.
#[tokio::test]
async fn a_root_migrator_refused_by_pod_security_is_named() {
    let (ns, _url, operator) =
        with_database_and_operator("pod-security", "pw-psa-5521", false).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ns.cluster().client());
    namespaces
        .patch(
            ns.name(),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted"
            }}})),
        )
        .await
        .expect("enforcing restricted");
    // The migrator asks to run as root.
    let yaml = migration_yaml(APP_V1, r#"["alembic", "upgrade", "0001"]"#, "0001").replace(
        "  migrator:\n",
        "  migrator:\n    podSecurityContext: { runAsNonRoot: false }\n    securityContext: { runAsNonRoot: false, runAsUser: 0 }\n",
    );
    apply_migration(&ns, &yaml).await;
    let stalled = await_app_db_condition(&ns, "Stalled", "True", "MigratorCannotStart").await;
    let message = &condition(&stalled, "Stalled").unwrap().message;
    assert!(message.contains("PodSecurity"), "{message}");
    assert!(message.contains("restricted"), "{message}");
    assert_no_password(&ns, "pw-psa-5521", Some(&operator)).await;
}
