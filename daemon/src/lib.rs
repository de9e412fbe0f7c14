//! `m31r-daemon`: the engine (model, prefix cache, generation, stop rules) and the socket server
//! behind `m31rd`, shared with the `m31r` CLI, which can also run the engine in-process.

pub mod cache;
pub mod config;
pub mod engine;
pub mod server;
pub mod stops;
