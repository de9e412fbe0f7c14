//! Reading the CPU storage candle hands a custom op as plain slices.

use candle_core::{CpuStorage, Layout, Result};

/// The contiguous f32 data of an op input.
pub fn data<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let all = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => candle_core::bail!(
            "{op}: expects a contiguous input, got strides {:?}",
            layout.stride()
        ),
    }
}

/// The contiguous f32 data of a tensor an in-place op updates.
pub(crate) fn data_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a mut [f32]> {
    let (start, end) = match layout.contiguous_offsets() {
        Some(offsets) => offsets,
        None => candle_core::bail!("{op}: expects a contiguous tensor"),
    };
    match storage {
        CpuStorage::F32(all) => Ok(&mut all[start..end]),
        _ => candle_core::bail!("{op}: expects an f32 tensor"),
    }
}
