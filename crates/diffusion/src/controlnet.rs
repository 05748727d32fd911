//! `ControlNetModel` (arXiv 2302.05543): a trainable copy of the UNet's encoder, a small hint
//! encoder whose output is added after conv_in, and zero-initialised 1×1 convs on every skip
//! connection and on the mid block.
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{self as nn, Init, VarBuilder};
use std::path::Path;

use crate::blocks::Encoder;
use crate::config::{ControlNetConfig, EncoderSpec};
use crate::conv::{conv2d, Conv2d};
use crate::weights::{Counting, WeightFile};
use candle_nn::var_builder::SimpleBackend;

/// What a ControlNet hands the UNet: one tensor per skip connection and one for the mid block.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

impl ControlResiduals {
    pub fn len(&self) -> usize {
        self.down.len() + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Element-wise sum (several ControlNets on one sample), on the device.
    pub fn add(&self, other: &ControlResiduals) -> Result<ControlResiduals> {
        if self.down.len() != other.down.len() {
            candle_core::bail!(
                "cannot add residuals of {} and {} skip connections",
                self.down.len(),
                other.down.len()
            )
        }
        Ok(ControlResiduals {
            down: self
                .down
                .iter()
                .zip(&other.down)
                .map(|(a, b)| a.broadcast_add(b))
                .collect::<Result<_>>()?,
            mid: self.mid.broadcast_add(&other.mid)?,
        })
    }

    fn map(&self, mut f: impl FnMut(usize, &Tensor) -> Result<Tensor>) -> Result<Self> {
        let n = self.down.len();
        Ok(ControlResiduals {
            down: self
                .down
                .iter()
                .enumerate()
                .map(|(k, t)| f(k, t))
                .collect::<Result<_>>()?,
            mid: f(n, &self.mid)?,
        })
    }
}

/// Per-residual multipliers (before `conditioning_scale`) of the three control modes.
pub mod residual_weights {
    /// diffusers' guess mode ("ControlNet is more important"): `logspace(-1, 0, n)`, from 0.1 on
    /// the shallowest skip to 1.0 on the mid block.
    pub fn guess_mode(n: usize) -> Vec<f64> {
        if n == 1 {
            return vec![1.0];
        }
        (0..n)
            .map(|k| 10f64.powf(-1.0 + k as f64 / (n - 1) as f64))
            .collect()
    }

    /// The original implementation's "My prompt is more important": `0.825^(n-1-k)`.
    pub fn prompt_more_important(n: usize) -> Vec<f64> {
        (0..n).map(|k| 0.825f64.powi((n - 1 - k) as i32)).collect()
    }

    pub fn uniform(n: usize) -> Vec<f64> {
        vec![1.0; n]
    }
}

/// `controlnet_cond_embedding`: the hint image to the first block's channels, downscaled
/// `2^(stages-1)` times, its last conv zero-initialised.
#[derive(Debug)]
struct ConditioningEmbedding {
    conv_in: Conv2d,
    blocks: Vec<Conv2d>,
    conv_out: Conv2d,
}

fn conv(vb: VarBuilder, c_in: usize, c_out: usize, k: usize, stride: usize) -> Result<Conv2d> {
    let cfg = nn::Conv2dConfig {
        padding: k / 2,
        stride,
        ..Default::default()
    };
    conv2d(c_in, c_out, k, cfg, vb)
}

/// A convolution whose fresh initialisation is zero (the paper's "zero convolution"). When the
/// weights come from a file the hint is ignored.
fn zero_conv(vb: VarBuilder, c_in: usize, c_out: usize, k: usize) -> Result<Conv2d> {
    let w = vb.get_with_hints((c_out, c_in, k, k), "weight", Init::Const(0.0))?;
    let b = vb.get_with_hints(c_out, "bias", Init::Const(0.0))?;
    let cfg = nn::Conv2dConfig {
        padding: k / 2,
        ..Default::default()
    };
    Ok(Conv2d::new(w, Some(b), cfg))
}

impl ConditioningEmbedding {
    fn new(vb: VarBuilder, c_cond: usize, channels: &[usize], c_out: usize) -> Result<Self> {
        let conv_in = conv(vb.pp("conv_in"), c_cond, channels[0], 3, 1)?;
        let mut blocks = Vec::new();
        for (i, pair) in channels.windows(2).enumerate() {
            let vbb = vb.pp("blocks");
            blocks.push(conv(vbb.pp(2 * i), pair[0], pair[0], 3, 1)?);
            blocks.push(conv(vbb.pp(2 * i + 1), pair[0], pair[1], 3, 2)?);
        }
        let conv_out = zero_conv(vb.pp("conv_out"), *channels.last().unwrap(), c_out, 3)?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
        })
    }
}

impl Module for ConditioningEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = crate::activations::silu(&self.conv_in.forward(xs)?)?;
        for b in &self.blocks {
            xs = crate::activations::silu(&b.forward(&xs)?)?;
        }
        self.conv_out.forward(&xs)
    }
}

#[derive(Debug)]
pub struct ControlNetModel {
    pub config: ControlNetConfig,
    encoder: Encoder,
    cond_embedding: ConditioningEmbedding,
    zero_convs: Vec<Conv2d>,
    mid_zero_conv: Conv2d,
    /// Bytes of weights held, when loaded through a counting source (0 otherwise).
    bytes: usize,
}

impl ControlNetModel {
    pub fn new(vb: VarBuilder, config: &ControlNetConfig) -> crate::Result<Self> {
        let spec = config.resolve()?;
        Ok(Self::with_spec(vb, config, spec)?)
    }

    fn with_spec(vb: VarBuilder, config: &ControlNetConfig, spec: EncoderSpec) -> Result<Self> {
        let cond_embedding = ConditioningEmbedding::new(
            vb.pp("controlnet_cond_embedding"),
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
            spec.blocks[0].out_channels,
        )?;
        let zero_convs = spec
            .skip_channels()
            .into_iter()
            .enumerate()
            .map(|(i, c)| zero_conv(vb.pp("controlnet_down_blocks").pp(i), c, c, 1))
            .collect::<Result<_>>()?;
        let c_mid = spec.blocks.last().unwrap().out_channels;
        let mid_zero_conv = zero_conv(vb.pp("controlnet_mid_block"), c_mid, c_mid, 1)?;
        let encoder = Encoder::new(vb, spec)?;
        Ok(Self {
            config: config.clone(),
            encoder,
            cond_embedding,
            zero_convs,
            mid_zero_conv,
            bytes: 0,
        })
    }

    /// Builds the model from `weights`, counting the bytes it takes (see [`Self::size_in_bytes`]).
    pub fn from_source(
        weights: impl SimpleBackend + 'static,
        config: &ControlNetConfig,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        let (vb, bytes) = Counting::var_builder(weights, dtype, device);
        let mut model = Self::new(vb, config)?;
        model.bytes = bytes.load(std::sync::atomic::Ordering::Relaxed);
        Ok(model)
    }

    /// Whether this ControlNet can drive `unet`: its residuals must have the UNet's skip
    /// channels, and it must read prompt embeddings of the UNet's width. An SD 2.x ControlNet on
    /// an SD 1.5 base fails here, with the reason, not mid-batch.
    pub fn check_fits(&self, unet: &EncoderSpec) -> crate::Result<()> {
        let ours = self.spec();
        if ours.skip_channels() != unet.skip_channels() {
            return Err(crate::Error::Config(format!(
                "the ControlNet's residual channels {:?} do not match the base model's skips {:?}",
                ours.skip_channels(),
                unet.skip_channels()
            )));
        }
        let (a, b) = (
            ours.mid_attention.cross_attention_dim,
            unet.mid_attention.cross_attention_dim,
        );
        if a != b {
            return Err(crate::Error::Config(format!(
                "the ControlNet reads {a}-wide prompt embeddings, the base model makes {b}"
            )));
        }
        Ok(())
    }

    /// The weights' size on the device, in bytes (what a memory budget counts).
    pub fn size_in_bytes(&self) -> usize {
        self.bytes
    }

    /// Loads a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`), or a
    /// single file: the original layout (`control_model.*` keys, as A1111/ComfyUI users have
    /// them, `.safetensors` or `.pth`) whose config is inferred from the tensor shapes unless
    /// `config` is given, or a diffusers-layout file with its `config`.
    pub fn load(
        path: &Path,
        config: Option<ControlNetConfig>,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        if path.is_dir() {
            let config = match config {
                Some(c) => c,
                None => ControlNetConfig::from_file(&path.join("config.json"))?,
            };
            let file = WeightFile::open(&crate::diffusers_weight_file(path)?)?;
            return Self::from_source(file, &config, dtype, device);
        }
        let file = WeightFile::open(path)?;
        if crate::ldm::is_original_controlnet(&file) {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let config = match config {
                Some(c) => c,
                None => crate::ldm::infer_controlnet_config(&file, stem)?,
            };
            let spec = config.resolve()?;
            let renames = crate::ldm::controlnet_renames(&file, &spec)?;
            let file = file.with_renames(renames, crate::ldm::ORIGINAL_CONTROLNET_LAYOUT);
            return Self::from_source(file, &config, dtype, device);
        }
        match config {
            Some(config) => Self::from_source(file, &config, dtype, device),
            None => Err(crate::Error::Weights(format!(
                "{}: not an original-layout ControlNet (no `control_model.` keys); a \
                 diffusers-layout file needs its config.json (put both in one folder)",
                path.display()
            ))),
        }
    }

    pub fn spec(&self) -> &EncoderSpec {
        &self.encoder.spec
    }

    /// Number of residuals it produces (13 for SD 1.5).
    pub fn n_residuals(&self) -> usize {
        self.zero_convs.len() + 1
    }

    /// Pixels of hint per latent pixel (8 for the standard hint encoder).
    pub fn hint_downscale(&self) -> usize {
        self.config.hint_downscale()
    }

    pub fn dtype(&self) -> DType {
        self.mid_zero_conv.weight().dtype()
    }

    /// The residuals before any scaling or pooling: the zero convs' outputs.
    /// `cond` is the hint batch `[B, 3, H·f, W·f]` in 0..1 (RGB).
    pub fn forward_unscaled(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        cond: &Tensor,
    ) -> Result<ControlResiduals> {
        let (b, _, h, w) = sample.dims4()?;
        let (bc, _, hc, wc) = cond.dims4()?;
        let f = self.hint_downscale();
        if bc != b || hc != h * f || wc != w * f {
            candle_core::bail!(
                "hint batch is {bc}×{hc}×{wc}; expected {b}×{}×{} for a {h}×{w} latent",
                h * f,
                w * f
            )
        }
        let cond = cond.to_dtype(sample.dtype())?;
        let cond = if self.config.controlnet_conditioning_channel_order == "bgr" {
            Tensor::cat(
                &[
                    cond.i((.., 2..3))?,
                    cond.i((.., 1..2))?,
                    cond.i((.., 0..1))?,
                ],
                1,
            )?
        } else {
            cond
        };
        let hint = self.cond_embedding.forward(&cond)?;
        let encoded =
            self.encoder
                .forward(sample, timesteps, encoder_hidden_states, Some(&hint))?;
        let down = encoded
            .skips
            .iter()
            .zip(&self.zero_convs)
            .map(|(s, c)| c.forward(s))
            .collect::<Result<_>>()?;
        let mid = self.mid_zero_conv.forward(&encoded.mid)?;
        Ok(ControlResiduals { down, mid })
    }

    /// Residual `k` of sample `b` is multiplied by `weights[b, k]` (`[B, n_residuals]`, any
    /// float dtype), so one batch can hold samples with different scales and control modes;
    /// with `global_pool_conditions` (the shuffle model) residuals are then averaged over space.
    pub fn forward_weighted(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        cond: &Tensor,
        weights: &Tensor,
    ) -> Result<ControlResiduals> {
        let raw = self.forward_unscaled(sample, timesteps, encoder_hidden_states, cond)?;
        let (b, n) = weights.dims2()?;
        if n != raw.len() || b != sample.dim(0)? {
            candle_core::bail!(
                "residual weights are {b}×{n}, expected {}×{}",
                sample.dim(0)?,
                raw.len()
            )
        }
        let weights = weights.to_dtype(self.dtype())?;
        let pool = self.config.global_pool_conditions;
        raw.map(|k, t| {
            let wk = weights.i((.., k))?.reshape((b, 1, 1, 1))?;
            let t = t.broadcast_mul(&wk)?;
            if pool {
                t.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2)
            } else {
                Ok(t)
            }
        })
    }

    /// diffusers' `ControlNetModel.forward`: every residual × `conditioning_scale`, or in guess
    /// mode × `logspace(-1, 0, n)[k]` × `conditioning_scale` (not with global pooling, as in
    /// diffusers).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        cond: &Tensor,
        conditioning_scale: f64,
        guess_mode: bool,
    ) -> Result<ControlResiduals> {
        let n = self.n_residuals();
        let per_residual = if guess_mode && !self.config.global_pool_conditions {
            residual_weights::guess_mode(n)
        } else {
            residual_weights::uniform(n)
        };
        let row: Vec<f32> = per_residual
            .iter()
            .map(|w| (w * conditioning_scale) as f32)
            .collect();
        let b = sample.dim(0)?;
        // An upload per call: the denoising loop calls `forward_weighted` instead, with weights
        // made on the device.
        let weights = crate::transfer::upload(row, n, sample.device())?
            .unsqueeze(0)?
            .repeat((b, 1))?;
        self.forward_weighted(sample, timesteps, encoder_hidden_states, cond, &weights)
    }
}

/// Zero residuals (for samples of a batch that use no ControlNet), with the UNet's skip shapes
/// for a latent of `h`×`w`.
pub fn zero_residuals(
    spec: &EncoderSpec,
    batch: usize,
    h: usize,
    w: usize,
    dtype: DType,
    device: &Device,
) -> Result<ControlResiduals> {
    let n = spec.blocks.len();
    let mut down = Vec::new();
    let (mut h, mut w) = (h, w);
    down.push(Tensor::zeros(
        (batch, spec.blocks[0].out_channels, h, w),
        dtype,
        device,
    )?);
    for (i, b) in spec.blocks.iter().enumerate() {
        for _ in 0..b.layers {
            down.push(Tensor::zeros((batch, b.out_channels, h, w), dtype, device)?);
        }
        if i + 1 < n {
            // A stride-2 3×3 conv with padding 1 rounds up.
            h = h.div_ceil(2);
            w = w.div_ceil(2);
            down.push(Tensor::zeros((batch, b.out_channels, h, w), dtype, device)?);
        }
    }
    let c = spec.blocks[n - 1].out_channels;
    let mid = Tensor::zeros((batch, c, h, w), dtype, device)?;
    Ok(ControlResiduals { down, mid })
}
