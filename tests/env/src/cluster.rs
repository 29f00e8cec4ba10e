//! The local control plane: etcd, kube-apiserver and kube-controller-manager, each its own
//! process from the multi-call `k8s` binary, plus the in-process test node and, optionally,
//! PostgreSQL and MariaDB servers. See docs/testing.md.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

use crate::db::DatabaseServer;
use crate::node::{NodeConfig, TestNode};
use crate::pki::{self, Pki};

/// Namespace of the image map (see [`crate::node`]).
pub const IMAGES_NAMESPACE: &str = "schemagate-test-images";
/// Label that marks a ConfigMap in [`IMAGES_NAMESPACE`] as an image-map entry.
pub const IMAGE_LABEL: &str = "schemagate.dev/test-image";
/// Service ClusterIP range; the `kubernetes` Service gets its first address. Inside
/// 198.18.0.0/15 (RFC 2544, like the pod addresses) rather than a private range: nothing
/// routes ClusterIPs here, and no test may address a private network by mistake.
pub const SERVICE_CIDR: &str = "198.19.255.0/24";

/// Controllers the controller-manager runs. `node-lifecycle-controller` and
/// `taint-eviction-controller` are left out on purpose: without kubelet heartbeats they
/// would taint the test node and evict every pod after five minutes.
const CONTROLLERS: &[&str] = &[
    "clusterrole-aggregation-controller",
    "cronjob-controller",
    "daemonset-controller",
    "deployment-controller",
    "disruption-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "garbage-collector-controller",
    "horizontal-pod-autoscaler-controller",
    "job-controller",
    "namespace-controller",
    "pod-garbage-collector-controller",
    "replicaset-controller",
    "replicationcontroller-controller",
    "resourcequota-controller",
    "root-ca-certificate-publisher-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "service-cidr-controller",
    "statefulset-controller",
    "ttl-after-finished-controller",
    "ttl-controller",
    "validatingadmissionpolicy-status-controller",
];

const STOP_GRACE: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
pub use crate::logs::{LOG_TAIL_LINES, free_port, log_tail};

/// Which database servers a cluster starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Databases {
    pub postgres: bool,
    pub mariadb: bool,
}

impl Databases {
    pub const ALL: Databases = Databases {
        postgres: true,
        mariadb: true,
    };
    pub const NONE: Databases = Databases {
        postgres: false,
        mariadb: false,
    };
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Working directory: PKI, etcd data, logs, kubeconfig, node and database state.
    pub dir: PathBuf,
    /// The multi-call control-plane binary; `None` builds (or reuses) it with
    /// `tests/controlplane/build.sh`.
    pub k8s_bin: Option<PathBuf>,
    /// Which database servers to start beside the control plane.
    pub databases: Databases,
    /// Fixed API server port instead of a free one (tests use it to provoke a failure).
    pub apiserver_port: Option<u16>,
    /// How long each control-plane component may take to become ready.
    pub component_timeout: Duration,
}

impl ClusterOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            k8s_bin: None,
            databases: Databases::ALL,
            apiserver_port: None,
            component_timeout: Duration::from_secs(90),
        }
    }
}

/// A component that did not start: its name, why, and the end of its log.
#[derive(Debug)]
pub struct StartError {
    pub component: String,
    pub reason: String,
    pub log_path: Option<PathBuf>,
    pub log_tail: String,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed to start: {}", self.component, self.reason)?;
        if let Some(path) = &self.log_path {
            write!(
                f,
                "\n--- last {LOG_TAIL_LINES} lines of {} ---\n{}",
                path.display(),
                self.log_tail
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for StartError {}

impl StartError {
    fn new(component: &str, reason: impl Into<String>, log_path: Option<&Path>) -> Self {
        Self {
            component: component.to_owned(),
            reason: reason.into(),
            log_path: log_path.map(Path::to_path_buf),
            log_tail: log_path.map(log_tail).unwrap_or_default(),
        }
    }
}

/// One control-plane process.
struct Component {
    name: &'static str,
    child: Child,
    log_path: PathBuf,
}

/// A running local cluster. Call [`Cluster::stop`] to tear it down; dropping it kills the
/// control-plane processes without grace.
pub struct Cluster {
    dir: PathBuf,
    k8s_bin: PathBuf,
    apiserver_port: u16,
    kubeconfig: PathBuf,
    components: Vec<Component>,
    node: Option<TestNode>,
    postgres: Option<DatabaseServer>,
    mariadb: Option<DatabaseServer>,
    started_in: Duration,
    /// For [`Cluster::restart_apiserver`].
    apiserver_args: Vec<String>,
}

impl Cluster {
    /// Starts everything and returns once the API server is ready, the controller-manager
    /// works (the `default` ServiceAccount exists), the test node is registered and the
    /// databases accept connections. On failure, whatever was started is stopped again.
    pub async fn start(options: ClusterOptions) -> Result<Self, StartError> {
        let started = Instant::now();
        let dir =
            absolute(&options.dir).map_err(|e| StartError::new("setup", format!("{e:#}"), None))?;
        let k8s_bin = match &options.k8s_bin {
            Some(bin) => bin.clone(),
            None => build_control_plane()
                .await
                .map_err(|e| StartError::new("control-plane build", format!("{e:#}"), None))?,
        };
        let mut cluster = Self {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            k8s_bin,
            apiserver_port: 0,
            components: Vec::new(),
            node: None,
            postgres: None,
            mariadb: None,
            started_in: Duration::ZERO,
            apiserver_args: Vec::new(),
        };
        let databases = start_databases(cluster.dir.join("db"), options.databases);
        let (control_plane, databases) =
            tokio::join!(cluster.start_control_plane(&options), databases);
        let result = control_plane.and_then(|()| {
            let (postgres, mariadb) = databases?;
            cluster.postgres = postgres;
            cluster.mariadb = mariadb;
            Ok(())
        });
        match result {
            Ok(()) => {
                cluster.started_in = started.elapsed();
                Ok(cluster)
            }
            Err(error) => {
                cluster.stop().await;
                Err(error)
            }
        }
    }

    async fn start_control_plane(&mut self, options: &ClusterOptions) -> Result<(), StartError> {
        let setup = |e: anyhow::Error| StartError::new("setup", format!("{e:#}"), None);
        let dir = self.dir.clone();
        // Throw-away state from an earlier run in the same directory goes first.
        for sub in ["pki", "etcd", "logs", "node"] {
            remove_dir_if_exists(&dir.join(sub)).map_err(setup)?;
        }
        for file in ["ready", "kubeconfig", "cluster.env"] {
            let _ = std::fs::remove_file(dir.join(file));
        }
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("creating {}", dir.join("logs").display()))
            .map_err(setup)?;
        let pki = Pki::generate(&dir.join("pki")).map_err(setup)?;
        let ca_pem = std::fs::read_to_string(&pki.ca_cert)
            .context("reading CA")
            .map_err(setup)?;

        let etcd_port = free_port().map_err(setup)?;
        let etcd_peer_port = free_port().map_err(setup)?;
        self.apiserver_port = match options.apiserver_port {
            Some(port) => port,
            None => free_port().map_err(setup)?,
        };
        let controller_manager_port = free_port().map_err(setup)?;
        let deadline = options.component_timeout;

        // etcd
        let etcd_dir = dir.join("etcd");
        let etcd = self.spawn(
            "etcd",
            &[
                "--data-dir".into(),
                etcd_dir.display().to_string(),
                "--client-port".into(),
                etcd_port.to_string(),
                "--peer-port".into(),
                etcd_peer_port.to_string(),
            ],
        )?;
        self.wait_ready(etcd, deadline, || etcd_healthy(etcd_port))
            .await?;

        // kube-apiserver
        let server = format!("https://127.0.0.1:{}", self.apiserver_port);
        let p = |path: &Path| path.display().to_string();
        let apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.apiserver_port),
            format!("--tls-cert-file={}", p(&pki.serving_cert)),
            format!("--tls-private-key-file={}", p(&pki.serving_key)),
            format!("--client-ca-file={}", p(&pki.ca_cert)),
            "--authorization-mode=RBAC".into(),
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,ResourceQuota,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ValidatingAdmissionPolicy".into(),
            "--allow-privileged=true".into(),
            "--enable-aggregator-routing=true".into(),
            "--endpoint-reconciler-type=none".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p(&pki.service_account_pub)),
            format!("--service-account-signing-key-file={}", p(&pki.service_account_key)),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        let apiserver = self.spawn("kube-apiserver", &apiserver_args)?;
        self.apiserver_args = apiserver_args;

        let admin_kubeconfig = pki::kubeconfig(
            &server,
            &ca_pem,
            "schemagate-admin",
            pki::Credentials::ClientCertificate {
                cert_pem: &std::fs::read_to_string(&pki.admin_cert)
                    .context("reading admin cert")
                    .map_err(setup)?,
                key_pem: &std::fs::read_to_string(&pki.admin_key)
                    .context("reading admin key")
                    .map_err(setup)?,
            },
        );
        std::fs::write(&self.kubeconfig, &admin_kubeconfig)
            .with_context(|| format!("writing {}", self.kubeconfig.display()))
            .map_err(setup)?;
        let client = admin_client(&self.kubeconfig).await.map_err(setup)?;
        self.wait_ready(apiserver, deadline, || apiserver_ready(&client))
            .await?;

        // kube-controller-manager
        let kubeconfig = p(&self.kubeconfig);
        let controller_manager_args = vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            format!("--controllers={}", CONTROLLERS.join(",")),
            format!(
                "--service-account-private-key-file={}",
                p(&pki.service_account_key)
            ),
            format!("--root-ca-file={}", p(&pki.ca_cert)),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={controller_manager_port}"),
            "--profiling=false".into(),
            // Its client's default limit (20 requests per second) would make the
            // scale benchmark's thousands of Deployments wait minutes for their
            // ReplicaSets; a dedicated control plane on loopback can take more.
            "--kube-api-qps=200".into(),
            "--kube-api-burst=400".into(),
            "--v=1".into(),
        ];
        let controller_manager = self.spawn("kube-controller-manager", &controller_manager_args)?;
        // The serviceaccount controller creating `default/default` proves the
        // controller-manager is connected and running its controllers.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        self.wait_ready(controller_manager, deadline, || async {
            matches!(accounts.get_opt("default").await, Ok(Some(_)))
        })
        .await?;

        let namespaces: Api<Namespace> = Api::all(client.clone());
        let images = Namespace {
            metadata: ObjectMeta {
                name: Some(IMAGES_NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        match namespaces.create(&PostParams::default(), &images).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => {
                return Err(StartError::new(
                    "setup",
                    format!("creating namespace {IMAGES_NAMESPACE}: {e}"),
                    None,
                ));
            }
        }

        // The test node, in this process.
        let node = TestNode::start(NodeConfig {
            client,
            dir: dir.join("node"),
            apiserver_port: self.apiserver_port,
            ca_pem,
        })
        .await
        .map_err(|e| StartError::new("test node", format!("{e:#}"), None))?;
        self.node = Some(node);
        Ok(())
    }

    fn spawn(&mut self, name: &'static str, args: &[String]) -> Result<usize, StartError> {
        let log_path = self.dir.join("logs").join(format!("{name}.log"));
        // Appended: a restarted component's log follows its earlier run's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| {
                StartError::new(name, format!("creating {}: {e}", log_path.display()), None)
            })?;
        let log_err = log
            .try_clone()
            .map_err(|e| StartError::new(name, format!("duplicating log handle: {e}"), None))?;
        tracing::info!(component = name, log = %log_path.display(), "starting");
        let child = Command::new(&self.k8s_bin)
            .arg(name)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Own process group: a terminal's Ctrl-C reaches only the supervisor, which
            // then stops the components in order.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                StartError::new(
                    name,
                    format!("spawning {}: {e}", self.k8s_bin.display()),
                    Some(&log_path),
                )
            })?;
        self.components.push(Component {
            name,
            child,
            log_path,
        });
        Ok(self.components.len() - 1)
    }

    /// Polls `ready` until it holds, failing early if the process exits.
    async fn wait_ready<F, Fut>(
        &mut self,
        index: usize,
        timeout: Duration,
        ready: F,
    ) -> Result<(), StartError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        let started = Instant::now();
        loop {
            let component = &mut self.components[index];
            match component.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(StartError::new(
                        component.name,
                        format!("process exited with {status}"),
                        Some(&component.log_path),
                    ));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(StartError::new(
                        component.name,
                        format!("waiting for process: {e}"),
                        Some(&component.log_path),
                    ));
                }
            }
            // A probe must not hang on a port someone else holds: bound each attempt.
            if matches!(tokio::time::timeout(PROBE_TIMEOUT, ready()).await, Ok(true)) {
                tracing::info!(component = component.name, elapsed = ?started.elapsed(), "ready");
                return Ok(());
            }
            if Instant::now() > deadline {
                let component = &self.components[index];
                return Err(StartError::new(
                    component.name,
                    format!("not ready after {}s", timeout.as_secs()),
                    Some(&component.log_path),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the kube-apiserver (SIGKILL: no graceful end of watches or requests), keeps it
    /// down for `down`, and starts it again on the same port with the same etcd. Returns
    /// once it is ready again.
    pub async fn restart_apiserver(&mut self, down: Duration) -> Result<(), StartError> {
        let index = self
            .components
            .iter()
            .position(|c| c.name == "kube-apiserver")
            .ok_or_else(|| StartError::new("kube-apiserver", "not running", None))?;
        let mut old = self.components.remove(index);
        let _ = old.child.start_kill();
        let _ = old.child.wait().await;
        tokio::time::sleep(down).await;
        let args = self.apiserver_args.clone();
        let apiserver = self.spawn("kube-apiserver", &args)?;
        let client = admin_client(&self.kubeconfig)
            .await
            .map_err(|e| StartError::new("kube-apiserver", format!("{e:#}"), None))?;
        self.wait_ready(apiserver, Duration::from_secs(90), || {
            apiserver_ready(&client)
        })
        .await
    }

    /// The PostgreSQL server, to restart it.
    pub fn postgres_mut(&mut self) -> Option<&mut DatabaseServer> {
        self.postgres.as_mut()
    }

    /// Waits until a control-plane process exits on its own; returns its name and status.
    /// Pending forever if there are none.
    pub async fn component_exited(&mut self) -> (String, std::io::Result<ExitStatus>) {
        if self.components.is_empty() {
            return futures::future::pending().await;
        }
        let waits = self.components.iter_mut().map(|c| {
            let name = c.name;
            Box::pin(async move { (name.to_owned(), c.child.wait().await) })
        });
        let (result, _, _) = futures::future::select_all(waits).await;
        result
    }

    /// Writes `kubeconfig` (already there), `cluster.env` and the `ready` marker.
    pub fn write_env(&self) -> anyhow::Result<PathBuf> {
        let mut env =
            String::from("# Written by schemagate-cluster; source it or include it from make.\n");
        let mut var = |name: &str, value: &str| {
            env.push_str(&format!("export {name}={}\n", shell_quote(value)))
        };
        var("KUBECONFIG", &self.kubeconfig.display().to_string());
        var("K8S_BIN", &self.k8s_bin.display().to_string());
        var("KUBERNETES_API_URL", &self.apiserver_url());
        if let Some(db) = &self.postgres {
            var("POSTGRES_ADMIN_URL", &db.admin_url());
        }
        if let Some(db) = &self.mariadb {
            var("MARIADB_ADMIN_URL", &db.admin_url());
        }
        let path = self.dir.join("cluster.env");
        std::fs::write(&path, env).with_context(|| format!("writing {}", path.display()))?;
        std::fs::write(self.dir.join("ready"), "ready\n").context("writing ready marker")?;
        Ok(path)
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn apiserver_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    pub fn k8s_bin(&self) -> &Path {
        &self.k8s_bin
    }

    pub fn postgres(&self) -> Option<&DatabaseServer> {
        self.postgres.as_ref()
    }

    pub fn mariadb(&self) -> Option<&DatabaseServer> {
        self.mariadb.as_ref()
    }

    /// Wall time [`Cluster::start`] took (the control-plane build excluded if cached).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// Stops the test node (and its pod processes), then the controller-manager, the API
    /// server and etcd (SIGTERM, SIGKILL after a grace period), then the databases.
    pub async fn stop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("ready"));
        if let Some(node) = self.node.take() {
            node.shutdown().await;
        }
        while let Some(mut component) = self.components.pop() {
            stop_process(component.name, &mut component.child).await;
        }
        self.postgres.take();
        self.mariadb.take();
    }
}

/// SIGTERM, a grace period, then SIGKILL.
pub(crate) async fn stop_process(name: &str, child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Some(pid) = child.id() {
        signal(&pid.to_string(), "TERM").await;
    }
    match tokio::time::timeout(STOP_GRACE, child.wait()).await {
        Ok(_) => tracing::info!(component = name, "stopped"),
        Err(_) => {
            tracing::warn!(
                component = name,
                "did not stop within {STOP_GRACE:?}; killing"
            );
            let _ = child.kill().await;
        }
    }
}

/// Sends a signal with kill(1): `target` is a pid, or `-PGID` for a process group.
pub(crate) async fn signal(target: &str, signal: &str) {
    let result = Command::new("kill")
        .args(["-s", signal, "--", target])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = result {
        tracing::warn!(target, signal, error = %e, "kill(1) failed");
    }
}

async fn start_databases(
    dir: PathBuf,
    wanted: Databases,
) -> Result<(Option<DatabaseServer>, Option<DatabaseServer>), StartError> {
    if wanted == Databases::NONE {
        return Ok((None, None));
    }
    let started = Instant::now();
    let postgres_dir = dir.join("postgres");
    let mariadb_dir = dir.join("mariadb");
    for d in [&postgres_dir, &mariadb_dir] {
        remove_dir_if_exists(d)
            .map_err(|e| StartError::new("databases", format!("{e:#}"), None))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| {
        StartError::new(
            "databases",
            format!("creating {}: {e}", dir.display()),
            None,
        )
    })?;
    let postgres = async {
        if !wanted.postgres {
            return Ok(None);
        }
        DatabaseServer::start_postgres(&postgres_dir)
            .await
            .map(Some)
            .map_err(|e| StartError::new("postgresql", format!("{e:#}"), None))
    };
    let mariadb = async {
        if !wanted.mariadb {
            return Ok(None);
        }
        DatabaseServer::start_mariadb(&mariadb_dir)
            .await
            .map(Some)
            .map_err(|e| StartError::new("mariadb", format!("{e:#}"), None))
    };
    let (postgres, mariadb) = tokio::join!(postgres, mariadb);
    let (postgres, mariadb) = (postgres?, mariadb?);
    tracing::info!(elapsed = ?started.elapsed(), "databases ready");
    Ok((postgres, mariadb))
}

/// Runs `tests/controlplane/build.sh` (a no-op when the binary is cached) and returns the
/// binary's path. The repository is found through `SCHEMAGATE_ROOT`, else from where this
/// crate was compiled.
pub async fn build_control_plane() -> anyhow::Result<PathBuf> {
    let root = std::env::var_os("SCHEMAGATE_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."));
    let script = root.join("tests/controlplane/build.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "{} failed with {}",
        script.display(),
        output.status
    );
    let path = String::from_utf8_lossy(&output.stdout)
        .trim()
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(
        !path.is_empty(),
        "{} printed no binary path",
        script.display()
    );
    Ok(PathBuf::from(path))
}

/// An admin client from a kubeconfig file.
pub async fn admin_client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await
            .context("loading kubeconfig")?;
    kube::Client::try_from(config).context("building client")
}

async fn apiserver_ready(client: &kube::Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    matches!(client.request_text(request).await, Ok(body) if body.trim() == "ok")
}

async fn etcd_healthy(port: u16) -> bool {
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        std::io::Result::Ok(response.contains("\"health\":\"true\""))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(true))
    )
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    path.canonicalize()
        .with_context(|| format!("resolving {}", path.display()))
}

fn remove_dir_if_exists(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Quotes a value for sh when it has anything beyond a conservative set of characters.
fn shell_quote(value: &str) -> String {
    let safe = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
    if safe && !value.is_empty() {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_urls_alone_and_quotes_the_rest() {
        assert_eq!(
            shell_quote("postgres://u:p@127.0.0.1:5432/db"),
            "postgres://u:p@127.0.0.1:5432/db"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
