//! Host images ↔ device tensors, and fitting a hint or init image to the output size with the
//! three resize modes of diffusers (and of the A1111 ControlNet extension).
use candle_core::{DType, Device, Result, Tensor};
use image::{imageops, imageops::FilterType, RgbImage};
use std::str::FromStr;

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeMode {
    /// Stretch to the size (diffusers "default", A1111 "Just Resize").
    JustResize,
    /// Scale to cover the size, then crop the middle (diffusers "crop", A1111 "Crop and Resize").
    #[default]
    CropAndResize,
    /// Scale to fit inside, then fill the margins by stretching the edge rows or columns
    /// (diffusers "fill", A1111 "Resize and Fill").
    ResizeAndFill,
}

impl FromStr for ResizeMode {
    type Err = Error;

    fn from_str(s: &str) -> std::result::Result<Self, Error> {
        match s.to_ascii_lowercase().replace(['-', '_', ' '], "").as_str() {
            "justresize" | "resize" | "default" | "0" => Ok(Self::JustResize),
            "cropandresize" | "crop" | "1" => Ok(Self::CropAndResize),
            "resizeandfill" | "fill" | "2" => Ok(Self::ResizeAndFill),
            _ => Err(Error::Config(format!(
                "unknown resize mode {s:?} (expected just-resize, crop-and-resize or resize-and-fill)"
            ))),
        }
    }
}

fn resize(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.dimensions() == (w, h) {
        return img.clone();
    }
    // Lanczos, as diffusers' image processor resamples.
    imageops::resize(img, w.max(1), h.max(1), FilterType::Lanczos3)
}

/// Fits `img` to `width`×`height` (diffusers' integer arithmetic for the intermediate size).
pub fn fit(img: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> RgbImage {
    let (iw, ih) = img.dimensions();
    if (iw, ih) == (width, height) {
        return img.clone();
    }
    let ratio = width as f64 / height as f64;
    let src_ratio = iw as f64 / ih as f64;
    match mode {
        ResizeMode::JustResize => resize(img, width, height),
        ResizeMode::CropAndResize => {
            let (sw, sh) = if ratio > src_ratio {
                (width, ih * width / iw)
            } else {
                (iw * height / ih, height)
            };
            let resized = resize(img, sw, sh);
            imageops::crop_imm(&resized, (sw - width) / 2, (sh - height) / 2, width, height)
                .to_image()
        }
        ResizeMode::ResizeAndFill => {
            let (sw, sh) = if ratio < src_ratio {
                (width, ih * width / iw)
            } else {
                (iw * height / ih, height)
            };
            let resized = resize(img, sw, sh);
            let mut out = RgbImage::new(width, height);
            let (x0, y0) = ((width - sw) / 2, (height - sh) / 2);
            imageops::replace(&mut out, &resized, x0 as i64, y0 as i64);
            // Stretch the edge rows (or columns) over the margins.
            for y in 0..height {
                for x in 0..width {
                    let inside = x >= x0 && x < x0 + sw && y >= y0 && y < y0 + sh;
                    if !inside {
                        let sx = x.clamp(x0, x0 + sw - 1) - x0;
                        let sy = y.clamp(y0, y0 + sh - 1) - y0;
                        out.put_pixel(x, y, *resized.get_pixel(sx, sy));
                    }
                }
            }
            out
        }
    }
}

/// `[1, 3, H, W]` in 0..1 on `device` (the ControlNet hint convention).
/// One upload (of the bytes), counted by [`crate::transfer`].
pub fn to_unit_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    crate::transfer::upload(img.as_raw().clone(), (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?
        .affine(1.0 / 255.0, 0.0)?
        .unsqueeze(0)
}

/// `[n, 3, H, W]` in −1..1 (the VAE's range) → images, as diffusers post-processes:
/// `round(clamp(x/2 + 0.5, 0, 1) · 255)`, computed on the device: one download (of the bytes).
pub fn from_signed_tensor(t: &Tensor) -> Result<Vec<RgbImage>> {
    let (n, c, h, w) = t.dims4()?;
    if c != 3 {
        candle_core::bail!("expected 3 channels, got {c}")
    }
    let unit = crate::transfer::clamp(&((t.to_dtype(DType::F32)? / 2.0)? + 0.5)?, 0.0, 1.0)?;
    let bytes = crate::transfer::download::<u8>(
        &unit
            .affine(255.0, 0.0)?
            .round()?
            .permute((0, 2, 3, 1))?
            .to_dtype(DType::U8)?,
    )?;
    let per = h * w * 3;
    Ok((0..n)
        .map(|i| {
            RgbImage::from_raw(w as u32, h as u32, bytes[i * per..(i + 1) * per].to_vec())
                .expect("buffer size matches")
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]))
    }

    #[test]
    fn every_mode_gives_the_requested_size() {
        for mode in [
            ResizeMode::JustResize,
            ResizeMode::CropAndResize,
            ResizeMode::ResizeAndFill,
        ] {
            for (w, h) in [(64, 32), (32, 64), (48, 48)] {
                assert_eq!(fit(&gradient(40, 20), w, h, mode).dimensions(), (w, h));
            }
        }
    }

    #[test]
    fn crop_keeps_the_middle_and_fill_stretches_edges() {
        // A 40×20 image into 20×20: crop scales to 40×20 then keeps columns 10..30.
        let src = gradient(40, 20);
        let crop = fit(&src, 20, 20, ResizeMode::CropAndResize);
        assert_eq!(crop.get_pixel(0, 0)[0], 10);
        // Fill scales to 20×10 and centers it at rows 5..15; rows above copy row 5.
        let fill = fit(&src, 20, 20, ResizeMode::ResizeAndFill);
        assert_eq!(fill.get_pixel(3, 0), fill.get_pixel(3, 5));
        assert_eq!(fill.get_pixel(3, 19), fill.get_pixel(3, 14));
    }

    #[test]
    fn tensors_round_trip() {
        let img = gradient(6, 4);
        let t = to_unit_tensor(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 4, 6]);
        let back = from_signed_tensor(&((t * 2.0).unwrap() - 1.0).unwrap()).unwrap();
        assert_eq!(back[0], img);
    }
}
