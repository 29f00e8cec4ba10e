//! The webhook's serving certificate, made and rotated by the operator itself: a CA and a
//! serving certificate kept in a Secret, the CA bundle patched into the
//! MutatingWebhookConfiguration. With cert-manager the files come from a directory instead.

use crate::context::FIELD_MANAGER;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{Timestamp, ToSpan, tz::TimeZone};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Annotation on the Secret: when the serving certificate expires.
const NOT_AFTER_ANNOTATION: &str = "schemagate.dev/not-after";
/// Annotation on the Secret: the names the certificate was made for.
const NAMES_ANNOTATION: &str = "schemagate.dev/names";
/// A certificate is replaced this long before it expires.
const RENEW_BEFORE_DAYS: i64 = 30;
/// Validity of a new certificate.
const VALID_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot make the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{action} failed: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot read the webhook certificate: {0}")]
    Read(String),
}

/// PEM-encoded serving certificate and key, and the CA bundle clients trust.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_bundle_pem: String,
}

/// Names the serving certificate is valid for.
#[derive(Clone, Debug, Default)]
pub struct CertNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl CertNames {
    /// `service`, `service.namespace`, `service.namespace.svc` and the cluster-local name.
    pub fn for_service(service: &str, namespace: &str, ips: Vec<IpAddr>) -> Self {
        CertNames {
            dns: vec![
                service.to_string(),
                format!("{service}.{namespace}"),
                format!("{service}.{namespace}.svc"),
                format!("{service}.{namespace}.svc.cluster.local"),
            ],
            ips,
        }
    }

    fn key(&self) -> String {
        let mut names: Vec<String> = self.dns.clone();
        names.extend(self.ips.iter().map(|ip| ip.to_string()));
        names.join(",")
    }
}

/// A new CA and a serving certificate signed by it.
pub fn generate(names: &CertNames, now: Timestamp) -> Result<(ServingCert, Timestamp), CertError> {
    let not_after = now
        .to_zoned(TimeZone::UTC)
        .checked_add(VALID_DAYS.days())
        .map_err(|e| CertError::Read(e.to_string()))?;
    let not_after_time = rcgen::date_time_ymd(
        i32::from(not_after.year()),
        not_after.month().unsigned_abs(),
        not_after.day().unsigned_abs(),
    );
    let today = now.to_zoned(TimeZone::UTC);
    let not_before = rcgen::date_time_ymd(
        i32::from(today.year()),
        today.month().unsigned_abs(),
        today.day().unsigned_abs(),
    );

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "schemagate webhook CA");
    ca_params.not_before = not_before;
    ca_params.not_after = not_after_time;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.dns.clone())?;
    params
        .subject_alt_names
        .extend(names.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.distinguished_name.push(
        DnType::CommonName,
        names
            .dns
            .first()
            .map(String::as_str)
            .unwrap_or("schemagate"),
    );
    params.not_before = not_before;
    params.not_after = not_after_time;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((
        ServingCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_bundle_pem: ca_cert.pem(),
        },
        not_after.timestamp(),
    ))
}

/// Reads the certificate from the Secret, or makes a new one when it is missing, made for
/// other names or close to expiry, and writes it back. The previous CA stays in the bundle
/// so that the API server trusts both the old and the new certificate while the change
/// spreads; [`keep_ca_bundle`] puts the bundle into the webhook configuration.
pub async fn ensure(
    client: &Client,
    namespace: &str,
    secret_name: &str,
    names: &CertNames,
    now: Timestamp,
) -> Result<ServingCert, CertError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = secrets
        .get_opt(secret_name)
        .await
        .map_err(|source| CertError::Kube {
            action: format!("get Secret {secret_name}"),
            source,
        })?;
    let current = existing
        .as_ref()
        .and_then(|secret| usable(secret, names, now));
    let cert = match current {
        Some(cert) => cert,
        None => {
            let (mut cert, not_after) = generate(names, now)?;
            if let Some(old_ca) = existing.as_ref().and_then(|s| text(s, "ca.crt")) {
                cert.ca_bundle_pem = format!("{}{}", cert.ca_bundle_pem, old_ca);
            }
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(secret_name.to_string()),
                    namespace: Some(namespace.to_string()),
                    annotations: Some(BTreeMap::from([
                        (NOT_AFTER_ANNOTATION.to_string(), not_after.to_string()),
                        (NAMES_ANNOTATION.to_string(), names.key()),
                    ])),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".to_string()),
                data: Some(BTreeMap::from([
                    (
                        "tls.crt".to_string(),
                        ByteString(cert.cert_pem.clone().into_bytes()),
                    ),
                    (
                        "tls.key".to_string(),
                        ByteString(cert.key_pem.clone().into_bytes()),
                    ),
                    (
                        "ca.crt".to_string(),
                        ByteString(cert.ca_bundle_pem.clone().into_bytes()),
                    ),
                ])),
                ..Default::default()
            };
            // Created or replaced only from the version read: with several replicas, one
            // writes and the others take what it wrote, so all serve the same certificate.
            let written = match &existing {
                None => secrets.create(&PostParams::default(), &secret).await,
                Some(current) => {
                    let mut secret = secret;
                    secret.metadata.resource_version = current.metadata.resource_version.clone();
                    secrets
                        .replace(secret_name, &PostParams::default(), &secret)
                        .await
                }
            };
            match written {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    let stored =
                        secrets
                            .get(secret_name)
                            .await
                            .map_err(|source| CertError::Kube {
                                action: format!("get Secret {secret_name}"),
                                source,
                            })?;
                    return usable(&stored, names, now).ok_or_else(|| {
                        CertError::Read(format!(
                            "Secret {secret_name} was changed meanwhile and holds no usable certificate"
                        ))
                    });
                }
                Err(source) => {
                    return Err(CertError::Kube {
                        action: format!("write Secret {secret_name}"),
                        source,
                    });
                }
            }
            tracing::info!(secret = secret_name, %not_after, "made a new webhook serving certificate");
            cert
        }
    };
    Ok(cert)
}

fn text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

fn usable(secret: &Secret, names: &CertNames, now: Timestamp) -> Option<ServingCert> {
    let annotations = secret.annotations();
    if annotations.get(NAMES_ANNOTATION) != Some(&names.key()) {
        return None;
    }
    let not_after: Timestamp = annotations.get(NOT_AFTER_ANNOTATION)?.parse().ok()?;
    let renew_at = not_after
        .checked_sub((RENEW_BEFORE_DAYS * 24).hours())
        .ok()?;
    if now >= renew_at {
        return None;
    }
    Some(ServingCert {
        cert_pem: text(secret, "tls.crt")?,
        key_pem: text(secret, "tls.key")?,
        ca_bundle_pem: text(secret, "ca.crt")?,
    })
}

/// Sets the CA bundle of every webhook of the configuration, if it differs.
pub async fn patch_ca_bundle(
    client: &Client,
    config: &str,
    ca_bundle_pem: &str,
) -> Result<(), CertError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let current = api.get(config).await.map_err(|source| CertError::Kube {
        action: format!("get MutatingWebhookConfiguration {config}"),
        source,
    })?;
    let bundle = ByteString(ca_bundle_pem.as_bytes().to_vec());
    let webhooks: Vec<serde_json::Value> = current
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.client_config.ca_bundle.as_ref() != Some(&bundle))
        .map(|w| serde_json::json!({"name": w.name, "clientConfig": {"caBundle": bundle}}))
        .collect();
    if webhooks.is_empty() {
        return Ok(());
    }
    api.patch(
        config,
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        },
        &Patch::Strategic(serde_json::json!({ "webhooks": webhooks })),
    )
    .await
    .map_err(|source| CertError::Kube {
        action: format!("patch the CA bundle of MutatingWebhookConfiguration {config}"),
        source,
    })?;
    Ok(())
}

/// cert-manager mode: the certificate and key files of a mounted Secret.
pub fn read_dir(dir: &std::path::Path) -> Result<ServingCert, CertError> {
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .map_err(|e| CertError::Read(format!("{}: {e}", dir.join(file).display())))
    };
    Ok(ServingCert {
        cert_pem: read("tls.crt")?,
        key_pem: read("tls.key")?,
        ca_bundle_pem: read("ca.crt").unwrap_or_default(),
    })
}

/// Keeps the CA bundle of the webhook configuration `config` equal to `bundle`, for as long
/// as `stop` does not complete: a watch on the configuration repairs a wiped or wrong
/// bundle within moments of the change, a new bundle (a rotated certificate) is written at
/// once, and a missing configuration is reported (metric `webhook_configuration_ready` 0,
/// a warning) and patched as soon as it appears. The operator's controllers do not wait for
/// any of it: they gate Deployments on their own while the webhook cannot.
pub async fn keep_ca_bundle(
    client: Client,
    config: String,
    mut bundle: tokio::sync::watch::Receiver<String>,
    ready: prometheus_client::metrics::gauge::Gauge,
    stop: impl std::future::Future<Output = ()>,
) {
    use futures::StreamExt as _;
    use kube::runtime::WatchStreamExt as _;
    use kube::runtime::watcher;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let events = watcher(
        api,
        watcher::Config::default().fields(&format!("metadata.name={config}")),
    )
    .default_backoff();
    tokio::pin!(events);
    tokio::pin!(stop);
    let mut seen = false;
    loop {
        let check = tokio::select! {
            () = &mut stop => return,
            changed = bundle.changed() => changed.is_ok(),
            event = events.next() => match event {
                Some(Ok(watcher::Event::Apply(_) | watcher::Event::InitApply(_))) => {
                    seen = true;
                    true
                }
                Some(Ok(watcher::Event::Delete(_))) => {
                    seen = false;
                    true
                }
                Some(Ok(watcher::Event::Init)) => {
                    seen = false;
                    false
                }
                Some(Ok(watcher::Event::InitDone)) => true,
                Some(Err(error)) => {
                    tracing::warn!(%error, config, "cannot watch the webhook configuration; retrying");
                    false
                }
                None => return,
            },
        };
        if !check {
            continue;
        }
        if !seen {
            ready.set(0);
            tracing::warn!(
                config,
                "MutatingWebhookConfiguration {config} does not exist: the admission webhook is off and the controllers alone hold Deployments (a rollout may start before they pause it); reinstall the chart to restore it"
            );
            continue;
        }
        let pem = bundle.borrow().clone();
        match patch_ca_bundle(&client, &config, &pem).await {
            Ok(()) => {
                if ready.get() != 1 {
                    tracing::info!(
                        config,
                        "webhook configuration trusts the serving certificate"
                    );
                }
                ready.set(1);
            }
            Err(error) => {
                ready.set(0);
                tracing::warn!(%error, config, "cannot set the webhook configuration's CA bundle; retrying on its next change");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_is_signed_for_the_service_names() {
        let names = CertNames::for_service(
            "schemagate",
            "schemagate-system",
            vec!["127.0.0.1".parse().unwrap()],
        );
        let now: Timestamp = "2026-11-24T00:00:00Z".parse().unwrap();
        let (cert, not_after) = generate(&names, now).unwrap();
        assert!(cert.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(cert.key_pem.contains("PRIVATE KEY"));
        assert!(
            cert.ca_bundle_pem
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
        assert_eq!(not_after.to_string(), "2027-11-24T00:00:00Z");
    }

    #[test]
    fn renews_near_expiry_or_for_new_names() {
        let names = CertNames::for_service("a", "b", vec![]);
        let now: Timestamp = "2026-11-24T00:00:00Z".parse().unwrap();
        let (cert, not_after) = generate(&names, now).unwrap();
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                annotations: Some(BTreeMap::from([
                    (NOT_AFTER_ANNOTATION.to_string(), not_after.to_string()),
                    (NAMES_ANNOTATION.to_string(), names.key()),
                ])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (
                    "tls.crt".to_string(),
                    ByteString(cert.cert_pem.into_bytes()),
                ),
                ("tls.key".to_string(), ByteString(cert.key_pem.into_bytes())),
                (
                    "ca.crt".to_string(),
                    ByteString(cert.ca_bundle_pem.into_bytes()),
                ),
            ])),
            ..Default::default()
        };
        assert!(usable(&secret, &names, now).is_some());
        let late: Timestamp = "2027-11-01T00:00:00Z".parse().unwrap();
        assert!(usable(&secret, &names, late).is_none());
        let other = CertNames::for_service("c", "b", vec![]);
        assert!(usable(&secret, &other, now).is_none());
    }
}
