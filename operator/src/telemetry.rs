//! Metrics (prometheus-client) and logging set-up. Labels are bounded: controller name and
//! error reason only, never object names.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `read` (GET: get, list, watch) or `write` (POST, PUT, PATCH, DELETE).
    pub kind: &'static str,
}

/// Requests this process sent to the Kubernetes API server: exported as
/// `schemagate_api_requests_total{kind="read"|"write"}`.
pub static API_REQUESTS: std::sync::LazyLock<Family<RequestLabels, Counter>> =
    std::sync::LazyLock::new(Family::default);

/// Counts one request to the API server (a layer of the client's service stack).
pub fn count_api_request<B>(request: http::Request<B>) -> http::Request<B> {
    let kind = if request.method() == http::Method::GET {
        "read"
    } else {
        "write"
    };
    API_REQUESTS.get_or_create(&RequestLabels { kind }).inc();
    request
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GateLabels {
    /// `hold` or `release`.
    pub action: &'static str,
    /// `webhook` or `controller`.
    pub by: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub reconciles: Family<ControllerLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub reconcile_duration: Family<ControllerLabels, Histogram>,
    pub gate_changes: Family<GateLabels, Counter>,
    pub admission_duration: Histogram,
    /// 1 while the MutatingWebhookConfiguration exists and trusts the serving certificate;
    /// 0 while it is missing or cannot be repaired (the backstop alone gates then).
    pub webhook_configured: Gauge,
    /// 1 while this replica runs the controllers (holds the Lease, or runs without
    /// leader election), else 0.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("schemagate");
        let reconciles = Family::<ControllerLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            });
        let gate_changes = Family::<GateLabels, Counter>::default();
        let admission_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 14));
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that ended in an error, by reason",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile took",
            reconcile_duration.clone(),
        );
        registry.register(
            "gate_changes",
            "Deployments held or released",
            gate_changes.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "Time the webhook took to decide on a Deployment",
            admission_duration.clone(),
        );
        let webhook_configured = Gauge::default();
        registry.register(
            "webhook_configuration_ready",
            "1 while the webhook configuration exists and trusts the operator's certificate, else 0",
            webhook_configured.clone(),
        );
        registry.register(
            "database_connections",
            "Database connections the revision probe opened (one per read)",
            crate::probe::CONNECTIONS.clone(),
        );
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes API server: reads (get, list, watch) and writes",
            API_REQUESTS.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica runs the controllers (it holds the Lease), else 0",
            leader.clone(),
        );
        Metrics {
            registry,
            webhook_configured,
            leader,
            reconciles,
            failures,
            reconcile_duration,
            gate_changes,
            admission_duration,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the returned guard is dropped.
    pub fn reconcile_started(&self, controller: &'static str) -> ReconcileTimer<'_> {
        let labels = ControllerLabels { controller };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            metrics: self,
            labels,
            start: Instant::now(),
        }
    }

    pub fn reconcile_failed(&self, controller: &'static str, reason: &'static str) {
        self.failures
            .get_or_create(&FailureLabels { controller, reason })
            .inc();
    }

    /// The registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Records a reconcile's duration when dropped, however the reconcile ends.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    labels: ControllerLabels,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Log format of `schemagate run`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the tracing subscriber; `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests start several operators in one process) is harmless.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
