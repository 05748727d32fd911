//! Depth Anything V2 (`depth_anything_v2`): a DINOv2 ViT/14 encoder and a DPT head, from the
//! released `depth_anything_v2_vit{s,b,l}.pth` files (plain `state_dict`s, f32, no nesting or
//! prefix) or their safetensors conversions (same keys), as A1111's sd-webui-controlnet runs it
//! (`annotator/depth_anything_v2.py`, `colored=False`: a grey hint). The network follows the
//! original `DepthAnythingV2` (its key names, its position-embedding interpolation), checked
//! against transformers' `DepthAnythingForDepthEstimation`.
//!
//! Reference steps, for the image at its detect size (`w`×`h`, RGB):
//! 1. [`network_input`]: A1111 calls `cv2.cvtColor(image, COLOR_BGR2RGB)` on its RGB image, so
//!    the network sees the channels as **B, G, R** (reproduced); `/ 255.0` in f64;
//!    `cv2.resize(INTER_CUBIC)` (f64) to [`target_size`]: one scale for both axes so that the
//!    shorter side becomes 518, each side then rounded (half to even) to a multiple of 14, or
//!    rounded up when that falls below 518; `(x − mean) / std` with ImageNet's mean/std (f64,
//!    per network channel: 0.485/0.229 on the first, …); CHW, cast to f32.
//! 2. [`DepthAnythingV2::forward`]: patch embedding (14×14 conv), class token, position
//!    embeddings — the 37×37 grid resampled bicubically with `scale_factor = (g + 0.1)/37` per
//!    axis (the original DINOv2 rule; transformers uses `size = g` instead, which samples other
//!    points), unchanged for a square 518×518 input — then the ViT blocks (LayerNorm eps 1e-6,
//!    LayerScale, exact-erf GELU); the outputs of four blocks, normed, feed the DPT head
//!    (reassemble ×4, ×2, ×1, ×½; fusion with bilinear `align_corners=True`; output convs), and a
//!    ReLU: depth `(1, 14·⌊H/14⌋, 14·⌊W/14⌋)`.
//! 3. [`hint_from_depth`] (on the host, f32): `F.interpolate(bilinear, align_corners=False)` back
//!    to `w`×`h` (torch's CPU arithmetic), `(d − min) / (max − min) · 255`, truncated to `u8`; a
//!    constant map (0/0) gives black, as numpy's cast of NaN does.
//!
//! A1111 runs this on the image edge-padded to a multiple of 64 (`resize_image_with_pad`) and
//! crops the hint; here `detect` gets the image at its detect size and the hint keeps that size.
//! The hint is grey, returned as three equal channels.
//!
//! Device and dtype: the weights live on `vb.device()` in `vb.dtype()`; layer norms, softmax and
//! the position-embedding resampling run in f32. The image goes up once (as the f32 network
//! input), the depth map comes back once.
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, Linear, VarBuilder};
use image::{GrayImage, RgbImage};

use crate::tensor_ops::{self, attention, ScaleAt};
use crate::{Detector, Result};

/// The preprocessor this network serves.
pub const PREPROCESSOR: &str = "depth_anything_v2";
/// Patch size of the ViT.
pub const PATCH: usize = 14;
/// Side of the trained position-embedding grid (518 / 14).
const GRID: usize = 37;
/// LayerNorm epsilon of DINOv2.
const LN_EPS: f64 = 1e-6;
/// Offset the original adds to the target grid before resampling the position embeddings.
const INTERPOLATE_OFFSET: f64 = 0.1;
/// ImageNet normalisation, per network input channel.
pub const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Architecture of one released size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// ViT width.
    pub embed_dim: usize,
    /// Number of ViT blocks.
    pub depth: usize,
    pub num_heads: usize,
    /// The blocks whose outputs feed the DPT head.
    pub layers: [usize; 4],
    /// DPT fusion width (`features`).
    pub features: usize,
    /// DPT reassemble widths (`out_channels`).
    pub out_channels: [usize; 4],
    /// Lower bound of the network input's sides (A1111: 518).
    pub input_size: usize,
}

impl Config {
    /// `depth_anything_v2_vits.pth` (24.8 M parameters).
    pub fn vits() -> Self {
        Self {
            embed_dim: 384,
            depth: 12,
            num_heads: 6,
            layers: [2, 5, 8, 11],
            features: 64,
            out_channels: [48, 96, 192, 384],
            input_size: 518,
        }
    }

    /// `depth_anything_v2_vitb.pth` (97.5 M parameters).
    pub fn vitb() -> Self {
        Self {
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            layers: [2, 5, 8, 11],
            features: 128,
            out_channels: [96, 192, 384, 768],
            input_size: 518,
        }
    }

    /// `depth_anything_v2_vitl.pth` (335 M parameters), the one A1111 downloads.
    pub fn vitl() -> Self {
        Self {
            embed_dim: 1024,
            depth: 24,
            num_heads: 16,
            layers: [4, 11, 17, 23],
            features: 256,
            out_channels: [256, 512, 1024, 1024],
            input_size: 518,
        }
    }

    /// The configuration of a weight file by its name (`depth_anything_v2_vits.pth`,
    /// `…_vitb.safetensors`, …); `None` for other names (ViT-G is not released).
    pub fn from_file_name(name: &str) -> Option<Self> {
        let stem = name
            .strip_suffix(".pth")
            .or_else(|| name.strip_suffix(".safetensors"))?;
        match stem {
            "depth_anything_v2_vits" => Some(Self::vits()),
            "depth_anything_v2_vitb" => Some(Self::vitb()),
            "depth_anything_v2_vitl" => Some(Self::vitl()),
            _ => None,
        }
    }
}

impl Default for Config {
    /// ViT-L, A1111's choice.
    fn default() -> Self {
        Self::vitl()
    }
}

// ---------------------------------------------------------------------------------------------
// DINOv2
// ---------------------------------------------------------------------------------------------

/// `nn.LayerNorm(eps=1e-6)`, two-pass statistics in f32 (candle's fused kernel uses
/// `E[x²] − E[x]²`, which loses precision on tokens with a large mean).
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + LN_EPS)?.sqrt()?)?;
        y.to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// One ViT block: `x + ls1 · attn(norm1(x))`, then `x + ls2 · mlp(norm2(x))`.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ls1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ls2: Tensor,
    num_heads: usize,
}

impl Block {
    fn new(vb: VarBuilder, dim: usize, num_heads: usize) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim)?,
            qkv: candle_nn::linear(dim, 3 * dim, vb.pp("attn.qkv"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("attn.proj"))?,
            ls1: vb.get(dim, "ls1.gamma")?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim)?,
            fc1: candle_nn::linear(dim, 4 * dim, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(4 * dim, dim, vb.pp("mlp.fc2"))?,
            ls2: vb.get(dim, "ls2.gamma")?,
            num_heads,
        })
    }

    fn attention(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.num_heads;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, self.num_heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let scale = (hd as f64).powf(-0.5);
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let out = attention(&q, &k, &v, scale, ScaleAt::Query)?
            .transpose(1, 2)?
            .reshape((b, n, c))?;
        self.proj.forward(&out)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let a = self.attention(&self.norm1.forward(x)?)?;
        let x = (x + a.broadcast_mul(&self.ls1)?)?;
        let m = self
            .fc2
            .forward(&self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?)?;
        x + m.broadcast_mul(&self.ls2)?
    }
}

/// `DinoVisionTransformer` (`pretrained.*`): img_size 518, patch 14, no register tokens.
#[derive(Debug, Clone)]
struct Dinov2 {
    patch_embed: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    embed_dim: usize,
}

impl Dinov2 {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let d = cfg.embed_dim;
        let patch_embed = candle_nn::conv2d(
            3,
            d,
            PATCH,
            Conv2dConfig {
                stride: PATCH,
                ..Default::default()
            },
            vb.pp("patch_embed.proj"),
        )?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(vb.pp(format!("blocks.{i}")), d, cfg.num_heads))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embed,
            cls_token: vb.get((1, 1, d), "cls_token")?,
            pos_embed: vb.get((1, GRID * GRID + 1, d), "pos_embed")?,
            blocks,
            norm: LayerNorm::new(vb.pp("norm"), d)?,
            embed_dim: d,
        })
    }

    /// The position embeddings for an `height`×`width` input, `(1, 1 + gh·gw, D)`.
    fn pos_embed(&self, height: usize, width: usize) -> candle_core::Result<Tensor> {
        let (gh, gw) = (height / PATCH, width / PATCH);
        if gh * gw == GRID * GRID && height == width {
            return Ok(self.pos_embed.clone());
        }
        let dtype = self.pos_embed.dtype();
        let d = self.embed_dim;
        let pos = self.pos_embed.to_dtype(DType::F32)?;
        let cls = pos.narrow(1, 0, 1)?;
        let grid = pos
            .narrow(1, 1, GRID * GRID)?
            .reshape((1, GRID, GRID, d))?
            .permute((0, 3, 1, 2))?;
        let scale = |g: usize| (g as f64 + INTERPOLATE_OFFSET) / GRID as f64;
        let grid = tensor_ops::interpolate_bicubic_scale(&grid, (scale(gh), scale(gw)), false)?;
        let (_, _, oh, ow) = grid.dims4()?;
        if (oh, ow) != (gh, gw) {
            candle_core::bail!("position grid resampled to {oh}x{ow}, expected {gh}x{gw}");
        }
        let grid = grid.permute((0, 2, 3, 1))?.reshape((1, gh * gw, d))?;
        Tensor::cat(&[cls, grid], 1)?.to_dtype(dtype)
    }

    /// The normed outputs of blocks `layers` without the class token, `(B, gh·gw, D)` each.
    fn intermediate_layers(
        &self,
        x: &Tensor,
        layers: &[usize; 4],
    ) -> candle_core::Result<Vec<Tensor>> {
        let (b, _, h, w) = x.dims4()?;
        let tokens = self
            .patch_embed
            .forward(x)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls_token.broadcast_as((b, 1, self.embed_dim))?;
        let mut x = Tensor::cat(&[cls, tokens], 1)?.broadcast_add(&self.pos_embed(h, w)?)?;
        let mut out = Vec::with_capacity(4);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x)?;
            if layers.contains(&i) {
                let n = x.dim(1)?;
                out.push(self.norm.forward(&x)?.narrow(1, 1, n - 1)?);
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// DPT head
// ---------------------------------------------------------------------------------------------

fn conv3x3(vb: VarBuilder, c_in: usize, c_out: usize, bias: bool) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(if bias {
        candle_nn::conv2d(c_in, c_out, 3, cfg, vb)?
    } else {
        candle_nn::conv2d_no_bias(c_in, c_out, 3, cfg, vb)?
    })
}

/// `ResidualConvUnit` (no batch norm): `x + conv2(relu(conv1(relu(x))))`.
#[derive(Debug, Clone)]
struct ResidualConvUnit {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl ResidualConvUnit {
    fn new(vb: VarBuilder, f: usize) -> Result<Self> {
        Ok(Self {
            conv1: conv3x3(vb.pp("conv1"), f, f, true)?,
            conv2: conv3x3(vb.pp("conv2"), f, f, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let out = self.conv1.forward(&x.relu()?)?;
        let out = self.conv2.forward(&out.relu()?)?;
        out + x
    }
}

/// `FeatureFusionBlock`: `(x + rcu1(skip))` → `rcu2` → bilinear (`align_corners=True`) to `size`
/// (×2 without one) → `out_conv`. `resConfUnit1` of `refinenet4` is in the file but unused.
#[derive(Debug, Clone)]
struct FusionBlock {
    res1: Option<ResidualConvUnit>,
    res2: ResidualConvUnit,
    out_conv: Conv2d,
}

impl FusionBlock {
    fn new(vb: VarBuilder, f: usize, with_skip: bool) -> Result<Self> {
        Ok(Self {
            res1: if with_skip {
                Some(ResidualConvUnit::new(vb.pp("resConfUnit1"), f)?)
            } else {
                None
            },
            res2: ResidualConvUnit::new(vb.pp("resConfUnit2"), f)?,
            out_conv: candle_nn::conv2d(f, f, 1, Default::default(), vb.pp("out_conv"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        skip: Option<&Tensor>,
        size: (usize, usize),
    ) -> candle_core::Result<Tensor> {
        let x = match (skip, &self.res1) {
            (Some(s), Some(res1)) => (x + res1.forward(s)?)?,
            _ => x.clone(),
        };
        let x = self.res2.forward(&x)?;
        let x = tensor_ops::interpolate_bilinear(&x, size, true)?;
        self.out_conv.forward(&x)
    }
}

/// `DPTHead` (`depth_head.*`, use_bn=False, use_clstoken=False).
#[derive(Debug, Clone)]
struct DptHead {
    projects: Vec<Conv2d>,
    resize0: ConvTranspose2d,
    resize1: ConvTranspose2d,
    resize3: Conv2d,
    layer_rn: Vec<Conv2d>,
    /// refinenet1 … refinenet4.
    refinenet: Vec<FusionBlock>,
    output_conv1: Conv2d,
    output_conv2_0: Conv2d,
    output_conv2_2: Conv2d,
}

impl DptHead {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (d, f, oc) = (cfg.embed_dim, cfg.features, cfg.out_channels);
        let projects = (0..4)
            .map(|i| {
                candle_nn::conv2d(
                    d,
                    oc[i],
                    1,
                    Default::default(),
                    vb.pp(format!("projects.{i}")),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let transpose = |i: usize, k: usize| {
            candle_nn::conv_transpose2d(
                oc[i],
                oc[i],
                k,
                ConvTranspose2dConfig {
                    padding: 0,
                    output_padding: 0,
                    stride: k,
                    dilation: 1,
                },
                vb.pp(format!("resize_layers.{i}")),
            )
        };
        let resize0 = transpose(0, 4)?;
        let resize1 = transpose(1, 2)?;
        let resize3 = candle_nn::conv2d(
            oc[3],
            oc[3],
            3,
            Conv2dConfig {
                padding: 1,
                stride: 2,
                ..Default::default()
            },
            vb.pp("resize_layers.3"),
        )?;
        let s = vb.pp("scratch");
        let layer_rn = (0..4)
            .map(|i| conv3x3(s.pp(format!("layer{}_rn", i + 1)), oc[i], f, false))
            .collect::<Result<Vec<_>>>()?;
        let refinenet = (1..=4)
            .map(|i| FusionBlock::new(s.pp(format!("refinenet{i}")), f, i != 4))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            projects,
            resize0,
            resize1,
            resize3,
            layer_rn,
            refinenet,
            output_conv1: conv3x3(s.pp("output_conv1"), f, f / 2, true)?,
            output_conv2_0: conv3x3(s.pp("output_conv2.0"), f / 2, 32, true)?,
            output_conv2_2: candle_nn::conv2d(
                32,
                1,
                1,
                Default::default(),
                s.pp("output_conv2.2"),
            )?,
        })
    }

    /// The depth map before the last ReLU, `(B, 1, 14·gh, 14·gw)`.
    fn forward(&self, features: &[Tensor], gh: usize, gw: usize) -> candle_core::Result<Tensor> {
        let mut layers = Vec::with_capacity(4);
        for (i, x) in features.iter().enumerate() {
            let (b, _, c) = x.dims3()?;
            let x = x.transpose(1, 2)?.reshape((b, c, gh, gw))?;
            let x = self.projects[i].forward(&x)?;
            let x = match i {
                0 => self.resize0.forward(&x)?,
                1 => self.resize1.forward(&x)?,
                2 => x,
                _ => self.resize3.forward(&x)?,
            };
            layers.push(self.layer_rn[i].forward(&x)?);
        }
        let size = |t: &Tensor| -> candle_core::Result<(usize, usize)> {
            let (_, _, h, w) = t.dims4()?;
            Ok((h, w))
        };
        let path4 = self.refinenet[3].forward(&layers[3], None, size(&layers[2])?)?;
        let path3 = self.refinenet[2].forward(&path4, Some(&layers[2]), size(&layers[1])?)?;
        let path2 = self.refinenet[1].forward(&path3, Some(&layers[1]), size(&layers[0])?)?;
        let (h1, w1) = size(&layers[0])?;
        let path1 = self.refinenet[0].forward(&path2, Some(&layers[0]), (2 * h1, 2 * w1))?;
        let out = self.output_conv1.forward(&path1)?;
        let out = tensor_ops::interpolate_bilinear(&out, (gh * PATCH, gw * PATCH), true)?;
        let out = self.output_conv2_0.forward(&out)?.relu()?;
        self.output_conv2_2.forward(&out)
    }
}

// ---------------------------------------------------------------------------------------------
// The network
// ---------------------------------------------------------------------------------------------

/// `DepthAnythingV2`, weights named as in the released files (`pretrained.blocks.0.attn.qkv
/// .weight`, `depth_head.scratch.refinenet4.out_conv.bias`, …). `pretrained.mask_token` and
/// `depth_head.scratch.refinenet4.resConfUnit1.*` are in the files but unused (never read).
#[derive(Debug, Clone)]
pub struct DepthAnythingV2 {
    cfg: Config,
    pretrained: Dinov2,
    head: DptHead,
    device: Device,
    dtype: DType,
}

impl DepthAnythingV2 {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Ok(Self {
            cfg: cfg.clone(),
            pretrained: Dinov2::new(vb.pp("pretrained"), cfg)?,
            head: DptHead::new(vb.pp("depth_head"), cfg)?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The position embeddings (class token first) the ViT adds for an `height`×`width` input,
    /// `(1, 1 + ⌊H/14⌋·⌊W/14⌋, D)`.
    pub fn position_embeddings(&self, height: usize, width: usize) -> candle_core::Result<Tensor> {
        self.pretrained.pos_embed(height, width)
    }

    /// The four normed token maps the head reads, `(B, gh·gw, D)` each, for `x` (`B×3×H×W`).
    pub fn features(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.pretrained.intermediate_layers(x, &self.cfg.layers)
    }

    /// The depth map before the final ReLUs, `(B, 14·⌊H/14⌋, 14·⌊W/14⌋)`.
    pub fn forward_logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (gh, gw) = (h / PATCH, w / PATCH);
        let features = self.features(x)?;
        self.head.forward(&features, gh, gw)?.squeeze(1)
    }

    /// Depth for `x` (`B×3×H×W`, the normalised input of [`network_input`], on the network's
    /// device and dtype): `(B, 14·⌊H/14⌋, 14·⌊W/14⌋)`, ≥ 0.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_logits(x)?.relu()
    }

    /// Steps 1–2 of the module docs: the depth map of an RGB image as a host `f32` plane
    /// (`data`, width, height).
    pub fn depth(&self, image: &RgbImage) -> Result<(Vec<f32>, usize, usize)> {
        let (input, w, h) = network_input(image, self.cfg.input_size);
        let x = Tensor::from_vec(input, (1, 3, h, w), &self.device)?.to_dtype(self.dtype)?;
        let depth = self.forward(&x)?;
        let (_, dh, dw) = depth.dims3()?;
        let data = depth
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((data, dw, dh))
    }
}

// ---------------------------------------------------------------------------------------------
// Pre- and post-processing
// ---------------------------------------------------------------------------------------------

/// The network input size `(width, height)` for a `width`×`height` image: the original's
/// `Resize(lower_bound, lower_bound, keep_aspect_ratio=True, ensure_multiple_of=14,
/// resize_method="lower_bound")`, in f64 as Python computes it.
pub fn target_size(width: usize, height: usize, lower_bound: usize) -> (usize, usize) {
    let lb = lower_bound as f64;
    let (sh, sw) = (lb / height as f64, lb / width as f64);
    let s = if sw > sh { sw } else { sh };
    let m = PATCH as f64;
    let fit = |x: f64| -> usize {
        let y = (x / m).round_ties_even() * m;
        if y < lb {
            ((x / m).ceil() * m) as usize
        } else {
            y as usize
        }
    };
    (fit(s * width as f64), fit(s * height as f64))
}

/// Step 1 of the module docs: the normalised network input for `image` as CHW `f32` (channels
/// B, G, R as A1111 feeds them), with its width and height ([`target_size`] of the image with
/// `lower_bound`, 518 for the released networks).
pub fn network_input(image: &RgbImage, lower_bound: usize) -> (Vec<f32>, usize, usize) {
    let (sw, sh) = (image.width() as usize, image.height() as usize);
    let (w, h) = target_size(sw, sh, lower_bound);
    let raw = image.as_raw();
    let mut out = Vec::with_capacity(3 * w * h);
    for c in 0..3 {
        // Network channel c is image channel 2 - c (A1111's BGR2RGB on an RGB image).
        let plane: Vec<f64> = (0..sw * sh)
            .map(|i| raw[i * 3 + (2 - c)] as f64 / 255.0)
            .collect();
        let resized = annotators::ops::resize_cubic_f64(&plane, sw, sh, w, h);
        out.extend(resized.iter().map(|&v| ((v - MEAN[c]) / STD[c]) as f32));
    }
    (out, w, h)
}

/// `F.interpolate(x[None, None], (h, w), mode="bilinear", align_corners=False)` of a one-channel
/// `f32` map, with torch's CPU arithmetic (per-axis source index and weights in f32, then
/// `(x00·wx0 + x01·wx1)·wy0 + (x10·wx0 + x11·wx1)·wy1`).
pub fn resize_bilinear_f32(src: &[f32], sw: usize, sh: usize, w: usize, h: usize) -> Vec<f32> {
    assert_eq!(src.len(), sw * sh, "source size");
    let axis = |ssize: usize, dsize: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = ssize as f32 / dsize as f32;
        (0..dsize)
            .map(|d| {
                if ssize == dsize {
                    return (d, d, 1.0, 0.0);
                }
                let real = scale * (d as f32 + 0.5) - 0.5;
                let real = if real < 0.0 { 0.0 } else { real };
                let i0 = (real.floor() as usize).min(ssize - 1);
                let l1 = (real - i0 as f32).clamp(0.0, 1.0);
                let i1 = if i0 < ssize - 1 { i0 + 1 } else { i0 };
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let xs = axis(sw, w);
    let ys = axis(sh, h);
    let mut out = Vec::with_capacity(w * h);
    for &(y0, y1, wy0, wy1) in &ys {
        let (r0, r1) = (&src[y0 * sw..(y0 + 1) * sw], &src[y1 * sw..(y1 + 1) * sw]);
        for &(x0, x1, wx0, wx1) in &xs {
            let t0 = r0[x0] * wx0 + r0[x1] * wx1;
            let t1 = r1[x0] * wx0 + r1[x1] * wx1;
            out.push(t0 * wy0 + t1 * wy1);
        }
    }
    out
}

/// Step 3 of the module docs: the grey hint (`width`×`height`) from the network's depth map
/// (`depth`, `dw`×`dh`).
pub fn hint_from_depth(
    depth: &[f32],
    dw: usize,
    dh: usize,
    width: usize,
    height: usize,
) -> GrayImage {
    let d = resize_bilinear_f32(depth, dw, dh, width, height);
    let min = d.iter().copied().fold(f32::INFINITY, f32::min);
    let max = d.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let range = max - min;
    // f32 -> u8 as numpy's astype on this range: truncation; NaN (a constant map) -> 0.
    let data = d
        .iter()
        .map(|&v| ((v - min) / range * 255.0) as u8)
        .collect();
    GrayImage::from_raw(width as u32, height as u32, data).expect("buffer size")
}

impl Detector for DepthAnythingV2 {
    fn detect(&self, preprocessor: &str, image: &RgbImage, _params: &[f64]) -> Result<RgbImage> {
        if preprocessor != PREPROCESSOR {
            return Err(diffusion::Error::Config(format!(
                "Depth Anything V2 does not serve `{preprocessor}`"
            )));
        }
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (depth, dw, dh) = self.depth(image)?;
        let grey = hint_from_depth(&depth, dw, dh, w, h);
        Ok(annotators::post::gray_to_rgb(&grey))
    }
}
