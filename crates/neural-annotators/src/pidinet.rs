//! PiDiNet soft edges (`table5_pidinet.pth`: controlnet_aux 0.0.10 `pidi.model.pidinet()`, the
//! "carv4" pixel-difference configuration with 60 base channels, `dil=24`, `sa=True`), as its
//! `PidiNetDetector` runs it; serves `softedge_pidinet`, `softedge_pidisafe` and
//! `scribble_pidinet` (none takes parameters).
//!
//! Reference steps, for the image at its detect size (`h`×`w`, RGB):
//! 1. network input: channels flipped to **BGR**, bytes `/ 255` in `float32`, `1×3×h×w`;
//! 2. [`PiDiNet::forward`]: init block and 15 `PDCBlock`s in four stages (stages 2–4 start with a
//!    2×2 max-pool and a 1×1 shortcut), per stage a CDCM (four dilated 3×3 convs), a CSAM
//!    attention and a 1×1 map reduction, each map bilinearly upsampled to `h`×`w`
//!    (`align_corners=False`), a 1×1 classifier over the four; sigmoid of all five. The edge map
//!    is the last one;
//! 3. [`edge_map_to_u8`] (host): `softedge_pidisafe` applies `safe_step`; then
//!    `(edge * 255).clip(0, 255).astype(uint8)` in `float32`;
//! 4. `scribble_pidinet`: [`annotators::post::scribble`] on that map.
//!
//! Pixel-difference convolutions are linear in their weights, so each is turned into a plain
//! depthwise (or, for the init block, dense) kernel at load time, from `createConvFunc`:
//! * `cd` (central difference): `conv(x, w, pad 1) - conv(x, Σw, pad 0)` → the centre tap minus
//!   the sum of all nine (the centre is always inside the image, so zero padding agrees);
//! * `ad` (angular difference): `w - w[[3, 0, 1, 6, 4, 2, 7, 8, 5]]` (3×3, pad 1);
//! * `rd` (radial difference): a 5×5 kernel with `w[1..]` on the outer ring positions
//!   `0, 2, 4, 10, 14, 20, 22, 24`, `-w[1..]` on the inner ring `6, 7, 8, 11, 13, 16, 17, 18`,
//!   zero elsewhere, padding `2 * dilation` (every layer of this network has dilation 1).
//!
//! Depthwise convolutions run as a sum of shifted, per-channel-scaled copies of the input (one
//! tensor op per non-zero tap), which works on every backend and dtype.
//!
//! The final `resize_image(…, image_resolution)` is the identity here (the hint stays at the
//! detect size). The hint is grey, returned as three equal channels.
use annotators::post;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use image::{GrayImage, RgbImage};

use crate::{Detector, Result};

/// Pixel-difference convolution type of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pdc {
    /// Vanilla convolution.
    Cv,
    /// Central difference.
    Cd,
    /// Angular difference.
    Ad,
    /// Radial difference.
    Rd,
}

/// The "carv4" configuration: layer 0 is the init block, layers 1–15 the `PDCBlock`s.
pub const CARV4: [Pdc; 16] = {
    use Pdc::*;
    [
        Cd, Ad, Rd, Cv, Cd, Ad, Rd, Cv, Cd, Ad, Rd, Cv, Cd, Ad, Rd, Cv,
    ]
};

/// The plain kernel equivalent to pixel-difference kernel `w` (`c_out×c_in×3×3`, row-major, as
/// `f32`) and its side: 3 for `cv`, `cd`, `ad` (padding 1), 5 for `rd` (padding 2).
pub fn plain_kernel(pdc: Pdc, w: &[f32]) -> (Vec<f32>, usize) {
    assert_eq!(w.len() % 9, 0, "pixel-difference kernels are 3x3");
    match pdc {
        Pdc::Cv => (w.to_vec(), 3),
        Pdc::Cd => {
            let mut out = w.to_vec();
            for k in out.chunks_mut(9) {
                let s: f32 = k.iter().sum();
                k[4] -= s;
            }
            (out, 3)
        }
        Pdc::Ad => {
            const PERM: [usize; 9] = [3, 0, 1, 6, 4, 2, 7, 8, 5];
            let mut out = Vec::with_capacity(w.len());
            for k in w.chunks(9) {
                out.extend((0..9).map(|i| k[i] - k[PERM[i]]));
            }
            (out, 3)
        }
        Pdc::Rd => {
            const OUTER: [usize; 8] = [0, 2, 4, 10, 14, 20, 22, 24];
            const INNER: [usize; 8] = [6, 7, 8, 11, 13, 16, 17, 18];
            let mut out = vec![0f32; w.len() / 9 * 25];
            for (k, o) in w.chunks(9).zip(out.chunks_mut(25)) {
                for j in 0..8 {
                    o[OUTER[j]] = k[j + 1];
                    o[INNER[j]] = -k[j + 1];
                }
            }
            (out, 5)
        }
    }
}

/// Reads the 3×3 weight `name` (`c_out×c_in×3×3`) and returns its plain equivalent as a tensor
/// in the builder's dtype and device, with its side.
fn load_pdc(vb: &VarBuilder, pdc: Pdc, c_out: usize, c_in: usize) -> Result<(Tensor, usize)> {
    let w = vb.get((c_out, c_in, 3, 3), "weight")?;
    let host = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (k, side) = plain_kernel(pdc, &host);
    let t = Tensor::from_vec(k, (c_out, c_in, side, side), &Device::Cpu)?
        .to_dtype(vb.dtype())?
        .to_device(vb.device())?;
    Ok((t, side))
}

/// A depthwise convolution (`groups == channels`, stride 1, dilation 1, no bias) as a sum of
/// shifted copies of the zero-padded input, one per tap that is non-zero in some channel.
#[derive(Debug, Clone)]
struct Depthwise {
    pad: usize,
    /// `(dy, dx, 1×C×1×1 weights)`.
    taps: Vec<(usize, usize, Tensor)>,
}

impl Depthwise {
    fn new(vb: &VarBuilder, pdc: Pdc, channels: usize) -> Result<Self> {
        let w = vb.get((channels, 1, 3, 3), "weight")?;
        let host = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (k, side) = plain_kernel(pdc, &host);
        let mut taps = Vec::new();
        for dy in 0..side {
            for dx in 0..side {
                let col: Vec<f32> = (0..channels)
                    .map(|c| k[c * side * side + dy * side + dx])
                    .collect();
                if col.iter().all(|&v| v == 0.0) {
                    continue;
                }
                let t = Tensor::from_vec(col, (1, channels, 1, 1), &Device::Cpu)?
                    .to_dtype(vb.dtype())?
                    .to_device(vb.device())?;
                taps.push((dy, dx, t));
            }
        }
        Ok(Self {
            pad: side / 2,
            taps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let xp = x
            .pad_with_zeros(2, self.pad, self.pad)?
            .pad_with_zeros(3, self.pad, self.pad)?;
        let mut acc: Option<Tensor> = None;
        for (dy, dx, t) in &self.taps {
            let term = xp.narrow(2, *dy, h)?.narrow(3, *dx, w)?.broadcast_mul(t)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        match acc {
            Some(a) => Ok(a),
            None => x.zeros_like(),
        }
    }
}

/// `PDCBlock` (`block{s}_{i}`): optional max-pool + shortcut, depthwise PDC `conv1`, ReLU,
/// 1×1 `conv2`, residual.
#[derive(Debug, Clone)]
struct PdcBlock {
    conv1: Depthwise,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl PdcBlock {
    fn new(vb: VarBuilder, pdc: Pdc, c_in: usize, c_out: usize, stride: usize) -> Result<Self> {
        let conv1 = Depthwise::new(&vb.pp("conv1"), pdc, c_in)?;
        let conv2 = candle_nn::conv2d_no_bias(c_in, c_out, 1, Default::default(), vb.pp("conv2"))?;
        let shortcut = if stride > 1 {
            Some(candle_nn::conv2d(
                c_in,
                c_out,
                1,
                Default::default(),
                vb.pp("shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            conv1,
            conv2,
            shortcut,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = if self.shortcut.is_some() {
            x.max_pool2d(2)?
        } else {
            x.clone()
        };
        let y = self.conv2.forward(&self.conv1.forward(&x)?.relu()?)?;
        match &self.shortcut {
            Some(s) => y + s.forward(&x)?,
            None => y + x,
        }
    }
}

/// `CDCM` (`dilations.{i}`): ReLU, 1×1 `conv1`, sum of four 3×3 convs with dilation 5, 7, 9, 11.
#[derive(Debug, Clone)]
struct Cdcm {
    conv1: Conv2d,
    conv2: [Conv2d; 4],
}

impl Cdcm {
    fn new(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        let conv1 = candle_nn::conv2d(c_in, c_out, 1, Default::default(), vb.pp("conv1"))?;
        let mk = |i: usize, d: usize| {
            let cfg = Conv2dConfig {
                padding: d,
                dilation: d,
                ..Default::default()
            };
            candle_nn::conv2d_no_bias(c_out, c_out, 3, cfg, vb.pp(format!("conv2_{i}")))
        };
        Ok(Self {
            conv1,
            conv2: [mk(1, 5)?, mk(2, 7)?, mk(3, 9)?, mk(4, 11)?],
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.conv1.forward(&x.relu()?)?;
        let mut y = self.conv2[0].forward(&x)?;
        for c in &self.conv2[1..] {
            y = (y + c.forward(&x)?)?;
        }
        Ok(y)
    }
}

/// `CSAM` (`attentions.{i}`): `x * sigmoid(conv2(conv1(relu(x))))`, 4 middle channels.
#[derive(Debug, Clone)]
struct Csam {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl Csam {
    fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let conv1 = candle_nn::conv2d(channels, 4, 1, Default::default(), vb.pp("conv1"))?;
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv2 = candle_nn::conv2d_no_bias(4, 1, 3, cfg, vb.pp("conv2"))?;
        Ok(Self { conv1, conv2 })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.conv2.forward(&self.conv1.forward(&x.relu()?)?)?;
        x.broadcast_mul(&candle_nn::ops::sigmoid(&y)?)
    }
}

/// `pidinet()`: weights named as in its `state_dict` with the `module.` prefixes removed
/// (`init_block.weight`, `block1_1.conv1.weight`, `dilations.0.conv2_1.weight`, `classifier.bias`…).
#[derive(Debug, Clone)]
pub struct PiDiNet {
    init_block: Tensor,
    init_pad: usize,
    stages: Vec<Vec<PdcBlock>>,
    dilations: Vec<Cdcm>,
    attentions: Vec<Csam>,
    conv_reduces: Vec<Conv2d>,
    classifier: Conv2d,
    device: Device,
    dtype: DType,
}

impl PiDiNet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let c = 60;
        let dil = 24;
        let (init_block, side) = load_pdc(&vb.pp("init_block"), CARV4[0], c, 3)?;
        // (stage, in, out) and the number of blocks; the first block of stages 2-4 has stride 2.
        let fuse = [c, 2 * c, 4 * c, 4 * c];
        let stage_in = [c, c, 2 * c, 4 * c];
        let counts = [3, 4, 4, 4];
        let mut stages = Vec::with_capacity(4);
        let mut layer = 1;
        for s in 0..4 {
            let mut blocks = Vec::with_capacity(counts[s]);
            for i in 0..counts[s] {
                let (c_in, stride) = if i == 0 {
                    (stage_in[s], if s == 0 { 1 } else { 2 })
                } else {
                    (fuse[s], 1)
                };
                let name = format!("block{}_{}", s + 1, i + 1);
                blocks.push(PdcBlock::new(
                    vb.pp(name),
                    CARV4[layer],
                    c_in,
                    fuse[s],
                    stride,
                )?);
                layer += 1;
            }
            stages.push(blocks);
        }
        let mut dilations = Vec::with_capacity(4);
        let mut attentions = Vec::with_capacity(4);
        let mut conv_reduces = Vec::with_capacity(4);
        for (i, &f) in fuse.iter().enumerate() {
            dilations.push(Cdcm::new(vb.pp(format!("dilations.{i}")), f, dil)?);
            attentions.push(Csam::new(vb.pp(format!("attentions.{i}")), dil)?);
            conv_reduces.push(candle_nn::conv2d(
                dil,
                1,
                1,
                Default::default(),
                vb.pp(format!("conv_reduces.{i}.conv")),
            )?);
        }
        let classifier = candle_nn::conv2d(4, 1, 1, Default::default(), vb.pp("classifier"))?;
        Ok(Self {
            init_block,
            init_pad: side / 2,
            stages,
            dilations,
            attentions,
            conv_reduces,
            classifier,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The five sigmoid maps for `x` (`1×3×h×w`, BGR in 0..1, on the network's device and
    /// dtype), each `1×1×h×w`: the four side maps and the fused one (the edge map, last).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        self.forward_logits(x)?
            .iter()
            .map(candle_nn::ops::sigmoid)
            .collect()
    }

    /// [`PiDiNet::forward`] before its sigmoids.
    pub fn forward_logits(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        let mut t = x.conv2d(&self.init_block, self.init_pad, 1, 1, 1)?;
        let mut side = Vec::with_capacity(4);
        for (i, stage) in self.stages.iter().enumerate() {
            for block in stage {
                t = block.forward(&t)?;
            }
            let f = self.attentions[i].forward(&self.dilations[i].forward(&t)?)?;
            let e = self.conv_reduces[i].forward(&f)?;
            let (_, _, eh, ew) = e.dims4()?;
            side.push(if (eh, ew) == (h, w) {
                e
            } else {
                e.upsample_bilinear2d(h, w, false)?
            });
        }
        let fused = self.classifier.forward(&Tensor::cat(&side, 1)?)?;
        side.push(fused);
        Ok(side)
    }

    /// Runs the network on an RGB image (flipped to BGR and scaled here) and returns the edge
    /// map (the last output) on the host as `f32`, row-major `h×w`.
    pub fn edge_map(&self, image: &RgbImage) -> Result<Vec<f32>> {
        let logits = self.forward_logits(&self.input(image)?)?;
        let edge = candle_nn::ops::sigmoid(logits.last().expect("five outputs"))?;
        Ok(edge.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The edge map before its sigmoid (the fused classifier output), on the host as `f32`.
    pub fn edge_logits(&self, image: &RgbImage) -> Result<Vec<f32>> {
        let logits = self.forward_logits(&self.input(image)?)?;
        let edge = logits.last().expect("five outputs");
        Ok(edge.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The network input for an RGB image: `1×3×h×w`, BGR, `byte / 255`, on the device.
    fn input(&self, image: &RgbImage) -> Result<Tensor> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let raw = image.as_raw();
        // Planar BGR bytes: the channel flip happens while laying out the upload.
        let mut planar = vec![0u8; 3 * h * w];
        for (c, plane) in planar.chunks_mut(h * w).enumerate() {
            for (i, v) in plane.iter_mut().enumerate() {
                *v = raw[i * 3 + (2 - c)];
            }
        }
        let x = Tensor::from_vec(planar, (1, 3, h, w), &self.device)?.to_dtype(self.dtype)?;
        let scale = Tensor::new(255f32, &self.device)?.to_dtype(self.dtype)?;
        Ok(x.broadcast_div(&scale)?)
    }
}

/// Step 3 of the module docs: the grey `u8` map from PiDiNet's edge map (`width`×`height`,
/// row-major `f32` in 0..1); `safe` applies `safe_step`.
pub fn edge_map_to_u8(edge: &[f32], width: usize, height: usize, safe: bool) -> GrayImage {
    assert_eq!(
        edge.len(),
        width * height,
        "edge map is not {width}x{height}"
    );
    let data = edge
        .iter()
        .map(|&e| post::unit_to_u8(if safe { post::safe_step(e) } else { e }))
        .collect();
    GrayImage::from_raw(width as u32, height as u32, data).expect("buffer size")
}

/// The grey hint of `preprocessor` from PiDiNet's edge map (steps 3–4).
pub fn hint_from_edge_map(
    preprocessor: &str,
    edge: &[f32],
    width: usize,
    height: usize,
) -> Result<GrayImage> {
    Ok(match preprocessor {
        "softedge_pidinet" => edge_map_to_u8(edge, width, height, false),
        "softedge_pidisafe" => edge_map_to_u8(edge, width, height, true),
        "scribble_pidinet" => post::scribble(&edge_map_to_u8(edge, width, height, false)),
        other => {
            return Err(diffusion::Error::Config(format!(
                "PiDiNet does not serve `{other}`"
            )))
        }
    })
}

impl Detector for PiDiNet {
    fn detect(&self, preprocessor: &str, image: &RgbImage, _params: &[f64]) -> Result<RgbImage> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let edge = self.edge_map(image)?;
        let grey = hint_from_edge_map(preprocessor, &edge, w, h)?;
        Ok(post::gray_to_rgb(&grey))
    }
}
