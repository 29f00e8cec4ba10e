//! `schemagate run`: waits for the CRD, then runs the controllers, the webhook and the
//! metrics and health endpoints until told to stop.

use crate::certs::{self, CertError, CertNames};
use crate::context::Context;
use crate::controller::{ControllerConfig, run_controllers};
use crate::gate::webhook;
use crate::telemetry::Metrics;
use axum::Router;
use axum::routing::get;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Controller;
use kube::runtime::{conditions, wait::await_condition, watcher};
use kube::{Client, CustomResourceExt};
use schemagate_crds::DatabaseMigration;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::{info, warn};

/// How often the managed webhook certificate is checked for renewal.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(6 * 3600);
/// How often certificate files from cert-manager are read again.
const CERT_DIR_CHECK_INTERVAL: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub controller: ControllerConfig,
    /// Serves /metrics, /healthz and /readyz; `None` serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// The admission webhook; `None` runs the controller backstop alone.
    pub webhook: Option<WebhookSettings>,
}

#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub addr: SocketAddr,
    pub certificate: CertificateSource,
    /// The MutatingWebhookConfiguration whose CA bundle the operator keeps current.
    pub config_name: Option<String>,
}

#[derive(Clone, Debug)]
pub enum CertificateSource {
    /// The operator makes and rotates the certificate, kept in this Secret.
    Managed {
        namespace: String,
        secret: String,
        names: CertNames,
    },
    /// cert-manager (or a person) provides tls.crt and tls.key in this directory.
    Directory(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{action} failed: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Certificate(#[from] CertError),
    #[error("webhook TLS: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

type Shutdown = Pin<Box<dyn Future<Output = ()> + Send + Sync>>;

/// Runs the operator until `shutdown` completes.
pub async fn run(
    client: Client,
    config: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || -> Shutdown {
        let mut rx = stop_rx.clone();
        Box::pin(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        })
    };

    wait_for_crd(&client).await?;
    let migrations: Api<DeserializeGuard<DatabaseMigration>> = match &config.controller.namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    };
    let controller = Controller::new(migrations, watcher::Config::default());
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(client.clone(), controller.store(), metrics));
    match whoami(&client).await {
        Ok(name) => {
            let _ = ctx.identity.set(name);
        }
        Err(error) => {
            warn!(%error, "cannot tell the operator's own user name; the webhook will judge its changes too")
        }
    }

    let ready = Arc::new(AtomicBool::new(false));
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Listen { addr, source })?;
        let app = health_router(ctx.clone(), ready.clone());
        let stop = stopped();
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                warn!(%error, "metrics server stopped");
            }
        });
        info!(%addr, "metrics and health endpoints listening");
    }

    if let Some(settings) = &config.webhook {
        let cert = load_certificate(&client, settings).await?;
        let tls: webhook::TlsConfig = Arc::new(RwLock::new(
            webhook::tls_config(&cert).map_err(RunError::Tls)?,
        ));
        let (bundle_tx, bundle_rx) = tokio::sync::watch::channel(cert.ca_bundle_pem.clone());
        match &settings.config_name {
            Some(name) => {
                tokio::spawn(certs::keep_ca_bundle(
                    client.clone(),
                    name.clone(),
                    bundle_rx,
                    ctx.metrics.webhook_configured.clone(),
                    stopped(),
                ));
            }
            // cert-manager's CA injector keeps the bundle.
            None => {
                ctx.metrics.webhook_configured.set(1);
            }
        }
        // Managed: renew before expiry. Directory: cert-manager renews the files; re-read them.
        tokio::spawn(rotate_certificate(
            client.clone(),
            settings.clone(),
            tls.clone(),
            cert,
            bundle_tx,
            stopped(),
        ));
        let router = webhook::router(ctx.clone());
        let addr = settings.addr;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Listen { addr, source })?;
        let stop = stopped();
        tokio::spawn(async move {
            if let Err(error) =
                webhook::serve(listener, tls, router, webhook::CONNECTION_LIMITS, stop).await
            {
                warn!(%error, "webhook server stopped");
            }
        });
    }

    let ready_flag = ready.clone();
    let ready_ctx = ctx.clone();
    tokio::spawn(async move {
        while !ready_ctx.migrations_listed(Duration::from_secs(3600)).await {}
        ready_flag.store(true, Ordering::SeqCst);
        info!("DatabaseMigrations listed: ready");
    });
    info!(namespace = ?config.controller.namespace, concurrency = config.controller.concurrency, "controllers starting");
    run_controllers(ctx, controller, &config.controller, stopped).await;
    info!("controllers stopped");
    Ok(())
}

/// Waits until the DatabaseMigration CRD is established, saying so while it waits.
async fn wait_for_crd(client: &Client) -> Result<(), RunError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = DatabaseMigration::crd_name();
    loop {
        match tokio::time::timeout(
            Duration::from_secs(10),
            await_condition(crds.clone(), name, conditions::is_crd_established()),
        )
        .await
        {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(error)) => warn!(%error, crd = name, "cannot watch the CRD; retrying"),
            Err(_) => warn!(
                crd = name,
                "waiting for the CRD to be installed and established (`schemagate crd | kubectl apply -f -`)"
            ),
        }
    }
}

async fn whoami(client: &Client) -> Result<String, RunError> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .map_err(|source| RunError::Kube {
            action: "SelfSubjectReview",
            source,
        })?;
    Ok(review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default())
}

async fn load_certificate(
    client: &Client,
    settings: &WebhookSettings,
) -> Result<certs::ServingCert, RunError> {
    Ok(match &settings.certificate {
        CertificateSource::Managed {
            namespace,
            secret,
            names,
        } => {
            certs::ensure(
                client,
                namespace,
                secret,
                names,
                k8s_openapi::jiff::Timestamp::now(),
            )
            .await?
        }
        CertificateSource::Directory(dir) => certs::read_dir(dir)?,
    })
}

async fn rotate_certificate(
    client: Client,
    settings: WebhookSettings,
    tls: webhook::TlsConfig,
    mut current: certs::ServingCert,
    bundle: tokio::sync::watch::Sender<String>,
    stop: Shutdown,
) {
    tokio::pin!(stop);
    let interval = match settings.certificate {
        CertificateSource::Managed { .. } => CERT_CHECK_INTERVAL,
        CertificateSource::Directory(_) => CERT_DIR_CHECK_INTERVAL,
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = &mut stop => return,
        }
        match load_certificate(&client, &settings).await {
            Ok(cert) if cert != current => match webhook::tls_config(&cert) {
                Ok(config) => {
                    if let Ok(mut slot) = tls.write() {
                        *slot = config;
                    }
                    let _ = bundle.send(cert.ca_bundle_pem.clone());
                    current = cert;
                    info!("webhook certificate rotated");
                }
                Err(error) => warn!(%error, "new webhook certificate unusable"),
            },
            Ok(_) => {}
            Err(error) => warn!(%error, "cannot renew the webhook certificate; retrying later"),
        }
    }
}

fn health_router(ctx: Arc<Context>, ready: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::SeqCst);
                async move {
                    if ready {
                        (http::StatusCode::OK, "ready")
                    } else {
                        (
                            http::StatusCode::SERVICE_UNAVAILABLE,
                            "listing DatabaseMigrations",
                        )
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let text = ctx.metrics.encode();
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
}
