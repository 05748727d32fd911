//! `AutoencoderKL`, the VAE of SD 1.x / 2.x: images to latent distributions and latents back to
//! images, by diffusers' names and numerics.
//!
//! The resnet block and group norm are the UNet's ([`crate::blocks`], half precision as torch
//! computes it). candle-transformers' VAE is not used: its latent distribution does not clamp the log-variance to
//! [-30, 20] as diffusers does, keeps mean and std private and draws its own noise (no mode, no
//! caller-supplied noise); its config is not read from `config.json` and cannot drop the mid
//! block's attention; and its attention scales q and k by d^-1/4 each where diffusers scales
//! the scores once (same math, other rounding). The encoder and decoder here are short.
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{self as nn, VarBuilder};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

use crate::blocks::{group_norm, linear, GroupNorm, Linear, ResnetBlock2D};
use crate::conv::{conv2d, Conv2d};
use crate::weights::WeightFile;
use crate::Error;

fn default_three() -> usize {
    3
}
fn default_four() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_down_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_channels() -> Vec<usize> {
    vec![64]
}
fn default_silu() -> String {
    "silu".into()
}
fn default_groups() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

/// `vae/config.json` (diffusers' `AutoencoderKL`, its names and defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    #[serde(default = "default_down_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one")]
    pub layers_per_block: usize,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_four")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    /// Latents the UNet sees are the VAE's times this (0.18215 for SD 1.x / 2.x).
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<serde_json::Value>,
    #[serde(default)]
    pub latents_std: Option<serde_json::Value>,
    /// diffusers' SDXL-family pipelines run an f16 VAE in f32 when this is set (the SD VAEs
    /// overflow f16 when decoding large images); its SD 1.x / 2.x (ControlNet) pipelines ignore
    /// it. The loader decides ([`crate::pipeline::VaeUpcast`]); the model runs in the dtype it
    /// was loaded in.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn unsupported(what: impl std::fmt::Display) -> Error {
    Error::Config(format!(
        "unsupported VAE config: {what} (only SD 1.x / 2.x-style AutoencoderKL is supported)"
    ))
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        crate::config::read_json(path)
    }

    /// SD 1.x / 2.x's VAE (`vae/config.json` of their repositories).
    pub fn sd15() -> Self {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": vec!["DownEncoderBlock2D"; 4],
            "up_block_types": vec!["UpDecoderBlock2D"; 4],
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "sample_size": 512,
            "scaling_factor": 0.18215,
        }))
        .expect("a valid VAE config")
    }

    pub fn check(&self) -> crate::Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::Config("VAE: `block_out_channels` is empty".into()));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "VAE: {} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(unsupported(format!("down block type {t:?}")));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(unsupported(format!("up block type {t:?}")));
        }
        if self.act_fn != "silu" {
            return Err(unsupported(format!("act_fn = {:?}", self.act_fn)));
        }
        if self.shift_factor.is_some() {
            return Err(unsupported("shift_factor (an SD3 / Flux VAE?)"));
        }
        if self.latents_mean.as_ref().is_some_and(|v| !v.is_null())
            || self.latents_std.as_ref().is_some_and(|v| !v.is_null())
        {
            return Err(unsupported(
                "latents_mean / latents_std (an SDXL-family VAE?)",
            ));
        }
        for &c in &self.block_out_channels {
            if self.norm_num_groups == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return Err(Error::Config(format!(
                    "VAE: {c} channels are not divisible by norm_num_groups {}",
                    self.norm_num_groups
                )));
            }
        }
        Ok(())
    }

    /// How many times the encoder halves the image (3 for SD: 512 px to 64 latents).
    pub fn downsampling_steps(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}

/// The VAE's resnets: no time embedding, eps 1e-6.
fn resnet(vb: VarBuilder, c_in: usize, c_out: usize, groups: usize) -> Result<ResnetBlock2D> {
    ResnetBlock2D::new(vb, c_in, c_out, None, groups, 1e-6, 1.0)
}

fn conv(vb: VarBuilder, c_in: usize, c_out: usize, k: usize, stride: usize) -> Result<Conv2d> {
    let cfg = nn::Conv2dConfig {
        padding: if stride == 1 { k / 2 } else { 0 },
        stride,
        ..Default::default()
    };
    conv2d(c_in, c_out, k, cfg, vb)
}

/// The mid block's self-attention over all pixels (diffusers' `Attention` as the VAE builds it:
/// one head of the full width, group norm in front, residual connection).
#[derive(Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
}

impl SpatialAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
            // heads = channels / attention_head_dim with attention_head_dim = channels: one.
            scale: 1.0 / (channels as f64).sqrt(),
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        // One head: [B, 1, N, C]. Softmax in f32 (diffusers upcasts the VAE's softmax too).
        let heads = |t: &Tensor| t.unsqueeze(1);
        let out =
            crate::blocks::attention(&heads(&q)?, &heads(&k)?, &heads(&v)?, self.scale, false)?
                .squeeze(1)?;
        let out = self.to_out.forward(&out)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + xs
    }
}

/// `UNetMidBlock2D`: resnet, attention (optional), resnet.
#[derive(Debug)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet_1: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, c: usize, cfg: &VaeConfig) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        Ok(Self {
            resnet_0: resnet(vb.pp("resnets.0"), c, c, groups)?,
            attention: if cfg.mid_block_add_attention {
                Some(SpatialAttention::new(vb.pp("attentions.0"), c, groups)?)
            } else {
                None
            },
            resnet_1: resnet(vb.pp("resnets.1"), c, c, groups)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnet_0.forward(xs, None)?;
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs)?;
        }
        self.resnet_1.forward(&xs, None)
    }
}

/// One level of the encoder (`DownEncoderBlock2D`) or decoder (`UpDecoderBlock2D`).
#[derive(Debug)]
struct Level {
    resnets: Vec<ResnetBlock2D>,
    /// Stride-2 conv (encoder) or ×2 nearest upsampling + conv (decoder).
    resample: Option<Conv2d>,
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Level>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let mut down_blocks = Vec::new();
        for (i, &c_out) in ch.iter().enumerate() {
            let vbi = vb.pp(format!("down_blocks.{i}"));
            let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { c_in } else { c_out };
                    resnet(vbi.pp(format!("resnets.{j}")), c, c_out, groups)
                })
                .collect::<Result<_>>()?;
            let resample = if i + 1 < ch.len() {
                Some(conv(vbi.pp("downsamplers.0.conv"), c_out, c_out, 3, 2)?)
            } else {
                None
            };
            down_blocks.push(Level { resnets, resample });
        }
        let c_last = *ch.last().expect("checked config");
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1)?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), c_last, cfg)?,
            conv_norm_out: group_norm(groups, c_last, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv(vb.pp("conv_out"), c_last, 2 * cfg.latent_channels, 3, 1)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for level in &self.down_blocks {
            for r in &level.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(down) = &level.resample {
                // diffusers' Downsample2D with padding 0: pad right and bottom by one.
                let padded = xs.pad_with_zeros(D::Minus1, 0, 1)?;
                xs = down.forward(&padded.pad_with_zeros(D::Minus2, 0, 1)?)?;
            }
        }
        let xs = self.mid_block.forward(&xs)?;
        let xs = crate::activations::silu(&self.conv_norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let mut up_blocks = Vec::new();
        for (i, &c_out) in rev.iter().enumerate() {
            let vbi = vb.pp(format!("up_blocks.{i}"));
            let c_in = if i == 0 { rev[0] } else { rev[i - 1] };
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let c = if j == 0 { c_in } else { c_out };
                    resnet(vbi.pp(format!("resnets.{j}")), c, c_out, groups)
                })
                .collect::<Result<_>>()?;
            let resample = if i + 1 < rev.len() {
                Some(conv(vbi.pp("upsamplers.0.conv"), c_out, c_out, 3, 1)?)
            } else {
                None
            };
            up_blocks.push(Level { resnets, resample });
        }
        let c0 = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cfg.latent_channels, rev[0], 3, 1)?,
            mid_block: MidBlock::new(vb.pp("mid_block"), rev[0], cfg)?,
            up_blocks,
            conv_norm_out: group_norm(groups, c0, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv(vb.pp("conv_out"), c0, cfg.out_channels, 3, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let xs = self.conv_in.forward(z)?;
        let mut xs = self.mid_block.forward(&xs)?;
        for level in &self.up_blocks {
            for r in &level.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(up) = &level.resample {
                let (_, _, h, w) = xs.dims4()?;
                xs = up.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)?;
            }
        }
        let xs = crate::activations::silu(&self.conv_norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}

/// The encoder's output distribution over latents (diffusers' `DiagonalGaussianDistribution`),
/// in the VAE's own space (not yet multiplied by `scaling_factor`).
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// From the encoder's moments `[B, 2C, h, w]`: mean, then log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = crate::transfer::clamp(&moments.narrow(1, c, c)?, -30.0, 20.0)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(Self { mean, logvar, std })
    }

    /// The distribution's mode, its mean (diffusers' `latent_dist.mode()`).
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }

    /// `mean + std · noise`, with `noise` standard normal of the mean's shape (drawn by the
    /// caller, so that seeds are the caller's business).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.add(&self.std.mul(noise)?)
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

/// How errors name the pre-2023 diffusers VAE attention names (`query`/`key`/`value`/
/// `proj_attn`), which diffusers still reads.
const LEGACY_ATTENTION_LAYOUT: &str = "legacy diffusers VAE attention names";

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> crate::Result<Self> {
        config.check()?;
        let l = config.latent_channels;
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            quant_conv: if config.use_quant_conv {
                Some(conv(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(conv(vb.pp("post_quant_conv"), l, l, 1, 1)?)
            } else {
                None
            },
        })
    }

    /// Loads a diffusers `vae/` folder (`config.json` and `diffusion_pytorch_model.safetensors`
    /// or its variants). Files with the legacy attention names load too.
    pub fn from_diffusers_dir(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let mut weights = WeightFile::open(&crate::diffusers_weight_file(dir)?)?;
        let keys = weights.keys();
        if keys
            .iter()
            .any(|k| k.ends_with("attentions.0.query.weight"))
        {
            weights =
                weights.with_renames(legacy_attention_renames(&keys), LEGACY_ATTENTION_LAYOUT);
        }
        Self::new(weights.into_var_builder(dtype, device), &config)
    }

    /// Loads the VAE of an original SD 1.x / 2.x single-file checkpoint (keys
    /// `first_stage_model.*`) or a standalone LDM VAE file (`vae-ft-mse-840000-ema-pruned`,
    /// keys `encoder.*`, `decoder.*`). `config` defaults to the one read off the tensor shapes
    /// (see [`crate::ldm::infer_vae_config`]).
    pub fn from_single_file(
        path: &Path,
        config: Option<VaeConfig>,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        let file = WeightFile::open(path)?;
        let config = match config {
            Some(c) => c,
            None => crate::ldm::infer_vae_config(&file)?,
        };
        let table = crate::ldm::vae_layout(&file, &config)?;
        let vb = file
            .with_layout(table, crate::ldm::ORIGINAL_SD_LAYOUT)
            .into_var_builder(dtype, device);
        Self::new(vb, &config)
    }

    pub fn dtype(&self) -> DType {
        self.decoder.conv_out.weight().dtype()
    }

    pub fn device(&self) -> &Device {
        self.decoder.conv_out.weight().device()
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Images `[B, C, H, W]` in [-1, 1] to the latent distribution (diffusers'
    /// `vae.encode(x).latent_dist`). H and W must be multiples of 2^(levels-1).
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let moments = self.encoder.forward(images)?;
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&moments)?,
            None => moments,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Images to the latents the UNet works on: a sample with `noise` (or the mode when
    /// `None`), times `scaling_factor`, as diffusers' img2img pipelines prepare them.
    pub fn encode_latents(&self, images: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let dist = self.encode(images)?;
        let z = match noise {
            Some(noise) => dist.sample(noise)?,
            None => dist.mode(),
        };
        z * self.config.scaling_factor
    }

    /// VAE-space latents `z` to images in about [-1, 1] (diffusers' `vae.decode(z).sample`).
    /// The UNet's latents must be divided by `scaling_factor` first: see
    /// [`Self::decode_latents`].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// The UNet's latents to images: `decode(latents / scaling_factor)`, as diffusers'
    /// pipelines do at the end of sampling.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&(latents / self.config.scaling_factor)?)
    }
}

/// diffusers name -> legacy name for every attention tensor of a legacy-named VAE file.
fn legacy_attention_renames(keys: &[String]) -> HashMap<String, String> {
    const NAMES: [(&str, &str); 4] = [
        ("query.", "to_q."),
        ("key.", "to_k."),
        ("value.", "to_v."),
        ("proj_attn.", "to_out.0."),
    ];
    keys.iter()
        .map(|key| {
            let name = key
                .rsplit_once("attentions.0.")
                .and_then(|(head, tail)| {
                    NAMES.iter().find_map(|(old, new)| {
                        tail.strip_prefix(old)
                            .map(|rest| format!("{head}attentions.0.{new}{rest}"))
                    })
                })
                .unwrap_or_else(|| key.clone());
            (name, key.clone())
        })
        .collect()
}
