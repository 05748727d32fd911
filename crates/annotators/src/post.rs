//! Post-processing shared by the neural annotators (crate `neural-annotators`): the steps of
//! controlnet_aux 0.0.10 that turn a network's float map into a hint, on the CPU.
//!
//! These steps are discontinuous (truncation to `u8`, thresholds, local-maximum tests), so they
//! follow the reference's arithmetic step by step, in the same precision and order:
//!
//! * [`resize_linear_f32`] — `cv2.resize(map, (w, h), interpolation=cv2.INTER_LINEAR)` for a
//!   one-channel `float32` map: float coefficients, horizontal pass then vertical pass, each
//!   `a * wa + b * wb` rounded per operation (no fused multiply-add, as OpenCV's baseline code).
//! * [`safe_step`] — `util.safe_step(x, 2)`.
//! * [`unit_to_u8`] — `(x * 255.0).clip(0, 255).astype(np.uint8)` (truncation).
//! * [`nms`] — `util.nms(x, t, s)`: [`gaussian_blur_f32_cv`] σ `s`, then a pixel is kept
//!   where it is the maximum of any of the four 3-pixel lines through it (horizontal, vertical,
//!   two diagonals) — `cv2.dilate(x, f) == x`, neighbours outside the image ignored — and the
//!   kept pixels above `t` become 255.
//! * [`gaussian_blur_u8`] — `cv2.GaussianBlur` on `uint8`, which OpenCV computes bit-exactly in
//!   fixed point (8 fractional bits per kernel tap); this is that computation.
//! * [`scribble`] — the scribble step of the HED / PiDiNet detectors: `nms(map, 127, 3.0)`,
//!   `cv2.GaussianBlur(σ 3)` on the `uint8` result, `> 4` becomes 255, the rest 0.
//!
//! [`nms`] decides local maxima by exact float equality, and saturated maps are full of values
//! a few ulps apart, so its Gaussian must be OpenCV's to the bit: [`gaussian_blur_f32_cv`]
//! reproduces the summation order and fused multiply-adds of OpenCV 4.x's AVX2 `sepFilter2D`
//! path (what `cv2.GaussianBlur` runs for `float32` on an x86-64 CPU with AVX2/FMA, with or
//! without IPP); measured bit-equal on the parity fixtures. (On a CPU without FMA OpenCV would
//! round each product; the reference fixtures were made on an AVX2 machine.)
use image::GrayImage;

use crate::ops::{gaussian_kernel, gaussian_ksize};

/// `cv2.resize(src, (dw, dh), interpolation=cv2.INTER_LINEAR)` for a one-channel `float32`
/// image `src` of `sw`×`sh` (row-major). Same size returns a copy, as OpenCV does.
pub fn resize_linear_f32(src: &[f32], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<f32> {
    assert_eq!(
        src.len(),
        sw * sh,
        "resize_linear_f32: buffer is not {sw}x{sh}"
    );
    if sw == dw && sh == dh {
        return src.to_vec();
    }
    let xtab = linear_taps(sw, dw);
    let ytab = linear_taps(sh, dh);
    // Horizontal pass over every source row (OpenCV buffers only the rows it needs; the values
    // are the same).
    let mut rows = vec![0f32; sh * dw];
    for y in 0..sh {
        let s = &src[y * sw..(y + 1) * sw];
        let d = &mut rows[y * dw..(y + 1) * dw];
        for (dx, &(sx, a0, a1)) in xtab.iter().enumerate() {
            d[dx] = if sx + 1 < sw {
                s[sx] * a0 + s[sx + 1] * a1
            } else {
                s[sx]
            };
        }
    }
    let mut out = vec![0f32; dw * dh];
    for (dy, &(sy, b0, b1)) in ytab.iter().enumerate() {
        let r0 = &rows[sy * dw..(sy + 1) * dw];
        let r1 = &rows[(sy + 1).min(sh - 1) * dw..((sy + 1).min(sh - 1) + 1) * dw];
        for (x, d) in out[dy * dw..(dy + 1) * dw].iter_mut().enumerate() {
            *d = r0[x] * b0 + r1[x] * b1;
        }
    }
    out
}

/// OpenCV's linear-resize taps along one axis: source index and the two float weights.
fn linear_taps(ssize: usize, dsize: usize) -> Vec<(usize, f32, f32)> {
    let scale = 1.0 / (dsize as f64 / ssize as f64);
    (0..dsize)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let (mut s, mut f) = (s as i64, f - s);
            if s < 0 {
                s = 0;
                f = 0.0;
            }
            if s >= ssize as i64 - 1 {
                s = ssize as i64 - 1;
                f = 0.0;
            }
            (s as usize, 1.0 - f, f)
        })
        .collect()
}

/// controlnet_aux `util.safe_step(x, step=2)`: `int32(float32(x) * 3) / 2` in `float32`, i.e.
/// 0, 0.5, 1 or 1.5 for `x` in `[0, 1]`.
pub fn safe_step(x: f32) -> f32 {
    ((x * 3.0) as i32) as f32 / 2.0
}

/// `(x * 255.0).clip(0, 255).astype(np.uint8)` for a `float32` `x`.
pub fn unit_to_u8(x: f32) -> u8 {
    (x * 255.0).clamp(0.0, 255.0) as u8
}

/// The same for a `float64` `x` (HED's sigmoid is computed in `float64`).
pub fn unit_to_u8_f64(x: f64) -> u8 {
    (x * 255.0).clamp(0.0, 255.0) as u8
}

/// `1 / (1 + exp(-x))` in `f64`, as numpy evaluates it.
pub fn sigmoid_f64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// controlnet_aux `util.nms(x, t, s)` on a grey `u8` image (see the module docs).
pub fn nms(x: &GrayImage, t: f32, sigma: f64) -> GrayImage {
    let (w, h) = (x.width() as usize, x.height() as usize);
    let plane: Vec<f32> = x.as_raw().iter().map(|&v| v as f32).collect();
    let b = gaussian_blur_f32_cv(&plane, w, h, sigma);
    let at = |xx: i64, yy: i64| -> Option<f32> {
        (xx >= 0 && yy >= 0 && (xx as usize) < w && (yy as usize) < h)
            .then(|| b[yy as usize * w + xx as usize])
    };
    // The four lines of util.nms's kernels f1..f4: horizontal, vertical, both diagonals.
    const DIRS: [(i64, i64); 4] = [(1, 0), (0, 1), (1, 1), (1, -1)];
    let mut out = GrayImage::new(w as u32, h as u32);
    for yy in 0..h as i64 {
        for xx in 0..w as i64 {
            let v = b[yy as usize * w + xx as usize];
            let is_max = DIRS.iter().any(|&(dx, dy)| {
                // cv2.dilate: the maximum over the in-image pixels under the kernel.
                let m = [at(xx - dx, yy - dy), at(xx + dx, yy + dy)]
                    .into_iter()
                    .flatten()
                    .fold(v, f32::max);
                m == v
            });
            let kept = if is_max { v } else { 0.0 };
            if kept > t {
                out.put_pixel(xx as u32, yy as u32, image::Luma([255]));
            }
        }
    }
    out
}

/// `cv2.GaussianBlur(x, (0, 0), sigma)` on a one-channel `float32` image (`w`×`h`, row-major),
/// bit-exact to OpenCV 4.x on x86-64 with AVX2: kernel `cv2.getGaussianKernel(n, sigma)` in
/// `float32` (`n` = [`gaussian_ksize`]), `BORDER_REFLECT_101`; the row pass accumulates
/// `acc = fma(src[x - r + j], k[j], acc)` for `j = 0..n` from `acc = 0`; the column pass uses
/// the kernel's symmetry: `acc = k[r] * centre`, then for `j = 1..=r`
/// `acc = fma(above_j + below_j, k[r + j], acc)`.
pub fn gaussian_blur_f32_cv(src: &[f32], w: usize, h: usize, sigma: f64) -> Vec<f32> {
    assert_eq!(
        src.len(),
        w * h,
        "gaussian_blur_f32_cv: buffer is not {w}x{h}"
    );
    let n = gaussian_ksize(sigma, false);
    let k = gaussian_kernel(n, sigma);
    let r = n / 2;
    let mut tmp = vec![0f32; w * h];
    let xidx: Vec<Vec<usize>> = (0..w as i64)
        .map(|x| {
            (0..n as i64)
                .map(|j| reflect101(x + j - r as i64, w))
                .collect()
        })
        .collect();
    for y in 0..h {
        let row = &src[y * w..(y + 1) * w];
        for x in 0..w {
            let mut acc = 0f32;
            for (kk, &sx) in k.iter().zip(&xidx[x]) {
                acc = row[sx].mul_add(*kk, acc);
            }
            tmp[y * w + x] = acc;
        }
    }
    let mut out = vec![0f32; w * h];
    for y in 0..h as i64 {
        let yi = |d: i64| reflect101(y + d, h) * w;
        let centre = yi(0);
        let pairs: Vec<(usize, usize)> = (1..=r as i64).map(|j| (yi(-j), yi(j))).collect();
        for x in 0..w {
            let mut acc = k[r] * tmp[centre + x];
            for (j, &(a, b)) in pairs.iter().enumerate() {
                acc = (tmp[a + x] + tmp[b + x]).mul_add(k[r + 1 + j], acc);
            }
            out[y as usize * w + x] = acc;
        }
    }
    out
}

/// OpenCV's bit-exact Gaussian kernel in fixed point with 8 fractional bits
/// (`getGaussianKernelBitExact`, then `getGaussianKernelFixedPoint_ED`: taps rounded with error
/// diffusion from the outside in, the centre tap taking what makes the sum exactly 256).
pub fn gaussian_kernel_fixed8(n: usize, sigma: f64) -> Vec<u32> {
    assert!(n % 2 == 1 && sigma > 0.0);
    let half = n / 2;
    let scale2x = -0.125 / (sigma * sigma);
    let mut vals = Vec::with_capacity(half);
    let mut sum = 0f64;
    for i in 0..half {
        let x = 2 * i as i64 + 1 - n as i64; // twice the offset from the centre
        let t = ((x * x) as f64 * scale2x).exp();
        vals.push(t);
        sum += t;
    }
    sum = sum * 2.0 + 1.0;
    let mul = 1.0 / sum;
    let mut out = vec![0u32; n];
    let mut err = 0f64;
    let mut total = 0i64;
    for i in 0..half {
        let adj = vals[i] * mul * 256.0 + err;
        let v = adj.round_ties_even() as i64;
        err = adj - v as f64;
        out[i] = v as u32;
        out[n - 1 - i] = v as u32;
        total += v;
    }
    out[half] = (256 - 2 * total) as u32;
    out
}

/// `cv2.GaussianBlur(img, (0, 0), sigma)` for a grey `u8` image: OpenCV's fixed-point path
/// (kernel [`gaussian_kernel_fixed8`], `BORDER_REFLECT_101`, rows then columns in exact
/// integer arithmetic, result `(v + 2^15) >> 16`). Bit-exact.
pub fn gaussian_blur_u8(img: &GrayImage, sigma: f64) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let n = gaussian_ksize(sigma, true);
    let k = gaussian_kernel_fixed8(n, sigma);
    let r = (n / 2) as i64;
    let src = img.as_raw();
    let mut rows = vec![0u32; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0u32;
            for (j, &kk) in k.iter().enumerate() {
                let sx = reflect101(x as i64 + j as i64 - r, w);
                acc += kk * src[y * w + sx] as u32;
            }
            rows[y * w + x] = acc;
        }
    }
    let mut out = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            let mut acc = 0u64;
            for (j, &kk) in k.iter().enumerate() {
                let sy = reflect101(y as i64 + j as i64 - r, h);
                acc += kk as u64 * rows[sy * w + x] as u64;
            }
            out[y * w + x] = ((acc + (1 << 15)) >> 16).min(255) as u8;
        }
    }
    GrayImage::from_raw(w as u32, h as u32, out).expect("buffer size")
}

/// `BORDER_REFLECT_101` (`gfedcb|abcdefgh|gfedcba`) for any offset; `n >= 1`.
fn reflect101(i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// The scribble step of controlnet_aux's HED and PiDiNet detectors on their grey hint:
/// `nms(map, 127, 3.0)`, `cv2.GaussianBlur(σ 3.0)`, then `> 4` → 255 and the rest → 0.
pub fn scribble(map: &GrayImage) -> GrayImage {
    let mut z = gaussian_blur_u8(&nms(map, 127.0, 3.0), 3.0);
    for p in z.pixels_mut() {
        p.0[0] = if p.0[0] > 4 { 255 } else { 0 };
    }
    z
}

/// A grey hint as the three equal channels controlnet_aux's `HWC3` makes of it.
pub fn gray_to_rgb(g: &GrayImage) -> image::RgbImage {
    image::RgbImage::from_fn(g.width(), g.height(), |x, y| {
        let v = g.get_pixel(x, y).0[0];
        image::Rgb([v, v, v])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_kernel_sums_to_one() {
        for (n, s) in [(19, 3.0), (7, 1.0), (25, 4.0)] {
            let k = gaussian_kernel_fixed8(n, s);
            assert_eq!(k.iter().sum::<u32>(), 256);
            assert!(k.windows(2).take(n / 2).all(|p| p[0] <= p[1]));
        }
    }

    #[test]
    fn linear_resize_identity_and_constant() {
        let src: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(resize_linear_f32(&src, 4, 3, 4, 3), src);
        let c = vec![0.3f32; 8];
        assert!(resize_linear_f32(&c, 4, 2, 16, 8).iter().all(|&v| v == 0.3));
        // 2× upscaling of a ramp: OpenCV's half-pixel centres, edges clamped.
        let r = resize_linear_f32(&[0.0, 1.0], 2, 1, 4, 1);
        assert_eq!(r, vec![0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn safe_step_levels() {
        assert_eq!(safe_step(0.0), 0.0);
        assert_eq!(safe_step(0.34), 0.5);
        assert_eq!(safe_step(0.7), 1.0);
        assert_eq!(safe_step(1.0), 1.5);
        assert_eq!(unit_to_u8(safe_step(0.34)), 127);
        assert_eq!(unit_to_u8(1.5), 255);
    }

    #[test]
    fn nms_and_scribble_on_a_band() {
        // A 7-pixel-wide vertical band: every pixel of it ties with its vertical neighbours, so
        // util.nms keeps the whole band (values below checked against OpenCV 4.14).
        let g = GrayImage::from_fn(21, 21, |x, _| {
            image::Luma([if (7..14).contains(&x) { 255 } else { 0 }])
        });
        let z = nms(&g, 127.0, 3.0);
        let row: Vec<u8> = (0..21).map(|x| z.get_pixel(x, 10).0[0]).collect();
        assert_eq!(row, [vec![0; 7], vec![255; 7], vec![0; 7]].concat());
        let b = gaussian_blur_u8(&z, 3.0);
        let row: Vec<u8> = (0..21).map(|x| b.get_pixel(x, 10).0[0]).collect();
        let want = [
            8, 9, 17, 31, 51, 79, 110, 140, 168, 187, 193, 187, 168, 140, 110, 79, 51, 31, 17, 9, 8,
        ];
        assert_eq!(row, want);
        assert!(scribble(&g).pixels().all(|p| p.0[0] == 255));
    }
}
