//! Pod volumes written to a per-pod directory: `configMap`, `secret`, `projected`
//! (including the ServiceAccount token volume the admission plugin adds), `downwardAPI`,
//! `emptyDir`, and `hostPath` used in place. Other kinds become empty directories.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, KeyToPath, Pod};

use super::env::{ConfigError, Sources, field_value};
use super::process::request_token;

const DEFAULT_MODE: i32 = 0o644;
const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";

/// What every volume needs besides the API objects it names.
pub struct VolumeContext<'a> {
    pub client: &'a kube::Client,
    pub pod: &'a Pod,
    pub pod_ip: &'a str,
    /// The pod's ServiceAccount token (default audience).
    pub token: &'a str,
    /// The cluster CA, standing in for `kube-root-ca.crt` until the publisher creates it.
    pub ca_pem: &'a str,
}

/// Writes every volume of the pod under `dir` and returns, per volume name, the path to
/// bind-mount.
pub async fn materialize(
    ctx: &VolumeContext<'_>,
    sources: &mut Sources,
    dir: &Path,
) -> Result<HashMap<String, PathBuf>, ConfigError> {
    let mut paths = HashMap::new();
    let volumes = ctx
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for volume in volumes {
        if let Some(host_path) = &volume.host_path {
            paths.insert(volume.name.clone(), PathBuf::from(&host_path.path));
            continue;
        }
        let target = dir.join(sanitize(&volume.name));
        create_dir(&target)?;
        if let Some(source) = &volume.config_map {
            if let Some(data) = sources.config_map(&source.name).await?.cloned() {
                write_items(
                    &target,
                    &data,
                    source.items.as_deref(),
                    source.default_mode,
                    &source.name,
                    "ConfigMap",
                )?;
            } else if source.optional != Some(true) {
                return Err(ConfigError(format!(
                    "configmap {:?} not found",
                    source.name
                )));
            }
        } else if let Some(source) = &volume.secret {
            let name = source.secret_name.clone().unwrap_or_default();
            if let Some(data) = sources.secret(&name).await?.cloned() {
                write_items(
                    &target,
                    &data,
                    source.items.as_deref(),
                    source.default_mode,
                    &name,
                    "Secret",
                )?;
            } else if source.optional != Some(true) {
                return Err(ConfigError(format!("secret {name:?} not found")));
            }
        } else if let Some(source) = &volume.downward_api {
            write_downward(
                ctx,
                &target,
                source.items.as_deref().unwrap_or_default(),
                source.default_mode,
            )?;
        } else if let Some(projected) = &volume.projected {
            let mode = projected.default_mode;
            for source in projected.sources.iter().flatten() {
                if let Some(token) = &source.service_account_token {
                    let value = match token.audience.as_deref() {
                        Some(audience) if !audience.is_empty() => {
                            request_token(ctx.client, ctx.pod, Some(audience)).await?
                        }
                        _ => ctx.token.to_owned(),
                    };
                    write_file(
                        &target,
                        &token.path,
                        value.as_bytes(),
                        mode.unwrap_or(DEFAULT_MODE),
                    )?;
                }
                if let Some(source) = &source.config_map {
                    let data = sources.config_map(&source.name).await?.cloned();
                    let data = match data {
                        Some(data) => Some(data),
                        // The root-ca publisher creates it shortly after the namespace.
                        None if source.name == ROOT_CA_CONFIG_MAP => {
                            Some([("ca.crt".to_owned(), ctx.ca_pem.as_bytes().to_vec())].into())
                        }
                        None => None,
                    };
                    match data {
                        Some(data) => write_items(
                            &target,
                            &data,
                            source.items.as_deref(),
                            mode,
                            &source.name,
                            "ConfigMap",
                        )?,
                        None if source.optional == Some(true) => {}
                        None => {
                            return Err(ConfigError(format!(
                                "configmap {:?} not found",
                                source.name
                            )));
                        }
                    }
                }
                if let Some(source) = &source.secret {
                    match sources.secret(&source.name).await?.cloned() {
                        Some(data) => write_items(
                            &target,
                            &data,
                            source.items.as_deref(),
                            mode,
                            &source.name,
                            "Secret",
                        )?,
                        None if source.optional == Some(true) => {}
                        None => {
                            return Err(ConfigError(format!("secret {:?} not found", source.name)));
                        }
                    }
                }
                if let Some(source) = &source.downward_api {
                    write_downward(
                        ctx,
                        &target,
                        source.items.as_deref().unwrap_or_default(),
                        mode,
                    )?;
                }
            }
        } else if volume.empty_dir.is_some() {
            // As a kubelet makes it: writable by whichever user the container runs as.
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| ConfigError(format!("emptyDir {}: {e}", volume.name)))?;
        } else {
            tracing::warn!(volume = %volume.name, "unsupported volume type; using an empty directory");
        }
        paths.insert(volume.name.clone(), target);
    }
    Ok(paths)
}

fn write_items(
    dir: &Path,
    data: &std::collections::BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    name: &str,
    kind: &str,
) -> Result<(), ConfigError> {
    let default_mode = default_mode.unwrap_or(DEFAULT_MODE);
    match items {
        Some(items) if !items.is_empty() => {
            for item in items {
                let value = data.get(&item.key).ok_or_else(|| {
                    ConfigError(format!("couldn't find key {} in {kind} {name}", item.key))
                })?;
                write_file(dir, &item.path, value, item.mode.unwrap_or(default_mode))?;
            }
        }
        _ => {
            for (key, value) in data {
                write_file(dir, key, value, default_mode)?;
            }
        }
    }
    Ok(())
}

fn write_downward(
    ctx: &VolumeContext<'_>,
    dir: &Path,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
) -> Result<(), ConfigError> {
    for item in items {
        if let Some(field) = &item.field_ref {
            let value = field_value(ctx.pod, &field.field_path, ctx.pod_ip)?;
            write_file(
                dir,
                &item.path,
                value.as_bytes(),
                item.mode.or(default_mode).unwrap_or(DEFAULT_MODE),
            )?;
        }
    }
    Ok(())
}

fn write_file(dir: &Path, relative: &str, contents: &[u8], mode: i32) -> Result<(), ConfigError> {
    let relative = Path::new(relative);
    if !relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(ConfigError(format!(
            "volume path {} must be relative without `..`",
            relative.display()
        )));
    }
    let path = dir.join(relative);
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    let io = |e: std::io::Error| ConfigError(format!("writing {}: {e}", path.display()));
    std::fs::write(&path, contents).map_err(io)?;
    let mode = u32::try_from(mode).unwrap_or(0o644) & 0o7777;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    Ok(())
}

fn create_dir(path: &Path) -> Result<(), ConfigError> {
    std::fs::create_dir_all(path)
        .map_err(|e| ConfigError(format!("creating {}: {e}", path.display())))
}

/// A path component from an object name.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}
