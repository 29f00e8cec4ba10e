//! Running a pod's containers as local processes.
//!
//! Each container runs as `unshare --mount --propagation private -- sh -c PRELUDE sh CMD...`:
//! the prelude bind-mounts the pod's volumes and its termination-log file at the paths the
//! pod declares, inside a mount namespace private to that process, then `exec`s the
//! command. Every process is its own process group so it can be stopped as a whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, Pod, ServiceAccount};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, PostParams};
use tokio::process::{Child, Command};

use super::env::{self, ConfigError, Sources, expand};
use super::images::ImageEntry;
use super::oci;
use super::volumes::{self, VolumeContext, sanitize};
use crate::pki;
use std::os::unix::fs::PermissionsExt as _;

/// Kubelet limits for termination messages.
const MESSAGE_MAX_BYTES: usize = 4096;
const FALLBACK_MAX_BYTES: usize = 2048;
const FALLBACK_MAX_LINES: usize = 80;
const TOKEN_SECONDS: i64 = 24 * 3600;

/// Everything needed to start one container.
#[derive(Debug, Clone)]
pub struct Launch {
    pub name: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub log_path: PathBuf,
    pub termination_log: PathBuf,
    pub fallback_to_logs: bool,
    /// Port a readiness probe checks (TCP connect to the pod IP), if any.
    pub readiness_port: Option<u16>,
}

/// Launches for a pod's init containers and containers.
#[derive(Debug)]
pub struct PreparedPod {
    pub init: Vec<Launch>,
    pub main: Vec<Launch>,
}

/// What the node knows that a pod's processes need.
pub struct PodEnvironment<'a> {
    pub client: &'a kube::Client,
    pub pod: &'a Pod,
    pub pod_ip: &'a str,
    pub pod_dir: &'a Path,
    pub apiserver_port: u16,
    pub ca_pem: &'a str,
    pub images: &'a [ImageEntry],
}

/// A token for the pod's ServiceAccount, bound to the pod (TokenRequest API).
pub async fn request_token(
    client: &kube::Client,
    pod: &Pod,
    audience: Option<&str>,
) -> Result<String, ConfigError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]).unwrap_or_default(),
            expiration_seconds: Some(TOKEN_SECONDS),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..TokenRequest::default()
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let response = api
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            ConfigError(format!(
                "requesting a token for serviceaccount {namespace}/{account}: {e}"
            ))
        })?;
    response.status.map(|s| s.token).ok_or_else(|| {
        ConfigError(format!(
            "token request for serviceaccount {namespace}/{account} returned no token"
        ))
    })
}

/// Writes the pod's kubeconfig and volumes and resolves every container's command and
/// environment. Any missing Secret, ConfigMap or key is a [`ConfigError`].
pub async fn prepare(penv: &PodEnvironment<'_>) -> Result<PreparedPod, ConfigError> {
    let pod = penv.pod;
    let io = |what: &str, e: std::io::Error| ConfigError(format!("{what}: {e}"));
    std::fs::create_dir_all(penv.pod_dir).map_err(|e| io("creating pod directory", e))?;

    let token = request_token(penv.client, pod, None).await?;
    let server = format!("https://127.0.0.1:{}", penv.apiserver_port);
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let kubeconfig = penv.pod_dir.join("kubeconfig");
    let text = pki::kubeconfig(
        &server,
        penv.ca_pem,
        &account,
        pki::Credentials::Token(&token),
    );
    std::fs::write(&kubeconfig, text).map_err(|e| io("writing kubeconfig", e))?;

    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let mut sources = Sources::new(penv.client.clone(), &namespace);
    let volume_ctx = VolumeContext {
        client: penv.client,
        pod,
        pod_ip: penv.pod_ip,
        token: &token,
        ca_pem: penv.ca_pem,
    };
    let volume_paths =
        volumes::materialize(&volume_ctx, &mut sources, &penv.pod_dir.join("volumes")).await?;

    let spec = pod.spec.clone().unwrap_or_default();
    let mut prepared = PreparedPod {
        init: Vec::new(),
        main: Vec::new(),
    };
    for (containers, out) in [
        (spec.init_containers.unwrap_or_default(), &mut prepared.init),
        (spec.containers, &mut prepared.main),
    ] {
        for container in &containers {
            out.push(
                prepare_container(penv, container, &kubeconfig, &volume_paths, &mut sources)
                    .await?,
            );
        }
    }
    Ok(prepared)
}

async fn prepare_container(
    penv: &PodEnvironment<'_>,
    container: &Container,
    kubeconfig: &Path,
    volume_paths: &HashMap<String, PathBuf>,
    sources: &mut Sources,
) -> Result<Launch, ConfigError> {
    let pod = penv.pod;
    let image = container.image.clone().unwrap_or_default();
    let entry = penv.images.iter().find(|e| e.image == image);
    let container_dir = penv.pod_dir.join(sanitize(&container.name));
    std::fs::create_dir_all(&container_dir)
        .map_err(|e| ConfigError(format!("creating {}: {e}", container_dir.display())))?;
    if let Some(reference) = entry.and_then(|e| e.oci.as_deref()) {
        return prepare_oci_container(
            penv,
            container,
            reference,
            &container_dir,
            volume_paths,
            sources,
        )
        .await;
    }

    // Base environment: what a container would get from its image and the kubelet.
    let node_path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    let path = match entry.and_then(|e| e.path_prefix.as_deref()) {
        Some(prefix) => format!("{prefix}:{node_path}"),
        None => node_path,
    };
    let mut base = vec![
        ("PATH".to_owned(), path),
        (
            "HOME".to_owned(),
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        ),
        (
            "HOSTNAME".to_owned(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
        ("KUBECONFIG".to_owned(), kubeconfig.display().to_string()),
        ("KUBERNETES_SERVICE_HOST".to_owned(), "127.0.0.1".to_owned()),
        (
            "KUBERNETES_SERVICE_PORT".to_owned(),
            penv.apiserver_port.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT_HTTPS".to_owned(),
            penv.apiserver_port.to_string(),
        ),
        ("POD_IP".to_owned(), penv.pod_ip.to_owned()),
    ];
    if let Ok(lang) = std::env::var("LANG") {
        base.push(("LANG".to_owned(), lang));
    }
    let env = env::resolve(sources, pod, container, penv.pod_ip, base).await?;
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());

    let command = match container.command.as_deref() {
        Some(command) if !command.is_empty() => command.to_vec(),
        _ => entry.and_then(|e| e.entrypoint.clone()).unwrap_or_default(),
    };
    if command.is_empty() {
        return Err(ConfigError(format!(
            "container {:?} has no command and image {image:?} has no entrypoint in the image map",
            container.name
        )));
    }
    let args = container.args.clone().unwrap_or_default();
    let program: Vec<String> = command
        .iter()
        .chain(args.iter())
        .map(|a| expand(a, lookup))
        .collect();

    let cwd = match (&container.working_dir, entry) {
        (Some(dir), _) if !dir.is_empty() => PathBuf::from(dir),
        (_, Some(entry)) => entry.dir.clone(),
        _ => {
            let work = penv.pod_dir.join("work");
            std::fs::create_dir_all(&work)
                .map_err(|e| ConfigError(format!("creating {}: {e}", work.display())))?;
            work
        }
    };

    let termination_log = container_dir.join("termination-log");
    std::fs::write(&termination_log, b"")
        .map_err(|e| ConfigError(format!("creating termination log: {e}")))?;
    let termination_path = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());

    let mut prelude = String::from("set -e\n");
    for mount in container.volume_mounts.iter().flatten() {
        let Some(source) = volume_paths.get(&mount.name) else {
            return Err(ConfigError(format!(
                "volumeMount {:?} names no volume",
                mount.name
            )));
        };
        let source = match mount.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => {
                let source = source.join(sub);
                if !source.exists() {
                    std::fs::create_dir_all(&source)
                        .map_err(|e| ConfigError(format!("creating {}: {e}", source.display())))?;
                }
                source
            }
            _ => source.clone(),
        };
        prelude.push_str(&bind_mount(
            &source,
            &mount.mount_path,
            mount.read_only == Some(true),
        ));
    }
    prelude.push_str(&bind_mount(&termination_log, &termination_path, false));
    prelude.push_str(&format!(
        "cd {}\nexec \"$@\"\n",
        sh_quote(&cwd.display().to_string())
    ));

    let mut argv: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    argv.push(prelude);
    argv.push("sh".to_owned());
    argv.extend(program);

    Ok(Launch {
        name: container.name.clone(),
        argv,
        env,
        cwd,
        log_path: container_dir.join("output.log"),
        termination_log,
        fallback_to_logs: container.termination_message_policy.as_deref()
            == Some("FallbackToLogsOnError"),
        readiness_port: readiness_port(container),
    })
}

/// A container of an image from an OCI layout: it runs in a copy of the image's root
/// filesystem, as the user the pod and image ask for, with the pod's volumes, its
/// termination-log file and the host's `/etc/hosts` and `/etc/resolv.conf` mounted into
/// it, the root read-only when `readOnlyRootFilesystem` says so. The environment is the
/// image's plus what a kubelet adds; no kubeconfig.
async fn prepare_oci_container(
    penv: &PodEnvironment<'_>,
    container: &Container,
    reference: &str,
    container_dir: &Path,
    volume_paths: &HashMap<String, PathBuf>,
    sources: &mut Sources,
) -> Result<Launch, ConfigError> {
    let pod = penv.pod;
    let cache = penv
        .pod_dir
        .parent()
        .and_then(Path::parent)
        .map_or_else(|| penv.pod_dir.join("images"), |node| node.join("images"));
    let image = oci::unpack(reference, &cache)
        .await
        .map_err(|e| ConfigError(format!("image {reference}: {e:#}")))?;
    let (uid, gid) = oci::user(pod, container, &image)?;

    let rootfs = container_dir.join("rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    let copied = tokio::process::Command::new("cp")
        .arg("-a")
        .arg(&image.rootfs)
        .arg(&rootfs)
        .status()
        .await
        .map_err(|e| ConfigError(format!("copying the image's root filesystem: {e}")))?;
    if !copied.success() {
        return Err(ConfigError(
            "copying the image's root filesystem failed".into(),
        ));
    }

    let mut base: Vec<(String, String)> = image.env.clone();
    if !base.iter().any(|(k, _)| k == "PATH") {
        base.push((
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    if !base.iter().any(|(k, _)| k == "HOME") {
        base.push(("HOME".into(), "/".into()));
    }
    base.extend([
        (
            "HOSTNAME".to_owned(),
            pod.metadata.name.clone().unwrap_or_default(),
        ),
        ("KUBERNETES_SERVICE_HOST".to_owned(), "127.0.0.1".to_owned()),
        (
            "KUBERNETES_SERVICE_PORT".to_owned(),
            penv.apiserver_port.to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT_HTTPS".to_owned(),
            penv.apiserver_port.to_string(),
        ),
        ("POD_IP".to_owned(), penv.pod_ip.to_owned()),
    ]);
    let env = env::resolve(sources, pod, container, penv.pod_ip, base).await?;
    let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let program: Vec<String> = oci::argv(container, &image)
        .iter()
        .map(|a| expand(a, lookup))
        .collect();
    if program.is_empty() {
        return Err(ConfigError(format!(
            "no command specified: container {:?} has no command and image {reference} no entrypoint",
            container.name
        )));
    }
    let working_dir = container
        .working_dir
        .clone()
        .filter(|d| !d.is_empty())
        .or_else(|| Some(image.working_dir.clone()).filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/".into());

    // Written by the container's user.
    let termination_log = container_dir.join("termination-log");
    std::fs::write(&termination_log, b"")
        .map_err(|e| ConfigError(format!("creating termination log: {e}")))?;
    std::fs::set_permissions(&termination_log, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| ConfigError(format!("termination log: {e}")))?;
    let termination_path = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());

    let root = rootfs.display().to_string();
    let inside = |path: &str| format!("{root}/{}", path.trim_start_matches('/'));
    // The prelude runs the host's tools whatever PATH the image sets; the command is
    // looked up with the image's PATH inside its root.
    let mut prelude = String::from(
        "set -e\nimage_path=$PATH\nPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nunshare_bin=$(command -v unshare)\n",
    );
    // The root as a mount of its own, so that it can be made read-only under the volumes.
    prelude.push_str(&format!("mount --bind {0} {0}\n", sh_quote(&root)));
    for mount in container.volume_mounts.iter().flatten() {
        let Some(source) = volume_paths.get(&mount.name) else {
            return Err(ConfigError(format!(
                "volumeMount {:?} names no volume",
                mount.name
            )));
        };
        let source = match mount.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => source.join(sub),
            _ => source.clone(),
        };
        prelude.push_str(&bind_mount(
            &source,
            &inside(&mount.mount_path),
            mount.read_only == Some(true),
        ));
    }
    // /proc and the usual devices, as a runtime provides them (the node has no pid
    // namespaces: /proc is the host's).
    prelude.push_str(&bind_mount(Path::new("/proc"), &inside("/proc"), false));
    for device in [
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
    ] {
        prelude.push_str(&bind_mount(Path::new(device), &inside(device), false));
    }
    for file in ["/etc/hosts", "/etc/resolv.conf"] {
        if Path::new(file).exists() {
            prelude.push_str(&bind_mount(Path::new(file), &inside(file), true));
        }
    }
    prelude.push_str(&bind_mount(
        &termination_log,
        &inside(&termination_path),
        false,
    ));
    if oci::read_only_root(container) {
        prelude.push_str(&format!("mount -o remount,bind,ro {}\n", sh_quote(&root)));
    }
    prelude.push_str(&format!(
        "PATH=$image_path\nexec \"$unshare_bin\" --root={} --wd={} --setuid={uid} --setgid={gid} -- \"$@\"\n",
        sh_quote(&root),
        sh_quote(&working_dir)
    ));

    let mut argv: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    argv.push(prelude);
    argv.push("sh".to_owned());
    argv.extend(program);

    Ok(Launch {
        name: container.name.clone(),
        argv,
        env,
        cwd: container_dir.to_path_buf(),
        log_path: container_dir.join("output.log"),
        termination_log,
        fallback_to_logs: container.termination_message_policy.as_deref()
            == Some("FallbackToLogsOnError"),
        readiness_port: readiness_port(container),
    })
}

fn bind_mount(source: &Path, target: &str, read_only: bool) -> String {
    let src = sh_quote(&source.display().to_string());
    let dst = sh_quote(target);
    let mut lines = if source.is_dir() {
        format!("mkdir -p {dst}\n")
    } else {
        let parent = Path::new(target)
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "/".into());
        format!(
            "mkdir -p {}\n[ -e {dst} ] || : > {dst}\n",
            sh_quote(&parent)
        )
    };
    lines.push_str(&format!("mount --bind {src} {dst}\n"));
    if read_only {
        lines.push_str(&format!("mount -o remount,bind,ro {dst}\n"));
    }
    lines
}

fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

fn readiness_port(container: &Container) -> Option<u16> {
    let probe = container.readiness_probe.as_ref()?;
    let port = probe
        .tcp_socket
        .as_ref()
        .map(|t| &t.port)
        .or_else(|| probe.http_get.as_ref().map(|h| &h.port))?;
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Starts a container's process in its own process group, output to its log file.
pub fn spawn(launch: &Launch) -> std::io::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log_path)?;
    let log_err = log.try_clone()?;
    let (program, args) = launch
        .argv
        .split_first()
        .ok_or_else(|| std::io::Error::other("empty argv"))?;
    Command::new(program)
        .args(args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(if launch.cwd.is_dir() {
            launch.cwd.as_path()
        } else {
            Path::new("/")
        })
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
}

/// The exit code as a container runtime reports it: 128+N when killed by signal N.
pub fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// The termination message: the file at `terminationMessagePath`, or with
/// `FallbackToLogsOnError` and a failed, silent container, the tail of its output.
pub fn termination_message(launch: &Launch, exit_code: i32) -> Option<String> {
    let mut message = std::fs::read(&launch.termination_log).unwrap_or_default();
    message.truncate(MESSAGE_MAX_BYTES);
    let message = String::from_utf8_lossy(&message).into_owned();
    if !message.trim().is_empty() {
        return Some(message);
    }
    if launch.fallback_to_logs && exit_code != 0 {
        let output = std::fs::read(&launch.log_path).unwrap_or_default();
        let output = String::from_utf8_lossy(&output);
        let lines: Vec<&str> = output.lines().collect();
        let mut tail = lines[lines.len().saturating_sub(FALLBACK_MAX_LINES)..].join("\n");
        if tail.len() > FALLBACK_MAX_BYTES {
            let mut cut = tail.len() - FALLBACK_MAX_BYTES;
            while !tail.is_char_boundary(cut) {
                cut += 1;
            }
            tail = tail[cut..].to_owned();
        }
        if !tail.is_empty() {
            return Some(tail);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sh_quote_survives_single_quotes() {
        assert_eq!(sh_quote("/a b/it's"), r"'/a b/it'\''s'");
    }

    #[test]
    fn named_readiness_ports_resolve_through_container_ports() {
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"port": "http", "path": "/"}}
        }))
        .unwrap();
        assert_eq!(readiness_port(&container), Some(8080));
    }
}
