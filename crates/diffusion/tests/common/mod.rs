//! Shared helpers for the parity tests: fixture paths and the error measure.
#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The inputs and diffusers' outputs written by `tools/parity/make_fixtures.py`.
pub struct Cases(HashMap<String, Tensor>);

impl Cases {
    pub fn load() -> Self {
        let path = fixtures().join("cases.safetensors");
        Cases(candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture cases"))
    }

    pub fn get(&self, name: &str) -> Tensor {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
            .clone()
    }

    pub fn get_as(&self, name: &str, dtype: DType) -> Tensor {
        self.get(name).to_dtype(dtype).unwrap()
    }

    /// `prefix.down.0..` and `prefix.mid`.
    pub fn residuals(&self, prefix: &str) -> diffusion::ControlResiduals {
        let down = (0..)
            .map_while(|i| self.0.get(&format!("{prefix}.down.{i}")).cloned())
            .collect();
        diffusion::ControlResiduals {
            down,
            mid: self.get(&format!("{prefix}.mid")),
        }
    }
}

/// The error measure used throughout: max |ours − reference| / max |reference|, i.e. the L∞
/// error relative to the reference's L∞ norm. Element-wise relative error is meaningless for
/// values near zero, which every activation map has.
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shapes differ");
    let ours = ours.to_dtype(DType::F64).unwrap();
    let reference = reference.to_dtype(DType::F64).unwrap();
    abs_max(&(ours - &reference).unwrap()) / abs_max(&reference)
}

fn abs_max(t: &Tensor) -> f64 {
    t.abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f64>())
        .unwrap()
}

pub fn residuals_rel_err(
    ours: &diffusion::ControlResiduals,
    reference: &diffusion::ControlResiduals,
) -> f64 {
    assert_eq!(ours.down.len(), reference.down.len(), "residual count");
    ours.down
        .iter()
        .zip(&reference.down)
        .chain(std::iter::once((&ours.mid, &reference.mid)))
        .map(|(a, b)| rel_err(a, b))
        .fold(0.0, f64::max)
}

/// Exact equality, value by value (so +0 and −0 compare equal, as they do in the model).
pub fn identical(a: &Tensor, b: &Tensor) -> bool {
    a.dims() == b.dims()
        && a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}
