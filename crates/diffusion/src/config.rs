//! Model configs, read from the `config.json` files diffusers ships next to the weights.
//!
//! diffusers keeps some legacy conventions that are easy to get wrong; they are resolved here,
//! once, into [`BlockSpec`]s so that the model code never has to think about them:
//! - `attention_head_dim` in UNet/ControlNet configs is the number of heads (diffusers' own
//!   `num_attention_heads = num_attention_heads or attention_head_dim`), not the head width.
//! - several fields are "an int for every block, or a list with one entry per block".
use serde::Deserialize;
use std::path::Path;

use crate::{Error, Result};

/// A value diffusers accepts either once for all blocks or as one entry per down block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn resolve(&self, field: &str, n_blocks: usize) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n_blocks]),
            PerBlock::Many(vs) if vs.len() == n_blocks => Ok(vs.clone()),
            PerBlock::Many(vs) => Err(Error::Config(format!(
                "`{field}` has {} entries but there are {n_blocks} down blocks",
                vs.len()
            ))),
        }
    }
}

fn default_in_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_one() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn default_downsample_padding() -> usize {
    1
}
fn default_mid_scale() -> f64 {
    1.0
}
fn default_norm_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_silu() -> String {
    "silu".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_time_shift() -> String {
    "default".into()
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_hint_channels() -> Vec<usize> {
    vec![16, 32, 96, 256]
}
fn default_conditioning_channels() -> usize {
    3
}
fn default_rgb() -> String {
    "rgb".into()
}

/// The fields the UNet and the ControlNet's encoder copy share (diffusers names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct EncoderFields {
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_one")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "default_downsample_padding")]
    pub downsample_padding: usize,
    #[serde(default = "default_mid_scale")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_norm_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock<usize>,
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: Option<PerBlock<bool>>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default = "default_time_shift")]
    pub resnet_time_scale_shift: String,
}

/// `UNet2DConditionModel`'s `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(flatten)]
    pub encoder: EncoderFields,
    #[serde(default = "default_in_channels")]
    pub out_channels: usize,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
}

/// `ControlNetModel`'s `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetConfig {
    #[serde(flatten)]
    pub encoder: EncoderFields,
    #[serde(default = "default_conditioning_channels")]
    pub conditioning_channels: usize,
    #[serde(default = "default_hint_channels")]
    pub conditioning_embedding_out_channels: Vec<usize>,
    #[serde(default)]
    pub global_pool_conditions: bool,
    #[serde(default = "default_rgb")]
    pub controlnet_conditioning_channel_order: String,
}

/// One level of the UNet (a down block, and the matching up block), resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    pub out_channels: usize,
    /// Resnets in the down block (the up block has one more).
    pub layers: usize,
    /// `Some` when the block has cross-attention transformers.
    pub attention: Option<AttentionSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    pub heads: usize,
    pub depth: usize,
    pub cross_attention_dim: usize,
}

/// Everything the shared encoder (conv_in, time embedding, down blocks, mid block) needs.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderSpec {
    pub in_channels: usize,
    pub blocks: Vec<BlockSpec>,
    /// The mid block's attention (it always has one: `UNetMidBlock2DCrossAttn`).
    pub mid_attention: AttentionSpec,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
}

impl EncoderSpec {
    pub fn time_embed_dim(&self) -> usize {
        self.blocks[0].out_channels * 4
    }

    /// Number of skip connections (= ControlNet down residuals): conv_in's output, every resnet
    /// output and every downsampler output. 12 for SD 1.5.
    pub fn n_skips(&self) -> usize {
        let n = self.blocks.len();
        1 + self.blocks.iter().map(|b| b.layers).sum::<usize>() + (n - 1)
    }

    /// Channels of each skip connection, in order.
    pub fn skip_channels(&self) -> Vec<usize> {
        let mut out = vec![self.blocks[0].out_channels];
        let n = self.blocks.len();
        for (i, b) in self.blocks.iter().enumerate() {
            out.extend(std::iter::repeat_n(b.out_channels, b.layers));
            if i + 1 < n {
                out.push(b.out_channels);
            }
        }
        out
    }
}

fn unsupported(what: impl std::fmt::Display) -> Error {
    Error::Config(format!(
        "unsupported model config: {what} (only SD 1.x / 2.x-family UNets are supported)"
    ))
}

impl EncoderFields {
    pub fn resolve(&self) -> Result<EncoderSpec> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::Config("`block_out_channels` is empty".into()));
        }
        if self.down_block_types.len() != n {
            return Err(Error::Config(format!(
                "`down_block_types` has {} entries but `block_out_channels` has {n}",
                self.down_block_types.len()
            )));
        }
        if self.act_fn != "silu" {
            return Err(unsupported(format!("act_fn = {:?}", self.act_fn)));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(format!(
                "resnet_time_scale_shift = {:?}",
                self.resnet_time_scale_shift
            )));
        }
        if let Some(t) = &self.class_embed_type {
            return Err(unsupported(format!("class_embed_type = {t:?}")));
        }
        if let Some(t) = &self.addition_embed_type {
            return Err(unsupported(format!("addition_embed_type = {t:?} (SDXL?)")));
        }
        if self.encoder_hid_dim.is_some() {
            return Err(unsupported("encoder_hid_dim"));
        }
        match &self.only_cross_attention {
            None | Some(PerBlock::One(false)) => {}
            Some(PerBlock::Many(v)) if v.iter().all(|b| !b) => {}
            _ => return Err(unsupported("only_cross_attention")),
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return Err(unsupported(format!("mid_block_type = {other:?}"))),
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(Error::Config(format!(
                    "block channels {c} are not divisible by norm_num_groups {}",
                    self.norm_num_groups
                )));
            }
        }
        let layers = self.layers_per_block.resolve("layers_per_block", n)?;
        let cross = self.cross_attention_dim.resolve("cross_attention_dim", n)?;
        let depth = self
            .transformer_layers_per_block
            .resolve("transformer_layers_per_block", n)?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let heads = match &self.num_attention_heads {
            Some(h) => h.resolve("num_attention_heads", n)?,
            None => self.attention_head_dim.resolve("attention_head_dim", n)?,
        };
        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let has_attention = match self.down_block_types[i].as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => return Err(unsupported(format!("down block type {other:?}"))),
            };
            let out_channels = self.block_out_channels[i];
            let attention = if has_attention {
                if heads[i] == 0 || out_channels % heads[i] != 0 {
                    return Err(Error::Config(format!(
                        "block {i}: {out_channels} channels cannot be split into {} heads",
                        heads[i]
                    )));
                }
                Some(AttentionSpec {
                    heads: heads[i],
                    depth: depth[i],
                    cross_attention_dim: cross[i],
                })
            } else {
                None
            };
            blocks.push(BlockSpec {
                out_channels,
                layers: layers[i],
                attention,
            });
        }
        let mid_attention = AttentionSpec {
            heads: heads[n - 1],
            depth: depth[n - 1],
            cross_attention_dim: cross[n - 1],
        };
        Ok(EncoderSpec {
            in_channels: self.in_channels,
            blocks,
            mid_attention,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            use_linear_projection: self.use_linear_projection,
            upcast_attention: self.upcast_attention,
        })
    }
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }

    /// Checks the fields only the UNet has and returns the encoder spec.
    pub fn resolve(&self) -> Result<EncoderSpec> {
        let spec = self.encoder.resolve()?;
        if self.dual_cross_attention {
            return Err(unsupported("dual_cross_attention"));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(format!(
                "time_embedding_type = {:?}",
                self.time_embedding_type
            )));
        }
        if self.time_cond_proj_dim.is_some() {
            return Err(unsupported("time_cond_proj_dim (LCM-distilled UNet)"));
        }
        if self.reverse_transformer_layers_per_block.is_some() {
            return Err(unsupported("reverse_transformer_layers_per_block"));
        }
        let n = spec.blocks.len();
        if self.up_block_types.len() != n {
            return Err(Error::Config(format!(
                "`up_block_types` has {} entries but there are {n} down blocks",
                self.up_block_types.len()
            )));
        }
        // Up block i mirrors down block n-1-i; diffusers allows them to differ, we do not.
        for (i, t) in self.up_block_types.iter().enumerate() {
            let mirrored = &spec.blocks[n - 1 - i];
            let has_attention = match t.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => return Err(unsupported(format!("up block type {other:?}"))),
            };
            if has_attention != mirrored.attention.is_some() {
                return Err(unsupported(format!(
                    "up block {i} ({t}) does not mirror down block {}",
                    n - 1 - i
                )));
            }
        }
        Ok(spec)
    }
}

impl ControlNetConfig {
    /// The config of a ControlNet made from `unet` (diffusers' `ControlNetModel.from_unet`):
    /// the same encoder, the standard hint encoder.
    pub fn from_unet(unet: &UNetConfig) -> Self {
        Self {
            encoder: unet.encoder.clone(),
            conditioning_channels: default_conditioning_channels(),
            conditioning_embedding_out_channels: default_hint_channels(),
            global_pool_conditions: false,
            controlnet_conditioning_channel_order: default_rgb(),
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        read_json(path)
    }

    pub fn resolve(&self) -> Result<EncoderSpec> {
        if self.conditioning_embedding_out_channels.is_empty() {
            return Err(Error::Config(
                "`conditioning_embedding_out_channels` is empty".into(),
            ));
        }
        match self.controlnet_conditioning_channel_order.as_str() {
            "rgb" | "bgr" => {}
            other => {
                return Err(Error::Config(format!(
                    "controlnet_conditioning_channel_order = {other:?} (expected rgb or bgr)"
                )))
            }
        }
        self.encoder.resolve()
    }

    /// How many pixels of hint make one latent pixel (8 for the standard hint encoder).
    pub fn hint_downscale(&self) -> usize {
        1 << (self.conditioning_embedding_out_channels.len() - 1)
    }
}

/// `path`'s JSON as a `T`; errors name the file.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Stable Diffusion 1.5's `unet/config.json`: the shape the service is built for, used where
/// no weights are given (benchmarks with random weights, tests).
pub const SD15_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

impl UNetConfig {
    /// Stable Diffusion 1.5's UNet config.
    pub fn sd15() -> Self {
        serde_json::from_str(SD15_UNET_CONFIG).expect("the built-in SD 1.5 config parses")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_has_twelve_skips_with_the_paper_channels() {
        let cfg = UNetConfig::sd15();
        let spec = cfg.resolve().unwrap();
        assert_eq!(spec.n_skips(), 12);
        assert_eq!(
            spec.skip_channels(),
            vec![320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280]
        );
        // attention_head_dim = 8 means 8 heads (of 40, 80, 160 channels), diffusers' legacy name.
        assert_eq!(spec.blocks[0].attention.unwrap().heads, 8);
        assert_eq!(spec.mid_attention.heads, 8);
        assert!(spec.blocks[3].attention.is_none());
        assert_eq!(spec.time_embed_dim(), 1280);
    }

    #[test]
    fn sd2_head_list_is_per_block() {
        let text = SD15_UNET_CONFIG
            .replace(
                "\"attention_head_dim\": 8",
                "\"attention_head_dim\": [5, 10, 20, 20]",
            )
            .replace("768", "1024");
        let spec = serde_json::from_str::<UNetConfig>(&text)
            .unwrap()
            .resolve()
            .unwrap();
        let heads: Vec<_> = spec
            .blocks
            .iter()
            .map(|b| b.attention.map(|a| a.heads))
            .collect();
        assert_eq!(heads, vec![Some(5), Some(10), Some(20), None]);
        assert_eq!(spec.mid_attention.heads, 20);
        assert_eq!(spec.mid_attention.cross_attention_dim, 1024);
    }

    #[test]
    fn sdxl_style_configs_are_refused_by_name() {
        let text = SD15_UNET_CONFIG.replace(
            "\"act_fn\": \"silu\"",
            "\"act_fn\": \"silu\", \"addition_embed_type\": \"text_time\"",
        );
        let err = serde_json::from_str::<UNetConfig>(&text)
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("addition_embed_type"), "{err}");
        let text =
            SD15_UNET_CONFIG.replace("\"layers_per_block\": 2", "\"layers_per_block\": [2, 2]");
        let err = serde_json::from_str::<UNetConfig>(&text)
            .unwrap()
            .resolve()
            .unwrap_err();
        assert!(err.to_string().contains("layers_per_block"), "{err}");
    }
}
