//! 2-D convolution with candle_nn's `Conv2d` interface and a faster CPU path for the stride-1
//! 3×3 (padding 1) and 1×1 (padding 0) convolutions that make up most of a UNet step.
//!
//! candle's CPU convolution (its tiled im2col) reorders the input to NHWC and the weights to
//! `[c_out, kh, kw, c_in]` on every call — for a 1280-channel 3×3 layer that is 59 MB of
//! weights copied per call — then gathers each tile's patches element by element and writes
//! the result back element by element. Here the weights are used as stored: `[c_out, c_in, kh,
//! kw]` is already the `[c_out, c_in·kh·kw]` matrix of an NCHW im2col. The input is unfolded
//! once per call with whole-row copies (3×3; a 1×1 needs no unfolding at all), and one matmul
//! per image writes `[c_out, h·w]`, which is NCHW, so nothing is copied back.
//!
//! Batch invariance (README, "Seeds"): each image is its own matmul of the same shape whatever
//! the batch (candle loops over a stride-0 lhs batch), so an image's sums do not depend on what
//! shares its batch. Numerics: the same products as candle's and torch's convolution, summed in
//! another order (c_in-major), which the parity tests' tolerances cover.
//!
//! Other devices, dtypes and shapes (strides, CUDA, bf16) take candle's convolution.
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    config: Conv2dConfig,
}

/// As `candle_nn::conv2d` (the same weights, and the same initialisation hints for weight
/// sources that make up values: the embedded model, training).
pub fn conv2d(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    Ok(candle_nn::conv2d(c_in, c_out, kernel, config, vb)?.into())
}

impl From<candle_nn::Conv2d> for Conv2d {
    fn from(conv: candle_nn::Conv2d) -> Self {
        Self::new(conv.weight().clone(), conv.bias().cloned(), *conv.config())
    }
}

impl Conv2d {
    pub fn new(weight: Tensor, bias: Option<Tensor>, config: Conv2dConfig) -> Self {
        Self {
            weight,
            bias,
            config,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The fast path's kernel size (3 or 1), when it applies to `x`.
    fn fast_kernel(&self, x: &Tensor) -> Option<usize> {
        let c = &self.config;
        let (_, _, kh, kw) = self.weight.dims4().ok()?;
        let plain = c.stride == 1 && c.dilation == 1 && c.groups == 1 && kh == kw;
        let padding_fits = (kh == 3 && c.padding == 1) || (kh == 1 && c.padding == 0);
        let dtype_fits = matches!(x.dtype(), DType::F32 | DType::F16);
        (x.device().is_cpu()
            && x.rank() == 4
            && plain
            && padding_fits
            && dtype_fits
            && self.weight.dtype() == x.dtype())
        .then_some(kh)
    }

    fn forward_unfolded(&self, x: &Tensor, kernel: usize) -> Result<Tensor> {
        let (b, c_in, h, w) = x.dims4()?;
        let c_out = self.weight.dim(0)?;
        let x = x.contiguous()?;
        let depth = c_in * kernel * kernel;
        let weight = self
            .weight
            .contiguous()?
            .reshape((1, c_out, depth))?
            .broadcast_as((b, c_out, depth))?;
        if kernel == 1 {
            let columns = x.reshape((b, c_in, h * w))?;
            return weight.matmul(&columns)?.reshape((b, c_out, h, w));
        }
        // Bands of output rows, so that an image's unfolded input stays within
        // UNFOLD_ELEMENTS (a VAE decoder layer at 512×512 would otherwise unfold to 1.2 GB).
        // The bands depend on the image's shape alone, never on the batch.
        let rows = (UNFOLD_ELEMENTS / (depth * w)).clamp(1, h);
        let mut bands = Vec::with_capacity(h.div_ceil(rows));
        for top in (0..h).step_by(rows) {
            let band = Unfold3x3 {
                rows: top..(top + rows).min(h),
            };
            bands.push(weight.matmul(&x.apply_op1(band)?)?);
        }
        Tensor::cat(&bands, 2)?.reshape((b, c_out, h, w))
    }
}

/// The most elements of one image's unfolded input (3×3), 16 MB in f32: the UNet's layers at a
/// 32×32 latent (256 px) unfold in one piece; larger planes go in bands of rows.
const UNFOLD_ELEMENTS: usize = 4 << 20;

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kernel = self.weight.dim(3)?;
        let _timing = crate::profile::scope(match (kernel, self.config.stride) {
            (3, 1) => "conv 3x3",
            (1, 1) => "conv 1x1",
            _ => "conv, strided (downsamplers, hint encoder)",
        });
        let y = match self.fast_kernel(x) {
            Some(kernel) => self.forward_unfolded(x, kernel)?,
            None => x.conv2d(
                &self.weight,
                self.config.padding,
                self.config.stride,
                self.config.dilation,
                self.config.groups,
            )?,
        };
        match &self.bias {
            None => Ok(y),
            Some(bias) => y.broadcast_add(&bias.reshape((1, (), 1, 1))?),
        }
    }
}

/// `[b, c, h, w]` → `[b, c·9, r·w]` for the output rows `rows` (`r` of them): row
/// `c·9 + kh·3 + kw` holds the input shifted by `(kh − 1, kw − 1)`, zeros outside (padding 1),
/// i.e. the 3×3 patches of those output pixels, NCHW im2col.
struct Unfold3x3 {
    rows: std::ops::Range<usize>,
}

/// Where patch entry `shift` (`kh·3 + kw`) of output row `oy` comes from: the input row, and
/// the columns that overlap, in the patch row and in the input row (the rest is padding).
/// `None` where the whole row is padding. Shared by the unfold and its adjoint, the fold.
fn shifted_row(
    shift: usize,
    oy: usize,
    h: usize,
    w: usize,
) -> Option<(usize, std::ops::Range<usize>, std::ops::Range<usize>)> {
    let (dy, dx) = (shift / 3, shift % 3);
    let iy = (oy + dy).checked_sub(1).filter(|&iy| iy < h)?;
    let (patch, input) = match dx {
        0 => (1..w, 0..w - 1),
        1 => (0..w, 0..w),
        _ => (0..w - 1, 1..w),
    };
    Some((iy, patch, input))
}

fn unfold3x3<T: Copy + Default + Send + Sync>(
    src: &[T],
    (b, c, h, w): (usize, usize, usize, usize),
    rows: std::ops::Range<usize>,
) -> Vec<T> {
    let plane = h * w;
    let band = rows.len() * w;
    let mut out = vec![T::default(); b * c * 9 * band];
    // One input plane → its 9 shifted copies, planes in parallel.
    out.par_chunks_mut(9 * band)
        .zip(src.par_chunks(plane))
        .for_each(|(dst, src)| {
            for (shift, dst) in dst.chunks_mut(band).enumerate() {
                for (row, oy) in rows.clone().enumerate() {
                    // Rows outside the input stay zero.
                    if let Some((iy, patch, input)) = shifted_row(shift, oy, h, w) {
                        dst[row * w..(row + 1) * w][patch]
                            .copy_from_slice(&src[iy * w..(iy + 1) * w][input]);
                    }
                }
            }
        });
    out
}

impl CustomOp1 for Unfold3x3 {
    fn name(&self) -> &'static str {
        "unfold3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims4()?;
        let (b, c, h, w) = dims;
        if self.rows.end > h || self.rows.is_empty() {
            candle_core::bail!("unfold3x3: rows {:?} of {h}", self.rows);
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("unfold3x3: the input must be contiguous");
        };
        let rows = self.rows.clone();
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(unfold3x3(&v[start..end], dims, rows)),
            CpuStorage::F16(v) => CpuStorage::F16(unfold3x3(&v[start..end], dims, rows)),
            s => candle_core::bail!("unfold3x3: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from((b, c * 9, self.rows.len() * w))))
    }

    /// The gradient of an unfold is a fold: each input pixel gathers the gradients of the
    /// patch entries it was copied to (training runs through the fast path too, so a model
    /// computes the same forward whether or not it is being trained).
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        let fold = Fold3x3 {
            rows: self.rows.clone(),
            h,
            w,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&fold)?))
    }
}

/// The adjoint of [`Unfold3x3`]: `[b, c·9, r·w]` → `[b, c, h, w]`, each entry added back to
/// the input pixel it was copied from.
struct Fold3x3 {
    rows: std::ops::Range<usize>,
    h: usize,
    w: usize,
}

fn fold3x3<T: Copy + Default + Send + Sync + std::ops::AddAssign>(
    src: &[T],
    c_total: usize,
    (h, w): (usize, usize),
    rows: std::ops::Range<usize>,
) -> Vec<T> {
    let plane = h * w;
    let band = rows.len() * w;
    let mut out = vec![T::default(); c_total * plane];
    out.par_chunks_mut(plane)
        .zip(src.par_chunks(9 * band))
        .for_each(|(dst, src)| {
            for (shift, src) in src.chunks(band).enumerate() {
                for (row, oy) in rows.clone().enumerate() {
                    if let Some((iy, patch, input)) = shifted_row(shift, oy, h, w) {
                        let dst = &mut dst[iy * w..(iy + 1) * w][input];
                        for (d, &s) in dst.iter_mut().zip(&src[row * w..(row + 1) * w][patch]) {
                            *d += s;
                        }
                    }
                }
            }
        });
    out
}

impl CustomOp1 for Fold3x3 {
    fn name(&self) -> &'static str {
        "fold3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c9, _) = layout.shape().dims3()?;
        let (h, w) = (self.h, self.w);
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fold3x3: the gradient must be contiguous");
        };
        let rows = self.rows.clone();
        let planes = b * c9 / 9;
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(fold3x3(&v[start..end], planes, (h, w), rows)),
            CpuStorage::F16(v) => CpuStorage::F16(fold3x3(&v[start..end], planes, (h, w), rows)),
            s => candle_core::bail!("fold3x3: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, Shape::from((b, c9 / 9, h, w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fast path against candle's convolution (direct sums), 3×3 and 1×1, with a bias,
    /// a batch, non-square planes and a one-pixel-wide edge case.
    #[test]
    fn the_fast_path_is_candles_convolution() -> Result<()> {
        let dev = Device::Cpu;
        for (kernel, padding) in [(3, 1), (1, 0)] {
            // The last one unfolds in bands of rows (64·9·w·rows > UNFOLD_ELEMENTS).
            for (b, c_in, c_out, h, w) in [
                (2, 5, 7, 6, 9),
                (1, 3, 4, 1, 1),
                (3, 4, 2, 2, 5),
                (2, 64, 3, 97, 83),
            ] {
                let n = (b * c_in * h * w) as f32;
                let x = Tensor::arange(0f32, n, &dev)?
                    .affine(0.37, -1.0)?
                    .sin()?
                    .reshape((b, c_in, h, w))?;
                let wn = (c_out * c_in * kernel * kernel) as f32;
                let weight = Tensor::arange(0f32, wn, &dev)?
                    .affine(0.11, 0.5)?
                    .cos()?
                    .reshape((c_out, c_in, kernel, kernel))?;
                let bias = Tensor::arange(0f32, c_out as f32, &dev)?.affine(0.3, -0.4)?;
                let config = Conv2dConfig {
                    padding,
                    ..Default::default()
                };
                let conv = Conv2d::new(weight.clone(), Some(bias.clone()), config);
                assert_eq!(conv.fast_kernel(&x), Some(kernel));
                let ours = conv.forward(&x)?;
                let theirs = x
                    .conv2d(&weight, padding, 1, 1, 1)?
                    .broadcast_add(&bias.reshape((1, (), 1, 1))?)?;
                assert_eq!(ours.dims(), theirs.dims());
                let diff = (ours - &theirs)?.abs()?.flatten_all()?.max(0)?;
                let scale = theirs.abs()?.flatten_all()?.max(0)?;
                let rel = diff.to_scalar::<f32>()? / scale.to_scalar::<f32>()?;
                assert!(rel < 1e-5, "k {kernel} {b}x{c_in}x{h}x{w}: {rel}");
                // f16 takes the same path.
                let half = Conv2d::new(
                    weight.to_dtype(DType::F16)?,
                    Some(bias.to_dtype(DType::F16)?),
                    config,
                );
                let y = half
                    .forward(&x.to_dtype(DType::F16)?)?
                    .to_dtype(DType::F32)?;
                let diff = (y - &theirs)?.abs()?.flatten_all()?.max(0)?;
                assert!(diff.to_scalar::<f32>()? / scale.to_scalar::<f32>()? < 5e-3);
            }
        }
        Ok(())
    }

    /// An image's output is the same to the bit alone and in a batch (README, "Seeds").
    #[test]
    fn an_image_is_the_same_alone_and_in_a_batch() -> Result<()> {
        use candle_core::IndexOp;
        let dev = Device::Cpu;
        for (kernel, padding, c_in, h, w) in
            [(3, 1, 64, 97, 83), (3, 1, 8, 16, 16), (1, 0, 40, 9, 7)]
        {
            let n = (4 * c_in * h * w) as f32;
            let x = Tensor::arange(0f32, n, &dev)?
                .affine(0.013, 0.2)?
                .sin()?
                .reshape((4, c_in, h, w))?;
            let wn = (5 * c_in * kernel * kernel) as f32;
            let weight = Tensor::arange(0f32, wn, &dev)?
                .affine(0.07, 0.1)?
                .cos()?
                .reshape((5, c_in, kernel, kernel))?;
            let config = Conv2dConfig {
                padding,
                ..Default::default()
            };
            let conv = Conv2d::new(weight, None, config);
            let batch = conv.forward(&x)?;
            for i in 0..4 {
                let alone = conv.forward(&x.i(i..i + 1)?)?;
                let same = alone
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .zip(batch.i(i..i + 1)?.flatten_all()?.to_vec1::<f32>()?)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "image {i} of k {kernel} {c_in}x{h}x{w}");
            }
        }
        Ok(())
    }

    /// Gradients through the fast path (input and weight) equal those through candle's.
    #[test]
    fn gradients_match_candles_convolution() -> Result<()> {
        use candle_core::Var;
        let dev = Device::Cpu;
        for (kernel, padding, c_in, h, w) in [(3, 1, 64, 97, 83), (3, 1, 3, 5, 4), (1, 0, 6, 4, 5)]
        {
            let n = (2 * c_in * h * w) as f32;
            let x = Var::from_tensor(
                &Tensor::arange(0f32, n, &dev)?
                    .affine(0.031, 0.2)?
                    .sin()?
                    .reshape((2, c_in, h, w))?,
            )?;
            let wn = (3 * c_in * kernel * kernel) as f32;
            let weight = Var::from_tensor(
                &Tensor::arange(0f32, wn, &dev)?
                    .affine(0.07, 0.1)?
                    .cos()?
                    .reshape((3, c_in, kernel, kernel))?,
            )?;
            let config = Conv2dConfig {
                padding,
                ..Default::default()
            };
            let conv = Conv2d::new(weight.as_tensor().clone(), None, config);
            assert_eq!(conv.fast_kernel(x.as_tensor()), Some(kernel));
            // A loss that weighs every output differently.
            let loss = |y: Tensor| -> Result<Tensor> { y.sqr()?.sum_all() };
            let ours = loss(conv.forward(x.as_tensor())?)?.backward()?;
            let theirs =
                loss(x.as_tensor().conv2d(weight.as_tensor(), padding, 1, 1, 1)?)?.backward()?;
            for v in [&x, &weight] {
                let (a, b) = (ours.get(v).unwrap(), theirs.get(v).unwrap());
                let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(
                    diff / scale < 1e-5,
                    "k {kernel} {c_in}x{h}x{w}: {}",
                    diff / scale
                );
            }
        }
        Ok(())
    }

    /// Strided, dilated, grouped and other-padding convolutions keep candle's path.
    #[test]
    fn other_shapes_take_candles_path() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev)?;
        let w3 = Tensor::zeros((4, 4, 3, 3), DType::F32, &dev)?;
        let w_grouped = Tensor::zeros((4, 2, 3, 3), DType::F32, &dev)?;
        for (weight, config) in [
            (
                &w3,
                Conv2dConfig {
                    padding: 1,
                    stride: 2,
                    ..Default::default()
                },
            ),
            (
                &w3,
                Conv2dConfig {
                    padding: 0,
                    ..Default::default()
                },
            ),
            (
                &w3,
                Conv2dConfig {
                    padding: 2,
                    dilation: 2,
                    ..Default::default()
                },
            ),
            (
                &w_grouped,
                Conv2dConfig {
                    padding: 1,
                    groups: 2,
                    ..Default::default()
                },
            ),
        ] {
            let conv = Conv2d::new(weight.clone(), None, config);
            assert_eq!(conv.fast_kernel(&x), None, "{config:?}");
            conv.forward(&x)?;
        }
        Ok(())
    }
}
