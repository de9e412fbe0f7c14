//! Integration tests of `m31rd`: a real daemon process on a temporary socket, serving a tiny seeded
//! bundle, driven through the protocol client.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

mod common;
mod connections;
mod http;
mod lifecycle;
mod requests;
