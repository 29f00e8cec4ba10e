//! The status the test node reports for one pod, written as a merge patch of
//! `status` (conditions and container statuses replaced whole).

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ContainerState as K8sContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};

/// Where a container sits in the pod spec.
#[derive(Debug, Clone, Copy)]
pub enum Slot {
    Init(usize),
    Main(usize),
}

/// A container's state as the node last saw it.
#[derive(Debug, Clone)]
pub enum ContainerState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        pid: Option<u32>,
        started: Timestamp,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        message: Option<String>,
        started: Option<Timestamp>,
        finished: Timestamp,
        pid: Option<u32>,
    },
}

impl ContainerState {
    pub fn running(pid: Option<u32>) -> Self {
        Self::Running {
            pid,
            started: Timestamp::now(),
        }
    }

    pub fn terminated(
        exit_code: i32,
        reason: &str,
        message: Option<String>,
        started: Option<Timestamp>,
    ) -> Self {
        Self::Terminated {
            exit_code,
            reason: reason.to_owned(),
            message,
            started,
            finished: Timestamp::now(),
            pid: None,
        }
    }
}

#[derive(Debug, Clone)]
struct ContainerView {
    name: String,
    image: String,
    state: ContainerState,
    ready: bool,
}

impl ContainerView {
    fn to_status(&self) -> ContainerStatus {
        let (state, container_id, started) = match &self.state {
            ContainerState::Waiting { reason, message } => (
                K8sContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.clone()),
                        message: message.clone(),
                    }),
                    ..K8sContainerState::default()
                },
                None,
                false,
            ),
            ContainerState::Running { pid, started } => (
                K8sContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(Time(*started)),
                    }),
                    ..K8sContainerState::default()
                },
                pid.map(|p| format!("schemagate://{p}")),
                true,
            ),
            ContainerState::Terminated {
                exit_code,
                reason,
                message,
                started,
                finished,
                pid,
            } => (
                K8sContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: *exit_code,
                        reason: Some(reason.clone()),
                        message: message.clone(),
                        started_at: started.map(Time),
                        finished_at: Some(Time(*finished)),
                        ..ContainerStateTerminated::default()
                    }),
                    ..K8sContainerState::default()
                },
                pid.map(|p| format!("schemagate://{p}")),
                false,
            ),
        };
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: String::new(),
            container_id,
            ready: self.ready,
            restart_count: 0,
            started: Some(started),
            state: Some(state),
            ..ContainerStatus::default()
        }
    }
}

/// Pod conditions whose `lastTransitionTime` moves only when their status changes.
#[derive(Debug, Clone, Default)]
struct Conditions {
    entries: Vec<(&'static str, bool, Option<&'static str>, Timestamp)>,
}

impl Conditions {
    fn set(&mut self, kind: &'static str, status: bool, reason: Option<&'static str>) {
        match self.entries.iter_mut().find(|(k, ..)| *k == kind) {
            Some(entry) if entry.1 == status => entry.2 = reason,
            Some(entry) => *entry = (kind, status, reason, Timestamp::now()),
            None => self.entries.push((kind, status, reason, Timestamp::now())),
        }
    }

    fn to_vec(&self) -> Vec<PodCondition> {
        self.entries
            .iter()
            .map(|(kind, status, reason, at)| PodCondition {
                type_: (*kind).to_owned(),
                status: if *status { "True" } else { "False" }.to_owned(),
                reason: reason.map(str::to_owned),
                last_transition_time: Some(Time(*at)),
                ..PodCondition::default()
            })
            .collect()
    }
}

/// The node's view of one pod and the means to report it.
pub struct PodRun {
    api: Api<Pod>,
    name: String,
    ip: Option<Ipv4Addr>,
    start_time: Timestamp,
    phase: &'static str,
    init: Vec<ContainerView>,
    main: Vec<ContainerView>,
    initialized: bool,
    conditions: Conditions,
}

fn views(
    containers: Option<&Vec<k8s_openapi::api::core::v1::Container>>,
    reason: &str,
) -> Vec<ContainerView> {
    containers
        .into_iter()
        .flatten()
        .map(|c| ContainerView {
            name: c.name.clone(),
            image: c.image.clone().unwrap_or_default(),
            state: ContainerState::Waiting {
                reason: reason.to_owned(),
                message: None,
            },
            ready: false,
        })
        .collect()
}

impl PodRun {
    pub fn new(api: Api<Pod>, pod: &Pod, ip: Option<Ipv4Addr>) -> Self {
        let spec = pod.spec.as_ref();
        let init = views(
            spec.and_then(|s| s.init_containers.as_ref()),
            "PodInitializing",
        );
        let main = views(spec.map(|s| &s.containers), "ContainerCreating");
        let mut conditions = Conditions::default();
        conditions.set("PodScheduled", true, None);
        Self {
            api,
            name: pod.metadata.name.clone().unwrap_or_default(),
            ip,
            start_time: Timestamp::now(),
            phase: "Pending",
            initialized: init.is_empty(),
            init,
            main,
            conditions,
        }
    }

    fn view_mut(&mut self, slot: Slot) -> Option<&mut ContainerView> {
        match slot {
            Slot::Init(i) => self.init.get_mut(i),
            Slot::Main(i) => self.main.get_mut(i),
        }
    }

    fn view(&self, slot: Slot) -> Option<&ContainerView> {
        match slot {
            Slot::Init(i) => self.init.get(i),
            Slot::Main(i) => self.main.get(i),
        }
    }

    pub fn set_container(&mut self, slot: Slot, state: ContainerState, ready: bool) {
        if let Some(view) = self.view_mut(slot) {
            // Keep the process id of a running container in its terminated state.
            let state = match (&view.state, state) {
                (
                    ContainerState::Running { pid, .. },
                    ContainerState::Terminated {
                        exit_code,
                        reason,
                        message,
                        started,
                        finished,
                        ..
                    },
                ) => ContainerState::Terminated {
                    exit_code,
                    reason,
                    message,
                    started,
                    finished,
                    pid: *pid,
                },
                (_, state) => state,
            };
            view.state = state;
            view.ready = ready;
        }
    }

    pub fn set_ready(&mut self, slot: Slot, ready: bool) {
        if let Some(view) = self.view_mut(slot) {
            view.ready = ready;
        }
    }

    pub fn is_ready(&self, slot: Slot) -> bool {
        self.view(slot).is_some_and(|v| v.ready)
    }

    pub fn started_at(&self, slot: Slot) -> Option<Timestamp> {
        match self.view(slot).map(|v| &v.state) {
            Some(ContainerState::Running { started, .. }) => Some(*started),
            _ => None,
        }
    }

    pub fn init_succeeded(&self, index: usize) -> bool {
        matches!(
            self.init.get(index).map(|v| &v.state),
            Some(ContainerState::Terminated { exit_code: 0, .. })
        )
    }

    pub fn all_main_succeeded(&self) -> bool {
        self.main
            .iter()
            .all(|v| matches!(v.state, ContainerState::Terminated { exit_code: 0, .. }))
    }

    pub fn set_initialized(&mut self) {
        self.initialized = true;
    }

    pub fn set_phase(&mut self, phase: &'static str) {
        self.phase = phase;
    }

    /// A pod without processes: every container running and ready.
    pub fn simulate_running(&mut self) {
        self.initialized = true;
        for view in self.init.iter_mut() {
            view.state = ContainerState::terminated(0, "Completed", None, Some(Timestamp::now()));
        }
        for view in self.main.iter_mut() {
            view.state = ContainerState::running(None);
            view.ready = true;
        }
        self.phase = "Running";
    }

    /// A simulated pod that was deleted: its containers stopped by SIGTERM.
    pub fn simulate_killed(&mut self) {
        for view in self.main.iter_mut() {
            let started = match view.state {
                ContainerState::Running { started, .. } => Some(started),
                _ => None,
            };
            view.state = ContainerState::terminated(143, "Error", None, started);
            view.ready = false;
        }
        self.phase = "Failed";
    }

    /// A container whose image cannot be pulled waits, as a kubelet reports it: first
    /// `ErrImagePull`, then `ImagePullBackOff`. The pod stays Pending.
    pub fn image_not_pulled(&mut self, image: &str, back_off: bool) {
        let message = if back_off {
            format!("Back-off pulling image \"{image}\"")
        } else {
            format!(
                "failed to pull and unpack image \"{image}\": failed to resolve reference \"{image}\": no such host"
            )
        };
        let reason = if back_off {
            "ImagePullBackOff"
        } else {
            "ErrImagePull"
        };
        for view in self.init.iter_mut().chain(self.main.iter_mut()) {
            if view.image == image {
                view.state = ContainerState::Waiting {
                    reason: reason.to_owned(),
                    message: Some(message.clone()),
                };
                view.ready = false;
            }
        }
        self.phase = "Pending";
    }

    /// The pod's containers could not be configured (missing Secret, key, ...): the pod
    /// fails, as a Job needs to see it.
    pub fn fail_to_configure(&mut self, message: &str) {
        for view in self.init.iter_mut().chain(self.main.iter_mut()) {
            view.state = ContainerState::terminated(
                1,
                "CreateContainerConfigError",
                Some(message.to_owned()),
                None,
            );
            view.ready = false;
        }
        self.phase = "Failed";
    }

    fn status(&mut self) -> PodStatus {
        let running = self.phase == "Running";
        let terminal = matches!(self.phase, "Succeeded" | "Failed");
        let ready = running && !self.main.is_empty() && self.main.iter().all(|v| v.ready);
        let not_ready_reason = if terminal {
            Some("PodCompleted")
        } else {
            Some("ContainersNotReady")
        };
        self.conditions
            .set("PodReadyToStartContainers", !terminal, None);
        self.conditions.set(
            "Initialized",
            self.initialized,
            (!self.initialized).then_some("ContainersNotInitialized"),
        );
        self.conditions.set(
            "ContainersReady",
            ready,
            if ready { None } else { not_ready_reason },
        );
        self.conditions
            .set("Ready", ready, if ready { None } else { not_ready_reason });
        let ip = self.ip.map(|ip| ip.to_string());
        PodStatus {
            phase: Some(self.phase.to_owned()),
            host_ip: Some("127.0.0.1".to_owned()),
            host_ips: Some(vec![HostIP {
                ip: "127.0.0.1".to_owned(),
            }]),
            pod_ip: ip.clone(),
            pod_ips: ip.map(|ip| vec![PodIP { ip }]),
            start_time: Some(Time(self.start_time)),
            conditions: Some(self.conditions.to_vec()),
            init_container_statuses: (!self.init.is_empty())
                .then(|| self.init.iter().map(ContainerView::to_status).collect()),
            container_statuses: Some(self.main.iter().map(ContainerView::to_status).collect()),
            ..PodStatus::default()
        }
    }

    /// Writes the current status. A pod that is already gone is not an error.
    pub async fn write(&mut self) {
        let status = self.status();
        self.patch(serde_json::json!({ "status": status })).await;
    }

    /// Writes only a phase with a reason and message (pods the node never ran).
    pub async fn write_phase(&self, phase: &str, reason: Option<&str>, message: Option<&str>) {
        self.patch(serde_json::json!({ "status": { "phase": phase, "reason": reason, "message": message } }))
            .await;
    }

    /// A merge patch of the pod's status. A pod that is already gone is not an error.
    /// Like a kubelet's status manager, it keeps trying while the API server cannot be
    /// reached or fails (a restart, an overload): a status lost here would leave the pod
    /// Running forever in the API, and its Job never finished. Gives up after
    /// [`STATUS_RETRY_LIMIT`], with a warning.
    async fn patch(&self, patch: serde_json::Value) {
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            let error = match self
                .api
                .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return,
                Err(kube::Error::Api(status)) if status.code == 404 => return,
                Err(kube::Error::Api(status)) if status.code < 500 && status.code != 429 => {
                    tracing::warn!(pod = %self.name, error = %status, "writing pod status was refused");
                    return;
                }
                Err(error) => error,
            };
            if started.elapsed() > STATUS_RETRY_LIMIT {
                tracing::warn!(pod = %self.name, %error, "writing pod status failed; giving up");
                return;
            }
            tracing::info!(pod = %self.name, %error, "writing pod status failed; trying again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(2));
        }
    }
}

/// How long a pod status write is retried while the API server cannot take it.
const STATUS_RETRY_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);
