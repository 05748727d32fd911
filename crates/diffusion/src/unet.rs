//! `UNet2DConditionModel` (SD 1.x / 2.x) with per-sample timesteps and ControlNet residuals.
//!
//! candle-transformers has a UNet, but its top level takes one scalar timestep for the whole
//! batch; a batch here mixes jobs at different steps, so the top level is ours.
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{self as nn, VarBuilder};
use std::path::Path;

use crate::blocks::{self, Encoder, GroupNorm, UpBlock};
use crate::config::{EncoderSpec, UNetConfig};
use crate::controlnet::ControlResiduals;
use crate::conv::{conv2d, Conv2d};
use crate::weights::WeightFile;

#[derive(Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    encoder: Encoder,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    center_input_sample: bool,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> crate::Result<Self> {
        let spec = config.resolve()?;
        Ok(Self::with_spec(vb, config, spec)?)
    }

    fn with_spec(vb: VarBuilder, config: &UNetConfig, spec: EncoderSpec) -> Result<Self> {
        let c0 = spec.blocks[0].out_channels;
        let up_blocks = (0..spec.blocks.len())
            .map(|i| UpBlock::new(vb.pp(format!("up_blocks.{i}")), &spec, i))
            .collect::<Result<_>>()?;
        let conv_norm_out = blocks::group_norm(
            spec.norm_num_groups,
            c0,
            spec.norm_eps,
            vb.pp("conv_norm_out"),
        )?;
        let conv_out = conv2d(
            c0,
            config.out_channels,
            3,
            nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
            vb.pp("conv_out"),
        )?;
        let encoder = Encoder::new(vb, spec)?;
        Ok(Self {
            config: config.clone(),
            encoder,
            up_blocks,
            conv_norm_out,
            conv_out,
            center_input_sample: config.center_input_sample,
        })
    }

    /// Loads a diffusers `unet/` folder: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (or the `.fp16.safetensors` / `.bin` variants).
    pub fn from_diffusers_dir(dir: &Path, dtype: DType, device: &Device) -> crate::Result<Self> {
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let weights = WeightFile::open(&crate::diffusers_weight_file(dir)?)?;
        let vb = weights.into_var_builder(dtype, device);
        Self::new(vb, &config)
    }

    /// Loads the UNet of an original single-file SD checkpoint (`model.diffusion_model.*` keys),
    /// its config read off the tensor shapes unless `config` is given.
    pub fn from_single_file(
        file: WeightFile,
        config: Option<UNetConfig>,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Self> {
        let config = match config {
            Some(c) => c,
            None => crate::ldm::infer_unet_config(&file)?,
        };
        let renames = crate::ldm::unet_renames(&file, &config.resolve()?)?;
        let vb = file
            .with_renames(renames, crate::ldm::ORIGINAL_SD_LAYOUT)
            .into_var_builder(dtype, device);
        Self::new(vb, &config)
    }

    pub fn spec(&self) -> &EncoderSpec {
        &self.encoder.spec
    }

    pub fn dtype(&self) -> DType {
        self.conv_out.weight().dtype()
    }

    pub fn device(&self) -> &Device {
        self.conv_out.weight().device()
    }

    /// Predicts noise for `sample` `[B, C, H, W]` at per-sample `timesteps` `[B]` with
    /// `encoder_hidden_states` `[B, T, D]`. `residuals` (from ControlNets, already scaled and
    /// summed) are added to the skip connections and the mid block output, as diffusers does;
    /// residuals may be spatially pooled (`[B, C, 1, 1]`) and are broadcast.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        residuals: Option<&ControlResiduals>,
    ) -> Result<Tensor> {
        let (_, _, h, w) = sample.dims4()?;
        let n_blocks = self.up_blocks.len();
        // With sizes not divisible by the total downsampling, upsample to the skip's size.
        let factor = 1usize << (n_blocks - 1);
        let forward_upsample_size = h % factor != 0 || w % factor != 0;
        let sample = if self.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let encoded = self
            .encoder
            .forward(&sample, timesteps, encoder_hidden_states, None)?;
        let mut skips = encoded.skips;
        let mut xs = encoded.mid;
        if let Some(res) = residuals {
            if res.down.len() != skips.len() {
                candle_core::bail!(
                    "ControlNet gave {} down residuals, this UNet has {} skip connections",
                    res.down.len(),
                    skips.len()
                )
            }
            for (skip, r) in skips.iter_mut().zip(&res.down) {
                *skip = skip.broadcast_add(r)?;
            }
            xs = xs.broadcast_add(&res.mid)?;
        }
        let temb = &encoded.temb;
        for (i, block) in self.up_blocks.iter().enumerate() {
            let block_skips = skips.split_off(skips.len() - block.n_skips());
            let upsample_size = match skips.last() {
                Some(next) if i + 1 < n_blocks && forward_upsample_size => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                _ => None,
            };
            xs = block.forward(
                &xs,
                &block_skips,
                temb,
                encoder_hidden_states,
                upsample_size,
            )?;
        }
        let xs = crate::activations::silu(&self.conv_norm_out.forward(&xs)?)?;
        self.conv_out.forward(&xs)
    }
}
