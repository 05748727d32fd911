//! Tensor operations the annotator networks need and candle lacks (or has with other numerics),
//! each defined as torch defines it; `tests/tensor_ops.rs` compares them with torch's output
//! (fixtures from `tools/parity/neural/make_tensor_ops.py`).
//!
//! All take and return NCHW tensors, on the input's device and in its dtype:
//! - bilinear resizes go to candle's own kernel (`upsample_bilinear2d*`, which follows
//!   `F.interpolate(mode="bilinear")`, size or scale-factor form, both `align_corners`; checked
//!   here against torch);
//! - bicubic resizes and adaptive average pooling are separable linear maps, so they run as two
//!   matmuls with small per-axis weight matrices built on the host (one small upload per call):
//!   `y = Mh · x · Mwᵀ`. That costs `O(in·out)` per row instead of four taps, fine for what they
//!   serve (position embeddings, pyramid pooling to 1–6 cells), not for resizing large maps;
//! - padding is an `index_select` along each axis;
//! - [`attention`] is softmax attention with its score matrix bounded in size.
use candle_core::{DType, Result, Tensor};

/// Most attention scores [`attention`] materialises at once (64 Mi values, 256 MiB in f32).
pub const ATTENTION_CHUNK_VALUES: usize = 64 << 20;

/// Where the reference applies attention's scale; it changes the rounding, so each network
/// says which its reference does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleAt {
    /// `softmax((q · s) kᵀ)` (DINOv2).
    Query,
    /// `softmax((q kᵀ) · s)` (timm's ViT, UniFormer).
    Scores,
}

/// `softmax(q kᵀ · scale) v` for `q`, `k`, `v` of shape `(b, heads, n, d)` (`k`, `v` may have
/// another `n`); the softmax runs in f32 whatever the dtype. Query rows go in chunks so that at
/// most [`ATTENTION_CHUNK_VALUES`] scores exist at once: an elongated photo can give a ViT
/// ~10k tokens (7.7 GB of ViT-L scores in one piece). Rows are independent, and at the usual
/// sizes one chunk holds them all.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, at: ScaleAt) -> Result<Tensor> {
    let (b, heads, n, _) = q.dims4()?;
    let n_keys = k.dim(2)?;
    let q = match at {
        ScaleAt::Query => (q * scale)?,
        ScaleAt::Scores => q.clone(),
    };
    let k_t = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let rows = (ATTENTION_CHUNK_VALUES / (b * heads * n_keys).max(1)).clamp(1, n.max(1));
    let mut outs = Vec::with_capacity(n.div_ceil(rows));
    for start in (0..n).step_by(rows) {
        let q = q.narrow(2, start, rows.min(n - start))?.contiguous()?;
        let mut scores = q.matmul(&k_t)?;
        if at == ScaleAt::Scores {
            scores = (scores * scale)?;
        }
        let dtype = scores.dtype();
        let weights =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        outs.push(weights.matmul(&v)?);
    }
    if outs.len() == 1 {
        Ok(outs.pop().expect("one chunk"))
    } else {
        Tensor::cat(&outs, 2)
    }
}

/// `F.interpolate(x, size=(h, w), mode="bilinear", align_corners=…)`.
pub fn interpolate_bilinear(
    x: &Tensor,
    size: (usize, usize),
    align_corners: bool,
) -> Result<Tensor> {
    x.contiguous()?
        .upsample_bilinear2d(size.0, size.1, align_corners)
}

/// `F.interpolate(x, scale_factor=(sh, sw), mode="bilinear", align_corners=…)` (torch's default
/// `recompute_scale_factor=None`: the output is `floor(in · s)` and source coordinates use `1/s`).
pub fn interpolate_bilinear_scale(
    x: &Tensor,
    scale: (f64, f64),
    align_corners: bool,
) -> Result<Tensor> {
    x.contiguous()?
        .upsample_bilinear2d_with_scale(scale.0, scale.1, align_corners)
}

/// `F.interpolate(x, size=(h, w), mode="bicubic", align_corners=…)` (no antialias).
pub fn interpolate_bicubic(
    x: &Tensor,
    size: (usize, usize),
    align_corners: bool,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mh = bicubic_matrix(h, size.0, align_corners, None);
    let mw = bicubic_matrix(w, size.1, align_corners, None);
    separable(x, &mh, size.0, &mw, size.1)
}

/// `F.interpolate(x, scale_factor=(sh, sw), mode="bicubic", align_corners=…)` with
/// `recompute_scale_factor=None` (output `floor(in · s)`, source coordinates use `1/s`).
pub fn interpolate_bicubic_scale(
    x: &Tensor,
    scale: (f64, f64),
    align_corners: bool,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (oh, ow) = (scaled_size(h, scale.0), scaled_size(w, scale.1));
    let mh = bicubic_matrix(h, oh, align_corners, Some(scale.0));
    let mw = bicubic_matrix(w, ow, align_corners, Some(scale.1));
    separable(x, &mh, oh, &mw, ow)
}

/// `F.adaptive_avg_pool2d(x, (oh, ow))`.
pub fn adaptive_avg_pool2d(x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mh = adaptive_avg_matrix(h, size.0);
    let mw = adaptive_avg_matrix(w, size.1);
    separable(x, &mh, size.0, &mw, size.1)
}

/// `F.pad(x, (left, right, top, bottom), mode="reflect")`: mirrored without repeating the edge;
/// each pad must be smaller than the side it pads (as torch requires).
pub fn reflection_pad2d(x: &Tensor, pad: (usize, usize, usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (l, r, t, b) = pad;
    if l >= w.max(1) || r >= w.max(1) || t >= h.max(1) || b >= h.max(1) {
        candle_core::bail!(
            "reflection_pad2d: padding {pad:?} must be smaller than the input {h}x{w}"
        );
    }
    let reflect = |i: isize, n: usize| -> u32 {
        let n = n as isize;
        let j = if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        };
        j as u32
    };
    pad_with(x, pad, reflect)
}

/// `F.pad(x, (left, right, top, bottom), mode="replicate")`: the edge value repeated.
pub fn replication_pad2d(x: &Tensor, pad: (usize, usize, usize, usize)) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h == 0 || w == 0 {
        candle_core::bail!("replication_pad2d: empty input {h}x{w}");
    }
    pad_with(x, pad, |i, n| i.clamp(0, n as isize - 1) as u32)
}

fn pad_with(
    x: &Tensor,
    (l, r, t, b): (usize, usize, usize, usize),
    source: impl Fn(isize, usize) -> u32,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let index = |n: usize, before: usize, after: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (-(before as isize)..(n + after) as isize)
            .map(|i| source(i, n))
            .collect();
        Tensor::from_vec(idx, n + before + after, x.device())
    };
    let x = if l + r > 0 {
        x.index_select(&index(w, l, r)?, 3)?
    } else {
        x.clone()
    };
    if t + b > 0 {
        x.index_select(&index(h, t, b)?, 2)
    } else {
        Ok(x)
    }
}

/// torch's output size for a scale factor: `floor(in · s)`.
fn scaled_size(n: usize, scale: f64) -> usize {
    (n as f64 * scale).floor() as usize
}

/// `y = Mh · x · Mwᵀ` per (n, c) plane, `mh` being `oh × h` and `mw` `ow × w` (row-major).
fn separable(x: &Tensor, mh: &[f64], oh: usize, mw: &[f64], ow: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let dtype = x.dtype();
    let matrix = |m: &[f64], rows: usize, cols: usize| -> Result<Tensor> {
        let v: Vec<f32> = m.iter().map(|&v| v as f32).collect();
        Tensor::from_vec(v, (rows, cols), x.device())?.to_dtype(dtype)
    };
    // Along W: (n·c·h, w) · Mwᵀ → (n·c, h, ow); along H: Mh · (h, ow) per plane.
    let mw_t = matrix(mw, ow, w)?.t()?;
    let y = x.contiguous()?.reshape((n * c * h, w))?.matmul(&mw_t)?;
    let y = y.reshape((n * c, h, ow))?;
    let mh = matrix(mh, oh, h)?;
    let y = mh.broadcast_matmul(&y)?;
    debug_assert_ne!(dtype, DType::U8);
    y.reshape((n, c, oh, ow))
}

/// torch's `area_pixel_compute_scale`: the step in source pixels per output pixel.
fn source_scale(n_in: usize, n_out: usize, align_corners: bool, scale: Option<f64>) -> f64 {
    if align_corners {
        if n_out > 1 {
            (n_in as f64 - 1.0) / (n_out as f64 - 1.0)
        } else {
            0.0
        }
    } else {
        match scale {
            Some(s) if s > 0.0 => 1.0 / s,
            _ => n_in as f64 / n_out as f64,
        }
    }
}

/// The `n_out × n_in` weights of torch's bicubic resize along one axis: cubic convolution with
/// A = −0.75 on the four neighbours of the (unclamped) source coordinate, indices clamped to the
/// border (so border taps add up on the edge pixel).
fn bicubic_matrix(n_in: usize, n_out: usize, align_corners: bool, scale: Option<f64>) -> Vec<f64> {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // |x| ≤ 1
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // 1 < |x| < 2
    let step = source_scale(n_in, n_out, align_corners, scale);
    let mut m = vec![0.0; n_out * n_in];
    for o in 0..n_out {
        let src = if align_corners {
            step * o as f64
        } else {
            step * (o as f64 + 0.5) - 0.5
        };
        let base = src.floor();
        let t = src - base;
        let coeffs = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
        for (k, c) in coeffs.iter().enumerate() {
            let i = (base as isize - 1 + k as isize).clamp(0, n_in as isize - 1) as usize;
            m[o * n_in + i] += c;
        }
    }
    m
}

/// The `n_out × n_in` weights of `adaptive_avg_pool` along one axis: output cell `o` averages
/// source cells `floor(o·in/out) .. ceil((o+1)·in/out)`.
fn adaptive_avg_matrix(n_in: usize, n_out: usize) -> Vec<f64> {
    let mut m = vec![0.0; n_out * n_in];
    for o in 0..n_out {
        let start = o * n_in / n_out;
        let end = ((o + 1) * n_in).div_ceil(n_out);
        let weight = 1.0 / (end - start) as f64;
        for i in start..end {
            m[o * n_in + i] = weight;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunked_attention_equals_whole() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (1, 2, 37, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, 2, 41, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, 2, 41, 8), &dev).unwrap();
        for at in [ScaleAt::Query, ScaleAt::Scores] {
            let whole = attention(&q, &k, &v, 0.3, at).unwrap();
            let s = (q.matmul(&k.t().unwrap()).unwrap() * 0.3).unwrap();
            let direct = candle_nn::ops::softmax_last_dim(&s)
                .unwrap()
                .matmul(&v)
                .unwrap();
            let d = (whole - direct).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
        }
        // A long sequence goes in several chunks and gives the rows a single chunk gives.
        let n = ATTENTION_CHUNK_VALUES / 1024 + 100;
        let q = Tensor::randn(0f32, 1., (1, 1, n, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (1, 1, 1024, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (1, 1, 1024, 4), &dev).unwrap();
        let chunked = attention(&q, &k, &v, 0.5, ScaleAt::Scores).unwrap();
        assert_eq!(chunked.dims(), &[1, 1, n, 4]);
        let tail = q.narrow(2, n - 100, 100).unwrap();
        let alone = attention(&tail, &k, &v, 0.5, ScaleAt::Scores).unwrap();
        let d = (chunked.narrow(2, n - 100, 100).unwrap() - alone)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn bicubic_rows_sum_to_one() {
        for (a, b, ac) in [(5, 9, false), (9, 5, false), (7, 16, true), (1, 4, false)] {
            let m = bicubic_matrix(a, b, ac, None);
            for row in m.chunks(a) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn adaptive_pool_of_divisible_sizes_is_avg_pool() {
        let x = Tensor::arange(0f32, 2.0 * 36.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 6, 6))
            .unwrap();
        let a = adaptive_avg_pool2d(&x, (3, 3)).unwrap();
        let b = x.avg_pool2d(2).unwrap();
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    }

    #[test]
    fn reflection_pad_mirrors_without_the_edge() {
        let x = Tensor::new(&[[[[1f32, 2., 3.]]]], &Device::Cpu).unwrap();
        let y = reflection_pad2d(&x, (2, 1, 0, 0)).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [3., 2., 1., 2., 3., 2.]);
        assert!(reflection_pad2d(&x, (3, 0, 0, 0)).is_err());
        let y = replication_pad2d(&x, (2, 1, 0, 0)).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [1., 1., 1., 2., 3., 3.]);
    }
}
