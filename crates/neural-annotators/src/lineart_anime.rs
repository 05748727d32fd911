//! `lineart_anime` (`netG.pth`): controlnet_aux 0.0.10 `UnetGenerator(3, 1, 8, 64,
//! norm_layer=partial(InstanceNorm2d, affine=False, track_running_stats=False),
//! use_dropout=False)` and `LineartAnimeDetector.__call__`.
//!
//! Network: 8 nested `UnetSkipConnectionBlock`s, outermost first. The outermost block's layers
//! are `model.model.{i}`; its inner block's are `model.model.1.model.{i}`, and each deeper
//! block's sit under its parent's `.3.model` (a middle block's layer 3 is its submodule).
//! Every conv has a bias (InstanceNorm ⇒ `use_bias`); the norms have no parameters.
//!
//! ```text
//! outermost (3→64):   Conv 4×4 s2 p1 [.0], inner, ReLU, ConvT 128→1 4×4 s2 p1 [.3], Tanh
//! middle (o→i):       cat[ lrelu(x), ( LeakyReLU 0.2, Conv o→i [.1], IN, inner, ReLU,
//!                                      ConvT 2i→o [.5], IN )(x) ]
//! innermost (512):    cat[ lrelu(x), ( LeakyReLU 0.2, Conv [.1], ReLU, ConvT [.3], IN )(x) ]
//! ```
//!
//! The skip half is `lrelu(x)`, not `x`: the block's `LeakyReLU(0.2, inplace=True)` overwrites
//! `x` before `torch.cat([x, self.model(x)], 1)` reads it. Channels (outer→inner):
//! 3→64→128→256→512→512→512→512→512.
//!
//! Detector: pad-resize the `H×W` image with `cv2.resize(INTER_CUBIC)` to `Hn×Wn`, the next
//! multiples of 256; `x = u8 / 127.5 − 1` (f32); `line = model(x)[0, 0] * 127.5 + 127.5`;
//! `cv2.resize(line, (W, H), INTER_CUBIC)` in f32; `u8(clip(·, 0, 255))` (truncating); the hint
//! is `255 − that`, grey as RGB. The two resizes follow OpenCV's own `INTER_CUBIC` code bit for
//! bit ([`resize_cubic_rgb8`], [`resize_cubic_f32`]). opencv-python also ships Intel IPP,
//! which by default takes over some of these resizes and rounds slightly differently (its
//! coefficients are computed in double): see `tests/lineart.rs` for how far that moves hints.
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, VarBuilder};
use image::RgbImage;

use crate::lineart::{image_tensor, instance_norm};
use crate::{Detector, Result};

const IN_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
struct Level {
    down: Conv2d,
    up: ConvTranspose2d,
}

/// controlnet_aux `UnetGenerator(3, 1, 8, 64)` with parameter-free InstanceNorm.
#[derive(Debug, Clone)]
pub struct UnetGenerator {
    /// Outermost first.
    levels: Vec<Level>,
}

impl UnetGenerator {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        // (outer_nc, inner_nc, input_nc) from the outermost block inwards; output_nc = 1.
        let ngf = 64;
        let chans = [
            (1, ngf, 3),
            (ngf, ngf * 2, ngf),
            (ngf * 2, ngf * 4, ngf * 2),
            (ngf * 4, ngf * 8, ngf * 4),
            (ngf * 8, ngf * 8, ngf * 8),
            (ngf * 8, ngf * 8, ngf * 8),
            (ngf * 8, ngf * 8, ngf * 8),
            (ngf * 8, ngf * 8, ngf * 8),
        ];
        let last = chans.len() - 1;
        let down_cfg = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let up_cfg = ConvTranspose2dConfig {
            padding: 1,
            output_padding: 0,
            stride: 2,
            dilation: 1,
        };
        let mut levels = Vec::with_capacity(chans.len());
        let mut vb = vb.pp("model.model");
        for (i, &(outer, inner, input)) in chans.iter().enumerate() {
            let (down_name, up_name, up_in) = match i {
                0 => ("0", "3", inner * 2),
                _ if i == last => ("1", "3", inner),
                _ => ("1", "5", inner * 2),
            };
            let down = candle_nn::conv2d(input, inner, 4, down_cfg, vb.pp(down_name))?;
            let up = candle_nn::conv_transpose2d(up_in, outer, 4, up_cfg, vb.pp(up_name))?;
            levels.push(Level { down, up });
            vb = vb.pp(if i == 0 { "1.model" } else { "3.model" });
        }
        Ok(Self { levels })
    }

    /// `x`: (N, 3, H, W) in [−1, 1] with `H`, `W` multiples of 256; returns (N, 1, H, W) in
    /// (−1, 1).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let l = &self.levels[0];
        let y = self.inner(1, &l.down.forward(x)?)?;
        l.up.forward(&y.relu()?)?.tanh()
    }

    /// Block `i` (1 ≤ i < 8) applied to `x`: `cat[lrelu(x), up(inner(down(lrelu(x))))]`.
    fn inner(&self, i: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        let l = &self.levels[i];
        let x = candle_nn::ops::leaky_relu(x, 0.2)?;
        let mut y = l.down.forward(&x)?;
        if i + 1 < self.levels.len() {
            y = self.inner(i + 1, &instance_norm(&y, IN_EPS)?)?;
        }
        let y = instance_norm(&l.up.forward(&y.relu()?)?, IN_EPS)?;
        Tensor::cat(&[&x, &y], 1)
    }
}

// ---------------------------------------------------------------------------------------------
// OpenCV INTER_CUBIC
// ---------------------------------------------------------------------------------------------

/// OpenCV's `interpolateCubic` (A = −0.75), in f32 as OpenCV computes it.
fn cubic_coeffs(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// Per destination index along one axis: the 4 source taps (edge replicated) and coefficients.
fn cubic_axis(ssize: usize, dsize: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = 1.0 / (dsize as f64 / ssize as f64);
    (0..dsize)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let c = cubic_coeffs(f - s);
            let s = s as i64 - 1;
            let taps = std::array::from_fn(|k| (s + k as i64).clamp(0, ssize as i64 - 1) as usize);
            (taps, c)
        })
        .collect()
}

/// `saturate_cast<short>(float)`.
fn sat_i16(v: f32) -> i32 {
    v.round_ties_even().clamp(-32768.0, 32767.0) as i32
}

/// `cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)` for 8-bit RGB, OpenCV's generic
/// code (IPP off): 11-bit fixed-point coefficients, an exact integer horizontal pass, and a
/// vertical pass that runs OpenCV's SSE path (`VResizeCubicVec_32s8u`: f32, `S3·b3`, then
/// `+ S2·b2`, `+ S1·b1`, `+ S0·b0`, round to nearest even) over whole groups of 8 bytes and the
/// exact `(Σ + 2^21) >> 22` over the rest of each row.
pub fn resize_cubic_rgb8(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if (w, h) == img.dimensions() {
        return img.clone();
    }
    let (sw, sh) = (img.width() as usize, img.height() as usize);
    let (w, h) = (w as usize, h as usize);
    let fixed = |c: [f32; 4]| c.map(|v| sat_i16(v * 2048.0));
    let xs: Vec<_> = cubic_axis(sw, w)
        .into_iter()
        .map(|(t, c)| (t, fixed(c)))
        .collect();
    let src = img.as_raw();
    let mut rows = vec![0i32; sh * w * 3];
    for sy in 0..sh {
        let row = &src[sy * sw * 3..(sy + 1) * sw * 3];
        let out = &mut rows[sy * w * 3..(sy + 1) * w * 3];
        for (x, (t, c)) in xs.iter().enumerate() {
            for ch in 0..3 {
                out[x * 3 + ch] = (0..4).map(|k| row[t[k] * 3 + ch] as i32 * c[k]).sum();
            }
        }
    }
    let n = w * 3;
    let simd_end = n / 8 * 8;
    let scale = 1.0f32 / (2048.0 * 2048.0);
    let mut out = RgbImage::new(w as u32, h as u32);
    for (y, (t, c)) in cubic_axis(sh, h).into_iter().enumerate() {
        let ib = fixed(c);
        let fb = ib.map(|b| b as f32 * scale);
        let s: [&[i32]; 4] = std::array::from_fn(|k| &rows[t[k] * n..(t[k] + 1) * n]);
        let dst = &mut out.as_mut()[y * n..(y + 1) * n];
        for (i, d) in dst.iter_mut().enumerate() {
            *d = if i < simd_end {
                let mut v = s[3][i] as f32 * fb[3];
                v += s[2][i] as f32 * fb[2];
                v += s[1][i] as f32 * fb[1];
                v += s[0][i] as f32 * fb[0];
                v.round_ties_even().clamp(0.0, 255.0) as u8
            } else {
                let v: i64 = (0..4).map(|k| s[k][i] as i64 * ib[k] as i64).sum();
                ((v + (1 << 21)) >> 22).clamp(0, 255) as u8
            };
        }
    }
    out
}

/// `cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)` for a one-channel f32 map (row-major),
/// OpenCV's generic code (IPP off): horizontal pass `((S0·a0 + S1·a1) + S2·a2) + S3·a3`;
/// vertical pass OpenCV's SSE order (`S3·b3`, then `+ S2·b2`, `+ S1·b1`, `+ S0·b0`) over whole
/// groups of 4 values and the left-to-right sum over the rest of each row.
pub fn resize_cubic_f32(src: &[f32], sw: usize, sh: usize, w: usize, h: usize) -> Vec<f32> {
    assert_eq!(src.len(), sw * sh, "map size");
    if (sw, sh) == (w, h) {
        return src.to_vec();
    }
    let xs = cubic_axis(sw, w);
    let mut rows = vec![0f32; sh * w];
    for sy in 0..sh {
        let row = &src[sy * sw..(sy + 1) * sw];
        for (x, (t, c)) in xs.iter().enumerate() {
            let mut v = row[t[0]] * c[0];
            for k in 1..4 {
                v += row[t[k]] * c[k];
            }
            rows[sy * w + x] = v;
        }
    }
    let simd_end = w / 4 * 4;
    let mut out = vec![0f32; w * h];
    for (y, (t, c)) in cubic_axis(sh, h).into_iter().enumerate() {
        let s: [&[f32]; 4] = std::array::from_fn(|k| &rows[t[k] * w..(t[k] + 1) * w]);
        for (i, d) in out[y * w..(y + 1) * w].iter_mut().enumerate() {
            *d = if i < simd_end {
                let mut v = s[3][i] * c[3];
                v += s[2][i] * c[2];
                v += s[1][i] * c[1];
                v += s[0][i] * c[0];
                v
            } else {
                let mut v = s[0][i] * c[0];
                v += s[1][i] * c[1];
                v += s[2][i] * c[2];
                v += s[3][i] * c[3];
                v
            };
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Detector
// ---------------------------------------------------------------------------------------------

/// The size the detector pads an image to: each side rounded up to a multiple of 256.
pub fn padded_size(width: u32, height: u32) -> (u32, u32) {
    (width.div_ceil(256) * 256, height.div_ceil(256) * 256)
}

/// The reference's network input image: `image` resized to [`padded_size`] with `INTER_CUBIC`.
pub fn preprocess(image: &RgbImage) -> RgbImage {
    let (wn, hn) = padded_size(image.width(), image.height());
    resize_cubic_rgb8(image, wn, hn)
}

/// The hint from the network's raw map (`model(x)[0, 0]`, `mw×mh`, row-major) for a `w×h`
/// image: `v * 127.5 + 127.5` (f32), `INTER_CUBIC` to `w×h`, `255 − u8(clip(·, 0, 255))`.
pub fn postprocess(map: &[f32], mw: usize, mh: usize, w: u32, h: u32) -> RgbImage {
    let scaled: Vec<f32> = map.iter().map(|&v| v * 127.5f32 + 127.5f32).collect();
    let line = resize_cubic_f32(&scaled, mw, mh, w as usize, h as usize);
    let mut out = RgbImage::new(w, h);
    for (p, &v) in out.pixels_mut().zip(&line) {
        let g = 255 - v.clamp(0.0, 255.0) as u8;
        p.0 = [g, g, g];
    }
    out
}

/// `lineart_anime`.
#[derive(Debug, Clone)]
pub struct LineartAnime {
    model: UnetGenerator,
    dtype: DType,
    device: Device,
}

impl LineartAnime {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dtype: vb.dtype(),
            device: vb.device().clone(),
            model: UnetGenerator::new(vb)?,
        })
    }

    pub fn generator(&self) -> &UnetGenerator {
        &self.model
    }

    /// The raw map `model(x)[0, 0]` for an already padded image (see [`preprocess`]), as f32
    /// on the host, row-major at the padded size.
    pub fn raw_map(&self, padded: &RgbImage) -> Result<Vec<f32>> {
        let x = image_tensor(padded, 127.5, 1.0, self.dtype, &self.device)?;
        let y = self.model.forward(&x)?;
        Ok(y.get(0)?
            .get(0)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }
}

impl Detector for LineartAnime {
    fn detect(&self, _preprocessor: &str, image: &RgbImage, _params: &[f64]) -> Result<RgbImage> {
        let padded = preprocess(image);
        let map = self.raw_map(&padded)?;
        let (mw, mh) = (padded.width() as usize, padded.height() as usize);
        Ok(postprocess(&map, mw, mh, image.width(), image.height()))
    }
}
