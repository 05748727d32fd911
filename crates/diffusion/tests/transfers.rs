//! Host↔device copies (`diffusion::transfer`): a generation copies before its denoising loop and
//! after it, never per step. On the CPU nothing is really copied, but the calls that would copy
//! on CUDA are counted all the same, so the property is checked here.
//!
//! The counters are process-wide: this file holds one test that generates (the other only reads
//! sources), so no other generation runs while it measures.
mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, parity_request};
use diffusion::pipeline::{Request, StableDiffusion};
use diffusion::schedulers::SchedulerKind;
use diffusion::transfer::{self, Counts};

/// The copies of one generation of `req`.
fn copies(sd: &StableDiffusion, req: &Request) -> Counts {
    let before = transfer::counts();
    let out = sd.generate(req, |_, _| {}).unwrap();
    assert_eq!(out.images.len(), req.num_images);
    transfer::counts().since(before)
}

#[test]
fn copies_do_not_depend_on_the_step_count() {
    let dev = Device::Cpu;
    let sd = StableDiffusion::load(&fixtures().join("pipeline_sd15"), DType::F32, &dev).unwrap();
    let cases = candle_core::safetensors::load(fixtures().join("pipeline_cases.safetensors"), &dev)
        .unwrap();
    let latents: &Tensor = &cases["latents"];

    // Every scheduler, deterministic and stochastic (their noise is drawn before the loop),
    // with two ControlNets and guidance; and img2img (VAE encode) with several images.
    let mut runs: Vec<(String, Request)> = Vec::new();
    for kind in SchedulerKind::ALL {
        runs.push((kind.name().into(), parity_request(kind, latents)));
    }
    let mut ddim_eta = parity_request(SchedulerKind::Ddim, latents);
    ddim_eta.eta = 0.5;
    runs.push(("ddim eta 0.5".into(), ddim_eta));
    let mut img2img = parity_request(SchedulerKind::EulerAncestral, latents);
    img2img.latents = None;
    img2img.num_images = 2;
    img2img.init = Some(diffusion::pipeline::InitImage {
        image: image::open(fixtures().join("pipeline_hint_a.png"))
            .unwrap()
            .to_rgb8(),
        strength: 0.75,
        mask: Some(image::GrayImage::from_fn(96, 64, |x, _| {
            image::Luma([if x < 48 { 255 } else { 0 }])
        })),
        resize: diffusion::images::ResizeMode::JustResize,
    });
    runs.push(("euler-a img2img inpaint, 2 images".into(), img2img));

    for (name, mut req) in runs {
        req.steps = 4;
        let short = copies(&sd, &req);
        req.steps = 8;
        let long = copies(&sd, &req);
        eprintln!("{name}: {short:?} with 4 steps, {long:?} with 8");
        assert_eq!(short, long, "{name}: copies grow with the step count");
        // One download: the images.
        assert_eq!(long.device_to_host, 1, "{name}");
    }
}

/// Raw copies in the sources that run at every step: they must go through `transfer` (which
/// counts them), and the per-step path must make none, so any of these is a regression.
#[test]
fn per_step_sources_make_no_raw_copies() {
    let sources = [
        ("denoise.rs", include_str!("../src/denoise.rs")),
        ("unet.rs", include_str!("../src/unet.rs")),
        ("blocks.rs", include_str!("../src/blocks.rs")),
        ("controlnet.rs", include_str!("../src/controlnet.rs")),
        ("control.rs", include_str!("../src/control.rs")),
        (
            "schedulers/mod.rs",
            include_str!("../src/schedulers/mod.rs"),
        ),
        (
            "schedulers/ddim.rs",
            include_str!("../src/schedulers/ddim.rs"),
        ),
        (
            "schedulers/dpm_solver.rs",
            include_str!("../src/schedulers/dpm_solver.rs"),
        ),
        (
            "schedulers/euler.rs",
            include_str!("../src/schedulers/euler.rs"),
        ),
        (
            "schedulers/euler_ancestral.rs",
            include_str!("../src/schedulers/euler_ancestral.rs"),
        ),
        (
            "schedulers/unipc.rs",
            include_str!("../src/schedulers/unipc.rs"),
        ),
        (
            "schedulers/schedule.rs",
            include_str!("../src/schedulers/schedule.rs"),
        ),
        (
            "schedulers/config.rs",
            include_str!("../src/schedulers/config.rs"),
        ),
        (
            "schedulers/noise.rs",
            include_str!("../src/schedulers/noise.rs"),
        ),
    ];
    // Uploads, downloads, and candle ops that upload a scalar behind one's back (`clamp`,
    // `maximum`, `minimum` with a scalar; `arange`). `clamp` is not listed: host numbers use it
    // too; the tensor version goes through `transfer::clamp`.
    let forbidden = [
        "Tensor::new(",
        "from_vec(",
        "from_slice(",
        "from_iter(",
        "Tensor::arange",
        ".to_device(",
        "to_vec0",
        "to_vec1",
        "to_vec2",
        "to_vec3",
        "to_scalar",
        ".maximum(",
        ".minimum(",
    ];
    let mut found = Vec::new();
    for (file, text) in sources {
        // Unit tests may copy as they like.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for (i, line) in code.lines().enumerate() {
            let line = line.trim();
            if line.starts_with("//") {
                continue;
            }
            for f in forbidden {
                if line.contains(f) {
                    found.push(format!("{file}:{}: {line}", i + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "raw copies on the per-step path:\n{}",
        found.join("\n")
    );
}
