//! Image operations the preprocessors are built from, written to follow OpenCV's definitions
//! (the reference implementations call `cv2`). Each function states which OpenCV call it stands
//! for and how close it is; `tests/parity.rs` measures that against OpenCV's own output.
//!
//! Images are `image::RgbImage` / `image::GrayImage` (row-major, interleaved) or plain `f32`
//! planes ([`PlaneF32`]) for the floating-point steps.

use image::{DynamicImage, GrayImage, RgbImage};

/// An interleaved `f32` image: `data[(y * width + x) * channels + c]`.
#[derive(Clone, Debug, PartialEq)]
pub struct PlaneF32 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl PlaneF32 {
    pub fn from_rgb(img: &RgbImage) -> Self {
        PlaneF32 {
            width: img.width() as usize,
            height: img.height() as usize,
            channels: 3,
            data: img.as_raw().iter().map(|&v| v as f32).collect(),
        }
    }

    #[inline]
    pub fn at(&self, x: usize, y: usize, c: usize) -> f32 {
        self.data[(y * self.width + x) * self.channels + c]
    }
}

/// controlnet_aux `HWC3`: grey becomes three equal channels; RGBA is composited on white in
/// `f32` (`rgb * a + 255 * (1 - a)`, then truncated to `u8`, as numpy's `astype(uint8)` does).
pub fn hwc3(img: &DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb.clone(),
        DynamicImage::ImageLuma8(_) => img.to_rgb8(),
        _ if img.color().has_alpha() => {
            let rgba = img.to_rgba8();
            let (w, h) = rgba.dimensions();
            let mut out = RgbImage::new(w, h);
            for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
                let a = p[3] as f32 / 255.0;
                for c in 0..3 {
                    let v = p[c] as f32 * a + 255.0 * (1.0 - a);
                    o[c] = v.clamp(0.0, 255.0) as u8;
                }
            }
            out
        }
        _ => img.to_rgb8(),
    }
}

/// Size controlnet_aux's `resize_image` gives an `h`×`w` image for `resolution`: the short side
/// is scaled to `resolution`, then both sides are rounded to a multiple of 64 (numpy `round`,
/// ties to even). Returns `(width, height, k)` with `k` the scale factor.
pub fn detect_size(width: u32, height: u32, resolution: u32) -> (u32, u32, f64) {
    let (h, w) = (height as f64, width as f64);
    let k = resolution as f64 / h.min(w);
    let h = ((h * k) / 64.0).round_ties_even() * 64.0;
    let w = ((w * k) / 64.0).round_ties_even() * 64.0;
    (w as u32, h as u32, k)
}

/// controlnet_aux `resize_image(img, resolution)`: [`detect_size`], then `cv2.resize` with
/// `INTER_LANCZOS4` when `k > 1`, else `INTER_AREA`. The caller bounds `resolution` and the
/// input size (see the crate docs); this function only requires a non-empty image.
pub fn resize_image(img: &RgbImage, resolution: u32) -> RgbImage {
    let (w, h, k) = detect_size(img.width(), img.height(), resolution);
    if k > 1.0 {
        resize_lanczos4(img, w, h)
    } else {
        resize_area(img, w, h)
    }
}

// ---------------------------------------------------------------------------------------------
// Resizing
// ---------------------------------------------------------------------------------------------

/// OpenCV's `saturate_cast<uchar>(float)`: round half to even, clamp.
#[inline]
fn sat_u8_f32(v: f32) -> u8 {
    v.round_ties_even().clamp(0.0, 255.0) as u8
}

/// OpenCV's `saturate_cast<short>(float)`.
#[inline]
fn sat_i16_f32(v: f32) -> i32 {
    v.round_ties_even().clamp(-32768.0, 32767.0) as i32
}

/// `INTER_RESIZE_COEF_BITS`: 8-bit resizing uses 11-bit fixed-point coefficients.
const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// `cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)` for 8-bit RGB, following OpenCV's
/// three cases: both factors integer (block average; for exactly 2×2 `(sum + 2) >> 2`),
/// shrinking (exact box-overlap weights accumulated in `f32`), and enlarging along either axis
/// (bilinear with OpenCV's "area" sample positions, 11-bit fixed point).
pub fn resize_area(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = img.dimensions();
    if (sw, sh) == (w, h) {
        return img.clone();
    }
    let scale_x = sw as f64 / w as f64;
    let scale_y = sh as f64 / h as f64;
    if scale_x >= 1.0 && scale_y >= 1.0 {
        let ix = scale_x.round();
        let iy = scale_y.round();
        if (scale_x - ix).abs() < f64::EPSILON && (scale_y - iy).abs() < f64::EPSILON {
            return area_fast(img, w, h, ix as u32, iy as u32);
        }
        return area_generic(img, w, h, scale_x, scale_y);
    }
    linear_fixed(img, w, h, true)
}

fn area_fast(img: &RgbImage, w: u32, h: u32, sx: u32, sy: u32) -> RgbImage {
    let mut out = RgbImage::new(w, h);
    let src = img.as_raw();
    let sw = img.width() as usize;
    let area = (sx * sy) as i32;
    let scale = 1.0f32 / area as f32;
    for y in 0..h as usize {
        for x in 0..w as usize {
            for c in 0..3 {
                let mut sum = 0i32;
                for dy in 0..sy as usize {
                    let row = (y * sy as usize + dy) * sw;
                    for dx in 0..sx as usize {
                        sum += src[(row + x * sx as usize + dx) * 3 + c] as i32;
                    }
                }
                let v = if sx == 2 && sy == 2 {
                    ((sum + 2) >> 2) as u8
                } else {
                    sat_u8_f32(sum as f32 * scale)
                };
                out.as_mut()[(y * w as usize + x) * 3 + c] = v;
            }
        }
    }
    out
}

/// One entry of OpenCV's `computeResizeAreaTab`: destination `d` takes `alpha` of source `s`.
struct AreaTab {
    d: usize,
    s: usize,
    alpha: f32,
}

fn area_tab(ssize: usize, dsize: usize, scale: f64) -> Vec<AreaTab> {
    let mut tab = Vec::with_capacity(ssize * 2);
    for d in 0..dsize {
        let fs1 = d as f64 * scale;
        let fs2 = fs1 + scale;
        let cell = scale.min(ssize as f64 - fs1);
        let mut s1 = fs1.ceil() as i64;
        let s2 = (fs2.floor() as i64).min(ssize as i64 - 1);
        s1 = s1.min(s2);
        if s1 as f64 - fs1 > 1e-3 {
            tab.push(AreaTab {
                d,
                s: (s1 - 1) as usize,
                alpha: ((s1 as f64 - fs1) / cell) as f32,
            });
        }
        for s in s1..s2 {
            tab.push(AreaTab {
                d,
                s: s as usize,
                alpha: (1.0 / cell) as f32,
            });
        }
        if fs2 - s2 as f64 > 1e-3 {
            tab.push(AreaTab {
                d,
                s: s2 as usize,
                alpha: ((fs2 - s2 as f64).min(1.0).min(cell) / cell) as f32,
            });
        }
    }
    tab
}

fn area_generic(img: &RgbImage, w: u32, h: u32, scale_x: f64, scale_y: f64) -> RgbImage {
    let (sw, sh) = (img.width() as usize, img.height() as usize);
    let (w, h) = (w as usize, h as usize);
    let xtab = area_tab(sw, w, scale_x);
    let ytab = area_tab(sh, h, scale_y);
    let src = img.as_raw();
    let mut out = RgbImage::new(w as u32, h as u32);
    let mut buf = vec![0f32; w * 3];
    let mut sum = vec![0f32; w * 3];
    let mut cur: Option<usize> = None;
    for t in &ytab {
        buf.iter_mut().for_each(|v| *v = 0.0);
        let row = &src[t.s * sw * 3..(t.s + 1) * sw * 3];
        for xt in &xtab {
            for c in 0..3 {
                buf[xt.d * 3 + c] += row[xt.s * 3 + c] as f32 * xt.alpha;
            }
        }
        match cur {
            Some(dy) if dy == t.d => {
                for (s, b) in sum.iter_mut().zip(&buf) {
                    *s += t.alpha * *b;
                }
            }
            _ => {
                if let Some(dy) = cur {
                    flush_row(&mut out, dy, &sum);
                }
                for (s, b) in sum.iter_mut().zip(&buf) {
                    *s = t.alpha * *b;
                }
                cur = Some(t.d);
            }
        }
    }
    if let Some(dy) = cur {
        flush_row(&mut out, dy, &sum);
    }
    out
}

fn flush_row(out: &mut RgbImage, dy: usize, sum: &[f32]) {
    let w = out.width() as usize;
    let dst = &mut out.as_mut()[dy * w * 3..(dy + 1) * w * 3];
    for (d, s) in dst.iter_mut().zip(sum) {
        *d = sat_u8_f32(*s);
    }
}

/// Source index and fixed-point weights along one axis for OpenCV's 2-tap (bilinear) resize.
/// `area_mode` selects the sample positions `INTER_AREA` uses when it enlarges.
fn linear_axis(ssize: usize, dsize: usize, area_mode: bool) -> Vec<(usize, usize, i32, i32)> {
    let inv_scale = dsize as f64 / ssize as f64;
    let scale = 1.0 / inv_scale;
    (0..dsize)
        .map(|d| {
            let (mut s, mut f);
            if !area_mode {
                let fx = ((d as f64 + 0.5) * scale - 0.5) as f32;
                s = fx.floor() as i64;
                f = fx - s as f32;
            } else {
                s = (d as f64 * scale).floor() as i64;
                f = ((d + 1) as f64 - (s + 1) as f64 * inv_scale) as f32;
                f = if f <= 0.0 { 0.0 } else { f - f.floor() };
            }
            if s < 0 {
                s = 0;
                f = 0.0;
            }
            if s >= ssize as i64 - 1 {
                s = ssize as i64 - 1;
                f = 0.0;
            }
            let s0 = s as usize;
            let s1 = (s0 + 1).min(ssize - 1);
            let a0 = sat_i16_f32((1.0 - f) * COEF_SCALE);
            let a1 = sat_i16_f32(f * COEF_SCALE);
            (s0, s1, a0, a1)
        })
        .collect()
}

/// OpenCV's 8-bit `INTER_LINEAR` / enlarging `INTER_AREA` (generic, not `INTER_LINEAR_EXACT`):
/// 11-bit weights per axis; the vertical pass rounds as OpenCV's SSE2 code does for whole
/// 16-byte vectors and exactly for the remainder (only when `3 * w` is not a multiple of 16).
fn linear_fixed(img: &RgbImage, w: u32, h: u32, area_mode: bool) -> RgbImage {
    let (sw, sh) = (img.width() as usize, img.height() as usize);
    let (w, h) = (w as usize, h as usize);
    let xs = linear_axis(sw, w, area_mode);
    let ys = linear_axis(sh, h, area_mode);
    let src = img.as_raw();
    let hrow = |sy: usize| -> Vec<i32> {
        let row = &src[sy * sw * 3..(sy + 1) * sw * 3];
        let mut out = vec![0i32; w * 3];
        for (x, &(s0, s1, a0, a1)) in xs.iter().enumerate() {
            for c in 0..3 {
                out[x * 3 + c] = row[s0 * 3 + c] as i32 * a0 + row[s1 * 3 + c] as i32 * a1;
            }
        }
        out
    };
    let mut out = RgbImage::new(w as u32, h as u32);
    let shift = 2 * COEF_BITS;
    // OpenCV's vertical pass runs SIMD (`VResizeLinearVec_32s8u`, 16 bytes at a time) over
    // whole vectors and the exact formula over the rest; the two round differently.
    let simd_end = (w * 3) / 16 * 16;
    let mul_hi = |a: i32, b: i32| (a * b) >> 16;
    let sat16 = |v: i32| v.clamp(-32768, 32767);
    for (y, &(s0, s1, b0, b1)) in ys.iter().enumerate() {
        let r0 = hrow(s0);
        let r1 = hrow(s1);
        let dst = &mut out.as_mut()[y * w * 3..(y + 1) * w * 3];
        for i in 0..w * 3 {
            dst[i] = if i < simd_end {
                let t = sat16(mul_hi(sat16(r0[i] >> 4), b0) + mul_hi(sat16(r1[i] >> 4), b1));
                ((t + 2) >> 2).clamp(0, 255) as u8
            } else {
                let v = r0[i] as i64 * b0 as i64 + r1[i] as i64 * b1 as i64;
                ((v + (1 << (shift - 1))) >> shift).clamp(0, 255) as u8
            };
        }
    }
    out
}

/// OpenCV 4.14's `interpolateLanczos4`: the 8 weights for taps `sx-3 ..= sx+4` at fraction
/// `x`. `x + 3` and `x + 3 - i` are evaluated in `float`, the sines in `double`; a tap whose
/// distance `|x + 3 - i|` is below `1e-6` gets the weight `1e30` before the weights are
/// normalised (`× 1/sum`, in `float`), so `x ≈ 0` and `x ≈ 1` select one tap.
fn lanczos4_coeffs(x: f32) -> [f32; 8] {
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [[f64; 2]; 8] = [
        [1.0, 0.0],
        [-S45, -S45],
        [0.0, 1.0],
        [S45, -S45],
        [-1.0, 0.0],
        [S45, S45],
        [0.0, -1.0],
        [-S45, S45],
    ];
    let mut c = [0f32; 8];
    let mut sum = 0f32;
    let y0 = -((x + 3.0) as f64) * std::f64::consts::PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    for i in 0..8 {
        let y0_ = x + 3.0 - i as f32;
        c[i] = if y0_.abs() >= 1e-6 {
            let y = -(y0_ as f64) * std::f64::consts::PI * 0.25;
            ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += c[i];
    }
    let inv = 1.0f32 / sum;
    for v in &mut c {
        *v *= inv;
    }
    c
}

/// Per destination index along one axis: the first of the 8 taps (may be negative) and the
/// `float` weights, as OpenCV's `resize` sets them up for `INTER_LANCZOS4`
/// (`fx = float((d + 0.5) * scale - 0.5)`, `sx = floor(fx)`, weights at `fx - sx`).
fn lanczos4_axis(ssize: usize, dsize: usize) -> Vec<(i64, [f32; 8])> {
    let scale = 1.0 / (dsize as f64 / ssize as f64);
    (0..dsize)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            (s as i64 - 3, lanczos4_coeffs(f - s))
        })
        .collect()
}

/// [`lanczos4_axis`] with the weights in 11-bit fixed point (`saturate_cast<short>(w * 2048)`),
/// as OpenCV uses them for 8-bit images.
fn lanczos4_axis_fixed(ssize: usize, dsize: usize) -> Vec<(i64, [i32; 8])> {
    lanczos4_axis(ssize, dsize)
        .into_iter()
        .map(|(s, c)| (s, c.map(|v| sat_i16_f32(v * COEF_SCALE))))
        .collect()
}

/// `cv2.resize(img, (w, h), interpolation=cv2.INTER_LANCZOS4)` for 8-bit RGB: 8×8 taps,
/// coefficients in 11-bit fixed point, edge pixels replicated, rounding `(v + 2^21) >> 22`.
pub fn resize_lanczos4(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let (sw, sh) = (img.width() as usize, img.height() as usize);
    let (w, h) = (w as usize, h as usize);
    let xs = lanczos4_axis_fixed(sw, w);
    let ys = lanczos4_axis_fixed(sh, h);
    let src = img.as_raw();
    let clamp = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;
    // Horizontal pass over every source row (each is needed by several output rows).
    let mut rows = vec![0i32; sh * w * 3];
    for sy in 0..sh {
        let row = &src[sy * sw * 3..(sy + 1) * sw * 3];
        let out = &mut rows[sy * w * 3..(sy + 1) * w * 3];
        for (x, (s, c)) in xs.iter().enumerate() {
            for ch in 0..3 {
                let mut acc = 0i32;
                for k in 0..8 {
                    acc += row[clamp(s + k as i64, sw) * 3 + ch] as i32 * c[k];
                }
                out[x * 3 + ch] = acc;
            }
        }
    }
    let mut out = RgbImage::new(w as u32, h as u32);
    let shift = 2 * COEF_BITS;
    for (y, (s, c)) in ys.iter().enumerate() {
        let dst = &mut out.as_mut()[y * w * 3..(y + 1) * w * 3];
        for (i, d) in dst.iter_mut().enumerate() {
            let mut acc = 0i64;
            for k in 0..8 {
                acc += rows[clamp(s + k as i64, sh) * w * 3 + i] as i64 * c[k] as i64;
            }
            *d = ((acc + (1 << (shift - 1))) >> shift).clamp(0, 255) as u8;
        }
    }
    out
}

/// `cv2.resize(src, (w, h), interpolation=cv2.INTER_LANCZOS4)` for a one-channel `float32`
/// array (`sw`×`sh`, row-major), bit-exact to OpenCV 4.14 on x86-64 (SSE lanes, no FMA). OpenCV
/// there: `interpolateLanczos4` weights in `float`, edge pixels replicated; the horizontal pass
/// sums the 8 taps in order; the vertical pass (`VResizeLanczos4Vec_32f`, nested `v_muladd`)
/// sums whole 4-float vectors from tap 7 down to tap 0 (`a * b + acc`) and the last `w % 4`
/// columns, which it does in scalar code, from tap 0 up. A same-size resize is a copy, as in
/// `cv::resize`. Measured by `neural-annotators`' OpenPose tests against `cv2.resize`.
pub fn resize_lanczos4_f32(src: &[f32], sw: usize, sh: usize, w: usize, h: usize) -> Vec<f32> {
    assert_eq!(src.len(), sw * sh);
    if (sw, sh) == (w, h) {
        return src.to_vec();
    }
    let xs = lanczos4_axis(sw, w);
    let ys = lanczos4_axis(sh, h);
    let clamp = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;
    let mut rows = vec![0f32; sh * w];
    for sy in 0..sh {
        let row = &src[sy * sw..(sy + 1) * sw];
        let out = &mut rows[sy * w..(sy + 1) * w];
        for (o, (s, c)) in out.iter_mut().zip(&xs) {
            let mut acc = row[clamp(*s, sw)] * c[0];
            for k in 1..8 {
                acc += row[clamp(s + k as i64, sw)] * c[k];
            }
            *o = acc;
        }
    }
    let simd_end = w / 4 * 4;
    let mut out = vec![0f32; w * h];
    for (y, (s, c)) in ys.iter().enumerate() {
        let r: [&[f32]; 8] = std::array::from_fn(|k| &rows[clamp(s + k as i64, sh) * w..][..w]);
        let dst = &mut out[y * w..(y + 1) * w];
        for (x, d) in dst.iter_mut().enumerate() {
            *d = if x < simd_end {
                let mut acc = r[7][x] * c[7];
                for k in (0..7).rev() {
                    acc += r[k][x] * c[k]; // = r[k][x] * c[k] + acc (addition commutes)
                }
                acc
            } else {
                let mut acc = r[0][x] * c[0];
                for k in 1..8 {
                    acc += r[k][x] * c[k];
                }
                acc
            };
        }
    }
    out
}

/// `cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA)` for a one-channel `float32` array
/// (`sw`×`sh`, row-major) that shrinks or keeps both sides, bit-exact to OpenCV 4.14 on x86-64.
/// OpenCV there: when both factors `1 / (dst / src)` are integers (within `DBL_EPSILON`),
/// `resizeAreaFast_`: each block summed in row-major order four values at a time
/// (`sum += a + b + c + d`, then the rest one by one) and multiplied by `float(1 / area)`, except
/// that for 2×2 blocks its SIMD code (`ResizeAreaFastVec_SIMD_32f`) computes whole 4-float
/// vectors as `((a + b) + (c + d)) * 0.25` (the last `w % 4` columns take the scalar sum);
/// otherwise `resizeArea_`: `computeResizeAreaTab`'s box-overlap weights (`float`), each source
/// row's weighted sum accumulated into the destination row as `sum += beta * row`. A same-size
/// resize is a copy. Enlarging (OpenCV's bilinear fallback) is not implemented and panics.
/// Measured by `neural-annotators`' OpenPose tests against `cv2.resize`.
pub fn resize_area_f32(src: &[f32], sw: usize, sh: usize, w: usize, h: usize) -> Vec<f32> {
    assert_eq!(src.len(), sw * sh);
    assert!(
        w <= sw && h <= sh && w > 0 && h > 0,
        "resize_area_f32 only shrinks"
    );
    if (sw, sh) == (w, h) {
        return src.to_vec();
    }
    let scale_x = 1.0 / (w as f64 / sw as f64);
    let scale_y = 1.0 / (h as f64 / sh as f64);
    let (ix, iy) = (scale_x.round(), scale_y.round());
    if (scale_x - ix).abs() < f64::EPSILON && (scale_y - iy).abs() < f64::EPSILON {
        return area_fast_f32(src, sw, w, h, ix as usize, iy as usize);
    }
    let xtab = area_tab(sw, w, scale_x);
    let ytab = area_tab(sh, h, scale_y);
    let mut out = vec![0f32; w * h];
    let mut buf = vec![0f32; w];
    let mut sum = vec![0f32; w];
    let mut cur: Option<usize> = None;
    for t in &ytab {
        buf.iter_mut().for_each(|v| *v = 0.0);
        let row = &src[t.s * sw..(t.s + 1) * sw];
        for xt in &xtab {
            buf[xt.d] += row[xt.s] * xt.alpha;
        }
        match cur {
            Some(dy) if dy == t.d => {
                for (s, b) in sum.iter_mut().zip(&buf) {
                    *s += t.alpha * *b;
                }
            }
            _ => {
                if let Some(dy) = cur {
                    out[dy * w..(dy + 1) * w].copy_from_slice(&sum);
                }
                for (s, b) in sum.iter_mut().zip(&buf) {
                    *s = t.alpha * *b;
                }
                cur = Some(t.d);
            }
        }
    }
    if let Some(dy) = cur {
        out[dy * w..(dy + 1) * w].copy_from_slice(&sum);
    }
    out
}

/// The integer-factor case of [`resize_area_f32`]: `ix`×`iy` blocks of a `sw`-wide array.
fn area_fast_f32(src: &[f32], sw: usize, w: usize, h: usize, ix: usize, iy: usize) -> Vec<f32> {
    let area = ix * iy;
    let inv = 1.0f32 / area as f32;
    let simd_end = if (ix, iy) == (2, 2) { w / 4 * 4 } else { 0 };
    let mut out = vec![0f32; w * h];
    let mut vals = Vec::with_capacity(area);
    for y in 0..h {
        for x in 0..w {
            vals.clear();
            for dy in 0..iy {
                let row = &src[(y * iy + dy) * sw..];
                vals.extend_from_slice(&row[x * ix..x * ix + ix]);
            }
            out[y * w + x] = if x < simd_end {
                ((vals[0] + vals[1]) + (vals[2] + vals[3])) * 0.25
            } else {
                let mut s = 0f32;
                let mut k = 0;
                while k + 4 <= area {
                    s += vals[k] + vals[k + 1] + vals[k + 2] + vals[k + 3];
                    k += 4;
                }
                while k < area {
                    s += vals[k];
                    k += 1;
                }
                s * inv
            };
        }
    }
    out
}

/// `cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)` for a one-channel `f64` grid (the
/// shuffle noise): a = −0.75 cubic, edge values replicated, arithmetic in `f64`.
pub fn resize_cubic_f64(src: &[f64], sw: usize, sh: usize, w: usize, h: usize) -> Vec<f64> {
    fn coeffs(x: f32) -> [f64; 4] {
        const A: f32 = -0.75;
        let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
        let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
        let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
        [c0 as f64, c1 as f64, c2 as f64, (1.0 - c0 - c1 - c2) as f64]
    }
    let axis = |ssize: usize, dsize: usize| -> Vec<(i64, [f64; 4])> {
        let scale = 1.0 / (dsize as f64 / ssize as f64);
        (0..dsize)
            .map(|d| {
                let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
                let s = f.floor() as i64;
                (s - 1, coeffs(f - s as f32))
            })
            .collect()
    };
    let xs = axis(sw, w);
    let ys = axis(sh, h);
    let clamp = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;
    let mut rows = vec![0f64; sh * w];
    for sy in 0..sh {
        for (x, (s, c)) in xs.iter().enumerate() {
            let mut acc = 0.0;
            for k in 0..4 {
                acc += src[sy * sw + clamp(s + k as i64, sw)] * c[k];
            }
            rows[sy * w + x] = acc;
        }
    }
    let mut out = vec![0f64; w * h];
    for (y, (s, c)) in ys.iter().enumerate() {
        for x in 0..w {
            let mut acc = 0.0;
            for k in 0..4 {
                acc += rows[clamp(s + k as i64, sh) * w + x] * c[k];
            }
            out[y * w + x] = acc;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Gaussian blur
// ---------------------------------------------------------------------------------------------

/// OpenCV's `BORDER_REFLECT_101` index (`gfedcb|abcdefgh|gfedcba`), for any offset.
fn reflect101(mut i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    loop {
        if i < 0 {
            i = -i;
        } else if i >= n {
            i = 2 * n - 2 - i;
        } else {
            return i as usize;
        }
    }
}

/// `cv2.getGaussianKernel(n, sigma)` for `sigma > 0`, computed in `f64`, stored as `f32`.
pub fn gaussian_kernel(n: usize, sigma: f64) -> Vec<f32> {
    let scale2 = -0.5 / (sigma * sigma);
    let half = (n as f64 - 1.0) * 0.5;
    let raw: Vec<f64> = (0..n)
        .map(|i| {
            let x = i as f64 - half;
            (scale2 * x * x).exp()
        })
        .collect();
    let sum: f64 = raw.iter().sum();
    raw.iter().map(|v| (v / sum) as f32).collect()
}

/// Kernel size `cv2.GaussianBlur(src, (0, 0), sigma)` picks: `round(sigma * 4 * 2 + 1) | 1`
/// for float images (`* 3` for 8-bit ones).
pub fn gaussian_ksize(sigma: f64, eight_bit: bool) -> usize {
    let r = if eight_bit { 3.0 } else { 4.0 };
    (((sigma * r * 2.0 + 1.0).round_ties_even() as i64) | 1) as usize
}

/// `cv2.GaussianBlur(x, (0, 0), sigma)` on an `f32` image: separable, rows then columns,
/// `BORDER_REFLECT_101`. OpenCV's SIMD summation order differs, so results agree to float
/// rounding (~1e-5 relative), not bit for bit.
pub fn gaussian_blur_f32(src: &PlaneF32, sigma: f64) -> PlaneF32 {
    let n = gaussian_ksize(sigma, false);
    let k = gaussian_kernel(n, sigma);
    let r = (n / 2) as i64;
    let (w, h, ch) = (src.width, src.height, src.channels);
    let mut tmp = vec![0f32; src.data.len()];
    let xidx: Vec<Vec<usize>> = (0..w as i64)
        .map(|x| (-r..=r).map(|d| reflect101(x + d, w)).collect())
        .collect();
    for y in 0..h {
        let row = &src.data[y * w * ch..(y + 1) * w * ch];
        for x in 0..w {
            for c in 0..ch {
                let mut acc = 0f32;
                for (kk, &sx) in k.iter().zip(&xidx[x]) {
                    acc += kk * row[sx * ch + c];
                }
                tmp[(y * w + x) * ch + c] = acc;
            }
        }
    }
    let mut out = vec![0f32; src.data.len()];
    for y in 0..h as i64 {
        let yidx: Vec<usize> = (-r..=r).map(|d| reflect101(y + d, h)).collect();
        let dst = &mut out[y as usize * w * ch..(y as usize + 1) * w * ch];
        for (i, d) in dst.iter_mut().enumerate() {
            let mut acc = 0f32;
            for (kk, &sy) in k.iter().zip(&yidx) {
                acc += kk * tmp[sy * w * ch + i];
            }
            *d = acc;
        }
    }
    PlaneF32 {
        width: w,
        height: h,
        channels: ch,
        data: out,
    }
}

// ---------------------------------------------------------------------------------------------
// Canny
// ---------------------------------------------------------------------------------------------

/// `cv2.Canny(img, low, high)` on an 8-bit RGB image: 3×3 Sobel (edge pixels replicated), L1
/// magnitude `|dx| + |dy|` per channel and the channel with the largest one, non-maximum
/// suppression in four directions with OpenCV's tan 22.5° fixed-point test and its asymmetric
/// ties, thresholds floored and swapped if `low > high`, hysteresis over 8-neighbours.
/// No Gaussian blur (unlike `imageproc::edges::canny`). Output is 0 / 255.
pub fn canny(img: &RgbImage, low: f64, high: f64) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let low = low.floor() as i64;
    let high = high.floor() as i64;
    let src = img.as_raw();
    let px = |x: i64, y: i64, c: usize| -> i32 {
        let x = x.clamp(0, w as i64 - 1) as usize;
        let y = y.clamp(0, h as i64 - 1) as usize;
        src[(y * w + x) * 3 + c] as i32
    };
    // Gradient of the strongest channel per pixel.
    let mut gx = vec![0i32; w * h];
    let mut gy = vec![0i32; w * h];
    let mut mag = vec![0i64; w * h];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let mut best = (-1i64, 0i32, 0i32);
            for c in 0..3 {
                let dx = (px(x + 1, y - 1, c) - px(x - 1, y - 1, c))
                    + 2 * (px(x + 1, y, c) - px(x - 1, y, c))
                    + (px(x + 1, y + 1, c) - px(x - 1, y + 1, c));
                let dy = (px(x - 1, y + 1, c) - px(x - 1, y - 1, c))
                    + 2 * (px(x, y + 1, c) - px(x, y - 1, c))
                    + (px(x + 1, y + 1, c) - px(x + 1, y - 1, c));
                let m = (dx.abs() + dy.abs()) as i64;
                if m > best.0 {
                    best = (m, dx, dy);
                }
            }
            let i = y as usize * w + x as usize;
            mag[i] = best.0;
            gx[i] = best.1;
            gy[i] = best.2;
        }
    }
    // Magnitude outside the image reads as 0.
    let m_at = |x: i64, y: i64| -> i64 {
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    const TG22: i64 = 13573; // round(tan(22.5°) * 2^15)
                             // 0: maybe an edge, 1: not an edge, 2: an edge.
    let mut map = vec![1u8; w * h];
    let mut stack: Vec<usize> = Vec::new();
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let i = y as usize * w + x as usize;
            let m = mag[i];
            if m <= low {
                continue;
            }
            let (xs, ys) = (gx[i] as i64, gy[i] as i64);
            let ax = xs.abs();
            let ay = ys.abs() << 15;
            let tg22x = ax * TG22;
            let keep = if ay < tg22x {
                m > m_at(x - 1, y) && m >= m_at(x + 1, y)
            } else {
                let tg67x = tg22x + (ax << 16);
                if ay > tg67x {
                    m > m_at(x, y - 1) && m >= m_at(x, y + 1)
                } else {
                    let s = if (xs ^ ys) < 0 { -1 } else { 1 };
                    m > m_at(x - s, y - 1) && m > m_at(x + s, y + 1)
                }
            };
            if keep {
                if m > high {
                    map[i] = 2;
                    stack.push(i);
                } else {
                    map[i] = 0;
                }
            }
        }
    }
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as i64, (i / w) as i64);
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (nx, ny) = (x + dx, y + dy);
                if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                    continue;
                }
                let j = ny as usize * w + nx as usize;
                if map[j] == 0 {
                    map[j] = 2;
                    stack.push(j);
                }
            }
        }
    }
    GrayImage::from_raw(
        w as u32,
        h as u32,
        map.iter().map(|&v| if v == 2 { 255 } else { 0 }).collect(),
    )
    .expect("buffer matches dimensions")
}

// ---------------------------------------------------------------------------------------------
// Remap
// ---------------------------------------------------------------------------------------------

/// `cv2.remap(img, mapx, mapy, cv2.INTER_LINEAR)` with `BORDER_CONSTANT` 0: coordinates are
/// quantised to 1/32 pixel (`INTER_BITS = 5`) and blended with 15-bit integer weights, as
/// OpenCV does for 8-bit images. `mapx`/`mapy` are `out_w * out_h`, row-major.
pub fn remap_linear(
    img: &RgbImage,
    mapx: &[f32],
    mapy: &[f32],
    out_w: u32,
    out_h: u32,
) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let src = img.as_raw();
    let mut out = RgbImage::new(out_w, out_h);
    for (i, o) in out.pixels_mut().enumerate() {
        let fx = (mapx[i] * 32.0).round_ties_even() as i64;
        let fy = (mapy[i] * 32.0).round_ties_even() as i64;
        let (x0, y0) = (fx >> 5, fy >> 5);
        let (ax, ay) = (fx & 31, fy & 31);
        let wts = [
            (32 - ax) * (32 - ay) * 32,
            ax * (32 - ay) * 32,
            (32 - ax) * ay * 32,
            ax * ay * 32,
        ];
        let taps = [(x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)];
        for c in 0..3 {
            let mut acc = 0i64;
            for (&(tx, ty), &wt) in taps.iter().zip(&wts) {
                if tx >= 0 && ty >= 0 && tx < w && ty < h {
                    acc += src[((ty * w + tx) * 3) as usize + c] as i64 * wt;
                }
            }
            o[c] = ((acc + (1 << 14)) >> 15).clamp(0, 255) as u8;
        }
    }
    out
}
