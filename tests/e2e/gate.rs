//! The rollout gate end to end: the incident replayed on a real control plane with real
//! PostgreSQL and real Alembic. New code never runs against an old schema, and the old
//! version keeps serving meanwhile.

use crate::support::*;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use schemagate_crds::{DatabaseMigration, HELD_FOR_ANNOTATION, REVISION_ANNOTATION};
use schemagate_testenv::harness::{TestNamespace, deployment_available, namespace, wait_for};
use sqlx::Connection;

/// Dry-runs the manifest's Deployment until the webhook admits it without a hold.
async fn await_admitted_unheld(ns: &TestNamespace, relative: &str) {
    let text = std::fs::read_to_string(repo_root().join(relative)).unwrap();
    let document = text.split("\n---").next().unwrap();
    let deployment: Deployment = serde_yaml::from_str(document).unwrap();
    let api: Api<Deployment> = ns.api();
    let params = PatchParams::apply("schemagate-e2e").force().dry_run();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let result = api
            .patch(DEPLOYMENT, &params, &Patch::Apply(&deployment))
            .await
            .unwrap();
        if held_for(&result).is_none() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still held after the migration was Ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn held_for(deployment: &Deployment) -> Option<&String> {
    deployment.annotations().get(HELD_FOR_ANNOTATION)
}

async fn replica_sets_of_revision(ns: &TestNamespace, revision: &str) -> usize {
    let api: Api<ReplicaSet> = ns.api();
    api.list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .and_then(|t| t.metadata.as_ref())
                .and_then(|m| m.annotations.as_ref())
                .and_then(|a| a.get(REVISION_ANNOTATION))
                .map(String::as_str)
                == Some(revision)
        })
        .count()
}

#[tokio::test]
async fn the_incident_replayed_v2_waits_for_its_columns() {
    let ns = namespace("incident").await;
    let _operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    let url = v1_serving(&ns).await;

    let timeline = release_v2(&ns, &url).await;
    assert_safe_release(&timeline);
    assert_eq!(
        timeline.revision_at_first_new_pod,
        Some(Some("0002".to_string())),
        "{timeline:?}"
    );
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0002"));
    let columns = columns(&url, "documents").await;
    assert!(columns.contains(&"upload_notes".to_string()));

    let deployment: Deployment = ns.api().get(DEPLOYMENT).await.unwrap();
    assert!(held_for(&deployment).is_none(), "released: marker removed");
    assert_ne!(deployment.spec.unwrap().paused, Some(true));
    await_event(&ns, DEPLOYMENT, "Normal", "RolloutReleased").await;

    // `kubectl rollout undo` to v1: 0001 is an ancestor of 0002 in the revision graph of
    // the migrator image (Alembic ids need not be ordered), so v1 is released at once.
    wait_for(
        &ns.api::<DatabaseMigration>(),
        "app-db",
        TIMEOUT,
        "the revision graph of the v2 image",
        |m| {
            m.status
                .as_ref()
                .and_then(|s| s.revision_graph.as_ref())
                .is_some_and(|g| g.image == APP_V2 && !g.revisions.is_empty())
        },
    )
    .await;
    apply_manifest(&ns, "examples/incident/manifests/app-v1.yaml").await;
    let rolled_back: Deployment = ns.api().get(DEPLOYMENT).await.unwrap();
    assert!(
        held_for(&rolled_back).is_none(),
        "rollback to a satisfied revision is not held"
    );
    assert_ne!(rolled_back.spec.unwrap().paused, Some(true));
    deployment_available(&ns.api(), DEPLOYMENT, TIMEOUT).await;
}

#[tokio::test]
async fn deployment_first_and_migration_later_is_held_then_released() {
    let ns = namespace("deployment-first").await;
    let _operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    let url = v1_serving(&ns).await;
    let (stop, watch) = watch_release(&ns, url.clone(), "0001", "0002").await;

    apply_manifest(&ns, "examples/incident/manifests/app-v2.yaml").await;
    let deployments: Api<Deployment> = ns.api();
    let held = wait_for(&deployments, DEPLOYMENT, TIMEOUT, "held for 0002", |d| {
        held_for(d).map(String::as_str) == Some("0002")
    })
    .await;
    assert_eq!(held.spec.as_ref().unwrap().paused, Some(true));
    // The DatabaseMigration still names 0001: the rollout waits for a migration to 0002.
    wait_for(
        &ns.api::<DatabaseMigration>(),
        "app-db",
        TIMEOUT,
        "lists the held Deployment",
        |m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.held_deployments == [DEPLOYMENT])
        },
    )
    .await;
    assert_eq!(
        replica_sets_of_revision(&ns, "0002").await,
        0,
        "no ReplicaSet of v2 while held"
    );

    apply_manifest(&ns, "examples/incident/manifests/migration.yaml").await;
    deployment_available(&deployments, DEPLOYMENT, TIMEOUT).await;
    assert_safe_release(&finish_watch(stop, watch).await);
    // Released: the DatabaseMigration no longer lists it.
    wait_for(
        &ns.api::<DatabaseMigration>(),
        "app-db",
        TIMEOUT,
        "lists no held Deployment",
        |m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.held_deployments.is_empty())
        },
    )
    .await;
}

#[tokio::test]
async fn migration_first_and_deployment_later_is_never_held() {
    let ns = namespace("migration-first").await;
    let _operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    let url = v1_serving(&ns).await;
    apply_manifest(&ns, "examples/incident/manifests/migration.yaml").await;
    wait_for(
        &ns.api::<DatabaseMigration>(),
        "app-db",
        TIMEOUT,
        "Ready at 0002",
        |m| {
            has_condition(m, "Ready", "True", "RevisionApplied")
                && condition(m, "Ready").unwrap().observed_generation == m.metadata.generation
        },
    )
    .await;
    // The operator's cache follows the same watch a moment later: once a dry run is
    // admitted unpaused, the real apply must be too.
    await_admitted_unheld(&ns, "examples/incident/manifests/app-v2.yaml").await;
    let (stop, watch) = watch_release(&ns, url.clone(), "0001", "0002").await;
    apply_manifest(&ns, "examples/incident/manifests/app-v2.yaml").await;
    let applied: Deployment = ns.api().get(DEPLOYMENT).await.unwrap();
    assert!(
        held_for(&applied).is_none(),
        "a satisfied requirement is not held"
    );
    deployment_available(&ns.api(), DEPLOYMENT, TIMEOUT).await;
    assert_safe_release(&finish_watch(stop, watch).await);
    let events = events_for(&ns, DEPLOYMENT).await;
    assert!(
        !events
            .iter()
            .any(|e| e.reason.as_deref() == Some("RolloutHeld")),
        "never held: {events:?}"
    );
}

#[tokio::test]
async fn failed_migration_keeps_v2_held_and_v1_serving_until_fixed() {
    let ns = namespace("gate-failure").await;
    let _operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    let url = v1_serving(&ns).await;
    let (stop, watch) = watch_release(&ns, url.clone(), "0001", "0002").await;

    apply_manifest(&ns, "examples/incident/manifests/app-v2.yaml").await;
    apply_manifest(&ns, "examples/incident/manifests/migration-broken.yaml").await;
    let migrations: Api<DatabaseMigration> = ns.api();
    wait_for(&migrations, "app-db", TIMEOUT, "Failed", |m| {
        has_condition(m, "Failed", "True", "MigrationFailed")
    })
    .await;
    let deployments: Api<Deployment> = ns.api();
    let held = deployments.get(DEPLOYMENT).await.unwrap();
    assert_eq!(held_for(&held).map(String::as_str), Some("0002"));
    assert_eq!(held.spec.as_ref().unwrap().paused, Some(true));
    assert_eq!(
        held.status.as_ref().unwrap().ready_replicas,
        Some(2),
        "v1 keeps serving"
    );
    let held_event = await_event(&ns, DEPLOYMENT, "Normal", "RolloutHeld").await;
    assert!(
        held_event
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("0002"),
        "{held_event:?}"
    );

    // Fixing the migration (the good image) releases the rollout.
    apply_manifest(&ns, "examples/incident/manifests/migration.yaml").await;
    deployment_available(&deployments, DEPLOYMENT, TIMEOUT).await;
    assert_safe_release(&finish_watch(stop, watch).await);
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0002"));
}

#[tokio::test]
async fn a_persons_pause_survives_the_release() {
    let ns = namespace("persons-pause").await;
    let _operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    let url = v1_serving(&ns).await;
    let _ = url;
    // A person pauses the Deployment, then changes it to v2: schemagate must not take that
    // pause for its own.
    let deployments: Api<Deployment> = ns.api();
    deployments
        .patch(
            DEPLOYMENT,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    apply_manifest(&ns, "examples/incident/manifests/app-v2.yaml").await;
    // A second Deployment that schemagate itself holds, to see the release happen.
    let other =
        std::fs::read_to_string(repo_root().join("examples/incident/manifests/app-v2.yaml"))
            .unwrap()
            .replace(
                "name: admin-dashboard\n  labels",
                "name: admin-dashboard-canary\n  labels",
            )
            .split("\n---")
            .next()
            .unwrap()
            .to_string();
    apply_yaml(&ns, &other).await;
    wait_for(
        &deployments,
        "admin-dashboard-canary",
        TIMEOUT,
        "held",
        |d| held_for(d).is_some(),
    )
    .await;

    apply_manifest(&ns, "examples/incident/manifests/migration.yaml").await;
    deployment_available(&deployments, "admin-dashboard-canary", TIMEOUT).await;
    let paused = deployments.get(DEPLOYMENT).await.unwrap();
    assert_eq!(
        paused.spec.as_ref().unwrap().paused,
        Some(true),
        "the person's pause stays"
    );
    assert!(held_for(&paused).is_none());
}

#[tokio::test]
async fn check_exits_1_while_held_and_0_after() {
    let ns = namespace("check").await;
    let _operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    v1_serving(&ns).await;
    let check = || {
        let kubeconfig = ns.cluster().kubeconfig_path().to_path_buf();
        let name = ns.name().to_string();
        async move {
            tokio::process::Command::new(schemagate_bin())
                .args(["check", "-n", &name])
                .env("KUBECONFIG", kubeconfig)
                .output()
                .await
                .expect("running schemagate check")
        }
    };
    let before = check().await;
    assert_eq!(
        before.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&before.stdout)
    );

    apply_manifest(&ns, "examples/incident/manifests/app-v2.yaml").await;
    wait_for(&ns.api::<Deployment>(), DEPLOYMENT, TIMEOUT, "held", |d| {
        held_for(d).is_some()
    })
    .await;
    let held = check().await;
    let table = String::from_utf8_lossy(&held.stdout).to_string();
    assert_eq!(held.status.code(), Some(1), "{table}");
    assert!(
        table.contains("Pending") && table.contains("0002") && table.contains(DEPLOYMENT),
        "{table}"
    );

    apply_manifest(&ns, "examples/incident/manifests/migration.yaml").await;
    deployment_available(&ns.api(), DEPLOYMENT, TIMEOUT).await;
    let after = check().await;
    assert_eq!(
        after.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&after.stdout)
    );
}

#[tokio::test]
async fn backstop_holds_without_the_webhook() {
    let ns = namespace("backstop").await;
    let _operator = Operator::start(&ns, OperatorOptions::backstop_only()).await;
    let url = v1_serving(&ns).await;
    let timeline = release_v2(&ns, &url).await;
    // Without the webhook the Deployment controller creates the first pod of the v2
    // ReplicaSet (its one surge pod) before the backstop pauses it; the gate benchmark
    // reports how often. The backstop must stop the rollout there: a broken backstop lets
    // v2 roll on against the old schema.
    assert!(
        timeline.early_pods <= 1,
        "the backstop did not stop the rollout: {timeline:?}"
    );
    await_event(&ns, DEPLOYMENT, "Normal", "RolloutHeld").await;
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0002"));
    let deployment: Deployment = ns.api().get(DEPLOYMENT).await.unwrap();
    assert!(held_for(&deployment).is_none(), "the hold was released");
}

#[tokio::test]
async fn twenty_releases_with_the_webhook_start_no_early_pod() {
    let mut runs = Vec::new();
    for round in 0..4 {
        let mut batch = Vec::new();
        for slot in 0..5 {
            batch.push(async move {
                let ns = namespace(&format!("repeat-{round}-{slot}")).await;
                let _operator = Operator::start(&ns, OperatorOptions::webhook()).await;
                let url = v1_serving(&ns).await;
                release_v2(&ns, &url).await
            });
        }
        runs.extend(futures::future::join_all(batch).await);
    }
    assert_eq!(runs.len(), 20);
    runs.iter().for_each(assert_safe_release);
    let early: usize = runs.iter().map(|t| t.early_pods).sum();
    assert_eq!(early, 0, "early v2 pods across 20 releases: {runs:?}");
    assert!(
        runs.iter().all(|t| t.min_old_ready_before_new == Some(2)),
        "{runs:?}"
    );
}

/// With the operator down (nothing answers the webhook), a Deployment that did not opt in
/// is admitted and rolls out in any namespace; an opted-in one is refused, never admitted
/// unchecked (failurePolicy Fail, as the chart sets it).
#[tokio::test]
async fn operator_outage_never_blocks_deployments_that_did_not_opt_in() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let ns = namespace("outage").await;
    let dead_port = schemagate_testenv::cluster::free_port().unwrap();
    // The chart's configuration, cluster-wide, except that it matches only this test's
    // label value so that parallel tests are not refused meanwhile.
    let marker = ns.name().to_string();
    let name = format!("schemagate-outage-{marker}");
    let config: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "deployments.schemagate.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "failurePolicy": "Fail", "timeoutSeconds": 5,
            "clientConfig": {"url": format!("https://127.0.0.1:{dead_port}/mutate-deployments")},
            "rules": [{"apiGroups": ["apps"], "apiVersions": ["v1"], "resources": ["deployments"], "operations": ["CREATE", "UPDATE"]}],
            "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]}]},
            "objectSelector": {"matchExpressions": [{"key": "schemagate.dev/migration", "operator": "In", "values": [marker]}]},
            "matchConditions": [{"name": "opted-in", "expression": "has(object.metadata.labels) && 'schemagate.dev/migration' in object.metadata.labels"}]
        }]
    }))
    .unwrap();
    let configs: Api<MutatingWebhookConfiguration> = Api::all(ns.cluster().client());
    configs
        .patch(
            &name,
            &PatchParams::apply("schemagate-e2e").force(),
            &Patch::Apply(&config),
        )
        .await
        .unwrap();

    let plain = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: unrelated }
spec:
  replicas: 2
  selector: { matchLabels: { app: unrelated } }
  template:
    metadata: { labels: { app: unrelated } }
    spec: { containers: [{ name: c, image: registry.example/unrelated:1 }] }
"#;
    apply_yaml(&ns, plain).await;
    deployment_available(&ns.api(), "unrelated", TIMEOUT).await;

    let opted_in: Deployment = serde_yaml::from_str(
        &plain
            .replace(
                "name: unrelated }",
                &format!("name: gated, labels: {{ schemagate.dev/migration: {marker} }} }}"),
            )
            .replace("app: unrelated", "app: gated"),
    )
    .unwrap();
    let refused = ns
        .api::<Deployment>()
        .create(&Default::default(), &opted_in)
        .await
        .expect_err("an opted-in Deployment is not admitted unchecked");
    let _ = configs.delete(&name, &Default::default()).await;
    assert!(
        refused.to_string().contains("deployments.schemagate.dev"),
        "{refused}"
    );
}

/// `schemagate check --wait` as a pipeline step after `kubectl apply` (or `helm upgrade`):
/// success once v2's revision is applied and v2 has rolled out; a failed migration ends it
/// at once with the migrator's error; a hold that never ends ends it at the timeout.
#[tokio::test]
async fn check_wait_follows_the_release_fails_fast_and_times_out() {
    let ns = namespace("check-wait").await;
    let _operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    v1_serving(&ns).await;
    let check_wait = |timeout: &'static str| {
        let kubeconfig = ns.cluster().kubeconfig_path().to_path_buf();
        let name = ns.name().to_string();
        async move {
            tokio::process::Command::new(schemagate_bin())
                .args(["check", "-n", &name, "--wait", "--timeout", timeout])
                .env("KUBECONFIG", kubeconfig)
                .output()
                .await
                .expect("running schemagate check --wait")
        }
    };

    // A broken migration: exit 1 at once, with the migrator's own error.
    apply_manifest(&ns, "examples/incident/manifests/app-v2.yaml").await;
    apply_manifest(&ns, "examples/incident/manifests/migration-broken.yaml").await;
    let started = std::time::Instant::now();
    let failed = check_wait("110s").await;
    let stderr = String::from_utf8_lossy(&failed.stderr).to_string();
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("failed:") && stderr.contains("integr"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(100),
        "failed fast"
    );
    assert!(!stderr.contains("pw-gate-1234"), "no password: {stderr}");

    // A hold nothing will end (the migration suspended): the timeout, exit 2.
    let mut suspended =
        std::fs::read_to_string(repo_root().join("examples/incident/manifests/migration.yaml"))
            .unwrap();
    suspended.push_str("  suspend: true\n");
    apply_yaml(&ns, &suspended).await;
    wait_for(
        &ns.api::<DatabaseMigration>(),
        "app-db",
        TIMEOUT,
        "Suspended",
        |m| has_condition(m, "Ready", "False", "Suspended"),
    )
    .await;
    let timed_out = check_wait("3s").await;
    let stderr = String::from_utf8_lossy(&timed_out.stderr).to_string();
    assert_eq!(timed_out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("waiting:") && stderr.contains("timed out") && stderr.contains(DEPLOYMENT),
        "{stderr}"
    );

    // The fixed migration: it waits through the migration and the rollout, then exit 0.
    apply_manifest(&ns, "examples/incident/manifests/migration.yaml").await;
    let done = check_wait("110s").await;
    let stderr = String::from_utf8_lossy(&done.stderr).to_string();
    assert_eq!(done.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("ready:"), "{stderr}");
    let deployment: Deployment = ns.api().get(DEPLOYMENT).await.unwrap();
    assert!(
        schemagate::gate::check::rolled_out(&deployment),
        "rolled out when it said so"
    );
}

/// Pods of an opted-in Deployment that is not held turning Ready (scaling 0 → 100) cost
/// its DatabaseMigration no reconcile, so no database connection.
///
/// The database is at the revision before the DatabaseMigration exists (golang-migrate's
/// table, written here), so no Job ever runs: nothing but the Deployment and the
/// DatabaseMigration could start a reconcile, and the count is compared once the operator
/// has been idle for a while.
#[tokio::test]
async fn pods_turning_ready_cost_no_reconcile() {
    let ns = namespace("quiet-churn").await;
    let operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    let url = create_postgres_database(ns.cluster(), "pw-churn-1234").await;
    let mut connection = sqlx::PgConnection::connect(&url).await.expect("connecting");
    for statement in [
        "CREATE TABLE schema_migrations (version bigint not null primary key, dirty boolean not null)",
        "INSERT INTO schema_migrations (version, dirty) VALUES (1, false)",
    ] {
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .expect(statement);
    }
    url_secret(&ns, "app-db-url", "url", &url).await;
    apply_yaml(
        &ns,
        &app_db_yaml(
            "{ tool: golang-migrate }",
            "registry.example/churn:v1",
            "[migrate, up]",
            "1",
            "",
        ),
    )
    .await;
    await_ready(&ns).await;
    let started = "schemagate_reconciles_total{controller=\"migration\"}";
    let finished = "schemagate_reconcile_duration_seconds_count{controller=\"migration\"}";
    // The count once every reconcile started has finished and at least `least` started.
    let operator = &operator;
    let count_at_least = move |least: f64| async move {
        loop {
            let (s, f) = (
                operator.metric(started).await,
                operator.metric(finished).await,
            );
            if let (Some(s), Some(f)) = (s, f)
                && s == f
                && s >= least
            {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    // Ready was written by the last reconcile so far: the operator's own status write
    // triggers none.
    let ready = count_at_least(1.0).await;
    let churn: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "churn", "labels": {"schemagate.dev/migration": "app-db"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": "churn"}},
            "template": {
                "metadata": {"labels": {"app": "churn"}, "annotations": {"schemagate.dev/revision": "1"}},
                "spec": {"containers": [{"name": "c", "image": "registry.example/churn:v1"}]}
            }
        }
    }))
    .unwrap();
    let api: Api<Deployment> = ns.api();
    api.create(&Default::default(), &churn).await.unwrap();
    deployment_available(&api, "churn", TIMEOUT).await;
    // A new opted-in Deployment is one reconcile: wait for it, not for a quiet spell.
    let before = count_at_least(ready + 1.0).await;
    assert!(
        before > 0.0,
        "the DatabaseMigration was reconciled at least once"
    );
    // From here any read of the database would report version 2, and the status would say
    // so: what a user would see if pods turning Ready reconciled the DatabaseMigration.
    sqlx::query("UPDATE schema_migrations SET version = 2")
        .execute(&mut connection)
        .await
        .expect("moving the version");
    api.patch(
        "churn",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 100}})),
    )
    .await
    .unwrap();
    deployment_available(&api, "churn", TIMEOUT).await;
    // Nothing is due now (no Job, the drift check is minutes away): a late reconcile
    // caused by the churn would show within these seconds, as a count or in the status.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let after = count_at_least(before).await;
    assert_eq!(after, before, "reconciles while 100 pods turned Ready");
    let migration: DatabaseMigration = ns.api().get("app-db").await.unwrap();
    assert_eq!(
        migration.status.unwrap_or_default().applied_revisions,
        vec!["1".to_string()],
        "the database was not read while pods turned Ready"
    );
}
