//! Deterministic test inputs and tolerances shared by the kernels' unit tests.

use candle_core::{DType, Device, Tensor, Var};

/// `n` normal(0, 1) values, the same for the same `seed` on every machine (SplitMix64 bits
/// through Box–Muller).
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed ^ 0x6D31_7252_6B65_726E;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u, v) = (1.0 - uniform(), uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect()
}

/// A CPU f32 tensor of `shape` holding [`values`] scaled by `scale`.
pub(crate) fn random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let n: usize = shape.iter().product();
    let v = values(n, seed).into_iter().map(|x| (f64::from(x) * scale) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("a tensor of the shape's size")
}

/// Whether `a` and `b` agree to `tol`, relative to the larger magnitude (absolute below 1).
pub(crate) fn close(a: f32, b: f32, tol: f32) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

/// The largest elementwise difference of two tensors of the same shape.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

/// Runs `f` on CPU f32 (fused) and on the same values in f64 (composed), with the same
/// upstream gradient, and compares values and input gradients.
pub(crate) fn check(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let vars64: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let ts64: Vec<Tensor> = vars64.iter().map(|v| v.as_tensor().clone()).collect();
    let (y, y64) = (f(&ts), f(&ts64));
    assert_eq!(y.dtype(), DType::F32);
    let diff = max_diff(&y, &y64.to_dtype(DType::F32).unwrap());
    assert!(diff < tol, "forward differs by {diff}");
    let up = random(y.dims(), 99, 1.0);
    let loss = (&y * &up).unwrap().sum_all().unwrap();
    let loss64 = (&y64 * &up.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap();
    let (g, g64) = (loss.backward().unwrap(), loss64.backward().unwrap());
    for (i, (v, v64)) in vars.iter().zip(&vars64).enumerate() {
        let a = g.get(v.as_tensor()).expect("gradient");
        let b = g64.get(v64.as_tensor()).expect("gradient").to_dtype(DType::F32).unwrap();
        let scale =
            b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let diff = max_diff(a, &b);
        assert!(
            diff <= tol * scale.max(1.0),
            "gradient of input {i} differs by {diff} (scale {scale})"
        );
    }
}
