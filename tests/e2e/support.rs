//! What the operator and gate tests share: the CRD installed, an operator started in the
//! test's own runtime and scoped to its namespace, throw-away databases, the example images.

use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{conditions, wait::await_condition};
use schemagate::certs::CertNames;
use schemagate::controller::ControllerConfig;
use schemagate::run::{CertificateSource, RunConfig, WebhookSettings};
use schemagate_crds::DatabaseMigration;
use schemagate_crds::REVISION_ANNOTATION;
use schemagate_testenv::harness::{TestCluster, TestNamespace};
use schemagate_testenv::harness::{deployment_available, wait_for};
use sqlx::Connection;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::oneshot;

/// The app image of the incident: its directory holds the Alembic project and server.py.
pub const APP_V1: &str = "registry.example/admin-dashboard:v1";
pub const APP_V2: &str = "registry.example/admin-dashboard:v2";
/// An image whose migration 0002 runs invalid SQL.
pub const BROKEN_V2: &str = "registry.example/admin-dashboard:v2-broken";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn app_dir() -> PathBuf {
    repo_root().join("examples/incident/app")
}

/// Installs the CRD (server-side apply: any test may call it, at once) and the example
/// images, and waits until the CRD is established.
pub async fn prepare(cluster: &TestCluster) {
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.client());
    let crd = schemagate_crds::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("schemagate-e2e").force(),
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
    for image in [APP_V1, APP_V2] {
        cluster.register_image(image, &app_dir(), None, None).await;
    }
    cluster
        .register_image(
            BROKEN_V2,
            &repo_root().join("examples/incident/broken-migration"),
            None,
            None,
        )
        .await;
}

/// Everything the operator logs in this test binary, to prove what it never logs.
pub fn operator_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = LogWriter(buffer.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,schemagate=debug"))
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        buffer
    })
    .clone()
}

#[derive(Clone)]
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut log) = self.0.lock() {
            log.extend_from_slice(bytes);
        }
        let _ = std::io::stderr().write_all(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl OperatorOptions {
    /// The webhook and the controllers, without leader election.
    pub fn webhook() -> Self {
        Self {
            webhook: true,
            ..Default::default()
        }
    }

    /// The controllers alone: the backstop holds Deployments.
    pub fn backstop_only() -> Self {
        Self::default()
    }
}

/// An operator running in the test's runtime, watching only the test's namespace.
pub struct Operator {
    /// Where /metrics, /healthz and /readyz are served.
    pub metrics_addr: std::net::SocketAddr,
    /// The webhook's port on loopback, when it serves one.
    pub webhook_port: Option<u16>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    webhook_config: Option<String>,
    client: kube::Client,
    cluster: &'static TestCluster,
}

#[derive(Default)]
pub struct OperatorOptions {
    pub webhook: bool,
    /// Run the controllers only while holding this Lease.
    pub leader_election: Option<schemagate::run::LeaderElection>,
}

impl Operator {
    pub async fn start(namespace: &TestNamespace, options: OperatorOptions) -> Operator {
        Self::start_with(namespace, options, true).await
    }

    /// An operator serving its webhook while its MutatingWebhookConfiguration does not
    /// exist ([`install_webhook_config`] adds it later).
    pub async fn start_without_webhook_configuration(namespace: &TestNamespace) -> Operator {
        Self::start_with(namespace, OperatorOptions::webhook(), false).await
    }

    async fn start_with(
        namespace: &TestNamespace,
        options: OperatorOptions,
        install_config: bool,
    ) -> Operator {
        operator_log();
        let cluster = namespace.cluster();
        prepare(cluster).await;
        let client = operator_client(namespace).await;
        let ns = namespace.name().to_string();
        let mut webhook = None;
        let mut webhook_config = None;
        let mut webhook_port = None;
        if options.webhook {
            let port = schemagate_testenv::cluster::free_port().expect("a free port");
            webhook_port = Some(port);
            let name = chart_fullname(&ns);
            if install_config {
                install_webhook_config(&cluster.client(), &ns, port).await;
            }
            webhook = Some(WebhookSettings {
                addr: format!("127.0.0.1:{port}").parse().expect("address"),
                certificate: CertificateSource::Managed {
                    namespace: ns.clone(),
                    secret: format!("{}-webhook-cert", chart_fullname(&ns)),
                    names: CertNames::for_service(
                        "schemagate",
                        &ns,
                        vec!["127.0.0.1".parse().expect("ip")],
                    ),
                },
                config_name: Some(name.clone()),
            });
            webhook_config = Some(name);
        }
        let metrics_addr: std::net::SocketAddr = format!(
            "127.0.0.1:{}",
            schemagate_testenv::cluster::free_port().expect("a free port")
        )
        .parse()
        .expect("address");
        let config = RunConfig {
            controller: ControllerConfig {
                namespace: Some(ns),
                concurrency: 16,
                revision_poll_interval: schemagate::migration::watch::DEFAULT_POLL,
            },
            leader_election: options.leader_election.clone(),
            metrics_addr: Some(metrics_addr),
            webhook,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let run_client = client.clone();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(error) = schemagate::run::run(run_client, config, shutdown).await {
                panic!("operator failed: {error}");
            }
        });
        let operator = Operator {
            metrics_addr,
            webhook_port,
            stop: Some(stop),
            task: Some(task),
            webhook_config,
            client,
            cluster,
        };
        if install_config {
            if let Some(name) = &operator.webhook_config {
                operator.await_ca_bundle(name).await;
            }
            operator.await_ready(namespace).await;
        }
        operator
    }

    /// The value of one metric (no labels) from the operator's /metrics, if it is there.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_at(self.metrics_addr, name).await
    }

    /// Waits until the operator has patched its CA bundle into the configuration and the
    /// webhook answers.
    pub async fn await_ca_bundle(&self, name: &str) {
        await_ca_bundle(&self.client, name).await;
    }

    /// Waits until the operator has listed the namespace's DatabaseMigrations: a dry-run
    /// create of an opted-in Deployment passes the webhook only then.
    async fn await_ready(&self, namespace: &TestNamespace) {
        if self.webhook_config.is_none() {
            return;
        }
        let probe: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "readiness-probe", "labels": {"schemagate.dev/migration": "none"}},
            "spec": {"selector": {"matchLabels": {"app": "probe"}}, "template": {"metadata": {"labels": {"app": "probe"}}, "spec": {"containers": [{"name": "c", "image": "none"}]}}}
        }))
        .expect("probe Deployment");
        let api: Api<k8s_openapi::api::apps::v1::Deployment> = namespace.api();
        let params = kube::api::PostParams {
            dry_run: true,
            ..Default::default()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match api.create(&params, &probe).await {
                Ok(_) => return,
                Err(error) if tokio::time::Instant::now() > deadline => {
                    panic!("webhook not serving: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Stops the operator and waits until it has stopped.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), task).await;
        }
        if let Some(name) = self.webhook_config.take() {
            // The admin's client: the chart's RBAC does not let the operator delete it.
            let api: Api<MutatingWebhookConfiguration> = Api::all(self.cluster.client());
            let _ = api.delete(&name, &DeleteParams::default()).await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Some(name) = self.webhook_config.take() {
            // A client of its own: the test's runtime, which the operator's client is bound
            // to, is blocked in this drop.
            let cluster = self.cluster;
            // Best effort: a leftover configuration only matches its own namespace.
            schemagate_testenv::harness::block_on_own_runtime(async move {
                let api: Api<MutatingWebhookConfiguration> = Api::all(cluster.client());
                let _ = api.delete(&name, &DeleteParams::default()).await;
            });
        }
    }
}

/// The text of the /metrics at `addr`.
pub async fn metrics_text(addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    Some(text)
}

/// The value of one series (`name` or `name{labels}`) from the /metrics at `addr`.
pub async fn metric_at(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    let text = metrics_text(addr).await?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{series} ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until the webhook configuration `name` has a CA bundle in every webhook.
pub async fn await_ca_bundle(client: &kube::Client, name: &str) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(
            api,
            name,
            |config: Option<&MutatingWebhookConfiguration>| {
                config.is_some_and(|c| {
                    c.webhooks.iter().flatten().all(|w| {
                        w.client_config
                            .ca_bundle
                            .as_ref()
                            .is_some_and(|b| !b.0.is_empty())
                    })
                })
            },
        ),
    )
    .await
    .expect("CA bundle patched in time")
    .expect("watching the webhook configuration");
}

/// `tests/helm/build.sh`: Helm 3 from the Go module proxy, cached.
pub async fn helm_bin() -> String {
    helm_bin_of(3).await
}

/// Helm of that major version (3 or 4), built from the Go module proxy and cached.
pub async fn helm_bin_of(major: u8) -> String {
    let output = tokio::process::Command::new(repo_root().join("tests/helm/build.sh"))
        .arg(major.to_string())
        .output()
        .await
        .expect("running tests/helm/build.sh");
    assert!(
        output.status.success(),
        "helm build failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// The chart's name for everything of the operator of namespace `ns`: the chart is
/// rendered with `fullnameOverride` set to it and `watchNamespace` set to `ns`.
pub fn chart_fullname(ns: &str) -> String {
    format!("schemagate-{ns}")
}

/// The chart rendered for the operator of one test namespace, as `helm template` gives it.
async fn rendered_chart(ns: &str) -> Vec<serde_json::Value> {
    rendered_chart_with(ns, &[]).await
}

/// [`rendered_chart`] with more `--set` values.
pub async fn rendered_chart_with(ns: &str, values: &[&str]) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    let mut command = tokio::process::Command::new(helm_bin().await);
    command
        .arg("template")
        .arg("schemagate")
        .arg(repo_root().join("charts/schemagate"))
        .args(["--namespace", ns, "--kube-version", "v1.35.4"])
        .args(["--set", &format!("watchNamespace={ns}")])
        .args(["--set", &format!("fullnameOverride={}", chart_fullname(ns))]);
    for value in values {
        command.args(["--set", value]);
    }
    let output = command.output().await.expect("running helm template");
    assert!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("helm output is text");
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| serde_json::Value::deserialize(document).expect("a YAML document"))
        .filter(|value| !value.is_null())
        .collect()
}

/// Server-side applies one rendered object with the admin's client.
async fn apply_object(admin: &kube::Client, object: &serde_json::Value) {
    use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
        Some(namespace) => Api::namespaced_with(admin.clone(), namespace, &resource),
        None => Api::all_with(admin.clone(), &resource),
    };
    api.patch(
        name,
        &PatchParams::apply("schemagate-e2e").force(),
        &Patch::Apply(object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying the chart's {kind} {name}: {e}"));
}

/// A client for the chart's ServiceAccount with exactly the chart's RBAC, as in a real
/// installation (the webhook also tells the operator's changes from everyone else's by
/// this user name).
async fn operator_client(namespace: &TestNamespace) -> kube::Client {
    let token = operator_token(namespace).await;
    namespace.cluster().client_with_token(&token)
}

/// A kubeconfig file for the chart's ServiceAccount with exactly the chart's RBAC, for an
/// operator run as its own process.
pub async fn operator_kubeconfig(namespace: &TestNamespace) -> PathBuf {
    let token = operator_token(namespace).await;
    let cluster = namespace.cluster();
    let path = cluster
        .dir()
        .join(format!("{}-operator.kubeconfig", namespace.name()));
    std::fs::write(&path, cluster.token_kubeconfig(&token))
        .expect("writing the operator's kubeconfig");
    path
}

/// Applies the chart's RBAC for the namespace's operator and returns a token of its
/// ServiceAccount.
async fn operator_token(namespace: &TestNamespace) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let admin = namespace.cluster().client();
    let rbac_kinds = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    for object in rendered_chart(namespace.name()).await {
        if rbac_kinds.contains(&object["kind"].as_str().unwrap_or_default()) {
            apply_object(&admin, &object).await;
        }
    }
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    namespace
        .api::<ServiceAccount>()
        .create_token_request(
            &chart_fullname(namespace.name()),
            &Default::default(),
            &request,
        )
        .await
        .expect("operator token")
        .status
        .expect("token status")
        .token
}

/// The chart's webhook configuration, reaching the in-process operator by URL on loopback
/// instead of through the chart's Service (the chart test covers that path).
pub async fn install_webhook_config(client: &kube::Client, namespace: &str, port: u16) {
    let mut config = rendered_chart(namespace)
        .await
        .into_iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .expect("the chart renders a MutatingWebhookConfiguration");
    for webhook in config["webhooks"].as_array_mut().into_iter().flatten() {
        webhook["clientConfig"] =
            serde_json::json!({ "url": format!("https://127.0.0.1:{port}/mutate-deployments") });
    }
    apply_object(client, &config).await;
}

/// A new PostgreSQL database with its own user; returns its URL.
pub async fn create_postgres_database(cluster: &TestCluster, password: &str) -> String {
    let name = format!(
        "db_{}",
        (0..10).map(|_| fastrand::lowercase()).collect::<String>()
    );
    let mut admin = sqlx::PgConnection::connect(&cluster.postgres)
        .await
        .expect("admin connection");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE USER {name} PASSWORD '{password}'"
    )))
    .execute(&mut admin)
    .await
    .expect("create user");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE {name} OWNER {name}"
    )))
    .execute(&mut admin)
    .await
    .expect("create database");
    let port = cluster
        .postgres
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .expect("admin URL has a port")
        .to_string();
    format!("postgres://{name}:{password}@127.0.0.1:{port}/{name}")
}

/// Creates (or replaces) the Secret holding the database URL.
pub async fn url_secret(namespace: &TestNamespace, name: &str, key: &str, url: &str) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        string_data: Some([(key.to_string(), url.to_string())].into()),
        ..Default::default()
    };
    namespace
        .api::<Secret>()
        .patch(
            name,
            &PatchParams::apply("schemagate-e2e").force(),
            &Patch::Apply(&secret),
        )
        .await
        .expect("writing the URL Secret");
}

/// Runs `alembic` in the example project against `url`, as a person would by hand.
pub async fn alembic(url: &str, args: &[&str]) {
    let output = tokio::process::Command::new("alembic")
        .args(args)
        .current_dir(app_dir())
        .env("DATABASE_URL", url)
        .output()
        .await
        .expect("running alembic");
    assert!(
        output.status.success(),
        "alembic {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The revision Alembic recorded.
pub async fn alembic_version(url: &str) -> Option<String> {
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connecting");
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass('alembic_version')::text")
        .fetch_one(&mut connection)
        .await
        .expect("checking alembic_version");
    exists?;
    sqlx::query_scalar("SELECT version_num FROM alembic_version")
        .fetch_optional(&mut connection)
        .await
        .expect("reading alembic_version")
}

/// The columns of a table.
pub async fn columns(url: &str, table: &str) -> Vec<String> {
    let mut connection = sqlx::PgConnection::connect(url).await.expect("connecting");
    sqlx::query_scalar("SELECT column_name::text FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position")
        .bind(table)
        .fetch_all(&mut connection)
        .await
        .expect("reading columns")
}

/// A DatabaseMigration from YAML, in the namespace.
pub async fn apply_migration(namespace: &TestNamespace, yaml: &str) -> DatabaseMigration {
    let migration: DatabaseMigration = serde_yaml::from_str(yaml).expect("DatabaseMigration YAML");
    namespace
        .api::<DatabaseMigration>()
        .patch(
            &migration.name_any(),
            &PatchParams::apply("schemagate-e2e").force(),
            &Patch::Apply(&migration),
        )
        .await
        .expect("applying the DatabaseMigration")
}

/// The condition of that type, if set.
pub fn condition<'a>(
    migration: &'a DatabaseMigration,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    migration
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Whether condition `type_` has `status` with `reason`.
pub fn has_condition(
    migration: &DatabaseMigration,
    type_: &str,
    status: &str,
    reason: &str,
) -> bool {
    condition(migration, type_).is_some_and(|c| c.status == status && c.reason == reason)
}

/// Events about an object, newest last.
pub async fn events_for(
    namespace: &TestNamespace,
    name: &str,
) -> Vec<k8s_openapi::api::events::v1::Event> {
    let api: Api<k8s_openapi::api::events::v1::Event> = namespace.api();
    let mut events: Vec<_> = api
        .list(&Default::default())
        .await
        .expect("listing events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    events.sort_by_key(|e| e.metadata.creation_timestamp.clone());
    events
}

/// Server-side applies every document of a manifest file of the examples into the
/// namespace (Deployments, Services, Secrets, DatabaseMigrations), in file order.
pub async fn apply_manifest(namespace: &TestNamespace, relative: &str) {
    let path = repo_root().join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    apply_yaml(namespace, &text).await;
}

/// Server-side applies each document of `text` into the namespace.
pub async fn apply_yaml(namespace: &TestNamespace, text: &str) {
    use serde::Deserialize;
    let params = PatchParams::apply("schemagate-e2e").force();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_json::Value::deserialize(document).expect("YAML document");
        if value.is_null() {
            continue;
        }
        let kind = value["kind"].as_str().unwrap_or_default().to_string();
        let name = value["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let result = match kind.as_str() {
            "Deployment" => namespace
                .api::<k8s_openapi::api::apps::v1::Deployment>()
                .patch(&name, &params, &Patch::Apply(&value))
                .await
                .map(|_| ()),
            "Service" => namespace
                .api::<k8s_openapi::api::core::v1::Service>()
                .patch(&name, &params, &Patch::Apply(&value))
                .await
                .map(|_| ()),
            "Secret" => namespace
                .api::<Secret>()
                .patch(&name, &params, &Patch::Apply(&value))
                .await
                .map(|_| ()),
            "DatabaseMigration" => namespace
                .api::<DatabaseMigration>()
                .patch(&name, &params, &Patch::Apply(&value))
                .await
                .map(|_| ()),
            other => panic!("apply_yaml: no API for kind {other}"),
        };
        result.unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
    }
}

/// The path of the `schemagate` binary next to this test binary (built by `cargo test
/// --workspace` for the operator crate's own integration tests, or `make e2e`).
pub fn schemagate_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("schemagate"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p schemagate` first",
        bin.display()
    );
    bin
}

// ---------------------------------------------------------------------------------------
// The incident's release, shared by the gate tests and the gate benchmark

/// How long a release step may take.
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// The incident's Deployment.
pub const DEPLOYMENT: &str = "admin-dashboard";

/// What a watch on the namespace's pods saw while a release went on.
#[derive(Debug, Default)]
pub struct Timeline {
    /// What `alembic_version` held when the first pod of the new revision appeared.
    pub revision_at_first_new_pod: Option<Option<String>>,
    /// New-revision pods seen before the database held that revision.
    pub early_pods: usize,
    /// The fewest Ready old-revision pods at any moment before the first new pod.
    pub min_old_ready_before_new: Option<usize>,
}

/// Watches pods until told to stop: every pod of `new_revision` is checked against the
/// database at the moment it is first seen. Returns once the watch has listed the pods
/// that exist now, so the old version's Ready pods are counted for certain before
/// anything of the release is applied.
pub async fn watch_release(
    namespace: &TestNamespace,
    url: String,
    old_revision: &str,
    new_revision: &str,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<Timeline>) {
    let pods: Api<Pod> = namespace.api();
    let (stop, mut stopped) = oneshot::channel::<()>();
    let (listed_tx, listed_rx) = oneshot::channel::<()>();
    let mut listed_tx = Some(listed_tx);
    let old_revision = old_revision.to_string();
    let new_revision = new_revision.to_string();
    let task = tokio::spawn(async move {
        let mut timeline = Timeline::default();
        let mut seen_new: std::collections::HashSet<String> = Default::default();
        let mut old_ready: BTreeMap<String, bool> = BTreeMap::new();
        // Counted only once the initial list is complete: during it, pods arrive one by one.
        let mut listed = false;
        let stream = watcher::watcher(pods, watcher::Config::default());
        futures::pin_mut!(stream);
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = &mut stopped => break,
            };
            let Some(Ok(event)) = event else { continue };
            let pods = match event {
                Event::Apply(pod) | Event::InitApply(pod) => vec![(pod, false)],
                Event::Delete(pod) => vec![(pod, true)],
                Event::InitDone => {
                    listed = true;
                    if seen_new.is_empty() {
                        timeline.min_old_ready_before_new =
                            Some(old_ready.values().filter(|r| **r).count());
                    }
                    if let Some(tx) = listed_tx.take() {
                        let _ = tx.send(());
                    }
                    vec![]
                }
                Event::Init => vec![],
            };
            // Only the application's pods: migration Job pods carry the revision too.
            let pods = pods.into_iter().filter(|(pod, _)| {
                pod.labels()
                    .get("app.kubernetes.io/name")
                    .map(String::as_str)
                    == Some(DEPLOYMENT)
            });
            for (pod, deleted) in pods {
                let revision = pod.annotations().get(REVISION_ANNOTATION).cloned();
                if revision.as_deref() == Some(new_revision.as_str())
                    && !seen_new.contains(&pod.name_any())
                {
                    seen_new.insert(pod.name_any());
                    let in_database = alembic_version(&url).await;
                    if timeline.revision_at_first_new_pod.is_none() {
                        timeline.revision_at_first_new_pod = Some(in_database.clone());
                    }
                    if in_database.as_deref() != Some(new_revision.as_str()) {
                        timeline.early_pods += 1;
                    }
                } else if revision.as_deref() == Some(old_revision.as_str()) {
                    let ready = !deleted
                        && pod.metadata.deletion_timestamp.is_none()
                        && pod
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            });
                    old_ready.insert(pod.name_any(), ready);
                    if seen_new.is_empty() && listed {
                        let count = old_ready.values().filter(|r| **r).count();
                        timeline.min_old_ready_before_new = Some(
                            timeline
                                .min_old_ready_before_new
                                .map_or(count, |m| m.min(count)),
                        );
                    }
                }
            }
        }
        timeline
    });
    tokio::time::timeout(TIMEOUT, listed_rx)
        .await
        .expect("the pod watch listed the namespace in time")
        .expect("the pod watch ended before listing");
    (stop, task)
}

/// v1 serving: its migration to 0001 applied and two Ready pods.
pub async fn v1_serving(ns: &TestNamespace) -> String {
    prepare(ns.cluster()).await;
    let url = create_postgres_database(ns.cluster(), "pw-gate-1234").await;
    url_secret(ns, "app-db-url", "url", &url).await;
    apply_manifest(ns, "examples/incident/manifests/migration-v1.yaml").await;
    await_ready(ns).await;
    apply_manifest(ns, "examples/incident/manifests/app-v1.yaml").await;
    deployment_available(&ns.api(), DEPLOYMENT, TIMEOUT).await;
    assert_eq!(alembic_version(&url).await.as_deref(), Some("0001"));
    url
}

/// Applies v2 and its migration together, watches the release, and returns what was seen.
pub async fn release_v2(ns: &TestNamespace, url: &str) -> Timeline {
    let (stop, watch) = watch_release(ns, url.to_string(), "0001", "0002").await;
    apply_manifest(ns, "examples/incident/manifests/release-v2.yaml").await;
    deployment_available(&ns.api(), DEPLOYMENT, TIMEOUT).await;
    let _ = stop.send(());
    watch.await.unwrap()
}

/// Waits for an Event about `name` with this type and reason: Events are published after
/// the status they explain, so a test that saw the status polls for them briefly.
pub async fn await_event(
    namespace: &TestNamespace,
    name: &str,
    type_: &str,
    reason: &str,
) -> k8s_openapi::api::events::v1::Event {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let events = events_for(namespace, name).await;
        if let Some(event) = events
            .iter()
            .find(|e| e.type_.as_deref() == Some(type_) && e.reason.as_deref() == Some(reason))
        {
            return event.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {type_} Event {reason} about {name}; Events: {:?}",
            events
                .iter()
                .map(|e| (e.reason.clone(), e.note.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The password appears nowhere a user or another tool can read: any DatabaseMigration's
/// status, any Event, Job or pod of the namespace, the operator's log and metrics.
pub async fn assert_no_password(
    namespace: &TestNamespace,
    password: &str,
    operator: Option<&Operator>,
) {
    use k8s_openapi::api::batch::v1::Job;
    /// Every object of kind `K` in the namespace, as JSON.
    async fn listed<K>(namespace: &TestNamespace) -> String
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let list = namespace
            .api::<K>()
            .list(&Default::default())
            .await
            .expect("listing");
        serde_json::to_string(&list.items).expect("JSON")
    }
    let places = [
        (
            "DatabaseMigrations",
            listed::<DatabaseMigration>(namespace).await,
        ),
        (
            "Events",
            listed::<k8s_openapi::api::events::v1::Event>(namespace).await,
        ),
        ("Jobs", listed::<Job>(namespace).await),
        ("pods", listed::<Pod>(namespace).await),
    ];
    for (place, text) in places {
        assert!(!text.contains(password), "the password is in the {place}");
    }
    let log = String::from_utf8_lossy(&operator_log().lock().expect("log lock")).to_string();
    assert!(
        !log.contains(password),
        "the password is in the operator's log"
    );
    if let Some(operator) = operator {
        let metrics = metrics_text(operator.metrics_addr)
            .await
            .unwrap_or_default();
        assert!(
            !metrics.contains(password),
            "the password is in the metrics"
        );
    }
}

/// Stops a [`watch_release`] and returns what it saw.
pub async fn finish_watch(
    stop: oneshot::Sender<()>,
    watch: tokio::task::JoinHandle<Timeline>,
) -> Timeline {
    let _ = stop.send(());
    watch.await.expect("the pod watch")
}

/// The promise of the gate, as a user sees it: no pod of the new code before the database
/// held its revision, and the old version served with all its Ready pods until then.
pub fn assert_safe_release(timeline: &Timeline) {
    assert_eq!(
        timeline.early_pods, 0,
        "new pods before the revision: {timeline:?}"
    );
    assert_eq!(
        timeline.min_old_ready_before_new,
        Some(2),
        "the old version kept 2 Ready pods: {timeline:?}"
    );
}

/// Waits until DatabaseMigration `app-db` is Ready: the database reports its revision.
pub async fn await_ready(namespace: &TestNamespace) -> DatabaseMigration {
    await_app_db_condition(namespace, "Ready", "True", "RevisionApplied").await
}

/// Waits until DatabaseMigration `app-db` has condition `type_` with `status` and `reason`.
pub async fn await_app_db_condition(
    namespace: &TestNamespace,
    type_: &str,
    status: &str,
    reason: &str,
) -> DatabaseMigration {
    wait_for(
        &namespace.api::<DatabaseMigration>(),
        "app-db",
        TIMEOUT,
        &format!("{type_}={status} ({reason})"),
        |m| has_condition(m, type_, status, reason),
    )
    .await
}

/// A DatabaseMigration `app-db` on the namespace's database (Secret `app-db-url`), as YAML;
/// `extra` is appended to its spec (indented two spaces).
pub fn app_db_yaml(
    tracking: &str,
    image: &str,
    command: &str,
    revision: &str,
    extra: &str,
) -> String {
    format!(
        r#"
apiVersion: schemagate.dev/v1alpha1
kind: DatabaseMigration
metadata: {{ name: app-db }}
spec:
  database:
    engine: postgres
    urlSecretRef: {{ name: app-db-url, key: url }}
    tracking: {tracking}
  migrator:
    image: {image}
    command: {command}
  revision: "{revision}"
{extra}"#
    )
}
