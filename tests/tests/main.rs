//! The workspace's integration-test binary.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

mod dependency_rules;
mod lsp_e2e;
mod module_cycles;
