//! `controlnet-serve device-check`: proves the device path with the one binary we ship (a rented
//! GPU machine has no Rust toolchain). Two parts:
//!
//! - parity: the end-to-end test of `crates/diffusion/tests/pipeline.rs` (the tiny diffusers
//!   pipeline, two ControlNets with their scales and windows, CFG with a negative prompt,
//!   diffusers' initial latents, DDIM and UniPC, 8 steps), loaded in each requested dtype on the
//!   device; the PSNR of our 8-bit image against diffusers' f32 image must reach a bound per
//!   dtype;
//! - bench: SD 1.5-size models with random weights made on the device (or the built-in tiny
//!   model), one ControlNet + UNet step with CFG, and whole 512² jobs through the engine at
//!   several batch sizes, with the device's peak memory.
//!
//! It prints a report as it goes and, with `--json`, writes one JSON object (see
//! [`DeviceCheckArgs`]). It fails (non-zero exit) if a parity check misses its bound or anything
//! errors; the JSON is written then too, with `"ok": false` and an `"error"`.
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, DeviceLocation, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use clap::{Args, ValueEnum};
use diffusion::control::ControlMode;
use diffusion::images::ResizeMode;
use diffusion::pipeline::{ControlSpec, Request, StableDiffusion};
use diffusion::schedulers::{SchedulerConfig, SchedulerKind};
use diffusion::tokenizer::{ClipTokenizer, Family};
use diffusion::{
    AutoencoderKL, ClipTextConfig, ClipTextModel, ControlNetConfig, ControlNetModel,
    UNet2DConditionModel, UNetConfig, VaeConfig,
};
use engine::{Engine, EngineConfig, Event, Job};
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The candle release the binary is built with (the workspace pins it).
const CANDLE_VERSION: &str = "0.11.1";

/// Shared objects whose presence in the process proves which CUDA libraries did the work.
const CUDA_LIBRARY_PREFIXES: [&str; 5] =
    ["libcuda", "libcublas", "libcurand", "libnvrtc", "libcudart"];

#[derive(Args, Debug)]
pub struct DeviceCheckArgs {
    /// cpu, or cuda / cuda:N (with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The diffusion crate's test fixtures: `pipeline_sd15/`, `pipeline_cases.safetensors`, the
    /// two ControlNets and their hint images.
    #[arg(long, default_value = "crates/diffusion/tests/fixtures")]
    fixtures: PathBuf,
    /// The dtypes to run the parity check in (f32, f16, bf16).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16")]
    parity_dtypes: Vec<String>,
    /// Skip the parity check.
    #[arg(long)]
    no_parity: bool,
    /// Skip the benchmark.
    #[arg(long)]
    no_bench: bool,
    /// sd15: SD 1.5-size models with random weights; tiny: the built-in tiny model.
    #[arg(long, value_enum, default_value = "sd15")]
    bench_model: BenchModel,
    #[arg(long, default_value = "f16")]
    bench_dtype: String,
    /// Image width and height of the benchmark, in pixels (a multiple of 8).
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Denoising steps of each benchmark job.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Batch sizes of the pipeline benchmark: B jobs submitted at once, engine max batch B.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    batches: Vec<usize>,
    /// Timed repetitions of the one-step benchmark (after 2 warm-ups); the median is reported.
    #[arg(long, default_value_t = 10)]
    step_iters: usize,
    /// Where to write the JSON report.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchModel {
    Sd15,
    Tiny,
}

impl BenchModel {
    fn name(self) -> &'static str {
        match self {
            BenchModel::Sd15 => "sd15",
            BenchModel::Tiny => "tiny",
        }
    }
}

/// The lowest PSNR (dB, 8-bit image against diffusers' f32 image) each dtype must reach.
fn parity_bound_db(dtype: DType) -> Result<f64> {
    Ok(match dtype {
        // The bound of crates/diffusion/tests/pipeline.rs: f32 is diffusers' own precision.
        DType::F32 => 45.0,
        // f16 keeps 11 significant bits, and matmuls accumulate in f32 on the CPU and in cuBLAS:
        // measured 58.0 / 58.1 dB (DDIM / UniPC) on the CPU against f32's 58.9 / 59.0, i.e. ~65 dB
        // of its own error; 16 dB of margin for the GPU's kernels, a broken op falls far below.
        DType::F16 => 42.0,
        // bf16 keeps 8 significant bits: 8x f16's rounding, 18 dB less, so ~47 dB of its own
        // error and ~46 dB in all expected; not measurable on the CPU (candle 0.11.1's CPU
        // backend has no bf16 matmul), so the same ~12 dB margin as f16 below the estimate.
        DType::BF16 => 35.0,
        other => bail!("no parity bound for {other:?} (use f32, f16 or bf16)"),
    })
}

/// An error's chain on one line, without the backtrace candle appends under RUST_BACKTRACE.
fn message(e: &anyhow::Error) -> String {
    let full = format!("{e:#}");
    full.lines()
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Runs the check; exits with status 1 when it failed (after writing the JSON), `Err` only when
/// the JSON cannot be written.
pub fn run(args: &DeviceCheckArgs) -> Result<()> {
    let mut report = Map::new();
    report.insert("device".into(), json!(args.device));
    report.insert("candle".into(), json!(CANDLE_VERSION));
    let mut errors: Vec<String> = Vec::new();
    let outcome = check(args, &mut report, &mut errors);
    if let Err(e) = outcome {
        let e = message(&e);
        println!("error: {e}");
        errors.push(e);
    }
    // After the work: every library the device path pulled in is mapped by now.
    report.insert("libraries".into(), json!(cuda_libraries()));
    let ok = errors.is_empty();
    report.insert("ok".into(), json!(ok));
    if !ok {
        report.insert("error".into(), json!(errors.join("; ")));
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&Value::Object(report))?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    if ok {
        println!("device check passed");
        Ok(())
    } else {
        println!("device check FAILED");
        eprintln!("device check failed: {}", errors.join("; "));
        use std::io::Write;
        std::io::stdout().flush().ok();
        std::process::exit(1)
    }
}

fn check(
    args: &DeviceCheckArgs,
    report: &mut Map<String, Value>,
    errors: &mut Vec<String>,
) -> Result<()> {
    let device = diffusion::runtime::open_device(&args.device)?;
    report.insert("device".into(), json!(device_name(&device)));
    println!(
        "device check on {} (candle {CANDLE_VERSION}, {} CPU threads)",
        device_name(&device),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if !args.no_parity {
        let rows = parity(args, &device, errors);
        report.insert("parity".into(), Value::Array(rows));
    }
    if !args.no_bench {
        // A provisional report first, so that a run killed during the bench still leaves the
        // parity results (the final report replaces it).
        if let Some(path) = &args.json {
            let mut partial = report.clone();
            partial.insert("libraries".into(), json!(cuda_libraries()));
            partial.insert("ok".into(), json!(false));
            partial.insert(
                "error".into(),
                json!("unfinished: the benchmark was still running"),
            );
            std::fs::write(
                path,
                serde_json::to_string_pretty(&Value::Object(partial))? + "\n",
            )
            .with_context(|| format!("writing {}", path.display()))?;
        }
        let mut bench = Map::new();
        if let Err(e) = catching_panics(|| run_bench(args, &device, &mut bench)) {
            let e = format!("bench: {}", message(&e));
            println!("{e}");
            bench.insert("error".into(), json!(e));
            errors.push(e);
        }
        report.insert("bench".into(), Value::Object(bench));
    }
    Ok(())
}

/// `f`, with a panic turned into an error (so that the report is still written).
fn catching_panics<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            bail!("panicked: {what}")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parity

/// PSNR in dB of an 8-bit image against a reference in 0..1, `[H, W, 3]`.
fn psnr(ours: &image::RgbImage, reference: &Tensor) -> Result<f64> {
    let reference = reference
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if ours.as_raw().len() != reference.len() {
        bail!(
            "our image has {} values, the reference {}",
            ours.as_raw().len(),
            reference.len()
        );
    }
    let mse = ours
        .as_raw()
        .iter()
        .zip(&reference)
        .map(|(&a, &b)| (a as f64 / 255.0 - b as f64).powi(2))
        .sum::<f64>()
        / reference.len() as f64;
    Ok(10.0 * (1.0 / mse).log10())
}

/// The request of the end-to-end fixture (`tools/parity/make_pipeline_fixtures.py`), as
/// `crates/diffusion/tests/common/mod.rs` builds it: two ControlNets with their own scales and
/// windows, CFG with a negative prompt, diffusers' initial latents.
fn parity_request(
    fixtures: &Path,
    scheduler: SchedulerKind,
    latents: &Tensor,
    nets: &[Arc<ControlNetModel>; 2],
) -> Result<Request> {
    let hint = |name: &str| -> Result<image::RgbImage> {
        let path = fixtures.join(name);
        Ok(image::open(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .to_rgb8())
    };
    let control = |net: &Arc<ControlNetModel>, image, scale, start, end| ControlSpec {
        net: net.clone(),
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
        control(&nets[0], hint("pipeline_hint_a.png")?, 1.0, 0.0, 1.0),
        control(&nets[1], hint("pipeline_hint_b.png")?, 0.6, 0.25, 0.75),
    ];
    req.latents = Some(latents.clone());
    Ok(req)
}

const SCHEDULERS: [(&str, SchedulerKind); 2] = [
    ("ddim", SchedulerKind::Ddim),
    ("unipc", SchedulerKind::UniPc),
];

/// One row per (dtype, scheduler); failures go to `errors` as well.
fn parity(args: &DeviceCheckArgs, device: &Device, errors: &mut Vec<String>) -> Vec<Value> {
    println!(
        "parity: the tiny diffusers pipeline against diffusers' f32 images ({})",
        args.fixtures.display()
    );
    let cpu = device.is_cpu();
    let mut rows = Vec::new();
    for name in &args.parity_dtypes {
        let outcome = diffusion::weights::parse_dtype(name)
            .map_err(anyhow::Error::from)
            .and_then(|dtype| Ok((dtype, parity_bound_db(dtype)?)))
            .and_then(|(dtype, bound)| {
                catching_panics(|| parity_in(&args.fixtures, dtype, device))
                    .map(|results| (bound, results))
            });
        match outcome {
            Ok((bound, results)) => {
                for (scheduler, result) in results {
                    rows.push(parity_row(cpu, name, scheduler, bound, result, errors));
                }
            }
            Err(e) => {
                // The model did not load (or the dtype is not known): both schedulers fail.
                let bound = diffusion::weights::parse_dtype(name)
                    .ok()
                    .and_then(|d| parity_bound_db(d).ok());
                for (scheduler, _) in SCHEDULERS {
                    rows.push(parity_row(
                        cpu,
                        name,
                        scheduler,
                        bound.unwrap_or(f64::NAN),
                        Err(anyhow::anyhow!(message(&e))),
                        errors,
                    ));
                }
            }
        }
    }
    rows
}

fn parity_row(
    cpu: bool,
    dtype: &str,
    scheduler: &str,
    bound: f64,
    result: Result<(f64, f64)>,
    errors: &mut Vec<String>,
) -> Value {
    let bound_json = if bound.is_finite() {
        json!(bound)
    } else {
        Value::Null
    };
    match result {
        Ok((db, seconds)) => {
            // NaN (a black or broken image) fails too.
            let ok = db >= bound;
            println!(
                "  {dtype:>4} {scheduler:<5} PSNR {db:6.2} dB (bound {bound:.1} dB) {:>6.2} s  {}",
                seconds,
                if ok { "ok" } else { "FAIL" }
            );
            if !ok {
                errors.push(format!(
                    "parity {dtype} {scheduler}: PSNR {db:.2} dB below the bound {bound:.1} dB"
                ));
            }
            // JSON has no NaN or infinity; identical images (infinite PSNR) are reported as 99.
            let db_json = if db.is_nan() {
                Value::Null
            } else {
                json!(db.min(99.0))
            };
            json!({"dtype": dtype, "scheduler": scheduler, "psnr_db": db_json,
                   "bound_db": bound_json, "seconds": seconds, "ok": ok})
        }
        Err(e) if cpu && message(&e).contains("unsupported dtype BF16") => {
            // candle 0.11.1's CPU backend has no bf16 matmul (conv2d and linear layers need
            // it): a known limitation of the CPU, not a failure of the check. Not skipped on a GPU.
            let reason = format!("not run on the CPU: {}", message(&e));
            println!("  {dtype:>4} {scheduler:<5} skipped ({reason})");
            json!({"dtype": dtype, "scheduler": scheduler, "psnr_db": null,
                   "bound_db": bound_json, "ok": true, "skipped": reason})
        }
        Err(e) => {
            let e = message(&e);
            println!("  {dtype:>4} {scheduler:<5} ERROR {e}");
            errors.push(format!("parity {dtype} {scheduler}: {e}"));
            json!({"dtype": dtype, "scheduler": scheduler, "psnr_db": null,
                   "bound_db": bound_json, "ok": false, "error": e})
        }
    }
}

/// Loads the fixture pipeline in `dtype` on `device` and runs both schedulers: per scheduler,
/// (PSNR, seconds) or its error.
#[allow(clippy::type_complexity)]
fn parity_in(
    fixtures: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Vec<(&'static str, Result<(f64, f64)>)>> {
    let folder = fixtures.join("pipeline_sd15");
    let sd = StableDiffusion::load(&folder, dtype, device)
        .with_context(|| format!("loading {} in {dtype:?}", folder.display()))?;
    let net = |name: &str| -> Result<Arc<ControlNetModel>> {
        let path = fixtures.join(name);
        Ok(Arc::new(
            ControlNetModel::load(&path, None, dtype, device)
                .with_context(|| format!("loading {} in {dtype:?}", path.display()))?,
        ))
    };
    let nets = [net("controlnet_sd15")?, net("controlnet_sd15_b")?];
    let cases_path = fixtures.join("pipeline_cases.safetensors");
    let cases: HashMap<String, Tensor> = candle_core::safetensors::load(&cases_path, &Device::Cpu)
        .with_context(|| format!("reading {}", cases_path.display()))?;
    let latents = cases
        .get("latents")
        .with_context(|| format!("{}: no tensor `latents`", cases_path.display()))?;
    let mut results = Vec::new();
    for (name, kind) in SCHEDULERS {
        let result = (|| -> Result<(f64, f64)> {
            let reference = cases
                .get(&format!("{name}.image"))
                .with_context(|| format!("{}: no tensor `{name}.image`", cases_path.display()))?;
            let req = parity_request(fixtures, kind, latents, &nets)?;
            let start = Instant::now();
            let out = sd.generate(&req, |_, _| {})?;
            let seconds = start.elapsed().as_secs_f64();
            let image = out.images.first().context("no image")?;
            Ok((psnr(image, reference)?, seconds))
        })();
        results.push((name, result));
    }
    Ok(results)
}

// ---------------------------------------------------------------------------------------------
// Benchmark

/// Random weights made on the device (no files, no host-side generation): f32 draws following
/// the model's init hints, converted to the model's dtype (candle's CUDA backend draws f32/f64
/// only). The values only need to keep activations finite; the timing does not depend on them.
struct DeviceRandom;

impl SimpleBackend for DeviceRandom {
    fn get(
        &self,
        shape: Shape,
        _name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match init {
            Init::Const(c) if c == 0.0 => return Tensor::zeros(shape, dtype, device),
            Init::Const(c) => return (Tensor::ones(shape, dtype, device)? * c)?.to_dtype(dtype),
            // The rest through candle's own drawing (Kaiming's fan and gain included), detached
            // so that no f32 copy stays referenced.
            _ => init.var(shape, DType::F32, device)?.as_detached_tensor(),
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

struct Bench {
    sd: StableDiffusion,
    net: Arc<ControlNetModel>,
    /// Width of the prompt embeddings the UNet reads.
    context_dim: usize,
}

/// The benchmark's base model and ControlNet, on the device.
fn bench_models(kind: BenchModel, dtype: DType, device: &Device) -> Result<Bench> {
    let (unet_config, sd, net) = match kind {
        BenchModel::Tiny => (
            diffusion::embedded::unet_config(),
            StableDiffusion::embedded(dtype, device)?,
            diffusion::embedded::controlnet(1, dtype, device)?,
        ),
        BenchModel::Sd15 => {
            // runwayml/stable-diffusion-v1-5's configs: UNet, CLIP ViT-L/14 text, SD VAE.
            let unet_config = UNetConfig::sd15();
            let vb = || VarBuilder::from_backend(Box::new(DeviceRandom), dtype, device.clone());
            let sd = StableDiffusion {
                unet: UNet2DConditionModel::new(vb(), &unet_config)?,
                vae: AutoencoderKL::new(vb(), &VaeConfig::sd15())?,
                text_encoder: ClipTextModel::new(vb(), &ClipTextConfig::sd15())?,
                tokenizer: ClipTokenizer::embedded(Family::Sd1)?,
                scheduler_config: SchedulerConfig::sd15(),
            };
            let net = ControlNetModel::from_source(
                DeviceRandom,
                &ControlNetConfig::from_unet(&unet_config),
                dtype,
                device,
            )?;
            (unet_config, sd, net)
        }
    };
    let context_dim = unet_config.resolve()?.mid_attention.cross_attention_dim;
    Ok(Bench {
        sd,
        net: Arc::new(net),
        context_dim,
    })
}

fn run_bench(args: &DeviceCheckArgs, device: &Device, out: &mut Map<String, Value>) -> Result<()> {
    let dtype = diffusion::weights::parse_dtype(&args.bench_dtype)?;
    if args.size == 0 || args.size % 8 != 0 {
        bail!("--size {}: use a positive multiple of 8", args.size);
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.batches.is_empty() || args.batches.contains(&0) {
        bail!("--batches: give batch sizes of at least 1");
    }
    let model = args.bench_model.name();
    out.insert("impl".into(), json!("controlnet-serve"));
    out.insert("model".into(), json!(model));
    out.insert("dtype".into(), json!(args.bench_dtype));
    out.insert("size".into(), json!(args.size));
    out.insert("steps".into(), json!(args.steps));
    println!(
        "bench: {model} model ({}), {dtype:?}, {size}x{size} px, {steps} steps, UniPC, one \
         ControlNet, CFG 7.5",
        if args.bench_model == BenchModel::Sd15 {
            "SD 1.5 size, random weights"
        } else {
            "built-in tiny"
        },
        size = args.size,
        steps = args.steps,
    );

    let start = Instant::now();
    let bench = bench_models(args.bench_model, dtype, device)?;
    device.synchronize()?;
    println!(
        "  models made on the device in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let step = step_seconds(&bench, args, dtype, device)?;
    out.insert("step_seconds".into(), json!(step));
    println!(
        "  one ControlNet + UNet step, batch 2 (CFG): {:.4} s (median of {})",
        step,
        args.step_iters.max(1)
    );

    let hint = image::RgbImage::from_fn(args.size as u32, args.size as u32, |x, y| {
        // Edges of a grid, as a canny hint would look.
        let v = if x % 64 < 2 || y % 64 < 2 { 255 } else { 0 };
        image::Rgb([v, v, v])
    });
    // Warm-up at batch 1 (not reported): kernels compiled and loaded, allocator pools grown.
    let warm = pipeline_run(bench, 1, args, &hint, device)?;
    println!("  warm-up, batch 1: {:.2} s", warm.seconds);
    let mut rows = Vec::new();
    let mut all_finite = warm.finite;
    for &b in &args.batches {
        // The engine owns its model; each batch size gets a fresh one (made on the device in
        // well under a second on a GPU).
        let bench = bench_models(args.bench_model, dtype, device)?;
        let r = pipeline_run(bench, b, args, &hint, device)?;
        all_finite &= r.finite;
        println!(
            "  batch {b:>3}: {:8.3} s, {:7.3} s/image, {:7.3} images/s, {} UNet calls, peak device memory {}",
            r.seconds,
            r.seconds / b as f64,
            b as f64 / r.seconds,
            r.unet_calls,
            r.peak_memory
                .map_or("n/a".to_string(), |m| format!("{:.2} GiB", m as f64 / (1u64 << 30) as f64)),
        );
        rows.push(json!({
            "batch": b,
            "seconds": r.seconds,
            "seconds_per_image": r.seconds / b as f64,
            "images_per_second": b as f64 / r.seconds,
            "peak_device_memory_bytes": r.peak_memory,
            "unet_calls": r.unet_calls,
        }));
    }
    out.insert("pipeline".into(), Value::Array(rows));
    // Random weights may overflow in half precision: that says nothing about the device path,
    // but it is worth seeing.
    out.insert("finite_outputs".into(), json!(all_finite));
    if !all_finite {
        println!(
            "  note: some final latents were not finite (random weights), timing is still valid"
        );
    }
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// One ControlNet forward + UNet forward with its residuals, batch 2 (CFG), the device
/// synchronised before the clock is read: median seconds of `--step-iters` after 2 warm-ups.
fn step_seconds(
    bench: &Bench,
    args: &DeviceCheckArgs,
    dtype: DType,
    device: &Device,
) -> Result<f64> {
    let latent = args.size / 8;
    let sample = Tensor::randn(0f32, 1., (2, 4, latent, latent), device)?.to_dtype(dtype)?;
    let timesteps = Tensor::new(&[981f32, 981.], device)?;
    let states = (Tensor::randn(0f32, 1., (2, 77, bench.context_dim), device)?).to_dtype(dtype)?;
    let hint = Tensor::rand(0f32, 1., (2, 3, args.size, args.size), device)?.to_dtype(dtype)?;
    let step = || -> Result<()> {
        let res = bench
            .net
            .forward(&sample, &timesteps, &states, &hint, 1.0, false)?;
        let _out = bench
            .sd
            .unet
            .forward(&sample, &timesteps, &states, Some(&res))?;
        device.synchronize()?;
        Ok(())
    };
    for _ in 0..2 {
        step()?;
    }
    let mut times = Vec::new();
    for _ in 0..args.step_iters.max(1) {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

struct PipelineRun {
    seconds: f64,
    peak_memory: Option<u64>,
    unet_calls: u64,
    finite: bool,
}

/// `batch` one-image jobs submitted at once to an engine with `max_batch = batch`: seconds from
/// the first submit to the last image, and the device's peak used memory meanwhile.
fn pipeline_run(
    bench: Bench,
    batch: usize,
    args: &DeviceCheckArgs,
    hint: &image::RgbImage,
    device: &Device,
) -> Result<PipelineRun> {
    let Bench { sd, net, .. } = bench;
    let engine = Engine::single(
        sd,
        EngineConfig {
            max_queue: batch.max(1),
            max_batch: batch,
            max_queue_delay: Duration::ZERO,
            ..Default::default()
        },
    );
    device.synchronize()?;
    let poller = MemoryPoller::start(device)?;
    let start = Instant::now();
    let mut handles = Vec::with_capacity(batch);
    for k in 0..batch {
        let mut req = Request::txt2img(
            &format!("a photograph of a house by a lake, number {k}"),
            args.size,
            args.size,
        );
        req.negative_prompt = "blurry, low quality".into();
        req.steps = args.steps;
        req.guidance_scale = 7.5;
        req.scheduler = SchedulerKind::UniPc;
        req.seed = k as u64;
        // The ControlNet goes in as a model (the adapter registry loads only files and the
        // built-in generated nets); the engine runs it exactly as a named adapter.
        req.controls.push(ControlSpec {
            net: net.clone(),
            image: hint.clone(),
            resize: ResizeMode::JustResize,
            scale: 1.0,
            start: 0.0,
            end: 1.0,
            mode: ControlMode::Balanced,
            mask_hint: false,
        });
        handles.push(
            engine
                .submit(Job::new(req))
                .map_err(|e| anyhow::anyhow!("submitting job {k}: {e}"))?,
        );
    }
    let mut finite = true;
    for (k, handle) in handles.iter_mut().enumerate() {
        loop {
            match handle.events.blocking_recv() {
                Some(Event::Done { latents, .. }) => {
                    let sum = latents
                        .abs()?
                        .sum_all()?
                        .to_dtype(DType::F32)?
                        .to_scalar::<f32>()?;
                    finite &= sum.is_finite();
                    break;
                }
                Some(Event::Failed(e)) => bail!("batch {batch}, job {k}: {e}"),
                Some(_) => {}
                None => bail!("batch {batch}, job {k}: the engine dropped the job"),
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let peak_memory = poller.stop();
    let unet_calls = engine.status().steps_run;
    drop(engine);
    Ok(PipelineRun {
        seconds,
        peak_memory,
        unet_calls,
        finite,
    })
}

/// Polls the device's used memory (total − free, all processes) every ~5 ms from a thread and
/// keeps the maximum. Nothing on the CPU.
struct MemoryPoller {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Option<u64>>>,
}

impl MemoryPoller {
    fn start(device: &Device) -> Result<Self> {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = match used_memory_probe(device)? {
            None => None,
            Some(probe) => {
                let stop = stop.clone();
                Some(std::thread::spawn(move || {
                    let mut peak: Option<u64> = None;
                    loop {
                        if let Some(used) = probe() {
                            peak = Some(peak.map_or(used, |p| p.max(used)));
                        }
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            return peak;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }))
            }
        };
        Ok(Self { stop, thread })
    }

    /// The peak used memory seen, in bytes (`None` on the CPU).
    fn stop(mut self) -> Option<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

type Probe = Box<dyn Fn() -> Option<u64> + Send>;

/// A function reading the device's used memory (cuMemGetInfo: total − free), or `None` where
/// there is no such device.
#[cfg(feature = "cuda")]
fn used_memory_probe(device: &Device) -> Result<Option<Probe>> {
    match device {
        Device::Cuda(cuda) => {
            let ctx = cuda.cuda_stream().context().clone();
            ctx.mem_get_info()
                .map_err(|e| anyhow::anyhow!("cuMemGetInfo: {e:?}"))?;
            Ok(Some(Box::new(move || {
                ctx.mem_get_info()
                    .ok()
                    .map(|(free, total)| total.saturating_sub(free) as u64)
            })))
        }
        _ => Ok(None),
    }
}

#[cfg(not(feature = "cuda"))]
fn used_memory_probe(_device: &Device) -> Result<Option<Probe>> {
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Libraries

/// The CUDA shared objects mapped into this process (`/proc/self/maps`), sorted.
fn cuda_libraries() -> Vec<String> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut found = BTreeSet::new();
    for line in maps.lines() {
        // address perms offset dev inode path: the path is the sixth field, may hold spaces.
        let Some(path) = line.splitn(6, char::is_whitespace).nth(5).map(str::trim) else {
            continue;
        };
        if !path.starts_with('/') {
            continue;
        }
        let file = Path::new(path)
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("");
        if CUDA_LIBRARY_PREFIXES.iter().any(|p| file.starts_with(p)) {
            found.insert(path.to_string());
        }
    }
    found.into_iter().collect()
}
