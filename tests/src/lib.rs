//! `m31r-tests`: workspace-level tests (dependency rules now; end to end pipeline → bundle →
//! daemon → LSP as those crates land). The tests live in `tests/`, in one binary.
