//! Database URLs: checked here before sqlx sees them, so a bad URL yields a message that
//! names the wrong part without echoing the URL (it carries the password).

use std::fmt;

use schemagate_crds::Engine;

use super::ProbeError;

/// How to write a database URL; appended to every URL problem.
const URL_SHAPE: &str = "expected postgres://USER:PASSWORD@HOST:PORT/DATABASE or \
     mysql://USER:PASSWORD@HOST:PORT/DATABASE";

/// Hint for URLs whose password or user name broke the URL's structure.
const ENCODING_HINT: &str = "if the user name or password contains / ? # @ : or %, \
     percent-encode it (%2F %3F %23 %40 %3A %25)";

/// A database URL whose structure was checked, with its scheme mapped to the one sqlx knows.
///
/// Accepts `postgres://`, `postgresql://`, `mysql://` and `mariadb://`, and SQLAlchemy's
/// `dialect+driver://` (for example `postgresql+psycopg2://`, `mysql+pymysql://`), so the
/// Secret a Python migrator uses works unchanged.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl {
    engine: Engine,
    sqlx_url: String,
    database: Option<String>,
    /// The user name (not secret): PostgreSQL's default database is named after it.
    user: Option<String>,
    host: String,
    port: Option<u16>,
}

impl DatabaseUrl {
    /// Checks the URL's structure and maps its scheme. Errors name the wrong part only.
    pub fn parse(url: &str) -> Result<Self, ProbeError> {
        // Secrets written with `echo` or a heredoc often end with a newline.
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(invalid("it has no scheme such as postgres:// or mysql://"));
        };
        let scheme = scheme.to_ascii_lowercase();
        let is_scheme_word = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if !is_scheme_word {
            return Err(invalid(
                "its scheme is not a word such as postgres or mysql",
            ));
        }
        // SQLAlchemy names the Python driver after a `+`; sqlx has its own drivers.
        let dialect = scheme.split('+').next().unwrap_or_default();
        let (engine, sqlx_scheme) = match dialect {
            "postgres" | "postgresql" => (Engine::Postgres, "postgres"),
            "mysql" | "mariadb" => (Engine::Mysql, "mysql"),
            other => {
                return Err(invalid(&format!(
                    "its scheme `{other}` is not supported; use postgres:// or mysql://"
                )));
            }
        };

        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let mut user_name = None;
        let host_port = match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let (user, password) = match userinfo.split_once(':') {
                    Some((user, password)) => (user, Some(password)),
                    None => (userinfo, None),
                };
                user_name = percent_decode(user);
                if user_name.is_none() {
                    return Err(invalid(&format!(
                        "its user name is not valid percent-encoding; {ENCODING_HINT}"
                    )));
                }
                if password.is_some_and(|p| percent_decode(p).is_none()) {
                    return Err(invalid(&format!(
                        "its password is not valid percent-encoding; {ENCODING_HINT}"
                    )));
                }
                &authority[at + 1..]
            }
            // An `@` after the authority means a `/`, `?` or `#` in the password cut it short.
            None if tail.contains('@') => {
                return Err(invalid(&format!(
                    "its user name or password ends the host part early; {ENCODING_HINT}"
                )));
            }
            None => authority,
        };
        let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(invalid("its IPv6 host lacks the closing ]"));
            };
            (host, after.strip_prefix(':'))
        } else {
            match host_port.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (host_port, None),
            }
        };
        if let Some(port) = port.filter(|p| !p.is_empty())
            && !matches!(port.parse::<u16>(), Ok(1..))
        {
            return Err(invalid(&format!(
                "its port is not a number from 1 to 65535; {ENCODING_HINT}"
            )));
        }

        let path = tail.split(['?', '#']).next().unwrap_or_default();
        let path = path.strip_prefix('/').unwrap_or(path);
        let database = match percent_decode(path) {
            None => return Err(invalid("its database name is not valid percent-encoding")),
            Some(name) if name.contains('/') => {
                return Err(invalid("its path must be only the database name"));
            }
            Some(name) if name.is_empty() => None,
            Some(name) => Some(name),
        };

        Ok(Self {
            engine,
            sqlx_url: format!("{sqlx_scheme}://{rest}"),
            database,
            user: user_name.filter(|u| !u.is_empty()),
            host: host.to_ascii_lowercase(),
            port: port.and_then(|p| p.parse().ok()),
        })
    }

    /// The engine the scheme names.
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The database named in the URL's path, if any.
    pub fn database(&self) -> Option<&str> {
        self.database.as_deref()
    }

    /// Which database server and database this URL names, seen from a pod of `namespace`,
    /// with no credentials: `postgres://db.shop:5432/app`. Two URLs with the same identity
    /// reach the same database whatever user, options or spelling of the Service name they
    /// use (`db`, `db.shop`, `db.shop.svc`, `db.shop.svc.cluster.local` in namespace
    /// `shop`), so migrations of it take turns across namespaces.
    pub fn identity(&self, namespace: &str) -> String {
        let engine = match self.engine {
            Engine::Postgres => "postgres",
            Engine::Mysql => "mysql",
        };
        let port = self.port.unwrap_or(match self.engine {
            Engine::Postgres => 5432,
            Engine::Mysql => 3306,
        });
        // Without a database name, PostgreSQL connects to the one named after the user.
        let database = match (&self.database, self.engine) {
            (Some(database), _) => database.as_str(),
            (None, Engine::Postgres) => self.user.as_deref().unwrap_or_default(),
            (None, Engine::Mysql) => "",
        };
        let host = canonical_host(&self.host, namespace);
        format!("{engine}://{host}:{port}/{database}")
    }

    /// The URL with the scheme sqlx understands. Secret: never log it.
    pub(crate) fn sqlx_url(&self) -> &str {
        &self.sqlx_url
    }
}

// The URL holds the password: Debug shows only what is safe to log.
impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseUrl")
            .field("engine", &self.engine)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// A host name as the cluster's DNS resolves it from a pod of `namespace`: a Service's
/// short name gains the namespace, the cluster domain is dropped, loopback is one name.
/// Only the default cluster domain is known; a host spelled with another one still works,
/// it is just not recognised as the same server as its short name.
fn canonical_host(host: &str, namespace: &str) -> String {
    let host = host.trim_end_matches('.');
    if host.is_empty() || host == "localhost" || host == "::1" || host.starts_with("127.") {
        return "localhost".to_string();
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return host.to_string();
    }
    let host = host.strip_suffix(".cluster.local").unwrap_or(host);
    let host = host.strip_suffix(".svc").unwrap_or(host);
    if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{namespace}")
    }
}

fn invalid(problem: &str) -> ProbeError {
    ProbeError::InvalidUrl {
        problem: format!("{problem} ({URL_SHAPE})"),
    }
}

/// Decodes `%XX` escapes; `None` when an escape is malformed or the result is not UTF-8.
pub(crate) fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// Removes the database URL, its password and its `user:password` from `text`.
///
/// Covers the URL as given and trimmed, the password raw and percent-decoded, a
/// `password=` query parameter, and — for URLs whose unencoded password broke their
/// structure — everything between `://` and the last `@`. A very short password is
/// removed wherever it occurs, even inside other words: the safe side of a trade-off.
pub fn scrub_secret(text: &str, url: &str) -> String {
    let mut secrets: Vec<String> = Vec::new();
    let trimmed = url.trim();
    // Raw, percent-decoded, and form-decoded (`+` for space) as a query value may be.
    let add_password = |secrets: &mut Vec<String>, password: &str| {
        secrets.push(password.to_string());
        if let Some(decoded) = percent_decode(password) {
            secrets.push(decoded);
        }
        secrets.push(password.replace('+', " "));
    };
    if let Some((_, rest)) = trimmed.split_once("://") {
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        for userinfo in [
            rest[..authority_end].rfind('@').map(|at| &rest[..at]),
            rest.rfind('@').map(|at| &rest[..at]),
        ]
        .into_iter()
        .flatten()
        {
            secrets.push(userinfo.to_string());
            if let Some((_, password)) = userinfo.split_once(':') {
                add_password(&mut secrets, password);
            }
        }
        if let Some((_, query)) = rest.split_once('?') {
            for pair in query.split('&') {
                if let Some(("password", value)) = pair.split_once('=') {
                    add_password(&mut secrets, value);
                }
            }
        }
    }
    secrets.retain(|s| !s.is_empty());
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();

    let mut scrubbed = text.to_string();
    for whole in [url, trimmed] {
        if !whole.is_empty() {
            scrubbed = scrubbed.replace(whole, "[database URL]");
        }
    }
    for secret in &secrets {
        scrubbed = scrubbed.replace(secret.as_str(), "[redacted]");
    }
    scrubbed
}
