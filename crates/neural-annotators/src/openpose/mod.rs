//! OpenPose (body, hands, face) as controlnet_aux 0.0.10's `OpenposeDetector` runs it; serves
//! `openpose`, `openpose_hand`, `openpose_face`, `openpose_faceonly` and `openpose_full`.
//!
//! - [`body`]: the body network (`body_pose_model.pth`) and its pipeline — candidates (peaks)
//!   and the greedy grouping of limbs into people;
//! - [`hand`]: the hand network (`hand_pose_model.pth`), the hand boxes derived from a body,
//!   multi-scale inference and peak picking;
//! - [`face`]: the face network (`facenet.pth`), the face box derived from a body, up to 71
//!   points (one per heatmap with a peak, in map order);
//! - [`draw`]: the standard skeleton drawing, pixel-exact to OpenCV;
//! - [`pose_json`]: the OpenPose JSON A1111's pose editors read and write;
//! - the keypoint types below, shared by all, and [`Openpose`], the detector.
//!
//! Coordinates in a detected [`PoseResult`] are as controlnet_aux's `detect_poses` returns
//! them: normalised to `[0, 1]` by the detect image's width and height. Poses decoded from JSON
//! keep the coordinates as written (pixels or normalised: [`draw`] tells them apart as A1111
//! does).
//!
//! What each module runs and draws (A1111's meanings; the body network always runs, as it
//! finds the people and their hand and face boxes):
//!
//! | module | hands | face | drawn |
//! |---|---|---|---|
//! | `openpose` | – | – | body |
//! | `openpose_hand` | ✓ | – | body, hands |
//! | `openpose_face` | – | ✓ | body, face |
//! | `openpose_faceonly` | – | ✓ | face |
//! | `openpose_full` | ✓ | ✓ | body, hands, face |
pub mod body;
pub mod draw;
pub mod face;
pub mod hand;
pub mod pose_json;
pub mod resize;

use candle_nn::VarBuilder;
use image::RgbImage;

use crate::{Detection, Detector, Result};

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

/// Which parts a module detects and draws: `(hands, face, draw_body)`.
pub fn module_parts(preprocessor: &str) -> Option<(bool, bool, bool)> {
    Some(match preprocessor {
        "openpose" => (false, false, true),
        "openpose_hand" => (true, false, true),
        "openpose_face" => (false, true, true),
        "openpose_faceonly" => (false, true, false),
        "openpose_full" => (true, true, true),
        _ => return None,
    })
}

/// The OpenPose detector: the body network, and the hand and face networks when their files
/// were present at load.
pub struct Openpose {
    body: body::BodyNet,
    hand: Option<hand::HandNet>,
    face: Option<face::FaceNet>,
}

impl Openpose {
    /// From `VarBuilder`s over each file (the files' own key names).
    pub fn new(
        body: VarBuilder,
        hand: Option<VarBuilder>,
        face: Option<VarBuilder>,
    ) -> Result<Self> {
        Ok(Self {
            body: body::BodyNet::new(body)?,
            hand: hand.map(hand::HandNet::new).transpose()?,
            face: face.map(face::FaceNet::new).transpose()?,
        })
    }

    /// `detect_poses(image, include_hand, include_face)`: each person's body, and their hands
    /// and face when asked for, normalised by the image's size.
    pub fn detect_poses(
        &self,
        image: &RgbImage,
        include_hand: bool,
        include_face: bool,
    ) -> Result<Vec<PoseResult>> {
        let missing = |part: &str, file: &str| {
            diffusion::Error::Config(format!(
                "OpenPose {part} network not loaded ({file} was not in the annotator folder when OpenPose loaded)"
            ))
        };
        let hand_net = match (include_hand, &self.hand) {
            (true, None) => return Err(missing("hand", "hand_pose_model.pth")),
            (_, net) => net.as_ref().filter(|_| include_hand),
        };
        let face_net = match (include_face, &self.face) {
            (true, None) => return Err(missing("face", "facenet.pth")),
            (_, net) => net.as_ref().filter(|_| include_face),
        };
        let (w, h) = (image.width() as usize, image.height() as usize);
        let bodies = body::detect_bodies_pixels(&self.body, image)?;
        let normalised = body::normalise(&bodies, w, h);
        let mut poses = Vec::with_capacity(bodies.len());
        for (px, body) in bodies.iter().zip(normalised) {
            let (left_hand, right_hand) = match hand_net {
                Some(net) => hand::detect_hands_px(net, px, image, &hand::SCALE_SEARCH)?,
                None => (None, None),
            };
            let face = match face_net {
                Some(net) => face::detect_face_px(net, px, image, face::FACE_INPUT_SIZE)?,
                None => None,
            };
            poses.push(PoseResult {
                body,
                left_hand,
                right_hand,
                face,
            });
        }
        Ok(poses)
    }
}

impl Detector for Openpose {
    fn detect(&self, preprocessor: &str, image: &RgbImage, params: &[f64]) -> Result<RgbImage> {
        Ok(self.detect_keypoints(preprocessor, image, params)?.hint)
    }

    fn detect_keypoints(
        &self,
        preprocessor: &str,
        image: &RgbImage,
        _params: &[f64],
    ) -> Result<Detection> {
        let (hands, face, draw_body) = module_parts(preprocessor).ok_or_else(|| {
            diffusion::Error::Config(format!("OpenPose does not serve `{preprocessor}`"))
        })?;
        let poses = self.detect_poses(image, hands, face)?;
        let (w, h) = (image.width(), image.height());
        Ok(Detection {
            hint: draw::draw_poses(&poses, h, w, draw_body, hands, face),
            keypoints: Some(pose_json::encode(&poses, w, h)),
        })
    }

    fn serves(&self, preprocessor: &str) -> bool {
        module_parts(preprocessor).is_some_and(|(hands, face, _)| {
            (!hands || self.hand.is_some()) && (!face || self.face.is_some())
        })
    }
}
