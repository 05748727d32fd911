//! The standard OpenPose skeleton drawing: controlnet_aux 0.0.10's `draw_poses` with
//! `util.draw_bodypose`, `util.draw_handpose` and `util.draw_facepose`, pixel-exact to OpenCV
//! 4.x through [`annotators::draw_cv`].
//!
//! On a black canvas, for each person in order: the body (if `draw_body`), the left then the
//! right hand (if `draw_hand`), the face (if `draw_face`).
//!
//! * **Body**: for each of the 17 limbs (`LIMB_SEQ`, 1-based OpenPose COCO indices) whose two
//!   keypoints exist, with `X = y·H`, `Y = x·W` of the two ends: centre `(int(mean Y),
//!   int(mean X))`, axes `(int(length / 2), 4)` and angle `int(degrees(atan2(X₀−X₁, Y₀−Y₁)))`
//!   (Python `int`: truncation) go to `cv2.ellipse2Poly(…, 0, 360, 1)`, and the polygon is
//!   filled with `cv2.fillConvexPoly` in the limb's colour × 0.6, each component truncated
//!   (`int(float(c) * 0.6)`). `length` is `((X₀−X₁)**2 + (Y₀−Y₁)**2)**0.5` as numpy computes it
//!   on `float64` scalars — libm's `pow`, which is not always the correctly rounded square or
//!   `sqrt`, so it is called the same way here. Then each present keypoint `k` (paired with
//!   the first 18 colours) gets a filled circle of radius 4 at `(int(k.x·W), int(k.y·H))`.
//! * **Hand** (21 keypoints): each of the 20 edges whose both ends land on pixel coordinates
//!   `> 0.01` (`eps`; so `x, y ≥ 1`) is a `cv2.line` of thickness 2 in
//!   `matplotlib.colors.hsv_to_rgb([ie / 20, 1, 1]) * 255` (a float colour, which OpenCV
//!   rounds half-to-even: [`annotators::draw_cv::saturate_u8`]); then every keypoint past the
//!   same `eps` test gets a filled circle of radius 4 in `(0, 0, 255)`.
//! * **Face**: every keypoint past the `eps` test gets a filled white circle of radius 3.
//!
//! Channel order: the colours are written as the reference writes them into its canvas, which
//! it returns as the RGB hint; so they are RGB here.
//!
//! **Pixel coordinates** (A1111): sd-webui-controlnet's copy of these functions (v1.1.455)
//! differs in two ways that matter for poses read from JSON (pose editors write pixels, the
//! detector writes `[0, 1]`): each part (a body, a hand, a face) whose present keypoints are
//! not all within `|x| ≤ 1, |y| ≤ 1` is taken to be in pixels (`W = H = 1`), and absent
//! keypoints of hands and faces are skipped. Both are followed here; for detector output (all
//! coordinates in `[-1, 1]`: body and face points inside the image, a hand's missing points at
//! `-1/W`) the result is controlnet_aux's. A hand or face [`Keypoint`] whose `score` is not
//! `> 0` is absent — that is how [`super::pose_json::decode`] represents a missing point
//! (`[0, 0, 0]`), since [`super::HandResult`] has no `Option`. Body keypoint lists shorter
//! than 18 and hands shorter than 21 are read as if padded with absent points (the reference
//! would raise an `IndexError`).
use std::f64::consts::PI;

use annotators::draw_cv;
use image::{Rgb, RgbImage};

use super::{Keypoint, PoseResult};

/// controlnet_aux's `eps` for hand and face keypoints (in pixels, after truncation).
const EPS: f64 = 0.01;
const STICKWIDTH: i32 = 4;

/// The body limbs, as 1-based pairs of OpenPose COCO keypoint indices (controlnet_aux's
/// `limbSeq`); limb `i` is drawn in [`BODY_COLORS`]`[i]` × 0.6.
pub const LIMB_SEQ: [(usize, usize); 17] = [
    (2, 3),
    (2, 6),
    (3, 4),
    (4, 5),
    (6, 7),
    (7, 8),
    (2, 9),
    (9, 10),
    (10, 11),
    (2, 12),
    (12, 13),
    (13, 14),
    (2, 1),
    (1, 15),
    (15, 17),
    (1, 16),
    (16, 18),
];

/// The body colours (RGB): limb `i` and keypoint `i` use entry `i`.
pub const BODY_COLORS: [[u8; 3]; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

/// The hand edges (0-based keypoint indices), in drawing order.
pub const HAND_EDGES: [(usize, usize); 20] = [
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (0, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (0, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
];

/// Python's `int(v)` for a float (truncation toward zero), saturated to `i32`.
fn py_int(v: f64) -> i32 {
    v as i32
}

/// `a ** b` on numpy `float64` scalars: libm's `pow`, kept opaque so that the compiler does not
/// turn `pow(x, 2)` into `x * x` or `pow(x, 0.5)` into `sqrt(x)` (numpy does neither, and the
/// results differ in the last bit now and then).
pub fn np_pow(a: f64, b: f64) -> f64 {
    a.powf(std::hint::black_box(b))
}

/// The colour of hand edge `ie`: `matplotlib.colors.hsv_to_rgb([ie / 20, 1, 1]) * 255`, in the
/// same `float64` operations.
pub fn hand_edge_color(ie: usize) -> [f64; 3] {
    let (h, s, v) = (ie as f64 / HAND_EDGES.len() as f64, 1.0f64, 1.0f64);
    let i = (h * 6.0) as i64;
    let f = h * 6.0 - i as f64;
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    let rgb = match i {
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        5 => [v, p, q],
        _ if i % 6 == 0 => [v, t, p],
        _ => [0.0; 3],
    };
    rgb.map(|c| c * 255.0)
}

/// A1111's `is_normalized` scale for one part: `(W, H)` of the canvas when the part has a
/// present keypoint and all of them lie within `[-1, 1]²`, else `(1, 1)` (pixel coordinates).
fn part_scale<'a>(canvas: &RgbImage, pts: impl Iterator<Item = &'a Keypoint>) -> (f64, f64) {
    let mut any = false;
    for k in pts {
        any = true;
        if !(k.x.abs() <= 1.0 && k.y.abs() <= 1.0) {
            return (1.0, 1.0);
        }
    }
    if any {
        (canvas.width() as f64, canvas.height() as f64)
    } else {
        (1.0, 1.0)
    }
}

/// Whether a hand or face keypoint is present (see the module docs).
fn present(k: &Keypoint) -> bool {
    k.score > 0.0
}

/// `util.draw_bodypose`: the limbs, then the joints (see the module docs).
pub fn draw_bodypose(canvas: &mut RgbImage, keypoints: &[Option<Keypoint>]) {
    let (w, h) = part_scale(canvas, keypoints.iter().flatten());
    let get = |i: usize| keypoints.get(i).copied().flatten();
    for (&(a, b), color) in LIMB_SEQ.iter().zip(BODY_COLORS) {
        let (Some(k1), Some(k2)) = (get(a - 1), get(b - 1)) else {
            continue;
        };
        let ys = [k1.x * w, k2.x * w];
        let xs = [k1.y * h, k2.y * h];
        let mx = (xs[0] + xs[1]) / 2.0;
        let my = (ys[0] + ys[1]) / 2.0;
        let length = np_pow(np_pow(xs[0] - xs[1], 2.0) + np_pow(ys[0] - ys[1], 2.0), 0.5);
        let angle = (xs[0] - xs[1]).atan2(ys[0] - ys[1]) * (180.0 / PI);
        let polygon = draw_cv::ellipse2poly(
            (py_int(my), py_int(mx)),
            (py_int(length / 2.0), STICKWIDTH),
            py_int(angle),
            0,
            360,
            1,
        );
        let color = Rgb(color.map(|c| (c as f64 * 0.6) as u8));
        draw_cv::fill_convex_poly(canvas, &polygon, color);
    }
    for (k, color) in keypoints.iter().zip(BODY_COLORS) {
        if let Some(k) = k {
            let center = (py_int(k.x * w), py_int(k.y * h));
            draw_cv::circle(canvas, center, 4, Rgb(color), true);
        }
    }
}

/// `util.draw_handpose`: the edges, then the keypoints (see the module docs). `None` or an
/// empty hand draws nothing.
pub fn draw_handpose(canvas: &mut RgbImage, keypoints: Option<&[Keypoint]>) {
    let Some(keypoints) = keypoints.filter(|k| !k.is_empty()) else {
        return;
    };
    let (w, h) = part_scale(canvas, keypoints.iter().filter(|k| present(k)));
    let get = |i: usize| keypoints.get(i).filter(|k| present(k));
    let px = |k: &Keypoint| (py_int(k.x * w), py_int(k.y * h));
    let far = |(x, y): (i32, i32)| x as f64 > EPS && y as f64 > EPS;
    for (ie, &(e1, e2)) in HAND_EDGES.iter().enumerate() {
        let (Some(k1), Some(k2)) = (get(e1), get(e2)) else {
            continue;
        };
        let (p1, p2) = (px(k1), px(k2));
        if far(p1) && far(p2) {
            let color = Rgb(hand_edge_color(ie).map(draw_cv::saturate_u8));
            draw_cv::line(canvas, p1, p2, color, 2);
        }
    }
    for k in keypoints.iter().filter(|k| present(k)) {
        let p = px(k);
        if far(p) {
            draw_cv::circle(canvas, p, 4, Rgb([0, 0, 255]), true);
        }
    }
}

/// `util.draw_facepose`: a white dot of radius 3 per keypoint (see the module docs). `None`
/// or an empty face draws nothing.
pub fn draw_facepose(canvas: &mut RgbImage, keypoints: Option<&[Keypoint]>) {
    let Some(keypoints) = keypoints.filter(|k| !k.is_empty()) else {
        return;
    };
    let (w, h) = part_scale(canvas, keypoints.iter().filter(|k| present(k)));
    for k in keypoints.iter().filter(|k| present(k)) {
        let (x, y) = (py_int(k.x * w), py_int(k.y * h));
        if x as f64 > EPS && y as f64 > EPS {
            draw_cv::circle(canvas, (x, y), 3, Rgb([255, 255, 255]), true);
        }
    }
}

/// controlnet_aux's `draw_poses(poses, H, W, draw_body, draw_hand, draw_face)`: the poses on
/// a black `width`×`height` RGB canvas (see the module docs).
pub fn draw_poses(
    poses: &[PoseResult],
    height: u32,
    width: u32,
    draw_body: bool,
    draw_hand: bool,
    draw_face: bool,
) -> RgbImage {
    let mut canvas = RgbImage::new(width, height);
    for pose in poses {
        if draw_body {
            draw_bodypose(&mut canvas, &pose.body.keypoints);
        }
        if draw_hand {
            draw_handpose(&mut canvas, pose.left_hand.as_deref());
            draw_handpose(&mut canvas, pose.right_hand.as_deref());
        }
        if draw_face {
            draw_facepose(&mut canvas, pose.face.as_deref());
        }
    }
    canvas
}
