//! `schemagate run`: waits for the CRD, then runs the controllers, the webhook and the
//! metrics and health endpoints until told to stop.

use crate::certs::{self, CertError, CertNames};
use crate::context::Context;
use crate::controller::{ControllerConfig, MigrationChanges, run_controllers};
use crate::gate::webhook;
use crate::telemetry::Metrics;
use axum::Router;
use axum::routing::get;
use futures::StreamExt as _;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{conditions, wait::await_condition, watcher};
use kube::{Client, CustomResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
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
    /// Run the controllers only while holding this Lease; `None` runs them at once. The
    /// webhook, metrics and health endpoints run on every replica either way.
    pub leader_election: Option<LeaderElection>,
    /// Serves /metrics, /healthz and /readyz; `None` serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// The admission webhook; `None` runs the controller backstop alone.
    pub webhook: Option<WebhookSettings>,
}

#[derive(Clone, Debug)]
pub struct LeaderElection {
    /// Namespace of the Lease (the operator's own).
    pub namespace: String,
    /// Name of the Lease.
    pub lease: String,
    /// This replica's name in the Lease (its pod name).
    pub identity: String,
}

/// How long a Lease is valid without renewal: a replica that dies without releasing it
/// is replaced after at most this long.
const LEASE_SECONDS: u64 = 15;
/// How long before expiry the holder renews it.
const LEASE_RENEW_BEFORE_SECONDS: u64 = 5;

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
    #[error("leader election on Lease {lease}: {message}")]
    LeaderElection { lease: String, message: String },
    #[error("cannot start the webhook server's thread: {0}")]
    WebhookStart(#[source] std::io::Error),
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
    // The DatabaseMigrations every replica knows, for the webhook, the gate and (on the
    // leader) the migration controller.
    let (store, writer) = reflector::store::<DeserializeGuard<DatabaseMigration>>();
    // Each change to the store is told to the migration controller, when this replica runs
    // it (a few hundred in flight; one that falls behind reads the whole store again).
    let (changes, _) = tokio::sync::broadcast::channel(256);
    let changed = changes.clone();
    // A list's objects reach the store all at once when the list is done: they are told
    // then, so that whoever is told finds them in the store.
    let mut listed = Vec::new();
    let reflected = reflector(
        writer,
        watcher(migrations.clone(), watcher::Config::default()).modify(crate::controller::slim),
    )
    .default_backoff()
    .for_each(move |event| {
        // No receiver (this replica is not leading) is no error.
        match event {
            Ok(watcher::Event::Apply(migration) | watcher::Event::Delete(migration)) => {
                let _ = changed.send(reflector::ObjectRef::from_obj(&migration));
            }
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(migration)) => {
                listed.push(reflector::ObjectRef::from_obj(&migration));
            }
            Ok(watcher::Event::InitDone) => {
                for migration in listed.drain(..) {
                    let _ = changed.send(migration);
                }
            }
            Err(_) => {}
        }
        std::future::ready(())
    });
    let stop_reflecting = stopped();
    tokio::spawn(async move {
        tokio::select! {
            () = reflected => {}
            () = stop_reflecting => {}
        }
    });
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context {
        watch_namespace: config.controller.namespace.clone(),
        revision_poll: config.controller.revision_poll_interval,
        migration_changes: Some(changes.clone()),
        ..Context::new(client.clone(), store, metrics)
    });
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
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|source| RunError::Listen { addr, source })?;
        webhook::serve_apart(listener, tls, router, webhook::CONNECTION_LIMITS, stopped())
            .map_err(RunError::WebhookStart)?;
    }

    let ready_flag = ready.clone();
    let ready_ctx = ctx.clone();
    tokio::spawn(async move {
        while !ready_ctx.migrations_listed(Duration::from_secs(3600)).await {}
        ready_flag.store(true, Ordering::SeqCst);
        info!("DatabaseMigrations listed: ready");
    });
    match &config.leader_election {
        None => {
            info!(namespace = ?config.controller.namespace, concurrency = config.controller.concurrency, "controllers starting");
            ctx.metrics.leader.set(1);
            run_controllers(ctx, &changes, &config.controller, stopped).await;
            info!("controllers stopped");
        }
        Some(election) => lead(&client, ctx, &changes, &config, election, stopped).await?,
    }
    Ok(())
}

/// Runs the controllers whenever this replica holds the Lease, until shutdown; then
/// releases the Lease at once, so that another replica takes over without waiting for it
/// to expire.
async fn lead(
    client: &Client,
    ctx: Arc<Context>,
    changes: &MigrationChanges,
    config: &RunConfig,
    election: &LeaderElection,
    stopped: impl Fn() -> Shutdown + Clone + Send + Sync + 'static,
) -> Result<(), RunError> {
    let failed = |error: kube_lease_manager::LeaseManagerError| RunError::LeaderElection {
        lease: format!("{}/{}", election.namespace, election.lease),
        message: error.to_string(),
    };
    let elect = || async {
        let manager = LeaseManagerBuilder::new(client.clone(), &election.lease)
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(LEASE_SECONDS)
            .with_grace(LEASE_RENEW_BEFORE_SECONDS)
            .with_field_manager(crate::context::FIELD_MANAGER)
            .build()
            .await
            .map_err(failed)?;
        Ok::<_, RunError>(manager.watch().await)
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
    let (mut leading, mut elector) = elect().await?;
    info!(lease = %election.lease, identity = %election.identity, "waiting to lead");
    loop {
        let mut wait = leading.clone();
        // A bool, not the channel's read guard: nothing !Send lives across the awaits below.
        let became_leader = async move { wait.wait_for(|leader| *leader).await.is_ok() };
        tokio::select! {
            ok = became_leader => if !ok { break },
            () = released(&leases, &election.lease) => {
                // The elector only looks again when the holder's term would end: a Lease
                // released by a replica that stopped is taken at once by a new elector.
                drop(leading);
                let _ = elector.await;
                (leading, elector) = elect().await?;
                continue;
            }
            () = stopped() => break,
        }
        info!(identity = %election.identity, namespace = ?config.controller.namespace, "leading: controllers starting");
        ctx.metrics.leader.set(1);
        let lost = leading.clone();
        let stop = stopped.clone();
        let until = move || -> Shutdown {
            let mut lost = lost.clone();
            let stop = stop();
            Box::pin(async move {
                let lost = async move {
                    let _ = lost.wait_for(|leader| !*leader).await;
                };
                tokio::select! {
                    () = lost => {}
                    () = stop => {}
                }
            })
        };
        run_controllers(ctx.clone(), changes, &config.controller, until).await;
        ctx.metrics.leader.set(0);
        if *leading.borrow() {
            info!("controllers stopped; releasing the Lease");
            break;
        }
        warn!(identity = %election.identity, "lost the Lease: controllers stopped, waiting to lead again");
    }
    // Dropping the last receiver makes the elector release the Lease and return.
    drop(leading);
    match elector.await {
        Ok(Ok(_)) => info!("Lease released"),
        Ok(Err(error)) => warn!(%error, "releasing the Lease failed; it expires on its own"),
        Err(error) => warn!(%error, "the leader election task failed"),
    }
    Ok(())
}

/// Completes when the Lease has no holder (its holder released it, before or while this
/// watches); pending while it is held or cannot be watched.
async fn released(leases: &Api<Lease>, name: &str) {
    let held = |lease: &Lease| {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            .is_some_and(|h| !h.is_empty())
    };
    let events = watcher(
        leases.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .applied_objects();
    tokio::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(lease) if held(&lease) => {}
            // Free, whether it was released before this watch began or while it ran.
            Ok(_) => return,
            Err(error) => warn!(%error, "cannot watch the Lease"),
        }
    }
    std::future::pending::<()>().await;
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
