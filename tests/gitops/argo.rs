//! What the GitOps tests share: a bare Git repository served by the cluster's Git server
//! with a working copy to commit and push from, Argo CD Applications, and a recorder of
//! everything an Application showed while a test ran.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use schemagate_testenv::argocd::NAMESPACE;
use schemagate_testenv::harness::{TestCluster, TestNamespace};
use serde_json::{Value, json};
use tokio::process::Command;
use tokio::sync::oneshot;

/// How long an Application may take to reach a state.
pub const APP_TIMEOUT: Duration = Duration::from_secs(180);

/// A bare repository on the Git server and a working copy that pushes to it.
pub struct GitRepo {
    pub url: String,
    work: PathBuf,
}

async fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=e2e",
            "-c",
            "user.email=e2e@schemagate.test",
        ])
        .args(args)
        .output()
        .await
        .expect("running git");
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

impl GitRepo {
    /// `git init --bare` under the Git server's root, and an empty working copy.
    pub async fn create(cluster: &TestCluster, name: &str) -> Self {
        let (base_url, root) = cluster
            .argocd_git
            .clone()
            .expect("the cluster runs Argo CD and its Git server");
        let bare = root.join(format!("{name}.git"));
        let work = cluster.dir().join("git-work").join(name);
        std::fs::create_dir_all(&work).expect("creating the working copy");
        git(
            &root,
            &[
                "init",
                "-q",
                "--bare",
                "-b",
                "main",
                &bare.display().to_string(),
            ],
        )
        .await;
        git(&work, &["init", "-q", "-b", "main"]).await;
        Self {
            url: format!("{base_url}{name}.git"),
            work,
        }
    }

    /// Replaces the tree with `files`, commits, and pushes to `main` over the Git server.
    /// Returns the commit and the moment the push returned.
    pub async fn push(&self, message: &str, files: &[(&str, String)]) -> (String, Instant) {
        for entry in std::fs::read_dir(&self.work).expect("reading the working copy") {
            let path = entry.expect("entry").path();
            if path.file_name().is_some_and(|n| n != ".git") {
                std::fs::remove_file(&path).expect("removing a file of the last commit");
            }
        }
        for (name, text) in files {
            std::fs::write(self.work.join(name), text).expect("writing a manifest");
        }
        git(&self.work, &["add", "-A"]).await;
        git(&self.work, &["commit", "-q", "-m", message]).await;
        git(&self.work, &["push", "-q", &self.url, "HEAD:main"]).await;
        let pushed = Instant::now();
        (git(&self.work, &["rev-parse", "HEAD"]).await, pushed)
    }
}

fn application_resource() -> ApiResource {
    ApiResource {
        group: "argoproj.io".into(),
        version: "v1alpha1".into(),
        api_version: "argoproj.io/v1alpha1".into(),
        kind: "Application".into(),
        plural: "applications".into(),
    }
}

pub fn applications(cluster: &TestCluster) -> Api<DynamicObject> {
    Api::namespaced_with(cluster.client(), NAMESPACE, &application_resource())
}

/// How an Application applies and compares.
#[derive(Clone, Copy, Debug)]
pub struct SyncMode {
    /// `ServerSideApply=true` (else Argo CD's default, client-side apply).
    pub server_side_apply: bool,
    /// The `ignoreDifferences` of examples/argocd/application-admin-dashboard.yaml.
    pub ignore_hold_fields: bool,
}

/// An Application named after the test namespace, syncing the repository's root into it,
/// with automated sync, pruning and self-heal. Deleted (not its resources) on drop.
pub struct Application {
    pub name: String,
    cluster: &'static TestCluster,
}

impl Application {
    pub async fn create(ns: &TestNamespace, repo: &GitRepo, mode: SyncMode) -> Self {
        let mut options = vec![];
        if mode.server_side_apply {
            options.push("ServerSideApply=true");
        }
        if mode.ignore_hold_fields {
            options.push("RespectIgnoreDifferences=true");
        }
        let mut spec = json!({
            "project": "default",
            "source": {"repoURL": repo.url, "targetRevision": "main", "path": "."},
            "destination": {"server": "https://kubernetes.default.svc", "namespace": ns.name()},
            "syncPolicy": {
                "automated": {"prune": true, "selfHeal": true},
                "syncOptions": options,
            },
        });
        if mode.ignore_hold_fields {
            spec["ignoreDifferences"] = json!([{
                "group": "apps", "kind": "Deployment",
                "jsonPointers": ["/spec/paused"],
                "jqPathExpressions": [
                    ".metadata.annotations[\"schemagate.dev/held-for\"]",
                    ".metadata.labels[\"schemagate.dev/held\"]"
                ]
            }]);
        }
        let app = json!({
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {"name": ns.name(), "namespace": NAMESPACE},
            "spec": spec,
        });
        applications(ns.cluster())
            .patch(
                ns.name(),
                &PatchParams::apply("schemagate-e2e").force(),
                &Patch::Apply(&app),
            )
            .await
            .expect("creating the Application");
        Self {
            name: ns.name().to_owned(),
            cluster: ns.cluster(),
        }
    }

    pub async fn state(&self) -> AppState {
        let app = applications(self.cluster)
            .get(&self.name)
            .await
            .expect("reading the Application");
        AppState::of(&app)
    }

    /// Asks Argo CD to compare with Git now, as its Git webhook does after a push.
    pub async fn refresh(&self) {
        let patch = json!({"metadata": {"annotations": {"argocd.argoproj.io/refresh": "normal"}}});
        applications(self.cluster)
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("asking for a refresh");
    }

    /// Refreshes and waits until Argo CD has compared again (its `reconciledAt` moved):
    /// evidence that a state seen afterwards is Argo CD's verdict on the current cluster.
    pub async fn refreshed(&self) -> AppState {
        let before = self.state().await.reconciled_at;
        // reconciledAt has a resolution of one second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        self.refresh().await;
        self.wait("a new comparison", |s| s.reconciled_at != before)
            .await
    }

    /// Polls until `done` holds; fails with the last state otherwise.
    pub async fn wait(&self, what: &str, done: impl Fn(&AppState) -> bool) -> AppState {
        let deadline = Instant::now() + APP_TIMEOUT;
        loop {
            let state = self.state().await;
            if done(&state) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "Application {} not {what} after {APP_TIMEOUT:?}: {state:#?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the Application is Synced to `revision` and Healthy.
    pub async fn synced_healthy(&self, revision: &str) -> AppState {
        self.wait(&format!("Synced to {revision} and Healthy"), |s| {
            s.revision == revision && s.sync == "Synced" && s.health == "Healthy"
        })
        .await
    }
}

impl Drop for Application {
    fn drop(&mut self) {
        let name = self.name.clone();
        let cluster = self.cluster;
        schemagate_testenv::harness::block_on_own_runtime(async move {
            let _ = applications(cluster)
                .delete(&name, &DeleteParams::default())
                .await;
        });
    }
}

/// What a user sees of an Application (`argocd app get`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppState {
    pub sync: String,
    pub health: String,
    pub health_message: String,
    /// The commit Argo CD compared with.
    pub revision: String,
    pub reconciled_at: String,
    pub operation_phase: String,
    pub operation_message: String,
    pub operation_started_at: String,
    /// The commit of the last (or running) sync operation.
    pub operation_revision: String,
    /// The resources a partial sync (self-heal) was limited to; empty for a full sync.
    pub operation_resources: Vec<String>,
    /// `kind/name` → (sync status, health status, health message) of each resource.
    pub resources: Vec<(String, String, String, String)>,
}

impl AppState {
    pub fn of(app: &DynamicObject) -> Self {
        let status = &app.data["status"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        let operation = &status["operationState"];
        Self {
            sync: text(&status["sync"]["status"]),
            health: text(&status["health"]["status"]),
            health_message: text(&status["health"]["message"]),
            revision: text(&status["sync"]["revision"]),
            reconciled_at: text(&status["reconciledAt"]),
            operation_phase: text(&operation["phase"]),
            operation_message: text(&operation["message"]),
            operation_started_at: text(&operation["startedAt"]),
            operation_revision: Some(text(&operation["syncResult"]["revision"]))
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| text(&operation["operation"]["sync"]["revision"])),
            operation_resources: operation["operation"]["sync"]["resources"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| format!("{}/{}", text(&r["kind"]), text(&r["name"])))
                .collect(),
            resources: status["resources"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    (
                        format!("{}/{}", text(&r["kind"]), text(&r["name"])),
                        text(&r["status"]),
                        text(&r["health"]["status"]),
                        text(&r["health"]["message"]),
                    )
                })
                .collect(),
        }
    }

    /// The health status of resource `kind/name`.
    pub fn health_of(&self, resource: &str) -> Option<&str> {
        self.resources
            .iter()
            .find(|r| r.0 == resource)
            .map(|r| r.2.as_str())
    }

    /// The health message of resource `kind/name`.
    pub fn health_message_of(&self, resource: &str) -> Option<&str> {
        self.resources
            .iter()
            .find(|r| r.0 == resource)
            .map(|r| r.3.as_str())
    }
}

/// Every distinct state an Application showed, with when, from a watch.
pub struct Recorder {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    states: Arc<Mutex<Vec<(Instant, AppState)>>>,
}

impl Recorder {
    pub async fn start(app: &Application) -> Self {
        let api = applications(app.cluster);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", app.name));
        let states: Arc<Mutex<Vec<(Instant, AppState)>>> = Arc::default();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (listed_tx, listed) = oneshot::channel::<()>();
        let mut listed_tx = Some(listed_tx);
        let sink = states.clone();
        let task = tokio::spawn(async move {
            let stream = watcher::watcher(api, config);
            futures::pin_mut!(stream);
            loop {
                let event = tokio::select! {
                    event = stream.next() => event,
                    _ = &mut stopped => break,
                };
                match event {
                    Some(Ok(Event::Apply(app) | Event::InitApply(app))) => {
                        let state = AppState::of(&app);
                        let mut states = sink.lock().expect("recorder lock");
                        if states.last().map(|(_, s)| s) != Some(&state) {
                            states.push((Instant::now(), state));
                        }
                    }
                    Some(Ok(Event::InitDone)) => {
                        if let Some(tx) = listed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(APP_TIMEOUT, listed)
            .await
            .expect("the Application watch listed in time")
            .expect("the Application watch ended before listing");
        Self {
            stop: Some(stop),
            task,
            states,
        }
    }

    /// The states seen so far.
    pub fn states(&self) -> Vec<(Instant, AppState)> {
        self.states.lock().expect("recorder lock").clone()
    }

    pub async fn finish(mut self) -> Vec<(Instant, AppState)> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        self.states()
    }
}

/// One sync operation of an Application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncOperation {
    pub started_at: String,
    pub revision: String,
    /// The resources a partial sync (self-heal) was limited to; empty for a full sync.
    pub resources: Vec<String>,
}

/// The sync operations a recording shows (distinct `startedAt` values), in order.
pub fn sync_operations(states: &[(Instant, AppState)]) -> Vec<SyncOperation> {
    let mut operations: Vec<SyncOperation> = Vec::new();
    for (_, state) in states {
        if state.operation_started_at.is_empty() {
            continue;
        }
        match operations.last_mut() {
            Some(last) if last.started_at == state.operation_started_at => {
                if last.revision.is_empty() {
                    last.revision.clone_from(&state.operation_revision);
                }
            }
            _ => operations.push(SyncOperation {
                started_at: state.operation_started_at.clone(),
                revision: state.operation_revision.clone(),
                resources: state.operation_resources.clone(),
            }),
        }
    }
    operations
}
