//! The Helm chart, installed for real: the operator runs as the chart's Deployment from its
//! own OCI image (`make image`, `target/image/oci`), as user 65532 on a read-only root
//! filesystem, with the chart's RBAC, reached by the API server through the chart's
//! Service, and holds the incident's v2. Both namespaces enforce Pod Security "restricted".

use crate::support::*;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::Api;
use kube::runtime::wait::await_condition;
use schemagate_testenv::harness::{deployment_available, namespace};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The operator's OCI layout: `SCHEMAGATE_IMAGE_DIR/oci` or `target/image/oci`.
fn image_layout() -> PathBuf {
    let dir = std::env::var_os("SCHEMAGATE_IMAGE_DIR")
        .map_or_else(|| repo_root().join("target/image"), PathBuf::from);
    let layout = dir.join("oci");
    assert!(
        layout.join("index.json").is_file(),
        "no operator image at {}: build it with `make image` (make test and make e2e do)",
        layout.display()
    );
    layout
}

#[derive(Debug)]
struct ImageProcess {
    uid: String,
    root: PathBuf,
    root_read_only: bool,
}

/// The `schemagate run` process whose root directory is a copy of the image (it holds the
/// image's binary), read from /proc.
fn operator_process() -> Option<ImageProcess> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        if entry.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let proc_dir = entry.path();
        let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if argv.first().map(String::as_str) != Some("/usr/local/bin/schemagate")
            || argv.get(1).map(String::as_str) != Some("run")
        {
            continue;
        }
        let Ok(root) = std::fs::read_link(proc_dir.join("root")) else {
            continue;
        };
        if root == Path::new("/") || !root.join("usr/local/bin/schemagate").is_file() {
            continue;
        }
        let status = std::fs::read_to_string(proc_dir.join("status")).unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            .unwrap_or_default()
            .to_string();
        // The mount at the process's "/" (fifth field of mountinfo) and its options.
        let mountinfo = std::fs::read_to_string(proc_dir.join("mountinfo")).unwrap_or_default();
        let root_read_only = mountinfo.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(4) == Some(&"/")
                && fields
                    .get(5)
                    .is_some_and(|options| options.split(',').any(|o| o == "ro"))
        });
        return Some(ImageProcess {
            uid,
            root,
            root_read_only,
        });
    }
    None
}

/// Labels a namespace to enforce Pod Security "restricted": every pod created in it from
/// now on must satisfy that profile, or the API server refuses it.
async fn enforce_restricted(ns: &schemagate_testenv::harness::TestNamespace) {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(ns.cluster().client());
    namespaces
        .patch(
            ns.name(),
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }}})),
        )
        .await
        .expect("enforcing Pod Security restricted");
}

#[tokio::test]
async fn helm_installed_operator_holds_the_release_through_its_service() {
    let apps = namespace("chart-apps").await;
    let system = namespace("chart-system").await;
    let cluster = apps.cluster();
    prepare(cluster).await;
    // Both namespaces enforce Pod Security "restricted": the operator's pod, the migration
    // and revision-graph Job pods and the application's pods must all be admitted by it.
    enforce_restricted(&system).await;
    enforce_restricted(&apps).await;
    // The chart's default image, run from the layout `make image` builds.
    let layout = image_layout();
    let version = env!("CARGO_PKG_VERSION");
    cluster
        .register_oci_image(
            &format!("registry.example/schemagate:{version}"),
            &format!("{}:{version}", layout.display()),
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

    // The operator's process: in the image's root, as 65532, the root read-only.
    let process = operator_process().expect("the operator runs from its image");
    assert_eq!(process.uid, "65532", "{process:?}");
    assert!(process.root.ends_with("rootfs"), "{process:?}");
    assert!(process.root_read_only, "{process:?}");

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
