//! The weight-free preprocessors, on an image already at its detect size (what
//! [`crate::run`] makes with [`ops::resize_image`] for those that use a resolution) and with
//! parameters already validated.

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::ops::{self, PlaneF32};

/// `canny`: controlnet_aux `CannyDetector` — `cv2.Canny(img, low, high)` on the resized image,
/// the single-channel map repeated over RGB.
pub fn canny(img: &RgbImage, low: f64, high: f64) -> RgbImage {
    gray_to_rgb(&ops::canny(img, low, high))
}

/// `invert`: `255 - x` (sd-webui-controlnet's "invert (from white bg & black line)"), at the
/// input size.
pub fn invert(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    out.as_mut().iter_mut().for_each(|v| *v = 255 - *v);
    out
}

/// `tile_resample`: sd-webui-controlnet's — below a rate of 1.1 the image is returned as is,
/// else `INTER_AREA` to `int(H / rate)` × `int(W / rate)` (at least 1×1).
pub fn tile_resample(img: &RgbImage, rate: f64) -> RgbImage {
    if rate < 1.1 {
        return img.clone();
    }
    let h = ((img.height() as f64 / rate) as u32).max(1);
    let w = ((img.width() as f64 / rate) as u32).max(1);
    ops::resize_area(img, w, h)
}

/// `scribble_xdog`: sd-webui-controlnet's XDoG. `d = min over
/// channels of (blur(5.0) − blur(0.5))`, `dog = u8(clip(255 − d))`, and a pixel is white where
/// `2 * (255 − dog) > threshold` — computed in `u8` as numpy does there, so the doubling wraps
/// modulo 256 (very strong dark lines, `d` in 128..=143, come out black in the reference too).
pub fn scribble_xdog(img: &RgbImage, threshold: f64) -> RgbImage {
    let x = PlaneF32::from_rgb(img);
    let g1 = ops::gaussian_blur_f32(&x, 0.5);
    let g2 = ops::gaussian_blur_f32(&x, 5.0);
    let mut out = RgbImage::new(img.width(), img.height());
    for (i, p) in out.pixels_mut().enumerate() {
        let mut d = f32::INFINITY;
        for c in 0..3 {
            d = d.min(g2.data[i * 3 + c] - g1.data[i * 3 + c]);
        }
        let dog = (255.0 - d).clamp(0.0, 255.0) as u8;
        let doubled = (255 - dog).wrapping_mul(2);
        if doubled as f64 > threshold {
            *p = image::Rgb([255, 255, 255]);
        }
    }
    out
}

/// `lineart_standard`: controlnet_aux `LineartStandardDetector` (σ 6, intensity threshold 8): `intensity = clip(min over channels of (blur − x), 0, 255)`, divided
/// by `max(16, median of the values above 8)`, times 127, truncated to `u8`. (controlnet_aux
/// then resizes back to the input size; here the caller fits the map to the generation size.)
pub fn lineart_standard(img: &RgbImage) -> RgbImage {
    const SIGMA: f64 = 6.0;
    const THRESHOLD: f32 = 8.0;
    let x = PlaneF32::from_rgb(img);
    let g = ops::gaussian_blur_f32(&x, SIGMA);
    let n = (img.width() * img.height()) as usize;
    let mut intensity: Vec<f32> = (0..n)
        .map(|i| {
            let mut m = f32::INFINITY;
            for c in 0..3 {
                m = m.min(g.data[i * 3 + c] - x.data[i * 3 + c]);
            }
            m.clamp(0.0, 255.0)
        })
        .collect();
    let mut sel: Vec<f32> = intensity
        .iter()
        .copied()
        .filter(|&v| v > THRESHOLD)
        .collect();
    // numpy: the median of an empty selection is NaN and max(16, NaN) is 16.
    let denom = match median(&mut sel) {
        Some(m) if m > 16.0 => m,
        _ => 16.0,
    };
    for v in &mut intensity {
        *v = *v / denom * 127.0;
    }
    let gray: Vec<u8> = intensity
        .iter()
        .map(|&v| v.clamp(0.0, 255.0) as u8)
        .collect();
    gray_to_rgb(&image::GrayImage::from_raw(img.width(), img.height(), gray).expect("size"))
}

/// numpy's median of `f32`: the middle value, or the `f32` mean of the two middle ones.
fn median(v: &mut [f32]) -> Option<f32> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// `shuffle`: controlnet_aux `ContentShuffleDetector` with its defaults (`f = 256`): two
/// "noise disks" (uniform noise on a `(H/256 + 2) × (W/256 + 2)` grid, bicubic-upscaled to
/// `(H + 512) × (W + 512)`, the centre `H × W` cut out and min-max normalised) scaled to
/// `[0, W−1]` and `[0, H−1]` give, per output pixel, the source position to sample
/// (`cv2.remap`, bilinear). The noise comes from ChaCha8 seeded with `seed`, not numpy's global
/// RNG, so the same seed gives the same output here but not the reference's.
pub fn shuffle(img: &RgbImage, seed: u64) -> RgbImage {
    const F: usize = 256;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (gh, gw) = (h / F + 2, w / F + 2);
    let mut grid = || -> Vec<f64> { (0..gh * gw).map(|_| rng.random::<f64>()).collect() };
    let (gx, gy) = (grid(), grid());
    shuffle_from_grids(img, &gx, &gy, F)
}

/// `shuffle` given its two uniform noise grids, each `(H/f + 2) × (W/f + 2)` row-major.
pub fn shuffle_from_grids(img: &RgbImage, grid_x: &[f64], grid_y: &[f64], f: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let fx = noise_disk(grid_x, h, w, f);
    let fy = noise_disk(grid_y, h, w, f);
    let mapx: Vec<f32> = fx.iter().map(|v| (v * (w - 1) as f64) as f32).collect();
    let mapy: Vec<f32> = fy.iter().map(|v| (v * (h - 1) as f64) as f32).collect();
    ops::remap_linear(img, &mapx, &mapy, w as u32, h as u32)
}

/// controlnet_aux `make_noise_disk(H, W, 1, F)` from its noise grid: values in `[0, 1]` (all 0
/// if the noise is flat).
fn noise_disk(grid: &[f64], h: usize, w: usize, f: usize) -> Vec<f64> {
    let (gh, gw) = (h / f + 2, w / f + 2);
    assert_eq!(
        grid.len(),
        gh * gw,
        "noise grid must be (H/f + 2) x (W/f + 2)"
    );
    let (bw, bh) = (w + 2 * f, h + 2 * f);
    let big = ops::resize_cubic_f64(grid, gw, gh, bw, bh);
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        out.extend_from_slice(&big[(y + f) * bw + f..(y + f) * bw + f + w]);
    }
    let min = out.iter().copied().fold(f64::INFINITY, f64::min);
    out.iter_mut().for_each(|v| *v -= min);
    let max = out.iter().copied().fold(0.0, f64::max);
    if max > 0.0 {
        out.iter_mut().for_each(|v| *v /= max);
    }
    out
}

fn gray_to_rgb(g: &image::GrayImage) -> RgbImage {
    let mut out = RgbImage::new(g.width(), g.height());
    for (o, p) in out.pixels_mut().zip(g.pixels()) {
        *o = image::Rgb([p[0], p[0], p[0]]);
    }
    out
}
