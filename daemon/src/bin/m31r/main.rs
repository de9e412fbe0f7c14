//! `m31r`: command-line client of the daemon.

fn main() {}
