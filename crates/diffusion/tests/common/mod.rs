//! Shared helpers for the parity tests: fixture paths and the error measure.
#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use diffusion::control::ControlMode;
use diffusion::denoise;
use diffusion::images::ResizeMode;
use diffusion::pipeline::{ControlSpec, Request, StableDiffusion};
use diffusion::schedulers::SchedulerKind;
use diffusion::ControlNetModel;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

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

/// The request of the end-to-end fixture (`tools/parity/make_pipeline_fixtures.py`): two
/// ControlNets with their own scales and windows, CFG with a negative prompt, diffusers'
/// initial latents.
pub fn parity_request(scheduler: SchedulerKind, latents: &Tensor) -> Request {
    let net = |name: &str| {
        Arc::new(
            ControlNetModel::load(&fixtures().join(name), None, DType::F32, &Device::Cpu).unwrap(),
        )
    };
    let hint = |name: &str| image::open(fixtures().join(name)).unwrap().to_rgb8();
    let control = |net, image, scale, start, end| ControlSpec {
        net,
        image,
        resize: ResizeMode::JustResize,
        scale,
        start,
        end,
        mode: ControlMode::Balanced,
        mask_hint: false,
    };
    let mut req = Request::txt2img("a red cube on a wooden table, studio light", 96, 64);
    req.negative_prompt = "blurry, low quality".into();
    req.steps = 8;
    req.guidance_scale = 7.5;
    req.scheduler = scheduler;
    req.controls = vec![
        control(
            net("controlnet_sd15"),
            hint("pipeline_hint_a.png"),
            1.0,
            0.0,
            1.0,
        ),
        control(
            net("controlnet_sd15_b"),
            hint("pipeline_hint_b.png"),
            0.6,
            0.25,
            0.75,
        ),
    ];
    req.latents = Some(latents.clone());
    req
}

/// A request run alone to its final latents (before the VAE).
pub fn final_latents(sd: &StableDiffusion, req: &Request) -> Tensor {
    let mut job = sd.new_job(req).unwrap();
    while !job.is_done() {
        denoise::step_batch(&sd.unet, &mut [&mut job]).unwrap();
    }
    job.latents
}
