//! `m31r-daemon`: the engine, prefix cache and socket server behind `m31rd`.
