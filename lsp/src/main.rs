//! `m31r-lsp` binary (filled in with the daemon connection).

fn main() {}
