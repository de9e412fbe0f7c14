//! Integration tests of `m31r-model`: forward-path agreement, KV cache, LLaMA parity, training
//! sanity, and the release bundle.

// Test helpers fail loudly by design.
#![allow(clippy::unwrap_used)]

mod bundle;
mod gguf;
mod parity;
mod quant;
mod quant_bundle;
mod transformer;
