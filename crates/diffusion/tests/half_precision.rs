//! The end-to-end fixture of `pipeline.rs` (diffusers' f32 images) run in f16 and bf16 on the
//! CPU: half precision must stay close to diffusers' f32 result, within bounds set from what
//! was measured (see each bound) with a margin, so a lost upcast (f16 time embedding, f16 norm
//! statistics, f16 scheduler state) fails. Also: the VAE's dtype under each [`VaeUpcast`].
mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, parity_request};
use diffusion::pipeline::{LoadOptions, Request, StableDiffusion, VaeUpcast};
use diffusion::schedulers::SchedulerKind;
use diffusion::ControlNetModel;
use std::collections::HashMap;
use std::sync::Arc;

fn cases() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("pipeline_cases.safetensors"), &Device::Cpu)
        .unwrap()
}

/// The parity request with its ControlNets in `dtype` (they must match the UNet's).
fn request(cases: &HashMap<String, Tensor>, kind: SchedulerKind, dtype: DType) -> Request {
    let mut req = parity_request(kind, &cases["latents"]);
    for (c, name) in req
        .controls
        .iter_mut()
        .zip(["controlnet_sd15", "controlnet_sd15_b"])
    {
        c.net = Arc::new(
            ControlNetModel::load(&fixtures().join(name), None, dtype, &Device::Cpu).unwrap(),
        );
    }
    req
}

/// PSNR in dB of an 8-bit image against a reference in 0..1, `[H, W, 3]`.
fn psnr(ours: &image::RgbImage, reference: &Tensor) -> f64 {
    let reference = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(ours.as_raw().len(), reference.len());
    let mse = ours
        .as_raw()
        .iter()
        .zip(&reference)
        .map(|(&a, &b)| (a as f64 / 255.0 - b as f64).powi(2))
        .sum::<f64>()
        / reference.len() as f64;
    10.0 * (1.0 / mse).log10()
}

/// PSNR of DDIM's and UniPC's images in `dtype`, or the error that stopped the generation.
fn try_measure(dtype: DType, vae_upcast: VaeUpcast) -> diffusion::Result<Vec<(&'static str, f64)>> {
    let cases = cases();
    let options = LoadOptions { dtype, vae_upcast };
    let sd = StableDiffusion::load(&fixtures().join("pipeline_sd15"), options, &Device::Cpu)?;
    let mut out = Vec::new();
    for (name, kind) in [
        ("ddim", SchedulerKind::Ddim),
        ("unipc", SchedulerKind::UniPc),
    ] {
        let images = sd
            .generate(&request(&cases, kind, dtype), |_, _| {})?
            .images;
        let db = psnr(&images[0], &cases[&format!("{name}.image")]);
        eprintln!("{dtype:?} (VAE {vae_upcast:?}) {name}: PSNR {db:.1} dB against diffusers f32");
        out.push((name, db));
    }
    Ok(out)
}

fn measure(dtype: DType, vae_upcast: VaeUpcast) -> Vec<(&'static str, f64)> {
    try_measure(dtype, vae_upcast).unwrap()
}

#[test]
fn f16_images_stay_close_to_diffusers_f32() {
    for (name, db) in measure(DType::F16, VaeUpcast::Never) {
        assert!(db >= F16_MIN_DB, "f16 {name}: {db:.1} dB");
    }
}

/// candle 0.11's CPU backend has no bf16 matmul (gemm without MKL/Accelerate): on the CPU the
/// generation must fail with exactly that error. When candle gains it, this test fails; measure
/// then, and set [`BF16_MIN_DB`] from it.
#[test]
fn bf16_images_stay_close_to_diffusers_f32() {
    match try_measure(DType::BF16, VaeUpcast::Never) {
        Ok(results) => {
            for (name, db) in results {
                assert!(db >= BF16_MIN_DB, "bf16 {name}: {db:.1} dB");
            }
            panic!("bf16 runs on the CPU now: set BF16_MIN_DB from the PSNR printed above");
        }
        Err(e) => {
            let e = e.to_string();
            assert!(
                e.contains("unsupported dtype BF16 for op matmul"),
                "bf16 failed otherwise: {e}"
            );
            eprintln!("bf16 on the CPU: {e} (not measurable here)");
        }
    }
}

#[test]
fn f16_with_an_f32_vae_is_no_worse() {
    let half = measure(DType::F16, VaeUpcast::Never);
    let upcast = measure(DType::F16, VaeUpcast::ForceUpcastConfig);
    for ((name, a), (_, b)) in half.iter().zip(&upcast) {
        assert!(*b >= F16_MIN_DB, "f16 + f32 VAE {name}: {b:.1} dB");
        // Upcasting removes the VAE's rounding; it cannot cost more than noise.
        assert!(
            *b >= a - 0.5,
            "{name}: {b:.1} dB with the f32 VAE, {a:.1} without"
        );
    }
}

#[test]
fn vae_dtype_follows_the_upcast_rule() {
    let dir = fixtures().join("pipeline_sd15");
    let load = |dtype, vae_upcast| {
        StableDiffusion::load(&dir, LoadOptions { dtype, vae_upcast }, &Device::Cpu).unwrap()
    };
    // The fixture's VAE config has force_upcast = true.
    for (dtype, upcast, expect) in [
        (DType::F16, VaeUpcast::Never, DType::F16),
        (DType::F16, VaeUpcast::ForceUpcastConfig, DType::F32),
        (DType::BF16, VaeUpcast::ForceUpcastConfig, DType::BF16),
        (DType::BF16, VaeUpcast::Always, DType::F32),
        (DType::F32, VaeUpcast::ForceUpcastConfig, DType::F32),
    ] {
        let sd = load(dtype, upcast);
        assert_eq!(sd.vae.dtype(), expect, "{dtype:?} {upcast:?}");
        assert_eq!(sd.unet.dtype(), dtype);
    }
    // A bare dtype is diffusers' SD 1.x default: no upcast.
    let sd = StableDiffusion::load(&dir, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(sd.vae.dtype(), DType::F16);
    // force_upcast = false in the config turns the SDXL rule off.
    let mut config = sd.vae.config.clone();
    config.force_upcast = false;
    assert_eq!(
        VaeUpcast::ForceUpcastConfig.vae_dtype(DType::F16, &config),
        DType::F16
    );
}

/// Measured on the CPU: 58.0 dB (DDIM) and 58.1 dB (UniPC) with the VAE in f16, 58.2 / 58.3 dB
/// with it in f32; f32 itself is held to 45 dB by `pipeline.rs`. 6 dB of margin.
const F16_MIN_DB: f64 = 52.0;
/// Not measurable on the CPU (see the test); a placeholder that no bf16 run would meet without
/// being looked at.
const BF16_MIN_DB: f64 = 0.0;
