//! The local control plane and the test node behave like Kubernetes where schemagate
//! relies on it: Deployments roll out (or, paused, do not), Jobs run real processes with
//! Secrets, volumes and termination messages, RBAC is enforced, Services reach process
//! pods, and a control plane that cannot start fails loudly.

// Helpers outside `#[test]` functions are test code too: a failed step fails the test.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use schemagate_testenv::cluster::{Cluster, ClusterOptions, StartError, free_port};
use schemagate_testenv::harness::{
    TestNamespace, deployment_available, job_complete, job_failed, job_pods, namespace, wait_for,
};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

fn deployment(name: &str, image: &str, replicas: i32) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": [{ "name": "app", "image": image }] }
            }
        }
    }))
    .expect("valid Deployment")
}

/// A Job with one container running `sh -c script`, never retried.
fn job(name: &str, script: &str, extra_container: serde_json::Value) -> Job {
    let mut container = json!({
        "name": "main",
        "image": "registry.example/tools:1",
        "command": ["sh", "-c", script],
    });
    if let (Some(container), Some(extra)) = (container.as_object_mut(), extra_container.as_object())
    {
        container.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": name },
        "spec": {
            "backoffLimit": 0,
            "template": { "spec": { "restartPolicy": "Never", "containers": [container] } }
        }
    }))
    .expect("valid Job")
}

async fn replica_set_names(ns: &TestNamespace, app: &str) -> BTreeSet<String> {
    let replica_sets: Api<ReplicaSet> = ns.api();
    replica_sets
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .expect("listing ReplicaSets")
        .items
        .into_iter()
        .filter_map(|rs| rs.metadata.name)
        .collect()
}

async fn set_image(api: &Api<Deployment>, name: &str, image: &str) -> Deployment {
    let patch = json!({ "spec": { "template": { "spec": {
        "containers": [{ "name": "app", "image": image }]
    } } } });
    api.patch(name, &PatchParams::default(), &Patch::Strategic(&patch))
        .await
        .expect("patching the Deployment's template")
}

/// The single terminated state of a finished Job's pod.
async fn terminated_state(
    ns: &TestNamespace,
    job: &str,
) -> k8s_openapi::api::core::v1::ContainerStateTerminated {
    let pods = job_pods(&ns.api(), job).await;
    assert_eq!(pods.len(), 1, "job {job} should have exactly one pod");
    pods[0]
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.terminated.clone())
        .unwrap_or_else(|| {
            panic!(
                "job {job}'s pod has no terminated container: {:?}",
                pods[0].status
            )
        })
}

#[tokio::test]
async fn deployment_rolls_out_and_a_template_change_creates_a_second_replica_set() {
    let ns = namespace("deployment-rollout").await;
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(
            &PostParams::default(),
            &deployment("web", "registry.example/web:1", 2),
        )
        .await
        .expect("creating the Deployment");
    deployment_available(&deployments, "web", TIMEOUT).await;

    assert_eq!(replica_set_names(&ns, "web").await.len(), 1);
    let pods: Api<Pod> = ns.api();
    let pods = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("listing pods");
    assert_eq!(pods.items.len(), 2);
    for pod in &pods.items {
        let status = pod.status.as_ref().expect("pod status");
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let ready = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready");
        assert_eq!(
            ready.map(|c| c.status.as_str()),
            Some("True"),
            "{:?}",
            status
        );
        assert!(status.pod_ip.is_some(), "a running pod has an IP");
    }

    set_image(&deployments, "web", "registry.example/web:2").await;
    let rolled = deployment_available(&deployments, "web", TIMEOUT).await;
    assert_eq!(rolled.status.and_then(|s| s.observed_generation), Some(2));
    assert_eq!(replica_set_names(&ns, "web").await.len(), 2);
}

#[tokio::test]
async fn a_paused_deployment_creates_no_replica_set_until_it_is_resumed() {
    let ns = namespace("paused-deployment").await;
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(
            &PostParams::default(),
            &deployment("held", "registry.example/held:1", 1),
        )
        .await
        .expect("creating the Deployment");
    deployment_available(&deployments, "held", TIMEOUT).await;
    let before = replica_set_names(&ns, "held").await;
    assert_eq!(before.len(), 1);

    let pause = json!({ "spec": { "paused": true } });
    deployments
        .patch("held", &PatchParams::default(), &Patch::Merge(&pause))
        .await
        .expect("pausing");
    let changed = set_image(&deployments, "held", "registry.example/held:2").await;
    let generation = changed.metadata.generation.expect("generation");
    // The controller has seen the new template...
    wait_for(
        &deployments,
        "held",
        TIMEOUT,
        "observed the paused template change",
        |d| d.status.as_ref().and_then(|s| s.observed_generation) >= Some(generation),
    )
    .await;
    // ...and over a bounded window still creates no ReplicaSet for it.
    let replica_sets: Api<ReplicaSet> = ns.api();
    let config = watcher::Config::default().labels("app=held");
    let mut events = std::pin::pin!(watcher::watcher(replica_sets, config));
    let new_replica_set = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(event) = events.next().await {
            if let Ok(watcher::Event::Apply(rs) | watcher::Event::InitApply(rs)) = event {
                let name = rs.metadata.name.unwrap_or_default();
                if !before.contains(&name) {
                    return name;
                }
            }
        }
        String::new()
    })
    .await;
    assert!(
        new_replica_set.is_err(),
        "a paused Deployment created ReplicaSet {new_replica_set:?}"
    );

    let resume = json!({ "spec": { "paused": false } });
    deployments
        .patch("held", &PatchParams::default(), &Patch::Merge(&resume))
        .await
        .expect("resuming");
    deployment_available(&deployments, "held", TIMEOUT).await;
    assert_eq!(replica_set_names(&ns, "held").await.len(), 2);
}

#[tokio::test]
async fn jobs_complete_or_fail_with_the_exit_code_of_their_process() {
    let ns = namespace("job-exit-codes").await;
    let jobs: Api<Job> = ns.api();
    jobs.create(
        &PostParams::default(),
        &job("succeeds", "exit 0", json!({})),
    )
    .await
    .expect("creating job succeeds");
    jobs.create(
        &PostParams::default(),
        &job("fails", "echo failing >&2; exit 3", json!({})),
    )
    .await
    .expect("creating job fails");

    job_complete(&jobs, "succeeds", TIMEOUT).await;
    let terminated = terminated_state(&ns, "succeeds").await;
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (0, Some("Completed"))
    );

    job_failed(&jobs, "fails", TIMEOUT).await;
    let terminated = terminated_state(&ns, "fails").await;
    assert_eq!(
        (terminated.exit_code, terminated.reason.as_deref()),
        (3, Some("Error"))
    );
}

#[tokio::test]
async fn job_processes_see_secret_values_and_report_termination_messages() {
    let ns = namespace("job-secrets").await;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": "db-url" },
        "stringData": { "url": "postgres://app:s3cret@db.example:5432/app" }
    }))
    .expect("valid Secret");
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating the Secret");
    let from_secret = json!({ "env": [{
        "name": "DATABASE_URL",
        "valueFrom": { "secretKeyRef": { "name": "db-url", "key": "url" } }
    }] });
    let jobs: Api<Job> = ns.api();

    // Written to the default terminationMessagePath (/dev/termination-log).
    let script = r#"printf '%s' "$DATABASE_URL" > /dev/termination-log"#;
    jobs.create(
        &PostParams::default(),
        &job("writes-message", script, from_secret.clone()),
    )
    .await
    .expect("creating job writes-message");
    // A failed, silent container with FallbackToLogsOnError: the message is its output.
    let mut fallback = from_secret.clone();
    fallback["terminationMessagePolicy"] = "FallbackToLogsOnError".into();
    jobs.create(
        &PostParams::default(),
        &job(
            "logs-on-error",
            r#"echo "url=$DATABASE_URL"; exit 1"#,
            fallback,
        ),
    )
    .await
    .expect("creating job logs-on-error");
    // A custom terminationMessagePath.
    let mut custom = json!({ "terminationMessagePath": "/run/schemagate-e2e/message" });
    custom["env"] = from_secret["env"].clone();
    jobs.create(
        &PostParams::default(),
        &job(
            "custom-path",
            "echo 'migrated to 0002' > /run/schemagate-e2e/message",
            custom,
        ),
    )
    .await
    .expect("creating job custom-path");

    job_complete(&jobs, "writes-message", TIMEOUT).await;
    let terminated = terminated_state(&ns, "writes-message").await;
    assert_eq!(
        terminated.message.as_deref(),
        Some("postgres://app:s3cret@db.example:5432/app")
    );

    job_failed(&jobs, "logs-on-error", TIMEOUT).await;
    let terminated = terminated_state(&ns, "logs-on-error").await;
    assert_eq!(
        terminated.message.as_deref(),
        Some("url=postgres://app:s3cret@db.example:5432/app")
    );

    job_complete(&jobs, "custom-path", TIMEOUT).await;
    let terminated = terminated_state(&ns, "custom-path").await;
    assert_eq!(terminated.message.as_deref(), Some("migrated to 0002\n"));
}

#[tokio::test]
async fn a_missing_secret_fails_the_job_pod_with_a_config_error() {
    let ns = namespace("job-missing-secret").await;
    let missing = json!({ "env": [{
        "name": "DATABASE_URL",
        "valueFrom": { "secretKeyRef": { "name": "does-not-exist", "key": "url" } }
    }] });
    let jobs: Api<Job> = ns.api();
    jobs.create(&PostParams::default(), &job("no-secret", "exit 0", missing))
        .await
        .expect("creating the Job");
    job_failed(&jobs, "no-secret", TIMEOUT).await;
    let terminated = terminated_state(&ns, "no-secret").await;
    assert_eq!(
        terminated.reason.as_deref(),
        Some("CreateContainerConfigError")
    );
    assert!(
        terminated
            .message
            .as_deref()
            .is_some_and(|m| m.contains("does-not-exist")),
        "{terminated:?}"
    );
}

#[tokio::test]
async fn a_config_map_volume_is_readable_at_its_mount_path() {
    let ns = namespace("configmap-volume").await;
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "settings" },
        "data": { "greeting.txt": "hello from a ConfigMap" }
    }))
    .expect("valid ConfigMap");
    ns.api::<ConfigMap>()
        .create(&PostParams::default(), &config_map)
        .await
        .expect("creating the ConfigMap");
    let mut spec = job(
        "reads-volume",
        "cat /run/schemagate-e2e/settings/greeting.txt > /dev/termination-log",
        json!({ "volumeMounts": [{ "name": "settings", "mountPath": "/run/schemagate-e2e/settings", "readOnly": true }] }),
    );
    let volumes = json!([{ "name": "settings", "configMap": { "name": "settings" } }]);
    if let Some(pod_spec) = spec.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
        pod_spec.volumes = Some(serde_json::from_value(volumes).expect("valid volumes"));
    }
    let jobs: Api<Job> = ns.api();
    jobs.create(&PostParams::default(), &spec)
        .await
        .expect("creating the Job");
    job_complete(&jobs, "reads-volume", TIMEOUT).await;
    let terminated = terminated_state(&ns, "reads-volume").await;
    assert_eq!(
        terminated.message.as_deref(),
        Some("hello from a ConfigMap")
    );
}

#[tokio::test]
async fn rbac_refuses_a_service_account_without_rights() {
    let ns = namespace("rbac").await;
    let account: ServiceAccount =
        serde_json::from_value(json!({ "metadata": { "name": "nobody" } }))
            .expect("valid ServiceAccount");
    let accounts: Api<ServiceAccount> = ns.api();
    accounts
        .create(&PostParams::default(), &account)
        .await
        .expect("creating the ServiceAccount");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let token = accounts
        .create_token_request("nobody", &PostParams::default(), &request)
        .await
        .expect("requesting a token")
        .status
        .expect("token request status")
        .token;
    let as_nobody: Api<Pod> = Api::namespaced(ns.cluster().client_with_token(&token), ns.name());
    match as_nobody.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("listing pods without rights should be refused with 403, got {other:?}"),
    }
}

#[tokio::test]
async fn a_service_reaches_a_process_pod_through_the_api_server_proxy() {
    let ns = namespace("service-proxy").await;
    let cluster = ns.cluster();
    // A throw-away "image": a directory with a page, served by python3's http.server.
    let image = format!("registry.example/e2e-web:{}", ns.name());
    let site = cluster.dir().join("e2e-sites").join(ns.name());
    std::fs::create_dir_all(&site).expect("creating the site directory");
    let page = format!("served from {}", ns.name());
    std::fs::write(site.join("index.html"), &page).expect("writing index.html");
    cluster
        .register_image(&image, &site, None, Some(&["python3", "-m", "http.server"]))
        .await;

    let web: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [{
                    "name": "web",
                    "image": image,
                    "args": ["--bind", "$(POD_IP)", "8080"],
                    "ports": [{ "name": "http", "containerPort": 8080 }],
                    "readinessProbe": { "tcpSocket": { "port": "http" } }
                }] }
            }
        }
    }))
    .expect("valid Deployment");
    let service: Service = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": { "selector": { "app": "web" }, "ports": [{ "name": "http", "port": 80, "targetPort": "http" }] }
    }))
    .expect("valid Service");
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(&PostParams::default(), &web)
        .await
        .expect("creating the Deployment");
    ns.api::<Service>()
        .create(&PostParams::default(), &service)
        .await
        .expect("creating the Service");
    deployment_available(&deployments, "web", TIMEOUT).await;

    // The endpoints controller publishes the ready pod shortly after; poll the proxy.
    let client = cluster.client();
    let path = format!(
        "/api/v1/namespaces/{}/services/web:http/proxy/index.html",
        ns.name()
    );
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let body = loop {
        let request = http::Request::get(&path).body(Vec::new()).expect("request");
        match client.request_text(request).await {
            Ok(body) => break body,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "service proxy not ready yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("GET {path} kept failing: {e}"),
        }
    };
    assert_eq!(body, page);
}

#[tokio::test]
async fn a_control_plane_that_cannot_start_names_the_component_and_shows_its_log() {
    let dir = std::env::temp_dir().join(format!("schemagate-e2e-bogus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    let bogus = dir.join("k8s");
    std::fs::write(
        &bogus,
        "#!/bin/sh\necho \"bogus control plane refuses to run $1\" >&2\nexit 1\n",
    )
    .expect("writing the bogus binary");
    std::fs::set_permissions(&bogus, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("making it executable");
    let mut options = ClusterOptions::new(dir.join("cluster"));
    options.k8s_bin = Some(bogus);
    options.databases = schemagate_testenv::cluster::Databases::NONE;
    let error: StartError = Cluster::start(options)
        .await
        .err()
        .expect("a bogus binary cannot start a cluster");
    assert_eq!(error.component, "etcd");
    assert!(
        error
            .log_tail
            .contains("bogus control plane refuses to run etcd"),
        "{error}"
    );
    assert!(
        error.to_string().contains("etcd failed to start"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_api_server_port_already_taken_fails_the_start_with_the_api_server_log() {
    let dir = std::env::temp_dir().join(format!("schemagate-e2e-port-{}", std::process::id()));
    let port = free_port().expect("a free port");
    let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).expect("taking the port");
    let mut options = ClusterOptions::new(&dir);
    options.databases = schemagate_testenv::cluster::Databases::NONE;
    options.apiserver_port = Some(port);
    let error: StartError = Cluster::start(options)
        .await
        .err()
        .expect("the API server cannot bind a taken port");
    assert_eq!(error.component, "kube-apiserver", "{error}");
    assert!(error.log_tail.contains("address already in use"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}
