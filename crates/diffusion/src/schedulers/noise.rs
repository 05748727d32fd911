//! Seeded Gaussian noise, generated on the host so that a seed means the same noise on every
//! device and every run.
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

use super::NoiseSource;
use crate::Result;

/// A job's noise: ChaCha8 seeded from a `u64`, standard normal f32 samples in row-major
/// order. Each job owns its source, so its noise does not depend on which other jobs share a
/// batch or where it sits in it; successive draws continue the same stream (initial latents,
/// then the noise of every stochastic step).
///
/// Not torch's generator: the same seed gives different images than diffusers does. The
/// stream is stable for a given `rand_chacha` / `rand_distr` version (pinned by Cargo.lock).
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    /// One upload (of the f32 samples), then the cast on the device.
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let values = self.randn_host(shape)?;
        Ok(crate::transfer::upload(values, shape, device)?.to_dtype(dtype)?)
    }

    fn randn_host(&mut self, shape: &[usize]) -> Result<Vec<f32>> {
        let n = shape.iter().product();
        Ok((0..n).map(|_| self.rng.sample(StandardNormal)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(seed: u64) -> Vec<f32> {
        SeededNoise::new(seed)
            .randn(&[2, 4, 3, 5], DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn same_seed_same_noise_different_seed_different_noise() {
        let a = draw(42);
        assert_eq!(a, draw(42));
        let b = draw(43);
        assert_ne!(a, b);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
    }

    #[test]
    fn noise_is_standard_normal_and_the_stream_continues() {
        let mut src = SeededNoise::new(7);
        let first = src.randn(&[64, 64], DType::F32, &Device::Cpu).unwrap();
        let second = src.randn(&[64, 64], DType::F32, &Device::Cpu).unwrap();
        let v: Vec<f32> = first.flatten_all().unwrap().to_vec1().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.05, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
        let w: Vec<f32> = second.flatten_all().unwrap().to_vec1().unwrap();
        assert_ne!(v, w);
        // dtype conversion happens after sampling: f16 noise is the f32 noise rounded.
        let half = SeededNoise::new(7)
            .randn(&[64, 64], DType::F16, &Device::Cpu)
            .unwrap();
        assert_eq!(half.dtype(), DType::F16);
        let back: Vec<f32> = half
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expect: Vec<f32> = first
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, expect);
    }
}
