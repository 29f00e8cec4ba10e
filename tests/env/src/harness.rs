//! The e2e harness: one local cluster per test binary, a fresh namespace per test, and
//! waits built on watches.
//!
//! [`cluster`] starts `schemagate-cluster up --exit-on-stdin-eof` once and keeps its stdin
//! pipe open in a static. Statics are never dropped: when the test binary exits, the pipe
//! closes and the supervisor tears the cluster down. Tests may run in parallel against it.
//! Each test's tokio runtime is its own, so [`TestCluster::client`] builds a new client on
//! every call rather than sharing one bound to another runtime.

#![allow(
    clippy::panic,
    clippy::expect_used,
    reason = "test harness: a failed step fails the test"
)]

use std::fmt::Debug;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Pod, ServiceAccount};
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use serde::de::DeserializeOwned;

use crate::cluster::{IMAGES_NAMESPACE, log_tail};
use crate::node::ImageEntry;

/// Label on every namespace the harness creates.
pub const E2E_LABEL: &str = "schemagate.dev/e2e";
/// First start may build the control plane from source.
const BUILD_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// Once the binary is there, the cluster must be ready within this.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const FIELD_MANAGER: &str = "schemagate-e2e";

/// The shared local cluster.
pub struct TestCluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    config: kube::Config,
    k8s_bin: PathBuf,
    /// PostgreSQL admin URL.
    pub postgres: String,
    /// MariaDB admin URL (`mysql://`).
    pub mariadb: String,
    /// With Argo CD ([`cluster_with_argocd`]): the Git server's base URL
    /// (`git://127.0.0.1:PORT/`) and the directory of its bare repositories.
    pub argocd_git: Option<(String, PathBuf)>,
    /// Held open for the life of the process: EOF tells the supervisor to stop.
    _supervisor: Mutex<(Child, ChildStdin)>,
}

static CLUSTER: OnceLock<Result<TestCluster, String>> = OnceLock::new();

/// The cluster of this test binary, started on first use. Fails the test with the
/// supervisor's log tail if it cannot start.
pub async fn cluster() -> &'static TestCluster {
    cluster_of(false).await
}

/// The cluster of this test binary with Argo CD beside it (`schemagate-cluster up
/// --argocd`). Every test of a binary that needs Argo CD calls this before anything else,
/// so that whichever test comes first starts it.
pub async fn cluster_with_argocd() -> &'static TestCluster {
    let cluster = cluster_of(true).await;
    assert!(
        cluster.argocd_git.is_some(),
        "this test binary's cluster was started without Argo CD: call cluster_with_argocd() first in every test of the binary"
    );
    cluster
}

async fn cluster_of(argocd: bool) -> &'static TestCluster {
    let result = tokio::task::spawn_blocking(move || CLUSTER.get_or_init(|| start_cluster(argocd)))
        .await
        .expect("cluster start-up task panicked");
    match result {
        Ok(cluster) => cluster,
        Err(message) => panic!("the local control plane did not start:\n{message}"),
    }
}

/// The `schemagate-cluster` binary: `SCHEMAGATE_CLUSTER_BIN`, else next to the test
/// executable's directory (`target/<profile>/deps/..`), where `cargo build -p
/// schemagate-testenv` (or `cargo test --workspace`) puts it.
fn supervisor_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("SCHEMAGATE_CLUSTER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating the test executable: {e}"))?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join("schemagate-cluster"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| format!("schemagate-cluster not found at {candidates:?}; build it with `cargo build -p schemagate-testenv --bins` or set SCHEMAGATE_CLUSTER_BIN"))
}

fn start_cluster(argocd: bool) -> Result<TestCluster, String> {
    let binary = supervisor_binary()?;
    let base = binary
        .parent()
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
        .join("e2e-clusters");
    prune_old_runs(&base);
    let dir = base.join(format!("{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let log_path = dir.join("supervisor.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
    let started = Instant::now();
    let mut child = Command::new(&binary)
        .args(["up", "--exit-on-stdin-eof", "--clean-up", "--dir"])
        .arg(&dir)
        .args(argocd.then_some("--argocd"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", binary.display()))?;
    let stdin = child.stdin.take().ok_or("no stdin pipe")?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;

    // Reads the supervisor's stdout for the life of the process, so it never blocks on a
    // full pipe; the protocol lines go to the channel.
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    let fail = |what: String| {
        format!(
            "{what}\n--- {} ---\n{}",
            log_path.display(),
            log_tail(&log_path)
        )
    };
    let mut deadline = started + BUILD_TIMEOUT;
    let mut k8s_bin = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok(line) if line == "ready" => break,
            Ok(line) => {
                if let Some(path) = line.strip_prefix("control-plane-binary ") {
                    k8s_bin = Some(PathBuf::from(path));
                    deadline = Instant::now() + START_TIMEOUT;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                return Err(fail(format!(
                    "schemagate-cluster not ready after {:?}",
                    started.elapsed()
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(fail(format!(
                    "schemagate-cluster exited ({status}) before it was ready"
                )));
            }
        }
    }
    eprintln!(
        "e2e: local cluster ready in {:.1}s ({})",
        started.elapsed().as_secs_f64(),
        dir.display()
    );

    let env = std::fs::read_to_string(dir.join("cluster.env"))
        .map_err(|e| fail(format!("reading cluster.env: {e}")))?;
    let var = |name: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("export {name}=")))
            .map(|v| v.trim_matches('\'').to_owned())
            .unwrap_or_default()
    };
    let kubeconfig = dir.join("kubeconfig");
    let config =
        load_config(&kubeconfig).map_err(|e| fail(format!("loading kubeconfig: {e:#}")))?;
    Ok(TestCluster {
        k8s_bin: k8s_bin.unwrap_or_else(|| PathBuf::from(var("K8S_BIN"))),
        postgres: var("POSTGRES_ADMIN_URL"),
        mariadb: var("MARIADB_ADMIN_URL"),
        argocd_git: argocd.then(|| (var("ARGOCD_GIT_URL"), PathBuf::from(var("ARGOCD_GIT_ROOT")))),
        dir,
        kubeconfig,
        config,
        _supervisor: Mutex::new((child, stdin)),
    })
}

/// Removes logs of earlier runs after a day.
fn prune_old_runs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    let day = Duration::from_secs(24 * 3600);
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| SystemTime::now().duration_since(m).ok())
            .is_some_and(|age| age > day);
        if old {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn load_config(kubeconfig: &Path) -> anyhow::Result<kube::Config> {
    let text = std::fs::read_to_string(kubeconfig)?;
    config_from_yaml(&text)
}

fn config_from_yaml(text: &str) -> anyhow::Result<kube::Config> {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(text)?;
    // Loading an inline kubeconfig does no I/O, so no runtime is needed.
    let config = futures::executor::block_on(kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    ))?;
    Ok(config)
}

impl TestCluster {
    /// An admin client bound to the calling test's runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config.clone()).expect("building the admin client")
    }

    /// A client that authenticates with a bearer token (e.g. from the TokenRequest API).
    pub fn client_with_token(&self, token: &str) -> kube::Client {
        let yaml = self.token_kubeconfig(token);
        let config = config_from_yaml(&yaml).expect("building a token kubeconfig");
        kube::Client::try_from(config).expect("building the token client")
    }

    /// A kubeconfig (YAML) for this cluster that authenticates with a bearer token.
    pub fn token_kubeconfig(&self, token: &str) -> String {
        let ca =
            std::fs::read_to_string(self.dir.join("pki/ca.crt")).expect("reading the cluster CA");
        crate::pki::kubeconfig(
            &self.api_url(),
            &ca,
            "token-user",
            crate::pki::Credentials::Token(token),
        )
    }

    pub fn api_url(&self) -> String {
        self.config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned()
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The supervisor's working directory (logs under `logs/`, pod output under `node/pods/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The multi-call control-plane binary (`k8s kubectl ...`).
    pub fn k8s_bin(&self) -> &Path {
        &self.k8s_bin
    }

    /// Runs `kubectl` against the cluster.
    pub async fn kubectl<I, S>(&self, args: I) -> std::process::Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        tokio::process::Command::new(&self.k8s_bin)
            .arg("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("running kubectl")
    }

    /// Registers (or replaces) an image-map entry: pods using `image` run as local
    /// processes in `dir`, with `path_prefix` before PATH and `entrypoint` when the
    /// container has no command.
    pub async fn register_image(
        &self,
        image: &str,
        dir: &Path,
        path_prefix: Option<&str>,
        entrypoint: Option<&[&str]>,
    ) {
        let entry = ImageEntry {
            image: image.to_owned(),
            dir: dir.to_path_buf(),
            path_prefix: path_prefix.map(str::to_owned),
            entrypoint: entrypoint.map(|e| e.iter().map(|s| (*s).to_owned()).collect()),
            oci: None,
        };
        self.register(&entry).await;
    }

    /// Registers (or replaces) an image-map entry whose pods run inside the image of an OCI
    /// layout: `reference` is `LAYOUT_DIR:TAG` (docs/testing.md, "Images from OCI layouts").
    pub async fn register_oci_image(&self, image: &str, reference: &str) {
        self.register(&ImageEntry::oci(image, reference)).await;
    }

    async fn register(&self, entry: &ImageEntry) {
        let image = &entry.image;
        let config_map = entry.to_config_map().expect("building the image map entry");
        let name = config_map
            .metadata
            .name
            .clone()
            .expect("image map entries are named");
        let api: Api<ConfigMap> = Api::namespaced(self.client(), IMAGES_NAMESPACE);
        let mut config_map =
            serde_json::to_value(&config_map).expect("serializing the image map entry");
        config_map["apiVersion"] = "v1".into();
        config_map["kind"] = "ConfigMap".into();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&config_map),
        )
        .await
        .unwrap_or_else(|e| panic!("registering image {image}: {e}"));
    }
}

/// A namespace for one test; deleted when the test passes, kept and dumped when it fails.
pub struct TestNamespace {
    name: String,
    cluster: &'static TestCluster,
}

/// Creates `e2e-<test_name>-<random>` labelled `schemagate.dev/e2e=true` and waits for its
/// `default` ServiceAccount.
pub async fn namespace(test_name: &str) -> TestNamespace {
    let cluster = cluster().await;
    let readable = crate::node::images::dns_label(test_name, 45);
    let suffix: String = (0..6)
        .map(|_| fastrand::alphanumeric().to_ascii_lowercase())
        .collect();
    let name = format!("e2e-{}-{suffix}", readable);
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some([(E2E_LABEL.to_owned(), "true".to_owned())].into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let client = cluster.client();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    let accounts: Api<ServiceAccount> = Api::namespaced(client, &name);
    wait_for(
        &accounts,
        "default",
        Duration::from_secs(30),
        "the default ServiceAccount exists",
        |_| true,
    )
    .await;
    TestNamespace { name, cluster }
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An API for a namespaced kind in this namespace (admin client).
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.cluster.client(), &self.name)
    }

    pub fn cluster(&self) -> &'static TestCluster {
        self.cluster
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let name = self.name.clone();
        let cluster = self.cluster;
        block_on_own_runtime(async move {
            if failed {
                eprintln!("{}", dump_namespace(cluster, &name).await);
                eprintln!("e2e: kept namespace {name} of the failed test");
            } else {
                let api: Api<Namespace> = Api::all(cluster.client());
                if let Err(e) = api.delete(&name, &DeleteParams::default()).await {
                    eprintln!("e2e: deleting namespace {name}: {e}");
                }
            }
        });
    }
}

/// Runs `work` to completion on a thread with a runtime of its own, for `Drop`: it cannot
/// await, and may run inside a test's runtime, which it would block.
pub fn block_on_own_runtime<F>(work: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let thread = std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(work);
        }
    });
    let _ = thread.join();
}

/// Pods (phase, conditions, container states, output tails) and events of a namespace.
pub async fn dump_namespace(cluster: &TestCluster, namespace: &str) -> String {
    use std::fmt::Write as _;
    let client = cluster.client();
    let mut out = format!("===== e2e dump of namespace {namespace} =====\n");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match pods.list(&ListParams::default()).await {
        Ok(list) => {
            for pod in list.items {
                let name = pod.metadata.name.clone().unwrap_or_default();
                let status = pod.status.clone().unwrap_or_default();
                let _ = writeln!(
                    out,
                    "pod {name}: phase={} node={} ip={} deleting={}",
                    status.phase.as_deref().unwrap_or("?"),
                    pod.spec
                        .as_ref()
                        .and_then(|s| s.node_name.as_deref())
                        .unwrap_or("-"),
                    status.pod_ip.as_deref().unwrap_or("-"),
                    pod.metadata.deletion_timestamp.is_some(),
                );
                for c in status.conditions.iter().flatten() {
                    let _ = writeln!(
                        out,
                        "  condition {}={} {}",
                        c.type_,
                        c.status,
                        c.reason.as_deref().unwrap_or("")
                    );
                }
                for c in status
                    .init_container_statuses
                    .iter()
                    .flatten()
                    .chain(status.container_statuses.iter().flatten())
                {
                    let state = serde_json::to_string(&c.state).unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  container {} ready={} state={state}",
                        c.name, c.ready
                    );
                }
                let uid8: String = pod
                    .metadata
                    .uid
                    .as_deref()
                    .unwrap_or_default()
                    .chars()
                    .take(8)
                    .collect();
                let pod_dir = cluster
                    .dir
                    .join("node/pods")
                    .join(format!("{namespace}_{name}_{uid8}"));
                if let Ok(containers) = std::fs::read_dir(&pod_dir) {
                    for container in containers.flatten() {
                        let log = container.path().join("output.log");
                        if log.is_file() {
                            let _ =
                                writeln!(out, "  --- {} ---\n{}", log.display(), log_tail(&log));
                        }
                    }
                }
            }
        }
        Err(e) => {
            let _ = writeln!(out, "listing pods: {e}");
        }
    }
    let events: Api<Event> = Api::namespaced(client, namespace);
    match events.list(&ListParams::default()).await {
        Ok(list) => {
            let mut items = list.items;
            items.sort_by_key(|e| e.metadata.creation_timestamp.clone());
            for e in items {
                let _ = writeln!(
                    out,
                    "event {} {} {}/{}: {}",
                    e.type_.as_deref().unwrap_or(""),
                    e.reason.as_deref().unwrap_or(""),
                    e.involved_object.kind.as_deref().unwrap_or(""),
                    e.involved_object.name.as_deref().unwrap_or(""),
                    e.message.as_deref().unwrap_or("")
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "listing events: {e}");
        }
    }
    out
}

/// Waits (on a watch) until `condition` holds for the named object; fails the test after
/// `timeout` with `description` and the object's last status.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    description: &str,
    condition: impl Fn(&K) -> bool,
) -> K
where
    K: Resource + Clone + Debug + DeserializeOwned + serde::Serialize + Send + 'static,
{
    let matches = move |object: Option<&K>| object.is_some_and(&condition);
    match tokio::time::timeout(timeout, await_condition(api.clone(), name, matches)).await {
        Ok(Ok(Some(object))) => object,
        Ok(Ok(None)) => panic!("{name}: the watch ended without the object ({description})"),
        Ok(Err(e)) => panic!("{name}: watching for `{description}` failed: {e}"),
        Err(_) => {
            let last = match api.get_opt(name).await {
                Ok(Some(object)) => {
                    let value = serde_json::to_value(&object).unwrap_or_default();
                    serde_json::to_string_pretty(value.get("status").unwrap_or(&value))
                        .unwrap_or_default()
                }
                Ok(None) => "object does not exist".to_owned(),
                Err(e) => format!("reading it failed: {e}"),
            };
            panic!("{name}: not `{description}` within {timeout:?}; last status:\n{last}")
        }
    }
}

/// The Deployment's current generation is rolled out and Available.
pub fn deployment_is_available(deployment: &Deployment) -> bool {
    let generation = deployment.metadata.generation.unwrap_or_default();
    let replicas = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let Some(status) = &deployment.status else {
        return false;
    };
    let available = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Available" && c.status == "True");
    available
        && status.observed_generation.unwrap_or_default() >= generation
        && status.updated_replicas.unwrap_or_default() == replicas
        && status.available_replicas.unwrap_or_default() == replicas
        && status.replicas.unwrap_or_default() == replicas
}

/// Waits until the Deployment's current generation is rolled out and Available.
pub async fn deployment_available(
    api: &Api<Deployment>,
    name: &str,
    timeout: Duration,
) -> Deployment {
    wait_for(
        api,
        name,
        timeout,
        "rolled out and Available",
        deployment_is_available,
    )
    .await
}

fn job_condition(job: &Job, kind: &str) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

/// Waits until the Job is Complete; fails the test at once if it fails instead.
pub async fn job_complete(api: &Api<Job>, name: &str, timeout: Duration) -> Job {
    let job = wait_for(api, name, timeout, "Complete or Failed", |j| {
        job_condition(j, "Complete") || job_condition(j, "Failed")
    })
    .await;
    assert!(
        job_condition(&job, "Complete"),
        "job {name} failed: {:?}",
        job.status
    );
    job
}

/// Waits until the Job has Failed; fails the test at once if it completes instead.
pub async fn job_failed(api: &Api<Job>, name: &str, timeout: Duration) -> Job {
    let job = wait_for(api, name, timeout, "Failed or Complete", |j| {
        job_condition(j, "Complete") || job_condition(j, "Failed")
    })
    .await;
    assert!(
        job_condition(&job, "Failed"),
        "job {name} completed, expected it to fail: {:?}",
        job.status
    );
    job
}

/// The pods a Job created.
pub async fn job_pods(api: &Api<Pod>, job: &str) -> Vec<Pod> {
    api.list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
        .await
        .unwrap_or_else(|e| panic!("listing pods of job {job}: {e}"))
        .items
}
