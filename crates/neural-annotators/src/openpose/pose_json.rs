//! Poses as the OpenPose JSON that A1111's ControlNet extension returns from
//! `/controlnet/detect` (`"poses"`) and that its pose editors read and write
//! (sd-webui-controlnet v1.1.455, `annotator/openpose/__init__.py`: `encode_poses_as_json`,
//! `decode_json_as_poses`):
//!
//! ```json
//! {"people": [{"pose_keypoints_2d": [x, y, c, …],        // 18 keypoints, or null
//!              "face_keypoints_2d": [x, y, c, …] | null,
//!              "hand_left_keypoints_2d": [x, y, c, …] | null,   // 21 keypoints
//!              "hand_right_keypoints_2d": [x, y, c, …] | null}],
//!  "animals": [],
//!  "canvas_height": H, "canvas_width": W}
//! ```
//!
//! **Encoding** ([`encode`]) is A1111's: coordinates written as they are in the
//! [`PoseResult`] — for detector output, normalised to `[0, 1]` by the detect image's size
//! (A1111 does not convert them to pixels) — with confidence `1.0` for every present keypoint
//! and `[0, 0, 0]` for an absent one (`None` body keypoints; hand / face keypoints whose
//! `score` is not `> 0`, see [`super::draw`]); a part with no keypoints (a `None` hand, an empty
//! list) is `null`. `"animals"` is always empty (no animal pose here).
//!
//! **Decoding** ([`decode`]) follows A1111 too: a keypoint whose confidence is `< 1` is absent
//! (so a real OpenPose file's fractional confidences read as absent, as in A1111); coordinates
//! are kept as written, normalised or in pixels — [`super::draw::draw_poses`] tells them apart
//! per part the way A1111's drawing does. A missing, `null` or empty keypoint list is `None`
//! (for the body: an empty keypoint list, which draws nothing — A1111 would fail on it);
//! unknown fields are ignored. Decoded keypoints have score 1 (absent hand / face points score
//! 0, at `(0, 0)`); decoded bodies have `total_score = 0`, `total_parts = 0` (A1111's
//! defaults).
//!
//! Stricter than A1111, so that a bad request fails with a message instead of a crash or a
//! silent misdrawing — each [`PoseJsonError`] names the offending field
//! (`people[0].pose_keypoints_2d[4]`): the root must be an object; `canvas_width` and
//! `canvas_height` integers in `1..=`[`MAX_CANVAS_SIDE`]; `people` an array (or absent / `null`)
//! of at most [`MAX_PEOPLE`] objects; keypoint lists arrays of finite numbers whose length is
//! a multiple of 3 — exactly 18 keypoints for the body, 21 per hand, at most
//! [`MAX_FACE_KEYPOINTS`] for the face — with coordinates within ±[`MAX_COORD`];
//! `animals`, if present and non-empty, is rejected (animal poses are not drawn here).
use serde_json::{json, Map, Value};

use super::{BodyResult, Keypoint, PoseResult};

/// Largest accepted `canvas_width` / `canvas_height`.
pub const MAX_CANVAS_SIDE: u64 = 8192;
/// Most people accepted in one JSON pose.
pub const MAX_PEOPLE: usize = 1000;
/// Most face keypoints accepted (OpenPose's face model has 70, DWPose's 68 + 2).
pub const MAX_FACE_KEYPOINTS: usize = 256;
/// Largest absolute coordinate accepted (normalised coordinates are within 1; pixel ones
/// within the canvas, give or take a pose dragged off it).
pub const MAX_COORD: f64 = 1.0e6;
/// Keypoints of a body (OpenPose COCO order).
pub const BODY_KEYPOINTS: usize = 18;
/// Keypoints of a hand.
pub const HAND_KEYPOINTS: usize = 21;

/// A JSON pose that cannot be used: `path` names the offending field
/// (`canvas_width`, `people[0].hand_left_keypoints_2d[7]`; empty for the document itself).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{reason}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct PoseJsonError {
    pub path: String,
    pub reason: String,
}

fn err(path: impl Into<String>, reason: impl Into<String>) -> PoseJsonError {
    PoseJsonError {
        path: path.into(),
        reason: reason.into(),
    }
}

fn compress<'a>(points: impl ExactSizeIterator<Item = Option<&'a Keypoint>>) -> Value {
    if points.len() == 0 {
        return Value::Null;
    }
    let mut out = Vec::with_capacity(points.len() * 3);
    for k in points {
        match k {
            Some(k) => out.extend([json!(k.x), json!(k.y), json!(1.0)]),
            None => out.extend([json!(0.0), json!(0.0), json!(0.0)]),
        }
    }
    Value::Array(out)
}

fn compress_part(points: Option<&[Keypoint]>) -> Value {
    let points = points.unwrap_or(&[]);
    compress(points.iter().map(|k| (k.score > 0.0).then_some(k)))
}

/// The poses as A1111's OpenPose JSON for a `width`×`height` canvas (see the module docs).
pub fn encode(poses: &[PoseResult], width: u32, height: u32) -> Value {
    let people: Vec<Value> = poses
        .iter()
        .map(|p| {
            let mut m = Map::new();
            m.insert(
                "pose_keypoints_2d".into(),
                compress(p.body.keypoints.iter().map(Option::as_ref)),
            );
            m.insert("face_keypoints_2d".into(), compress_part(p.face.as_deref()));
            m.insert(
                "hand_left_keypoints_2d".into(),
                compress_part(p.left_hand.as_deref()),
            );
            m.insert(
                "hand_right_keypoints_2d".into(),
                compress_part(p.right_hand.as_deref()),
            );
            Value::Object(m)
        })
        .collect();
    json!({
        "people": people,
        "animals": [],
        "canvas_height": height,
        "canvas_width": width,
    })
}

fn canvas_side(root: &Map<String, Value>, name: &str) -> Result<u32, PoseJsonError> {
    let v = root
        .get(name)
        .ok_or_else(|| err(name, "missing (the canvas size is required)"))?;
    let n = match v {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u32::MAX as f64)
                    .map(|f| f as u64)
            })
            .ok_or_else(|| err(name, format!("{n} is not a positive integer")))?,
        other => {
            return Err(err(
                name,
                format!("expected an integer, got {}", kind(other)),
            ))
        }
    };
    if n == 0 || n > MAX_CANVAS_SIDE {
        return Err(err(
            name,
            format!("{n} is out of range 1..={MAX_CANVAS_SIDE}"),
        ));
    }
    Ok(n as u32)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Which keypoint counts a list accepts.
#[derive(Clone, Copy)]
enum Count {
    Exactly(usize),
    AtMost(usize),
}

/// A keypoint list: `None` when missing / null / empty, else one entry per keypoint (`None`
/// when its confidence is `< 1`).
fn keypoints(
    person: &Map<String, Value>,
    path: &str,
    field: &str,
    count: Count,
) -> Result<Option<Vec<Option<Keypoint>>>, PoseJsonError> {
    let path = format!("{path}.{field}");
    let numbers = match person.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) if a.is_empty() => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(err(
                path,
                format!("expected an array of numbers or null, got {}", kind(other)),
            ))
        }
    };
    let n = numbers.len();
    let ok = n % 3 == 0
        && match count {
            Count::Exactly(k) => n == 3 * k,
            Count::AtMost(k) => n <= 3 * k,
        };
    if !ok {
        let want = match count {
            Count::Exactly(k) => format!("{} numbers ({k} keypoints × [x, y, confidence])", 3 * k),
            Count::AtMost(k) => {
                format!("a multiple of 3 numbers ([x, y, confidence] each), at most {k} keypoints")
            }
        };
        return Err(err(path, format!("has {n} numbers; expected {want}")));
    }
    let mut values = Vec::with_capacity(n);
    for (i, v) in numbers.iter().enumerate() {
        let f = v.as_f64().filter(|f| f.is_finite()).ok_or_else(|| {
            err(
                format!("{path}[{i}]"),
                format!("expected a finite number, got {v}"),
            )
        })?;
        if i % 3 != 2 && f.abs() > MAX_COORD {
            return Err(err(
                format!("{path}[{i}]"),
                format!("coordinate {f} is beyond ±{MAX_COORD}"),
            ));
        }
        values.push(f);
    }
    Ok(Some(
        values
            .chunks_exact(3)
            .map(|c| (c[2] >= 1.0).then(|| Keypoint::at(c[0], c[1])))
            .collect(),
    ))
}

/// A hand or face: absent points become score-0 keypoints at `(0, 0)`.
fn part(points: Option<Vec<Option<Keypoint>>>) -> Option<Vec<Keypoint>> {
    points.map(|v| {
        v.into_iter()
            .map(|k| {
                k.unwrap_or(Keypoint {
                    x: 0.0,
                    y: 0.0,
                    score: 0.0,
                    id: -1,
                })
            })
            .collect()
    })
}

/// Reads A1111's OpenPose JSON: the poses, the canvas width and the canvas height (see the
/// module docs for the conventions and the checks).
pub fn decode(json: &Value) -> Result<(Vec<PoseResult>, u32, u32), PoseJsonError> {
    let root = json.as_object().ok_or_else(|| {
        err(
            "",
            format!("a pose must be a JSON object, got {}", kind(json)),
        )
    })?;
    let width = canvas_side(root, "canvas_width")?;
    let height = canvas_side(root, "canvas_height")?;
    match root.get("animals") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => {
            return Err(err(
                "animals",
                "animal poses are not supported; send an empty list or leave it out",
            ))
        }
    }
    let people = match root.get("people") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => &a[..],
        Some(other) => {
            return Err(err(
                "people",
                format!("expected an array, got {}", kind(other)),
            ))
        }
    };
    if people.len() > MAX_PEOPLE {
        return Err(err(
            "people",
            format!("{} people; at most {MAX_PEOPLE}", people.len()),
        ));
    }
    let mut poses = Vec::with_capacity(people.len());
    for (i, person) in people.iter().enumerate() {
        let path = format!("people[{i}]");
        let person = person
            .as_object()
            .ok_or_else(|| err(&path, format!("expected an object, got {}", kind(person))))?;
        let body = keypoints(
            person,
            &path,
            "pose_keypoints_2d",
            Count::Exactly(BODY_KEYPOINTS),
        )?;
        let face = keypoints(
            person,
            &path,
            "face_keypoints_2d",
            Count::AtMost(MAX_FACE_KEYPOINTS),
        )?;
        let left = keypoints(
            person,
            &path,
            "hand_left_keypoints_2d",
            Count::Exactly(HAND_KEYPOINTS),
        )?;
        let right = keypoints(
            person,
            &path,
            "hand_right_keypoints_2d",
            Count::Exactly(HAND_KEYPOINTS),
        )?;
        poses.push(PoseResult {
            body: BodyResult {
                keypoints: body.unwrap_or_default(),
                total_score: 0.0,
                total_parts: 0,
            },
            left_hand: part(left),
            right_hand: part(right),
            face: part(face),
        });
    }
    Ok((poses, width, height))
}
