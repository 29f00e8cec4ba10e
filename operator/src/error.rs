//! Errors of a reconcile. Each has a bounded PascalCase `reason()`, used alike as Event
//! reason, condition reason and metric label.

use crate::probe::ProbeError;

/// What stopped a reconcile. Problems a user must fix (a missing Secret, a database that
/// refuses the login) are errors too: their reconcile ends in a status condition and a
/// Warning Event, and the object is retried with per-object backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "Secret {name:?} not found in namespace {namespace:?}: create it with the database URL under key {key:?}"
    )]
    SecretNotFound {
        namespace: String,
        name: String,
        key: String,
    },

    #[error(
        "Secret {name:?} has no key {key:?}: add the database URL under that key or fix spec.database.urlSecretRef.key"
    )]
    SecretKeyMissing { name: String, key: String },

    #[error("Secret {name:?} key {key:?} is not UTF-8 text: store the database URL as plain text")]
    SecretNotText { name: String, key: String },

    #[error("cannot read the applied revision: {source}")]
    Probe {
        #[source]
        source: ProbeError,
    },

    #[error(
        "the database did not answer within {seconds}s: check that it is reachable from the operator (network policy, host, port)"
    )]
    ProbeTimeout { seconds: u64 },

    #[error("{action} failed")]
    Kube {
        /// What was being done, such as `create Job app-db-1a2b3c4d5e`.
        action: String,
        #[source]
        source: kube::Error,
    },

    #[error("invalid object that cannot be read: {message}")]
    InvalidObject { message: String },

    #[error(
        "the API server refused to create Job {job}: {message} — fix the admission policy, quota or ServiceAccount it names (or the DatabaseMigration's spec); schemagate tries again with backoff"
    )]
    JobRejected { job: String, message: String },
}

impl Error {
    /// Event reason, condition reason and metric label: bounded, PascalCase.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::SecretNotFound { .. } => "SecretNotFound",
            Error::SecretKeyMissing { .. } => "SecretKeyMissing",
            Error::SecretNotText { .. } => "SecretNotText",
            Error::Probe { source } => source.reason(),
            Error::ProbeTimeout { .. } => "DatabaseTimeout",
            Error::Kube { .. } => "KubernetesApiError",
            Error::InvalidObject { .. } => "InvalidObject",
            Error::JobRejected { .. } => "JobRejected",
        }
    }

    /// Whether only a person can fix it (a Secret, credentials, the URL, the tracking
    /// settings, a dirty schema), as opposed to a passing failure that a retry may cure.
    pub fn needs_person(&self) -> bool {
        match self {
            Error::SecretNotFound { .. }
            | Error::SecretKeyMissing { .. }
            | Error::SecretNotText { .. }
            | Error::InvalidObject { .. }
            | Error::JobRejected { .. } => true,
            Error::Probe { source } => !matches!(source, ProbeError::Connect { .. }),
            Error::ProbeTimeout { .. } | Error::Kube { .. } => false,
        }
    }

    /// Wraps a Kubernetes API error with what was being done.
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let action = action.into();
        move |source| Error::Kube { action, source }
    }

    /// The message and its `source()` chain in one line, for Events and conditions.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }
}

impl From<ProbeError> for Error {
    fn from(source: ProbeError) -> Self {
        Error::Probe { source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
