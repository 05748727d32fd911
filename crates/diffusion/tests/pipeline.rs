//! End to end against diffusers' `StableDiffusionControlNetPipeline` (fixtures from
//! `tools/parity/make_pipeline_fixtures.py`): the tiny pipeline folder, two ControlNets with their
//! own scales and windows, classifier-free guidance with a negative prompt, the same initial
//! latents, DDIM and UniPC.
mod common;

use candle_core::{DType, Device, Tensor};
use common::{final_latents, fixtures, parity_request, rel_err};
use diffusion::pipeline::{Request, StableDiffusion};
use diffusion::schedulers::SchedulerKind;
use std::collections::HashMap;

struct Fixture {
    sd: StableDiffusion,
    cases: HashMap<String, Tensor>,
}

fn fixture() -> Fixture {
    let dev = Device::Cpu;
    let sd = StableDiffusion::load(&fixtures().join("pipeline_sd15"), DType::F32, &dev).unwrap();
    let cases = candle_core::safetensors::load(fixtures().join("pipeline_cases.safetensors"), &dev)
        .unwrap();
    Fixture { sd, cases }
}

fn request(f: &Fixture, scheduler: SchedulerKind) -> Request {
    parity_request(scheduler, &f.cases["latents"])
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

#[test]
fn images_match_diffusers_with_two_controlnets_and_cfg() {
    let f = fixture();
    for (name, kind) in [
        ("ddim", SchedulerKind::Ddim),
        ("unipc", SchedulerKind::UniPc),
    ] {
        let mut steps = Vec::new();
        let out =
            f.sd.generate(&request(&f, kind), |k, n| steps.push((k, n)))
                .unwrap();
        assert_eq!(steps.last(), Some(&(8, 8)));
        assert_eq!(out.images.len(), 1);
        let reference = &f.cases[&format!("{name}.image")];
        let db = psnr(&out.images[0], reference);
        eprintln!("{name}: PSNR {db:.1} dB against diffusers");
        assert!(db >= 45.0, "{name}: {db:.1} dB");
    }
}

#[test]
fn final_latents_match_diffusers() {
    let f = fixture();
    for (name, kind) in [
        ("ddim", SchedulerKind::Ddim),
        ("unipc", SchedulerKind::UniPc),
    ] {
        let ours = final_latents(&f.sd, &request(&f, kind));
        let err = rel_err(&ours, &f.cases[&format!("{name}.latents")]);
        eprintln!("{name}: final latents rel err {err:.2e}");
        assert!(err <= 1e-4, "{name}: {err:.3e}");
    }
}

#[test]
fn each_control_is_visible_in_the_latents() {
    // With either ControlNet dropped the latents fall far outside the bound above, so the
    // parity test could not pass with a control (its scale or window) ignored.
    let f = fixture();
    for drop in 0..2 {
        let mut req = request(&f, SchedulerKind::Ddim);
        req.controls.remove(drop);
        let err = rel_err(&final_latents(&f.sd, &req), &f.cases["ddim.latents"]);
        // Ten times the parity bound at least (measured: ~9e-3 for the weaker net).
        assert!(err > 1e-3, "ControlNet {drop} dropped: still {err:.2e}");
    }
}
