//! `m31rd`: the completion daemon.

fn main() {}
