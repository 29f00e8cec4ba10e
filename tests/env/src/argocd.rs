//! Argo CD next to the local control plane: Redis (Debian's `redis-server`), a Git server
//! for throw-away bare repositories (`git daemon`, with pushes enabled), and Argo CD's
//! repo server and application controller, built from the Argo CD Go modules by
//! `tests/argocd/build.sh`. Everything listens on loopback. See docs/testing.md.
//!
//! The application controller runs outside the cluster the way Argo CD's own local
//! development set-up runs it: `ARGOCD_FAKE_IN_CLUSTER=true` makes the in-cluster
//! destination (`https://kubernetes.default.svc`) use the kubeconfig, here the admin's.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use kube::runtime::{conditions, wait::await_condition};
use tokio::process::{Child, Command};

use crate::logs::{free_port, log_tail};

/// The namespace Argo CD runs in and reads its settings and Applications from.
pub const NAMESPACE: &str = "argocd";
/// How often the application controller compares every Application with Git when nothing
/// asks it to (Argo CD's `timeout.reconciliation`, 120 s by default). Tests push and then
/// ask for a refresh the way a Git webhook does, so this only bounds a missed refresh.
pub const RESYNC_SECONDS: u64 = 30;
const FIELD_MANAGER: &str = "schemagate-testenv";
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Builds (or finds in the cache) the Argo CD binary; returns its path. The Application
/// and AppProject CRDs of the same version sit beside it in `crds/`.
pub async fn build_argocd() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../argocd/build.sh");
    let output = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed ({})", script.display(), output.status);
    }
    let path = String::from_utf8(output.stdout)?.trim().to_owned();
    Ok(PathBuf::from(path))
}

struct Process {
    name: &'static str,
    child: Child,
    log_path: PathBuf,
}

/// A running Argo CD. [`ArgoCd::stop`] stops it; dropping it kills the processes.
pub struct ArgoCd {
    processes: Vec<Process>,
    git_port: u16,
    git_root: PathBuf,
}

impl ArgoCd {
    /// Installs the CRDs, the `argocd` namespace and settings (with schemagate's health
    /// check, as docs/argocd.md tells users to add it) and starts the components.
    pub async fn start(
        dir: &Path,
        kubeconfig: &Path,
        k8s_bin: &Path,
        client: kube::Client,
    ) -> anyhow::Result<Self> {
        let bin = build_argocd().await?;
        let crds = bin.parent().context("binary directory")?.join("crds");
        let logs = dir.join("logs");
        let git_root = dir.join("git");
        let work = dir.join("argocd");
        for d in [&logs, &git_root, &work] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        install(k8s_bin, kubeconfig, &crds, client).await?;

        let mut argocd = Self {
            processes: Vec::new(),
            git_port: free_port()?,
            git_root: git_root.clone(),
        };
        let redis_port = free_port()?;
        let redis = argocd.spawn(
            &logs,
            "redis",
            Command::new("redis-server").args([
                "--bind",
                "127.0.0.1",
                "--port",
                &redis_port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &work.display().to_string(),
            ]),
        )?;
        argocd.wait_port(redis, redis_port).await?;

        let git = argocd.spawn(
            &logs,
            "git-daemon",
            Command::new("git").args([
                "daemon",
                "--reuseaddr",
                "--listen=127.0.0.1",
                &format!("--port={}", argocd.git_port),
                &format!("--base-path={}", git_root.display()),
                "--export-all",
                "--enable=receive-pack",
                "--informative-errors",
                &git_root.display().to_string(),
            ]),
        )?;
        argocd.wait_port(git, argocd.git_port).await?;

        let redis_addr = format!("127.0.0.1:{redis_port}");
        let repo_port = free_port()?;
        let mut repo_server = Command::new(&bin);
        repo_server
            .args(["repo-server", "--disable-tls", "--logformat", "text"])
            .args(["--address", "127.0.0.1", "--port", &repo_port.to_string()])
            .args(["--metrics-address", "127.0.0.1"])
            .args(["--metrics-port", &free_port()?.to_string()])
            .args(["--redis", &redis_addr])
            // No signed commits here, and the image's /app/config paths do not exist.
            .env("ARGOCD_GPG_ENABLED", "false")
            .env("ARGOCD_SSH_DATA_PATH", work.join("ssh"))
            .env("ARGOCD_TLS_DATA_PATH", work.join("tls"))
            .env("ARGOCD_PLUGINSOCKFILEPATH", work.join("plugins"))
            .env("TMPDIR", &work)
            .env("HOME", &work);
        let repo = argocd.spawn(&logs, "argocd-repo-server", &mut repo_server)?;
        argocd.wait_port(repo, repo_port).await?;

        let mut controller = Command::new(&bin);
        controller
            .args(["application-controller", "--logformat", "text"])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--namespace", NAMESPACE])
            .args(["--repo-server", &format!("127.0.0.1:{repo_port}")])
            .arg("--repo-server-plaintext")
            .args(["--redis", &redis_addr])
            .args(["--app-resync", &RESYNC_SECONDS.to_string()])
            .args(["--app-resync-jitter", "0"])
            .args(["--status-processors", "4", "--operation-processors", "4"])
            // Each resource's health in the Application's status, where the tests read
            // it; Argo CD 3 keeps it only in the resource tree (UI, `argocd app get`).
            .arg("--persist-resource-health")
            .env("ARGOCD_FAKE_IN_CLUSTER", "true")
            .env("KUBECONFIG", kubeconfig)
            .env("HOME", &work);
        // Its metrics server starts once the controller has synced its caches. (Argo CD
        // binds it to 0.0.0.0; it has no flag for the address.)
        let controller_port = free_port()?;
        controller.args(["--metrics-port", &controller_port.to_string()]);
        let controller = argocd.spawn(&logs, "argocd-application-controller", &mut controller)?;
        argocd.wait_port(controller, controller_port).await?;
        Ok(argocd)
    }

    /// `git://127.0.0.1:PORT/NAME`: the URL of repository NAME, for Argo CD and `git push`.
    pub fn repo_url(&self, name: &str) -> String {
        format!("git://127.0.0.1:{}/{name}", self.git_port)
    }

    /// The directory the Git server serves; `git init --bare DIR/NAME` adds a repository.
    pub fn git_root(&self) -> &Path {
        &self.git_root
    }

    /// The log of one component (`argocd-application-controller`, `argocd-repo-server`,
    /// `redis`, `git-daemon`).
    pub fn log_paths(&self) -> Vec<(&'static str, PathBuf)> {
        self.processes
            .iter()
            .map(|p| (p.name, p.log_path.clone()))
            .collect()
    }

    /// Waits until one of the processes exits on its own; pending forever if none runs.
    pub async fn exited(&mut self) -> (String, std::io::Result<ExitStatus>) {
        if self.processes.is_empty() {
            return futures::future::pending().await;
        }
        let waits = self.processes.iter_mut().map(|p| {
            let name = p.name;
            Box::pin(async move { (name.to_owned(), p.child.wait().await) })
        });
        let (result, _, _) = futures::future::select_all(waits).await;
        result
    }

    /// Stops the components, newest first.
    pub async fn stop(&mut self) {
        while let Some(mut process) = self.processes.pop() {
            crate::cluster::stop_process(process.name, &mut process.child).await;
        }
    }

    fn spawn(
        &mut self,
        logs: &Path,
        name: &'static str,
        command: &mut Command,
    ) -> anyhow::Result<usize> {
        let log_path = logs.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        tracing::info!(component = name, log = %log_path.display(), "starting");
        self.processes.push(Process {
            name,
            child,
            log_path,
        });
        Ok(self.processes.len() - 1)
    }

    /// Waits until the process listens on `port`; fails with its log if it exits first.
    async fn wait_port(&mut self, index: usize, port: u16) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let process = &mut self.processes[index];
            if let Some(status) = process.child.try_wait()? {
                bail!(
                    "{} exited with {status}\n--- {} ---\n{}",
                    process.name,
                    process.log_path.display(),
                    log_tail(&process.log_path)
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                tracing::info!(component = process.name, elapsed = ?started.elapsed(), "ready");
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "{} not listening on port {port} after {READY_TIMEOUT:?}\n--- {} ---\n{}",
                    process.name,
                    process.log_path.display(),
                    log_tail(&process.log_path)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The CRDs, the namespace, `argocd-cm` with schemagate's health check, `argocd-secret`,
/// and the `default` AppProject (Argo CD's API server creates it in a full install).
async fn install(
    k8s_bin: &Path,
    kubeconfig: &Path,
    crds: &Path,
    client: kube::Client,
) -> anyhow::Result<()> {
    let output = Command::new(k8s_bin)
        .args(["kubectl", "apply", "--server-side", "--force-conflicts"])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("-f")
        .arg(crds)
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "installing the Argo CD CRDs: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // A watch, not `kubectl wait`: that fails on a CRD whose status is not written yet.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in ["applications.argoproj.io", "appprojects.argoproj.io"] {
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(crds.clone(), crd, conditions::is_crd_established()),
        )
        .await
        .with_context(|| format!("CRD {crd} not established after 60 s"))?
        .with_context(|| format!("watching CRD {crd}"))?;
    }
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    Api::<Namespace>::all(client.clone())
        .patch(
            NAMESPACE,
            &apply,
            &Patch::Apply(Namespace {
                metadata: ObjectMeta {
                    name: Some(NAMESPACE.into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            }),
        )
        .await
        .context("creating namespace argocd")?;
    let part_of = || Some([("app.kubernetes.io/part-of".to_owned(), "argocd".to_owned())].into());
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    configmaps
        .patch(
            "argocd-cm",
            &apply,
            &Patch::Apply(ConfigMap {
                metadata: ObjectMeta {
                    name: Some("argocd-cm".into()),
                    labels: part_of(),
                    ..ObjectMeta::default()
                },
                ..ConfigMap::default()
            }),
        )
        .await
        .context("creating argocd-cm")?;
    // The health check, added the way docs/argocd.md says: a patch of argocd-cm.
    let health =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/argocd/argocd-cm-health.yaml");
    let output = Command::new(k8s_bin)
        .args([
            "kubectl",
            "-n",
            NAMESPACE,
            "patch",
            "configmap",
            "argocd-cm",
            "--patch-file",
        ])
        .arg(&health)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "adding the health check to argocd-cm: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    secrets
        .patch(
            "argocd-secret",
            &apply,
            &Patch::Apply(Secret {
                metadata: ObjectMeta {
                    name: Some("argocd-secret".into()),
                    labels: part_of(),
                    ..ObjectMeta::default()
                },
                string_data: Some(
                    [("server.secretkey".to_owned(), "e2e-throwaway".to_owned())].into(),
                ),
                ..Secret::default()
            }),
        )
        .await
        .context("creating argocd-secret")?;
    let project = serde_json::json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AppProject",
        "metadata": {"name": "default", "namespace": NAMESPACE},
        "spec": {
            "sourceRepos": ["*"],
            "destinations": [{"server": "*", "namespace": "*"}],
            "clusterResourceWhitelist": [{"group": "*", "kind": "*"}]
        }
    });
    let resource = kube::api::ApiResource {
        group: "argoproj.io".into(),
        version: "v1alpha1".into(),
        api_version: "argoproj.io/v1alpha1".into(),
        kind: "AppProject".into(),
        plural: "appprojects".into(),
    };
    let projects: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client, NAMESPACE, &resource);
    projects
        .patch("default", &apply, &Patch::Apply(&project))
        .await
        .context("creating the default AppProject")?;
    Ok(())
}
