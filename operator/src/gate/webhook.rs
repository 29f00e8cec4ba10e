//! The mutating admission webhook: pauses an opted-in Deployment and marks it held before
//! it is stored, when its required revision is not applied, so that no ReplicaSet of the
//! new template is ever created early.

use crate::certs::ServingCert;
use crate::context::Context;
use crate::gate::{self, Verdict};
use crate::telemetry::GateLabels;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::apps::v1::Deployment;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::reflector::ObjectRef;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use std::time::Instant;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How long a request waits for the DatabaseMigrations to be listed after a start.
const STORE_WAIT: Duration = Duration::from_secs(3);

/// Path the webhook configuration points at.
pub const PATH: &str = "/mutate-deployments";

/// The TLS configuration in use; replaced when the certificate is rotated.
pub type TlsConfig = Arc<RwLock<Arc<ServerConfig>>>;

pub fn tls_config(cert: &ServingCert) -> Result<Arc<ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("webhook certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| format!("webhook key: {e}"))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("webhook certificate and key: {e}"))?;
    Ok(Arc::new(config))
}

pub fn router(ctx: Arc<Context>) -> Router {
    Router::new().route(PATH, post(mutate)).with_state(ctx)
}

async fn mutate(
    State(ctx): State<Arc<Context>>,
    Json(review): Json<AdmissionReview<Deployment>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let started = Instant::now();
    let request: AdmissionRequest<Deployment> = match review.try_into() {
        Ok(request) => request,
        Err(error) => {
            return Json(
                AdmissionResponse::invalid(format!("not an AdmissionReview: {error}"))
                    .into_review(),
            );
        }
    };
    // Right after a start the DatabaseMigrations may not be listed yet: wait a moment,
    // then refuse rather than admit a Deployment unchecked.
    if tokio::time::timeout(STORE_WAIT, ctx.migrations.wait_until_ready())
        .await
        .is_err()
    {
        let response = AdmissionResponse::from(&request).deny(
            "schemagate is starting and has not read the DatabaseMigrations yet; retry in a few seconds",
        );
        return Json(response.into_review());
    }
    let response = admit(&ctx, &request);
    ctx.metrics
        .admission_duration
        .observe(started.elapsed().as_secs_f64());
    Json(response.into_review())
}

/// Decides on one workload. Always allows it: holding means pausing, never refusing.
pub fn admit<W: gate::Workload>(ctx: &Context, request: &AdmissionRequest<W>) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    let Some(deployment) = &request.object else {
        return response;
    };
    // The operator's own holds and releases follow a fresh read; a cache that lags a few
    // milliseconds must not undo them.
    if let (Some(user), Some(identity)) = (&request.user_info.username, ctx.identity.get())
        && user == identity
    {
        return response;
    }
    // No revision to wait for: a hold made earlier is released by the controller, which
    // says why in an Event.
    let Some(requirement) = gate::requirement(deployment) else {
        return response;
    };
    // An update that starts no rollout of a workload already running free with the same
    // requirement is let through: a hold now could only take back a release made on a
    // reading this replica's store has not seen the status of yet (the controller holds a
    // workload whose revision is not applied, whatever the webhook did).
    if let Some(old) = &request.old_object
        && !gate::held_by_schemagate(old)
        && !old.rollout_stopped()
        && old.same_template(deployment)
        && gate::requirement(old).as_ref() == Some(&requirement)
    {
        return response;
    }
    let namespace = request.namespace.clone().unwrap_or_default();
    let key = ObjectRef::new(&requirement.migration).within(&namespace);
    let verdict = gate::evaluate_current(ctx, ctx.migrations.get(&key).as_deref(), &requirement);
    let change = gate::decide(deployment, Some(&requirement), &verdict);
    let operations = gate::json_patch(deployment, &change);
    if operations.is_empty() {
        return response;
    }
    let action = match change {
        gate::GateChange::Hold { .. } => "hold",
        _ => "release",
    };
    match serde_json::from_value::<json_patch::Patch>(serde_json::Value::Array(operations)) {
        Ok(patch) => match response.clone().with_patch(patch) {
            Ok(patched) => {
                ctx.metrics
                    .gate_changes
                    .get_or_create(&GateLabels {
                        action,
                        by: "webhook",
                    })
                    .inc();
                let mut patched = patched;
                if let Verdict::Held { message, .. } = &verdict {
                    tracing::info!(
                        namespace = request.namespace.as_deref().unwrap_or_default(),
                        name = request.name,
                        "admission: held: {message}"
                    );
                    // kubectl, Helm and Argo CD show admission warnings to the person.
                    let resumed = request
                        .old_object
                        .as_ref()
                        .is_some_and(|old| gate::held_by_schemagate(old) && old.rollout_stopped());
                    patched.warnings = Some(vec![hold_warning(&requirement, resumed)]);
                }
                patched
            }
            Err(error) => {
                tracing::warn!(%error, "admission: cannot encode the patch; the controller will hold instead");
                response
            }
        },
        Err(error) => {
            tracing::warn!(%error, "admission: cannot build the patch; the controller will hold instead");
            response
        }
    }
}

/// The admission warning of a hold, within the 256 characters clients show in full.
fn hold_warning(requirement: &gate::Requirement, resumed: bool) -> String {
    let gate::Requirement {
        migration,
        revision,
    } = requirement;
    let what = if resumed {
        "schemagate kept this rollout paused"
    } else {
        "schemagate paused this rollout"
    };
    let text = format!(
        "{what}: it needs revision {revision} of DatabaseMigration {migration}, not applied yet; it resumes by itself once the database reports it (kubectl describe dbm {migration})"
    );
    text.chars().take(256).collect()
}

/// How long a client may take to complete the TLS handshake, and then to send the headers
/// of each request (an idle keep-alive connection included): a peer that opens connections
/// and sends nothing cannot hold the webhook's sockets and tasks. The idle limit is above
/// the 90 s for which the API server's client keeps an idle connection (Go's default
/// transport): the client closes first, so an admission request never crosses the server
/// closing its connection (a POST, which the client would not retry).
pub const CONNECTION_LIMITS: ConnectionLimits = ConnectionLimits {
    handshake: Duration::from_secs(10),
    headers: Duration::from_secs(120),
};

/// Timeouts of one webhook connection, see [`CONNECTION_LIMITS`].
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub handshake: Duration,
    pub headers: Duration,
}

/// Serves the webhook over TLS until `shutdown`, on a thread of its own with a runtime of
/// its own. Every Deployment write the webhook covers waits for its answer, so an
/// admission never queues behind the controllers' work: on the operator's runtime a reconcile
/// that decodes a large list, or a burst of watch events, holds a worker for milliseconds,
/// and a small machine has only a few. The answer needs only the stores and the readings,
/// which both runtimes share.
pub fn serve_apart(
    listener: std::net::TcpListener,
    tls: TlsConfig,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("webhook".into())
        .spawn(move || {
            let served = runtime.block_on(async move {
                serve(
                    TcpListener::from_std(listener)?,
                    tls,
                    router,
                    limits,
                    shutdown,
                )
                .await
            });
            if let Err(error) = served {
                tracing::warn!(%error, "webhook server stopped");
            }
        })
}

/// Serves the webhook over TLS until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: TlsConfig,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "webhook listening");
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut shutdown => return Ok(()),
        };
        // An answer is one small write: nothing to gain from waiting to fill a segment.
        let _ = stream.set_nodelay(true);
        let config = match tls.read() {
            Ok(config) => config.clone(),
            Err(_) => continue,
        };
        let service = TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let accept = TlsAcceptor::from(config).accept(stream);
            let Ok(Ok(stream)) = tokio::time::timeout(limits.handshake, accept).await else {
                return;
            };
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.headers)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, reason = "test code")]

    use super::*;
    use crate::certs::{CertNames, generate};
    use tokio::io::AsyncReadExt as _;
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    const LIMITS: ConnectionLimits = ConnectionLimits {
        handshake: Duration::from_millis(300),
        headers: Duration::from_millis(300),
    };

    /// A webhook server on a free loopback port; returns its address and its CA.
    async fn server() -> (std::net::SocketAddr, String) {
        let names =
            CertNames::for_service("schemagate", "test", vec!["127.0.0.1".parse().expect("ip")]);
        let (cert, _) =
            generate(&names, k8s_openapi::jiff::Timestamp::now()).expect("a certificate");
        let tls: TlsConfig = Arc::new(RwLock::new(tls_config(&cert).expect("TLS config")));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(serve(
            listener,
            tls,
            Router::new(),
            LIMITS,
            std::future::pending::<()>(),
        ));
        (addr, cert.ca_bundle_pem)
    }

    /// Reads until the server closes the connection; fails if it stays open for 5 s.
    async fn closed_by_server(stream: &mut (impl tokio::io::AsyncRead + Unpin)) {
        let mut buffer = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("the server closed the connection in time");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "nothing was served: {read:?}"
        );
    }

    /// A context whose store is listed and empty, and whose client is never called.
    fn listed_context() -> Arc<Context> {
        use kube::runtime::{reflector, watcher};
        let (service, _handle) = tower_test::mock::pair::<
            http::Request<kube::client::Body>,
            http::Response<kube::client::Body>,
        >();
        let client = kube::Client::new(service, "default");
        let (store, mut writer) =
            reflector::store::<kube::core::DeserializeGuard<schemagate_crds::DatabaseMigration>>();
        writer.apply_watcher_event(&watcher::Event::InitDone);
        Arc::new(Context::new(
            client,
            store,
            Arc::new(crate::telemetry::Metrics::default()),
        ))
    }

    /// A random JSON value of small depth, biased to the shapes an AdmissionReview has.
    fn value(rng: &mut fastrand::Rng, depth: u32) -> serde_json::Value {
        use serde_json::{Value, json};
        let words = [
            "",
            "true",
            "0002",
            "apps/v1",
            "Deployment",
            "schemagate.dev/migration",
            "app-db",
            "UPDATE",
            "\u{0}",
            "ü",
        ];
        match rng.u8(0..if depth == 0 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(rng.bool()),
            2 => json!(rng.i64(-3..1_000_000)),
            3 => json!(words[rng.usize(..words.len())]),
            4 => json!(rng.f64()),
            5 => Value::Array(
                (0..rng.usize(0..4))
                    .map(|_| value(rng, depth - 1))
                    .collect(),
            ),
            _ => {
                let keys = [
                    "apiVersion",
                    "kind",
                    "request",
                    "uid",
                    "object",
                    "oldObject",
                    "metadata",
                    "labels",
                    "annotations",
                    "spec",
                    "paused",
                    "template",
                    "operation",
                    "userInfo",
                    "namespace",
                ];
                Value::Object(
                    (0..rng.usize(0..5))
                        .map(|_| {
                            (
                                keys[rng.usize(..keys.len())].to_string(),
                                value(rng, depth - 1),
                            )
                        })
                        .collect(),
                )
            }
        }
    }

    /// A well-formed review of an update of an opted-in Deployment.
    fn well_formed_review() -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "e911857d-c318-11e8-bbad-025000000001",
                "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
                "resource": {"group": "apps", "version": "v1", "resource": "deployments"},
                "operation": "UPDATE", "namespace": "shop", "name": "web",
                "userInfo": {"username": "alice"},
                "object": {
                    "apiVersion": "apps/v1", "kind": "Deployment",
                    "metadata": {"name": "web", "namespace": "shop", "labels": {"schemagate.dev/migration": "app-db"}},
                    "spec": {"selector": {}, "template": {"metadata": {"annotations": {"schemagate.dev/revision": "0002"}}, "spec": {"containers": []}}}
                },
                "oldObject": null
            }
        })
    }

    /// A well-formed review of an opted-in Deployment, with random fields changed.
    fn review(rng: &mut fastrand::Rng) -> serde_json::Value {
        let mut review = well_formed_review();
        let paths: [&[&str]; 7] = [
            &["request", "object", "spec", "paused"],
            &["request", "object", "metadata", "labels"],
            &["request", "object", "metadata", "annotations"],
            &[
                "request",
                "object",
                "spec",
                "template",
                "metadata",
                "annotations",
            ],
            &["request", "oldObject"],
            &["request", "operation"],
            &["request", "userInfo"],
        ];
        for _ in 0..rng.usize(0..3) {
            let path = paths[rng.usize(..paths.len())];
            let mut slot = &mut review;
            for key in path {
                slot = &mut slot[*key];
            }
            *slot = value(rng, 3);
        }
        review
    }

    /// An update of a Deployment running free with the same requirement and template starts
    /// no rollout: let through, whatever this replica's store says (it may not yet hold the
    /// status a release followed). A new template, or one held or paused before, is judged.
    #[tokio::test]
    async fn an_update_that_starts_no_rollout_of_a_free_deployment_is_let_through() {
        let ctx = listed_context();
        let mut review = well_formed_review();
        review["request"]["oldObject"] = review["request"]["object"].clone();
        review["request"]["object"]["metadata"]["annotations"] =
            serde_json::json!({"team": "shop"});
        let admitted = |review: &serde_json::Value| {
            let review: kube::core::admission::AdmissionReview<Deployment> =
                serde_json::from_value(review.clone()).expect("a review");
            let request: AdmissionRequest<Deployment> = review.try_into().expect("a request");
            admit(&ctx, &request).patch.is_none()
        };
        assert!(admitted(&review), "no rollout: let through");
        let mut new_template = review.clone();
        new_template["request"]["object"]["spec"]["template"]["spec"]["containers"] =
            serde_json::json!([{"name": "app", "image": "app:v3"}]);
        assert!(!admitted(&new_template), "a new template is held");
        let mut was_paused = review.clone();
        was_paused["request"]["oldObject"]["spec"]["paused"] = true.into();
        assert!(!admitted(&was_paused), "a paused one is judged");
        let mut created = review.clone();
        created["request"]["oldObject"] = serde_json::Value::Null;
        assert!(!admitted(&created), "no old object: judged");
    }

    /// Whatever arrives, the webhook answers without panicking, and never releases: a
    /// response either has no patch or one that pauses.
    #[tokio::test]
    async fn malformed_admission_reviews_never_crash_and_never_release() {
        use tower::ServiceExt as _;
        let ctx = listed_context();
        let mut rng = fastrand::Rng::with_seed(0x5c4e_3a9a);
        let (mut refused, mut patched) = (0, 0);
        for case in 0..2_000 {
            let body = match case % 3 {
                0 => (0..rng.usize(0..64))
                    .map(|_| rng.u8(..))
                    .collect::<Vec<u8>>(),
                1 => serde_json::to_vec(&value(&mut rng, 4)).expect("JSON"),
                _ => serde_json::to_vec(&review(&mut rng)).expect("JSON"),
            };
            let request = http::Request::post(PATH)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body.clone()))
                .expect("a request");
            let response = router(ctx.clone())
                .oneshot(request)
                .await
                .expect("infallible");
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .expect("a body");
            if !status.is_success() {
                // Refused as malformed: the API server fails the admission (failurePolicy).
                refused += 1;
                continue;
            }
            let answer: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON answer");
            // kube writes the patch's bytes as a JSON array (the API server reads both that
            // and base64).
            let patch: Vec<u8> = match &answer["response"]["patch"] {
                serde_json::Value::String(text) => base64_decode(text),
                serde_json::Value::Array(bytes) => bytes
                    .iter()
                    .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                    .collect(),
                _ => continue,
            };
            patched += 1;
            let operations: Vec<serde_json::Value> =
                serde_json::from_slice(&patch).expect("a JSON patch");
            for operation in &operations {
                let paused = operation["path"] == "/spec/paused";
                assert!(
                    !paused || operation["value"] == true,
                    "case {case} released: {operation} for {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        // Both kinds were exercised: garbage refused, and holds made.
        assert!(
            refused > 100 && patched > 100,
            "refused {refused}, patched {patched}"
        );
    }

    fn base64_decode(text: &str) -> Vec<u8> {
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut bits = 0u32;
        let mut count = 0;
        let mut out = Vec::new();
        for byte in text.bytes().filter(|b| *b != b'=') {
            let index = alphabet.iter().position(|a| *a == byte).expect("base64") as u32;
            bits = (bits << 6) | index;
            count += 6;
            if count >= 8 {
                count -= 8;
                out.push((bits >> count) as u8);
                bits &= (1 << count) - 1;
            }
        }
        out
    }

    /// A client config that trusts `ca`.
    fn client_config(ca: &str) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots
                .add(cert.expect("a CA certificate"))
                .expect("adding the CA");
        }
        ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    /// Posts `review` to the webhook at `addr` over TLS, on a runtime of its own; returns
    /// the whole HTTP answer.
    fn post_review(addr: std::net::SocketAddr, ca: &str, review: &serde_json::Value) -> String {
        use tokio::io::AsyncWriteExt as _;
        let body = review.to_string();
        let request = format!(
            "POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let config = client_config(ca);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let mut tls = TlsConnector::from(Arc::new(config))
                .connect("127.0.0.1".try_into().expect("a server name"), stream)
                .await
                .expect("the handshake completes");
            tls.write_all(request.as_bytes())
                .await
                .expect("the request is sent");
            let mut answer = String::new();
            let _ = tls.read_to_string(&mut answer).await;
            answer
        })
    }

    /// The webhook answers on its own thread while the runtime that started it is blocked,
    /// as the operator's runtime may be by the controllers' work, and its thread ends when
    /// told to stop.
    #[tokio::test(flavor = "current_thread")]
    async fn the_webhook_answers_while_the_operators_runtime_is_busy() {
        let names =
            CertNames::for_service("schemagate", "test", vec!["127.0.0.1".parse().expect("ip")]);
        let (cert, _) =
            generate(&names, k8s_openapi::jiff::Timestamp::now()).expect("a certificate");
        let tls: TlsConfig = Arc::new(RwLock::new(tls_config(&cert).expect("TLS config")));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let addr = listener.local_addr().expect("address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = serve_apart(listener, tls, router(listed_context()), LIMITS, async {
            let _ = stopped.await;
        })
        .expect("the webhook's thread starts");

        let (answered, answer) = std::sync::mpsc::channel();
        let ca = cert.ca_bundle_pem.clone();
        std::thread::spawn(move || {
            let _ = answered.send(post_review(addr, &ca, &well_formed_review()));
        });
        // This runtime's only thread waits here, blocked, until the answer comes.
        let answer = answer
            .recv_timeout(Duration::from_secs(10))
            .expect("answered while the starting runtime was blocked");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let (_, body) = answer.split_once("\r\n\r\n").expect("a body");
        let review: serde_json::Value = serde_json::from_str(body).expect("an AdmissionReview");
        assert_eq!(review["response"]["allowed"], true, "{review}");
        let patch: Vec<u8> = serde_json::from_value(review["response"]["patch"].clone())
            .expect("a patch: the DatabaseMigration is not known, so the rollout is held");
        let patch = String::from_utf8(patch).expect("a JSON patch");
        assert!(patch.contains("/spec/paused"), "held: {patch}");

        stop.send(()).expect("the server is running");
        let (ended, end) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = ended.send(server.join().is_ok());
        });
        assert_eq!(
            end.recv_timeout(Duration::from_secs(10)),
            Ok(true),
            "the webhook's thread ends when told to stop"
        );
    }

    #[tokio::test]
    async fn a_client_that_never_completes_the_handshake_is_dropped() {
        let (addr, _) = server().await;
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        closed_by_server(&mut stream).await;
    }

    #[tokio::test]
    async fn a_client_that_sends_no_request_is_dropped() {
        let (addr, ca) = server().await;
        let config = client_config(&ca);
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect("127.0.0.1".try_into().expect("a server name"), stream)
            .await
            .expect("the handshake completes");
        closed_by_server(&mut tls).await;
    }
}
