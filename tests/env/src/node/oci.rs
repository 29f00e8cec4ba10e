//! Images from OCI layouts: an image-map entry may name one (`oci: PATH:TAG`). The node
//! reads the image's configuration (user, entrypoint, command, environment, working
//! directory) from the layout, unpacks its root filesystem once per manifest digest with
//! `umoci`, and gives each container a copy of it to run in (see [`super::process`]).
//!
//! Which user a container runs as follows the kubelet: `runAsUser`/`runAsGroup` of the
//! container, else of the pod, else the image's `User` (numeric, or a name looked up in the
//! image's `/etc/passwd` and `/etc/group`). With `runAsNonRoot`, a user that is root, or an
//! image user that is a name (it cannot be verified), fails the container with the
//! kubelet's message.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::{Container, Pod};

use super::env::ConfigError;

/// An unpacked image and what its configuration says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OciImage {
    /// The unpacked root filesystem (shared; containers run in copies of it).
    pub rootfs: PathBuf,
    pub user: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
}

/// Serializes unpacking: two pods of one image unpack it once.
static UNPACK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Reads `reference` (`LAYOUT_DIR:TAG`, or a layout with one image) and unpacks it under
/// `cache`, keyed by its manifest digest, unless that was done before.
pub async fn unpack(reference: &str, cache: &Path) -> anyhow::Result<OciImage> {
    let (layout, tag) = match reference.rsplit_once(':') {
        Some((layout, tag)) if !tag.contains('/') => (PathBuf::from(layout), Some(tag)),
        _ => (PathBuf::from(reference), None),
    };
    let index = read_json(&layout.join("index.json"))?;
    let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
    let manifest = manifests
        .iter()
        .find(|m| match tag {
            Some(tag) => m["annotations"]["org.opencontainers.image.ref.name"] == tag,
            None => manifests.len() == 1,
        })
        .with_context(|| format!("no image {reference} in {}", layout.display()))?;
    let digest = manifest["digest"]
        .as_str()
        .context("a manifest without a digest")?
        .to_string();
    let manifest = read_json(&blob(&layout, &digest)?)?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .context("a manifest without a config")?;
    let config = read_json(&blob(&layout, config_digest)?)?;
    let config = &config["config"];
    let strings = |value: &serde_json::Value| -> Vec<String> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let env = strings(&config["Env"])
        .into_iter()
        .filter_map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();

    let hex = digest.rsplit(':').next().unwrap_or(&digest).to_string();
    let bundle = cache.join(&hex);
    let rootfs = bundle.join("rootfs");
    {
        let _one_at_a_time = UNPACK.lock().await;
        if !rootfs.is_dir() {
            let partial = cache.join(format!("{hex}.partial"));
            let _ = std::fs::remove_dir_all(&partial);
            std::fs::create_dir_all(cache)?;
            let image = match tag {
                Some(tag) => format!("{}:{tag}", layout.display()),
                None => layout.display().to_string(),
            };
            let output = tokio::process::Command::new("umoci")
                .args(["unpack", "--image", &image])
                .arg(&partial)
                .output()
                .await
                .context("running umoci (Debian package umoci)")?;
            if !output.status.success() {
                bail!(
                    "umoci unpack {image} failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            std::fs::rename(&partial, &bundle)?;
        }
    }
    Ok(OciImage {
        rootfs,
        user: config["User"].as_str().unwrap_or_default().to_string(),
        entrypoint: strings(&config["Entrypoint"]),
        cmd: strings(&config["Cmd"]),
        env,
        working_dir: config["WorkingDir"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    })
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))
}

fn blob(layout: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let (algorithm, hex) = digest
        .split_once(':')
        .with_context(|| format!("digest {digest:?}"))?;
    Ok(layout.join("blobs").join(algorithm).join(hex))
}

/// The command a container runs, as a container runtime puts it together: the container's
/// `command` replaces the image's entrypoint (and then its `Cmd` too), its `args` replace
/// the image's `Cmd`.
pub fn argv(container: &Container, image: &OciImage) -> Vec<String> {
    let command = container.command.clone().filter(|c| !c.is_empty());
    let args = container.args.clone().filter(|a| !a.is_empty());
    match (command, args) {
        (Some(command), Some(args)) => command.into_iter().chain(args).collect(),
        (Some(command), None) => command,
        (None, Some(args)) => image.entrypoint.iter().cloned().chain(args).collect(),
        (None, None) => image
            .entrypoint
            .iter()
            .chain(image.cmd.iter())
            .cloned()
            .collect(),
    }
}

/// The uid and gid a container runs as, or the kubelet's reason why it cannot run.
pub fn user(pod: &Pod, container: &Container, image: &OciImage) -> Result<(u32, u32), ConfigError> {
    let pod_context = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let context = container.security_context.as_ref();
    let run_as_user = context
        .and_then(|c| c.run_as_user)
        .or_else(|| pod_context.and_then(|c| c.run_as_user));
    let run_as_group = context
        .and_then(|c| c.run_as_group)
        .or_else(|| pod_context.and_then(|c| c.run_as_group));
    let non_root = context
        .and_then(|c| c.run_as_non_root)
        .or_else(|| pod_context.and_then(|c| c.run_as_non_root))
        .unwrap_or(false);
    let who = format!(
        "(pod: \"{}_{}({})\", container: {})",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default(),
        container.name
    );
    let to_id = |id: i64| u32::try_from(id).map_err(|_| ConfigError(format!("invalid id {id}")));

    let (image_user, image_group) = match image.user.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (image.user.as_str(), None),
    };
    let uid = match run_as_user {
        Some(uid) => {
            if non_root && uid == 0 {
                return Err(ConfigError(format!(
                    "container's runAsUser breaks non-root policy {who}"
                )));
            }
            to_id(uid)?
        }
        None => {
            let uid = if image_user.is_empty() {
                0
            } else if let Ok(uid) = image_user.parse::<u32>() {
                uid
            } else {
                if non_root {
                    return Err(ConfigError(format!(
                        "container has runAsNonRoot and image has non-numeric user ({image_user}), cannot verify user is non-root {who}"
                    )));
                }
                lookup(&image.rootfs.join("etc/passwd"), image_user).ok_or_else(|| {
                    ConfigError(format!(
                        "unable to find user {image_user}: no matching entries in passwd file"
                    ))
                })?
            };
            if non_root && uid == 0 {
                return Err(ConfigError(format!(
                    "container has runAsNonRoot and image will run as root {who}"
                )));
            }
            uid
        }
    };
    let gid = match (run_as_group, image_group) {
        (Some(gid), _) => to_id(gid)?,
        (None, Some(group)) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup(&image.rootfs.join("etc/group"), group).ok_or_else(|| {
                ConfigError(format!(
                    "unable to find group {group}: no matching entries in group file"
                ))
            })?,
        },
        // The user's primary group from the image's passwd file, else the uid's number.
        (None, None) => primary_group(&image.rootfs.join("etc/passwd"), uid).unwrap_or(uid),
    };
    Ok((uid, gid))
}

/// The id of `name` in a passwd or group file (third field).
fn lookup(file: &Path, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name))
            .then(|| fields.get(2)?.parse().ok())
            .flatten()
    })
}

/// The primary group (fourth field) of `uid` in a passwd file.
fn primary_group(passwd: &Path, uid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(passwd).ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2)?.parse::<u32>().ok()? == uid)
            .then(|| fields.get(3)?.parse().ok())
            .flatten()
    })
}

/// Whether the container asks for a read-only root filesystem.
pub fn read_only_root(container: &Container) -> bool {
    container
        .security_context
        .as_ref()
        .and_then(|c| c.read_only_root_filesystem)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(value: serde_json::Value) -> Container {
        serde_json::from_value(value).unwrap()
    }

    fn pod(security: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "n", "uid": "u"},
            "spec": {"containers": [{"name": "c"}], "securityContext": security}
        }))
        .unwrap()
    }

    fn image(user: &str, rootfs: &Path) -> OciImage {
        OciImage {
            rootfs: rootfs.to_path_buf(),
            user: user.into(),
            entrypoint: vec!["/bin/app".into()],
            cmd: vec!["serve".into()],
            ..Default::default()
        }
    }

    #[test]
    fn command_and_args_replace_entrypoint_and_cmd_as_in_a_runtime() {
        let image = image("", Path::new("/"));
        let argv = |c| argv(&container(c), &image);
        assert_eq!(
            argv(serde_json::json!({"name": "c"})),
            ["/bin/app", "serve"]
        );
        assert_eq!(
            argv(serde_json::json!({"name": "c", "args": ["version"]})),
            ["/bin/app", "version"]
        );
        assert_eq!(
            argv(serde_json::json!({"name": "c", "command": ["/bin/other"]})),
            ["/bin/other"]
        );
        assert_eq!(
            argv(serde_json::json!({"name": "c", "command": ["/bin/other"], "args": ["x"]})),
            ["/bin/other", "x"]
        );
    }

    #[test]
    fn users_follow_the_kubelet() {
        let dir = std::env::temp_dir().join(format!("schemagate-oci-user-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(
            dir.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nnonroot:x:65532:65532::/home/nonroot:/sbin/nologin\n",
        )
        .unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\nstaff:x:50:\n").unwrap();
        let plain = container(serde_json::json!({"name": "c"}));
        let none = serde_json::json!({});
        let non_root = serde_json::json!({"runAsNonRoot": true});

        assert_eq!(
            user(&pod(none.clone()), &plain, &image("", &dir)).unwrap(),
            (0, 0)
        );
        assert_eq!(
            user(&pod(none.clone()), &plain, &image("65532:65532", &dir)).unwrap(),
            (65532, 65532)
        );
        assert_eq!(
            user(&pod(none.clone()), &plain, &image("nonroot", &dir)).unwrap(),
            (65532, 65532)
        );
        assert_eq!(
            user(&pod(none.clone()), &plain, &image("nonroot:staff", &dir)).unwrap(),
            (65532, 50)
        );
        let missing = user(&pod(none.clone()), &plain, &image("ghost", &dir)).unwrap_err();
        assert!(
            missing.0.contains("unable to find user ghost"),
            "{}",
            missing.0
        );

        // runAsNonRoot, as the kubelet words it.
        let root = user(&pod(non_root.clone()), &plain, &image("", &dir)).unwrap_err();
        assert!(
            root.0
                .starts_with("container has runAsNonRoot and image will run as root (pod: \"p_n(u)\", container: c)"),
            "{}",
            root.0
        );
        let named = user(&pod(non_root.clone()), &plain, &image("nonroot", &dir)).unwrap_err();
        assert!(
            named
                .0
                .contains("image has non-numeric user (nonroot), cannot verify user is non-root"),
            "{}",
            named.0
        );
        assert_eq!(
            user(&pod(non_root.clone()), &plain, &image("65532", &dir)).unwrap(),
            (65532, 65532)
        );
        // The pod's runAsUser wins over the image; the container's over the pod's.
        let pod_user =
            serde_json::json!({"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000});
        assert_eq!(
            user(&pod(pod_user.clone()), &plain, &image("nonroot", &dir)).unwrap(),
            (1000, 1000)
        );
        let as_root =
            container(serde_json::json!({"name": "c", "securityContext": {"runAsUser": 0}}));
        let refused = user(&pod(pod_user), &as_root, &image("65532", &dir)).unwrap_err();
        assert!(
            refused.0.contains("runAsUser breaks non-root policy"),
            "{}",
            refused.0
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
