//! The KV cache: preallocated, head-major, truncatable.

use candle_core::{DType, Device, Tensor};

use super::{ModelError, Result};
use crate::config::ModelConfig;

/// Preallocated keys and values of one sequence, per layer, laid out head-major `(1, kv_heads,
/// capacity, head_dim)`: the cached positions of one head are one contiguous run, which the decode
/// attention kernel ([`m31r_kernels::attention`]) streams through at memory speed (a
/// position-major layout would make it hop a whole row of heads per position). Unlike candle-nn's
/// caches it can be truncated, which lets a sequence roll back to its longest common prefix with a
/// new prompt.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub(super) keys: Vec<Tensor>,
    pub(super) values: Vec<Tensor>,
    pub(super) len: usize,
    pub(super) capacity: usize,
    pub(super) max_len: usize,
}

impl KvCache {
    /// An empty cache with room for `capacity` tokens (it grows on demand up to the context length).
    pub fn new(
        config: &ModelConfig,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let capacity = capacity.clamp(1, config.context_length());
        let shape = (1, config.n_kv_heads(), capacity, config.head_dim());
        let zeros = || Tensor::zeros(shape, dtype, device);
        let keys = (0..config.n_layers()).map(|_| zeros()).collect::<candle_core::Result<_>>()?;
        let values = (0..config.n_layers()).map(|_| zeros()).collect::<candle_core::Result<_>>()?;
        Ok(Self { keys, values, len: 0, capacity, max_len: config.context_length() })
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the cache can hold before it must grow.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position from `n` on; later calls recompute them. `n` above `len()` is a no-op.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes allocated for keys and values.
    pub fn allocated_bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// Makes room for `extra` more positions, doubling the allocation as needed.
    pub(super) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            return Err(ModelError::ContextOverflow {
                requested: needed,
                context_length: self.max_len,
            });
        }
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity = needed.max(self.capacity * 2).min(self.max_len);
        for tensor in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let (_, heads, _, dim) = tensor.dims4()?;
            let grown = Tensor::zeros((1, heads, capacity, dim), tensor.dtype(), tensor.device())?;
            if self.len > 0 {
                grown.slice_set(&tensor.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            *tensor = grown;
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Writes one position's keys and values (`kv_heads · head_dim` each) of `layer` at
    /// position `pos` (the step program's new rows, after it has run).
    pub(super) fn write_row(&self, layer: usize, pos: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        let (_, heads, _, dim) = keys.dims4()?;
        for (buffer, row) in [(keys, k), (values, v)] {
            let row = Tensor::from_slice(row, (1, heads, 1, dim), buffer.device())?;
            buffer.slice_set(&row.to_dtype(buffer.dtype())?, 2, pos)?;
        }
        Ok(())
    }

    /// Writes this chunk's keys and values `(1, seq, kv_heads, head_dim)` of `layer` at the current
    /// end; returns the layer's whole key and value buffers, whose first `len() + seq` positions
    /// are now valid.
    pub(super) fn append(
        &self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(&Tensor, &Tensor)> {
        let (keys, values) = (&self.keys[layer], &self.values[layer]);
        keys.slice_set(&k.transpose(1, 2)?.contiguous()?.to_dtype(keys.dtype())?, 2, self.len)?;
        values.slice_set(
            &v.transpose(1, 2)?.contiguous()?.to_dtype(values.dtype())?,
            2,
            self.len,
        )?;
        Ok((keys, values))
    }
}
