//! MiDaS DPT-Hybrid depth (`dpt_hybrid-midas-501f0c75.pt`), as controlnet_aux 0.0.10's
//! `MidasDetector` runs it (`DPTDepthModel(backbone="vitb_rn50_384", non_negative=True)`,
//! readout `"project"`); serves `depth_midas` and `normal_midas`.
//!
//! # Reference steps, for the image at its detect size (`h`×`w`, RGB, multiples of 64)
//!
//! 1. Input ([`input_tensor`]): `float(rgb) / 127.5 - 1` in f32, `1×3×h×w`.
//! 2. Network ([`Midas::forward`]):
//!    * ResNetV2-50 stem and three stages (timm `ResNetV2(layers=(3, 4, 9), preact=False,
//!      stem_type="same")`): every convolution is a `StdConv2dSame` (weights standardised per
//!      output channel with the biased variance and eps 1e-8 — folded here once at load, in
//!      f32 — and TF "same" padding: symmetric `k/2` for stride 1, and for stride 2 computed from
//!      the input size, the odd pixel on the right/bottom); GroupNorm(32, eps 1e-5); the stem's
//!      3×3/2 max-pool is padded "same" with −∞. Bottlenecks (1×1, 3×3 with the stage stride,
//!      1×1; ReLU after the sum), stage strides 1, 2, 2; stage outputs at ¼ (256 channels) and
//!      ⅛ (512) are the first two DPT taps.
//!    * ViT-B/16 hybrid: `patch_embed.proj` (1×1, 1024→768) on the stage-3 map (1/16), class
//!      token, position embeddings resized from their 24×24 grid to `h/16 × w/16`
//!      (`F.interpolate(mode="bilinear", align_corners=False)`), 12 pre-norm blocks (LayerNorm
//!      eps 1e-6, 12 heads, erf GELU); the outputs of blocks 8 and 11 (0-based, before the final
//!      norm, which is unused) are the last two taps.
//!    * Reassemble (`act_postprocess3/4`): readout `"project"` (`Linear(1536→768)` + GELU on
//!      each patch token concatenated with the class token), tokens to a `768×h/16×w/16` map,
//!      1×1 conv; tap 4 also a 3×3/2 conv (→ 1/32).
//!    * Fusion (`scratch`): 3×3 `layerN_rn` convs to 256 channels, `FeatureFusionBlock_custom`
//!      ×4 (residual conv units with non-inplace ReLU, ×2 bilinear upsampling with
//!      `align_corners=True`, 1×1 `out_conv`; `refinenet4` has no skip input, so its
//!      `resConfUnit1` is unused), head: 3×3 conv 256→128, ×2 bilinear (`align_corners=True`),
//!      3×3 conv 128→32, ReLU, 1×1 conv 32→1, ReLU. Output `1×h×w` (channel squeezed).
//! 3. Post-processing on the host ([`depth_hint`]): `d -= min(d); d /= max(d)` (f32), then
//!    `(d * 255).clip(0, 255).astype(uint8)`; grey, returned as three equal channels. A constant
//!    map gives 0/0 = NaN, which numpy's cast (x86) and Rust's both turn into 0.
//! 4. `normal_midas` ([`normal_hint`], controlnet_aux's `depth_and_normal=True` path, `a = 2π`,
//!    `bg_th` = the `background_threshold` parameter, A1111's default 0.4): `cv2.Sobel` (3×3, f32,
//!    `BORDER_REFLECT_101`) of the raw depth in x and y, both set to 0 where the normalised
//!    depth is `< bg_th` (compared in f32, as numpy 2 does), `z = f32(a)`, the vector divided by
//!    its length (f32), `(n * 127.5 + 127.5).clip(0, 255).astype(uint8)`, channels reversed
//!    (`[:, :, ::-1]`: the hint is `(z, y, x)`). A1111's own `apply_midas` does not reverse them
//!    (it returns `(x, y, z)`); controlnet_aux's order is the one the normal ControlNet was
//!    trained on (the original `gradio_normal2image.py` reversed the map before the model).
//!
//! The reference's final `resize_image(…, image_resolution)` and `cv2.resize` to it are the
//! identity here (the hint stays at the detect size).
//!
//! # Weights
//!
//! Names are the checkpoint's `state_dict` keys (`pretrained.model.patch_embed.backbone.stem.conv.weight`,
//! `pretrained.model.blocks.0.attn.qkv.weight`, `pretrained.act_postprocess3.0.project.0.weight`,
//! `scratch.refinenet4.out_conv.weight`, …). Keys in the file that the forward never uses
//! (`pretrained.model.norm.*`, `pretrained.model.head.*` — the ImageNet classifier — and
//! `scratch.refinenet4.resConfUnit1.*`) are not read.
//!
//! Device and dtype: the weights live on `vb.device()` in `vb.dtype()`; the image goes up once
//! and the depth map comes back once.
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, LayerNorm, Linear, VarBuilder};
use image::{GrayImage, RgbImage};

use crate::tensor_ops::{attention, interpolate_bilinear, ScaleAt};
use crate::{Detector, Result};

/// `StdConv2dSame`'s epsilon as timm's `_resnetv2` builds it for the ViT hybrids.
const STD_CONV_EPS: f64 = 1e-8;
/// `GroupNormAct`'s epsilon.
const GN_EPS: f64 = 1e-5;
/// The ViT's LayerNorm epsilon.
const LN_EPS: f64 = 1e-6;
/// The ViT's patch size (the ResNet reduces by 16, `proj` is 1×1).
const PATCH: usize = 16;
/// `normal_midas`'s `a` (controlnet_aux and A1111: `np.pi * 2.0`).
pub const NORMAL_A: f64 = std::f64::consts::PI * 2.0;
/// A1111's default `background_threshold` (`bg_th`) for `normal_midas`.
pub const DEFAULT_BG_THRESHOLD: f64 = 0.4;

/// The architecture's sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Stem output channels (64).
    pub stem_channels: usize,
    /// Bottlenecks per stage (3, 4, 9).
    pub stage_depths: [usize; 3],
    /// Stage output channels (256, 512, 1024); bottleneck width is a quarter.
    pub stage_channels: [usize; 3],
    /// GroupNorm groups (32).
    pub groups: usize,
    /// ViT width (768).
    pub embed_dim: usize,
    /// ViT blocks (12).
    pub depth: usize,
    /// Attention heads (12).
    pub num_heads: usize,
    /// MLP hidden width (3072).
    pub mlp_dim: usize,
    /// The ViT blocks whose outputs are DPT taps 3 and 4 (8, 11).
    pub hooks: [usize; 2],
    /// Side of the stored position-embedding grid (24 = 384 / 16).
    pub pos_grid: usize,
    /// Reassembled channels of taps 3 and 4 (768, 768).
    pub reassemble: [usize; 2],
    /// Fusion width (256).
    pub features: usize,
}

impl Config {
    /// DPT-Hybrid, as in `dpt_hybrid-midas-501f0c75.pt`.
    pub fn dpt_hybrid() -> Self {
        Self {
            stem_channels: 64,
            stage_depths: [3, 4, 9],
            stage_channels: [256, 512, 1024],
            groups: 32,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_dim: 3072,
            hooks: [8, 11],
            pos_grid: 24,
            reassemble: [768, 768],
            features: 256,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::dpt_hybrid()
    }
}

/// Pads the last two dims of `x` as TF "same" does for kernel `k` and stride `s` (the odd pixel
/// right/bottom), with `value`.
fn pad_same(x: &Tensor, k: usize, s: usize, value: f32) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let total = |i: usize| ((i.div_ceil(s) - 1) * s + k).saturating_sub(i);
    let (ph, pw) = (total(h), total(w));
    if ph == 0 && pw == 0 {
        return Ok(x.clone());
    }
    if value == 0.0 {
        return x
            .pad_with_zeros(D::Minus1, pw / 2, pw - pw / 2)?
            .pad_with_zeros(D::Minus2, ph / 2, ph - ph / 2);
    }
    let fill =
        |dims: &[usize]| Tensor::full(value, dims, x.device()).and_then(|t| t.to_dtype(x.dtype()));
    let (b, c) = (x.dim(0)?, x.dim(1)?);
    let mut parts = Vec::new();
    if pw / 2 > 0 {
        parts.push(fill(&[b, c, h, pw / 2])?);
    }
    parts.push(x.clone());
    if pw - pw / 2 > 0 {
        parts.push(fill(&[b, c, h, pw - pw / 2])?);
    }
    let x = Tensor::cat(&parts, 3)?;
    let w2 = w + pw;
    let mut parts = Vec::new();
    if ph / 2 > 0 {
        parts.push(fill(&[b, c, ph / 2, w2])?);
    }
    parts.push(x);
    if ph - ph / 2 > 0 {
        parts.push(fill(&[b, c, ph - ph / 2, w2])?);
    }
    Tensor::cat(&parts, 2)
}

/// timm's `StdConv2dSame` (no bias) with the standardisation folded into the weight.
#[derive(Debug, Clone)]
struct StdConv {
    weight: Tensor,
    k: usize,
    stride: usize,
}

impl StdConv {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, k: usize, stride: usize) -> Result<Self> {
        let w = vb.get_with_hints_dtype(
            (c_out, c_in, k, k),
            "weight",
            Default::default(),
            DType::F32,
        )?;
        let weight = fold_standardisation(&w)?.to_dtype(vb.dtype())?;
        Ok(Self { weight, k, stride })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.stride == 1 {
            // Static "same" padding (odd kernel, stride 1).
            x.conv2d(&self.weight, self.k / 2, 1, 1, 1)
        } else {
            pad_same(x, self.k, self.stride, 0.0)?.conv2d(&self.weight, 0, self.stride, 1, 1)
        }
    }
}

/// `F.batch_norm(w.reshape(1, out, -1), None, None, training=True, eps=1e-8)`: per output
/// channel `(w - mean) / sqrt(var + eps)`, `var` the biased variance; `w` in f32.
pub fn fold_standardisation(w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let flat = w.flatten_from(1)?;
    let mean = flat.mean_keepdim(1)?;
    let centred = flat.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(1)?;
    centred
        .broadcast_div(&(var + STD_CONV_EPS)?.sqrt()?)?
        .reshape(dims)
}

/// timm's `ResNetV2` non-pre-activation `Bottleneck`.
#[derive(Debug, Clone)]
struct Bottleneck {
    downsample: Option<(StdConv, GroupNorm)>,
    conv1: StdConv,
    norm1: GroupNorm,
    conv2: StdConv,
    norm2: GroupNorm,
    conv3: StdConv,
    norm3: GroupNorm,
}

impl Bottleneck {
    fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        stride: usize,
        groups: usize,
    ) -> Result<Self> {
        let mid = c_out / 4;
        let gn = |c: usize, name: &str| candle_nn::group_norm(groups, c, GN_EPS, vb.pp(name));
        let downsample = if c_in != c_out || stride != 1 {
            Some((
                StdConv::new(vb.pp("downsample.conv"), c_in, c_out, 1, stride)?,
                candle_nn::group_norm(groups, c_out, GN_EPS, vb.pp("downsample.norm"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            downsample,
            conv1: StdConv::new(vb.pp("conv1"), c_in, mid, 1, 1)?,
            norm1: gn(mid, "norm1")?,
            conv2: StdConv::new(vb.pp("conv2"), mid, mid, 3, stride)?,
            norm2: gn(mid, "norm2")?,
            conv3: StdConv::new(vb.pp("conv3"), mid, c_out, 1, 1)?,
            norm3: gn(c_out, "norm3")?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let shortcut = match &self.downsample {
            Some((conv, norm)) => norm.forward(&conv.forward(x)?)?,
            None => x.clone(),
        };
        let h = self.norm1.forward(&self.conv1.forward(x)?)?.relu()?;
        let h = self.norm2.forward(&self.conv2.forward(&h)?)?.relu()?;
        let h = self.norm3.forward(&self.conv3.forward(&h)?)?;
        (h + shortcut)?.relu()
    }
}

/// One pre-norm ViT block.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    num_heads: usize,
}

impl Block {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let d = cfg.embed_dim;
        Ok(Self {
            norm1: candle_nn::layer_norm(d, LN_EPS, vb.pp("norm1"))?,
            qkv: candle_nn::linear(d, 3 * d, vb.pp("attn.qkv"))?,
            proj: candle_nn::linear(d, d, vb.pp("attn.proj"))?,
            norm2: candle_nn::layer_norm(d, LN_EPS, vb.pp("norm2"))?,
            fc1: candle_nn::linear(d, cfg.mlp_dim, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(cfg.mlp_dim, d, vb.pp("mlp.fc2"))?,
            num_heads: cfg.num_heads,
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
        let q = qkv.i(0)?.contiguous()?;
        let k = qkv.i(1)?.contiguous()?;
        let v = qkv.i(2)?.contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        let out = attention(&q, &k, &v, scale, ScaleAt::Scores)?
            .transpose(1, 2)?
            .reshape((b, n, c))?;
        self.proj.forward(&out)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.attention(&self.norm1.forward(x)?)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        x + self.fc2.forward(&h)?
    }
}

/// `act_postprocess{3,4}`: the `"project"` readout, tokens to a map, a 1×1 conv and (tap 4) a
/// 3×3/2 conv.
#[derive(Debug, Clone)]
struct Reassemble {
    project: Linear,
    conv: Conv2d,
    down: Option<Conv2d>,
}

impl Reassemble {
    fn new(vb: VarBuilder, d: usize, c_out: usize, down: bool) -> Result<Self> {
        let project = candle_nn::linear(2 * d, d, vb.pp("0.project.0"))?;
        let conv = candle_nn::conv2d(d, c_out, 1, Default::default(), vb.pp("3"))?;
        let down = if down {
            let cfg = Conv2dConfig {
                padding: 1,
                stride: 2,
                ..Default::default()
            };
            Some(candle_nn::conv2d(c_out, c_out, 3, cfg, vb.pp("4"))?)
        } else {
            None
        };
        Ok(Self {
            project,
            conv,
            down,
        })
    }

    /// `x`: the block output `b×(1 + gh·gw)×d`.
    fn forward(&self, x: &Tensor, gh: usize, gw: usize) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let patches = x.narrow(1, 1, n - 1)?;
        let readout = x.narrow(1, 0, 1)?.broadcast_as((b, n - 1, d))?;
        let features = Tensor::cat(&[&patches, &readout.contiguous()?], 2)?;
        let h = self.project.forward(&features)?.gelu_erf()?;
        let h = h.transpose(1, 2)?.reshape((b, d, gh, gw))?;
        let h = self.conv.forward(&h)?;
        match &self.down {
            Some(conv) => conv.forward(&h),
            None => Ok(h),
        }
    }
}

/// `ResidualConvUnit_custom` (no batch norm, ReLU not in place).
#[derive(Debug, Clone)]
struct ResidualConvUnit {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl ResidualConvUnit {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv1: candle_nn::conv2d(c, c, 3, cfg, vb.pp("conv1"))?,
            conv2: candle_nn::conv2d(c, c, 3, cfg, vb.pp("conv2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.conv1.forward(&x.relu()?)?;
        let h = self.conv2.forward(&h.relu()?)?;
        h + x
    }
}

/// `FeatureFusionBlock_custom` (`deconv=False, bn=False, expand=False, align_corners=True`).
#[derive(Debug, Clone)]
struct Fusion {
    unit1: Option<ResidualConvUnit>,
    unit2: ResidualConvUnit,
    out_conv: Conv2d,
}

impl Fusion {
    fn new(vb: VarBuilder, c: usize, has_skip: bool) -> Result<Self> {
        let unit1 = if has_skip {
            Some(ResidualConvUnit::new(vb.pp("resConfUnit1"), c)?)
        } else {
            None
        };
        Ok(Self {
            unit1,
            unit2: ResidualConvUnit::new(vb.pp("resConfUnit2"), c)?,
            out_conv: candle_nn::conv2d(c, c, 1, Default::default(), vb.pp("out_conv"))?,
        })
    }

    fn forward(&self, x: &Tensor, skip: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = match (skip, &self.unit1) {
            (Some(s), Some(unit)) => (x + unit.forward(s)?)?,
            _ => x.clone(),
        };
        let h = self.unit2.forward(&x)?;
        let (_, _, hh, ww) = h.dims4()?;
        let h = interpolate_bilinear(&h, (2 * hh, 2 * ww), true)?;
        self.out_conv.forward(&h)
    }
}

/// `DPTDepthModel` with the `vitb_rn50_384` backbone, `readout="project"`, `non_negative=True`.
#[derive(Debug, Clone)]
pub struct Midas {
    stem_conv: StdConv,
    stem_norm: GroupNorm,
    stages: Vec<Vec<Bottleneck>>,
    patch_proj: Conv2d,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    hooks: [usize; 2],
    reassemble3: Reassemble,
    reassemble4: Reassemble,
    layer_rn: [Conv2d; 4],
    refinenets: [Fusion; 4],
    head_conv0: Conv2d,
    head_conv2: Conv2d,
    head_conv4: Conv2d,
    pos_grid: usize,
    device: Device,
    dtype: DType,
}

impl Midas {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let model = vb.pp("pretrained.model");
        let backbone = model.pp("patch_embed.backbone");
        let stem_conv = StdConv::new(backbone.pp("stem.conv"), 3, cfg.stem_channels, 7, 2)?;
        let stem_norm = candle_nn::group_norm(
            cfg.groups,
            cfg.stem_channels,
            GN_EPS,
            backbone.pp("stem.norm"),
        )?;
        let mut stages = Vec::with_capacity(3);
        let mut c_in = cfg.stem_channels;
        for (s, (&n, &c_out)) in cfg.stage_depths.iter().zip(&cfg.stage_channels).enumerate() {
            let stride = if s == 0 { 1 } else { 2 };
            let mut blocks = Vec::with_capacity(n);
            for i in 0..n {
                let vb_i = backbone.pp(format!("stages.{s}.blocks.{i}"));
                let (ci, st) = if i == 0 { (c_in, stride) } else { (c_out, 1) };
                blocks.push(Bottleneck::new(vb_i, ci, c_out, st, cfg.groups)?);
            }
            stages.push(blocks);
            c_in = c_out;
        }
        let d = cfg.embed_dim;
        let patch_proj =
            candle_nn::conv2d(c_in, d, 1, Default::default(), model.pp("patch_embed.proj"))?;
        let cls_token = model.get((1, 1, d), "cls_token")?;
        let pos_embed = model.get((1, cfg.pos_grid * cfg.pos_grid + 1, d), "pos_embed")?;
        if cfg.hooks[0] >= cfg.hooks[1] || cfg.hooks[1] >= cfg.depth {
            return Err(diffusion::Error::Config(format!(
                "MiDaS hooks {:?} must be increasing block indices below {}",
                cfg.hooks, cfg.depth
            )));
        }
        // Blocks after the last hook feed only the unused final norm.
        let blocks = (0..=cfg.hooks[1])
            .map(|i| Block::new(model.pp(format!("blocks.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let pre = vb.pp("pretrained");
        let reassemble3 = Reassemble::new(pre.pp("act_postprocess3"), d, cfg.reassemble[0], false)?;
        let reassemble4 = Reassemble::new(pre.pp("act_postprocess4"), d, cfg.reassemble[1], true)?;
        let scratch = vb.pp("scratch");
        let f = cfg.features;
        let rn_cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let taps = [
            cfg.stage_channels[0],
            cfg.stage_channels[1],
            cfg.reassemble[0],
            cfg.reassemble[1],
        ];
        let mut layer_rn = Vec::with_capacity(4);
        let mut refinenets = Vec::with_capacity(4);
        for (i, &c) in taps.iter().enumerate() {
            layer_rn.push(candle_nn::conv2d_no_bias(
                c,
                f,
                3,
                rn_cfg,
                scratch.pp(format!("layer{}_rn", i + 1)),
            )?);
            refinenets.push(Fusion::new(
                scratch.pp(format!("refinenet{}", i + 1)),
                f,
                i < 3,
            )?);
        }
        let head = scratch.pp("output_conv");
        let head_conv0 = candle_nn::conv2d(f, f / 2, 3, rn_cfg, head.pp("0"))?;
        let head_conv2 = candle_nn::conv2d(f / 2, 32, 3, rn_cfg, head.pp("2"))?;
        let head_conv4 = candle_nn::conv2d(32, 1, 1, Default::default(), head.pp("4"))?;
        Ok(Self {
            stem_conv,
            stem_norm,
            stages,
            patch_proj,
            cls_token,
            pos_embed,
            blocks,
            hooks: cfg.hooks,
            reassemble3,
            reassemble4,
            layer_rn: layer_rn.try_into().expect("four taps"),
            refinenets: refinenets.try_into().expect("four taps"),
            head_conv0,
            head_conv2,
            head_conv4,
            pos_grid: cfg.pos_grid,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// `_resize_pos_embed`: the class token's embedding and the grid's, resized (bilinear,
    /// `align_corners=False`) to `gh×gw`, as `1×(1 + gh·gw)×d`.
    fn pos_embed(&self, gh: usize, gw: usize) -> candle_core::Result<Tensor> {
        let (_, n, d) = self.pos_embed.dims3()?;
        let tok = self.pos_embed.narrow(1, 0, 1)?;
        let grid = self
            .pos_embed
            .narrow(1, 1, n - 1)?
            .reshape((1, self.pos_grid, self.pos_grid, d))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let grid = interpolate_bilinear(&grid, (gh, gw), false)?
            .permute((0, 2, 3, 1))?
            .reshape((1, gh * gw, d))?;
        Tensor::cat(&[&tok, &grid], 1)
    }

    /// The depth map `b×h×w` for `x` (`b×3×h×w`, `rgb / 127.5 - 1`, on the network's device and
    /// dtype; `h` and `w` multiples of 32).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        if h % 32 != 0 || w % 32 != 0 {
            candle_core::bail!("MiDaS needs sides that are multiples of 32, got {w}x{h}");
        }
        let (gh, gw) = (h / PATCH, w / PATCH);
        // ResNetV2 stem and stages.
        let x = self
            .stem_norm
            .forward(&self.stem_conv.forward(x)?)?
            .relu()?;
        let mut x = pad_same(&x, 3, 2, f32::NEG_INFINITY)?.max_pool2d_with_stride(3, 2)?;
        let mut stage_out = Vec::with_capacity(2);
        for blocks in &self.stages {
            for block in blocks {
                x = block.forward(&x)?;
            }
            stage_out.push(x.clone());
        }
        // ViT.
        let tokens = self
            .patch_proj
            .forward(&x)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self
            .cls_token
            .broadcast_as((b, 1, self.cls_token.dim(2)?))?;
        let mut t = Tensor::cat(&[&cls.contiguous()?, &tokens.contiguous()?], 1)?
            .broadcast_add(&self.pos_embed(gh, gw)?)?;
        let mut taps = Vec::with_capacity(2);
        for (i, block) in self.blocks.iter().enumerate() {
            t = block.forward(&t)?;
            if self.hooks.contains(&i) {
                taps.push(t.clone());
            }
        }
        let layer3 = self.reassemble3.forward(&taps[0], gh, gw)?;
        let layer4 = self.reassemble4.forward(&taps[1], gh, gw)?;
        // DPT fusion and head.
        let rn: Vec<Tensor> = [&stage_out[0], &stage_out[1], &layer3, &layer4]
            .iter()
            .zip(&self.layer_rn)
            .map(|(t, conv)| conv.forward(t))
            .collect::<candle_core::Result<_>>()?;
        let mut path = self.refinenets[3].forward(&rn[3], None)?;
        for i in (0..3).rev() {
            path = self.refinenets[i].forward(&path, Some(&rn[i]))?;
        }
        let out = self.head_conv0.forward(&path)?;
        let (_, _, oh, ow) = out.dims4()?;
        let out = interpolate_bilinear(&out, (2 * oh, 2 * ow), true)?;
        let out = self.head_conv2.forward(&out)?.relu()?;
        let out = self.head_conv4.forward(&out)?.relu()?;
        out.squeeze(1)
    }

    /// Runs the network on an RGB image (at its detect size); the depth map comes back to the
    /// host as `f32`, row-major `h×w`.
    pub fn depth(&self, image: &RgbImage) -> Result<Vec<f32>> {
        let x = input_tensor(image, &self.device)?.to_dtype(self.dtype)?;
        let d = self.forward(&x)?;
        Ok(d.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// Step 1 of the module docs: `float(rgb) / 127.5 - 1` as `1×3×h×w` f32 on `device` (the bytes
/// go up, the arithmetic — a true division, as torch's — runs there).
pub fn input_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let raw =
        Tensor::from_vec(image.as_raw().clone(), (1, h, w, 3), &Device::Cpu)?.to_device(device)?;
    let x = raw
        .permute((0, 3, 1, 2))?
        .to_dtype(DType::F32)?
        .broadcast_div(&Tensor::new(127.5f32, device)?)?
        .broadcast_sub(&Tensor::new(1f32, device)?)?;
    Ok(x.contiguous()?)
}

/// `depth_pt` of the reference: `d - min(d)`, divided by its maximum (f32).
pub fn normalised(depth: &[f32]) -> Vec<f32> {
    let min = depth.iter().copied().fold(f32::INFINITY, f32::min);
    let shifted: Vec<f32> = depth.iter().map(|&v| v - min).collect();
    let max = shifted.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    shifted.into_iter().map(|v| v / max).collect()
}

/// Step 3: the grey `depth_midas` hint from the network's depth map (`width`×`height`).
pub fn depth_hint(depth: &[f32], width: usize, height: usize) -> GrayImage {
    assert_eq!(depth.len(), width * height, "depth map size");
    let data = normalised(depth)
        .into_iter()
        .map(annotators::post::unit_to_u8)
        .collect();
    GrayImage::from_raw(width as u32, height as u32, data).expect("buffer size")
}

/// `cv2.Sobel(src, cv2.CV_32F, dx, dy, ksize=3)` with `BORDER_REFLECT_101`, summed in OpenCV's
/// order (outer taps first, then the doubled centre).
fn sobel(src: &[f32], w: usize, h: usize, horizontal: bool) -> Vec<f32> {
    let reflect = |i: isize, n: usize| -> usize {
        if n == 1 {
            0
        } else if i < 0 {
            (-i) as usize
        } else if i as usize >= n {
            2 * (n - 1) - i as usize
        } else {
            i as usize
        }
    };
    let at = |x: isize, y: isize| src[reflect(y, h) * w + reflect(x, w)];
    let mut out = vec![0f32; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let v = if horizontal {
                // Rows: [-1, 0, 1]; columns: [1, 2, 1].
                let r = |yy: isize| at(x + 1, yy) - at(x - 1, yy);
                (r(y - 1) + r(y + 1)) + 2.0 * r(y)
            } else {
                // Rows: [1, 2, 1]; columns: [-1, 0, 1].
                let r = |yy: isize| (at(x - 1, yy) + at(x + 1, yy)) + 2.0 * at(x, yy);
                r(y + 1) - r(y - 1)
            };
            out[y as usize * w + x as usize] = v;
        }
    }
    out
}

/// Step 4: the `normal_midas` hint (RGB = `(z, y, x)` of the unit normal, mapped to 0..255)
/// from the network's raw depth map, with `a` and background threshold `bg_th`.
pub fn normal_hint(depth: &[f32], width: usize, height: usize, a: f64, bg_th: f64) -> RgbImage {
    assert_eq!(depth.len(), width * height, "depth map size");
    let norm = normalised(depth);
    let gx = sobel(depth, width, height, true);
    let gy = sobel(depth, width, height, false);
    let z = a as f32;
    let th = bg_th as f32;
    let to_u8 = |v: f32| (v * 127.5 + 127.5).clamp(0.0, 255.0) as u8;
    let mut data = Vec::with_capacity(3 * width * height);
    for i in 0..width * height {
        let (x, y) = if norm[i] < th {
            (0.0, 0.0)
        } else {
            (gx[i], gy[i])
        };
        let len = (x * x + y * y + z * z).sqrt();
        data.extend_from_slice(&[to_u8(z / len), to_u8(y / len), to_u8(x / len)]);
    }
    RgbImage::from_raw(width as u32, height as u32, data).expect("buffer size")
}

/// The hint of `preprocessor` from the network's depth map (steps 3–4); `params` as the
/// preprocessor's `ParamSpec`s order them (`normal_midas`: `[background_threshold]`).
pub fn hint_from_depth(
    preprocessor: &str,
    depth: &[f32],
    width: usize,
    height: usize,
    params: &[f64],
) -> Result<RgbImage> {
    Ok(match preprocessor {
        "depth_midas" => annotators::post::gray_to_rgb(&depth_hint(depth, width, height)),
        "normal_midas" => {
            let bg_th = params.first().copied().unwrap_or(DEFAULT_BG_THRESHOLD);
            normal_hint(depth, width, height, NORMAL_A, bg_th)
        }
        other => {
            return Err(diffusion::Error::Config(format!(
                "MiDaS does not serve `{other}`"
            )))
        }
    })
}

impl Detector for Midas {
    fn detect(&self, preprocessor: &str, image: &RgbImage, params: &[f64]) -> Result<RgbImage> {
        if !matches!(preprocessor, "depth_midas" | "normal_midas") {
            return Err(diffusion::Error::Config(format!(
                "MiDaS does not serve `{preprocessor}`"
            )));
        }
        let (w, h) = (image.width() as usize, image.height() as usize);
        let depth = self.depth(image)?;
        hint_from_depth(preprocessor, &depth, w, h, params)
    }
}
