//! OpenPose (body, hands, face) as controlnet_aux 0.0.10's `OpenposeDetector` runs it; serves
//! `openpose`, `openpose_hand`, `openpose_face`, `openpose_faceonly` and `openpose_full`.
//!
//! - [`body`]: the body network (`body_pose_model.pth`) and its pipeline — candidates (peaks)
//!   and the greedy grouping of limbs into people;
//! - [`hand`]: the hand network (`hand_pose_model.pth`), the hand boxes derived from a body,
//!   multi-scale inference and peak picking;
//! - [`face`]: the face network (`facenet.pth`), the face box derived from a body, 70 points;
//! - [`draw`]: the standard skeleton drawing, pixel-exact to OpenCV;
//! - the keypoint types below, shared by all.
//!
//! Coordinates in [`PoseResult`] are as controlnet_aux's `detect_poses` returns them: body, hand
//! and face keypoints normalised to `[0, 1]` by the detect image's width and height.

pub mod draw;

pub mod pose_json;

/// controlnet_aux's `Keypoint(x, y, score=1.0, id=-1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keypoint {
    pub x: f64,
    pub y: f64,
    pub score: f64,
    pub id: i64,
}

impl Keypoint {
    /// A keypoint with controlnet_aux's defaults (`score = 1`, `id = -1`).
    pub fn at(x: f64, y: f64) -> Self {
        Self {
            x,
            y,
            score: 1.0,
            id: -1,
        }
    }
}

/// controlnet_aux's `BodyResult`: 18 keypoints in OpenPose COCO order (nose, neck, right
/// shoulder, …), `None` where the part was not found.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyResult {
    pub keypoints: Vec<Option<Keypoint>>,
    pub total_score: f64,
    pub total_parts: usize,
}

/// 21 hand keypoints (controlnet_aux's `HandResult`).
pub type HandResult = Vec<Keypoint>;
/// Face keypoints (controlnet_aux's `FaceResult`).
pub type FaceResult = Vec<Keypoint>;

/// One person: controlnet_aux's `PoseResult`.
#[derive(Debug, Clone, PartialEq)]
pub struct PoseResult {
    pub body: BodyResult,
    pub left_hand: Option<HandResult>,
    pub right_hand: Option<HandResult>,
    pub face: Option<FaceResult>,
}
