//! M-LSD line segment detector (`mlsd`), as controlnet_aux 0.0.10's `MLSDdetector` with
//! `MobileV2_MLSD_Large` (`mlsd_large_512_fp32.pth`, a plain state dict).
//!
//! # Contract
//!
//! [`Mlsd::detect`] takes the image at its detect size and `[value_threshold,
//! distance_threshold]` (defaults 0.1, 0.1) and returns the hint at the same size: white
//! 1-pixel segments on black, the same in R, G and B. Reference steps (`MLSDdetector.__call__`
//! and `pred_lines`, whose model input is the detect image itself, `input_shape = [h, w]`):
//!
//! 1. Input: the RGB image plus a channel of ones, `x / 127.5 - 1` in f32, shape
//!    `(1, 4, h, w)` ([`input_tensor`]; `pred_lines`' `INTER_AREA` resize to the same size is
//!    OpenCV's plain copy).
//! 2. Network ([`Mlsd::forward`]): MobileNetV2 features 0..=13 (TFLite-style stride-2 padding:
//!    zero pad right/bottom by one, then an unpadded convolution) and the decoder blocks 15–23
//!    (bilinear ×2 upsampling with `align_corners=True`); the output is block 23's channels
//!    7..16, a `(1, 9, h/2, w/2)` map: channel 0 the centre logits, 1..5 the displacements
//!    (start x, start y, end x, end y).
//! 3. Decoding ([`decode_lines`]): `heat = sigmoid(centre)` (bit-exact to torch's CPU kernel),
//!    3×3 max-pool NMS keeping `hmax == heat`, `torch.topk(heat, 200)` (tie order reproduced,
//!    see [`topk_indices`]), and for each candidate in that order with `score > thr_v` and
//!    `|start − end| > thr_d` (both compared in f32, as numpy does) the segment
//!    `2·(x + dx_start, y + dy_start, x + dx_end, y + dy_end)` in f64.
//! 4. Drawing ([`draw_hint`]): each segment's coordinates are truncated toward zero (`int()`)
//!    and drawn with `cv2.line(..., [255, 255, 255], 1)` ([`annotators::lines::draw_line`]).
//!
//! controlnet_aux runs steps 1–4 inside `try: … except Exception: pass` and returns whatever was
//! drawn so far. The exceptions it can hit are reproduced as such: a side `n` for which the
//! decoder's feature maps do not line up (anything but `n ≥ 16` with `n mod 16 ∈ {0, 1}`), or a
//! map with fewer than 200 pixels, gives a black hint; no segment passing the thresholds gives a
//! black hint (numpy's `IndexError` on the empty array); a segment whose truncated coordinates
//! do not fit OpenCV's `int` (or are NaN/∞) stops the drawing there, earlier segments kept.
//! Device errors (e.g. out of memory) are returned as errors, not turned into black images.
//!
//! Device and dtype: the weights live on `vb.device()` in `vb.dtype()` (batch norms folded into
//! the convolutions at load, in f32); the image goes up once and the map comes back once, the
//! decoding runs on the host in f32/f64.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::{Luma, RgbImage};

use crate::{Detector, Result};

/// Number of candidate centres `pred_lines` takes (`deccode_output_score_and_ptss(…, 200, 3)`).
pub const TOP_K: usize = 200;
/// BatchNorm2d's default epsilon.
const BN_EPS: f64 = 1e-5;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Act {
    None,
    Relu,
    Relu6,
}

/// A convolution with its batch norm (if any) folded in, and an activation.
#[derive(Debug, Clone)]
struct ConvBn {
    /// Dense kernel `(out, in, k, k)`, or for a depthwise convolution the nine taps, each
    /// `(1, c, 1, 1)`, row-major over `(ky, kx)`.
    weight: Tensor,
    taps: Vec<Tensor>,
    /// `(1, out, 1, 1)`.
    bias: Tensor,
    stride: usize,
    padding: usize,
    dilation: usize,
    /// TFLite padding of `ConvBNReLU` with stride 2: pad right/bottom by one, no conv padding.
    tf_pad: bool,
    act: Act,
}

struct ConvSpec {
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    depthwise: bool,
    conv_bias: bool,
    tf_pad: bool,
    act: Act,
}

impl ConvBn {
    /// `conv` is the VarBuilder of the `nn.Conv2d`, `bn` that of its `nn.BatchNorm2d` (if any).
    fn new(s: ConvSpec, conv: VarBuilder, bn: Option<VarBuilder>) -> Result<Self> {
        let (dtype, device) = (conv.dtype(), conv.device().clone());
        let cin_k = if s.depthwise { 1 } else { s.cin };
        let f32w = |vb: &VarBuilder, shape: &[usize], name: &str| {
            vb.get_with_hints_dtype(shape, name, Default::default(), DType::F32)
        };
        let mut w = f32w(&conv, &[s.cout, cin_k, s.k, s.k], "weight")?;
        let mut b = if s.conv_bias {
            f32w(&conv, &[s.cout], "bias")?
        } else {
            Tensor::zeros(s.cout, DType::F32, &device)?
        };
        if let Some(bn) = bn {
            // torch's eval batch norm: y = x·α + β, α = γ / sqrt(var + ε), β = b − mean·α.
            let gamma = f32w(&bn, &[s.cout], "weight")?;
            let beta = f32w(&bn, &[s.cout], "bias")?;
            let mean = f32w(&bn, &[s.cout], "running_mean")?;
            let var = f32w(&bn, &[s.cout], "running_var")?;
            let alpha = gamma.div(&(var + BN_EPS)?.sqrt()?)?;
            w = w.broadcast_mul(&alpha.reshape((s.cout, 1, 1, 1))?)?;
            b = ((b - mean)?.mul(&alpha)? + beta)?;
        }
        let taps = if s.depthwise {
            let w = w.reshape((s.cout, s.k * s.k))?;
            (0..s.k * s.k)
                .map(|t| {
                    w.narrow(1, t, 1)?
                        .reshape((1, s.cout, 1, 1))?
                        .to_dtype(dtype)
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(Self {
            weight: w.to_dtype(dtype)?,
            taps,
            bias: b.reshape((1, s.cout, 1, 1))?.to_dtype(dtype)?,
            stride: s.stride,
            padding: s.padding,
            dilation: s.dilation,
            tf_pad: s.tf_pad,
            act: s.act,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (x, padding) = if self.tf_pad {
            (x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?, 0)
        } else {
            (x.clone(), self.padding)
        };
        let y = if self.taps.is_empty() {
            x.conv2d(&self.weight, padding, self.stride, self.dilation, 1)?
        } else {
            depthwise3x3(&x, &self.taps, padding, self.stride)?
        };
        let y = y.broadcast_add(&self.bias)?;
        match self.act {
            Act::None => Ok(y),
            Act::Relu => y.relu(),
            Act::Relu6 => y.clamp(0f32, 6f32),
        }
    }
}

/// A 3×3 depthwise convolution (dilation 1) as nine shifted multiply-adds: candle runs grouped
/// convolutions one group at a time, which is slow with hundreds of channels.
fn depthwise3x3(
    x: &Tensor,
    taps: &[Tensor],
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let x = if padding > 0 {
        x.pad_with_zeros(2, padding, padding)?
            .pad_with_zeros(3, padding, padding)?
    } else {
        x.clone()
    };
    let (_, _, hp, wp) = x.dims4()?;
    if hp < 3 || wp < 3 {
        candle_core::bail!("mlsd: depthwise input {hp}x{wp} smaller than the kernel");
    }
    let (oh, ow) = (hp - 2, wp - 2);
    let mut acc: Option<Tensor> = None;
    for ky in 0..3 {
        for kx in 0..3 {
            let t = x
                .narrow(2, ky, oh)?
                .narrow(3, kx, ow)?
                .broadcast_mul(&taps[ky * 3 + kx])?;
            acc = Some(match acc {
                None => t,
                Some(a) => (a + t)?,
            });
        }
    }
    let y = acc.expect("nine taps");
    if stride == 1 {
        Ok(y)
    } else {
        subsample2(&y)
    }
}

/// `y[:, :, ::2, ::2]`.
fn subsample2(y: &Tensor) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = y.dims4()?;
    let y = y.pad_with_zeros(2, 0, h % 2)?.pad_with_zeros(3, 0, w % 2)?;
    let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
    y.contiguous()?
        .reshape((n, c, h2, 2, w2, 2))?
        .narrow(3, 0, 1)?
        .narrow(5, 0, 1)?
        .reshape((n, c, h2, w2))
}

/// `ConvBNReLU` of the backbone: `{vb}.0` the conv (no bias), `{vb}.1` the batch norm, ReLU6.
fn conv_bn_relu6(
    vb: &VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    depthwise: bool,
) -> Result<ConvBn> {
    ConvBn::new(
        ConvSpec {
            cin,
            cout,
            k,
            stride,
            padding: (k - 1) / 2,
            dilation: 1,
            depthwise,
            conv_bias: false,
            tf_pad: stride == 2,
            act: Act::Relu6,
        },
        vb.pp("0"),
        Some(vb.pp("1")),
    )
}

/// A `nn.Sequential(Conv2d(bias), BatchNorm2d, ReLU)` of the decoder blocks.
fn conv_bn_relu(
    vb: &VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    padding: usize,
    dilation: usize,
) -> Result<ConvBn> {
    ConvBn::new(
        ConvSpec {
            cin,
            cout,
            k,
            stride: 1,
            padding,
            dilation,
            depthwise: false,
            conv_bias: true,
            tf_pad: false,
            act: Act::Relu,
        },
        vb.pp("0"),
        Some(vb.pp("1")),
    )
}

/// MobileNetV2's `InvertedResidual`.
#[derive(Debug, Clone)]
struct InvertedResidual {
    layers: Vec<ConvBn>,
    residual: bool,
}

impl InvertedResidual {
    fn new(vb: VarBuilder, inp: usize, oup: usize, stride: usize, expand: usize) -> Result<Self> {
        let vb = vb.pp("conv");
        let hidden = inp * expand;
        let mut layers = Vec::new();
        let mut i = 0;
        if expand != 1 {
            layers.push(conv_bn_relu6(&vb.pp(i), inp, hidden, 1, 1, false)?);
            i += 1;
        }
        layers.push(conv_bn_relu6(&vb.pp(i), hidden, hidden, 3, stride, true)?);
        layers.push(ConvBn::new(
            ConvSpec {
                cin: hidden,
                cout: oup,
                k: 1,
                stride: 1,
                padding: 0,
                dilation: 1,
                depthwise: false,
                conv_bias: false,
                tf_pad: false,
                act: Act::None,
            },
            vb.pp(i + 1),
            Some(vb.pp(i + 2)),
        )?);
        Ok(Self {
            layers,
            residual: stride == 1 && inp == oup,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = x.clone();
        for l in &self.layers {
            y = l.forward(&y)?;
        }
        if self.residual {
            x + y
        } else {
            Ok(y)
        }
    }
}

/// `BlockTypeA`: 1×1 conv of both inputs, `b` upsampled ×2 (bilinear, align_corners), concat.
#[derive(Debug, Clone)]
struct BlockA {
    conv1: ConvBn,
    conv2: ConvBn,
    upscale: bool,
}

impl BlockA {
    fn new(
        vb: VarBuilder,
        in_c1: usize,
        in_c2: usize,
        out_c1: usize,
        out_c2: usize,
        upscale: bool,
    ) -> Result<Self> {
        Ok(Self {
            conv1: conv_bn_relu(&vb.pp("conv1"), in_c2, out_c2, 1, 0, 1)?,
            conv2: conv_bn_relu(&vb.pp("conv2"), in_c1, out_c1, 1, 0, 1)?,
            upscale,
        })
    }

    fn forward(&self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        let mut b = self.conv1.forward(b)?;
        let a = self.conv2.forward(a)?;
        if self.upscale {
            let (_, _, h, w) = b.dims4()?;
            b = b.upsample_bilinear2d(2 * h, 2 * w, true)?;
        }
        Tensor::cat(&[a, b], 1)
    }
}

/// `BlockTypeB`: `conv2(conv1(x) + x)`, both 3×3.
#[derive(Debug, Clone)]
struct BlockB {
    conv1: ConvBn,
    conv2: ConvBn,
}

impl BlockB {
    fn new(vb: VarBuilder, in_c: usize, out_c: usize) -> Result<Self> {
        Ok(Self {
            conv1: conv_bn_relu(&vb.pp("conv1"), in_c, in_c, 3, 1, 1)?,
            conv2: conv_bn_relu(&vb.pp("conv2"), in_c, out_c, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = (self.conv1.forward(x)? + x)?;
        self.conv2.forward(&y)
    }
}

/// `BlockTypeC`: dilated 3×3, 3×3, then a plain 1×1 conv.
#[derive(Debug, Clone)]
struct BlockC {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl BlockC {
    fn new(vb: VarBuilder, in_c: usize, out_c: usize) -> Result<Self> {
        Ok(Self {
            conv1: conv_bn_relu(&vb.pp("conv1"), in_c, in_c, 3, 5, 5)?,
            conv2: conv_bn_relu(&vb.pp("conv2"), in_c, in_c, 3, 1, 1)?,
            conv3: ConvBn::new(
                ConvSpec {
                    cin: in_c,
                    cout: out_c,
                    k: 1,
                    stride: 1,
                    padding: 0,
                    dilation: 1,
                    depthwise: false,
                    conv_bias: true,
                    tf_pad: false,
                    act: Act::None,
                },
                vb.pp("conv3"),
                None,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.conv1.forward(x)?;
        let x = self.conv2.forward(&x)?;
        self.conv3.forward(&x)
    }
}

/// `MobileV2_MLSD_Large`, weights named as its `state_dict`.
#[derive(Debug, Clone)]
pub struct Mlsd {
    stem: ConvBn,
    features: Vec<InvertedResidual>,
    block15: BlockA,
    block16: BlockB,
    block17: BlockA,
    block18: BlockB,
    block19: BlockA,
    block20: BlockB,
    block21: BlockA,
    block22: BlockB,
    block23: BlockC,
    device: Device,
    dtype: DType,
}

impl Mlsd {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let fv = vb.pp("backbone").pp("features");
        let stem = conv_bn_relu6(&fv.pp(0), 4, 32, 3, 2, false)?;
        // (expansion t, channels c, repeats n, first stride s); the last two stages of
        // MobileNetV2 are not part of M-LSD.
        let settings = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
        ];
        let mut features = Vec::new();
        let mut cin = 32;
        for (t, c, n, s) in settings {
            for i in 0..n {
                let idx = features.len() + 1;
                features.push(InvertedResidual::new(
                    fv.pp(idx),
                    cin,
                    c,
                    if i == 0 { s } else { 1 },
                    t,
                )?);
                cin = c;
            }
        }
        Ok(Self {
            stem,
            features,
            block15: BlockA::new(vb.pp("block15"), 64, 96, 64, 64, false)?,
            block16: BlockB::new(vb.pp("block16"), 128, 64)?,
            block17: BlockA::new(vb.pp("block17"), 32, 64, 64, 64, true)?,
            block18: BlockB::new(vb.pp("block18"), 128, 64)?,
            block19: BlockA::new(vb.pp("block19"), 24, 64, 64, 64, true)?,
            block20: BlockB::new(vb.pp("block20"), 128, 64)?,
            block21: BlockA::new(vb.pp("block21"), 16, 64, 64, 64, true)?,
            block22: BlockB::new(vb.pp("block22"), 128, 64)?,
            block23: BlockC::new(vb.pp("block23"), 64, 16)?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The model's output for input `x` `(1, 4, h, w)` (as [`input_tensor`] makes it, in the
    /// network's dtype and on its device; see [`input_compatible`] for the sizes that work):
    /// the `(1, 9, h/2, w/2)` map of `MobileV2_MLSD_Large.forward`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut x = self.stem.forward(x)?;
        // fpn_selected = [1, 3, 6, 10, 13] (feature indices; the stem is feature 0)
        let mut taps = Vec::with_capacity(5);
        for (i, f) in self.features.iter().enumerate() {
            x = f.forward(&x)?;
            if [1, 3, 6, 10, 13].contains(&(i + 1)) {
                taps.push(x.clone());
            }
        }
        let [c1, c2, c3, c4, c5] = <[Tensor; 5]>::try_from(taps).expect("five taps");
        let x = self.block15.forward(&c4, &c5)?;
        let x = self.block16.forward(&x)?;
        let x = self.block17.forward(&c3, &x)?;
        let x = self.block18.forward(&x)?;
        let x = self.block19.forward(&c2, &x)?;
        let x = self.block20.forward(&x)?;
        let x = self.block21.forward(&c1, &x)?;
        let x = self.block22.forward(&x)?;
        let x = self.block23.forward(&x)?;
        x.narrow(1, 7, 9)
    }

    /// The full detector on `image` (at its detect size): hint at the same size.
    pub fn detect_lines(&self, image: &RgbImage, thr_v: f64, thr_d: f64) -> Result<RgbImage> {
        let (w, h) = image.dimensions();
        if !input_compatible(h as usize, w as usize) {
            return Ok(RgbImage::new(w, h));
        }
        let x = input_tensor(image, &self.device)?.to_dtype(self.dtype)?;
        let map = self.forward(&x)?;
        let lines = decode_lines(&map, thr_v, thr_d)?;
        Ok(draw_hint(w, h, lines.as_deref().unwrap_or(&[])))
    }
}

impl Detector for Mlsd {
    fn detect(&self, preprocessor: &str, image: &RgbImage, params: &[f64]) -> Result<RgbImage> {
        if preprocessor != "mlsd" {
            return Err(diffusion::Error::Config(format!(
                "the M-LSD network does not serve preprocessor {preprocessor:?}"
            )));
        }
        let thr_v = params.first().copied().unwrap_or(0.1);
        let thr_d = params.get(1).copied().unwrap_or(0.1);
        self.detect_lines(image, thr_v, thr_d)
    }
}

/// Whether the reference network runs on an `h`×`w` input: every side `n` needs `n ≥ 16` and
/// `n mod 16 ∈ {0, 1}` (otherwise an upsampled map does not match its skip connection and
/// `torch.cat` raises), and the output map needs at least [`TOP_K`] pixels (`torch.topk`).
pub fn input_compatible(h: usize, w: usize) -> bool {
    let side = |n: usize| {
        let (s1, s2, s3, s4) = (n / 2, n / 4, n / 8, n / 16);
        n >= 2 && s4 >= 1 && 2 * s4 == s3 && 2 * s3 == s2 && 2 * s2 == s1
    };
    side(h) && side(w) && (h / 2) * (w / 2) >= TOP_K
}

/// The model input `(1, 4, h, w)` f32 on `device`: `[R, G, B, 1] / 127.5 − 1` computed in f32
/// as numpy does, built on the host and copied up once.
pub fn input_tensor(image: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = image.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut v = vec![0f32; 4 * h * w];
    for (x, y, p) in image.enumerate_pixels() {
        let i = y as usize * w + x as usize;
        for c in 0..3 {
            v[c * h * w + i] = p[c] as f32 / 127.5f32 - 1.0f32;
        }
    }
    let one = 1.0f32 / 127.5f32 - 1.0f32;
    v[3 * h * w..].fill(one);
    Tensor::from_vec(v, (1, 4, h, w), device)
}

/// torch's CPU `sigmoid` for f32, bit for bit: `1 / (1 + exp(-x))` with SLEEF's `expf_u10`
/// (the vectorised kernel torch uses; FMA evaluation).
pub fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + sleef_expf(-x))
}

fn sleef_expf(d: f32) -> f32 {
    if d.is_nan() {
        return d;
    }
    if d < -104.0 {
        return 0.0;
    }
    if d > 100.0 {
        return f32::INFINITY;
    }
    let q = (d * std::f32::consts::LOG2_E).round_ties_even() as i32;
    let qf = q as f32;
    let mut s = qf.mul_add(-0.693_145_751_953_125_f32, d);
    s = qf.mul_add(-1.428_606_765_330_187e-6_f32, s);
    let mut u = 0.000_198_527_617_612_853_646_278_381_f32;
    u = u.mul_add(s, 0.001_393_043_552_525_341_510_772_71);
    u = u.mul_add(s, 0.008_333_360_776_305_198_669_433_59);
    u = u.mul_add(s, 0.041_666_485_369_205_474_853_515_6);
    u = u.mul_add(s, 0.166_666_671_633_720_397_949_219);
    u = u.mul_add(s, 0.5);
    u = 1.0 + (s * s).mul_add(u, s);
    let h = q >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    u * pow2(h) * pow2(q - h)
}

/// The indices `torch.topk(values, k)` returns on the CPU, in its order, including the order of
/// equal values: torch sorts `(value, index)` pairs with libstdc++'s `std::partial_sort` when
/// `64·k ≤ n`, else `std::nth_element` followed by `std::sort` of the first `k − 1`, comparing
/// only values (NaN largest). Both algorithms are reproduced step for step. `None` if `k > n`
/// (torch raises).
pub fn topk_indices(values: &[f32], k: usize) -> Option<Vec<usize>> {
    let n = values.len();
    if k > n {
        return None;
    }
    if k == 0 {
        return Some(Vec::new());
    }
    let mut q: Vec<(f32, usize)> = values.iter().copied().zip(0..).collect();
    if k * 64 <= n {
        stl::partial_sort(&mut q, 0, k, n);
    } else {
        stl::nth_element(&mut q, 0, k - 1, n);
        stl::sort(&mut q, 0, k - 1);
    }
    Some(q[..k].iter().map(|e| e.1).collect())
}

/// libstdc++'s sorting algorithms (as of GCC 9–14) over `(value, index)` pairs, ordered by
/// torch's "largest first" comparator. Written out so the order of ties matches.
mod stl {
    type E = (f32, usize);

    /// `comp(a, b)`: `a` goes before `b`.
    #[inline]
    fn before(a: &E, b: &E) -> bool {
        (a.0.is_nan() && !b.0.is_nan()) || a.0 > b.0
    }

    fn adjust_heap(q: &mut [E], f: usize, mut hole: usize, len: usize, val: E) {
        let top = hole;
        let mut child = hole;
        while child < (len - 1) / 2 {
            child = 2 * (child + 1);
            if before(&q[f + child], &q[f + child - 1]) {
                child -= 1;
            }
            q[f + hole] = q[f + child];
            hole = child;
        }
        if len % 2 == 0 && child == (len - 2) / 2 {
            child = 2 * (child + 1);
            q[f + hole] = q[f + child - 1];
            hole = child - 1;
        }
        // push_heap
        while hole > top {
            let parent = (hole - 1) / 2;
            if !before(&q[f + parent], &val) {
                break;
            }
            q[f + hole] = q[f + parent];
            hole = parent;
        }
        q[f + hole] = val;
    }

    fn make_heap(q: &mut [E], f: usize, l: usize) {
        let len = l - f;
        if len < 2 {
            return;
        }
        let mut parent = (len - 2) / 2;
        loop {
            let v = q[f + parent];
            adjust_heap(q, f, parent, len, v);
            if parent == 0 {
                return;
            }
            parent -= 1;
        }
    }

    fn pop_heap(q: &mut [E], f: usize, l: usize, result: usize) {
        let v = q[result];
        q[result] = q[f];
        adjust_heap(q, f, 0, l - f, v);
    }

    fn heap_select(q: &mut [E], f: usize, m: usize, l: usize) {
        make_heap(q, f, m);
        for i in m..l {
            if before(&q[i], &q[f]) {
                pop_heap(q, f, m, i);
            }
        }
    }

    fn sort_heap(q: &mut [E], f: usize, mut l: usize) {
        while l - f > 1 {
            l -= 1;
            pop_heap(q, f, l, l);
        }
    }

    pub fn partial_sort(q: &mut [E], f: usize, m: usize, l: usize) {
        heap_select(q, f, m, l);
        sort_heap(q, f, m);
    }

    fn move_median_to_first(q: &mut [E], r: usize, a: usize, b: usize, c: usize) {
        let pick = if before(&q[a], &q[b]) {
            if before(&q[b], &q[c]) {
                b
            } else if before(&q[a], &q[c]) {
                c
            } else {
                a
            }
        } else if before(&q[a], &q[c]) {
            a
        } else if before(&q[b], &q[c]) {
            c
        } else {
            b
        };
        q.swap(r, pick);
    }

    fn unguarded_partition(q: &mut [E], mut f: usize, mut l: usize, pivot: usize) -> usize {
        loop {
            while before(&q[f], &q[pivot]) {
                f += 1;
            }
            l -= 1;
            while before(&q[pivot], &q[l]) {
                l -= 1;
            }
            if f >= l {
                return f;
            }
            q.swap(f, l);
            f += 1;
        }
    }

    fn partition_pivot(q: &mut [E], f: usize, l: usize) -> usize {
        let mid = f + (l - f) / 2;
        move_median_to_first(q, f, f + 1, mid, l - 1);
        unguarded_partition(q, f + 1, l, f)
    }

    fn unguarded_linear_insert(q: &mut [E], mut l: usize) {
        let v = q[l];
        while before(&v, &q[l - 1]) {
            q[l] = q[l - 1];
            l -= 1;
        }
        q[l] = v;
    }

    fn insertion_sort(q: &mut [E], f: usize, l: usize) {
        if f == l {
            return;
        }
        for i in f + 1..l {
            if before(&q[i], &q[f]) {
                let v = q[i];
                q.copy_within(f..i, f + 1);
                q[f] = v;
            } else {
                unguarded_linear_insert(q, i);
            }
        }
    }

    fn lg(n: usize) -> usize {
        (usize::BITS - 1 - n.leading_zeros()) as usize
    }

    pub fn nth_element(q: &mut [E], mut f: usize, nth: usize, mut l: usize) {
        if f == l || nth == l {
            return;
        }
        let mut depth = 2 * lg(l - f);
        while l - f > 3 {
            if depth == 0 {
                heap_select(q, f, nth + 1, l);
                q.swap(f, nth);
                return;
            }
            depth -= 1;
            let cut = partition_pivot(q, f, l);
            if cut <= nth {
                f = cut;
            } else {
                l = cut;
            }
        }
        insertion_sort(q, f, l);
    }

    const THRESHOLD: usize = 16;

    fn introsort_loop(q: &mut [E], f: usize, mut l: usize, mut depth: usize) {
        while l - f > THRESHOLD {
            if depth == 0 {
                partial_sort(q, f, l, l);
                return;
            }
            depth -= 1;
            let cut = partition_pivot(q, f, l);
            introsort_loop(q, cut, l, depth);
            l = cut;
        }
    }

    pub fn sort(q: &mut [E], f: usize, l: usize) {
        if f == l {
            return;
        }
        introsort_loop(q, f, l, 2 * lg(l - f));
        if l - f > THRESHOLD {
            insertion_sort(q, f, f + THRESHOLD);
            for i in f + THRESHOLD..l {
                unguarded_linear_insert(q, i);
            }
        } else {
            insertion_sort(q, f, l);
        }
    }
}

/// `pred_lines`' decoding of the model output `map` (`(1, ≥5, h, w)`, any dtype/device; copied
/// to the host once as f32): the segments in the reference's order, in detect-image pixels
/// (before `int()`). `None` where the reference raises before drawing (a map with fewer than
/// [`TOP_K`] pixels); `Some(vec![])` when nothing passes the thresholds.
pub fn decode_lines(
    map: &Tensor,
    thr_v: f64,
    thr_d: f64,
) -> candle_core::Result<Option<Vec<[f64; 4]>>> {
    let (b, c, h, w) = map.dims4()?;
    if b != 1 || c < 5 {
        candle_core::bail!(
            "mlsd: decode_lines needs a (1, >=5, h, w) map, got {:?}",
            map.dims()
        );
    }
    let host = map
        .narrow(1, 0, 5)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(decode_lines_host(&host, h, w, thr_v, thr_d))
}

/// [`decode_lines`] on a host map: `map` holds channels 0..5 of the output, `(5, h, w)`
/// row-major.
pub fn decode_lines_host(
    map: &[f32],
    h: usize,
    w: usize,
    thr_v: f64,
    thr_d: f64,
) -> Option<Vec<[f64; 4]>> {
    let n = h * w;
    assert!(map.len() >= 5 * n, "mlsd map too short");
    let ch = |c: usize| &map[c * n..(c + 1) * n];
    let heat: Vec<f32> = ch(0).iter().map(|&v| sigmoid_f32(v)).collect();
    // 3×3 max pool, stride 1, padding 1 (padding never wins), NaN propagating as torch does.
    let mut kept = vec![0f32; n];
    for y in 0..h {
        for x in 0..w {
            let mut m = f32::NEG_INFINITY;
            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                    let v = heat[yy * w + xx];
                    if v > m || v.is_nan() {
                        m = v;
                    }
                }
            }
            let v = heat[y * w + x];
            let keep = if m == v { 1.0f32 } else { 0.0 };
            kept[y * w + x] = v * keep;
        }
    }
    let idx = topk_indices(&kept, TOP_K)?;
    let (tv, td) = (thr_v as f32, thr_d as f32);
    let (sx, sy, ex, ey) = (ch(1), ch(2), ch(3), ch(4));
    let mut lines = Vec::new();
    for i in idx {
        let score = kept[i];
        let (dx, dy) = (sx[i] - ex[i], sy[i] - ey[i]);
        let dist = (dx * dx + dy * dy).sqrt();
        if score > tv && dist > td {
            let (x, y) = ((i % w) as f64, (i / w) as f64);
            lines.push([
                2.0 * (x + sx[i] as f64),
                2.0 * (y + sy[i] as f64),
                2.0 * (x + ex[i] as f64),
                2.0 * (y + ey[i] as f64),
            ]);
        }
    }
    Some(lines)
}

/// Python's `int(v)` into OpenCV's `int`: `None` where `int()` or `cv2.line` would raise.
fn cv_int(v: f64) -> Option<i32> {
    let t = v.trunc();
    (t.is_finite() && t >= i32::MIN as f64 && t <= i32::MAX as f64).then_some(t as i32)
}

/// The hint for `lines`: a black `w`×`h` image with each segment drawn in white by
/// `cv2.line(thickness=1)`, stopping (as the reference's `try` does) at the first segment whose
/// coordinates OpenCV rejects.
pub fn draw_hint(w: u32, h: u32, lines: &[[f64; 4]]) -> RgbImage {
    let mut gray = image::GrayImage::new(w, h);
    for l in lines {
        let Some(p) = l.iter().map(|&v| cv_int(v)).collect::<Option<Vec<i32>>>() else {
            break;
        };
        annotators::lines::draw_line(&mut gray, (p[0], p[1]), (p[2], p[3]), Luma([255u8]));
    }
    let mut out = RgbImage::new(w, h);
    for (o, g) in out.pixels_mut().zip(gray.pixels()) {
        *o = image::Rgb([g[0]; 3]);
    }
    out
}
