//! `controlnet-serve`: the command line. `serve` (the default) runs the HTTP service;
//! `generate` runs one request through the pipeline on this machine; `openapi` prints the API
//! description; `device-check` proves the device path (parity and a benchmark) with this binary.
mod device_check;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use diffusion::control::ControlMode;
use diffusion::images::ResizeMode;
use diffusion::pipeline::{ControlSpec, InitImage, Request, StableDiffusion};
use diffusion::prompt_syntax::PromptSyntax;
use diffusion::schedulers::SchedulerKind;
use diffusion::ControlNetModel;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "controlnet-serve",
    version,
    about = "Stable Diffusion with ControlNet",
    // `controlnet-serve --bind …` is `controlnet-serve serve --bind …`: serve's flags work
    // without the subcommand name (and then no subcommand may follow).
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `serve`'s flags, for when no subcommand is named.
    #[command(flatten)]
    serve: server::config::Overrides,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service (the default). Settings: config/default.toml, `--config`, CNS_*
    /// environment variables, then these flags.
    Serve(server::config::Overrides),
    /// Print the OpenAPI document (what openapi.yaml holds).
    Openapi,
    /// Generate images from a prompt (and ControlNet hints), write them as PNG.
    Generate(Box<GenerateArgs>),
    /// Check the device path with this binary alone: the end-to-end parity test against
    /// diffusers' images in each dtype, and a benchmark with SD 1.5-size random weights.
    DeviceCheck(Box<device_check::DeviceCheckArgs>),
}

#[derive(Args)]
struct GenerateArgs {
    /// A diffusers pipeline folder or a single-file SD 1.x checkpoint; without it, the built-in
    /// tiny model with generated weights (it makes noise, not pictures).
    #[arg(long)]
    model: Option<PathBuf>,
    /// A ControlNet: a diffusers folder, an original single file (.safetensors/.pth), or
    /// `embedded:N` (a generated one for the built-in model). Repeatable; pairs with --hint.
    #[arg(long)]
    controlnet: Vec<String>,
    /// The hint image of the ControlNet at the same position, used as given (scaled to 0..1).
    #[arg(long)]
    hint: Vec<PathBuf>,
    /// Conditioning scale per ControlNet (default 1.0).
    #[arg(long)]
    control_scale: Vec<f64>,
    /// Fraction of the steps at which each ControlNet starts (default 0.0).
    #[arg(long)]
    control_start: Vec<f64>,
    /// Fraction of the steps at which each ControlNet ends (default 1.0).
    #[arg(long)]
    control_end: Vec<f64>,
    /// balanced | prompt | controlnet, per ControlNet (default balanced).
    #[arg(long)]
    control_mode: Vec<String>,
    /// just-resize | crop-and-resize | resize-and-fill, for hints and the init image.
    #[arg(long, default_value = "crop-and-resize")]
    resize_mode: String,
    #[arg(long, default_value = "")]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// How the prompts are read: `plain` (as written) or `a1111` (AUTOMATIC1111's emphasis
    /// `(word:1.2)`, `[word]`, `BREAK`; `<lora:…>` tags dropped).
    #[arg(long, default_value = "plain")]
    prompt_syntax: String,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// ddim | euler | euler-a | dpmpp-2m | dpmpp-2m-karras | unipc
    #[arg(long, default_value = "unipc")]
    scheduler: String,
    /// DDIM's η.
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// diffusers' clip_skip (A1111's "clip skip" minus one).
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// A safetensors file with one tensor `latents` [n, 4, h/8, w/8]: the initial noise
    /// instead of the seed's (to compare with other implementations).
    #[arg(long)]
    latents: Option<PathBuf>,
    /// img2img: the starting image.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img: how much to repaint (0..1).
    #[arg(long, default_value_t = 0.75)]
    strength: f64,
    /// Inpainting: white where the init image is repainted.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// f32 | f16 | bf16 (bf16 needs CUDA).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu, or cuda / cuda:N (with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The PNG to write; with several images, `-k` is added before the extension.
    #[arg(long, default_value = "out.png")]
    out: PathBuf,
}

fn open_rgb(path: &Path) -> Result<image::RgbImage> {
    Ok(image::open(path)
        .with_context(|| format!("reading image {}", path.display()))?
        .to_rgb8())
}

/// The k-th value of a per-ControlNet flag, or its default.
fn nth<T: Clone>(values: &[T], k: usize, default: T) -> T {
    values.get(k).cloned().unwrap_or(default)
}

fn generate(args: &GenerateArgs) -> Result<()> {
    let device = diffusion::runtime::open_device(&args.device)?;
    let dtype: DType = diffusion::weights::parse_dtype(&args.dtype)?;
    let sd = match &args.model {
        Some(path) => StableDiffusion::load(path, dtype, &device)
            .with_context(|| format!("loading {}", path.display()))?,
        None => {
            eprintln!(
                "no --model: using the built-in tiny model with generated weights \
                 (it makes noise, not pictures)"
            );
            StableDiffusion::embedded(dtype, &device)?
        }
    };
    if args.controlnet.len() != args.hint.len() {
        bail!(
            "{} --controlnet but {} --hint: give them in pairs",
            args.controlnet.len(),
            args.hint.len()
        );
    }
    let resize: ResizeMode = args.resize_mode.parse()?;
    let mut controls = Vec::new();
    for (k, (spec, hint)) in args.controlnet.iter().zip(&args.hint).enumerate() {
        let net = match spec.strip_prefix("embedded:") {
            Some(seed) => diffusion::embedded::controlnet(
                seed.parse().context("embedded:N takes a number")?,
                dtype,
                &device,
            )?,
            None => ControlNetModel::load(Path::new(spec), None, dtype, &device)
                .with_context(|| format!("loading ControlNet {spec}"))?,
        };
        let mode: ControlMode = nth(&args.control_mode, k, "balanced".into()).parse()?;
        controls.push(ControlSpec {
            net: Arc::new(net),
            image: open_rgb(hint)?,
            resize,
            scale: nth(&args.control_scale, k, 1.0),
            start: nth(&args.control_start, k, 0.0),
            end: nth(&args.control_end, k, 1.0),
            mode,
            mask_hint: false,
        });
    }
    let init = match &args.init_image {
        Some(path) => Some(InitImage {
            image: open_rgb(path)?,
            strength: args.strength,
            mask: match &args.mask {
                Some(m) => Some(image::open(m)?.to_luma8()),
                None => None,
            },
            resize,
        }),
        None if args.mask.is_some() => bail!("--mask needs --init-image"),
        None => None,
    };
    let latents = match &args.latents {
        Some(path) => {
            let mut tensors = candle_core::safetensors::load(path, &device)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(
                tensors
                    .remove("latents")
                    .with_context(|| format!("{}: no tensor `latents`", path.display()))?,
            )
        }
        None => None,
    };
    let req = Request {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width,
        height: args.height,
        steps: args.steps,
        guidance_scale: args.guidance,
        scheduler: args.scheduler.parse::<SchedulerKind>()?,
        eta: args.eta,
        seed: args.seed,
        num_images: args.num_images,
        clip_skip: args.clip_skip,
        prompt_syntax: match args.prompt_syntax.as_str() {
            "plain" => PromptSyntax::Plain,
            "a1111" => PromptSyntax::A1111,
            other => bail!("unknown prompt syntax `{other}` (plain or a1111)"),
        },
        controls,
        init,
        latents,
    };
    let bar = ProgressBar::new(args.steps as u64).with_style(
        ProgressStyle::with_template("{bar:40} step {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("a valid template"),
    );
    let out = sd.generate(&req, |k, n| {
        bar.set_length(n as u64);
        bar.set_position(k as u64);
    })?;
    bar.finish();
    for (k, (img, seed)) in out.images.iter().zip(&out.seeds).enumerate() {
        let path = if out.images.len() == 1 {
            args.out.clone()
        } else {
            let stem = args
                .out
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("out");
            args.out.with_file_name(format!("{stem}-{k}.png"))
        };
        img.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{} (seed {seed})", path.display());
    }
    Ok(())
}

fn serve(overrides: &server::config::Overrides) -> Result<()> {
    let config = server::config::Config::load(overrides)?;
    server::init_logging(config.server.log_json);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(server::serve(config))
}

fn main() -> Result<()> {
    diffusion::runtime::keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        None => serve(&cli.serve),
        Some(Command::Serve(overrides)) => serve(&overrides),
        Some(Command::Openapi) => {
            print!("{}", server::openapi::yaml());
            Ok(())
        }
        Some(Command::Generate(args)) => generate(&args),
        Some(Command::DeviceCheck(args)) => device_check::run(&args),
    }
}
