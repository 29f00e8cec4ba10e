//! The test node: a kubelet stand-in driven by a watch on all pods.
//!
//! - Registers Node [`NODE_NAME`] and binds every unscheduled pod to it (there is no
//!   scheduler).
//! - Job pods, and pods whose image is in the image map ([`images`]), run as local
//!   processes ([`process`]); their status follows the processes.
//! - Every other pod is reported Running and Ready at once, so Deployments roll out
//!   through the real controllers.
//! - A pod being deleted is stopped, given a terminal status and deleted with grace
//!   period 0, as a kubelet does.

mod addresses;
mod env;
pub mod images;
mod oci;
mod process;
mod status;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

pub use self::addresses::PodAddresses;
pub use self::images::ImageEntry;
use self::process::{Launch, PodEnvironment};
use self::status::{ContainerState, PodRun};
use crate::cluster::signal;

/// The one node of the local cluster.
pub const NODE_NAME: &str = "schemagate-test-node";
/// Longest a pod process gets between SIGTERM and SIGKILL.
const MAX_GRACE: Duration = Duration::from_secs(10);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const READINESS_INTERVAL: Duration = Duration::from_millis(200);

/// What the node needs from the supervisor.
pub struct NodeConfig {
    /// Admin client.
    pub client: kube::Client,
    /// Per-pod directories (kubeconfig, volumes, output logs) go here.
    pub dir: PathBuf,
    pub apiserver_port: u16,
    pub ca_pem: String,
}

struct NodeContext {
    client: kube::Client,
    dir: PathBuf,
    apiserver_port: u16,
    ca_pem: String,
    addresses: PodAddresses,
}

/// Handle on the running node; [`TestNode::shutdown`] kills every pod process.
pub struct TestNode {
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The pod is being deleted: stop, report terminal status, delete with grace 0.
    Delete,
    /// The node is shutting down: stop the processes, nothing else.
    Shutdown,
}

impl TestNode {
    pub async fn start(config: NodeConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.dir)
            .with_context(|| format!("creating {}", config.dir.display()))?;
        let addresses = PodAddresses::new().await?;
        tracing::info!(subnet = %addresses.subnet(), "test node pod addresses");
        register(&config.client).await?;
        let ctx = Arc::new(NodeContext {
            client: config.client,
            dir: config.dir,
            apiserver_port: config.apiserver_port,
            ca_pem: config.ca_pem,
            addresses,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run(ctx, shutdown_rx));
        Ok(Self { shutdown, task })
    }

    /// Stops every pod process and the watch.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if tokio::time::timeout(SHUTDOWN_TIMEOUT, self.task)
            .await
            .is_err()
        {
            tracing::warn!("test node did not shut down within {SHUTDOWN_TIMEOUT:?}");
        }
    }
}

async fn register(client: &kube::Client) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(NODE_NAME.to_owned()),
            labels: Some(
                [
                    ("kubernetes.io/hostname", NODE_NAME),
                    ("kubernetes.io/os", "linux"),
                    ("kubernetes.io/arch", std::env::consts::ARCH),
                    ("schemagate.dev/test-node", "true"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => return Err(e).context("registering the test node"),
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .to_string();
    let capacity = serde_json::json!({"cpu": cpus, "memory": "16Gi", "pods": "250", "ephemeral-storage": "100Gi"});
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = serde_json::json!({
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "schemagate test node is ready",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": NODE_NAME},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "",
                "kernelVersion": "", "osImage": "schemagate test node",
                "containerRuntimeVersion": "schemagate://local-processes",
                "kubeletVersion": "v1.35.4", "kubeProxyVersion": "",
                "operatingSystem": "linux", "architecture": std::env::consts::ARCH,
            },
        }
    });
    nodes
        .patch_status(NODE_NAME, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .context("writing the test node's status")?;
    Ok(())
}

/// The pod watch loop: binds, starts and stops pods, one task per pod.
async fn run(ctx: Arc<NodeContext>, mut shutdown: watch::Receiver<bool>) {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let mut events = pin!(watcher::watcher(pods, watcher::Config::default()).default_backoff());
    let mut tracked: HashMap<String, watch::Sender<Option<Stop>>> = HashMap::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(done) = tasks.join_next() => {
                if let Ok(uid) = done {
                    tracked.remove(&uid);
                    finished.insert(uid);
                }
            }
            event = events.next() => match event {
                Some(Ok(Event::Apply(pod) | Event::InitApply(pod))) => {
                    on_pod(&ctx, pod, &mut tracked, &finished, &mut tasks);
                }
                Some(Ok(Event::Delete(pod))) => {
                    if let Some(stop) = pod.metadata.uid.as_ref().and_then(|uid| tracked.get(uid)) {
                        stop.send_replace(Some(Stop::Delete));
                    }
                }
                Some(Ok(Event::Init | Event::InitDone)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch error"),
                None => break,
            },
        }
    }
    for stop in tracked.values() {
        stop.send_replace(Some(Stop::Shutdown));
    }
    let drained = tokio::time::timeout(SHUTDOWN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    ctx.addresses.release_all().await;
    tracing::info!("test node stopped");
}

fn on_pod(
    ctx: &Arc<NodeContext>,
    pod: Pod,
    tracked: &mut HashMap<String, watch::Sender<Option<Stop>>>,
    finished: &HashSet<String>,
    tasks: &mut JoinSet<String>,
) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    if finished.contains(&uid) {
        return;
    }
    let deleting = pod.metadata.deletion_timestamp.is_some();
    match pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        None if !deleting => {
            let client = ctx.client.clone();
            tokio::spawn(async move { bind(&client, &pod).await });
        }
        Some(NODE_NAME) => {
            if let Some(stop) = tracked.get(&uid) {
                if deleting {
                    stop.send_replace(Some(Stop::Delete));
                }
                return;
            }
            if is_terminal(&pod) && !deleting {
                return;
            }
            let (stop, stop_rx) = watch::channel(deleting.then_some(Stop::Delete));
            tracked.insert(uid.clone(), stop);
            let ctx = Arc::clone(ctx);
            tasks.spawn(pod_lifecycle(ctx, pod, stop_rx).map(move |()| uid));
        }
        _ => {}
    }
}

async fn bind(client: &kube::Client, pod: &Pod) {
    let (Some(name), Some(namespace)) = (
        pod.metadata.name.as_deref(),
        pod.metadata.namespace.as_deref(),
    ) else {
        return;
    };
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(NODE_NAME.to_owned()),
            ..ObjectReference::default()
        },
    };
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let result: Result<serde_json::Value, kube::Error> = api
        .create_subresource("binding", name, &PostParams::default(), &binding)
        .await;
    match result {
        Ok(_) => tracing::debug!(pod = %format!("{namespace}/{name}"), "bound"),
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {}
        Err(e) => {
            tracing::warn!(pod = %format!("{namespace}/{name}"), error = %e, "binding failed")
        }
    }
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn is_job_pod(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Job" && o.api_version.starts_with("batch/"))
}

/// Resolves to the stop request, treating a dropped sender as shutdown.
async fn stopped(stop: &mut watch::Receiver<Option<Stop>>) -> Stop {
    match stop.wait_for(Option::is_some).await {
        Ok(value) => value.unwrap_or(Stop::Shutdown),
        Err(_) => Stop::Shutdown,
    }
}

/// One pod from binding to deletion.
async fn pod_lifecycle(ctx: Arc<NodeContext>, pod: Pod, mut stop: watch::Receiver<Option<Stop>>) {
    let api: Api<Pod> = Api::namespaced(
        ctx.client.clone(),
        pod.metadata.namespace.as_deref().unwrap_or("default"),
    );
    let name = pod.metadata.name.clone().unwrap_or_default();
    let key = format!(
        "{}/{name}",
        pod.metadata.namespace.as_deref().unwrap_or_default()
    );

    // Deleted before it ever ran here (or after a node restart): terminal status, then delete.
    if *stop.borrow() == Some(Stop::Delete) {
        if !is_terminal(&pod) {
            let run = PodRun::new(api.clone(), &pod, None);
            run.write_phase(
                "Failed",
                Some("Terminated"),
                Some("pod was deleted before it ran"),
            )
            .await;
        }
        delete_now(&api, &pod).await;
        return;
    }

    // Host-network pods share the node's address (the API server requires podIP = hostIP).
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network) == Some(true);
    let allocated = if host_network {
        Ok(Ipv4Addr::LOCALHOST)
    } else {
        ctx.addresses.allocate().await
    };
    let ip = match allocated {
        Ok(ip) => ip,
        Err(e) => {
            tracing::warn!(pod = %key, error = %format!("{e:#}"), "no pod address");
            let run = PodRun::new(api.clone(), &pod, None);
            run.write_phase("Failed", Some("NodeError"), Some(&format!("{e:#}")))
                .await;
            if stopped(&mut stop).await == Stop::Delete {
                delete_now(&api, &pod).await;
            }
            return;
        }
    };

    let images = match images::load(&ctx.client).await {
        Ok(images) => images,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "image map unavailable; treating it as empty");
            Vec::new()
        }
    };
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    let mapped = containers
        .iter()
        .any(|c| images.iter().any(|e| Some(&e.image) == c.image.as_ref()));
    let mut run = PodRun::new(api.clone(), &pod, Some(ip));
    let stop_reason = if is_job_pod(&pod) || mapped || unpullable_image(&pod).is_some() {
        tracing::info!(pod = %key, %ip, "running pod as local processes");
        run_processes(&ctx, &pod, ip, &images, &mut run, &mut stop).await
    } else {
        tracing::debug!(pod = %key, %ip, "simulating running pod");
        run.simulate_running();
        run.write().await;
        let reason = stopped(&mut stop).await;
        if reason == Stop::Delete {
            run.simulate_killed();
            run.write().await;
        }
        reason
    };
    if stop_reason == Stop::Delete {
        delete_now(&api, &pod).await;
    }
    ctx.addresses.release(ip).await;
}

/// Deletes the pod object with grace period 0 (the kubelet's last word on a pod).
async fn delete_now(api: &Api<Pod>, pod: &Pod) {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
        Err(e) => tracing::warn!(pod = %name, error = %e, "deleting pod failed"),
    }
}

/// How long a container shows `ErrImagePull` before `ImagePullBackOff`.
const IMAGE_PULL_BACK_OFF: Duration = Duration::from_secs(2);

/// The first image of the pod that no registry can serve: one whose registry host ends in
/// `.invalid` (RFC 2606: a name that never resolves). Other images run from the image map
/// or as host programs.
fn unpullable_image(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter_map(|c| c.image.clone())
        .find(|image| {
            let Some((host, _)) = image.split_once('/') else {
                return false;
            };
            let host = host.split(':').next().unwrap_or(host);
            host.ends_with(".invalid")
        })
}

/// Runs init containers one by one, then all containers; returns why the pod stopped.
async fn run_processes(
    ctx: &NodeContext,
    pod: &Pod,
    ip: Ipv4Addr,
    images: &[ImageEntry],
    run: &mut PodRun,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> Stop {
    let pod_dir = ctx.dir.join("pods").join(format!(
        "{}_{}_{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata
            .uid
            .as_deref()
            .unwrap_or_default()
            .chars()
            .take(8)
            .collect::<String>()
    ));
    if let Some(image) = unpullable_image(pod) {
        // As a kubelet: ErrImagePull, then ImagePullBackOff, until the pod is deleted.
        run.image_not_pulled(&image, false);
        run.write().await;
        let backed_off = tokio::time::timeout(IMAGE_PULL_BACK_OFF, stopped(stop)).await;
        if let Ok(reason) = backed_off {
            return reason;
        }
        run.image_not_pulled(&image, true);
        run.write().await;
        return stopped(stop).await;
    }
    let ip_text = ip.to_string();
    let penv = PodEnvironment {
        client: &ctx.client,
        pod,
        pod_ip: &ip_text,
        pod_dir: &pod_dir,
        apiserver_port: ctx.apiserver_port,
        ca_pem: &ctx.ca_pem,
        images,
    };
    let prepared = match process::prepare(&penv).await {
        Ok(prepared) => prepared,
        Err(error) => {
            tracing::warn!(pod = ?pod.metadata.name, error = %error, "container configuration failed");
            run.fail_to_configure(&error.0);
            run.write().await;
            return stopped(stop).await;
        }
    };
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .map_or(MAX_GRACE, |s| Duration::from_secs(s).min(MAX_GRACE));

    for (index, launch) in prepared.init.iter().enumerate() {
        match run_group(
            run,
            Group::Init(index),
            std::slice::from_ref(launch),
            &ip,
            grace,
            stop,
        )
        .await
        {
            GroupEnd::Exited if run.init_succeeded(index) => {}
            GroupEnd::Exited => {
                run.set_phase("Failed");
                run.write().await;
                return stopped(stop).await;
            }
            GroupEnd::Stopped(reason) => return finish_stopped(run, reason).await,
        }
    }
    run.set_initialized();
    match run_group(run, Group::Main, &prepared.main, &ip, grace, stop).await {
        GroupEnd::Exited => {
            let phase = if run.all_main_succeeded() {
                "Succeeded"
            } else {
                "Failed"
            };
            run.set_phase(phase);
            run.write().await;
            stopped(stop).await
        }
        GroupEnd::Stopped(reason) => finish_stopped(run, reason).await,
    }
}

async fn finish_stopped(run: &mut PodRun, reason: Stop) -> Stop {
    if reason == Stop::Delete {
        // A pod deleted while running ends Failed, as with a kubelet.
        run.set_phase("Failed");
        run.write().await;
    }
    reason
}

#[derive(Debug, Clone, Copy)]
enum Group {
    Init(usize),
    Main,
}

enum GroupEnd {
    Exited,
    Stopped(Stop),
}

/// Starts `launches` together and follows them until all exit or a stop request comes.
async fn run_group(
    run: &mut PodRun,
    group: Group,
    launches: &[Launch],
    ip: &Ipv4Addr,
    grace: Duration,
    stop: &mut watch::Receiver<Option<Stop>>,
) -> GroupEnd {
    let slot = |i: usize| match group {
        Group::Init(index) => status::Slot::Init(index),
        Group::Main => status::Slot::Main(i),
    };
    let (exits, mut exit_rx) = mpsc::unbounded_channel();
    let mut pids: Vec<Option<u32>> = vec![None; launches.len()];
    let mut running = 0usize;
    for (i, launch) in launches.iter().enumerate() {
        match process::spawn(launch) {
            Ok(mut child) => {
                pids[i] = child.id();
                running += 1;
                let ready = launch.readiness_port.is_none();
                run.set_container(slot(i), ContainerState::running(child.id()), ready);
                let exits = exits.clone();
                tokio::spawn(async move {
                    let status = child.wait().await;
                    let _ = exits.send((i, status));
                });
            }
            Err(e) => {
                let message = format!("starting container {}: {e}", launch.name);
                run.set_container(
                    slot(i),
                    ContainerState::terminated(128, "StartError", Some(message), None),
                    false,
                );
            }
        }
    }
    if matches!(group, Group::Main) {
        run.set_phase("Running");
    }
    run.write().await;

    let mut readiness = tokio::time::interval(READINESS_INTERVAL);
    loop {
        if running == 0 {
            return GroupEnd::Exited;
        }
        let waiting_for_readiness: Vec<usize> = launches
            .iter()
            .enumerate()
            .filter(|(i, l)| {
                l.readiness_port.is_some() && pids[*i].is_some() && !run.is_ready(slot(*i))
            })
            .map(|(i, _)| i)
            .collect();
        tokio::select! {
            Some((i, status)) = exit_rx.recv() => {
                running -= 1;
                pids[i] = None;
                record_exit(run, slot(i), &launches[i], status);
                if running > 0 {
                    run.write().await;
                }
            }
            _ = readiness.tick(), if !waiting_for_readiness.is_empty() => {
                let mut changed = false;
                for i in waiting_for_readiness {
                    if let Some(port) = launches[i].readiness_port {
                        let connect = tokio::net::TcpStream::connect((*ip, port));
                        if matches!(tokio::time::timeout(READINESS_INTERVAL, connect).await, Ok(Ok(_))) {
                            run.set_ready(slot(i), true);
                            changed = true;
                        }
                    }
                }
                if changed {
                    run.write().await;
                }
            }
            reason = stopped(stop) => {
                terminate(&pids, grace, &mut exit_rx, &mut running, |i, status| {
                    record_exit(run, slot(i), &launches[i], status);
                })
                .await;
                return GroupEnd::Stopped(reason);
            }
        }
    }
}

fn record_exit(
    run: &mut PodRun,
    slot: status::Slot,
    launch: &Launch,
    status: std::io::Result<std::process::ExitStatus>,
) {
    let (code, message) = match status {
        Ok(status) => {
            let code = process::exit_code(&status);
            (code, process::termination_message(launch, code))
        }
        Err(e) => (-1, Some(format!("waiting for the process: {e}"))),
    };
    let reason = if code == 0 { "Completed" } else { "Error" };
    let started = run.started_at(slot);
    run.set_container(
        slot,
        ContainerState::terminated(code, reason, message, started),
        false,
    );
}

/// SIGTERM to every process group, SIGKILL after `grace`, then collect the exits.
async fn terminate(
    pids: &[Option<u32>],
    grace: Duration,
    exit_rx: &mut mpsc::UnboundedReceiver<(usize, std::io::Result<std::process::ExitStatus>)>,
    running: &mut usize,
    mut on_exit: impl FnMut(usize, std::io::Result<std::process::ExitStatus>),
) {
    for pid in pids.iter().flatten() {
        signal(&format!("-{pid}"), "TERM").await;
    }
    let mut alive: Vec<Option<u32>> = pids.to_vec();
    let deadline = tokio::time::Instant::now() + grace;
    while *running > 0 {
        match tokio::time::timeout_at(deadline, exit_rx.recv()).await {
            Ok(Some((i, status))) => {
                *running -= 1;
                alive[i] = None;
                on_exit(i, status);
            }
            Ok(None) => return,
            Err(_) => break,
        }
    }
    for pid in alive.iter().flatten() {
        signal(&format!("-{pid}"), "KILL").await;
    }
    while *running > 0 {
        match tokio::time::timeout(Duration::from_secs(5), exit_rx.recv()).await {
            Ok(Some((i, status))) => {
                *running -= 1;
                on_exit(i, status);
            }
            _ => return,
        }
    }
}
