//! LSP overhead benchmark (filled in with the benchmark step).

fn main() {}
