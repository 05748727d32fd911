//! Images in and out: base64 (optionally a `data:` URL) to RGB with size limits checked from
//! the header before any pixel is decoded, and RGB to PNG/JPEG/WebP.
use base64::Engine as _;
use image::{ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use utoipa::ToSchema;

use crate::error::ApiError;

/// Encoding of returned images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn mime(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }
}

/// Decodes a base64 image given in `field`; at most `max_pixels` pixels.
pub fn decode_base64(field: &str, data: &str, max_pixels: u64) -> Result<RgbImage, ApiError> {
    let data = data.trim();
    // `data:image/png;base64,....` as browsers make them.
    let data = match data.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(',')
            .map(|(_, b)| b)
            .ok_or_else(|| ApiError::invalid(field, "a data URL without a comma"))?,
        None => data,
    };
    if data.is_empty() {
        return Err(ApiError::invalid(field, "empty image"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| ApiError::invalid(field, format!("not valid base64: {e}")))?;
    decode_bytes(field, &bytes, max_pixels)
}

/// Decodes image bytes (PNG, JPEG, WebP); at most `max_pixels` pixels.
pub fn decode_bytes(field: &str, bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ApiError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::invalid(field, format!("unreadable image: {e}")))?;
    if reader.format().is_none() {
        return Err(ApiError::invalid(
            field,
            "not an image (PNG, JPEG or WebP expected)",
        ));
    }
    // The header's size first: a small file may claim 100000×100000 pixels.
    let (w, h) = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::invalid(field, format!("unreadable image: {e}")))?
        .into_dimensions()
        .map_err(|e| ApiError::invalid(field, format!("unreadable image: {e}")))?;
    if w == 0 || h == 0 {
        return Err(ApiError::invalid(field, "the image has no pixels"));
    }
    if w as u64 * h as u64 > max_pixels {
        return Err(ApiError::invalid(
            field,
            format!("the image is {w}×{h}, over the limit of {max_pixels} pixels"),
        ));
    }
    let mut reader = reader;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(max_pixels * 8 + (1 << 20));
    reader.limits(limits);
    let image = reader
        .decode()
        .map_err(|e| ApiError::invalid(field, format!("unreadable image: {e}")))?;
    Ok(image.to_rgb8())
}

pub fn encode(image: &RgbImage, format: OutputFormat) -> Result<Vec<u8>, ApiError> {
    let mut out = Cursor::new(Vec::new());
    let f = match format {
        OutputFormat::Png => ImageFormat::Png,
        OutputFormat::Jpeg => ImageFormat::Jpeg,
        OutputFormat::Webp => ImageFormat::WebP,
    };
    image
        .write_to(&mut out, f)
        .map_err(|e| ApiError::internal(format!("encoding the image: {e}")))?;
    Ok(out.into_inner())
}

pub fn encode_base64(image: &RgbImage, format: OutputFormat) -> Result<String, ApiError> {
    Ok(base64::engine::general_purpose::STANDARD.encode(encode(image, format)?))
}

/// Runs `f` (image work: encoding, decoding) on a blocking thread, off the async runtime.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("{what}: {e}")))?
}

/// Encodes every image as base64 `format`, on a blocking thread.
pub async fn encode_base64_all(
    images: Vec<RgbImage>,
    format: OutputFormat,
) -> Result<Vec<String>, ApiError> {
    if images.is_empty() {
        return Ok(Vec::new());
    }
    blocking("encoding the images", move || {
        images.iter().map(|i| encode_base64(i, format)).collect()
    })
    .await
}

/// Encodes one image as `format` bytes, on a blocking thread.
pub async fn encode_blocking(image: RgbImage, format: OutputFormat) -> Result<Vec<u8>, ApiError> {
    blocking("encoding the image", move || encode(&image, format)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let img = RgbImage::from_fn(9, 7, |x, y| image::Rgb([x as u8, y as u8, 3]));
        let b64 = encode_base64(&img, OutputFormat::Png).unwrap();
        assert_eq!(decode_base64("image", &b64, 1000).unwrap(), img);
        let url = format!("data:image/png;base64,{b64}");
        assert_eq!(decode_base64("image", &url, 1000).unwrap(), img);
        for (bad, why) in [
            ("!!!", "base64"),
            ("aGVsbG8=", "not an image"),
            ("", "empty"),
        ] {
            let e = decode_base64("controls[0].image", bad, 1000).unwrap_err();
            assert_eq!(e.body.field.as_deref(), Some("controls[0].image"));
            assert!(e.body.error.contains(why), "{}", e.body.error);
        }
        let e = decode_base64("image", &b64, 50).unwrap_err();
        assert!(e.body.error.contains("over the limit"));
    }
}
