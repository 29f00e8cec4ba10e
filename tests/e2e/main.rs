//! End-to-end tests: one local control plane per run of this binary (see docs/testing.md).

mod cluster;
mod gate;
mod operator;
mod probe;
mod support;
