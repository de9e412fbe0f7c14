//! `m31r-lsp`'s integration tests: positions, request building and post-processing snapshots, and
//! the server against a fake daemon speaking the real protocol over a temporary socket, typing
//! along a shown suggestion included.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

mod context_snippets;
mod fake_daemon;
mod first_line;
mod fixture;
mod gate;
mod lsp_client;
mod positions;
mod server;
mod snapshots;
mod speculative;
mod typeahead;
mod warm;
