//! Integration tests of the data pipeline: corpus, tokenizer, shards, bad input, and the CLI.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

mod bad_input;
mod cli;
mod common;
mod corpus;
mod eval;
mod quickstart;
mod report;
mod shards;
mod tokenizer;
mod train;
