//! Times one denoiser step as a ControlNet pipeline runs it: ControlNet forward, then the UNet
//! with its residuals, at SD 1.5 size with random weights, batch 2 (CFG), 32×32 latent, f32.
//! `tools/bench/denoiser_step.sh` runs this next to the same step in diffusers and prints both.
//!
//! Usage: bench-denoiser-step [--warmup N] [--iters N] [--profile]. Prints one JSON line; with
//! `--profile`, first the time by operator class of one more step, on stderr
//! (`diffusion::profile`).
use candle_core::{DType, Device, Tensor};
use diffusion::weights::with_random_weights;
use diffusion::{ControlNetConfig, ControlNetModel, UNet2DConditionModel, UNetConfig};
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a whole number"))
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    diffusion::runtime::keep_freed_memory();
    let warmup = arg("--warmup", 1);
    let iters = arg("--iters", 5).max(1);
    let device = Device::Cpu;
    let dtype = DType::F32;
    let unet_config = UNetConfig::sd15();
    let cn_config = ControlNetConfig::from_unet(&unet_config);
    // Random weights (timing does not depend on their values), held as loaded weights are.
    let unet = with_random_weights(dtype, &device, |vb| {
        UNet2DConditionModel::new(vb, &unet_config)
    })?;
    let controlnet =
        with_random_weights(dtype, &device, |vb| ControlNetModel::new(vb, &cn_config))?;

    let b = 2;
    let sample = Tensor::randn(0f32, 1., (b, 4, 32, 32), &device)?;
    let timesteps = Tensor::new(&[981f32, 981.], &device)?;
    let states = Tensor::randn(0f32, 1., (b, 77, 768), &device)?;
    let hint = Tensor::rand(0f32, 1., (b, 3, 256, 256), &device)?;
    let step = || -> anyhow::Result<Tensor> {
        let res = controlnet.forward(&sample, &timesteps, &states, &hint, 1.0, false)?;
        let out = unet.forward(&sample, &timesteps, &states, Some(&res))?;
        // Force the computation to finish (a no-op on the CPU, a sync on CUDA).
        device.synchronize()?;
        Ok(out)
    };
    for _ in 0..warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if std::env::args().any(|a| a == "--profile") {
        diffusion::profile::take();
        diffusion::profile::enable(true);
        let start = Instant::now();
        step()?;
        let whole = start.elapsed().as_secs_f64();
        diffusion::profile::enable(false);
        let mut classes = diffusion::profile::take();
        classes.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        let timed: f64 = classes.iter().map(|c| c.1).sum();
        eprintln!(
            "{:<46} {:>8} {:>7} {:>6}",
            "operator class", "s", "share", "calls"
        );
        for (class, seconds, calls) in &classes {
            eprintln!(
                "{class:<46} {seconds:>8.3} {:>6.1}% {calls:>6}",
                100.0 * seconds / whole
            );
        }
        let rest = whole - timed;
        eprintln!(
            "{:<46} {rest:>8.3} {:>6.1}%",
            "element-wise, copies, the rest",
            100.0 * rest / whole
        );
        eprintln!("{:<46} {whole:>8.3}", "step");
    }
    println!(
        "{}",
        serde_json::json!({
            "impl": "controlnet-serve (candle)",
            "candle": "0.11.1",
            "threads": rayon::current_num_threads(),
            "step_seconds_median": times[times.len() / 2],
            "step_seconds_min": times[0],
            "iters": iters,
        })
    );
    Ok(())
}
