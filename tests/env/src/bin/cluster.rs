//! `schemagate-cluster up --dir DIR`: runs the local control plane, the test node and the
//! databases until SIGINT/SIGTERM (or stdin EOF with `--exit-on-stdin-eof`).
//!
//! Stdout protocol: `control-plane-binary PATH` once the binaries are built, then `ready`.
//! Everything else goes to stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use schemagate_testenv::argocd::{ArgoCd, build_argocd};
use schemagate_testenv::cluster::{Cluster, ClusterOptions, Databases, build_control_plane};
use std::io::Read as _;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "schemagate-cluster",
    about = "Local Kubernetes control plane for schemagate's tests and demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// Start the cluster and run until interrupted.
    Up {
        /// Working directory: kubeconfig, cluster.env, logs/, etcd and database data.
        #[arg(long)]
        dir: PathBuf,
        /// Stop when stdin reaches end-of-file (a parent process holding the pipe exited).
        #[arg(long)]
        exit_on_stdin_eof: bool,
        /// Do not start PostgreSQL and MariaDB.
        #[arg(long, conflicts_with = "databases")]
        no_databases: bool,
        /// The database servers to start: postgres, mariadb, or both (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "postgres,mariadb", value_parser = ["postgres", "mariadb"])]
        databases: Vec<String>,
        /// On exit, remove the etcd, node and database data (logs stay).
        #[arg(long)]
        clean_up: bool,
        /// Also run Argo CD (application controller, repo server, Redis) and a Git server
        /// for bare repositories under DIR/git; see docs/testing.md.
        #[arg(long)]
        argocd: bool,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,kube_client=off,kube_runtime=warn")
            }),
        )
        .init();
    let Commands::Up {
        dir,
        exit_on_stdin_eof,
        no_databases,
        databases,
        clean_up,
        argocd,
    } = Cli::parse().command;
    let databases = if no_databases {
        Databases::NONE
    } else {
        Databases {
            postgres: databases.iter().any(|d| d == "postgres"),
            mariadb: databases.iter().any(|d| d == "mariadb"),
        }
    };
    match up(&dir, exit_on_stdin_eof, databases, clean_up, argocd).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("schemagate-cluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn up(
    dir: &Path,
    exit_on_stdin_eof: bool,
    databases: Databases,
    clean_up: bool,
    with_argocd: bool,
) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let k8s_bin = build_control_plane().await?;
    if with_argocd {
        // Built before the line below: after it, the caller allows only a start-up time.
        build_argocd().await?;
    }
    println!("control-plane-binary {}", k8s_bin.display());

    let started = Instant::now();
    let mut options = ClusterOptions::new(dir);
    options.k8s_bin = Some(k8s_bin);
    options.databases = databases;
    let mut cluster = Cluster::start(options).await?;
    let env = cluster.write_env()?;
    let mut argocd = None;
    if with_argocd {
        let client = schemagate_testenv::cluster::admin_client(cluster.kubeconfig_path()).await?;
        match ArgoCd::start(dir, cluster.kubeconfig_path(), cluster.k8s_bin(), client).await {
            Ok(started) => {
                let mut text = std::fs::read_to_string(&env)?;
                text.push_str(&format!(
                    "export ARGOCD_GIT_ROOT='{}'\nexport ARGOCD_GIT_URL='{}'\n",
                    started.git_root().display(),
                    started.repo_url("")
                ));
                std::fs::write(&env, text)?;
                argocd = Some(started);
            }
            Err(error) => {
                cluster.stop().await;
                return Err(error.context("starting Argo CD"));
            }
        }
    }
    eprintln!(
        "schemagate-cluster: ready in {:.1}s: KUBECONFIG={} (environment in {})",
        started.elapsed().as_secs_f64(),
        cluster.kubeconfig_path().display(),
        env.display()
    );
    println!("ready");

    let stdin_closed = async {
        if !exit_on_stdin_eof {
            return futures::future::pending().await;
        }
        // A plain thread: blocking reads of stdin need no runtime support.
        let (closed, closed_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 256];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buffer), Ok(n) if n > 0) {}
            let _ = closed.send(());
        });
        let _ = closed_rx.await;
    };
    let result = tokio::select! {
        _ = sigterm.recv() => { eprintln!("schemagate-cluster: SIGTERM, stopping"); Ok(()) }
        _ = sigint.recv() => { eprintln!("schemagate-cluster: SIGINT, stopping"); Ok(()) }
        () = stdin_closed => { eprintln!("schemagate-cluster: stdin closed, stopping"); Ok(()) }
        (component, status) = cluster.component_exited() => {
            Err(anyhow::anyhow!("{component} exited unexpectedly ({status:?}); stopping the cluster"))
        }
        (component, status) = async {
            match argocd.as_mut() {
                Some(argocd) => argocd.exited().await,
                None => futures::future::pending().await,
            }
        } => {
            Err(anyhow::anyhow!("{component} exited unexpectedly ({status:?}); stopping the cluster"))
        }
    };
    if let Some(argocd) = argocd.as_mut() {
        argocd.stop().await;
    }
    cluster.stop().await;
    if clean_up {
        for sub in ["etcd", "node", "db"] {
            let _ = std::fs::remove_dir_all(dir.join(sub));
        }
    }
    eprintln!("schemagate-cluster: stopped");
    result
}
