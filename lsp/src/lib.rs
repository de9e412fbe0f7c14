//! `m31r-lsp`: the language server between editors and `m31rd`. It owns the open documents, turns
//! editor requests into streaming daemon calls and cleans the completions up before the editor
//! shows them. It depends on `m31r-protocol` only, never on model code.

pub mod config;
pub mod daemon;
pub mod document;
pub mod gate;
pub mod postprocess;
pub mod request;
pub mod server;
pub mod snippets;
pub mod typeahead;
