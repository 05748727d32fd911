//! controlnet_aux 0.0.10's `util.smart_resize` and `util.smart_resize_k`, which the body, hand
//! and face pipelines use for their images (`uint8`) and their network maps (`float32`, one
//! channel at a time, as the reference's recursion over channels does for anything but 1 or 3).
//!
//! Both are `cv2.resize` to `(int(Wt), int(Ht))` with `INTER_AREA` when
//! `k = (Ht + Wt) / (Ho + Wo) < 1` and `INTER_LANCZOS4` otherwise, `Ht`, `Wt` possibly
//! fractional (Python floats); `smart_resize_k(x, fx, fy)` is `smart_resize(x, (Ho·fy, Wo·fx))`.
//! The resizes are [`annotators::ops`]' OpenCV-exact ones; a same-size resize is a copy, as in
//! `cv::resize`.
use annotators::ops;
use image::RgbImage;

/// Whether `smart_resize` of a `width`×`height` array to `wt`×`ht` uses `INTER_AREA`:
/// `(ht + wt) / (height + width) < 1`, in `float64` as Python computes it.
pub fn uses_area(width: usize, height: usize, wt: f64, ht: f64) -> bool {
    (ht + wt) / ((height + width) as f64) < 1.0
}

/// The size `util.smart_resize_k(x, fx, fy)` gives a `width`×`height` array:
/// `(int(width · fx), int(height · fy))`.
pub fn smart_resize_k_size(width: usize, height: usize, fx: f64, fy: f64) -> (usize, usize) {
    ((width as f64 * fx) as usize, (height as f64 * fy) as usize)
}

/// `util.smart_resize(img, (ht, wt))` on a 3-channel `uint8` image: to `int(wt)`×`int(ht)`,
/// `INTER_AREA` when shrinking ([`uses_area`]), else `INTER_LANCZOS4`.
pub fn smart_resize_u8(img: &RgbImage, ht: f64, wt: f64) -> RgbImage {
    let (w, h) = img.dimensions();
    let (tw, th) = (wt as u32, ht as u32);
    if (tw, th) == (w, h) {
        img.clone()
    } else if uses_area(w as usize, h as usize, wt, ht) {
        ops::resize_area(img, tw, th)
    } else {
        ops::resize_lanczos4(img, tw, th)
    }
}

/// `util.smart_resize_k(img, fx, fy)` on a 3-channel `uint8` image: [`smart_resize_u8`] to
/// `(height · fy, width · fx)`.
pub fn smart_resize_k_u8(img: &RgbImage, fx: f64, fy: f64) -> RgbImage {
    let (w, h) = img.dimensions();
    smart_resize_u8(img, h as f64 * fy, w as f64 * fx)
}

/// `util.smart_resize(x, (th, tw))` on one `float32` plane (`sw`×`sh`, row-major):
/// [`ops::resize_area_f32`] when shrinking ([`uses_area`]), else [`ops::resize_lanczos4_f32`].
pub fn smart_resize_f32(src: &[f32], sw: usize, sh: usize, tw: usize, th: usize) -> Vec<f32> {
    if uses_area(sw, sh, tw as f64, th as f64) {
        ops::resize_area_f32(src, sw, sh, tw, th)
    } else {
        ops::resize_lanczos4_f32(src, sw, sh, tw, th)
    }
}
