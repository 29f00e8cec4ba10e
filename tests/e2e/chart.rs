//! The Helm chart, installed for real: the operator runs as the chart's Deployment (the
//! test node runs the locally built `schemagate` for its image), with the chart's RBAC,
//! reached by the API server through the chart's Service, and holds the incident's v2.

use crate::support::*;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::Api;
use kube::runtime::wait::await_condition;
use schemagate_testenv::harness::{deployment_available, namespace};
use std::time::Duration;

#[tokio::test]
async fn helm_installed_operator_holds_the_release_through_its_service() {
    let apps = namespace("chart-apps").await;
    let system = namespace("chart-system").await;
    let cluster = apps.cluster();
    prepare(cluster).await;
    let bin_dir = schemagate_bin().parent().unwrap().to_path_buf();
    cluster
        .register_image(
            "registry.example/schemagate:0.1.0",
            &repo_root(),
            Some(&bin_dir.display().to_string()),
            Some(&["schemagate"]),
        )
        .await;

    let helm = helm_bin().await;
    let release = format!("sg-{}", &system.name()[system.name().len() - 6..]);
    let metrics_port = schemagate_testenv::cluster::free_port()
        .unwrap()
        .to_string();
    let webhook_port = schemagate_testenv::cluster::free_port()
        .unwrap()
        .to_string();
    let install = tokio::process::Command::new(&helm)
        .args([
            "install",
            &release,
            "charts/schemagate",
            "--namespace",
            system.name(),
        ])
        .args(["--set", &format!("watchNamespace={}", apps.name())])
        .args([
            "--set",
            &format!("metrics.port={metrics_port}"),
            "--set",
            &format!("webhook.port={webhook_port}"),
        ])
        .args(["--wait", "--timeout", "120s"])
        .current_dir(repo_root())
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .output()
        .await
        .expect("running helm install");
    assert!(
        install.status.success(),
        "helm install failed:\n{}\n{}",
        String::from_utf8_lossy(&install.stdout),
        String::from_utf8_lossy(&install.stderr)
    );

    // The operator made its certificate and patched the CA bundle into the chart's webhook.
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(cluster.client());
    let webhook_name = format!("{release}-schemagate");
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(
            webhooks,
            &webhook_name,
            |c: Option<&MutatingWebhookConfiguration>| {
                c.is_some_and(|c| {
                    c.webhooks
                        .iter()
                        .flatten()
                        .all(|w| w.client_config.ca_bundle.is_some())
                })
            },
        ),
    )
    .await
    .expect("CA bundle patched in time")
    .unwrap();

    let url = v1_serving(&apps).await;
    let timeline = release_v2(&apps, &url).await;
    assert_safe_release(&timeline);
    deployment_available(&apps.api(), DEPLOYMENT, TIMEOUT).await;

    // The hold came from the webhook, through the Service: the operator's own metrics say so.
    let metrics = cluster
        .client()
        .request_text(
            http::Request::get(format!(
                "/api/v1/namespaces/{}/services/{release}-schemagate:{metrics_port}/proxy/metrics",
                system.name()
            ))
            .body(Vec::new())
            .unwrap(),
        )
        .await
        .expect("operator metrics through the Service");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(r#"schemagate_gate_changes_total{action="hold",by="webhook"}"#)),
        "{metrics}"
    );

    let uninstall = tokio::process::Command::new(&helm)
        .args([
            "uninstall",
            &release,
            "--namespace",
            system.name(),
            "--wait",
        ])
        .env("KUBECONFIG", cluster.kubeconfig_path())
        .output()
        .await
        .expect("running helm uninstall");
    assert!(
        uninstall.status.success(),
        "{}",
        String::from_utf8_lossy(&uninstall.stderr)
    );
}
