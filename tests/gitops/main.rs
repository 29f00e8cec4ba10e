//! GitOps end-to-end tests: Argo CD (application controller and repo server built from its
//! Go modules) syncs schemagate-gated apps from a Git repository served on loopback, on a
//! local control plane of this binary's own, with the operator, PostgreSQL and Alembic.
//! See docs/argocd.md for what these tests showed and docs/testing.md for the set-up.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed step fails the test"
)]

mod argo;
mod presync;
mod releases;
#[path = "../e2e/support.rs"]
#[allow(dead_code, reason = "shared with the e2e binary, which uses the rest")]
mod support;
