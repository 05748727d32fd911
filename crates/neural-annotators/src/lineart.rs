//! `lineart_realistic` (`sk_model.pth`) and `lineart_coarse` (`sk_model2.pth`): controlnet_aux
//! 0.0.10 `lineart.Generator(3, 1, 3)` and `LineartDetector.__call__`.
//!
//! Network (state_dict names in brackets; every norm is `InstanceNorm2d` with its defaults:
//! no affine parameters, no running statistics, biased variance, eps 1e-5):
//!
//! ```text
//! model0  ReflectionPad(3), Conv 3→64 7×7 [model0.1], IN, ReLU
//! model1  Conv 64→128 3×3 s2 p1 [model1.0], IN, ReLU, Conv 128→256 3×3 s2 p1 [model1.3], IN, ReLU
//! model2  3 × ResidualBlock(256) [model2.{i}]: x + (RPad1, Conv [conv_block.1], IN, ReLU,
//!                                                   RPad1, Conv [conv_block.5], IN)(x)
//! model3  ConvT 256→128 3×3 s2 p1 op1 [model3.0], IN, ReLU, ConvT 128→64 … [model3.3], IN, ReLU
//! model4  ReflectionPad(3), Conv 64→1 7×7 [model4.1], Sigmoid
//! ```
//!
//! Detector (the input is already at its detect size, a multiple of 64 on each side, so the
//! output has the input's size): `x = u8 / 255` (f32), `line = model(x)[0][0]`,
//! `u8(clip(line * 255, 0, 255))` (truncating), then the hint is `255 − that`, grey as RGB.
//! controlnet_aux's final `INTER_LINEAR` resize to `image_resolution` is the identity here.
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, VarBuilder};
use image::RgbImage;

use crate::{Detector, Result};

/// `nn.ReflectionPad2d(pad)` on an NCHW tensor: the edge row/column is not repeated
/// (`dcb|abcd|cba`). Requires `pad < H` and `pad < W`, as PyTorch does.
pub fn reflection_pad2d(x: &Tensor, pad: usize) -> candle_core::Result<Tensor> {
    if pad == 0 {
        return Ok(x.clone());
    }
    let (_, _, h, w) = x.dims4()?;
    if pad >= h || pad >= w {
        candle_core::bail!("reflection pad {pad} needs a size above it, got {h}x{w}")
    }
    let index = |n: usize| -> candle_core::Result<Tensor> {
        let ids: Vec<u32> = (0..n + 2 * pad)
            .map(|i| {
                let i = i as i64 - pad as i64;
                let n = n as i64;
                let j = if i < 0 {
                    -i
                } else if i >= n {
                    2 * n - 2 - i
                } else {
                    i
                };
                j as u32
            })
            .collect();
        Tensor::from_vec(ids, n + 2 * pad, x.device())
    };
    x.index_select(&index(w)?, 3)?.index_select(&index(h)?, 2)
}

/// `nn.InstanceNorm2d(c)` with `affine=False, track_running_stats=False` (eval and train alike):
/// per sample and channel, `(x − mean) / sqrt(var + eps)` over H×W with the biased variance.
/// Statistics are computed in two passes, in f32 for f16/bf16 tensors; the result has the
/// input's dtype.
pub fn instance_norm(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let stats = match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    };
    let (n, c, h, w) = x.dims4()?;
    let xf = x.to_dtype(stats)?.reshape((n, c, h * w))?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + eps)?.sqrt()?.recip()?;
    xc.broadcast_mul(&inv)?
        .reshape((n, c, h, w))?
        .to_dtype(dtype)
}

const IN_EPS: f64 = 1e-5;

fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(candle_nn::conv2d(cin, cout, k, cfg, vb)?)
}

fn conv_t(vb: VarBuilder, cin: usize, cout: usize) -> Result<ConvTranspose2d> {
    let cfg = ConvTranspose2dConfig {
        padding: 1,
        output_padding: 1,
        stride: 2,
        dilation: 1,
    };
    Ok(candle_nn::conv_transpose2d(cin, cout, 3, cfg, vb)?)
}

#[derive(Debug, Clone)]
struct ResidualBlock {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl ResidualBlock {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            conv1: conv(vb.pp("conv_block.1"), c, c, 3, 1, 0)?,
            conv2: conv(vb.pp("conv_block.5"), c, c, 3, 1, 0)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = instance_norm(&self.conv1.forward(&reflection_pad2d(x, 1)?)?, IN_EPS)?.relu()?;
        let y = instance_norm(&self.conv2.forward(&reflection_pad2d(&y, 1)?)?, IN_EPS)?;
        x + y
    }
}

/// controlnet_aux `lineart.Generator(3, 1, n_residual_blocks=3, sigmoid=True)`.
#[derive(Debug, Clone)]
pub struct Generator {
    model0: Conv2d,
    model1: [Conv2d; 2],
    model2: Vec<ResidualBlock>,
    model3: [ConvTranspose2d; 2],
    model4: Conv2d,
}

impl Generator {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            model0: conv(vb.pp("model0.1"), 3, 64, 7, 1, 0)?,
            model1: [
                conv(vb.pp("model1.0"), 64, 128, 3, 2, 1)?,
                conv(vb.pp("model1.3"), 128, 256, 3, 2, 1)?,
            ],
            model2: (0..3)
                .map(|i| ResidualBlock::new(vb.pp(format!("model2.{i}")), 256))
                .collect::<Result<_>>()?,
            model3: [
                conv_t(vb.pp("model3.0"), 256, 128)?,
                conv_t(vb.pp("model3.3"), 128, 64)?,
            ],
            model4: conv(vb.pp("model4.1"), 64, 1, 7, 1, 0)?,
        })
    }

    /// `x`: (N, 3, H, W) in [0, 1]; returns (N, 1, H', W') in (0, 1), `H' = H` when `H % 4 == 0`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let norm_relu = |t: Tensor| instance_norm(&t, IN_EPS)?.relu();
        let mut y = norm_relu(self.model0.forward(&reflection_pad2d(x, 3)?)?)?;
        for c in &self.model1 {
            y = norm_relu(c.forward(&y)?)?;
        }
        for b in &self.model2 {
            y = b.forward(&y)?;
        }
        for c in &self.model3 {
            y = norm_relu(c.forward(&y)?)?;
        }
        candle_nn::ops::sigmoid(&self.model4.forward(&reflection_pad2d(&y, 3)?)?)
    }
}

/// An RGB image as a (1, 3, H, W) f32 tensor of `u8 as f32 / div - sub` (f32 arithmetic, as
/// torch does `image.float() / div - sub`), on `device` as `dtype`.
pub fn image_tensor(
    img: &RgbImage,
    div: f32,
    sub: f32,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / div - sub).collect();
    Tensor::from_vec(data, (1, h, w, 3), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .contiguous()?
        .to_device(device)?
        .to_dtype(dtype)
}

/// A (H, W) float map (row-major) as an inverted hint: each value `v` becomes
/// `255 − u8(clip(v * 255, 0, 255))` (`astype(uint8)` truncates), repeated over RGB.
pub fn postprocess(map: &[f32], width: u32, height: u32) -> RgbImage {
    assert_eq!(map.len(), width as usize * height as usize, "map size");
    let mut out = RgbImage::new(width, height);
    for (p, &v) in out.pixels_mut().zip(map) {
        let g = 255 - (v * 255.0f32).clamp(0.0, 255.0) as u8;
        p.0 = [g, g, g];
    }
    out
}

/// `lineart_realistic` / `lineart_coarse`: which one is decided by the weight file it was built
/// from.
#[derive(Debug, Clone)]
pub struct Lineart {
    model: Generator,
    dtype: DType,
    device: Device,
}

impl Lineart {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            dtype: vb.dtype(),
            device: vb.device().clone(),
            model: Generator::new(vb)?,
        })
    }

    pub fn generator(&self) -> &Generator {
        &self.model
    }

    /// The network's map (the reference's `model(image)[0][0]`) for `image`, as f32 on the host.
    pub fn line_map(&self, image: &RgbImage) -> Result<Vec<f32>> {
        let x = image_tensor(image, 255.0, 0.0, self.dtype, &self.device)?;
        let y = self.model.forward(&x)?;
        let (_, _, h, w) = y.dims4()?;
        if (h, w) != (image.height() as usize, image.width() as usize) {
            return Err(diffusion::Error::Config(format!(
                "lineart: a {}x{} image gives a {w}x{h} map; detect sizes must be multiples of 4",
                image.width(),
                image.height()
            )));
        }
        Ok(y.get(0)?
            .get(0)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    }
}

impl Detector for Lineart {
    fn detect(&self, _preprocessor: &str, image: &RgbImage, _params: &[f64]) -> Result<RgbImage> {
        let map = self.line_map(image)?;
        Ok(postprocess(&map, image.width(), image.height()))
    }
}
