//! NormalBAE surface normals (`normal_bae`; Bae et al., ICCV 2021, `scannet.pt`), as
//! controlnet_aux 0.0.10's `NormalBaeDetector` runs it (A1111's `normal_bae` is the same code).
//!
//! # Network (`NNET`, architecture `BN`, eval mode)
//!
//! * Encoder `encoder.original_model`: geffnet's `tf_efficientnet_b5_ap` (channel multiplier
//!   1.6, depth multiplier 2.2) without its pooling and classifier. TensorFlow "same" padding:
//!   stride-1 convolutions pad `(k − 1) / 2` on every side, stride-2 ones pad
//!   `max((⌈i/2⌉ − 1)·2 + k − i, 0)` split `⌊p/2⌋` before, the rest after (asymmetric on even
//!   sizes), computed per call from the input size. BatchNorm eps 1e-3, SiLU ("swish"),
//!   squeeze-excite (spatial mean, 1×1 reduce + bias, SiLU, 1×1 expand + bias, sigmoid gate).
//!   The decoder taps the outputs of stages 0, 1, 2 and 4 (strides 2, 4, 8, 16; 24, 40, 64 and
//!   176 channels) and of `conv_head` (stride 32, 2048 channels, before `bn2`, which is not
//!   used and not loaded).
//! * Decoder `decoder`: `conv2` (1×1, bias) on the stride-32 map; four `UpSampleBN`s
//!   (`F.interpolate(bilinear, align_corners=True)` to the skip's size, concatenation
//!   `[up, skip]`, then twice 3×3 conv + BatchNorm (eps 1e-5) + LeakyReLU(0.01)) giving 1024,
//!   512, 256 and 128 channels at strides 16, 8, 4, 2; `out_conv_res8` (3×3) on the stride-8
//!   map → `norm_normalize`; then, in eval (`mode='test'`: no random point sampling, every pixel
//!   is refined), three times: the previous decoder map and the previous prediction both
//!   upsampled ×2 (bilinear, `align_corners=True`), concatenated `[feature, prediction]`, run
//!   through a pixel-wise MLP of `Conv1d`s (k = 1: C+4 → 128 → 128 → 128 → 4, ReLU between)
//!   and `norm_normalize`d, giving predictions at strides 4, 2 and 1.
//! * `norm_normalize`: channels 0..3 divided by `sqrt(x² + y² + z²) + 1e-10`, channel 3
//!   (`kappa`) → `elu(kappa) + 1 + 0.01`.
//!
//! The side lengths must be multiples of 8 (otherwise the reference's concatenations fail);
//! the detect sizes `resize_image` makes are multiples of 64.
//!
//! # Detector steps (image at its detect size, RGB)
//!
//! 1. [`input_tensor`] (host, f32 as torch computes it): `v / 255`, then torchvision's
//!    `Normalize` `(x − mean) / std` with the ImageNet mean (0.485, 0.456, 0.406) and std
//!    (0.229, 0.224, 0.225); `1×3×h×w`, RGB.
//! 2. [`NormalBae::forward`]: the four predictions; the detector keeps the full-resolution one's
//!    channels 0..3 ([`NormalBae::normal_map`]).
//! 3. [`hint_from_normal`] (host, f32): `((n + 1) · 0.5).clip(0, 1)`, then
//!    `(· 255).clip(0, 255)` truncated to `u8`; channel 0 → R, 1 → G, 2 → B, as the reference
//!    returns them. The reference's final `cv2.resize` to `image_resolution` is the identity
//!    here (the hint stays at the detect size).
//!
//! Device and dtype: weights live on `vb.device()` in `vb.dtype()` (batch norms folded into the
//! convolutions at load, in f32); the image goes up once, the normal map comes back once.
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::{Detector, Result};

/// The encoder's BatchNorm eps (`BN_EPS_TF_DEFAULT`).
const ENCODER_BN_EPS: f64 = 1e-3;
/// `nn.BatchNorm2d`'s default eps (the decoder).
const DECODER_BN_EPS: f64 = 1e-5;
/// torchvision `Normalize` of `NormalBaeDetector`.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The EfficientNet scaling (geffnet's `_gen_efficientnet`) of the encoder; the decoder's
/// widths are fixed by the reference (1024, 512, 256, 128; MLP width 128).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub channel_multiplier: f64,
    pub depth_multiplier: f64,
}

impl Config {
    /// `scannet.pt`: `tf_efficientnet_b5_ap` (1.6, 2.2).
    pub fn scannet() -> Self {
        Self {
            channel_multiplier: 1.6,
            depth_multiplier: 2.2,
        }
    }

    /// EfficientNet-B0's arch definition (`ds_r1_k3_s1_e1_c16_se0.25`, `ir_r2_k3_s2_e6_c24`,
    /// …), scaled: per stage (kind, repeats, kernel, stride, expansion, output channels).
    fn stages(&self) -> Vec<StageSpec> {
        const B0: [(bool, usize, usize, usize, usize, usize); 7] = [
            (true, 1, 3, 1, 1, 16),
            (false, 2, 3, 2, 6, 24),
            (false, 2, 5, 2, 6, 40),
            (false, 3, 3, 2, 6, 80),
            (false, 3, 5, 1, 6, 112),
            (false, 4, 5, 2, 6, 192),
            (false, 1, 3, 1, 6, 320),
        ];
        B0.iter()
            .map(|&(ds, r, k, s, e, c)| StageSpec {
                depthwise_separable: ds,
                // `_scale_stage_depth` with `depth_trunc='ceil'` (one block arg per stage).
                repeats: (r as f64 * self.depth_multiplier).ceil() as usize,
                kernel: k,
                stride: s,
                expansion: e,
                channels: round_channels(c as f64, self.channel_multiplier),
            })
            .collect()
    }

    /// `round_channels(32, m)`.
    fn stem_channels(&self) -> usize {
        round_channels(32.0, self.channel_multiplier)
    }

    /// `round_channels(1280, m)`: `conv_head`'s output (2048 for B5).
    pub fn num_features(&self) -> usize {
        round_channels(1280.0, self.channel_multiplier)
    }
}

#[derive(Debug, Clone, Copy)]
struct StageSpec {
    depthwise_separable: bool,
    repeats: usize,
    kernel: usize,
    stride: usize,
    expansion: usize,
    channels: usize,
}

/// geffnet's `make_divisible(v, divisor)` (`min_value = divisor`).
fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new_v = (((v + d / 2.0) as i64 / divisor as i64) * divisor as i64).max(divisor as i64);
    if (new_v as f64) < 0.9 * v {
        new_v += divisor as i64;
    }
    new_v as usize
}

/// geffnet's `round_channels(channels, multiplier, 8)`.
fn round_channels(channels: f64, multiplier: f64) -> usize {
    make_divisible(channels * multiplier, 8)
}

/// TensorFlow "same" padding of one side of length `i` for kernel `k`, stride `s`:
/// (before, after).
fn same_pad(i: usize, k: usize, s: usize) -> (usize, usize) {
    if s == 1 {
        return ((k - 1) / 2, (k - 1) / 2);
    }
    let pad = ((i.div_ceil(s) - 1) * s + k).saturating_sub(i);
    (pad / 2, pad - pad / 2)
}

/// An eval-mode BatchNorm as a per-channel affine map `x·α + β` (f32, on the host's device).
fn batch_norm(vb: &VarBuilder, c: usize, eps: f64) -> Result<(Tensor, Tensor)> {
    let g = |n: &str| vb.get_with_hints_dtype(c, n, Default::default(), DType::F32);
    let (gamma, beta, mean, var) = (
        g("weight")?,
        g("bias")?,
        g("running_mean")?,
        g("running_var")?,
    );
    let alpha = gamma.div(&(var + eps)?.sqrt()?)?;
    let shift = (beta - mean.mul(&alpha)?)?;
    Ok((alpha, shift))
}

fn f32_weight(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    Ok(vb.get_with_hints_dtype(shape, name, Default::default(), DType::F32)?)
}

/// A 1×1 convolution (`Conv2d` or `Conv1d` with k = 1) as a matrix product over the flattened
/// positions, with an optional bias and batch norm folded in.
#[derive(Debug, Clone)]
struct Pointwise {
    /// `(out, in)`.
    weight: Tensor,
    /// `(1, out, 1)`.
    bias: Option<Tensor>,
}

impl Pointwise {
    /// `conv`: the convolution's VarBuilder (`weight` of shape `(out, in, 1, 1)`, or `(out, in,
    /// 1)` for a `Conv1d`), `bias` whether it has one, `bn` its batch norm (VarBuilder, eps).
    fn new(
        conv: &VarBuilder,
        c_in: usize,
        c_out: usize,
        conv1d: bool,
        bias: bool,
        bn: Option<(&VarBuilder, f64)>,
    ) -> Result<Self> {
        let shape: &[usize] = if conv1d {
            &[c_out, c_in, 1]
        } else {
            &[c_out, c_in, 1, 1]
        };
        let mut w = f32_weight(conv, shape, "weight")?.reshape((c_out, c_in))?;
        let mut b = if bias {
            Some(f32_weight(conv, &[c_out], "bias")?)
        } else {
            None
        };
        if let Some((bn, eps)) = bn {
            let (alpha, shift) = batch_norm(bn, c_out, eps)?;
            w = w.broadcast_mul(&alpha.reshape((c_out, 1))?)?;
            b = Some(match b {
                Some(b) => (b.mul(&alpha)? + shift)?,
                None => shift,
            });
        }
        let dtype = conv.dtype();
        Ok(Self {
            weight: w.to_dtype(dtype)?,
            bias: b
                .map(|b| b.reshape((1, c_out, 1))?.to_dtype(dtype))
                .transpose()?,
        })
    }

    /// On `(n, c, l)`.
    fn forward3(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        let y = self.weight.broadcast_left(n)?.matmul(&x.contiguous()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// On `(n, c, h, w)`.
    fn forward4(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let y = self.forward3(&x.reshape((n, c, h * w))?)?;
        let o = y.dim(1)?;
        y.reshape((n, o, h, w))
    }
}

/// A dense k×k convolution with TF "same" padding (geffnet's `Conv2dSame` for stride 2, plain
/// symmetric padding for stride 1), batch norm folded in.
#[derive(Debug, Clone)]
struct DenseSame {
    weight: Tensor,
    bias: Tensor,
    k: usize,
    stride: usize,
}

impl DenseSame {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (t, b) = same_pad(h, self.k, self.stride);
        let (l, r) = same_pad(w, self.k, self.stride);
        let xp = x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?;
        xp.conv2d(&self.weight, 0, self.stride, 1, 1)?
            .broadcast_add(&self.bias)
    }
}

/// A depthwise k×k convolution (no bias) with TF "same" padding and its batch norm folded in,
/// run as a sum of k² shifted, per-channel-scaled views of the padded input (candle runs
/// grouped convolutions one group at a time, which is slow with a thousand channels). Stride 2
/// reads the taps from the four stride-2 phases of the padded input.
#[derive(Debug, Clone)]
struct Depthwise {
    /// `k·k` tensors `(1, c, 1, 1)`, row-major over `(ky, kx)`.
    taps: Vec<Tensor>,
    /// `(1, c, 1, 1)`.
    bias: Tensor,
    k: usize,
    stride: usize,
}

impl Depthwise {
    fn new(
        conv: &VarBuilder,
        bn: &VarBuilder,
        c: usize,
        k: usize,
        stride: usize,
        eps: f64,
    ) -> Result<Self> {
        let w = f32_weight(conv, &[c, 1, k, k], "weight")?;
        let (alpha, shift) = batch_norm(bn, c, eps)?;
        let w = w
            .reshape((c, k * k))?
            .broadcast_mul(&alpha.reshape((c, 1))?)?;
        let dtype = conv.dtype();
        let taps = (0..k * k)
            .map(|t| w.narrow(1, t, 1)?.reshape((1, c, 1, 1))?.to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            taps,
            bias: shift.reshape((1, c, 1, 1))?.to_dtype(dtype)?,
            k,
            stride,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let k = self.k;
        let (t, b) = same_pad(h, k, self.stride);
        let (l, r) = same_pad(w, k, self.stride);
        let (hp, wp) = (h + t + b, w + l + r);
        let (oh, ow) = ((hp - k) / self.stride + 1, (wp - k) / self.stride + 1);
        let xp = x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?;
        // The sources the taps read: the padded input itself, or its four stride-2 phases
        // (phase (py, px) holds xp[2i + py, 2j + px]).
        let phases: Vec<Tensor> = if self.stride == 1 {
            vec![xp]
        } else {
            let xe = xp
                .pad_with_zeros(2, 0, hp % 2)?
                .pad_with_zeros(3, 0, wp % 2)?
                .reshape((n, c, hp.div_ceil(2), 2, wp.div_ceil(2), 2))?;
            let (h2, w2) = (hp.div_ceil(2), wp.div_ceil(2));
            let mut v = Vec::with_capacity(4);
            for py in 0..2 {
                for px in 0..2 {
                    v.push(
                        xe.narrow(3, py, 1)?
                            .narrow(5, px, 1)?
                            .reshape((n, c, h2, w2))?,
                    );
                }
            }
            v
        };
        let mut acc: Option<Tensor> = None;
        for ky in 0..k {
            for kx in 0..k {
                let src = if self.stride == 1 {
                    phases[0].narrow(2, ky, oh)?.narrow(3, kx, ow)?
                } else {
                    phases[(ky % 2) * 2 + kx % 2]
                        .narrow(2, ky / 2, oh)?
                        .narrow(3, kx / 2, ow)?
                };
                let term = src.broadcast_mul(&self.taps[ky * k + kx])?;
                acc = Some(match acc {
                    None => term,
                    Some(a) => (a + term)?,
                });
            }
        }
        acc.expect("k ≥ 1").broadcast_add(&self.bias)
    }
}

/// geffnet's `SqueezeExcite`: `x · sigmoid(expand(silu(reduce(mean(x)))))`. The spatial mean
/// is taken in f32 whatever the dtype (candle sums f16 in f16, which made f16 runs 10× less
/// accurate).
#[derive(Debug, Clone)]
struct SqueezeExcite {
    reduce: Pointwise,
    expand: Pointwise,
}

impl SqueezeExcite {
    fn new(vb: &VarBuilder, c: usize, reduced: usize) -> Result<Self> {
        Ok(Self {
            reduce: Pointwise::new(&vb.pp("conv_reduce"), c, reduced, false, true, None)?,
            expand: Pointwise::new(&vb.pp("conv_expand"), reduced, c, false, true, None)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let s = x
            .reshape((n, c, h * w))?
            .to_dtype(DType::F32)?
            .mean_keepdim(D::Minus1)?
            .to_dtype(x.dtype())?;
        let s = self.reduce.forward3(&s)?.silu()?;
        let s = candle_nn::ops::sigmoid(&self.expand.forward3(&s)?)?;
        x.broadcast_mul(&s.reshape((n, c, 1, 1))?)
    }
}

/// One block of the encoder: `DepthwiseSeparableConv` (stage 0) or `InvertedResidual`.
#[derive(Debug, Clone)]
struct Block {
    /// `conv_pw` + `bn1` + SiLU (inverted residuals only).
    expand: Option<Pointwise>,
    /// `conv_dw` + its batch norm, then SiLU.
    dw: Depthwise,
    se: SqueezeExcite,
    /// `conv_pw` + `bn2` (separable) or `conv_pwl` + `bn3` (inverted residual), no activation.
    project: Pointwise,
    residual: bool,
}

impl Block {
    fn new(vb: &VarBuilder, spec: &StageSpec, c_in: usize, stride: usize) -> Result<Self> {
        let c_out = spec.channels;
        let k = spec.kernel;
        let eps = ENCODER_BN_EPS;
        // SE width from the block's input channels (`reduced_base_chs = in_chs`), divisor 1.
        let reduced = make_divisible(c_in as f64 * 0.25, 1);
        if spec.depthwise_separable {
            Ok(Self {
                expand: None,
                dw: Depthwise::new(&vb.pp("conv_dw"), &vb.pp("bn1"), c_in, k, stride, eps)?,
                se: SqueezeExcite::new(&vb.pp("se"), c_in, reduced)?,
                project: Pointwise::new(
                    &vb.pp("conv_pw"),
                    c_in,
                    c_out,
                    false,
                    false,
                    Some((&vb.pp("bn2"), eps)),
                )?,
                residual: stride == 1 && c_in == c_out,
            })
        } else {
            let mid = make_divisible((c_in * spec.expansion) as f64, 8);
            Ok(Self {
                expand: Some(Pointwise::new(
                    &vb.pp("conv_pw"),
                    c_in,
                    mid,
                    false,
                    false,
                    Some((&vb.pp("bn1"), eps)),
                )?),
                dw: Depthwise::new(&vb.pp("conv_dw"), &vb.pp("bn2"), mid, k, stride, eps)?,
                se: SqueezeExcite::new(&vb.pp("se"), mid, reduced)?,
                project: Pointwise::new(
                    &vb.pp("conv_pwl"),
                    mid,
                    c_out,
                    false,
                    false,
                    Some((&vb.pp("bn3"), eps)),
                )?,
                residual: stride == 1 && c_in == c_out,
            })
        }
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = match &self.expand {
            Some(e) => e.forward4(x)?.silu()?,
            None => x.clone(),
        };
        let h = self.dw.forward(&h)?.silu()?;
        let h = self.se.forward(&h)?;
        let h = self.project.forward4(&h)?;
        if self.residual {
            h + x
        } else {
            Ok(h)
        }
    }
}

/// `UpSampleBN`: upsample to the skip's size, concatenate, (3×3 conv + BN + LeakyReLU) × 2.
#[derive(Debug, Clone)]
struct UpSampleBn {
    convs: [candle_nn::Conv2d; 2],
}

impl UpSampleBn {
    fn new(vb: &VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        let conv = |i: usize, bn: usize, ci: usize| -> Result<candle_nn::Conv2d> {
            let cv = vb.pp(format!("_net.{i}"));
            let w = f32_weight(&cv, &[c_out, ci, 3, 3], "weight")?;
            let b = f32_weight(&cv, &[c_out], "bias")?;
            let (alpha, shift) = batch_norm(&vb.pp(format!("_net.{bn}")), c_out, DECODER_BN_EPS)?;
            let w = w.broadcast_mul(&alpha.reshape((c_out, 1, 1, 1))?)?;
            let b = (b.mul(&alpha)? + shift)?;
            let cfg = candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            Ok(candle_nn::Conv2d::new(
                w.to_dtype(vb.dtype())?,
                Some(b.to_dtype(vb.dtype())?),
                cfg,
            ))
        };
        Ok(Self {
            convs: [conv(0, 1, c_in)?, conv(3, 4, c_out)?],
        })
    }

    fn forward(&self, x: &Tensor, skip: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = skip.dims4()?;
        let up = crate::tensor_ops::interpolate_bilinear(x, (h, w), true)?;
        let mut f = Tensor::cat(&[&up, skip], 1)?;
        for conv in &self.convs {
            f = candle_nn::ops::leaky_relu(&conv.forward(&f)?, 0.01)?;
        }
        Ok(f)
    }
}

/// The pixel-wise MLP `out_conv_res{4,2,1}`: `Conv1d`s at indices 0, 2, 4, 6, ReLU between.
#[derive(Debug, Clone)]
struct Mlp {
    layers: [Pointwise; 4],
}

impl Mlp {
    fn new(vb: &VarBuilder, c_in: usize) -> Result<Self> {
        let l = |i: usize, ci: usize, co: usize| {
            Pointwise::new(&vb.pp(i.to_string()), ci, co, true, true, None)
        };
        Ok(Self {
            layers: [
                l(0, c_in, 128)?,
                l(2, 128, 128)?,
                l(4, 128, 128)?,
                l(6, 128, 4)?,
            ],
        })
    }

    /// On `(n, c, l)`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward3(&h)?;
            if i < 3 {
                h = h.relu()?;
            }
        }
        Ok(h)
    }
}

/// `norm_normalize` on `(n, 4, …)`: unit normal from channels 0..3, `elu(kappa) + 1.01`.
pub fn norm_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let nx = x.narrow(1, 0, 1)?;
    let ny = x.narrow(1, 1, 1)?;
    let nz = x.narrow(1, 2, 1)?;
    let kappa = x.narrow(1, 3, 1)?;
    let norm = ((nx.sqr()? + ny.sqr()?)? + nz.sqr()?)?.sqrt()?;
    let norm = (norm + 1e-10)?;
    let kappa = ((kappa.elu(1.0)? + 1.0)? + 0.01)?;
    Tensor::cat(
        &[&nx.div(&norm)?, &ny.div(&norm)?, &nz.div(&norm)?, &kappa],
        1,
    )
}

/// `NNET` (architecture `BN`) with its weights named as in `scannet.pt`'s `model` state dict
/// (`module.` dropped): `encoder.original_model.*`, `decoder.*`.
#[derive(Debug, Clone)]
pub struct NormalBae {
    stem: DenseSame,
    /// `encoder.original_model.blocks.{stage}.{block}`.
    stages: Vec<Vec<Block>>,
    head: Pointwise,
    conv2: Pointwise,
    ups: [UpSampleBn; 4],
    out_res8: candle_nn::Conv2d,
    mlps: [Mlp; 3],
    device: Device,
    dtype: DType,
}

impl NormalBae {
    pub fn new(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let enc = vb.pp("encoder.original_model");
        let dtype = vb.dtype();
        let stem_c = cfg.stem_channels();
        let stem = {
            let w = f32_weight(&enc.pp("conv_stem"), &[stem_c, 3, 3, 3], "weight")?;
            let (alpha, shift) = batch_norm(&enc.pp("bn1"), stem_c, ENCODER_BN_EPS)?;
            DenseSame {
                weight: w
                    .broadcast_mul(&alpha.reshape((stem_c, 1, 1, 1))?)?
                    .to_dtype(dtype)?,
                bias: shift.reshape((1, stem_c, 1, 1))?.to_dtype(dtype)?,
                k: 3,
                stride: 2,
            }
        };
        let specs = cfg.stages();
        let mut c_in = stem_c;
        let mut stages = Vec::with_capacity(specs.len());
        for (s, spec) in specs.iter().enumerate() {
            let mut blocks = Vec::with_capacity(spec.repeats);
            for b in 0..spec.repeats {
                let stride = if b == 0 { spec.stride } else { 1 };
                let vbb = enc.pp(format!("blocks.{s}.{b}"));
                blocks.push(Block::new(&vbb, spec, c_in, stride)?);
                c_in = spec.channels;
            }
            stages.push(blocks);
        }
        let nf = cfg.num_features();
        let head = Pointwise::new(&enc.pp("conv_head"), c_in, nf, false, false, None)?;
        let dec = vb.pp("decoder");
        let conv2 = Pointwise::new(&dec.pp("conv2"), nf, nf, false, true, None)?;
        let ch = |s: usize| specs[s].channels;
        let ups = [
            UpSampleBn::new(&dec.pp("up1"), nf + ch(4), 1024)?,
            UpSampleBn::new(&dec.pp("up2"), 1024 + ch(2), 512)?,
            UpSampleBn::new(&dec.pp("up3"), 512 + ch(1), 256)?,
            UpSampleBn::new(&dec.pp("up4"), 256 + ch(0), 128)?,
        ];
        let out_res8 = candle_nn::conv2d(
            512,
            4,
            3,
            candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
            dec.pp("out_conv_res8"),
        )?;
        let mlps = [
            Mlp::new(&dec.pp("out_conv_res4"), 512 + 4)?,
            Mlp::new(&dec.pp("out_conv_res2"), 256 + 4)?,
            Mlp::new(&dec.pp("out_conv_res1"), 128 + 4)?,
        ];
        Ok(Self {
            stem,
            stages,
            head,
            conv2,
            ups,
            out_res8,
            mlps,
            device: vb.device().clone(),
            dtype,
        })
    }

    /// The decoder's four predictions `[out_res8, out_res4, out_res2, out_res1]` (`(n, 4, …)`
    /// at strides 8, 4, 2, 1) for `x` (`(n, 3, h, w)`, normalised as [`input_tensor`] makes
    /// it, on the network's device and dtype; `h`, `w` multiples of 8).
    pub fn forward(&self, x: &Tensor) -> Result<[Tensor; 4]> {
        let (_, _, h, w) = x.dims4()?;
        if h % 8 != 0 || w % 8 != 0 || h == 0 || w == 0 {
            return Err(diffusion::Error::Config(format!(
                "normal_bae needs sides that are multiples of 8, got {w}x{h}"
            )));
        }
        // Encoder: stem, the stages (keeping the outputs of stages 0, 1, 2, 4), conv_head.
        let mut f = self.stem.forward(x)?.silu()?;
        let mut taps = Vec::with_capacity(4);
        for (s, blocks) in self.stages.iter().enumerate() {
            for block in blocks {
                f = block.forward(&f)?;
            }
            if matches!(s, 0 | 1 | 2 | 4) {
                taps.push(f.clone());
            }
        }
        let block4 = self.head.forward4(&f)?;
        // Decoder.
        let d0 = self.conv2.forward4(&block4)?;
        let d1 = self.ups[0].forward(&d0, &taps[3])?;
        let d2 = self.ups[1].forward(&d1, &taps[2])?;
        let d3 = self.ups[2].forward(&d2, &taps[1])?;
        let d4 = self.ups[3].forward(&d3, &taps[0])?;
        let res8 = norm_normalize(&self.out_res8.forward(&d2)?)?;
        let mut outs = vec![res8];
        for (feat, mlp) in [&d2, &d3, &d4].into_iter().zip(&self.mlps) {
            let (n, c, fh, fw) = feat.dims4()?;
            let (oh, ow) = (2 * fh, 2 * fw);
            let up = crate::tensor_ops::interpolate_bilinear(feat, (oh, ow), true)?;
            let prev = outs.last().expect("res8");
            let init = crate::tensor_ops::interpolate_bilinear(prev, (oh, ow), true)?;
            let m = Tensor::cat(&[&up, &init], 1)?.reshape((n, c + 4, oh * ow))?;
            let out = norm_normalize(&mlp.forward(&m)?)?.reshape((n, 4, oh, ow))?;
            outs.push(out);
        }
        Ok(outs.try_into().expect("four predictions"))
    }

    /// The detector's normal map for an RGB image: `out_res1`'s channels 0..3 on the host, f32,
    /// planar `3×h×w`.
    pub fn normal_map(&self, image: &RgbImage) -> Result<Vec<f32>> {
        let x = input_tensor(image, &self.device)?.to_dtype(self.dtype)?;
        let [_, _, _, res1] = self.forward(&x)?;
        Ok(res1
            .narrow(1, 0, 3)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

/// Step 1: the network input for an RGB image, `(1, 3, h, w)` f32 on `device`:
/// `(v / 255 − mean) / std` in f32, each operation rounded as torch rounds it.
pub fn input_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let raw = image.as_raw();
    let mut planar = vec![0f32; 3 * h * w];
    for (c, plane) in planar.chunks_mut(h * w).enumerate() {
        for (i, v) in plane.iter_mut().enumerate() {
            *v = (raw[i * 3 + c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    Ok(Tensor::from_vec(planar, (1, 3, h, w), device)?)
}

/// Step 3: the RGB hint from the normal map (`3×h×w` planar f32, channels x, y, z →
/// R, G, B).
pub fn hint_from_normal(normal: &[f32], width: usize, height: usize) -> RgbImage {
    let n = width * height;
    assert_eq!(normal.len(), 3 * n, "a 3×{height}×{width} normal map");
    let mut out = vec![0u8; 3 * n];
    for c in 0..3 {
        for i in 0..n {
            let v = ((normal[c * n + i] + 1.0) * 0.5).clamp(0.0, 1.0);
            // `(v * 255.0).clip(0, 255).astype(np.uint8)`: float32 product, truncation.
            out[i * 3 + c] = (v * 255.0).clamp(0.0, 255.0) as u8;
        }
    }
    RgbImage::from_raw(width as u32, height as u32, out).expect("buffer size")
}

impl Detector for NormalBae {
    fn detect(&self, preprocessor: &str, image: &RgbImage, _params: &[f64]) -> Result<RgbImage> {
        if preprocessor != "normal_bae" {
            return Err(diffusion::Error::Config(format!(
                "NormalBAE does not serve `{preprocessor}`"
            )));
        }
        let normal = self.normal_map(image)?;
        Ok(hint_from_normal(
            &normal,
            image.width() as usize,
            image.height() as usize,
        ))
    }
}
