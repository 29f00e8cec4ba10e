//! Throw-away PostgreSQL and MariaDB servers for tests, from the OS packages.
//!
//! Each server lives in a directory of its own (data, socket, log), listens on a free
//! loopback port with password authentication (so tests can see a wrong password
//! rejected), runs without fsync, and is ready within a few seconds.
//!
//! A server never outlives the test process, even when its [`DatabaseServer`] sits in a
//! static (statics are never dropped) or the process is killed: it runs under a small
//! `sh` supervisor whose stdin is a pipe from this process. The kernel closes that pipe
//! when the process ends, however it ends; at end-of-file the supervisor stops the server
//! and removes its directory. [`DatabaseServer::stop`] and `Drop` close the pipe the same
//! way, and wait.
//!
//! Binaries: PostgreSQL's from `SCHEMAGATE_PG_BINDIR`, else `PATH`, else the newest
//! `/usr/lib/postgresql/*/bin` (Debian's layout); MariaDB's from `PATH` or the system
//! `sbin`/`libexec` directories. As root, PostgreSQL runs as the `postgres` user and
//! MariaDB as root (`--user=root`); otherwise both run as the current user.

use crate::logs::{free_port, log_tail, tail_lines};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use sqlx::{AssertSqlSafe, ConnectOptions as _, Connection as _};

/// How long a started server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopping server may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Start attempts, each on a newly picked port, when another process took the port.
const START_ATTEMPTS: usize = 3;
/// Lines of a log quoted in start errors.
/// The MariaDB administrator created at start-up (root keeps its socket-only login).
const MARIADB_ADMIN: &str = "schemagate_admin";

/// Runs the server given as arguments and stops it when stdin reaches end-of-file.
///
/// `$1` server directory (removed once a requested stop completes), `$2` the signal that
/// stops the server, `$3` log file, `$4...` the server command. A server that exits on its
/// own leaves the directory, for its log to be read. Signals to the supervisor itself
/// (Ctrl-C reaches the whole process group) stop the server the same way.
const SUPERVISOR: &str = r#"
dir=$1 sig=$2 log=$3
shift 3
"$@" </dev/null >>"$log" 2>&1 &
server=$!
echo "$server" >"$dir/server.pid"
stop() { : >"$dir/stopping"; kill -s "$sig" "$server" 2>/dev/null; }
trap stop INT TERM HUP
exec 3<&0
( cat <&3 >/dev/null 2>&1; : >"$dir/stopping"; kill -s "$sig" "$server" 2>/dev/null ) </dev/null >/dev/null 2>&1 &
exec 3<&-
wait "$server"
status=$?
# A trapped signal ends `wait` early: wait until the server has really gone.
while kill -0 "$server" 2>/dev/null; do wait "$server"; status=$?; done
if [ -e "$dir/stopping" ]; then rm -rf "$dir"; fi
exit "$status"
"#;

/// Which server a [`DatabaseServer`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    Postgres,
    Mariadb,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Self::Postgres => "PostgreSQL",
            Self::Mariadb => "MariaDB",
        }
    }

    /// The signal that stops the server without waiting for its clients.
    fn stop_signal(self) -> &'static str {
        match self {
            // SIGTERM would be PostgreSQL's smart shutdown, which waits for clients.
            Self::Postgres => "INT",
            Self::Mariadb => "TERM",
        }
    }
}

/// A running throw-away database server. Stopped, and its directory removed, by
/// [`DatabaseServer::stop`], on drop, or when the test process exits.
#[derive(Debug)]
pub struct DatabaseServer {
    flavor: Flavor,
    dir: PathBuf,
    port: u16,
    admin_password: String,
    supervisor: Option<Child>,
    /// Closing it tells the supervisor to stop the server.
    supervisor_stdin: Option<ChildStdin>,
    /// Whether stopping removes `dir` (not while a start is retried in it).
    owns_dir: bool,
    /// The server's command line, for [`DatabaseServer::restart`].
    command: Vec<String>,
    /// Stdins of supervisors that ended in a restart.
    retired_stdins: Vec<ChildStdin>,
}

impl DatabaseServer {
    /// Starts PostgreSQL in `dir` (created, and removed again when the server stops):
    /// `initdb` with a superuser password and scram-sha-256 for TCP, then `postgres` on a
    /// free port of 127.0.0.1, its socket in `dir`, fsync off.
    pub async fn start_postgres(dir: &Path) -> anyhow::Result<DatabaseServer> {
        let bindir = postgres_bindir()?;
        let admin_password = random_secret();
        let as_root = is_root();
        prepare_dir(dir, as_root)?;
        if let Err(error) = init_postgres(dir, &bindir, &admin_password, as_root).await {
            let _ = std::fs::remove_dir_all(dir);
            return Err(error.context(format!("initializing PostgreSQL in {}", dir.display())));
        }

        let postgres = bindir.join("postgres");
        let data = dir.join("data");
        let socket = dir.join("socket");
        start_supervised(Flavor::Postgres, dir, admin_password, |port| {
            let mut command = Vec::new();
            if as_root {
                // setpriv execs: runuser would fork and relay signals as SIGTERM.
                command.extend(
                    [
                        "setpriv",
                        "--reuid=postgres",
                        "--regid=postgres",
                        "--init-groups",
                        "--",
                    ]
                    .map(String::from),
                );
            }
            command.push(postgres.display().to_string());
            command.extend(["-D".to_string(), data.display().to_string()]);
            command.extend(["-p".to_string(), port.to_string()]);
            command.extend(["-k".to_string(), socket.display().to_string()]);
            for setting in [
                "listen_addresses=127.0.0.1",
                "fsync=off",
                "synchronous_commit=off",
                "full_page_writes=off",
                "shared_buffers=32MB",
                "max_connections=200",
                "logging_collector=off",
            ] {
                command.extend(["-c".to_string(), setting.to_string()]);
            }
            command
        })
        .await
    }

    /// Starts MariaDB in `dir` (created, and removed again when the server stops):
    /// `mariadb-install-db`, then `mariadbd` on a free port of 127.0.0.1 with grants
    /// enforced and an administrator `schemagate_admin` with a password; fsync off.
    pub async fn start_mariadb(dir: &Path) -> anyhow::Result<DatabaseServer> {
        let install_db = find_program(&["mariadb-install-db", "mysql_install_db"])?;
        let mariadbd = find_program(&["mariadbd", "mysqld"])?;
        let admin_password = random_secret();
        let as_root = is_root();
        prepare_dir(dir, false)?;
        let data = dir.join("data");
        let init_file = dir.join("init.sql");
        let user_arg = as_root.then(|| "--user=root".to_string());
        let initialized = async {
            // Runs at every start, before connections are accepted.
            std::fs::write(
                &init_file,
                format!(
                    "CREATE USER IF NOT EXISTS '{MARIADB_ADMIN}'@'%' IDENTIFIED BY '{admin_password}';\n\
                     GRANT ALL PRIVILEGES ON *.* TO '{MARIADB_ADMIN}'@'%' WITH GRANT OPTION;\n"
                ),
            )?;
            std::fs::set_permissions(&init_file, std::fs::Permissions::from_mode(0o600))?;
            let mut install = Command::new(&install_db);
            // --no-defaults must come first: the host's my.cnf is not this server's business.
            install
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .args(user_arg.iter())
                .args(["--skip-test-db", "--skip-name-resolve"])
                .args(MARIADB_SPEED_OPTIONS);
            run(install).await
        };
        if let Err(error) = initialized.await {
            let _ = std::fs::remove_dir_all(dir);
            return Err(error.context(format!("initializing MariaDB in {}", dir.display())));
        }

        start_supervised(Flavor::Mariadb, dir, admin_password, |port| {
            let mut command = vec![
                mariadbd.display().to_string(),
                "--no-defaults".to_string(),
                format!("--datadir={}", data.display()),
                format!("--port={port}"),
                "--bind-address=127.0.0.1".to_string(),
                format!("--socket={}", dir.join("mysqld.sock").display()),
                format!("--pid-file={}", dir.join("mysqld.pid").display()),
                format!("--init-file={}", init_file.display()),
                "--skip-name-resolve".to_string(),
                "--character-set-server=utf8mb4".to_string(),
                "--collation-server=utf8mb4_general_ci".to_string(),
                "--max-connections=200".to_string(),
            ];
            command.extend(user_arg.clone());
            command.extend(MARIADB_SPEED_OPTIONS.map(String::from));
            command
        })
        .await
    }

    /// The administrator's URL: `postgres://postgres:PW@127.0.0.1:PORT/postgres`, or
    /// `mysql://schemagate_admin:PW@127.0.0.1:PORT/mysql`.
    pub fn admin_url(&self) -> String {
        match self.flavor {
            Flavor::Postgres => format!(
                "postgres://postgres:{}@127.0.0.1:{}/postgres",
                self.admin_password, self.port
            ),
            Flavor::Mariadb => format!(
                "mysql://{MARIADB_ADMIN}:{}@127.0.0.1:{}/mysql",
                self.admin_password, self.port
            ),
        }
    }

    /// Creates database `name` and a user of the same name with a random password that
    /// owns it (PostgreSQL) or holds all privileges on it (MariaDB). Returns the user's URL:
    /// `postgres://name:PW@127.0.0.1:PORT/name` or `mysql://name:PW@127.0.0.1:PORT/name`.
    /// `name`: a-z, 0-9 and `_`, starting with a letter, at most 32 characters.
    pub async fn create_database(&self, name: &str) -> anyhow::Result<String> {
        let valid = name.len() <= 32
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        ensure!(
            valid,
            "database name {name:?}: use a-z, 0-9 and _, starting with a letter, at most 32"
        );
        let password = random_secret();
        // `name` was checked and `password` is alphanumeric: nothing to escape.
        match self.flavor {
            Flavor::Postgres => {
                let mut conn = sqlx::PgConnection::connect(&self.admin_url()).await?;
                for statement in [
                    format!("CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'"),
                    format!("CREATE DATABASE \"{name}\" OWNER \"{name}\""),
                ] {
                    sqlx::raw_sql(AssertSqlSafe(statement))
                        .execute(&mut conn)
                        .await
                        .with_context(|| format!("creating PostgreSQL database {name}"))?;
                }
                conn.close().await?;
                Ok(format!(
                    "postgres://{name}:{password}@127.0.0.1:{}/{name}",
                    self.port
                ))
            }
            Flavor::Mariadb => {
                let mut conn = sqlx::MySqlConnection::connect(&self.admin_url()).await?;
                for statement in [
                    format!("CREATE DATABASE `{name}` CHARACTER SET utf8mb4"),
                    format!("CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'"),
                    format!("GRANT ALL PRIVILEGES ON `{name}`.* TO '{name}'@'%'"),
                ] {
                    sqlx::raw_sql(AssertSqlSafe(statement))
                        .execute(&mut conn)
                        .await
                        .with_context(|| format!("creating MariaDB database {name}"))?;
                }
                conn.close().await?;
                Ok(format!(
                    "mysql://{name}:{password}@127.0.0.1:{}/{name}",
                    self.port
                ))
            }
        }
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Takes the server down as a crash or a failover would: every connection is cut at
    /// once (PostgreSQL's fast shutdown, MariaDB's shutdown), nothing listens on the port
    /// while it is down, and it comes back on the same port with the same data. Returns
    /// once it accepts connections again; `down` is how long the port stays closed.
    pub async fn restart(&mut self, down: Duration) -> anyhow::Result<()> {
        let pid = read_pid(&self.dir.join("server.pid")).context("the server's pid")?;
        let status = Command::new("kill")
            .args(["-s", self.flavor.stop_signal(), "--", &pid])
            .status()?;
        ensure!(status.success(), "signalling the server ({pid}) failed");
        // The server exiting on a signal that did not come through the supervisor ends the
        // supervisor and keeps the directory. Its stdin stays open: closing it would mark
        // the directory for removal. It closes when the process ends.
        self.retired_stdins.extend(self.supervisor_stdin.take());
        if let Some(mut supervisor) = self.supervisor.take() {
            tokio::task::spawn_blocking(move || wait_with_timeout(&mut supervisor, STOP_TIMEOUT))
                .await?
                .context("the server did not stop")?;
        }
        tokio::time::sleep(down).await;
        let mut supervisor = spawn_supervisor(self.flavor, &self.dir, &self.command)
            .context("restarting the supervisor")?;
        self.supervisor_stdin = supervisor.stdin.take();
        self.supervisor = Some(supervisor);
        wait_until_ready(self).await.with_context(|| {
            format!(
                "the {} server did not come back; last lines of its log:\n{}",
                self.flavor.name(),
                log_tail(&self.dir.join("server.log"))
            )
        })
    }

    /// Stops the server and removes its directory, and waits for both. A server that does
    /// not stop within 20 s is killed. Idempotent.
    pub fn stop(&mut self) {
        drop(self.supervisor_stdin.take());
        if let Some(mut supervisor) = self.supervisor.take()
            && wait_with_timeout(&mut supervisor, STOP_TIMEOUT).is_none()
        {
            if let Some(pid) = read_pid(&self.dir.join("server.pid")) {
                let _ = Command::new("kill")
                    .args(["-s", "KILL", "--", &pid])
                    .status();
            }
            if wait_with_timeout(&mut supervisor, STOP_TIMEOUT).is_none() {
                let _ = supervisor.kill();
                let _ = supervisor.wait();
            }
        }
        // The supervisor removes the directory after a requested stop; a server that had
        // died on its own left it behind, for its log.
        if std::mem::take(&mut self.owns_dir) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for DatabaseServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Options that trade durability for speed; a throw-away server loses nothing.
const MARIADB_SPEED_OPTIONS: [&str; 6] = [
    "--skip-log-bin",
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=16M",
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    "--innodb-flush-method=nosync",
];

/// `initdb` with the superuser password; as root, everything belongs to the postgres user.
async fn init_postgres(
    dir: &Path,
    bindir: &Path,
    admin_password: &str,
    as_root: bool,
) -> anyhow::Result<()> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    std::fs::create_dir_all(dir.join("socket"))?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;
    let password_file = dir.join("initdb-password");
    std::fs::write(&password_file, admin_password)?;
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600))?;
    if as_root {
        // PostgreSQL refuses to run as root: its files belong to the postgres user.
        let mut chown = Command::new("chown");
        chown.args(["-R", "postgres:postgres"]).arg(dir);
        run(chown)
            .await
            .context("giving the directory to the postgres user")?;
    }
    let mut initdb = if as_root {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(bindir.join("initdb"));
        command
    } else {
        Command::new(bindir.join("initdb"))
    };
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ])
        .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
        .arg(format!("--pwfile={}", password_file.display()));
    let result = run(initdb).await;
    let _ = std::fs::remove_file(&password_file);
    result
}

/// Starts the server under the supervisor on a free port and waits until the
/// administrator can connect; retries on another port when the port was taken meanwhile.
async fn start_supervised(
    flavor: Flavor,
    dir: &Path,
    admin_password: String,
    server_command: impl Fn(u16) -> Vec<String>,
) -> anyhow::Result<DatabaseServer> {
    let log = dir.join("server.log");
    let name = flavor.name();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let port = free_port()?;
        let command = server_command(port);
        let spawned = spawn_supervisor(flavor, dir, &command);
        let mut supervisor = match spawned {
            Ok(supervisor) => supervisor,
            Err(error) => {
                let _ = std::fs::remove_dir_all(dir);
                return Err(error).context(format!("starting the {name} supervisor (sh)"));
            }
        };
        let mut server = DatabaseServer {
            flavor,
            dir: dir.to_path_buf(),
            port,
            admin_password: admin_password.clone(),
            supervisor_stdin: supervisor.stdin.take(),
            supervisor: Some(supervisor),
            owns_dir: true,
            command,
            retired_stdins: Vec::new(),
        };
        let Err(error) = wait_until_ready(&mut server).await else {
            return Ok(server);
        };
        let tail = log_tail(&log);
        let exited = server.supervisor.is_none();
        let port_taken = [
            "Address already in use",
            "could not bind",
            "Do you already have another",
        ]
        .iter()
        .any(|clue| tail.contains(clue));
        if exited && port_taken && attempt < START_ATTEMPTS {
            // Another process took the port between picking and binding it; the data
            // directory is intact, so try again on another port.
            server.owns_dir = false;
            let _ = std::fs::remove_file(&log);
            continue;
        }
        server.stop();
        return Err(error.context(format!(
            "{name} in {} did not start; last lines of its log:\n{tail}",
            dir.display()
        )));
    }
}

/// The server under its supervisor (see [`SUPERVISOR`]), its output appended to
/// `dir/server.log`.
fn spawn_supervisor(flavor: Flavor, dir: &Path, command: &[String]) -> std::io::Result<Child> {
    Command::new("sh")
        .arg("-c")
        .arg(SUPERVISOR)
        .arg("schemagate-db-supervisor")
        .arg(dir)
        .arg(flavor.stop_signal())
        .arg(dir.join("server.log"))
        .args(command)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

async fn wait_until_ready(server: &mut DatabaseServer) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let url = server.admin_url();
    loop {
        if let Some(supervisor) = server.supervisor.as_mut()
            && let Some(status) = supervisor.try_wait()?
        {
            server.supervisor = None;
            bail!("the server exited ({status}) before accepting connections");
        }
        let attempt =
            tokio::time::timeout(Duration::from_secs(2), connect_admin(server.flavor, &url));
        let last_error = match attempt.await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(error)) => error.to_string(),
            Err(_) => "the connection attempt timed out".to_string(),
        };
        if Instant::now() > deadline {
            bail!(
                "not accepting connections after {}s (last attempt: {last_error})",
                READY_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn connect_admin(flavor: Flavor, url: &str) -> anyhow::Result<()> {
    match flavor {
        Flavor::Postgres => {
            let options =
                sqlx::postgres::PgConnectOptions::from_str(url)?.disable_statement_logging();
            options.connect().await?.close().await?;
        }
        Flavor::Mariadb => {
            let options =
                sqlx::mysql::MySqlConnectOptions::from_str(url)?.disable_statement_logging();
            options.connect().await?.close().await?;
        }
    }
    Ok(())
}

/// Creates the server's directory, which must be new or empty. As root, for a server run
/// as the postgres user, makes it and its parent traversable by others (temporary
/// directories are often 0700).
fn prepare_dir(dir: &Path, for_postgres_user: bool) -> anyhow::Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)?.next().is_none();
        ensure!(
            empty,
            "{} exists and is not empty: a server needs a directory of its own",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if for_postgres_user {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        if let Some(parent) = dir.parent() {
            let mode = std::fs::metadata(parent)?.permissions().mode();
            if mode & 0o001 == 0 {
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode | 0o011))?;
            }
        }
    }
    Ok(())
}

/// Runs a set-up command to completion without blocking the runtime (a cluster sets both
/// servers up concurrently); fails with the end of its output.
async fn run(command: Command) -> anyhow::Result<()> {
    let description = format!("{:?}", command.get_program());
    let output = tokio::process::Command::from(command)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {description}"))?;
    ensure!(
        output.status.success(),
        "{description} failed with {}:\n{}{}",
        output.status,
        tail_lines(&String::from_utf8_lossy(&output.stdout)),
        tail_lines(&String::from_utf8_lossy(&output.stderr)),
    );
    Ok(())
}

fn postgres_bindir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SCHEMAGATE_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = find_in_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf)) {
        return Ok(dir);
    }
    // Debian and Ubuntu keep the server binaries out of PATH, one directory per version.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context(
        "PostgreSQL's initdb is not in SCHEMAGATE_PG_BINDIR, PATH or /usr/lib/postgresql/*/bin: \
         install the postgresql package",
    )
}

fn find_program(names: &[&str]) -> anyhow::Result<PathBuf> {
    for name in names {
        if let Some(path) = find_in_path(name) {
            return Ok(path);
        }
        // Server daemons live in sbin or libexec, often outside a user's PATH.
        for dir in [
            "/usr/sbin",
            "/usr/libexec",
            "/usr/local/sbin",
            "/usr/local/libexec",
        ] {
            let path = Path::new(dir).join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    bail!("none of {names:?} is in PATH or sbin/libexec: install the mariadb-server package")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Whether this process runs as root: /proc/self belongs to the effective user.
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn random_secret() -> String {
    std::iter::repeat_with(fastrand::alphanumeric)
        .take(24)
        .collect()
}

fn read_pid(path: &Path) -> Option<String> {
    let pid = std::fs::read_to_string(path).ok()?;
    let pid = pid.trim();
    (!pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())).then(|| pid.to_string())
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => return None,
        }
    }
}
