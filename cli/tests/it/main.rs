//! Integration tests of the `m31r` crate: the documents it stands on (the protocol reference and
//! the example daemon config) agree with the code, and `bench replay` runs end to end.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

mod bench_replay;
mod device;
mod example_config;
mod protocol_doc;
