//! The `schemagate` command line.

use crate::certs::CertNames;
use crate::controller::ControllerConfig;
use crate::gate::check;
use crate::probe;
use crate::run::{CertificateSource, RunConfig, WebhookSettings};
use crate::telemetry::{LogFormat, init_logging};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kube::Client;
use kube::api::Api;
use schemagate_crds::{DatabaseMigration, Engine, Tracking, TrackingTool};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "schemagate",
    version,
    about = "Holds Kubernetes rollouts until their database migrations are applied",
    long_about = "schemagate runs database migrations as Kubernetes Jobs, reads the applied revision from the database itself, and keeps opted-in Deployments paused until the revision their code needs is there."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the operator: controllers, admission webhook, metrics and health endpoints.
    Run(RunArgs),
    /// Print the DatabaseMigration CustomResourceDefinition as YAML.
    Crd,
    /// Print the revisions a database reports as applied.
    Probe(ProbeArgs),
    /// List opted-in Deployments and whether their required revisions are applied; exits 1
    /// if any is pending (for CI pipelines, before or after a deploy).
    Check(CheckArgs),
    /// Roll a Deployment back to its previous template, as `kubectl rollout undo` would;
    /// works on a Deployment schemagate holds, which kubectl refuses to roll back.
    Undo(UndoArgs),
    /// Print the version.
    Version,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Watch only this namespace (all namespaces when empty).
    #[arg(long, env = "SCHEMAGATE_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Reconciles running at once, per controller. A DatabaseMigration's reconcile holds
    /// at most one database connection, so this also bounds the connections at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
    /// How often the database of a running migration Job is read, so that the Deployments
    /// needing its revision are released as soon as the migrator commits it (one connection
    /// per running Job; `0s` turns it off and the release waits for the migrator pod's end).
    #[arg(long, default_value = "50ms", value_parser = parse_poll_interval)]
    pub revision_poll_interval: std::time::Duration,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Address the admission webhook listens on (TLS).
    #[arg(long, default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// Run without the admission webhook: the controller alone holds rollouts, after the
    /// Deployment controller may already have started one.
    #[arg(long)]
    pub no_webhook: bool,
    /// The MutatingWebhookConfiguration whose CA bundle the operator keeps current.
    #[arg(long)]
    pub webhook_config_name: Option<String>,
    /// The Service in front of the webhook, for the certificate's names.
    #[arg(long, default_value = "schemagate")]
    pub webhook_service_name: String,
    /// Namespace of that Service and of the certificate Secret.
    #[arg(long, env = "POD_NAMESPACE", default_value = "schemagate-system")]
    pub webhook_service_namespace: String,
    /// Secret where the operator keeps the webhook's certificate.
    #[arg(long, default_value = "schemagate-webhook-tls")]
    pub webhook_cert_secret: String,
    /// IP addresses the webhook certificate is also valid for (repeatable).
    #[arg(long = "webhook-cert-ip")]
    pub webhook_cert_ips: Vec<IpAddr>,
    /// Read tls.crt and tls.key from this directory (cert-manager) instead of managing them.
    #[arg(long)]
    pub webhook_cert_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Run the controllers only on the replica that holds a Lease (several replicas; the
    /// webhook is served by all of them).
    #[arg(long)]
    pub leader_elect: bool,
    /// Name of that Lease, in the operator's namespace (--webhook-service-namespace).
    #[arg(long, default_value = "schemagate")]
    pub leader_election_lease: String,
    /// This replica's name in the Lease; the pod name.
    #[arg(long, env = "POD_NAME")]
    pub leader_election_identity: Option<String>,
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Probe the database of this DatabaseMigration, through its Secret (needs cluster access).
    pub migration: Option<String>,
    /// Namespace of the DatabaseMigration.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Database engine, when probing without a DatabaseMigration: postgres or mysql.
    #[arg(long, required_unless_present = "migration", value_parser = crd_value::<Engine>("engine", || Engine::ALL.map(Engine::name).join(", ")))]
    pub engine: Option<Engine>,
    /// Migration tool whose version table is read, as `tracking.tool` names it
    /// (alembic, flyway, golang-migrate, ...).
    #[arg(long, conflicts_with = "query", value_parser = crd_value::<TrackingTool>("tool", TrackingTool::names))]
    pub tool: Option<TrackingTool>,
    /// SQL query returning the applied revisions in its first column.
    #[arg(long)]
    pub query: Option<String>,
    /// Non-default version table name.
    #[arg(long)]
    pub table: Option<String>,
    /// Environment variable holding the database URL (never pass a password as an argument).
    #[arg(long, default_value = "DATABASE_URL")]
    pub url_env: String,
    /// Exit 1 unless this revision is applied.
    #[arg(long)]
    pub revision: Option<String>,
}

/// Parses a value the way the CRD spells it (`postgres`, `golang-migrate`, ...), so the
/// command line and the resource accept the same words.
fn crd_value<T: serde::de::DeserializeOwned>(
    what: &'static str,
    allowed: fn() -> String,
) -> impl Fn(&str) -> Result<T, String> + Clone {
    move |text: &str| {
        serde_json::from_value(serde_json::Value::String(text.to_string()))
            .map_err(|_| format!("unknown {what} {text:?}; one of {}", allowed()))
    }
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Namespace to check (the kubeconfig's namespace when neither this nor -A is given).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Check every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Wait until every opted-in Deployment has its revision applied and has rolled out.
    /// Exits 1 at once when a migration fails (with its message), 2 on --timeout.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, such as 90s, 10m or 1h.
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    pub timeout: std::time::Duration,
}

fn parse_poll_interval(text: &str) -> Result<std::time::Duration, String> {
    match text {
        "0" | "0s" => Ok(std::time::Duration::ZERO),
        _ => crate::duration::parse_duration(text)
            .filter(|interval| !interval.is_zero())
            .ok_or_else(|| format!("{text:?} is not a duration such as 100ms, 1s or 0s (off)")),
    }
}

fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    crate::duration::parse_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration such as 90s, 10m or 1h"))
}

#[derive(Args, Debug)]
pub struct UndoArgs {
    /// The Deployment.
    pub deployment: String,
    /// Its namespace (the kubeconfig's namespace by default).
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// The ReplicaSet revision to roll back to (`kubectl rollout history`); the previous
    /// template by default.
    #[arg(long)]
    pub to_revision: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// Runs the command line; the exit code says how it went.
pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("schemagate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Crd => match serde_yaml::to_string(&schemagate_crds::crd()) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(error) => fail(format!("cannot render the CRD: {error}")),
        },
        Command::Run(args) => run(args).await,
        Command::Probe(args) => probe_command(args).await,
        Command::Check(args) => check_command(args).await,
        Command::Undo(args) => undo_command(args).await,
    }
}

async fn undo_command(args: UndoArgs) -> ExitCode {
    let (client, namespace) = match client_in(&args.namespace).await {
        Ok(found) => found,
        Err(message) => return fail(message),
    };
    match crate::gate::undo::undo(&client, &namespace, &args.deployment, args.to_revision).await {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(message) => fail(message),
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(2)
}

async fn client() -> Result<Client, String> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("cannot reach Kubernetes (KUBECONFIG or in-cluster config): {e}"))?;
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| format!("cannot reach Kubernetes (KUBECONFIG or in-cluster config): {e}"))?;
    Ok(builder
        .with_layer(&tower::util::MapRequestLayer::new(
            crate::telemetry::count_api_request,
        ))
        .build())
}

/// A client and the namespace a command works in: `-n`, else the kubeconfig's.
async fn client_in(namespace: &Option<String>) -> Result<(Client, String), String> {
    let client = client().await?;
    let namespace = namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    Ok((client, namespace))
}

async fn run(args: RunArgs) -> ExitCode {
    init_logging(args.log_format);
    let client = match client().await {
        Ok(client) => client,
        Err(message) => return fail(message),
    };
    let webhook = (!args.no_webhook).then(|| WebhookSettings {
        addr: args.webhook_addr,
        certificate: match &args.webhook_cert_dir {
            Some(dir) => CertificateSource::Directory(dir.clone()),
            None => CertificateSource::Managed {
                namespace: args.webhook_service_namespace.clone(),
                secret: args.webhook_cert_secret.clone(),
                names: CertNames::for_service(
                    &args.webhook_service_name,
                    &args.webhook_service_namespace,
                    args.webhook_cert_ips.clone(),
                ),
            },
        },
        config_name: args.webhook_config_name.clone(),
    });
    let leader_election = args.leader_elect.then(|| crate::run::LeaderElection {
        namespace: args.webhook_service_namespace.clone(),
        lease: args.leader_election_lease.clone(),
        identity: args
            .leader_election_identity
            .clone()
            .unwrap_or_else(|| format!("schemagate-{}", std::process::id())),
    });
    let config = RunConfig {
        controller: ControllerConfig {
            namespace: args.watch_namespace.clone(),
            concurrency: args.concurrency.max(1),
            revision_poll_interval: args.revision_poll_interval,
        },
        leader_election,
        metrics_addr: Some(args.metrics_addr),
        webhook,
    };
    match crate::run::run(client, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "schemagate stopped");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

async fn probe_command(args: ProbeArgs) -> ExitCode {
    let (engine, tracking, url, revision, graph) = match &args.migration {
        Some(name) => {
            let (client, namespace) = match client_in(&args.namespace).await {
                Ok(found) => found,
                Err(message) => return fail(message),
            };
            let api: Api<DatabaseMigration> = Api::namespaced(client.clone(), &namespace);
            let migration = match api.get(name).await {
                Ok(migration) => migration,
                Err(error) => {
                    return fail(format!("DatabaseMigration {namespace}/{name}: {error}"));
                }
            };
            let ctx_url =
                crate::migration::observe::read_database_url_with(&client, &namespace, &migration)
                    .await;
            let url = match ctx_url {
                Ok(url) => url,
                Err(error) => return fail(error.chain()),
            };
            let revision = args
                .revision
                .clone()
                .or(Some(migration.spec.revision.clone()));
            let graph = migration
                .status
                .as_ref()
                .and_then(|s| s.revision_graph.as_ref())
                .and_then(crate::revision::Graph::from_status);
            (
                migration.spec.database.engine,
                migration.spec.database.tracking,
                url,
                revision,
                graph,
            )
        }
        None => {
            let engine = args.engine.unwrap_or(Engine::Postgres);
            if args.tool.is_none() && args.query.is_none() {
                return fail("name a --tool or a --query (or a DatabaseMigration)");
            }
            let tracking = Tracking {
                tool: args.tool,
                query: args.query.clone(),
                table: args.table.clone(),
            };
            let url = match std::env::var(&args.url_env) {
                Ok(url) => url,
                Err(_) => {
                    return fail(format!(
                        "set the database URL in the environment variable {}",
                        args.url_env
                    ));
                }
            };
            (engine, tracking, url, args.revision.clone(), None)
        }
    };
    match probe::probe_revisions(engine, &url, &tracking).await {
        Ok(applied) => {
            if applied.revisions.is_empty() {
                println!("no revision applied");
            }
            for revision in &applied.revisions {
                println!("{revision}");
            }
            let Some(required) = revision else {
                return ExitCode::SUCCESS;
            };
            let scheme = crate::revision::Scheme::of(&tracking);
            let applied = crate::revision::Applied {
                revisions: &applied.revisions,
                complete: true,
            };
            match crate::revision::answer(scheme, applied, graph.as_ref(), &required) {
                crate::revision::Answer::Satisfied => ExitCode::SUCCESS,
                crate::revision::Answer::NotSatisfied => {
                    eprintln!("revision {required} is not applied");
                    ExitCode::FAILURE
                }
                crate::revision::Answer::CannotTell { why, .. } => {
                    eprintln!("cannot tell whether revision {required} is applied: {why}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(error) => fail(format!("{error} ({})", error.reason())),
    }
}

/// `check --wait`: polls until every row is applied and rolled out, printing each change
/// a person should see; fails fast when a migration needs a person, and on the timeout.
async fn wait_for_rollouts(
    client: &Client,
    namespace: Option<&str>,
    timeout: std::time::Duration,
) -> Result<Vec<check::CheckRow>, ExitCode> {
    const POLL: std::time::Duration = std::time::Duration::from_secs(2);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut said: std::collections::HashMap<String, String> = Default::default();
    loop {
        let rows = match check::check(client, namespace).await {
            Ok(rows) => Some(rows),
            // The API server may be briefly unavailable during a release: say so, go on.
            Err(error) => {
                eprintln!("waiting: cannot list Deployments and DatabaseMigrations: {error}");
                None
            }
        };
        let listed = rows.is_some();
        let rows = rows.unwrap_or_default();
        if let Some(row) = rows.iter().find(|r| r.failed.is_some()) {
            let why = row.failed.clone().unwrap_or_default();
            eprintln!(
                "failed: {}/{} needs revision {} of DatabaseMigration {}, and the migration needs a person: {why}",
                row.namespace,
                row.deployment,
                row.required.clone().unwrap_or_default(),
                row.migration
            );
            return Err(ExitCode::FAILURE);
        }
        let waiting: Vec<&check::CheckRow> =
            rows.iter().filter(|r| r.pending || !r.rolled_out).collect();
        if listed && waiting.is_empty() {
            eprintln!("ready: every revision is applied and every Deployment has rolled out");
            return Ok(rows);
        }
        for row in &waiting {
            let state = if row.pending {
                format!("held: {}", row.message)
            } else {
                "revision applied; rolling out".to_string()
            };
            let key = format!("{}/{}", row.namespace, row.deployment);
            if said.get(&key) != Some(&state) {
                eprintln!("waiting: {key}: {state}");
                said.insert(key, state);
            }
        }
        if tokio::time::Instant::now() + POLL > deadline {
            let names: Vec<String> = waiting
                .iter()
                .map(|r| format!("{}/{}", r.namespace, r.deployment))
                .collect();
            eprintln!(
                "timed out after {}s; still waiting for: {}",
                timeout.as_secs(),
                if names.is_empty() {
                    "the API server".to_string()
                } else {
                    names.join(", ")
                }
            );
            return Err(ExitCode::from(2));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn check_command(args: CheckArgs) -> ExitCode {
    let client = match client().await {
        Ok(client) => client,
        Err(message) => return fail(message),
    };
    let namespace = if args.all_namespaces {
        None
    } else {
        Some(
            args.namespace
                .clone()
                .unwrap_or_else(|| client.default_namespace().to_string()),
        )
    };
    let rows = if args.wait {
        match wait_for_rollouts(&client, namespace.as_deref(), args.timeout).await {
            Ok(rows) => rows,
            Err(code) => return code,
        }
    } else {
        match check::check(&client, namespace.as_deref()).await {
            Ok(rows) => rows,
            Err(error) => {
                return fail(format!(
                    "cannot list Deployments and DatabaseMigrations: {error}"
                ));
            }
        }
    };
    match args.output {
        OutputFormat::Table if rows.is_empty() => {
            println!("no Deployments labelled schemagate.dev/migration")
        }
        OutputFormat::Table => print!("{}", check::render_table(&rows)),
        OutputFormat::Json => {
            let json: Vec<_> = rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "namespace": r.namespace, "deployment": r.deployment, "migration": r.migration,
                        "required": r.required, "applied": r.applied, "pending": r.pending, "message": r.message,
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json).unwrap_or_default()
            );
        }
    }
    if rows.iter().any(|r| r.pending) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
