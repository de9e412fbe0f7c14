//! The device a model runs on, named as users write it (`cpu`, `cuda`, `cuda:1`), and opening
//! it with errors that say which is missing: CUDA support in this binary, or a usable GPU.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A device by name: `cpu`, or `cuda[:N]` (`cuda` is `cuda:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// NVIDIA GPU number `N` (needs a binary built with the `cuda` feature).
    Cuda(usize),
}

/// Why a device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The name is neither `cpu` nor `cuda[:N]`.
    #[error("device {0:?}: expected \"cpu\", \"cuda\" or \"cuda:N\"")]
    Name(String),
    /// A GPU was asked of a binary built without CUDA.
    #[error(
        "device {0}: this binary was built without CUDA support (the `cuda` cargo feature); \
         build it with scripts/cuda-build.sh, or use --device cpu"
    )]
    NotBuilt(DeviceSpec),
    /// The binary has CUDA but the GPU cannot be used (no driver, no such GPU, ...).
    #[error("device {device}: no usable CUDA device ({reason}); `nvidia-smi` lists the GPUs")]
    Unavailable {
        /// The device asked for.
        device: DeviceSpec,
        /// The driver's or candle's error.
        reason: String,
    },
}

/// Whether this binary was built with CUDA support.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    /// Opens the device: the CPU always; a GPU only in a CUDA build on a machine that has it.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(_) if !CUDA_BUILT => Err(DeviceError::NotBuilt(self)),
            DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(|e| {
                // candle appends a backtrace when RUST_BACKTRACE is set: keep the cause only.
                let text = e.to_string();
                let reason = text.lines().next().unwrap_or_default().to_string();
                DeviceError::Unavailable { device: self, reason }
            }),
        }
    }

    /// Whether this is a GPU.
    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| DeviceError::Name(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        for (name, spec, shown) in [
            ("cpu", DeviceSpec::Cpu, "cpu"),
            ("cuda", DeviceSpec::Cuda(0), "cuda:0"),
            ("cuda:3", DeviceSpec::Cuda(3), "cuda:3"),
        ] {
            let parsed: DeviceSpec = name.parse().unwrap();
            assert_eq!(parsed, spec);
            assert_eq!(parsed.to_string(), shown);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", "cuda:-1"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")) && err.contains("cuda:N"), "{err}");
        }
    }

    #[test]
    fn the_cpu_always_opens_and_a_gpu_error_names_what_is_missing() {
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        if CUDA_BUILT {
            // A CUDA build on a machine without a GPU (where tests run) names the device.
            assert!(err.contains("cuda:0") && err.contains("no usable CUDA device"), "{err}");
        } else {
            assert!(err.contains("cuda:0") && err.contains("built without CUDA"), "{err}");
        }
    }
}
