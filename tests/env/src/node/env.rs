//! A container's environment, resolved from the pod spec the way a kubelet does it:
//! `envFrom`, then `env` (literal values with `$(VAR)` expansion, `secretKeyRef`,
//! `configMapKeyRef`, `fieldRef`). Secret values never reach the node's log.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::api::Api;

/// Why a container cannot be configured (a kubelet reports `CreateContainerConfigError`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Secrets and ConfigMaps of one namespace, each fetched at most once per pod start.
pub struct Sources {
    client: kube::Client,
    namespace: String,
    secrets: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
    config_maps: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
}

impl Sources {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_owned(),
            secrets: HashMap::new(),
            config_maps: HashMap::new(),
        }
    }

    /// A Secret's data, `None` when it does not exist.
    pub async fn secret(
        &mut self,
        name: &str,
    ) -> Result<Option<&BTreeMap<String, Vec<u8>>>, ConfigError> {
        if !self.secrets.contains_key(name) {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.namespace);
            let secret = api
                .get_opt(name)
                .await
                .map_err(|e| ConfigError(format!("reading secret {name:?}: {e}")))?;
            let data = secret.map(|s| {
                s.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0))
                    .collect::<BTreeMap<_, _>>()
            });
            self.secrets.insert(name.to_owned(), data);
        }
        Ok(self.secrets.get(name).and_then(Option::as_ref))
    }

    /// A ConfigMap's data and binaryData, `None` when it does not exist.
    pub async fn config_map(
        &mut self,
        name: &str,
    ) -> Result<Option<&BTreeMap<String, Vec<u8>>>, ConfigError> {
        if !self.config_maps.contains_key(name) {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.namespace);
            let config_map = api
                .get_opt(name)
                .await
                .map_err(|e| ConfigError(format!("reading configmap {name:?}: {e}")))?;
            let data = config_map.map(|c| {
                let mut data: BTreeMap<String, Vec<u8>> = c
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes()))
                    .collect();
                data.extend(
                    c.binary_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                );
                data
            });
            self.config_maps.insert(name.to_owned(), data);
        }
        Ok(self.config_maps.get(name).and_then(Option::as_ref))
    }

    /// One key of a Secret; `Ok(None)` only when the reference is optional and missing.
    pub async fn secret_key(
        &mut self,
        name: &str,
        key: &str,
        optional: bool,
    ) -> Result<Option<Vec<u8>>, ConfigError> {
        let data = self.secret(name).await?.cloned();
        self.pick_key(("secret", "Secret"), name, data.as_ref(), key, optional)
    }

    /// One key of a ConfigMap; `Ok(None)` only when the reference is optional and missing.
    pub async fn config_map_key(
        &mut self,
        name: &str,
        key: &str,
        optional: bool,
    ) -> Result<Option<Vec<u8>>, ConfigError> {
        let data = self.config_map(name).await?.cloned();
        self.pick_key(
            ("configmap", "ConfigMap"),
            name,
            data.as_ref(),
            key,
            optional,
        )
    }

    /// A key of an object's data, with the kubelet's messages for what is missing.
    fn pick_key(
        &self,
        (lower, kind): (&str, &str),
        name: &str,
        data: Option<&BTreeMap<String, Vec<u8>>>,
        key: &str,
        optional: bool,
    ) -> Result<Option<Vec<u8>>, ConfigError> {
        match data {
            None if optional => Ok(None),
            None => Err(ConfigError(format!("{lower} {name:?} not found"))),
            Some(data) => match data.get(key) {
                Some(value) => Ok(Some(value.clone())),
                None if optional => Ok(None),
                None => Err(ConfigError(format!(
                    "couldn't find key {key} in {kind} {}/{name}",
                    self.namespace
                ))),
            },
        }
    }
}

/// The value of a downward-API `fieldRef`.
pub fn field_value(pod: &Pod, field_path: &str, pod_ip: &str) -> Result<String, ConfigError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let map_entry = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref()
            .and_then(|m| m.get(key))
            .cloned()
            .unwrap_or_default()
    };
    let map_lines = |map: &Option<BTreeMap<String, String>>| {
        map.as_ref()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={v:?}\n"))
                    .collect::<String>()
            })
            .unwrap_or_default()
    };
    let value = match field_path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "metadata.labels" => map_lines(&meta.labels),
        "metadata.annotations" => map_lines(&meta.annotations),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => pod_ip.to_owned(),
        "status.hostIP" | "status.hostIPs" => "127.0.0.1".to_owned(),
        other => {
            if let Some(key) = other
                .strip_prefix("metadata.labels['")
                .and_then(|k| k.strip_suffix("']"))
            {
                map_entry(&meta.labels, key)
            } else if let Some(key) = other
                .strip_prefix("metadata.annotations['")
                .and_then(|k| k.strip_suffix("']"))
            {
                map_entry(&meta.annotations, key)
            } else {
                return Err(ConfigError(format!("unsupported fieldRef {other:?}")));
            }
        }
    };
    Ok(value)
}

/// Resolves `envFrom` then `env` of `container` on top of `base` (which later entries
/// override). Values may reference earlier variables as `$(NAME)`.
pub async fn resolve(
    sources: &mut Sources,
    pod: &Pod,
    container: &Container,
    pod_ip: &str,
    base: Vec<(String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Env::from(base);
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let secret = match &from.secret_ref {
            Some(reference) => Some((
                "secret",
                reference.name.as_str(),
                reference.optional,
                sources.secret(&reference.name).await?.cloned(),
            )),
            None => None,
        };
        let config_map = match &from.config_map_ref {
            Some(reference) => Some((
                "configmap",
                reference.name.as_str(),
                reference.optional,
                sources.config_map(&reference.name).await?.cloned(),
            )),
            None => None,
        };
        for (kind, name, optional, data) in secret.into_iter().chain(config_map) {
            match data {
                Some(data) => {
                    for (key, value) in data {
                        env.set(
                            format!("{prefix}{key}"),
                            String::from_utf8_lossy(&value).into_owned(),
                        );
                    }
                }
                None if optional == Some(true) => {}
                None => return Err(ConfigError(format!("{kind} {name:?} not found"))),
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            Some(expand(value, |name| env.get(name)))
        } else if let Some(from) = &var.value_from {
            if let Some(r) = &from.secret_key_ref {
                let value = sources
                    .secret_key(&r.name, &r.key, r.optional == Some(true))
                    .await?;
                value.map(|v| String::from_utf8_lossy(&v).into_owned())
            } else if let Some(r) = &from.config_map_key_ref {
                let value = sources
                    .config_map_key(&r.name, &r.key, r.optional == Some(true))
                    .await?;
                value.map(|v| String::from_utf8_lossy(&v).into_owned())
            } else if let Some(r) = &from.field_ref {
                Some(field_value(pod, &r.field_path, pod_ip)?)
            } else {
                // resourceFieldRef and fileKeyRef: no resources to report here.
                tracing::debug!(variable = %var.name, "unsupported valueFrom; leaving the variable unset");
                None
            }
        } else {
            Some(String::new())
        };
        if let Some(value) = value {
            env.set(var.name.clone(), value);
        }
    }
    Ok(env.into_vec())
}

/// Ordered environment with last-wins semantics.
struct Env {
    vars: Vec<(String, String)>,
}

impl From<Vec<(String, String)>> for Env {
    fn from(vars: Vec<(String, String)>) -> Self {
        let mut env = Self { vars: Vec::new() };
        for (k, v) in vars {
            env.set(k, v);
        }
        env
    }
}

impl Env {
    fn set(&mut self, name: String, value: String) {
        match self.vars.iter_mut().find(|(k, _)| *k == name) {
            Some(slot) => slot.1 = value,
            None => self.vars.push((name, value)),
        }
    }

    fn get(&self, name: &str) -> Option<String> {
        self.vars
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    fn into_vec(self) -> Vec<(String, String)> {
        self.vars
    }
}

/// Kubernetes `$(VAR)` expansion: defined variables are substituted, `$$` is a literal `$`,
/// and references to undefined variables stay as written.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        (name == "A").then(|| "alpha".to_owned())
    }

    #[test]
    fn expand_follows_kubernetes_rules() {
        assert_eq!(expand("x-$(A)-y", lookup), "x-alpha-y");
        assert_eq!(expand("$(B)", lookup), "$(B)");
        assert_eq!(expand("$$(A)", lookup), "$(A)");
        assert_eq!(expand("cost $5", lookup), "cost $5");
        assert_eq!(expand("open $(A", lookup), "open $(A");
        assert_eq!(expand("$(A)$(A)", lookup), "alphaalpha");
    }

    #[test]
    fn later_variables_override_earlier_ones() {
        let mut env = Env::from(vec![("A".into(), "1".into()), ("B".into(), "2".into())]);
        env.set("A".into(), "3".into());
        assert_eq!(
            env.into_vec(),
            vec![
                ("A".to_owned(), "3".to_owned()),
                ("B".to_owned(), "2".to_owned())
            ]
        );
    }
}
