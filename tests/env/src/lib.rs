//! schemagate's local Kubernetes for end-to-end tests and the demo: the control-plane
//! supervisor ([`cluster`]), the test node that stands in for a kubelet ([`node`]), the
//! database servers ([`db`]) and the e2e harness ([`harness`]). See docs/testing.md.

pub mod argocd;
pub mod cluster;
pub mod db;
pub mod harness;
pub mod logs;
pub mod node;
mod pki;
