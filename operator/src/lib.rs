//! schemagate: holds Kubernetes rollouts until their database migrations are applied.
//!
//! A reconcile reads top to bottom: [`observe`] reads the world, [`plan`] decides (pure),
//! [`apply`] writes the Job and the status. [`gate`] decides holds and releases for the
//! admission [`webhook`] and the backstop in [`controller`].

pub mod backoff;
pub mod certs;
pub mod cli;
pub mod conditions;
pub mod context;
pub mod controller;
pub mod duration;
pub mod error;
pub mod gate;
pub mod migration;
pub mod probe;
pub mod report;
pub mod revision;
pub mod run;
pub mod telemetry;

#[cfg(test)]
pub(crate) mod testing;

pub use context::FIELD_MANAGER;
