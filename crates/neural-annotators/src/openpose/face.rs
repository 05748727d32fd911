//! OpenPose face (`FaceNet`, `facenet.pth`), as controlnet_aux 0.0.10's
//! `OpenposeDetector.detect_face` runs it.
//!
//! Reference steps, for one body of the detect image (`H`×`W`, the photo flipped to BGR):
//! 1. [`face_box`] (`util.faceDetect`): needs the nose (0) and at least one of the eyes / ears
//!    (14, 15, 16, 17); `width = max(3 · d(eye), 1.5 · d(ear))` over those found, with
//!    `d = max(|Δx|, |Δy|)` from the nose; top-left `nose − width` clipped at 0; side
//!    `2 · width`, cut to `W − x` / `H − y` only when `x + width` / `y + width` (not
//!    `2 · width`) passes the edge — so the crop `img[y:y+w, x:x+w]` can run past the image,
//!    and numpy's slicing then makes it smaller (not square); under 20 pixels → no face.
//!    The body is in PIXELS there.
//! 2. [`face_heatmaps`] (`Face.__call__`) on the crop (`Hc`×`Wc`): `util.smart_resize` to
//!    384×384 ([`FACE_INPUT_SIZE`]; `INTER_AREA` when shrinking, else `INTER_LANCZOS4`),
//!    `x / 256 − 0.5`, [`FaceNet::forward`] → the last stage's 71 maps at 48×48,
//!    `F.interpolate(…, (Hc, Wc), mode="bilinear", align_corners=True)`;
//! 3. [`face_peaks`] (`Face.compute_peaks_from_heatmaps`): for EVERY one of the 71 maps (the
//!    70 landmarks and the background map), the pixels `> 0.05`; none → the map is skipped
//!    (so the result has up to 71 points, and a missing landmark shifts the ones after it);
//!    else the first maximum among them in row-major order, `[x, y]`;
//! 4. [`detect_face`]: peaks to `float32`, a coordinate `< 1e-6` becomes −1, others get the
//!    box offset; divided by `W` / `H` in `float32`. No peak at all → no face.
//!
//! `Face.__init__`'s `inference_size` (736), `gaussian_sigma` (2.5) and
//! `heatmap_peak_thresh` (0.1) are not used by any of these steps.
//!
//! The network is the hand's CPM ([`crate::openpose::hand`]) with 71 maps; the file's keys are
//! the module's own (`conv1_1.weight`, …, `conv6_2_CPM.bias`, `Mconv1_stage2.weight`, …,
//! `Mconv7_stage6.bias`), loaded with a plain `load_state_dict`.
use candle_core::Tensor;
use candle_nn::VarBuilder;
use image::RgbImage;

use super::hand::{body_to_pixels, crop_bgr, place_peaks, planar_input, py_max, py_min, Cpm};
use super::{BodyResult, FaceResult};
use crate::Result;

/// Output maps of the face network (70 landmarks and the background).
pub const CHANNELS: usize = 71;
/// `w_size`: the crop is resized to 384×384 for the network.
pub const FACE_INPUT_SIZE: usize = 384;
/// Peak threshold of `compute_peaks_from_heatmaps`.
pub const THRESHOLD: f32 = 0.05;

/// `FaceNet`, weights named as in `facenet.pth`.
#[derive(Debug, Clone)]
pub struct FaceNet {
    cpm: Cpm,
}

impl FaceNet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            cpm: Cpm::new(vb, CHANNELS)?,
        })
    }

    /// The file's keys and shapes (what [`FaceNet::new`] reads), in the file's order.
    pub fn shapes() -> Vec<(String, Vec<usize>)> {
        super::hand::cpm_shapes(CHANNELS)
    }

    /// `x`: `1×3×h×w` (BGR / 256 − 0.5) → the LAST of `FaceNet.forward`'s six stage outputs
    /// (the one `Face.__call__` uses), `1×71×⌊h/8⌋×⌊w/8⌋`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.cpm.forward(x)
    }
}

/// The face box of `util.faceDetect`: top-left `(x, y)` and side `w` (the crop
/// `img[y:y+w, x:x+w]` may be cut by the image's edges).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaceBox {
    pub x: i64,
    pub y: i64,
    pub w: i64,
}

/// `util.faceDetect(body, img)` for an image of `image_w`×`image_h`, the body in PIXELS.
pub fn face_box(body: &BodyResult, image_w: usize, image_h: usize) -> Option<FaceBox> {
    let kp = |i: usize| body.keypoints.get(i).copied().flatten();
    let head = kp(0)?;
    let (left_eye, right_eye, left_ear, right_ear) = (kp(14), kp(15), kp(16), kp(17));
    if left_eye.is_none() && right_eye.is_none() && left_ear.is_none() && right_ear.is_none() {
        return None;
    }
    let (x0, y0) = (head.x, head.y);
    let mut width = 0.0f64;
    for (k, factor) in [
        (left_eye, 3.0),
        (right_eye, 3.0),
        (left_ear, 1.5),
        (right_ear, 1.5),
    ] {
        if let Some(k) = k {
            let d = py_max((x0 - k.x).abs(), (y0 - k.y).abs());
            width = py_max(width, d * factor);
        }
    }
    let (mut x, mut y) = (x0 - width, y0 - width);
    if x < 0.0 {
        x = 0.0;
    }
    if y < 0.0 {
        y = 0.0;
    }
    let mut width1 = width * 2.0;
    let mut width2 = width * 2.0;
    if x + width > image_w as f64 {
        width1 = image_w as f64 - x;
    }
    if y + width > image_h as f64 {
        width2 = image_h as f64 - y;
    }
    let side = py_min(width1, width2);
    if side >= 20.0 {
        Some(FaceBox {
            x: x as i64,
            y: y as i64,
            w: side as i64,
        })
    } else {
        None
    }
}

/// The network input of step 2: the BGR crop `smart_resize`d to `input_size`×`input_size`
/// ([`FACE_INPUT_SIZE`] in the reference), `1×3×h×w` planar `float32` `v / 256 − 0.5`, with
/// `(h, w)`.
pub fn face_input(crop: &RgbImage, input_size: usize) -> (Vec<f32>, usize, usize) {
    let s = input_size as f64;
    let resized = super::resize::smart_resize_u8(crop, s, s);
    let (rh, rw) = (resized.height() as usize, resized.width() as usize);
    (planar_input(&resized), rh, rw)
}

/// The end of step 2: the last stage's maps (`1×71×h×w`, any device) upsampled to the crop's
/// `hc`×`wc` (`F.interpolate`, bilinear, `align_corners=True`, on the maps' device) and
/// brought to the host: `71×hc×wc` row-major `float32`.
pub fn maps_to_crop(maps: &Tensor, hc: usize, wc: usize) -> Result<Vec<f32>> {
    let up = crate::tensor_ops::interpolate_bilinear(maps, (hc, wc), true)?;
    Ok(up
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Step 2 with the network: the BGR crop (`hc`×`wc`) → the 71 maps at the crop's size,
/// `71×hc×wc` row-major `float32` ([`face_input`], [`FaceNet::forward`], [`maps_to_crop`]).
pub fn face_heatmaps(net: &FaceNet, crop: &RgbImage, input_size: usize) -> Result<Vec<f32>> {
    let (hc, wc) = (crop.height() as usize, crop.width() as usize);
    let (planar, rh, rw) = face_input(crop, input_size);
    let cpm = &net.cpm;
    let x = Tensor::from_vec(planar, (1, 3, rh, rw), &cpm.device)?.to_dtype(cpm.dtype)?;
    maps_to_crop(&net.forward(&x)?, hc, wc)
}

/// Step 3: `compute_peaks_from_heatmaps` on `channels` maps of `h`×`w` (row-major, map after
/// map): for each map with a value `> 0.05`, `[x, y]` of its first maximum among those
/// values in row-major order; maps without one are skipped.
pub fn face_peaks(heatmaps: &[f32], channels: usize, h: usize, w: usize) -> Vec<[i64; 2]> {
    assert_eq!(heatmaps.len(), channels * h * w);
    let mut out = Vec::new();
    for map in heatmaps.chunks(h * w) {
        let mut best: Option<(usize, f32)> = None;
        for (i, &v) in map.iter().enumerate() {
            if v > THRESHOLD && best.is_none_or(|(_, b)| v > b) {
                best = Some((i, v));
            }
        }
        if let Some((i, _)) = best {
            out.push([(i % w) as i64, (i / w) as i64]);
        }
    }
    out
}

/// `OpenposeDetector.detect_face(body, img)` with the body in PIXELS (as the reference calls
/// it); `image` is the detect image in RGB (flipped to BGR here). `input_size`:
/// [`FACE_INPUT_SIZE`]. `None` when there is no face box or no peak.
pub fn detect_face_px(
    net: &FaceNet,
    body: &BodyResult,
    image: &RgbImage,
    input_size: usize,
) -> Result<Option<FaceResult>> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let Some(b) = face_box(body, w, h) else {
        return Ok(None);
    };
    let Some(crop) = crop_bgr(image, b.x, b.y, b.w, b.w) else {
        return Ok(None);
    };
    let (hc, wc) = (crop.height() as usize, crop.width() as usize);
    let maps = face_heatmaps(net, &crop, input_size)?;
    let peaks = face_peaks(&maps, CHANNELS, hc, wc);
    if peaks.is_empty() {
        return Ok(None);
    }
    Ok(Some(place_peaks(&peaks, b.x, b.y, w, h)))
}

/// `detect_face` for a body as `detect_poses` returns it (normalised by the detect image's
/// `W`, `H`): brought back to pixels with [`body_to_pixels`], then [`detect_face_px`] at
/// [`FACE_INPUT_SIZE`]. The face comes back normalised, as in `PoseResult`.
pub fn detect_face(
    net: &FaceNet,
    body: &BodyResult,
    image: &RgbImage,
) -> Result<Option<FaceResult>> {
    let px = body_to_pixels(body, image.width() as usize, image.height() as usize);
    detect_face_px(net, &px, image, FACE_INPUT_SIZE)
}
