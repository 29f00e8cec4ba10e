//! End-to-end tests: one local control plane per run of this binary (see docs/testing.md).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step fails the test"
)]

mod chart;
mod cluster;
mod crashes;
mod gate;
mod helm;
mod images;
mod operator;
mod outage;
mod policy;
mod probe;
pub mod replicas;
mod restarts;
mod revisions;
mod support;
