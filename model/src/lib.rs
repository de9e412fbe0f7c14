//! `m31r-model`: everything about the model that both training and serving need — config and
//! presets, parameter accounting, the LLaMA-shaped transformer with its KV cache, the tokenizer, the
//! FIM prompt layout, sampling and the release bundle. No async runtime, no I/O besides bundles.

pub mod bundle;
pub mod config;
pub mod demo;
pub mod device;
pub mod fim;
pub mod gguf;
pub mod machine;
pub mod params;
pub mod quant;
pub mod recall;
pub mod rng;
pub mod sampling;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

pub use bundle::{Bundle, BundleError, BundleInfo, BundleMetadata, write_bundle};
pub use config::{ConfigError, ModelConfig, Preset, RawModelConfig};
pub use device::{DeviceError, DeviceSpec};
pub use params::{ParamTable, SolverSpec, solve};
pub use quant::Precision;
pub use sampling::{Sampler, SamplingParams};
pub use tokenizer::{SpecialToken, Tokenizer};
pub use transformer::{AttentionKernel, Decode, KvCache, Model, ModelError, Pick};
