//! Helpers for the unit tests of the CPU kernels: formula-made inputs and error measures.
use candle_core::{Device, Shape, Tensor};

/// Values in [-1, 1) from a multiplicative hash of the index and `seed` (no RNG, so every run
/// and machine tests the same numbers).
pub fn formula(shape: impl Into<Shape>, seed: u64) -> Tensor {
    let shape = shape.into();
    let values: Vec<f32> = (0..shape.elem_count() as u64)
        .map(|i| (((i + 1) * (seed * 2 + 1) * 2_654_435_761 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// `max |a − b|`.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `max |a − b| / max |b|`.
pub fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let scale: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    max_abs_diff(a, b) / scale
}
