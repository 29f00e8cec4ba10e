//! The gate when its webhook is not there: a wiped CA bundle, a missing webhook
//! configuration, an unreachable webhook. The operator's own holds and releases never wait
//! for its webhook (the chart's `not-the-operator` match condition), so the controllers
//! keep gating; the configuration is repaired within seconds.

use crate::support::*;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use schemagate_testenv::harness::{TestNamespace, deployment_available, namespace};
use sqlx::Connection as _;
use std::time::{Duration, Instant};

const REPAIR_WITHIN: Duration = Duration::from_secs(10);

fn webhook_config(ns: &TestNamespace) -> Api<MutatingWebhookConfiguration> {
    Api::all(ns.cluster().client())
}

fn ca_bundles(config: &MutatingWebhookConfiguration) -> Vec<usize> {
    config
        .webhooks
        .iter()
        .flatten()
        .map(|w| w.client_config.ca_bundle.as_ref().map_or(0, |b| b.0.len()))
        .collect()
}

/// A Deployment with or without the opt-in label, needing revision 0009 of `app-db`.
fn deployment(name: &str, opted_in: bool) -> Deployment {
    let mut labels = serde_json::json!({"app": name});
    if opted_in {
        labels["schemagate.dev/migration"] = "app-db".into();
    }
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": {"schemagate.dev/revision": "0009"}},
                "spec": {"containers": [{"name": "c", "image": "none"}]}
            }
        }
    }))
    .expect("a Deployment")
}

fn paused(deployment: &Deployment) -> bool {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.paused)
        .unwrap_or(false)
}

async fn await_metric(operator: &Operator, name: &str, value: f64) {
    let deadline = Instant::now() + REPAIR_WITHIN;
    loop {
        let seen = operator.metric(name).await;
        if seen == Some(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {seen:?}, not {value}, after {REPAIR_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_wiped_ca_bundle_is_repaired_within_seconds() {
    let ns = namespace("wiped-ca-bundle").await;
    let operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    let name = chart_fullname(ns.name());
    let api = webhook_config(&ns);
    let config = api.get(&name).await.expect("the configuration");
    let wiped: Vec<serde_json::Value> = config
        .webhooks
        .iter()
        .flatten()
        .map(|w| serde_json::json!({"name": w.name, "clientConfig": {"caBundle": ""}}))
        .collect();
    let wiped_at = Instant::now();
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Strategic(serde_json::json!({ "webhooks": wiped })),
    )
    .await
    .expect("wiping the CA bundle");
    operator.await_ca_bundle(&name).await;
    let repaired_in = wiped_at.elapsed();
    assert!(repaired_in < REPAIR_WITHIN, "repaired in {repaired_in:?}");
    let config = api.get(&name).await.expect("the configuration");
    assert!(ca_bundles(&config).iter().all(|len| *len > 0));
    await_metric(&operator, "schemagate_webhook_configuration_ready", 1.0).await;
    // The webhook answers again: an opted-in Deployment needing a revision nobody has is
    // held in the request that creates it.
    let created = ns
        .api::<Deployment>()
        .create(&PostParams::default(), &deployment("needs-0009", true))
        .await
        .expect("admitted");
    assert!(paused(&created), "held on admission");
    eprintln!("e2e: CA bundle repaired {repaired_in:?} after it was wiped");
    operator.stop().await;
}

#[tokio::test]
async fn the_operator_starts_without_its_webhook_configuration_and_fills_it_in_when_it_appears() {
    let ns = namespace("no-webhook-config").await;
    let operator = Operator::start_without_webhook_configuration(&ns).await;
    // It runs, and says the webhook is off.
    await_metric(&operator, "schemagate_webhook_configuration_ready", 0.0).await;
    // The controllers gate meanwhile: an opted-in Deployment is admitted unchecked and
    // paused by the backstop.
    let api: Api<Deployment> = ns.api();
    api.create(&PostParams::default(), &deployment("backstop", true))
        .await
        .expect("admitted: no webhook");
    schemagate_testenv::harness::wait_for(
        &api,
        "backstop",
        TIMEOUT,
        "paused by the backstop",
        paused,
    )
    .await;

    let port = operator.webhook_port.expect("the webhook serves");
    install_webhook_config(&ns.cluster().client(), ns.name(), port).await;
    let installed = Instant::now();
    operator.await_ca_bundle(&chart_fullname(ns.name())).await;
    assert!(installed.elapsed() < REPAIR_WITHIN);
    await_metric(&operator, "schemagate_webhook_configuration_ready", 1.0).await;
    let created = api
        .create(&PostParams::default(), &deployment("webhook", true))
        .await
        .expect("admitted");
    assert!(
        paused(&created),
        "held on admission once the configuration is there"
    );
    operator.stop().await;
}

/// The webhook unreachable with failurePolicy Fail: opted-out Deployments are admitted,
/// opted-in ones are refused (never admitted unchecked), and the operator still releases
/// a held Deployment once its migration is applied: its own patches skip the webhook.
#[tokio::test]
async fn the_backstop_releases_while_the_webhook_is_unreachable() {
    let ns = namespace("webhook-unreachable").await;
    let operator = Operator::start(&ns, OperatorOptions::webhook()).await;
    let url = v1_serving(&ns).await;

    // Migration 0002 waits on this lock until the webhook is broken.
    let mut lock = sqlx::PgConnection::connect(&url).await.expect("connecting");
    let mut lock_tx = lock.begin().await.expect("BEGIN");
    sqlx::query("LOCK TABLE documents IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock_tx)
        .await
        .expect("locking documents");
    let (stop, watch) = watch_release(&ns, url.clone(), "0001", "0002").await;
    apply_manifest(&ns, "examples/incident/manifests/release-v2.yaml").await;
    let api: Api<Deployment> = ns.api();
    assert!(
        paused(&api.get(DEPLOYMENT).await.unwrap()),
        "held by the webhook"
    );

    // Break the webhook: the API server cannot reach it any more.
    let dead = schemagate_testenv::cluster::free_port().expect("a free port");
    let name = chart_fullname(ns.name());
    let configs = webhook_config(&ns);
    let config = configs.get(&name).await.expect("the configuration");
    let broken: Vec<serde_json::Value> = config
        .webhooks
        .iter()
        .flatten()
        .map(|w| serde_json::json!({"name": w.name, "clientConfig": {"url": format!("https://127.0.0.1:{dead}/mutate-deployments")}}))
        .collect();
    configs
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Strategic(serde_json::json!({ "webhooks": broken })),
        )
        .await
        .expect("pointing the webhook at nothing");
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    api.create(&dry_run, &deployment("opted-out", false))
        .await
        .expect("an opted-out Deployment is admitted while the webhook is down");
    api.create(&dry_run, &deployment("opted-in", true))
        .await
        .expect_err("an opted-in Deployment is not admitted unchecked");

    lock_tx.rollback().await.expect("releasing the lock");
    deployment_available(&api, DEPLOYMENT, TIMEOUT).await;
    let released = api.get(DEPLOYMENT).await.unwrap();
    assert!(!paused(&released), "released by the operator");
    let timeline = finish_watch(stop, watch).await;
    assert_safe_release(&timeline);
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0002"));
    assert_no_password(&ns, "pw-gate-1234", Some(&operator)).await;

    operator.stop().await;
    let _ = configs.delete(&name, &DeleteParams::default()).await;
}
