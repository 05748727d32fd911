//! The OpenPose body network and pipeline against controlnet_aux 0.0.10 on formula weights;
//! fixtures from `tools/parity/neural/make_openpose_body.py` (see its header for each file).
//!
//! * network maps in f32 within 1e-4 relative (max|Δ| / max|ref|);
//! * the float resizes bit-exact to `cv2.resize`, the Gaussian bit-exact to scipy;
//! * everything after the network (resizes, smoothing, peaks, PAF scoring, grouping, format)
//!   exact on the reference's own network maps, and on crafted maps (two people, limbs crossing,
//!   missing parts and limbs, a detached head, weak people, an empty image) whose known answers
//!   are checked too — formula weights find "people" in noise, crafted maps are how the grouping
//!   is tested against answers known in advance;
//! * `detect_bodies` end to end with our network;
//! * the real file layout (legacy pickle, f32, the file's key names) loads to the same maps.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use annotators::{ops, scipy};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use neural_annotators::formula::FormulaWeights;
use neural_annotators::openpose::body::{self, BodyNet, Maps, Peak, Person};
use neural_annotators::openpose::BodyResult;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/openpose_body")
        .join(name)
}

fn rgb(name: &str) -> RgbImage {
    image::open(fixture(name)).unwrap().to_rgb8()
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("manifest.json")).unwrap()).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    if t.elem_count() == 0 {
        return Vec::new();
    }
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn maps(t: &Tensor) -> Maps {
    let dims = t.dims();
    let (c, h, w) = match dims.len() {
        4 => (dims[1], dims[2], dims[3]),
        _ => (dims[0], dims[1], dims[2]),
    };
    Maps {
        channels: c,
        height: h,
        width: w,
        data: f32s(t),
    }
}

/// max |a − b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    d / b.iter().map(|y| y.abs()).fold(0f32, f32::max)
}

fn net() -> &'static BodyNet {
    static NET: OnceLock<BodyNet> = OnceLock::new();
    NET.get_or_init(|| BodyNet::new(FormulaWeights::var_builder(DType::F32, &Device::Cpu)).unwrap())
}

/// The network input for an image used as is (no scaling): BGR, `/256 - 0.5`.
fn plain_input(img: &RgbImage) -> Tensor {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for c in 0..3 {
        for (i, p) in img.pixels().enumerate() {
            data[c * h * w + i] = p[2 - c] as f32 / 256.0 - 0.5;
        }
    }
    Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu).unwrap()
}

fn candidate_rows(c: &[Peak]) -> Vec<f64> {
    c.iter()
        .flat_map(|p| [p.x as f64, p.y as f64, p.score, p.id as f64])
        .collect()
}

fn subset_rows(s: &[Person]) -> Vec<f64> {
    s.iter().flatten().copied().collect()
}

/// detect_poses' output as the fixture stores it: 18 (x, y) (NaN: none), score, parts.
fn pose_rows(bodies: &[BodyResult]) -> Vec<f64> {
    let mut out = Vec::new();
    for b in bodies {
        for k in &b.keypoints {
            match k {
                Some(k) => out.extend([k.x, k.y]),
                None => out.extend([f64::NAN, f64::NAN]),
            }
        }
        out.extend([b.total_score, b.total_parts as f64]);
    }
    out
}

/// Bitwise equality of f64 rows (NaN equal to NaN).
fn same(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()))
}

fn fnv_f32(data: &[f32]) -> String {
    let h = data
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
    format!("{h:016x}")
}

/// `bodypose_model` on a small input: PAFs and heatmaps within 1e-4 relative; the heatmaps
/// went through the last layer's ReLU (the reference's quirk), the PAFs did not.
#[test]
fn network_matches_reference() {
    let t = tensors("net.safetensors");
    let x = plain_input(&rgb("net_input.png"));
    let (paf, heat) = net().forward(&x).unwrap();
    assert_eq!(paf.dims(), t["paf"].dims());
    assert_eq!(heat.dims(), t["heat"].dims());
    let (paf, heat) = (f32s(&paf), f32s(&heat));
    let ep = rel_err(&paf, &f32s(&t["paf"]));
    let eh = rel_err(&heat, &f32s(&t["heat"]));
    println!("network: PAF rel err {ep:.2e}, heatmap rel err {eh:.2e}");
    assert!(ep <= 1e-4 && eh <= 1e-4, "PAF {ep:e}, heatmap {eh:e}");
    assert!(
        heat.iter().all(|&v| v >= 0.0),
        "Mconv7_stage6_L2 keeps its ReLU"
    );
    assert!(paf.iter().any(|&v| v < 0.0), "Mconv7_stage6_L1 has no ReLU");
}

/// The scaled, padded network input is the reference's `imageToTest_padded`, byte for byte.
#[test]
fn network_input_matches_reference() {
    for case in ["small", "large"] {
        let img = rgb(&format!("{case}.png"));
        let padded = rgb(&format!("{case}_padded.png"));
        let input = body::network_input(&img).unwrap();
        assert_eq!(
            (input.padded_width, input.padded_height),
            (padded.width() as usize, padded.height() as usize),
            "{case}"
        );
        let (pw, ph) = (input.padded_width, input.padded_height);
        let mut wrong = 0;
        for (i, p) in padded.pixels().enumerate() {
            for c in 0..3 {
                let ours = input.data[c * pw * ph + i];
                // padded.png holds the BGR input as RGB; plane c is BGR channel c.
                let want = p[2 - c] as f32 / 256.0 - 0.5;
                if ours.to_bits() != want.to_bits() {
                    wrong += 1;
                }
            }
        }
        assert_eq!(wrong, 0, "{case}: input values differ");
    }
}

/// `resize_lanczos4_f32` / `resize_area_f32` against `cv2.resize` on float32 planes: bit-exact.
#[test]
fn float_resizes_are_cv2_exact() {
    let t = tensors("resize.safetensors");
    let m = manifest();
    for r in m["resize"].as_array().unwrap() {
        let name = r["name"].as_str().unwrap();
        let src = &t[&format!("{name}.src")];
        let (sh, sw) = src.dims2().unwrap();
        let (w, h) = (
            r["width"].as_u64().unwrap() as usize,
            r["height"].as_u64().unwrap() as usize,
        );
        let src = f32s(src);
        let ours = match r["kind"].as_str().unwrap() {
            "lanczos4" => ops::resize_lanczos4_f32(&src, sw, sh, w, h),
            _ => ops::resize_area_f32(&src, sw, sh, w, h),
        };
        let want = f32s(&t[&format!("{name}.dst")]);
        let wrong = ours
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(wrong, 0, "{name}: {wrong} of {} values differ", want.len());
    }
}

/// `gaussian_filter` against `scipy.ndimage.gaussian_filter(x, sigma=3)` (float64): bit-exact,
/// including arrays shorter than the kernel radius (12), where `reflect` repeats.
#[test]
fn gaussian_filter_is_scipy_exact() {
    let t = tensors("gaussian.safetensors");
    for name in manifest()["gaussian"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let src = &t[&format!("{name}.src")];
        let (h, w) = src.dims2().unwrap();
        let ours = scipy::gaussian_filter(&f64s(src), w, h, 3.0);
        let want = f64s(&t[&format!("{name}.dst")]);
        assert!(same(&ours, &want), "{name}: differs from scipy");
    }
}

/// Everything after the network, on the reference's own network maps: the maps at the image
/// size (bit-exact: the small case's stored maps, the large case's hashes), then `candidate`,
/// `subset` and `detect_poses`' bodies, exact.
#[test]
fn pipeline_exact_on_reference_maps() {
    let m = manifest();
    for case in ["small", "large"] {
        let t = tensors(&format!("{case}.safetensors"));
        let img = rgb(&format!("{case}.png"));
        let (w, h) = (img.width() as usize, img.height() as usize);
        let input = body::network_input(&img).unwrap();
        let heat = body::maps_to_image_size(&maps(&t["net.heat"]), input.width, input.height, w, h);
        let paf = body::maps_to_image_size(&maps(&t["net.paf"]), input.width, input.height, w, h);
        if case == "small" {
            assert!(heat == maps(&t["heatmap_avg"]), "{case}: heatmaps differ");
            assert!(paf == maps(&t["paf_avg"]), "{case}: PAFs differ");
        }
        let want = &m["cases"][case];
        assert_eq!(fnv_f32(&heat.data), want["heatmap_fnv"], "{case}: heatmaps");
        assert_eq!(fnv_f32(&paf.data), want["paf_fnv"], "{case}: PAFs");
        let (candidate, subset) = body::candidates_and_subset(&heat, &paf).unwrap();
        assert!(
            same(&candidate_rows(&candidate), &f64s(&t["candidate"])),
            "{case}: candidates differ"
        );
        assert!(
            same(&subset_rows(&subset), &f64s(&t["subset"])),
            "{case}: subset differs"
        );
        let poses = body::normalise(&body::format_body_result(&candidate, &subset), w, h);
        assert!(
            same(&pose_rows(&poses), &f64s(&t["poses"])),
            "{case}: poses"
        );
        println!(
            "{case}: {} candidates, {} people (as the reference)",
            candidate.len(),
            subset.len()
        );
    }
}

/// One person of a crafted scene: parts (None: absent), amplitude %, PAF magnitude %, limbs
/// without PAF.
type ScenePerson = (Vec<Option<(f64, f64)>>, f64, f64, Vec<usize>);

/// One crafted scene, drawn as the fixture script draws it (same float64 operations).
struct Scene {
    width: usize,
    height: usize,
    people: Vec<ScenePerson>,
}

fn scene(name: &str) -> Scene {
    let m = manifest();
    let s = &m["scenes"]["scenes"][name];
    let people = s["people"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let parts = p["parts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|xy| {
                    xy.as_array()
                        .map(|a| (a[0].as_i64().unwrap() as f64, a[1].as_i64().unwrap() as f64))
                })
                .collect();
            let missing = p["missing_limbs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_u64().unwrap() as usize)
                .collect();
            (
                parts,
                p["amp"].as_i64().unwrap() as f64,
                p["paf"].as_i64().unwrap() as f64,
                missing,
            )
        })
        .collect();
    Scene {
        width: s["width"].as_u64().unwrap() as usize,
        height: s["height"].as_u64().unwrap() as usize,
        people,
    }
}

/// (heatmaps, PAFs) of a scene: a cone of radius 4 per part, a band of half-width 2 per limb.
fn draw(s: &Scene) -> (Maps, Maps) {
    let (w, h) = (s.width, s.height);
    let mut heat = vec![0f32; 19 * h * w];
    let mut paf = vec![0f32; 38 * h * w];
    let (radius, band) = (4.0f64, 2.0f64);
    let r2 = radius * radius;
    for (parts, amp, _, _) in &s.people {
        let amp = amp / 100.0;
        for (part, xy) in parts.iter().enumerate() {
            let Some((px, py)) = *xy else { continue };
            for y in 0..h {
                for x in 0..w {
                    let dx = x as f64 - px;
                    let dy = y as f64 - py;
                    let t = 1.0 - (dx * dx + dy * dy) / r2;
                    if t > 0.0 {
                        let v = (t * amp) as f32;
                        let cell = &mut heat[(part * h + y) * w + x];
                        if v > *cell {
                            *cell = v;
                        }
                    }
                }
            }
        }
    }
    for (parts, _, mag, missing) in &s.people {
        let mag = mag / 100.0;
        for (k, limb) in body::LIMB_SEQ.iter().enumerate() {
            if missing.contains(&k) {
                continue;
            }
            let (Some((ax, ay)), Some((bx, by))) = (parts[limb[0] - 1], parts[limb[1] - 1]) else {
                continue;
            };
            let ex = bx - ax;
            let ey = by - ay;
            let l2 = ex * ex + ey * ey;
            let length = l2.sqrt();
            let ux = ex / length * mag;
            let uy = ey / length * mag;
            let (cx, cy) = (body::MAP_IDX[k][0] - 19, body::MAP_IDX[k][1] - 19);
            for y in 0..h {
                for x in 0..w {
                    let (xf, yf) = (x as f64, y as f64);
                    let t = (((xf - ax) * ex + (yf - ay) * ey) / l2).clamp(0.0, 1.0);
                    let qx = ax + t * ex;
                    let qy = ay + t * ey;
                    let d2 = (xf - qx) * (xf - qx) + (yf - qy) * (yf - qy);
                    if d2 <= band * band {
                        paf[(cx * h + y) * w + x] = ux as f32;
                        paf[(cy * h + y) * w + x] = uy as f32;
                    }
                }
            }
        }
    }
    let mk = |channels, data| Maps {
        channels,
        height: h,
        width: w,
        data,
    };
    (mk(19, heat), mk(38, paf))
}

fn run_scene(name: &str) -> (Vec<Peak>, Vec<Person>, Vec<BodyResult>) {
    let s = scene(name);
    let (heat, paf) = draw(&s);
    let (candidate, subset) = body::candidates_and_subset(&heat, &paf).unwrap();
    let t = tensors("scenes.safetensors");
    assert!(
        same(
            &candidate_rows(&candidate),
            &f64s(&t[&format!("{name}.candidate")])
        ),
        "{name}: candidates differ from the reference"
    );
    assert!(
        same(&subset_rows(&subset), &f64s(&t[&format!("{name}.subset")])),
        "{name}: subset differs from the reference"
    );
    let bodies = body::format_body_result(&candidate, &subset);
    (candidate, subset, bodies)
}

/// The body of the person whose neck is nearest `x`.
fn by_neck(bodies: &[BodyResult], x: f64) -> &BodyResult {
    bodies
        .iter()
        .min_by(|a, b| {
            let d = |p: &BodyResult| (p.keypoints[1].unwrap().x - x).abs();
            d(a).total_cmp(&d(b))
        })
        .unwrap()
}

/// The template's part positions for a person at (cx, top) (the script's TEMPLATE).
fn template(cx: f64, top: f64) -> Vec<(f64, f64)> {
    const T: [(i32, i32); 18] = [
        (0, 0),
        (0, 12),
        (-8, 12),
        (-11, 22),
        (-13, 32),
        (8, 12),
        (11, 22),
        (13, 32),
        (-5, 32),
        (-6, 43),
        (-6, 54),
        (5, 32),
        (6, 43),
        (6, 54),
        (-4, -4),
        (4, -4),
        (-9, -1),
        (9, -1),
    ];
    T.iter()
        .map(|&(dx, dy)| (cx + dx as f64, top + dy as f64))
        .collect()
}

fn parts_at(b: &BodyResult) -> Vec<Option<(f64, f64)>> {
    b.keypoints.iter().map(|k| k.map(|k| (k.x, k.y))).collect()
}

/// Crafted maps: the reference's own post-processing (network replaced, last resize returning
/// the crafted maps) gives the same candidates and people, and those are the known answers.
#[test]
fn crafted_scenes_exact_with_known_answers() {
    // An empty image: no candidates, nobody.
    let (c, s, _) = run_scene("empty");
    assert!(c.is_empty() && s.is_empty());

    // Two people, every part where it was drawn, each part once.
    let (c, _, b) = run_scene("two_people");
    assert_eq!((c.len(), b.len()), (36, 2));
    for (cx, top) in [(32.0, 8.0), (88.0, 9.0)] {
        let p = by_neck(&b, cx);
        let want: Vec<_> = template(cx, top).into_iter().map(Some).collect();
        assert_eq!(parts_at(p), want, "person at {cx}");
        assert_eq!(p.total_parts, 18);
    }

    // Crossing forearms and lower legs: still two people, each with its own neck and hips; no
    // part given to both.
    let (_, s, b) = run_scene("crossing");
    assert_eq!(b.len(), 2);
    let ids: Vec<f64> = s.iter().flat_map(|p| p[..18].to_vec()).collect();
    let used: Vec<_> = ids.iter().filter(|&&i| i >= 0.0).collect();
    let mut dedup = used.clone();
    dedup.sort_by(|a, b| a.total_cmp(b));
    dedup.dedup();
    assert_eq!(dedup.len(), used.len(), "a part in two people");
    for (cx, top) in [(44.0, 8.0), (76.0, 8.0)] {
        let p = by_neck(&b, cx);
        let t = template(cx, top);
        for part in [0, 1, 2, 5, 8, 11] {
            assert_eq!(
                parts_at(p)[part],
                Some(t[part]),
                "person at {cx}, part {part}"
            );
        }
    }

    // Missing limbs: A has no left wrist, B's right forearm has no PAF (its wrist stays out),
    // C has no right leg; all three are found.
    let (_, _, b) = run_scene("missing_limb");
    assert_eq!(b.len(), 3);
    let a = parts_at(by_neck(&b, 28.0));
    assert!(a[7].is_none() && a[6].is_some() && a.iter().filter(|k| k.is_some()).count() == 17);
    let bb = parts_at(by_neck(&b, 75.0));
    assert!(bb[4].is_none() && bb[3].is_some());
    let cc = parts_at(by_neck(&b, 122.0));
    assert!(cc[8].is_none() && cc[9].is_none() && cc[10].is_none() && cc[11].is_some());

    // A head without its neck limb is merged into the body through the shoulder-ear limbs.
    let (_, _, b) = run_scene("detached_head");
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].total_parts, 18);
    assert_eq!(
        parts_at(&b[0]),
        template(40.0, 8.0)
            .into_iter()
            .map(Some)
            .collect::<Vec<_>>()
    );

    // Three parts only, or a mean score below 0.4: deleted; the third person stays.
    let (c, _, b) = run_scene("weak");
    assert_eq!(
        c.len(),
        3 + 18 + 18,
        "the weak person's parts are candidates"
    );
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].keypoints[1].unwrap().x, 122.0);
}

/// The grouping follows the reference's rules on hand-made connections: a limb joining two
/// disjoint people merges them; people with fewer than 4 parts go.
#[test]
fn grouping_rules_on_hand_made_connections() {
    let peak = |id: usize, score: f64| Peak {
        x: id,
        y: 0,
        score,
        id,
    };
    // Parts: 0 neck(1), 1 r shoulder(2), 2 r elbow(3), 3 r ear(16), 4 nose(0), 5 r eye(14).
    let candidate: Vec<Peak> = (0..6).map(|i| peak(i, 0.9)).collect();
    let conn = |a: usize, b: usize, score: f64| {
        Some(vec![body::Connection {
            id_a: a,
            id_b: b,
            score,
            i: 0,
            j: 0,
        }])
    };
    let mut connections: Vec<Option<Vec<body::Connection>>> = vec![None; 19];
    connections[0] = conn(0, 1, 0.5); // neck - r shoulder
    connections[2] = conn(1, 2, 0.5); // r shoulder - r elbow
    connections[13] = conn(4, 5, 0.5); // nose - r eye
    connections[14] = conn(5, 3, 0.5); // r eye - r ear
    connections[17] = conn(1, 3, 0.25); // r shoulder - r ear: merges the two
    let subset = body::group(&candidate, &connections).unwrap();
    assert_eq!(subset.len(), 1);
    let p = subset[0];
    assert_eq!(p[19], 6.0);
    assert_eq!(
        (p[1], p[2], p[3], p[0], p[14], p[16]),
        (0.0, 1.0, 2.0, 4.0, 5.0, 3.0)
    );
    // 6 parts × 0.9 + 4 limbs × 0.5 + the merging limb 0.25.
    assert!((p[18] - (5.4 + 2.0 + 0.25)).abs() < 1e-12);
    // Without the merging limb: two people of 3 parts each, both deleted.
    connections[17] = None;
    assert!(body::group(&candidate, &connections).unwrap().is_empty());
}

/// `detect_bodies` end to end with our network: the same people and keypoints as
/// `detect_poses` (our maps differ from torch's by ~1e-6 relative; no peak or limb decision
/// is that close on these images).
#[test]
fn detect_end_to_end() {
    for case in ["small", "large"] {
        let t = tensors(&format!("{case}.safetensors"));
        let img = rgb(&format!("{case}.png"));
        let input = body::network_input(&img).unwrap();
        let (paf, heat) = net().maps(&input).unwrap();
        let ep = rel_err(&paf.data, &f32s(&t["net.paf"]));
        let eh = rel_err(&heat.data, &f32s(&t["net.heat"]));
        println!("{case}: network PAF rel err {ep:.2e}, heatmap {eh:.2e}");
        assert!(
            ep <= 1e-4 && eh <= 1e-4,
            "{case}: PAF {ep:e}, heatmap {eh:e}"
        );
        let bodies = body::detect_bodies(net(), &img).unwrap();
        let want = f64s(&t["poses"]);
        let ours = pose_rows(&bodies);
        assert_eq!(ours.len(), want.len(), "{case}: number of people");
        let mut keypoints = 0;
        for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
            if i % 38 < 36 {
                assert_eq!(a.is_nan(), b.is_nan(), "{case}: value {i}");
                assert!(
                    a.is_nan() || a == b,
                    "{case}: keypoint value {i}: {a} vs {b}"
                );
                keypoints += usize::from(!a.is_nan()) * usize::from(i % 2 == 0);
            } else if i % 38 == 37 {
                assert_eq!(a, b, "{case}: parts");
            } else {
                assert!((a - b).abs() <= 1e-4 * b.abs(), "{case}: score {a} vs {b}");
            }
        }
        println!(
            "{case}: {} people, {keypoints} keypoints as the reference",
            bodies.len()
        );
    }
}

/// Formula weights written as the real `body_pose_model.pth` (a legacy, pre-zip torch pickle
/// of the plain state dict, f32, the file's key names) and read back through the users' loader
/// give the same maps as the direct build; the loader counts exactly the tensors read.
#[test]
fn real_file_layout_loads() {
    use diffusion::torch_pickle::{save, Format, SaveOptions, StorageDtype, TensorData};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    BodyNet::new(candle_nn::VarBuilder::from_backend(
        Box::new(Recorder { seen: seen.clone() }),
        DType::F32,
        Device::Cpu,
    ))
    .unwrap();
    let names: Vec<(String, Vec<usize>)> = seen.lock().unwrap().clone();
    assert_eq!(names.len(), 184, "92 convs, weight and bias each");
    for key in [
        "conv1_1.weight",
        "conv4_4_CPM.bias",
        "Mconv7_stage6_L2.weight",
    ] {
        assert!(names.iter().any(|(n, _)| n == key), "{key}");
    }
    let params: usize = names.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(params, 52_311_446, "the reference's parameter count");
    let tensors: Vec<(String, TensorData)> = names
        .iter()
        .map(|(n, s)| {
            let v = neural_annotators::formula::values(n, s);
            (n.clone(), TensorData::new(s.clone(), v))
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("cns-openpose-body-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("body_pose_model.pth");
    let opts = SaveOptions {
        format: Format::Legacy,
        dtype: StorageDtype::F32,
        nest: vec![],
        prefix: String::new(),
    };
    save(&path, &tensors, opts).unwrap();
    drop(tensors);
    let file = diffusion::weights::WeightFile::open(&path).unwrap();
    let (vb, bytes) = diffusion::weights::Counting::var_builder(file, DType::F32, &Device::Cpu);
    let loaded = BodyNet::new(vb).unwrap();
    assert_eq!(
        bytes.load(std::sync::atomic::Ordering::Relaxed),
        params * 4,
        "bytes loaded"
    );
    let x = plain_input(&rgb("net_input.png"));
    let (pa, ha) = loaded.forward(&x).unwrap();
    let (pb, hb) = net().forward(&x).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        f32s(&pa) == f32s(&pb) && f32s(&ha) == f32s(&hb),
        "maps differ"
    );
}

type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<usize>)>>>;

struct Recorder {
    seen: Seen,
}

impl candle_nn::var_builder::SimpleBackend for Recorder {
    fn get(
        &self,
        shape: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut seen = self.seen.lock().unwrap();
        if !seen.iter().any(|(n, _)| n == name) {
            seen.push((name.to_string(), shape.dims().to_vec()));
        }
        Tensor::zeros(shape, dtype, device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}
