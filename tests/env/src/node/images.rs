//! The image map: which container images the test node runs as local programs.
//!
//! One ConfigMap per image in namespace [`IMAGES_NAMESPACE`], labelled
//! `schemagate.dev/test-image=true`, with data keys `image` (the exact reference), `dir`
//! (working directory), optional `path` (colon-separated PATH prefix) and optional
//! `entrypoint` (JSON array, used when the container has no `command`). An entry with
//! `oci` (`LAYOUT_DIR:TAG`) runs the container inside that image instead (see
//! [`super::oci`]); `dir`, `path` and `entrypoint` do not apply to it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, ObjectMeta};

use crate::cluster::{IMAGE_LABEL, IMAGES_NAMESPACE};

/// How to run one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    pub image: String,
    pub dir: PathBuf,
    pub path_prefix: Option<String>,
    pub entrypoint: Option<Vec<String>>,
    /// An OCI layout and tag (`LAYOUT_DIR:TAG`) whose root filesystem the container runs in.
    pub oci: Option<String>,
}

impl ImageEntry {
    /// An image run from an OCI layout: `reference` is `LAYOUT_DIR:TAG`.
    pub fn oci(image: &str, reference: &str) -> Self {
        Self {
            image: image.to_owned(),
            dir: PathBuf::from("/"),
            path_prefix: None,
            entrypoint: None,
            oci: Some(reference.to_owned()),
        }
    }
}

impl ImageEntry {
    /// The ConfigMap that registers this entry.
    pub fn to_config_map(&self) -> anyhow::Result<ConfigMap> {
        let mut data = BTreeMap::new();
        data.insert("image".to_owned(), self.image.clone());
        data.insert("dir".to_owned(), self.dir.display().to_string());
        if let Some(path) = &self.path_prefix {
            data.insert("path".to_owned(), path.clone());
        }
        if let Some(entrypoint) = &self.entrypoint {
            data.insert("entrypoint".to_owned(), serde_json::to_string(entrypoint)?);
        }
        if let Some(oci) = &self.oci {
            data.insert("oci".to_owned(), oci.clone());
        }
        Ok(ConfigMap {
            metadata: ObjectMeta {
                name: Some(config_map_name(&self.image)),
                namespace: Some(IMAGES_NAMESPACE.to_owned()),
                labels: Some([(IMAGE_LABEL.to_owned(), "true".to_owned())].into()),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        })
    }

    fn from_config_map(config_map: &ConfigMap) -> anyhow::Result<Self> {
        let name = config_map.metadata.name.as_deref().unwrap_or_default();
        let data = config_map
            .data
            .as_ref()
            .with_context(|| format!("image map entry {name} has no data"))?;
        let field = |key: &str| data.get(key).filter(|v| !v.is_empty()).cloned();
        let entrypoint = match field("entrypoint") {
            Some(json) => Some(serde_json::from_str::<Vec<String>>(&json).with_context(|| {
                format!("image map entry {name}: entrypoint is not a JSON array of strings")
            })?),
            None => None,
        };
        let oci = field("oci");
        let dir = match (field("dir"), &oci) {
            (Some(dir), _) => dir,
            (None, Some(_)) => "/".to_owned(),
            (None, None) => anyhow::bail!("image map entry {name} has no `dir`"),
        };
        Ok(Self {
            image: field("image")
                .with_context(|| format!("image map entry {name} has no `image`"))?,
            dir: PathBuf::from(dir),
            path_prefix: field("path"),
            entrypoint,
            oci,
        })
    }
}

/// `text` as a readable DNS-1123 label: lowercase alphanumerics, other characters as `-`,
/// at most `max` characters, no leading or trailing `-`.
pub fn dns_label(text: &str, max: usize) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let cut: String = mapped.trim_matches('-').chars().take(max).collect();
    cut.trim_end_matches('-').to_string()
}

/// A DNS-1123 name for an image's ConfigMap: readable prefix plus a hash of the reference.
pub fn config_map_name(image: &str) -> String {
    let readable = dns_label(image, 40);
    // FNV-1a: stable across runs and platforms, unlike std's hasher.
    let hash = image.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("img-{readable}-{:08x}", hash & 0xffff_ffff)
}

/// The whole map, read at pod start so a just-registered image is never missed.
pub async fn load(client: &kube::Client) -> anyhow::Result<Vec<ImageEntry>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), IMAGES_NAMESPACE);
    let list = api
        .list(&ListParams::default().labels(&format!("{IMAGE_LABEL}=true")))
        .await
        .context("listing the image map")?;
    let mut entries = Vec::new();
    for config_map in &list.items {
        match ImageEntry::from_config_map(config_map) {
            Ok(entry) => entries.push(entry),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "ignoring image map entry"),
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_map_names_are_dns_labels_and_distinct() {
        let a = config_map_name("registry.example/App:4515ca8");
        let b = config_map_name("registry.example/app:4515ca9");
        assert!(a.starts_with("img-registry-example-app-4515ca8-"), "{a}");
        assert_ne!(a, b);
        assert!(a.len() <= 63);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
    }

    #[test]
    fn entries_round_trip_through_config_maps() {
        let entry = ImageEntry {
            image: "example/web:1".into(),
            dir: PathBuf::from("/srv/web"),
            path_prefix: Some("/opt/bin".into()),
            entrypoint: Some(vec!["python3".into(), "-m".into(), "http.server".into()]),
            oci: None,
        };
        let config_map = entry.to_config_map().unwrap();
        assert_eq!(ImageEntry::from_config_map(&config_map).unwrap(), entry);
        let image = ImageEntry::oci("example/op:1", "/srv/image/oci:1");
        let config_map = image.to_config_map().unwrap();
        assert_eq!(ImageEntry::from_config_map(&config_map).unwrap(), image);
    }
}
