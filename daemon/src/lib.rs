//! `m31r-daemon`: the engine (model, prefix cache, generation, stop rules), the socket server and
//! the optional localhost HTTP API behind `m31rd`, shared with the `m31r` CLI, which can also run
//! the engine in-process.

pub mod cache;
pub mod config;
pub mod engine;
pub mod http;
pub mod server;
pub mod stops;
pub mod sys;
