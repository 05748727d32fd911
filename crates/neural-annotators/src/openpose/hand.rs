//! OpenPose hands (`handpose_model`, `hand_pose_model.pth`), as controlnet_aux 0.0.10's
//! `OpenposeDetector.detect_hands` runs them.
//!
//! Reference steps, for one body of the detect image (`H`×`W`, the photo flipped to BGR):
//! 1. [`hand_boxes`] (`util.handDetect`): for the left arm (shoulder 5, elbow 6, wrist 7) and
//!    then the right (2, 3, 4), when all three are found: centre `wrist + 0.33 (wrist − elbow)`,
//!    width `1.5 max(|wrist − elbow|, 0.9 |elbow − shoulder|)`, top-left `centre − width / 2`
//!    clipped at 0, width cut to what fits in the image (`min` of the two cuts), boxes under 20
//!    pixels dropped; `(int(x), int(y), int(width), is_left)`. The body is in PIXELS there.
//! 2. [`estimate_hand`] (`Hand.__call__`) on the crop `img[y:y+w, x:x+w]` (`Hr`×`Wr`):
//!    `cv2.GaussianBlur(σ 0.8)` on the `uint8` crop; for each scale `s` of
//!    [`SCALE_SEARCH`] (`multiplier = s · 368`): `util.smart_resize` of the crop to
//!    `int(m)`×`int(m)` (`INTER_AREA` when shrinking, else `INTER_LANCZOS4`), padded right and
//!    down to a multiple of 8 with 128, `x / 256 − 0.5` (`float32`), [`HandNet::forward`] →
//!    22 maps at ⅛; each map `smart_resize_k`'d ×8 (`INTER_LANCZOS4`, `float32`), the padding cut
//!    off, `smart_resize`d to 128×128 (`INTER_AREA` or `INTER_LANCZOS4` by the same rule), and
//!    `map / n_scales` (`float32`) added to a `float64` average;
//! 3. [`hand_peak`] per part (21 of the 22 maps): `scipy.ndimage.gaussian_filter(σ 3)` of the
//!    averaged map ([`annotators::scipy::gaussian_filter`]), `> 0.05`; no pixel → `[0, 0]`; else the
//!    8-connected components (`skimage.measure.label`), the one with the largest sum of the
//!    UNSMOOTHED map (numpy's pairwise sum, [`numpy_sum`], first on ties) kept, everything else zeroed,
//!    `util.npmax` (first maximum in row-major order) → `(y, x)` scaled to the crop:
//!    `int(y · Hr / 128)`, `int(x · Wr / 128)`;
//! 4. [`detect_hands`] (`detect_hands` of `__init__.py`): peaks to `float32`; a coordinate
//!    `< 1e-6` becomes −1, others get the box offset; divided by `W` (x) and `H` (y) in
//!    `float32`. The left box's result is the left hand, the right box's the right hand.
//!
//! Host-side arithmetic follows the reference's precision and order: the `uint8` blur is
//! OpenCV's fixed-point one ([`annotators::post::gaussian_blur_u8`]); `smart_resize` is
//! [`super::resize`], whose `uint8` resizes are [`annotators::ops::resize_area`] /
//! [`annotators::ops::resize_lanczos4`] and whose `float32` ones,
//! [`annotators::ops::resize_lanczos4_f32`] / [`annotators::ops::resize_area_f32`], reproduce
//! OpenCV 4.x's summation order (bit-equal on the fixtures); the Gaussian filter is scipy's
//! ([`annotators::scipy::gaussian_filter`]: `float64`, symmetric-kernel summation order,
//! `mode="reflect"`).
//!
//! The network is the same CPM as the face's ([`crate::openpose::face`]): a VGG-19 front to
//! `conv5_3_CPM` (128 channels at ⅛), a 1×1 stage 1 and five 7×7 refinement stages, each fed
//! the previous stage's maps next to the features. Weight names are the FILE's keys
//! (`conv1_1.weight`, …, `Mconv7_stage6.bias`; `util.transfer` maps them onto the model's
//! `model1_0.conv1_1.weight`, …).
use annotators::post::gaussian_blur_u8;
use annotators::scipy::{self, numpy_sum};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use image::{GrayImage, RgbImage};

use super::{resize, BodyResult, HandResult, Keypoint};
use crate::Result;

/// `Hand.__call__`'s `scale_search`.
pub const SCALE_SEARCH: [f64; 4] = [0.5, 1.0, 1.5, 2.0];
/// `boxsize`: the crop is resized to `scale · 368` pixels square.
pub const BOXSIZE: f64 = 368.0;
/// The network's output stride and the padding multiple.
pub const STRIDE: usize = 8;
/// Padding value (`padValue`).
pub const PAD_VALUE: u8 = 128;
/// Peak threshold on the smoothed map (`thre`).
pub const THRESHOLD: f64 = 0.05;
/// Side of the averaged heatmaps (`wsize`).
pub const HEATMAP_SIZE: usize = 128;
/// Hand keypoints (maps 0..21 of the 22; the last is the background).
pub const PARTS: usize = 21;
/// Output channels of the hand network.
pub const CHANNELS: usize = 22;

// ---------------------------------------------------------------------------------------------
// The network (shared with the face)
// ---------------------------------------------------------------------------------------------

/// The VGG front shared by the hand and face networks: name, in, out, max-pool after it.
const VGG: [(&str, usize, usize, bool); 15] = [
    ("conv1_1", 3, 64, false),
    ("conv1_2", 64, 64, true),
    ("conv2_1", 64, 128, false),
    ("conv2_2", 128, 128, true),
    ("conv3_1", 128, 256, false),
    ("conv3_2", 256, 256, false),
    ("conv3_3", 256, 256, false),
    ("conv3_4", 256, 256, true),
    ("conv4_1", 256, 512, false),
    ("conv4_2", 512, 512, false),
    ("conv4_3", 512, 512, false),
    ("conv4_4", 512, 512, false),
    ("conv5_1", 512, 512, false),
    ("conv5_2", 512, 512, false),
    ("conv5_3_CPM", 512, 128, false),
];

/// Every conv of a CPM with `channels` output maps: (name, in, out, kernel), in file order.
fn cpm_layers(channels: usize) -> Vec<(String, usize, usize, usize)> {
    let mut out: Vec<(String, usize, usize, usize)> = VGG
        .iter()
        .map(|&(n, i, o, _)| (n.to_string(), i, o, 3))
        .collect();
    out.push(("conv6_1_CPM".into(), 128, 512, 1));
    out.push(("conv6_2_CPM".into(), 512, channels, 1));
    for t in 2..=6 {
        out.push((format!("Mconv1_stage{t}"), channels + 128, 128, 7));
        for m in 2..=5 {
            out.push((format!("Mconv{m}_stage{t}"), 128, 128, 7));
        }
        out.push((format!("Mconv6_stage{t}"), 128, 128, 1));
        out.push((format!("Mconv7_stage{t}"), 128, channels, 1));
    }
    out
}

/// The state-dict keys and shapes of a CPM with `channels` output maps (weight then bias per
/// conv, in the file's order): the hand file with 22, the face file with 71.
pub fn cpm_shapes(channels: usize) -> Vec<(String, Vec<usize>)> {
    cpm_layers(channels)
        .into_iter()
        .flat_map(|(n, i, o, k)| {
            [
                (format!("{n}.weight"), vec![o, i, k, k]),
                (format!("{n}.bias"), vec![o]),
            ]
        })
        .collect()
}

/// The convolutional pose machine both `handpose_model` and `FaceNet` are: ReLU after every
/// conv but `conv6_2_CPM` and the `Mconv7_stage*`; 2×2 max-pools after `conv1_2`, `conv2_2`,
/// `conv3_4`; stage `t ≥ 2` sees `cat([maps of stage t−1, features])`.
#[derive(Debug, Clone)]
pub(crate) struct Cpm {
    vgg: Vec<(Conv2d, bool)>,
    stage1: [Conv2d; 2],
    stages: Vec<Vec<Conv2d>>,
    pub(crate) device: Device,
    pub(crate) dtype: DType,
}

impl Cpm {
    pub(crate) fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let layers = cpm_layers(channels);
        let mut convs = Vec::with_capacity(layers.len());
        for (name, i, o, k) in &layers {
            let cfg = Conv2dConfig {
                padding: k / 2,
                ..Default::default()
            };
            convs.push(candle_nn::conv2d(*i, *o, *k, cfg, vb.pp(name))?);
        }
        let mut it = convs.into_iter();
        let vgg = VGG
            .iter()
            .map(|&(_, _, _, pool)| (it.next().expect("15 VGG convs"), pool))
            .collect();
        let stage1 = [it.next().expect("conv6_1"), it.next().expect("conv6_2")];
        let stages = (0..5).map(|_| it.by_ref().take(7).collect()).collect();
        Ok(Self {
            vgg,
            stage1,
            stages,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    /// The maps of the last stage: `1×C×⌊h/8⌋×⌊w/8⌋`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (conv, pool) in &self.vgg {
            h = conv.forward(&h)?.relu()?;
            if *pool {
                h = h.max_pool2d(2)?;
            }
        }
        let features = h;
        let mut out = self.stage1[1].forward(&self.stage1[0].forward(&features)?.relu()?)?;
        for stage in &self.stages {
            let mut h = Tensor::cat(&[&out, &features], 1)?;
            for conv in &stage[..6] {
                h = conv.forward(&h)?.relu()?;
            }
            out = stage[6].forward(&h)?;
        }
        Ok(out)
    }

    /// Runs the network on a host image, already laid out as `1×3×h×w` `f32` (planar);
    /// returns the last stage's maps as `f32`, `C×⌊h/8⌋×⌊w/8⌋` row-major, with their size.
    pub(crate) fn run_planar(
        &self,
        planar: Vec<f32>,
        h: usize,
        w: usize,
    ) -> Result<(Vec<f32>, usize, usize)> {
        let x = Tensor::from_vec(planar, (1, 3, h, w), &self.device)?.to_dtype(self.dtype)?;
        let y = self.forward(&x)?;
        let (_, _, oh, ow) = y.dims4()?;
        let v = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok((v, oh, ow))
    }
}

/// `handpose_model`, weights named as in `hand_pose_model.pth` (`conv1_1.weight`, …,
/// `conv6_2_CPM.bias`, `Mconv1_stage2.weight`, …, `Mconv7_stage6.bias`).
#[derive(Debug, Clone)]
pub struct HandNet {
    cpm: Cpm,
}

impl HandNet {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            cpm: Cpm::new(vb, CHANNELS)?,
        })
    }

    /// The file's keys and shapes (what [`HandNet::new`] reads), in the file's order.
    pub fn shapes() -> Vec<(String, Vec<usize>)> {
        cpm_shapes(CHANNELS)
    }

    /// `x`: `1×3×h×w` (BGR / 256 − 0.5, on the network's device and dtype) → the last stage's
    /// 22 maps, `1×22×⌊h/8⌋×⌊w/8⌋`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.cpm.forward(x)
    }

    /// [`HandNet::forward`] on a host `1×3×h×w` `f32` input; the maps come back as `f32`
    /// (`22×oh×ow`, row-major) with `(oh, ow)`.
    pub fn run(&self, planar: Vec<f32>, h: usize, w: usize) -> Result<(Vec<f32>, usize, usize)> {
        self.cpm.run_planar(planar, h, w)
    }
}

// ---------------------------------------------------------------------------------------------
// Boxes
// ---------------------------------------------------------------------------------------------

/// A hand box of `util.handDetect`: top-left `(x, y)`, side `w`, and whether it is the left
/// hand (from the left arm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandBox {
    pub x: i64,
    pub y: i64,
    pub w: i64,
    pub is_left: bool,
}

/// `util.handDetect(body, img)` for an image of `width`×`height`, the body in PIXEL
/// coordinates (as the reference calls it). Left box first, then right; boxes under 20 pixels
/// dropped.
pub fn hand_boxes(body: &BodyResult, width: usize, height: usize) -> Vec<HandBox> {
    const RATIO_WRIST_ELBOW: f64 = 0.33;
    let kp = |i: usize| body.keypoints.get(i).copied().flatten();
    let (image_w, image_h) = (width as f64, height as f64);
    let mut arms = Vec::with_capacity(2);
    // Left: shoulder 5, elbow 6, wrist 7; right: 2, 3, 4.
    for (s, e, w, is_left) in [(5, 6, 7, true), (2, 3, 4, false)] {
        if let (Some(s), Some(e), Some(w)) = (kp(s), kp(e), kp(w)) {
            arms.push((s, e, w, is_left));
        }
    }
    let mut out = Vec::with_capacity(2);
    for (s, e, w, is_left) in arms {
        let (x1, y1, x2, y2, x3, y3) = (s.x, s.y, e.x, e.y, w.x, w.y);
        let mut x = x3 + RATIO_WRIST_ELBOW * (x3 - x2);
        let mut y = y3 + RATIO_WRIST_ELBOW * (y3 - y2);
        let wrist_elbow = ((x3 - x2).powi(2) + (y3 - y2).powi(2)).sqrt();
        let elbow_shoulder = ((x2 - x1).powi(2) + (y2 - y1).powi(2)).sqrt();
        let mut width = 1.5 * py_max(wrist_elbow, 0.9 * elbow_shoulder);
        x -= width / 2.0;
        y -= width / 2.0;
        if x < 0.0 {
            x = 0.0;
        }
        if y < 0.0 {
            y = 0.0;
        }
        let mut width1 = width;
        let mut width2 = width;
        if x + width > image_w {
            width1 = image_w - x;
        }
        if y + width > image_h {
            width2 = image_h - y;
        }
        width = py_min(width1, width2);
        if width >= 20.0 {
            out.push(HandBox {
                x: x as i64,
                y: y as i64,
                w: width as i64,
                is_left,
            });
        }
    }
    out
}

/// Python's `max(a, b)`: `b` if `b > a`, else `a` (the first on ties / NaN).
pub(crate) fn py_max(a: f64, b: f64) -> f64 {
    if b > a {
        b
    } else {
        a
    }
}

/// Python's `min(a, b)`: `b` if `b < a`, else `a`.
pub(crate) fn py_min(a: f64, b: f64) -> f64 {
    if b < a {
        b
    } else {
        a
    }
}

/// A body normalised as `detect_poses` returns it (`x / W`, `y / H`), back in pixels. The
/// reference's body keypoints are whole pixels (peak positions), so each coordinate within
/// rounding of an integer snaps to it — `(x / W) · W` is not always `x` in floating point.
pub fn body_to_pixels(body: &BodyResult, width: usize, height: usize) -> BodyResult {
    let back = |v: f64, size: usize| {
        let p = v * size as f64;
        let r = p.round();
        if (p - r).abs() <= 1e-9 * size.max(1) as f64 {
            r
        } else {
            p
        }
    };
    BodyResult {
        keypoints: body
            .keypoints
            .iter()
            .map(|k| {
                k.map(|k| Keypoint {
                    x: back(k.x, width),
                    y: back(k.y, height),
                    ..k
                })
            })
            .collect(),
        total_score: body.total_score,
        total_parts: body.total_parts,
    }
}

/// `img[y:y+h, x:x+w]` with numpy's clipping at the image's right and bottom edges, with the
/// channels reversed (the reference works on BGR). `None` when the slice is empty.
pub fn crop_bgr(image: &RgbImage, x: i64, y: i64, w: i64, h: i64) -> Option<RgbImage> {
    let (iw, ih) = (image.width() as i64, image.height() as i64);
    let (x0, y0) = (x.clamp(0, iw), y.clamp(0, ih));
    let (x1, y1) = ((x + w).clamp(0, iw), (y + h).clamp(0, ih));
    if x1 <= x0 || y1 <= y0 {
        return None;
    }
    Some(RgbImage::from_fn(
        (x1 - x0) as u32,
        (y1 - y0) as u32,
        |cx, cy| {
            let p = image.get_pixel(x0 as u32 + cx, y0 as u32 + cy).0;
            image::Rgb([p[2], p[1], p[0]])
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// The per-crop estimate
// ---------------------------------------------------------------------------------------------

/// `cv2.GaussianBlur(img, (0, 0), sigma)` on a 3-channel `uint8` image (OpenCV's bit-exact
/// fixed-point path, channel by channel).
pub fn blur_u8_rgb(img: &RgbImage, sigma: f64) -> RgbImage {
    let (w, h) = img.dimensions();
    let planes: Vec<GrayImage> = (0..3)
        .map(|c| {
            let g = GrayImage::from_fn(w, h, |x, y| image::Luma([img.get_pixel(x, y).0[c]]));
            gaussian_blur_u8(&g, sigma)
        })
        .collect();
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            planes[0].get_pixel(x, y).0[0],
            planes[1].get_pixel(x, y).0[0],
            planes[2].get_pixel(x, y).0[0],
        ])
    })
}

/// `util.padRightDownCorner(img, 8, 128)`: the image padded with 128 at the bottom and right
/// to multiples of 8; returns it with `(pad_down, pad_right)`.
pub fn pad_right_down(img: &RgbImage) -> (RgbImage, usize, usize) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let pad_down = if h % STRIDE == 0 {
        0
    } else {
        STRIDE - h % STRIDE
    };
    let pad_right = if w % STRIDE == 0 {
        0
    } else {
        STRIDE - w % STRIDE
    };
    let padded = RgbImage::from_fn((w + pad_right) as u32, (h + pad_down) as u32, |x, y| {
        if (x as usize) < w && (y as usize) < h {
            *img.get_pixel(x, y)
        } else {
            image::Rgb([PAD_VALUE; 3])
        }
    });
    (padded, pad_down, pad_right)
}

/// The network input of an image: `1×3×h×w` planar `float32`, `v / 256 − 0.5`, channels as
/// they are stored (the reference's BGR).
pub fn planar_input(img: &RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let mut planar = vec![0f32; 3 * h * w];
    for (c, plane) in planar.chunks_mut(h * w).enumerate() {
        for (i, v) in plane.iter_mut().enumerate() {
            *v = raw[i * 3 + c] as f32 / 256.0 - 0.5;
        }
    }
    planar
}

/// Steps 2 of the module docs up to the averaged maps, with the network abstracted: `run`
/// gets the `1×3×h×w` input and returns `22×oh×ow` maps with `(oh, ow)`. `crop` is BGR;
/// `scales` is `scale_search` ([`SCALE_SEARCH`] in the reference). Returns the `float64`
/// average, `128×128×22` (`HWC`, as `heatmap_avg`).
pub fn hand_heatmaps_with<F>(crop: &RgbImage, scales: &[f64], mut run: F) -> Result<Vec<f64>>
where
    F: FnMut(Vec<f32>, usize, usize) -> Result<(Vec<f32>, usize, usize)>,
{
    let n = HEATMAP_SIZE;
    let mut avg = vec![0f64; n * n * CHANNELS];
    let blurred = blur_u8_rgb(crop, 0.8);
    let count = scales.len() as f32;
    for &s in scales {
        let m = s * BOXSIZE;
        let resized = resize::smart_resize_u8(&blurred, m, m);
        let (padded, pad_down, pad_right) = pad_right_down(&resized);
        let (ph, pw) = (padded.height() as usize, padded.width() as usize);
        let (maps, oh, ow) = run(planar_input(&padded), ph, pw)?;
        let (uh, uw) = (oh * STRIDE, ow * STRIDE);
        let (ch, cw) = (uh.min(ph - pad_down), uw.min(pw - pad_right));
        // Each map is resized on its own (in parallel); the sums stay in scale order.
        let resize_map = |c: usize| -> Vec<f32> {
            let plane = &maps[c * oh * ow..(c + 1) * oh * ow];
            let up = resize::smart_resize_f32(plane, ow, oh, uw, uh);
            let cut: Vec<f32> = (0..ch)
                .flat_map(|y| up[y * uw..y * uw + cw].iter().copied())
                .collect();
            resize::smart_resize_f32(&cut, cw, ch, n, n)
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |t| t.get())
            .clamp(1, CHANNELS);
        let per = CHANNELS.div_ceil(threads);
        let resized: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..CHANNELS)
                .step_by(per)
                .map(|c0| {
                    let resize_map = &resize_map;
                    s.spawn(move || {
                        (c0..(c0 + per).min(CHANNELS))
                            .map(resize_map)
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("resize thread"))
                .collect()
        });
        for (c, fin) in resized.iter().enumerate() {
            for (i, v) in fin.iter().enumerate() {
                avg[i * CHANNELS + c] += (v / count) as f64;
            }
        }
    }
    Ok(avg)
}

/// `Hand.__call__` with the network: the 21 peaks `[x, y]` in crop pixels (`[0, 0]` where a
/// part is not found), for a BGR crop, at `scales` ([`SCALE_SEARCH`] in the reference).
pub fn estimate_hand(net: &HandNet, crop: &RgbImage, scales: &[f64]) -> Result<Vec<[i64; 2]>> {
    let avg = hand_heatmaps_with(crop, scales, |x, h, w| net.run(x, h, w))?;
    Ok(hand_peaks(
        &avg,
        crop.height() as usize,
        crop.width() as usize,
    ))
}

/// Step 3 for all 21 parts of `heatmap_avg` (`128×128×22`, `HWC`), for a crop of
/// `crop_h`×`crop_w`.
pub fn hand_peaks(avg: &[f64], crop_h: usize, crop_w: usize) -> Vec<[i64; 2]> {
    let n = HEATMAP_SIZE;
    (0..PARTS)
        .map(|part| {
            let map: Vec<f64> = (0..n * n).map(|i| avg[i * CHANNELS + part]).collect();
            hand_peak(&map, n, n, crop_h, crop_w)
        })
        .collect()
}

/// Step 3 for one part: `map` (`h`×`w` `float64`, the averaged heatmap, `h == w == 128` in
/// the reference) → `[x, y]` in a crop of `crop_h`×`crop_w`, `[0, 0]` when nothing passes the
/// threshold.
pub fn hand_peak(map: &[f64], h: usize, w: usize, crop_h: usize, crop_w: usize) -> [i64; 2] {
    let smooth = scipy::gaussian_filter(map, w, h, 3.0);
    let binary: Vec<bool> = smooth.iter().map(|&v| v > THRESHOLD).collect();
    if !binary.iter().any(|&b| b) {
        return [0, 0];
    }
    let (labels, count) = label_8(&binary, w, h);
    // The component with the largest sum of the unsmoothed map (np.argmax: first on ties).
    let mut best = 0usize;
    let mut best_sum = f64::NAN;
    for l in 1..=count {
        let vals: Vec<f64> = map
            .iter()
            .zip(&labels)
            .filter(|(_, &lab)| lab == l)
            .map(|(&v, _)| v)
            .collect();
        let s = numpy_sum(&vals);
        if best == 0 || s > best_sum || (s.is_nan() && !best_sum.is_nan()) {
            best = l;
            best_sum = s;
        }
    }
    let kept: Vec<f64> = map
        .iter()
        .zip(&labels)
        .map(|(&v, &l)| if l == best { v } else { 0.0 })
        .collect();
    let (y, x) = npmax(&kept, w, h);
    let y = (y as f64 * crop_h as f64 / HEATMAP_SIZE as f64) as i64;
    let x = (x as f64 * crop_w as f64 / HEATMAP_SIZE as f64) as i64;
    [x, y]
}

/// `util.npmax(array)` on an `h`×`w` array: `(row, column)` of the first maximum in row-major
/// order (the row whose maximum is first largest, then the first maximum in it).
pub fn npmax(a: &[f64], w: usize, h: usize) -> (usize, usize) {
    assert_eq!(a.len(), w * h);
    let row_arg = |y: usize| -> usize {
        let row = &a[y * w..(y + 1) * w];
        let mut j = 0;
        for (i, &v) in row.iter().enumerate() {
            if np_greater(v, row[j]) {
                j = i;
            }
        }
        j
    };
    let mut best_row = 0;
    let mut best = a[row_arg(0)];
    for y in 1..h {
        let v = a[y * w + row_arg(y)];
        if np_greater(v, best) {
            best_row = y;
            best = v;
        }
    }
    (best_row, row_arg(best_row))
}

/// numpy's argmax order: NaN beats everything (the first NaN wins), else plain `>`.
fn np_greater(v: f64, cur: f64) -> bool {
    if cur.is_nan() {
        false
    } else {
        v.is_nan() || v > cur
    }
}

/// `skimage.measure.label(binary, connectivity=2)`: 8-connected components of the `true`
/// pixels, labelled 1.. in raster order of their first pixel (0 is background). Returns the
/// labels and their count.
pub fn label_8(binary: &[bool], w: usize, h: usize) -> (Vec<usize>, usize) {
    let mut labels = vec![0usize; w * h];
    let mut count = 0;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !binary[start] || labels[start] != 0 {
            continue;
        }
        count += 1;
        labels[start] = count;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            for dy in -1..=1i64 {
                for dx in -1..=1i64 {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    let j = ny as usize * w + nx as usize;
                    if binary[j] && labels[j] == 0 {
                        labels[j] = count;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, count)
}

// ---------------------------------------------------------------------------------------------
// detect_hands
// ---------------------------------------------------------------------------------------------

/// Step 4: the crop's peaks (`[x, y]`) placed in the image and normalised as the reference does
/// in `float32`: a coordinate `< 1e-6` becomes `−1 / size`, others `(v + offset) / size`.
pub fn place_peaks(
    peaks: &[[i64; 2]],
    x0: i64,
    y0: i64,
    width: usize,
    height: usize,
) -> Vec<Keypoint> {
    let norm = |v: i64, off: i64, size: usize| -> f64 {
        let v = v as f32;
        let placed = if v < 1e-6 { -1.0f32 } else { v + off as f32 };
        (placed / size as f32) as f64
    };
    peaks
        .iter()
        .map(|p| Keypoint::at(norm(p[0], x0, width), norm(p[1], y0, height)))
        .collect()
}

/// `OpenposeDetector.detect_hands(body, img)` with the body in PIXELS (as the reference
/// calls it, before `detect_poses` normalises): `(left, right)`. `image` is the detect image
/// in RGB (flipped to BGR here, as the reference's `oriImg` is). `scales`: [`SCALE_SEARCH`].
pub fn detect_hands_px(
    net: &HandNet,
    body: &BodyResult,
    image: &RgbImage,
    scales: &[f64],
) -> Result<(Option<HandResult>, Option<HandResult>)> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut left = None;
    let mut right = None;
    for b in hand_boxes(body, w, h) {
        let Some(crop) = crop_bgr(image, b.x, b.y, b.w, b.w) else {
            continue;
        };
        let peaks = estimate_hand(net, &crop, scales)?;
        let result = place_peaks(&peaks, b.x, b.y, w, h);
        if b.is_left {
            left = Some(result);
        } else {
            right = Some(result);
        }
    }
    Ok((left, right))
}

/// `detect_hands` for a body as `detect_poses` returns it (normalised by the detect image's
/// `W`, `H`): the body is first brought back to pixels with [`body_to_pixels`] (exact for the
/// reference's whole-pixel keypoints), then [`detect_hands_px`] at [`SCALE_SEARCH`]. The hands
/// come back normalised, as in `PoseResult`.
pub fn detect_hands(
    net: &HandNet,
    body: &BodyResult,
    image: &RgbImage,
) -> Result<(Option<HandResult>, Option<HandResult>)> {
    let px = body_to_pixels(body, image.width() as usize, image.height() as usize);
    detect_hands_px(net, &px, image, &SCALE_SEARCH)
}
