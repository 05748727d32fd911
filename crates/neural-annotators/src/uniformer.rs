//! Semantic segmentation on the ADE20K palette with UniFormer-S + UPerNet
//! (`upernet_global_small.pth`), as lllyasviel's ControlNet and A1111's sd-webui-controlnet run
//! it through their vendored mmseg (`annotator/uniformer`); serves `seg_ufade20k` (no
//! parameters). controlnet_aux 0.0.10 does not ship this network; the parity reference is
//! `tools/parity/neural/make_uniformer.py`, written in torch from that code's description.
//!
//! Reference steps, for the image at its detect size (`w`×`h`, RGB — which mmseg takes for BGR):
//! 1. [`rescale_size`]: mmcv `imrescale` to `img_scale` (2048, 512) keeping the ratio: factor
//!    `min(2048 / long side, 512 / short side)`, size `int(w·f + 0.5)`×`int(h·f + 0.5)`;
//!    [`resize_bilinear_cv`] (`cv2.resize`, `INTER_LINEAR`, bit-exact on `u8`) when the size
//!    changes (at the default detect resolution 512 it does not);
//! 2. [`input_tensor`]: `Normalize(to_rgb=True)`: channels swapped (the network sees the
//!    photo's B, G, R), `(v − mean) · (1 / std)`, mean (123.675, 116.28, 103.53) and std
//!    (58.395, 57.12, 57.375) in that order;
//! 3. [`Uniformer::forward`]: the UniFormer backbone — four stages behind patch embeddings
//!    (conv k = stride = 4, 2, 2, 2, then LayerNorm ε 1e-5), conv blocks (`CBlock`) in stages
//!    1–2, global self-attention blocks (`SABlock`, heads = dim / 64) in stages 3–4, each stage's
//!    output through a LayerNorm (ε 1e-6) — and the UPerNet head: pyramid pooling (adaptive
//!    average pools 1, 2, 3, 6 of the last stage, 1×1 ConvModule, bilinear back, concat,
//!    3×3 `bottleneck`), FPN (1×1 laterals, top-down bilinear adds, 3×3 `fpn_convs`), all levels
//!    bilinear to ¼ of the input, concat, 3×3 `fpn_bottleneck`, 1×1 `conv_seg`: `num_classes`
//!    logits at ¼ of the input (floors of the strides). ConvModule = conv (no bias) + BN + ReLU;
//!    every resize is `F.interpolate(mode="bilinear", align_corners=False)`. The auxiliary FCN
//!    head of the checkpoint is for training only and not read;
//! 4. [`labels_from_logits`]: `test_cfg.mode == 'whole'`: the logits resized to the network
//!    input's size, then to the original `h`×`w` (`rescale=True`; skipped when equal — a
//!    same-size bilinear resize is the identity), softmax, argmax over classes (first maximum;
//!    taken on the logits, which softmax does not reorder);
//! 5. [`ade20k::colorize`]: `show_result(palette=get_palette('ade'), opacity=1)` paints
//!    `palette[label]`, flips it to BGR and blends with weight 0 on the photo; then
//!    `show_result_pyplot` flips back to RGB: the hint is `PALETTE[label]`, RGB.
//!
//! Device and dtype: weights on `vb.device()` in `vb.dtype()` (batch norms folded at load in
//! f32); the attention softmax and the post-processing resizes and argmax run in f32. Host↔device:
//! the normalized image goes up once, the `u8` label map comes back once.
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use image::RgbImage;

use crate::tensor_ops::{adaptive_avg_pool2d, attention, interpolate_bilinear, ScaleAt};
use crate::{ade20k, Detector, Result};

/// BatchNorm2d's default epsilon.
const BN_EPS: f64 = 1e-5;
/// `Normalize`'s mean and std, in the order of the (swapped) channels.
pub const MEAN: [f64; 3] = [123.675, 116.28, 103.53];
pub const STD: [f64; 3] = [58.395, 57.12, 57.375];

/// The architecture and the test pipeline's `img_scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Channels of the four stages.
    pub embed_dim: [usize; 4],
    /// Blocks per stage.
    pub layers: [usize; 4],
    /// Attention head size (heads = dim / head_dim in stages 3–4).
    pub head_dim: usize,
    /// MLP hidden size = dim · mlp_ratio.
    pub mlp_ratio: f64,
    /// UPerHead channels.
    pub channels: usize,
    pub num_classes: usize,
    pub pool_scales: Vec<usize>,
    /// `MultiScaleFlipAug(img_scale=…)`: (long, short) bounds of the rescale.
    pub img_scale: (usize, usize),
}

impl Config {
    /// `upernet_global_small` (UniFormer-S, global attention, UPerHead 512 channels, ADE20K's
    /// 150 classes, img_scale (2048, 512)): the network of `upernet_global_small.pth`.
    pub fn small() -> Self {
        Self {
            embed_dim: [64, 128, 320, 512],
            layers: [3, 4, 8, 3],
            head_dim: 64,
            mlp_ratio: 4.0,
            channels: 512,
            num_classes: 150,
            pool_scales: vec![1, 2, 3, 6],
            img_scale: (2048, 512),
        }
    }

    /// A small configuration for fast tests (`tiny()` of the parity script): every code path of
    /// [`Config::small`] at a fraction of the size.
    pub fn tiny() -> Self {
        Self {
            embed_dim: [8, 12, 16, 24],
            layers: [1, 1, 2, 1],
            head_dim: 8,
            mlp_ratio: 4.0,
            channels: 8,
            num_classes: 40,
            pool_scales: vec![1, 2, 3, 6],
            img_scale: (192, 48),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::small()
    }
}

// ---------------------------------------------------------------------------------------------
// Building blocks

/// torch's eval batch norm as a per-channel affine: `α = γ / sqrt(var + ε)`, `β = b − mean·α`
/// (f32, shape `(c,)`).
fn bn_affine(vb: &VarBuilder, c: usize) -> Result<(Tensor, Tensor)> {
    let get = |n: &str| vb.get_with_hints_dtype(c, n, Default::default(), DType::F32);
    let (gamma, beta) = (get("weight")?, get("bias")?);
    let (mean, var) = (get("running_mean")?, get("running_var")?);
    let alpha = gamma.div(&(var + BN_EPS)?.sqrt()?)?;
    let shift = (beta - mean.mul(&alpha)?)?;
    Ok((alpha, shift))
}

/// A per-channel `x·α + β` on NCHW.
#[derive(Debug, Clone)]
struct Affine {
    alpha: Tensor,
    beta: Tensor,
}

impl Affine {
    fn batch_norm(vb: VarBuilder, c: usize) -> Result<Self> {
        let (a, b) = bn_affine(&vb, c)?;
        let dtype = vb.dtype();
        Ok(Self {
            alpha: a.reshape((1, c, 1, 1))?.to_dtype(dtype)?,
            beta: b.reshape((1, c, 1, 1))?.to_dtype(dtype)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_mul(&self.alpha)?.broadcast_add(&self.beta)
    }
}

/// A depthwise `k`×`k` convolution (stride 1, padding `k/2`, bias) as `k²` shifted
/// multiply-adds: candle runs grouped convolutions one group at a time.
#[derive(Debug, Clone)]
struct DepthwiseConv {
    taps: Vec<Tensor>,
    bias: Tensor,
    k: usize,
}

impl DepthwiseConv {
    fn new(vb: VarBuilder, c: usize, k: usize) -> Result<Self> {
        let w = vb.get((c, 1, k, k), "weight")?.reshape((c, k * k))?;
        let taps = (0..k * k)
            .map(|t| w.narrow(1, t, 1)?.reshape((1, c, 1, 1)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bias = vb.get(c, "bias")?.reshape((1, c, 1, 1))?;
        Ok(Self { taps, bias, k })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let p = self.k / 2;
        let xp = x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p)?;
        let mut acc = self.bias.broadcast_as(x.shape())?.contiguous()?;
        for ky in 0..self.k {
            for kx in 0..self.k {
                let t = xp
                    .narrow(2, ky, h)?
                    .narrow(3, kx, w)?
                    .broadcast_mul(&self.taps[ky * self.k + kx])?;
                acc = (acc + t)?;
            }
        }
        Ok(acc)
    }
}

/// mmcv `ConvModule` with BN and ReLU: conv (no bias) with the batch norm folded in, then ReLU.
#[derive(Debug, Clone)]
struct ConvModule {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
}

impl ConvModule {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, k: usize) -> Result<Self> {
        let dtype = vb.dtype();
        let w = vb.pp("conv").get_with_hints_dtype(
            (c_out, c_in, k, k),
            "weight",
            Default::default(),
            DType::F32,
        )?;
        let (alpha, beta) = bn_affine(&vb.pp("bn"), c_out)?;
        let w = w.broadcast_mul(&alpha.reshape((c_out, 1, 1, 1))?)?;
        Ok(Self {
            weight: w.to_dtype(dtype)?,
            bias: beta.reshape((1, c_out, 1, 1))?.to_dtype(dtype)?,
            padding: k / 2,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.conv2d(&self.weight, self.padding, 1, 1, 1)?
            .broadcast_add(&self.bias)?
            .relu()
    }
}

/// LayerNorm over the channels of an NCHW tensor.
fn channel_norm(norm: &LayerNorm, x: &Tensor) -> candle_core::Result<Tensor> {
    norm.forward(&x.permute((0, 2, 3, 1))?.contiguous()?)?
        .permute((0, 3, 1, 2))?
        .contiguous()
}

/// `PatchEmbed`: conv with kernel = stride = `patch`, then LayerNorm (ε 1e-5) over channels.
#[derive(Debug, Clone)]
struct PatchEmbed {
    proj: Conv2d,
    norm: LayerNorm,
}

impl PatchEmbed {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize, patch: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: patch,
            ..Default::default()
        };
        Ok(Self {
            proj: candle_nn::conv2d(c_in, c_out, patch, cfg, vb.pp("proj"))?,
            norm: candle_nn::layer_norm(c_out, 1e-5, vb.pp("norm"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        channel_norm(&self.norm, &self.proj.forward(x)?)
    }
}

/// `CBlock`: `x += dw3×3(x)`; `x += conv2(dw5×5(conv1(BN(x))))`; `x += fc2(GELU(fc1(BN(x))))`
/// (1×1 convs).
#[derive(Debug, Clone)]
struct ConvBlock {
    pos_embed: DepthwiseConv,
    norm1: Affine,
    conv1: Conv2d,
    attn: DepthwiseConv,
    conv2: Conv2d,
    norm2: Affine,
    fc1: Conv2d,
    fc2: Conv2d,
}

impl ConvBlock {
    fn new(vb: VarBuilder, dim: usize, hidden: usize) -> Result<Self> {
        let c1 =
            |vb: VarBuilder, i: usize, o: usize| candle_nn::conv2d(i, o, 1, Default::default(), vb);
        Ok(Self {
            pos_embed: DepthwiseConv::new(vb.pp("pos_embed"), dim, 3)?,
            norm1: Affine::batch_norm(vb.pp("norm1"), dim)?,
            conv1: c1(vb.pp("conv1"), dim, dim)?,
            attn: DepthwiseConv::new(vb.pp("attn"), dim, 5)?,
            conv2: c1(vb.pp("conv2"), dim, dim)?,
            norm2: Affine::batch_norm(vb.pp("norm2"), dim)?,
            fc1: c1(vb.pp("mlp.fc1"), dim, hidden)?,
            fc2: c1(vb.pp("mlp.fc2"), hidden, dim)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.pos_embed.forward(x)?)?;
        let a = self.norm1.forward(&x)?;
        let a = self.conv1.forward(&a)?;
        let a = self.conv2.forward(&self.attn.forward(&a)?)?;
        let x = (x + a)?;
        let m = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        x + self.fc2.forward(&m)?
    }
}

/// `SABlock` (global attention): `x += dw3×3(x)`; on the tokens, `x += proj(MHSA(LN(x)))`,
/// `x += fc2(GELU(fc1(LN(x))))`, LayerNorms ε 1e-6.
#[derive(Debug, Clone)]
struct AttnBlock {
    pos_embed: DepthwiseConv,
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    scale: f64,
}

impl AttnBlock {
    fn new(vb: VarBuilder, dim: usize, heads: usize, hidden: usize) -> Result<Self> {
        Ok(Self {
            pos_embed: DepthwiseConv::new(vb.pp("pos_embed"), dim, 3)?,
            norm1: candle_nn::layer_norm(dim, 1e-6, vb.pp("norm1"))?,
            qkv: candle_nn::linear(dim, 3 * dim, vb.pp("attn.qkv"))?,
            proj: candle_nn::linear(dim, dim, vb.pp("attn.proj"))?,
            norm2: candle_nn::layer_norm(dim, 1e-6, vb.pp("norm2"))?,
            fc1: candle_nn::linear(dim, hidden, vb.pp("mlp.fc1"))?,
            fc2: candle_nn::linear(hidden, dim, vb.pp("mlp.fc2"))?,
            heads,
            scale: ((dim / heads) as f64).powf(-0.5),
        })
    }

    fn attention(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        let hd = c / self.heads;
        let qkv = self
            .qkv
            .forward(t)?
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let out = attention(&q, &k, &v, self.scale, ScaleAt::Scores)?;
        self.proj
            .forward(&out.transpose(1, 2)?.contiguous()?.reshape((b, n, c))?)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self.pos_embed.forward(x)?)?;
        let (b, c, h, w) = x.dims4()?;
        let t = x.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let t = (&t + self.attention(&self.norm1.forward(&t)?)?)?;
        let m = self.fc1.forward(&self.norm2.forward(&t)?)?.gelu_erf()?;
        let t = (&t + self.fc2.forward(&m)?)?;
        t.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))
    }
}

#[derive(Debug, Clone)]
enum Block {
    Conv(ConvBlock),
    Attn(AttnBlock),
}

impl Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Block::Conv(b) => b.forward(x),
            Block::Attn(b) => b.forward(x),
        }
    }
}

#[derive(Debug, Clone)]
struct Stage {
    embed: PatchEmbed,
    blocks: Vec<Block>,
    norm: LayerNorm,
}

/// `UPerHead` (PPM + FPN) and its `conv_seg`.
#[derive(Debug, Clone)]
struct UperHead {
    psp: Vec<(usize, ConvModule)>,
    bottleneck: ConvModule,
    laterals: Vec<ConvModule>,
    fpn_convs: Vec<ConvModule>,
    fpn_bottleneck: ConvModule,
    conv_seg: Conv2d,
}

fn resize(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    interpolate_bilinear(x, (h, w), false)
}

impl UperHead {
    fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (ins, ch) = (cfg.embed_dim, cfg.channels);
        let top = ins[3];
        let psp = cfg
            .pool_scales
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                Ok((
                    s,
                    ConvModule::new(vb.pp(format!("psp_modules.{i}.1")), top, ch, 1)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let n = cfg.pool_scales.len();
        let laterals = (0..3)
            .map(|i| ConvModule::new(vb.pp(format!("lateral_convs.{i}")), ins[i], ch, 1))
            .collect::<Result<Vec<_>>>()?;
        let fpn_convs = (0..3)
            .map(|i| ConvModule::new(vb.pp(format!("fpn_convs.{i}")), ch, ch, 3))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            psp,
            bottleneck: ConvModule::new(vb.pp("bottleneck"), top + n * ch, ch, 3)?,
            laterals,
            fpn_convs,
            fpn_bottleneck: ConvModule::new(vb.pp("fpn_bottleneck"), 4 * ch, ch, 3)?,
            conv_seg: candle_nn::conv2d(
                ch,
                cfg.num_classes,
                1,
                Default::default(),
                vb.pp("conv_seg"),
            )?,
        })
    }

    fn forward(&self, feats: &[Tensor; 4]) -> candle_core::Result<Tensor> {
        let top = &feats[3];
        let (_, _, th, tw) = top.dims4()?;
        let mut psp = vec![top.clone()];
        for (s, conv) in &self.psp {
            let pooled = adaptive_avg_pool2d(top, (*s, *s))?;
            psp.push(resize(&conv.forward(&pooled)?, th, tw)?);
        }
        let mut lat: Vec<Tensor> = self
            .laterals
            .iter()
            .zip(feats)
            .map(|(c, f)| c.forward(f))
            .collect::<candle_core::Result<_>>()?;
        lat.push(self.bottleneck.forward(&Tensor::cat(&psp, 1)?)?);
        for i in (1..lat.len()).rev() {
            let (_, _, h, w) = lat[i - 1].dims4()?;
            lat[i - 1] = (&lat[i - 1] + resize(&lat[i], h, w)?)?;
        }
        let (_, _, h0, w0) = lat[0].dims4()?;
        let mut outs = Vec::with_capacity(lat.len());
        for (i, l) in lat.iter().enumerate() {
            let o = match self.fpn_convs.get(i) {
                Some(conv) => conv.forward(l)?,
                None => l.clone(),
            };
            outs.push(if i == 0 { o } else { resize(&o, h0, w0)? });
        }
        let fused = self.fpn_bottleneck.forward(&Tensor::cat(&outs, 1)?)?;
        self.conv_seg.forward(&fused)
    }
}

// ---------------------------------------------------------------------------------------------
// The network

/// UniFormer + UPerHead, weights named as in the checkpoint's `state_dict`
/// (`backbone.patch_embed1.proj.weight`, `backbone.blocks3.0.attn.qkv.weight`, …,
/// `decode_head.psp_modules.0.1.conv.weight`, `decode_head.conv_seg.bias`).
#[derive(Debug, Clone)]
pub struct Uniformer {
    stages: Vec<Stage>,
    head: UperHead,
    cfg: Config,
    device: Device,
    dtype: DType,
}

impl Uniformer {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let bb = vb.pp("backbone");
        let d = cfg.embed_dim;
        let mut stages = Vec::with_capacity(4);
        for i in 0..4 {
            let (c_in, patch) = if i == 0 { (3, 4) } else { (d[i - 1], 2) };
            let hidden = (d[i] as f64 * cfg.mlp_ratio) as usize;
            let blocks = (0..cfg.layers[i])
                .map(|j| {
                    let vb = bb.pp(format!("blocks{}.{j}", i + 1));
                    Ok(if i < 2 {
                        Block::Conv(ConvBlock::new(vb, d[i], hidden)?)
                    } else {
                        Block::Attn(AttnBlock::new(vb, d[i], d[i] / cfg.head_dim, hidden)?)
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            stages.push(Stage {
                embed: PatchEmbed::new(bb.pp(format!("patch_embed{}", i + 1)), c_in, d[i], patch)?,
                blocks,
                norm: candle_nn::layer_norm(d[i], 1e-6, bb.pp(format!("norm{}", i + 1)))?,
            });
        }
        Ok(Self {
            stages,
            head: UperHead::new(vb.pp("decode_head"), cfg)?,
            cfg: cfg.clone(),
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The backbone's four outputs (`1×d_i×h/4·2⁻ⁱ×w/4·2⁻ⁱ`, floored) for the normalized input
    /// `x` (`1×3×h×w`, on the network's device and dtype).
    pub fn features(&self, x: &Tensor) -> candle_core::Result<[Tensor; 4]> {
        let mut x = x.clone();
        let mut outs = Vec::with_capacity(4);
        for s in &self.stages {
            x = s.embed.forward(&x)?;
            for b in &s.blocks {
                x = b.forward(&x)?;
            }
            outs.push(channel_norm(&s.norm, &x)?);
        }
        Ok(outs.try_into().expect("four stages"))
    }

    /// The decode head's logits (`1×num_classes×⌊h/4⌋×⌊w/4⌋`) for the normalized input `x`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.head.forward(&self.features(x)?)
    }

    /// Steps 1–4 of the module docs: the label map (`w·h` class ids, row-major) of `image`.
    pub fn labels(&self, image: &RgbImage) -> Result<Vec<u8>> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let (nw, nh) = rescale_size(w, h, self.cfg.img_scale);
        let x = if (nw, nh) == (w, h) {
            input_tensor(image, &self.device, self.dtype)?
        } else {
            let resized = resize_bilinear_cv(image, nw, nh);
            input_tensor(&resized, &self.device, self.dtype)?
        };
        let logits = self.forward(&x)?;
        labels_from_logits(&logits, (nh, nw), (h, w))
    }
}

impl Detector for Uniformer {
    fn detect(&self, preprocessor: &str, image: &RgbImage, _params: &[f64]) -> Result<RgbImage> {
        if preprocessor != "seg_ufade20k" {
            return Err(diffusion::Error::Config(format!(
                "UniFormer does not serve `{preprocessor}`"
            )));
        }
        let labels = self.labels(image)?;
        Ok(ade20k::colorize(
            &labels,
            image.width() as usize,
            image.height() as usize,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Pre- and post-processing

/// mmcv `rescale_size((w, h), img_scale)`: the size the test pipeline's `Resize(keep_ratio)`
/// gives a `w`×`h` image, as `(w', h')`.
pub fn rescale_size(w: usize, h: usize, img_scale: (usize, usize)) -> (usize, usize) {
    let (long, short) = (
        img_scale.0.max(img_scale.1) as f64,
        img_scale.0.min(img_scale.1) as f64,
    );
    let f = (long / w.max(h) as f64).min(short / w.min(h) as f64);
    ((w as f64 * f + 0.5) as usize, (h as f64 * f + 0.5) as usize)
}

/// Step 2: the network input for `image` (RGB bytes, read as BGR by the reference): channels
/// reversed, `cv2.subtract` of the mean in f32, `cv2.multiply` by `1 / std` in f64 rounded to
/// f32; `1×3×h×w` on `device` in `dtype`.
pub fn input_tensor(image: &RgbImage, device: &Device, dtype: DType) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let raw = image.as_raw();
    let mut planar = vec![0f32; 3 * h * w];
    for (c, plane) in planar.chunks_mut(h * w).enumerate() {
        let src = 2 - c;
        let mean = MEAN[c] as f32;
        let inv = 1.0 / STD[c];
        for (i, v) in plane.iter_mut().enumerate() {
            *v = ((raw[i * 3 + src] as f32 - mean) as f64 * inv) as f32;
        }
    }
    Ok(Tensor::from_vec(planar, (1, 3, h, w), device)?.to_dtype(dtype)?)
}

/// Step 4: the label map from the decode head's `logits` (any device and dtype) for a network
/// input of `net` = (h', w') and an original image of `out` = (h, w): bilinear to `net`, then to
/// `out` (skipped when equal), argmax over classes (in f32, first maximum); comes back to the
/// host as `u8` class ids, row-major.
pub fn labels_from_logits(
    logits: &Tensor,
    net: (usize, usize),
    out: (usize, usize),
) -> Result<Vec<u8>> {
    let (_, classes, _, _) = logits.dims4()?;
    if classes > 256 {
        return Err(diffusion::Error::Config(format!(
            "{classes} classes do not fit a u8 label map"
        )));
    }
    let mut seg = resize(&logits.to_dtype(DType::F32)?, net.0, net.1)?;
    if out != net {
        seg = resize(&seg, out.0, out.1)?;
    }
    let labels = seg
        .argmax_keepdim(1)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    Ok(labels)
}

/// `cv2.resize(img, (w, h), interpolation=INTER_LINEAR)` on `u8` RGB, bit for bit as OpenCV 4
/// computes it: per axis, source coordinate `(d + 0.5)·(in/out) − 0.5` in f32, weights
/// `round(w · 2048)`; along x the coordinate is clamped into the image (weights 1, 0 at the
/// borders), along y the two rows are clamped but the weights kept; horizontal sums in i32
/// (scale 2048), vertical `((S0 >> 4)·b0 >> 16) + ((S1 >> 4)·b1 >> 16)`, `(v + 2) >> 2`,
/// saturated (OpenCV's SIMD path, which it takes for every pixel on x86 and ARM). An unchanged
/// size is a copy.
pub fn resize_bilinear_cv(img: &RgbImage, w: usize, h: usize) -> RgbImage {
    let (sw, sh) = (img.width() as usize, img.height() as usize);
    if (w, h) == (sw, sh) {
        return img.clone();
    }
    let coefs = |n_in: usize, n_out: usize, clamp: bool| -> Vec<(usize, usize, i32, i32)> {
        let scale = 1.0 / (n_out as f64 / n_in as f64);
        (0..n_out)
            .map(|d| {
                let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                let s = f.floor();
                let mut f = f - s;
                let mut s = s as i64;
                if clamp {
                    if s < 0 {
                        f = 0.0;
                        s = 0;
                    }
                    if s >= n_in as i64 - 1 {
                        f = 0.0;
                        s = n_in as i64 - 1;
                    }
                }
                let a0 = ((1.0 - f) * 2048.0).round_ties_even() as i32;
                let a1 = (f * 2048.0).round_ties_even() as i32;
                let c = |i: i64| i.clamp(0, n_in as i64 - 1) as usize;
                (c(s), c(s + 1), a0, a1)
            })
            .collect()
    };
    let xs = coefs(sw, w, true);
    let ys = coefs(sh, h, false);
    let src = img.as_raw();
    // Horizontal pass over every source row.
    let mut rows = vec![0i32; sh * w * 3];
    for y in 0..sh {
        let line = &src[y * sw * 3..(y + 1) * sw * 3];
        let out = &mut rows[y * w * 3..(y + 1) * w * 3];
        for (x, &(s0, s1, a0, a1)) in xs.iter().enumerate() {
            for c in 0..3 {
                out[x * 3 + c] = line[s0 * 3 + c] as i32 * a0 + line[s1 * 3 + c] as i32 * a1;
            }
        }
    }
    let mut data = vec![0u8; h * w * 3];
    for (y, &(s0, s1, b0, b1)) in ys.iter().enumerate() {
        let r0 = &rows[s0 * w * 3..(s0 + 1) * w * 3];
        let r1 = &rows[s1 * w * 3..(s1 + 1) * w * 3];
        let out = &mut data[y * w * 3..(y + 1) * w * 3];
        for i in 0..w * 3 {
            let v = (((r0[i] >> 4) * b0) >> 16) + (((r1[i] >> 4) * b1) >> 16);
            out[i] = ((v + 2) >> 2).clamp(0, 255) as u8;
        }
    }
    RgbImage::from_raw(w as u32, h as u32, data).expect("buffer size")
}
