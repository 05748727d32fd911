//! The OpenPose drawing and keypoint JSON against the references:
//! `tools/parity/neural/make_openpose_draw.py` → `tests/fixtures/openpose_draw/` (see that
//! script's header). Canvases are controlnet_aux 0.0.10's `draw_poses` (or, for the `a1111_*`
//! cases, A1111's drawing of pixel coordinates and absent hand / face points), compared pixel
//! for pixel; the JSON is A1111's `encode_poses_as_json` layout.

use std::path::PathBuf;

use image::RgbImage;
use neural_annotators::openpose::draw::{self, draw_poses};
use neural_annotators::openpose::pose_json::{self, PoseJsonError};
use neural_annotators::openpose::{BodyResult, Keypoint, PoseResult};
use serde_json::{json, Value};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openpose_draw")
}

fn fixtures() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("poses.json")).unwrap()).unwrap()
}

fn f(v: &Value) -> f64 {
    f64::from_bits(v.as_u64().unwrap())
}

fn points(v: &Value) -> Option<Vec<Option<Keypoint>>> {
    v.as_array().map(|a| {
        a.iter()
            .map(|p| (!p.is_null()).then(|| Keypoint::at(f(&p[0]), f(&p[1]))))
            .collect()
    })
}

/// A hand / face: absent points as score-0 keypoints (what `pose_json::decode` produces).
fn part(v: &Value) -> Option<Vec<Keypoint>> {
    points(v).map(|ps| {
        ps.into_iter()
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

fn poses(people: &Value) -> Vec<PoseResult> {
    people
        .as_array()
        .unwrap()
        .iter()
        .map(|p| PoseResult {
            body: BodyResult {
                keypoints: points(&p["body"]).unwrap(),
                total_score: 0.0,
                total_parts: 0,
            },
            left_hand: part(&p["left"]),
            right_hand: part(&p["right"]),
            face: part(&p["face"]),
        })
        .collect()
}

fn diff(a: &RgbImage, b: &RgbImage) -> usize {
    assert_eq!(a.dimensions(), b.dimensions());
    a.pixels().zip(b.pixels()).filter(|(x, y)| x != y).count()
}

#[test]
fn draw_poses_equals_reference() {
    let fx = fixtures();
    let cases = fx["cases"].as_array().unwrap();
    let mut failed = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let flags: Vec<bool> = case["flags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_bool().unwrap())
            .collect();
        let (h, w) = (
            case["H"].as_u64().unwrap() as u32,
            case["W"].as_u64().unwrap() as u32,
        );
        let got = draw_poses(&poses(&case["people"]), h, w, flags[0], flags[1], flags[2]);
        let want = image::open(dir().join(format!("{name}.png")))
            .unwrap()
            .to_rgb8();
        let d = diff(&got, &want);
        println!("{name} ({}): {d} pixels differ", case["ref"]);
        if d > 0 {
            failed.push(name.to_string());
        }
    }
    assert!(failed.is_empty(), "differ: {failed:?}");
}

#[test]
fn hand_colors_and_pow_match_numpy() {
    let fx = fixtures();
    for (ie, c) in fx["hand_colors"].as_array().unwrap().iter().enumerate() {
        let want: Vec<f64> = c.as_array().unwrap().iter().map(f).collect();
        assert_eq!(draw::hand_edge_color(ie).to_vec(), want, "edge {ie}");
    }
    let pows = fx["pow"].as_array().unwrap();
    let mut differ_from_mul = 0;
    for p in pows {
        let (x, x2, s, s5) = (f(&p[0]), f(&p[1]), f(&p[2]), f(&p[3]));
        assert_eq!(draw::np_pow(x, 2.0).to_bits(), x2.to_bits(), "{x} ** 2");
        assert_eq!(draw::np_pow(s, 0.5).to_bits(), s5.to_bits(), "{s} ** 0.5");
        differ_from_mul += (x * x != x2) as usize;
    }
    // Why np_pow exists: numpy's `x ** 2` is libm's pow, not always `x * x`.
    println!(
        "{} pow cases; x ** 2 != x * x in {differ_from_mul}",
        pows.len()
    );
}

#[test]
fn json_encoding_is_a1111_layout() {
    let fx = fixtures();
    for case in fx["json_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let want: Value = serde_json::from_str(case["text"].as_str().unwrap()).unwrap();
        let (h, w) = (
            case["H"].as_u64().unwrap() as u32,
            case["W"].as_u64().unwrap() as u32,
        );
        let ps = poses(&case["people"]);
        let got = pose_json::encode(&ps, w, h);
        assert_eq!(got, want, "{name}");
        // And back: A1111's text decodes to the same poses (absent body points as None).
        let (back, bw, bh) = pose_json::decode(&want).unwrap();
        assert_eq!((bw, bh), (w, h));
        assert_eq!(back, ps, "{name}");
    }
}

#[test]
fn json_round_trip_keeps_poses_and_drawing() {
    let fx = fixtures();
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (h, w) = (
            case["H"].as_u64().unwrap() as u32,
            case["W"].as_u64().unwrap() as u32,
        );
        let ps = poses(&case["people"]);
        let text = serde_json::to_string(&pose_json::encode(&ps, w, h)).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        let (back, bw, bh) = pose_json::decode(&value).unwrap();
        assert_eq!((bw, bh), (w, h), "{name}");
        // Through text: serde_json's float parsing may differ from the written value in the
        // last bit, so compare the drawings (which is what the JSON is for) and the values
        // to 1e-15.
        assert_eq!(back.len(), ps.len());
        for (a, b) in back.iter().zip(&ps) {
            let close = |x: &Keypoint, y: &Keypoint| {
                (x.x - y.x).abs() <= 1e-15 && (x.y - y.y).abs() <= 1e-15 && x.score == y.score
            };
            assert_eq!(a.body.keypoints.len(), b.body.keypoints.len());
            for (x, y) in a.body.keypoints.iter().zip(&b.body.keypoints) {
                match (x, y) {
                    (Some(x), Some(y)) => assert!(close(x, y), "{name}"),
                    (None, None) => {}
                    _ => panic!("{name}: presence differs"),
                }
            }
            for (x, y) in [
                (&a.left_hand, &b.left_hand),
                (&a.right_hand, &b.right_hand),
                (&a.face, &b.face),
            ] {
                assert_eq!(x.is_some(), y.is_some(), "{name}");
                if let (Some(x), Some(y)) = (x, y) {
                    assert!(x.iter().zip(y).all(|(p, q)| close(p, q)), "{name}");
                }
            }
        }
        assert_eq!(
            diff(
                &draw_poses(&back, h, w, true, true, true),
                &draw_poses(&ps, h, w, true, true, true)
            ),
            0,
            "{name}"
        );
        // Exact without the text step.
        let (exact, _, _) = pose_json::decode(&pose_json::encode(&ps, w, h)).unwrap();
        assert_eq!(exact, ps, "{name}");
    }
}

#[test]
fn decode_conventions() {
    // Confidence < 1 is absent; extra fields ignored; null / missing / empty parts are None;
    // a person without a body draws only its other parts.
    let mut body = vec![0.0; 54];
    body[0..3].copy_from_slice(&[10.0, 20.0, 1.0]);
    body[3..6].copy_from_slice(&[30.0, 40.0, 0.99]);
    body[6..9].copy_from_slice(&[0.5, 0.25, 2.0]);
    let v = json!({
        "people": [
            {"pose_keypoints_2d": body, "hand_left_keypoints_2d": null, "face_keypoints_2d": [],
             "person_id": [-1], "pose_keypoints_3d": []},
            {"hand_right_keypoints_2d": vec![0.0; 63]}
        ],
        "canvas_width": 640.0,
        "canvas_height": 480,
        "animals": [],
        "version": 1.3
    });
    let (poses, w, h) = pose_json::decode(&v).unwrap();
    assert_eq!((w, h), (640, 480));
    assert_eq!(poses.len(), 2);
    let kp = &poses[0].body.keypoints;
    assert_eq!(kp.len(), 18);
    assert_eq!(kp[0], Some(Keypoint::at(10.0, 20.0)));
    assert_eq!(kp[1], None);
    assert_eq!(kp[2], Some(Keypoint::at(0.5, 0.25)));
    assert!(kp[3..].iter().all(Option::is_none));
    assert_eq!(poses[0].left_hand, None);
    assert_eq!(poses[0].face, None);
    assert!(poses[1].body.keypoints.is_empty());
    let right = poses[1].right_hand.as_ref().unwrap();
    assert_eq!(right.len(), 21);
    assert!(right.iter().all(|k| k.score == 0.0));
    // Encoding writes absent points as zeros and empty parts as null.
    let e = pose_json::encode(&poses, w, h);
    assert_eq!(e["people"][1]["pose_keypoints_2d"], Value::Null);
    assert_eq!(
        e["people"][1]["hand_right_keypoints_2d"],
        json!(vec![0.0; 63])
    );
    assert_eq!(e["people"][0]["pose_keypoints_2d"][3], json!(0.0));
    assert_eq!(e["people"][0]["pose_keypoints_2d"][8], json!(1.0));
    assert_eq!(e["animals"], json!([]));
    // Missing people: no poses.
    let (none, _, _) = pose_json::decode(&json!({"canvas_width": 8, "canvas_height": 8})).unwrap();
    assert!(none.is_empty());
    // Drawing a body-less person with hands does not panic and draws the hand.
    let img = draw_poses(&poses, 48, 64, true, true, true);
    assert_eq!(img.dimensions(), (64, 48));
}

#[test]
fn decode_rejects_bad_input_naming_the_field() {
    let ok_body: Vec<f64> = (0..54).map(|i| (i % 3) as f64 * 0.5).collect();
    let person = |k: &str, v: Value| {
        let mut p = json!({"pose_keypoints_2d": ok_body.clone()});
        p[k] = v;
        json!({"people": [p], "canvas_width": 512, "canvas_height": 512})
    };
    let mut nan_hand = vec![json!(0.5); 63];
    nan_hand[7] = json!("NaN");
    let mut far = ok_body.clone();
    far[3] = 1.0e9;
    let table: Vec<(Value, &str)> = vec![
        (json!([]), ""),
        (json!(null), ""),
        (json!({"canvas_height": 512}), "canvas_width"),
        (json!({"canvas_width": 512}), "canvas_height"),
        (
            json!({"canvas_width": 0, "canvas_height": 5}),
            "canvas_width",
        ),
        (
            json!({"canvas_width": 8193, "canvas_height": 5}),
            "canvas_width",
        ),
        (
            json!({"canvas_width": 64, "canvas_height": 12.5}),
            "canvas_height",
        ),
        (
            json!({"canvas_width": 64, "canvas_height": -3}),
            "canvas_height",
        ),
        (
            json!({"canvas_width": "64", "canvas_height": 64}),
            "canvas_width",
        ),
        (
            json!({"canvas_width": 64, "canvas_height": 64, "people": {}}),
            "people",
        ),
        (
            json!({"canvas_width": 64, "canvas_height": 64, "people": [3]}),
            "people[0]",
        ),
        (
            json!({"canvas_width": 64, "canvas_height": 64, "animals": [[1, 2, 1]]}),
            "animals",
        ),
        (
            person("pose_keypoints_2d", json!(vec![0.5; 53])),
            "people[0].pose_keypoints_2d",
        ),
        (
            person("pose_keypoints_2d", json!(vec![0.5; 75])),
            "people[0].pose_keypoints_2d",
        ),
        (
            person("pose_keypoints_2d", json!(far)),
            "people[0].pose_keypoints_2d[3]",
        ),
        (
            person("pose_keypoints_2d", json!("x")),
            "people[0].pose_keypoints_2d",
        ),
        (
            person("hand_left_keypoints_2d", json!(vec![0.5; 60])),
            "people[0].hand_left_keypoints_2d",
        ),
        (
            person("hand_right_keypoints_2d", Value::Array(nan_hand)),
            "people[0].hand_right_keypoints_2d[7]",
        ),
        (
            person("face_keypoints_2d", json!(vec![0.5; 3 * 257])),
            "people[0].face_keypoints_2d",
        ),
        (
            person("face_keypoints_2d", json!([0.5, 0.5, 1.0, null, 0.5, 1.0])),
            "people[0].face_keypoints_2d[3]",
        ),
        (
            person("face_keypoints_2d", json!([0.5, 0.5])),
            "people[0].face_keypoints_2d",
        ),
    ];
    for (input, path) in &table {
        let e: PoseJsonError = pose_json::decode(input).unwrap_err();
        assert_eq!(e.path, *path, "{input} → {e}");
        let shown = e.to_string();
        assert!(shown.contains(path), "{shown}");
        assert!(!e.reason.is_empty());
    }
    // Too many people.
    let many = json!({"people": vec![json!({}); pose_json::MAX_PEOPLE + 1],
                      "canvas_width": 64, "canvas_height": 64});
    assert_eq!(pose_json::decode(&many).unwrap_err().path, "people");
    println!("{} bad inputs rejected", table.len() + 1);
}
