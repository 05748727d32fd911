//! The Stable Diffusion + ControlNet pipeline: a loaded model, and requests turned into
//! [`DenoiseJob`]s, stepped, and decoded to images. Same semantics as diffusers'
//! `StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline`, with A1111's long prompts.
//!
//! Precision: the models run in the dtype they are loaded in (the VAE possibly in f32, see
//! [`VaeUpcast`]); the latents between steps and the schedulers' arithmetic stay in f32 whatever
//! that dtype (diffusers keeps its latents in the model's dtype and computes DDIM, DPM-Solver and
//! UniPC steps in it, upcasting only in the Euler family: keeping f32 is at least as precise).
//!
//! Copies: a generation uploads its prompt tokens, hints, init image and mask and its noise
//! (all of a stochastic scheduler's included, [`PrefetchedNoise`]) before the loop and downloads
//! the images after it; the loop itself copies nothing ([`crate::transfer`]).
use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};
use std::path::Path;
use std::sync::Arc;

use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::config::UNetConfig;
use crate::control::ControlMode;
use crate::controlnet::ControlNetModel;
use crate::denoise::{self, DenoiseJob, InpaintBlend, JobControl, PerImageNoise, PrefetchedNoise};
use crate::images::{self, ResizeMode};
use crate::prompt_syntax::{self, PromptSyntax};
use crate::schedulers::{self, NoiseSource, SchedulerConfig, SchedulerKind, SchedulerOptions};
use crate::tokenizer::ClipTokenizer;
use crate::unet::UNet2DConditionModel;
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::WeightFile;
use crate::{Error, Result};

/// A base model, resident: its UNet, VAE, text encoder, tokenizer and scheduler config.
pub struct StableDiffusion {
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_encoder: ClipTextModel,
    pub tokenizer: ClipTokenizer,
    pub scheduler_config: SchedulerConfig,
}

/// Which dtype the VAE is loaded in when the other models are in half precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VaeUpcast {
    /// The models' dtype. diffusers' SD 1.x / 2.x pipelines (`StableDiffusionPipeline`,
    /// `StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline`) do this: they ignore the VAE
    /// config's `force_upcast`.
    #[default]
    Never,
    /// f32 when the models are f16 and the VAE config's `force_upcast` is set (true unless the
    /// config says otherwise, as in diffusers' `AutoencoderKL`): diffusers' SDXL pipelines'
    /// rule (`needs_upcasting = vae.dtype == float16 and vae.config.force_upcast`), which also
    /// encodes img2img images in f32. bf16 is not upcast (its range is f32's).
    ForceUpcastConfig,
    /// f32 whatever the models' dtype.
    Always,
}

impl VaeUpcast {
    /// The VAE's dtype for models in `dtype`.
    pub fn vae_dtype(self, dtype: DType, config: &VaeConfig) -> DType {
        match self {
            VaeUpcast::Never => dtype,
            VaeUpcast::ForceUpcastConfig if dtype == DType::F16 && config.force_upcast => {
                DType::F32
            }
            VaeUpcast::ForceUpcastConfig => dtype,
            VaeUpcast::Always => DType::F32,
        }
    }
}

/// How to load a model: the dtype of its weights and computation, and the VAE's exception.
/// A bare [`DType`] converts to this with the VAE in that dtype too (diffusers' default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    pub dtype: DType,
    pub vae_upcast: VaeUpcast,
}

impl From<DType> for LoadOptions {
    fn from(dtype: DType) -> Self {
        Self {
            dtype,
            vae_upcast: VaeUpcast::default(),
        }
    }
}

/// The configs of an original single-file checkpoint's models. A file carries none; each
/// `None` is read off the tensor shapes, with SD's conventions for what shapes cannot show
/// (32 norm groups, SD 1.x's 8 UNet heads, CLIP's 64-wide heads): right for real SD 1.x
/// checkpoints, wrong for models built otherwise, which need their configs given.
#[derive(Debug, Clone, Default)]
pub struct SingleFileConfigs {
    pub unet: Option<UNetConfig>,
    pub vae: Option<VaeConfig>,
    pub text_encoder: Option<ClipTextConfig>,
}

/// An image-to-image start: the image, how much of it to repaint (`strength`), and for
/// inpainting the mask (white = repaint).
#[derive(Clone)]
pub struct InitImage {
    pub image: RgbImage,
    pub strength: f64,
    pub mask: Option<GrayImage>,
    pub resize: ResizeMode,
}

/// One ControlNet of a request, with its hint image as given (scaled to 0..1 and fitted here).
#[derive(Clone)]
pub struct ControlSpec {
    pub net: Arc<ControlNetModel>,
    pub image: RgbImage,
    pub resize: ResizeMode,
    pub scale: f64,
    pub start: f64,
    pub end: f64,
    pub mode: ControlMode,
    /// ControlNet 1.1 inpaint convention: hint pixels under the request's mask become −1.
    pub mask_hint: bool,
}

/// What to generate.
#[derive(Clone)]
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    pub eta: f64,
    /// Image k uses seed `seed + k` (as A1111 numbers a batch), so it is the same image
    /// whether made alone or with others.
    pub seed: u64,
    pub num_images: usize,
    /// diffusers' `clip_skip` (A1111's "clip skip" minus one).
    pub clip_skip: usize,
    /// How the prompt and negative prompt are read: as written (default) or in A1111's syntax
    /// (emphasis, `BREAK`, extra-network tags removed), see [`crate::prompt_syntax`].
    pub prompt_syntax: PromptSyntax,
    pub controls: Vec<ControlSpec>,
    pub init: Option<InitImage>,
    /// Caller-supplied initial noise `[n, 4, h/f, w/f]` (for comparison with other
    /// implementations), used instead of the seeds' for the initial latents.
    pub latents: Option<Tensor>,
}

impl Request {
    pub fn txt2img(prompt: &str, width: usize, height: usize) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width,
            height,
            steps: 20,
            guidance_scale: 7.5,
            scheduler: SchedulerKind::UniPc,
            eta: 0.0,
            seed: 0,
            num_images: 1,
            clip_skip: 0,
            prompt_syntax: PromptSyntax::Plain,
            controls: Vec::new(),
            init: None,
            latents: None,
        }
    }
}

/// The result of a request: one image per seed.
pub struct Generated {
    pub images: Vec<RgbImage>,
    pub seeds: Vec<u64>,
}

impl StableDiffusion {
    /// Loads a diffusers folder (`model_index.json` with `unet/`, `vae/`, `text_encoder/`,
    /// `tokenizer/`, `scheduler/`) or an original single-file SD 1.x checkpoint
    /// (`v1-5-pruned-emaonly.safetensors` style), whose tokenizer and scheduler are SD 1.5's.
    pub fn load(path: &Path, options: impl Into<LoadOptions>, device: &Device) -> Result<Self> {
        let options = options.into();
        let dtype = options.dtype;
        if path.is_dir() {
            if !path.join("model_index.json").is_file() {
                return Err(Error::Weights(format!(
                    "{}: not a diffusers pipeline folder (no model_index.json)",
                    path.display()
                )));
            }
            return Ok(Self {
                unet: UNet2DConditionModel::from_diffusers_dir(&path.join("unet"), dtype, device)?,
                vae: {
                    let dir = path.join("vae");
                    let config = VaeConfig::from_file(&dir.join("config.json"))?;
                    let vae_dtype = options.vae_upcast.vae_dtype(dtype, &config);
                    AutoencoderKL::from_diffusers_dir(&dir, vae_dtype, device)?
                },
                text_encoder: ClipTextModel::from_diffusers_dir(
                    &path.join("text_encoder"),
                    dtype,
                    device,
                )?,
                tokenizer: ClipTokenizer::from_dir(&path.join("tokenizer"))?,
                scheduler_config: SchedulerConfig::from_file(
                    &path.join("scheduler/scheduler_config.json"),
                )?,
            });
        }
        Self::load_single_file(path, SingleFileConfigs::default(), None, options, device)
    }

    /// Loads an original single-file SD 1.x checkpoint with the given model configs (see
    /// [`SingleFileConfigs`]) and tokenizer (default: the embedded SD 1.x one). The scheduler
    /// config is SD 1.5's, which every SD 1.x model was trained with.
    pub fn load_single_file(
        path: &Path,
        configs: SingleFileConfigs,
        tokenizer: Option<ClipTokenizer>,
        options: impl Into<LoadOptions>,
        device: &Device,
    ) -> Result<Self> {
        let options = options.into();
        let dtype = options.dtype;
        // The text encoder first: it refuses SD 2.x files (OpenCLIP) by name, before gigabytes
        // of UNet are read.
        let text_encoder =
            ClipTextModel::from_single_file(path, configs.text_encoder, dtype, device)?;
        let vae_config = match configs.vae {
            Some(c) => c,
            None => crate::ldm::infer_vae_config(&WeightFile::open(path)?)?,
        };
        let vae_dtype = options.vae_upcast.vae_dtype(dtype, &vae_config);
        let vae = AutoencoderKL::from_single_file(path, Some(vae_config), vae_dtype, device)?;
        let unet = UNet2DConditionModel::from_single_file(
            WeightFile::open(path)?,
            configs.unet,
            dtype,
            device,
        )?;
        let tokenizer = match tokenizer {
            Some(t) => t,
            None => ClipTokenizer::embedded(crate::tokenizer::Family::Sd1)?,
        };
        Ok(Self {
            unet,
            vae,
            text_encoder,
            tokenizer,
            scheduler_config: SchedulerConfig::sd15(),
        })
    }

    pub fn device(&self) -> &Device {
        self.unet.device()
    }

    /// Pixels per latent pixel (8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        1 << self.vae.config.downsampling_steps()
    }

    /// `[2n, T, D]` (negative rows first) with guidance, else `[n, T, D]`. Long prompts are
    /// encoded in 75-token chunks and concatenated (A1111), the negative padded to match.
    pub fn encode_prompt(&self, req: &Request, guided: bool) -> Result<Tensor> {
        let one = self.prompt_embeddings_in(
            req.prompt_syntax,
            &req.prompt,
            &req.negative_prompt,
            req.clip_skip,
            guided,
        )?;
        per_image_embeddings(&one, req.num_images, guided)
    }

    /// One image's embeddings: `[2, T, D]` (negative first) with guidance, else `[1, T, D]`.
    /// A function of its arguments alone, so callers may cache it.
    pub fn prompt_embeddings(
        &self,
        prompt: &str,
        negative_prompt: &str,
        clip_skip: usize,
        guided: bool,
    ) -> Result<Tensor> {
        let (positive, negative) = self.tokenizer.encode_pair(prompt, negative_prompt)?;
        let cond = self.text_encoder.encode_chunks(&positive, clip_skip)?;
        if !guided {
            return Ok(cond);
        }
        let uncond = self.text_encoder.encode_chunks(&negative, clip_skip)?;
        Ok(Tensor::cat(&[uncond, cond], 0)?)
    }

    /// [`Self::prompt_embeddings`] with the texts read in `syntax`. In A1111's syntax the
    /// prompt loses its extra-network tags ([`prompt_syntax::parse`]; the negative prompt keeps
    /// them as text, as in A1111), both are cut into A1111's chunks and their emphasis applied
    /// ([`ClipTextModel::encode_weighted_chunks`]). Plain is [`Self::prompt_embeddings`].
    pub fn prompt_embeddings_in(
        &self,
        syntax: PromptSyntax,
        prompt: &str,
        negative_prompt: &str,
        clip_skip: usize,
        guided: bool,
    ) -> Result<Tensor> {
        if syntax == PromptSyntax::Plain {
            return self.prompt_embeddings(prompt, negative_prompt, clip_skip, guided);
        }
        let (positive, negative) = self.tokenizer.encode_pair_weighted(
            &prompt_syntax::parse(prompt).segments,
            &prompt_syntax::parse_attention(negative_prompt),
        )?;
        let cond = self
            .text_encoder
            .encode_weighted_chunks(&positive, clip_skip)?;
        if !guided {
            return Ok(cond);
        }
        let uncond = self
            .text_encoder
            .encode_weighted_chunks(&negative, clip_skip)?;
        Ok(Tensor::cat(&[uncond, cond], 0)?)
    }

    fn check(&self, req: &Request) -> Result<(usize, usize)> {
        let f = self.vae_scale_factor();
        if req.width == 0 || req.height == 0 || req.width % f != 0 || req.height % f != 0 {
            return Err(Error::Config(format!(
                "width and height must be positive multiples of {f}, got {}×{}",
                req.width, req.height
            )));
        }
        if req.num_images == 0 || req.steps == 0 {
            return Err(Error::Config(
                "steps and num_images must be at least 1".into(),
            ));
        }
        if !req.guidance_scale.is_finite() {
            return Err(Error::Config("guidance_scale must be a number".into()));
        }
        Ok((req.height / f, req.width / f))
    }

    /// A request as a job ready for [`denoise::step_batch`].
    pub fn new_job(&self, req: &Request) -> Result<DenoiseJob> {
        self.check(req)?;
        let guided = req.guidance_scale > 1.0;
        let one = self.prompt_embeddings_in(
            req.prompt_syntax,
            &req.prompt,
            &req.negative_prompt,
            req.clip_skip,
            guided,
        )?;
        self.new_job_with_embeddings(req, &one)
    }

    /// [`Self::new_job`] with one image's prompt embeddings already made (by
    /// [`Self::prompt_embeddings`] with `guided` = guidance scale > 1), e.g. from a cache.
    pub fn new_job_with_embeddings(&self, req: &Request, prompt: &Tensor) -> Result<DenoiseJob> {
        let (h, w) = self.check(req)?;
        let device = self.device().clone();
        let n = req.num_images;
        let latent_shape = [n, self.unet.config.encoder.in_channels, h, w];
        let scheduler = schedulers::build(
            req.scheduler,
            &self.scheduler_config,
            req.steps,
            &SchedulerOptions { eta: req.eta },
        )?;
        let mut noise = PerImageNoise {
            sources: (0..n as u64)
                .map(|k| schedulers::SeededNoise::new(req.seed.wrapping_add(k)))
                .collect(),
        };
        let guided = req.guidance_scale > 1.0;
        let embeddings = per_image_embeddings(prompt, n, guided)?;

        let initial_noise = match &req.latents {
            Some(given) => {
                if given.dims() != latent_shape {
                    return Err(Error::Config(format!(
                        "given latents are {:?}, this request needs {latent_shape:?}",
                        given.dims()
                    )));
                }
                crate::transfer::to_device(given, &device)?.to_dtype(DType::F32)?
            }
            None => noise.randn(&latent_shape, DType::F32, &device)?,
        };
        let (latents, start_step, inpaint, mask) = match &req.init {
            None => {
                let latents = (initial_noise * scheduler.init_noise_sigma())?;
                (latents, 0, None, None)
            }
            Some(init) => {
                let start = schedulers::img2img_start_step(req.steps, init.strength);
                if start >= req.steps {
                    return Err(Error::Config(format!(
                        "strength {} leaves no step to run out of {}",
                        init.strength, req.steps
                    )));
                }
                let image = images::fit(
                    &init.image,
                    req.width as u32,
                    req.height as u32,
                    init.resize,
                );
                let pixels = ((images::to_unit_tensor(&image, &device)? * 2.0)? - 1.0)?
                    .to_dtype(self.vae.dtype())?;
                let moments_noise = noise.randn(&latent_shape, DType::F32, &device)?;
                let image_latents = self
                    .vae
                    .encode_latents(
                        &pixels.repeat((n, 1, 1, 1))?,
                        Some(&moments_noise.to_dtype(self.vae.dtype())?),
                    )?
                    .to_dtype(DType::F32)?;
                let latents = scheduler.add_noise(&image_latents, &initial_noise, start)?;
                match &init.mask {
                    None => (latents, start, None, None),
                    Some(mask) => {
                        let mask_img = image::imageops::resize(
                            mask,
                            req.width as u32,
                            req.height as u32,
                            image::imageops::FilterType::Lanczos3,
                        );
                        let latent_mask =
                            mask_to_latent(&mask_img, h, w, &device)?.repeat((n, 1, 1, 1))?;
                        let blend = InpaintBlend {
                            image_latents,
                            mask: latent_mask,
                            noise: initial_noise.clone(),
                        };
                        (latents, start, Some(blend), Some(mask_img))
                    }
                }
            }
        };

        // A stochastic scheduler draws noise at every step: all of it is drawn now, after the
        // initial noise as before, and uploaded in one copy.
        let options = SchedulerOptions { eta: req.eta };
        let noise: Box<dyn NoiseSource + Send> = if req.scheduler.is_stochastic(&options) {
            let draws = req.steps - start_step;
            Box::new(PrefetchedNoise::new(noise, &latent_shape, draws, &device)?)
        } else {
            Box::new(noise)
        };

        let controls = req
            .controls
            .iter()
            .map(|c| {
                c.net.check_fits(self.unet.spec())?;
                let f = c.net.hint_downscale();
                if f != self.vae_scale_factor() {
                    return Err(Error::Config(format!(
                        "the ControlNet's hint encoder scales by {f}, the VAE by {}",
                        self.vae_scale_factor()
                    )));
                }
                let image = images::fit(&c.image, req.width as u32, req.height as u32, c.resize);
                let mut hint = images::to_unit_tensor(&image, &device)?;
                if c.mask_hint {
                    if let Some(mask) = &mask {
                        // Masked pixels become −1: where = 1 − m, hint·(1 − m) − m.
                        let m = images::to_unit_tensor(
                            &image::DynamicImage::ImageLuma8(mask.clone()).to_rgb8(),
                            &device,
                        )?
                        .ge(0.5)?
                        .to_dtype(DType::F32)?;
                        hint = ((hint * (1.0 - &m)?)? - m)?;
                    }
                }
                Ok(JobControl {
                    net: c.net.clone(),
                    hint: hint.to_dtype(c.net.dtype())?,
                    scale: c.scale,
                    start: c.start,
                    end: c.end,
                    mode: c.mode,
                })
            })
            .collect::<Result<Vec<_>>>()?;

        Ok(DenoiseJob {
            latents,
            scheduler,
            step: start_step,
            start_step,
            embeddings,
            guidance_scale: req.guidance_scale,
            controls,
            noise,
            inpaint,
        })
    }

    /// Final latents → images (through the VAE, in its dtype).
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let pixels = self
            .vae
            .decode_latents(&latents.to_dtype(self.vae.dtype())?)?;
        Ok(images::from_signed_tensor(&pixels)?)
    }

    /// Runs a request alone, calling `progress(step, total)` after every step.
    pub fn generate(
        &self,
        req: &Request,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Generated> {
        let mut job = self.new_job(req)?;
        let total = job.n_steps() - job.start_step;
        while !job.is_done() {
            denoise::step_batch(&self.unet, &mut [&mut job])?;
            progress(job.step - job.start_step, total);
        }
        Ok(Generated {
            images: self.decode(&job.latents)?,
            seeds: (0..req.num_images as u64)
                .map(|k| req.seed.wrapping_add(k))
                .collect(),
        })
    }
}

/// One image's embeddings (`[2, T, D]` guided, negative first; else `[1, T, D]`) repeated for
/// `n` images: all negative rows, then all positive ones.
fn per_image_embeddings(one: &Tensor, n: usize, guided: bool) -> Result<Tensor> {
    let rows = if guided { 2 } else { 1 };
    if one.dims()[0] != rows {
        return Err(Error::Config(format!(
            "prompt embeddings have {} rows, {} expected",
            one.dims()[0],
            rows
        )));
    }
    if !guided {
        return Ok(one.repeat((n, 1, 1))?);
    }
    let uncond = one.narrow(0, 0, 1)?.repeat((n, 1, 1))?;
    let cond = one.narrow(0, 1, 1)?.repeat((n, 1, 1))?;
    Ok(Tensor::cat(&[uncond, cond], 0)?)
}

/// The mask at latent size: nearest-neighbour down to `h`×`w` (diffusers interpolates the
/// mask with `interpolate(size=...)`, nearest), binarised at 0.5, `[1, 1, h, w]`.
fn mask_to_latent(mask: &GrayImage, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let small = image::imageops::resize(
        mask,
        w as u32,
        h as u32,
        image::imageops::FilterType::Nearest,
    );
    let values: Vec<f32> = small
        .pixels()
        .map(|p| if p[0] >= 128 { 1.0 } else { 0.0 })
        .collect();
    Ok(crate::transfer::upload(values, (1, 1, h, w), device)?)
}
