//! OpenPose hands and face against controlnet_aux 0.0.10; fixtures from
//! `tools/parity/neural/make_openpose_hand_face.py` (see its header for what each file holds).
//!
//! * the hand and face networks in f32 within 1e-4 relative, on formula weights;
//! * the boxes (`util.handDetect`, `util.faceDetect`) exact on hand-made bodies;
//! * scipy's Gaussian filter and OpenCV's float32 Lanczos-4 / area resizes bit-exact;
//! * peak picking exact on the reference's own float maps and on crafted maps;
//! * `detect_hands` / `detect_face` end to end exact (every keypoint equal), on a crafted
//!   "stub" network at the reference's real scales and input size, and on formula weights at
//!   small scales;
//! * both networks load from legacy pickles with the real files' key names.
use std::collections::HashMap;
use std::path::PathBuf;

use annotators::{ops, scipy};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use neural_annotators::formula::FormulaWeights;
use neural_annotators::openpose::face::{self, FaceNet};
use neural_annotators::openpose::hand::{self, HandNet};
use neural_annotators::openpose::{BodyResult, Keypoint};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/openpose_hand_face")
}

fn png(name: &str) -> RgbImage {
    image::open(dir().join(name)).unwrap().to_rgb8()
}

fn maps() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("maps.safetensors"), &Device::Cpu).unwrap()
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// max|a - b| / max|b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    d / b.iter().map(|v| v.abs()).fold(0f32, f32::max)
}

fn body(points: &[(usize, f64, f64)]) -> BodyResult {
    let mut keypoints = vec![None; 18];
    for &(i, x, y) in points {
        keypoints[i] = Some(Keypoint::at(x, y));
    }
    BodyResult {
        keypoints,
        total_score: 1.0,
        total_parts: points.len(),
    }
}

/// The script's PERSON_A and FACE_B (pixels of the 128×96 image).
fn person_a() -> BodyResult {
    body(&[
        (0, 60.0, 20.0),
        (14, 57.0, 17.0),
        (15, 63.0, 17.0),
        (16, 52.0, 20.0),
        (17, 66.0, 19.0),
        (1, 60.0, 30.0),
        (2, 50.0, 30.0),
        (3, 38.0, 50.0),
        (4, 30.0, 66.0),
        (5, 70.0, 30.0),
        (6, 85.0, 50.0),
        (7, 95.0, 62.0),
    ])
}

fn face_b() -> BodyResult {
    body(&[(0, 120.0, 50.0), (14, 116.0, 47.0), (16, 112.0, 50.0)])
}

/// Keypoints stored as float32 bit patterns (exact through JSON).
fn keypoints_of(v: &Value) -> Option<Vec<[f64; 2]>> {
    let f = |v: &Value| f32::from_bits(v.as_u64().unwrap() as u32) as f64;
    v.as_array()
        .map(|a| a.iter().map(|p| [f(&p[0]), f(&p[1])]).collect())
}

fn xy(k: &Option<Vec<Keypoint>>) -> Option<Vec<[f64; 2]>> {
    k.as_ref().map(|v| v.iter().map(|k| [k.x, k.y]).collect())
}

/// Number of keypoints that differ (and a length mismatch counts as all).
fn differing(ours: &Option<Vec<[f64; 2]>>, reference: &Option<Vec<[f64; 2]>>) -> usize {
    match (ours, reference) {
        (None, None) => 0,
        (Some(a), Some(b)) if a.len() == b.len() => a.iter().zip(b).filter(|(p, q)| p != q).count(),
        (a, b) => a
            .as_ref()
            .map_or(0, Vec::len)
            .max(b.as_ref().map_or(0, Vec::len))
            .max(1),
    }
}

// ---------------------------------------------------------------------------------------------
// Networks
// ---------------------------------------------------------------------------------------------

/// Both networks on formula weights, built once for all tests.
fn nets() -> &'static (HandNet, FaceNet) {
    static NETS: std::sync::OnceLock<(HandNet, FaceNet)> = std::sync::OnceLock::new();
    NETS.get_or_init(|| {
        let vb = FormulaWeights::var_builder(DType::F32, &Device::Cpu);
        (HandNet::new(vb.clone()).unwrap(), FaceNet::new(vb).unwrap())
    })
}

fn net_input() -> (Vec<f32>, usize, usize) {
    let img = png("net_input.png");
    let (w, h) = (img.width() as usize, img.height() as usize);
    (hand::planar_input(&img), h, w)
}

/// Both networks on a 40×48 input, formula weights, f32: within 1e-4 of the reference.
#[test]
fn networks_match_reference() {
    let m = maps();
    let (x, h, w) = net_input();
    let (hand_net, face_net) = nets();
    let (out, oh, ow) = hand_net.run(x.clone(), h, w).unwrap();
    assert_eq!(m["hand.out"].dims(), &[1, 22, oh, ow]);
    let e = rel_err(&out, &f32s(&m["hand.out"]));
    eprintln!("hand network: max|d|/max|ref| = {e:e}");
    assert!(e < 1e-4, "hand {e}");

    let t = Tensor::from_vec(x, (1, 3, h, w), &Device::Cpu).unwrap();
    let out = face_net.forward(&t).unwrap();
    assert_eq!(out.dims(), m["face.out"].dims());
    let e = rel_err(&f32s(&out), &f32s(&m["face.out"]));
    eprintln!("face network: max|d|/max|ref| = {e:e}");
    assert!(e < 1e-4, "face {e}");
}

/// Both networks from legacy (torch < 1.6) pickles with the real files' names and layout
/// (`hand_pose_model.pth`, `facenet.pth`: plain state dicts of f32 tensors, the file's own keys),
/// read through `WeightFile::open`: the same maps as the direct build, bit for bit.
#[test]
fn networks_load_from_legacy_pickles() {
    use diffusion::torch_pickle::{save, Format, SaveOptions, StorageDtype, TensorData};
    let dir = std::env::temp_dir().join(format!("cns-openpose-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (x, h, w) = net_input();
    for (file, shapes) in [
        ("hand_pose_model.pth", HandNet::shapes()),
        ("facenet.pth", FaceNet::shapes()),
    ] {
        let tensors: Vec<(String, TensorData)> = shapes
            .iter()
            .map(|(n, s)| {
                let v = neural_annotators::formula::values(n, s);
                (n.clone(), TensorData::new(s.clone(), v))
            })
            .collect();
        let path = dir.join(file);
        let opts = SaveOptions {
            format: Format::Legacy,
            dtype: StorageDtype::F32,
            nest: vec![],
            prefix: String::new(),
        };
        save(&path, &tensors, opts).unwrap();
        drop(tensors);
        let weights: usize = shapes
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let wf = diffusion::weights::WeightFile::open(&path).unwrap();
        let (vb, bytes) = diffusion::weights::Counting::var_builder(wf, DType::F32, &Device::Cpu);
        let t = Tensor::from_vec(x.clone(), (1, 3, h, w), &Device::Cpu).unwrap();
        let (hand_net, face_net) = nets();
        let (loaded, built) = if file.starts_with("hand") {
            let a = HandNet::new(vb).unwrap().forward(&t).unwrap();
            (a, hand_net.forward(&t).unwrap())
        } else {
            let a = FaceNet::new(vb).unwrap().forward(&t).unwrap();
            (a, face_net.forward(&t).unwrap())
        };
        assert_eq!(
            bytes.load(std::sync::atomic::Ordering::Relaxed),
            weights * 4,
            "{file}: every tensor read once"
        );
        assert_eq!(f32s(&loaded), f32s(&built), "{file}");
        std::fs::remove_file(&path).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The key names are the files' (not `util.transfer`'s model names), 2 × 40 convs each.
#[test]
fn weight_names_are_the_files() {
    let hand = HandNet::shapes();
    assert_eq!(hand.len(), 2 * (15 + 2 + 5 * 7));
    assert_eq!(hand[0], ("conv1_1.weight".to_string(), vec![64, 3, 3, 3]));
    assert!(hand.contains(&("conv6_2_CPM.weight".to_string(), vec![22, 512, 1, 1])));
    assert!(hand.contains(&("Mconv1_stage2.weight".to_string(), vec![128, 150, 7, 7])));
    assert_eq!(
        hand.last().unwrap(),
        &("Mconv7_stage6.bias".to_string(), vec![22])
    );
    let face = FaceNet::shapes();
    assert!(face.contains(&("conv5_3_CPM.weight".to_string(), vec![128, 512, 3, 3])));
    assert!(face.contains(&("Mconv1_stage6.weight".to_string(), vec![128, 199, 7, 7])));
    assert_eq!(
        face.last().unwrap(),
        &("Mconv7_stage6.bias".to_string(), vec![71])
    );
}

// ---------------------------------------------------------------------------------------------
// Boxes
// ---------------------------------------------------------------------------------------------

/// `util.handDetect` and `util.faceDetect` on 55 hand-made bodies (border cases, missing
/// parts, boxes under 20 pixels, random bodies with fractional coordinates): exact.
#[test]
fn boxes_match_reference() {
    let e = expected();
    let cases = e["boxes"].as_array().unwrap();
    assert!(cases.len() >= 50);
    let (mut hands_seen, mut faces_seen) = (0, 0);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let (w, h) = (
            c["width"].as_u64().unwrap() as usize,
            c["height"].as_u64().unwrap() as usize,
        );
        let keypoints = c["keypoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let f = |v: &Value| f64::from_bits(v.as_u64().unwrap());
                p.as_array().map(|p| Keypoint::at(f(&p[0]), f(&p[1])))
            })
            .collect();
        let b = BodyResult {
            keypoints,
            total_score: 1.0,
            total_parts: 0,
        };
        let hands: Vec<(i64, i64, i64, bool)> = hand::hand_boxes(&b, w, h)
            .into_iter()
            .map(|b| (b.x, b.y, b.w, b.is_left))
            .collect();
        let want: Vec<(i64, i64, i64, bool)> = c["hands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v[0].as_i64().unwrap(),
                    v[1].as_i64().unwrap(),
                    v[2].as_i64().unwrap(),
                    v[3].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(hands, want, "{name}: hands");
        hands_seen += want.len();
        let face = face::face_box(&b, w, h).map(|f| vec![f.x, f.y, f.w]);
        let want = c["face"]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_i64().unwrap()).collect::<Vec<i64>>());
        assert_eq!(face, want, "{name}: face");
        faces_seen += want.is_some() as usize;
    }
    assert!(
        hands_seen >= 10 && faces_seen >= 5,
        "{hands_seen} {faces_seen}"
    );
}

/// `detect_poses`' normalised keypoints come back to the reference's whole pixels exactly,
/// also where `(x / W) · W != x` in floating point.
#[test]
fn normalised_bodies_come_back_to_pixels() {
    let mut inexact = 0;
    for (w, h) in [(49usize, 98usize), (512, 768), (640, 384), (97, 113)] {
        for x in 0..=w {
            let y = x % (h + 1);
            let nx = x as f64 / w as f64;
            let ny = y as f64 / h as f64;
            inexact += (nx * w as f64 != x as f64) as usize;
            let b = body(&[(4, nx, ny)]);
            let p = hand::body_to_pixels(&b, w, h);
            let k = p.keypoints[4].unwrap();
            assert_eq!((k.x, k.y), (x as f64, y as f64), "{w}x{h} {x}");
        }
    }
    assert!(inexact > 0, "the round trip is not trivially exact");
}

// ---------------------------------------------------------------------------------------------
// Host numerics
// ---------------------------------------------------------------------------------------------

#[test]
fn gaussian_filter_is_scipys() {
    let m = maps();
    assert_eq!(
        scipy::gaussian_kernel1d(3.0, 12),
        f64s(&m["gauss.kernel"]),
        "kernel"
    );
    let src = f64s(&m["gauss.in"]);
    let (h, w) = (40, 30);
    let ours = scipy::gaussian_filter(&src, w, h, 3.0);
    assert_eq!(ours, f64s(&m["gauss.out"]));
}

#[test]
fn float_resizes_are_opencvs() {
    let m = maps();
    for name in ["lanczos.up8", "lanczos.up", "area.generic", "area.int23"] {
        let i = &m[&format!("{name}.in")];
        let o = &m[&format!("{name}.out")];
        let (sh, sw) = i.dims2().unwrap();
        let (dh, dw) = o.dims2().unwrap();
        let ours = if name.starts_with("lanczos") {
            ops::resize_lanczos4_f32(&f32s(i), sw, sh, dw, dh)
        } else {
            ops::resize_area_f32(&f32s(i), sw, sh, dw, dh)
        };
        let want = f32s(o);
        let diff = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(diff, 0, "{name}: {diff} values differ");
    }
}

// ---------------------------------------------------------------------------------------------
// Peaks
// ---------------------------------------------------------------------------------------------

fn left_box() -> hand::HandBox {
    let b = hand::hand_boxes(&person_a(), 128, 96);
    assert!(b[0].is_left);
    b[0]
}

/// Hand peak picking on the reference's own `heatmap_avg` maps (captured where `Hand.__call__`
/// smooths them): the keypoint it reported, exactly.
#[test]
fn hand_peaks_exact_on_reference_maps() {
    let m = maps();
    let e = expected();
    let b = left_box();
    let mut checked = 0;
    for (key, part, result) in [
        ("stub.left.p0", 0, &e["stub"]["left"]),
        ("stub.left.p5", 5, &e["stub"]["left"]),
        ("formula.left.p0", 0, &e["formula_hands"]["left"]),
    ] {
        let map = f64s(&m[key]);
        let peak = hand::hand_peak(&map, 128, 128, b.w as usize, b.w as usize);
        let ours = hand::place_peaks(&[peak], b.x, b.y, 128, 96)[0];
        let want = keypoints_of(result).unwrap()[part];
        assert_eq!([ours.x, ours.y], want, "{key}");
        checked += 1;
    }
    assert_eq!(checked, 3);
}

/// Crafted maps with known answers: nothing above the threshold → `[0, 0]`; of two blobs the
/// one with the larger SUM wins even with the lower maximum; the maximum of the kept blob is
/// scaled by `crop / 128` and truncated.
#[test]
fn hand_peaks_on_crafted_maps() {
    let n = 128;
    let blob = |cx: f64, cy: f64, a: f64, r2: f64| {
        move |x: usize, y: usize| {
            let d = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
            a / (1.0 + d / r2)
        }
    };
    // Nothing: a flat 0.04 map smooths to 0.04 < 0.05.
    let flat = vec![0.04; n * n];
    assert_eq!(hand::hand_peak(&flat, n, n, 50, 50), [0, 0]);
    // A sharp high peak (small sum) against a broad lower blob (larger sum).
    let sharp = blob(20.0, 30.0, 5.0, 0.5);
    let broad = blob(90.0, 100.0, 0.5, 60.0);
    let map: Vec<f64> = (0..n * n)
        .map(|i| {
            let (x, y) = (i % n, i / n);
            let s = if (x as i64 - 20).abs() < 6 && (y as i64 - 30).abs() < 6 {
                sharp(x, y)
            } else {
                0.0
            };
            let b = if (x as i64 - 90).abs() < 30 && (y as i64 - 100).abs() < 25 {
                broad(x, y)
            } else {
                0.0
            };
            s + b
        })
        .collect();
    // Maximum at (90, 100) in the 128 grid → int(100 · 200 / 128), int(90 · 64 / 128).
    assert_eq!(hand::hand_peak(&map, n, n, 200, 64), [45, 156]);
    // Without the broad blob the sharp one is found.
    let only_sharp: Vec<f64> = (0..n * n)
        .map(|i| {
            let (x, y) = (i % n, i / n);
            if (x as i64 - 20).abs() < 6 && (y as i64 - 30).abs() < 6 {
                sharp(x, y)
            } else {
                0.0
            }
        })
        .collect();
    assert_eq!(hand::hand_peak(&only_sharp, n, n, 128, 128), [20, 30]);
    // npmax: first maximum in row-major order.
    let mut a = vec![0.0; 12];
    a[7] = 1.0;
    a[5] = 1.0;
    a[10] = 1.0;
    assert_eq!(hand::npmax(&a, 4, 3), (1, 1));
    // 8-connectivity: diagonal neighbours join, raster-order labels.
    let bin = [
        true, false, false, true, //
        false, true, false, false, //
        false, false, false, true,
    ];
    let (labels, count) = hand::label_8(&bin, 4, 3);
    assert_eq!(count, 3);
    assert_eq!(labels, vec![1, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 3]);
}

/// Face peak picking on the reference's own (interpolated) maps: its peaks, exactly.
#[test]
fn face_peaks_exact_on_reference_maps() {
    let m = maps();
    let e = expected();
    let heat = &m["formula.face_a"];
    let (c, h, w) = heat.dims3().unwrap();
    assert_eq!(c, 71);
    let ours = face::face_peaks(&f32s(heat), c, h, w);
    let want: Vec<[i64; 2]> = e["formula_face"]["a_peaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| [p[0].as_i64().unwrap(), p[1].as_i64().unwrap()])
        .collect();
    assert_eq!(ours, want);
}

/// Crafted: a map with nothing above 0.05 is skipped (the list gets shorter); ties go to the
/// first in row-major order.
#[test]
fn face_peaks_on_crafted_maps() {
    let (h, w) = (3, 4);
    let mut maps = vec![0f32; 3 * h * w];
    maps[2] = 0.5; // map 0: (x 2, y 0)
    maps[9] = 0.5; // map 0 tie, later: ignored
    maps[12..24].iter_mut().for_each(|v| *v = 0.05); // map 1: not > 0.05
    maps[24 + 7] = 0.06; // map 2: (x 3, y 1)
    assert_eq!(face::face_peaks(&maps, 3, h, w), vec![[2, 0], [3, 1]]);
    // Placing: x == 0 becomes -1 / W, others get the offset, in f32.
    let placed = hand::place_peaks(&[[0, 3], [5, 0]], 10, 20, 128, 96);
    assert_eq!(placed[0].x, (-1.0f32 / 128.0) as f64);
    assert_eq!(placed[0].y, (23.0f32 / 96.0) as f64);
    assert_eq!(placed[1].x, (15.0f32 / 128.0) as f64);
    assert_eq!(placed[1].y, (-1.0f32 / 96.0) as f64);
}

// ---------------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------------

/// The script's `stub_maps`: two blobs per map, in f32 operations in the same order.
fn stub_maps(channels: usize, oh: usize, ow: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(channels * oh * ow);
    for c in 0..channels {
        let cy1 = ((((c * 3) % 10) as f64 + 0.5) / 10.0 * oh as f64) as f32;
        let cx1 = ((((c * 7) % 10) as f64 + 0.5) / 10.0 * ow as f64) as f32;
        let cy2 = ((((c * 9 + 1) % 10) as f64 + 0.5) / 10.0 * oh as f64) as f32;
        let cx2 = ((((c * 5 + 3) % 10) as f64 + 0.5) / 10.0 * ow as f64) as f32;
        let s1 = ((oh * ow) as f64 * 0.002 * (1 + c % 3) as f64) as f32;
        let s2 = ((oh * ow) as f64 * 0.02) as f32;
        let (a1, a2) = if c % 7 == 6 {
            (0f32, 0f32)
        } else {
            (0.9f32, 0.3f32)
        };
        for i in 0..oh {
            for j in 0..ow {
                let (fi, fj) = (i as f32, j as f32);
                let (dy1, dx1, dy2, dx2) = (fi - cy1, fj - cx1, fi - cy2, fj - cx2);
                let d1 = dy1 * dy1 + dx1 * dx1;
                let d2 = dy2 * dy2 + dx2 * dx2;
                let v1 = a1 / (1.0 + d1 / s1);
                let v2 = a2 / (1.0 + d2 / s2);
                out.push((v1 + v2) - 0.1);
            }
        }
    }
    out
}

/// `detect_hands` / `detect_face` with the crafted stub network at the reference's real
/// constants (scales 0.5–2 → 184–736 px, face input 384): every keypoint equal, and the
/// averaged hand maps bit-equal to the reference's.
#[test]
fn stub_end_to_end_at_real_sizes() {
    let m = maps();
    let e = expected();
    let image = png("image.png");
    let body = person_a();
    let (w, h) = (128usize, 96usize);
    let mut hands: [Option<Vec<Keypoint>>; 2] = [None, None];
    for b in hand::hand_boxes(&body, w, h) {
        let crop = hand::crop_bgr(&image, b.x, b.y, b.w, b.w).unwrap();
        let avg = hand::hand_heatmaps_with(&crop, &hand::SCALE_SEARCH, |_, ph, pw| {
            let (oh, ow) = (ph / 8, pw / 8);
            Ok((stub_maps(22, oh, ow), oh, ow))
        })
        .unwrap();
        if b.is_left {
            for k in [0usize, 5] {
                let ours: Vec<f64> = (0..128 * 128).map(|i| avg[i * 22 + k]).collect();
                let want = f64s(&m[&format!("stub.left.p{k}")]);
                let diff = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(diff, 0, "heatmap_avg part {k}: {diff} values differ");
            }
        }
        let peaks = hand::hand_peaks(&avg, crop.height() as usize, crop.width() as usize);
        hands[!b.is_left as usize] = Some(hand::place_peaks(&peaks, b.x, b.y, w, h));
    }
    let [left, right] = hands;
    assert_eq!(xy(&left), keypoints_of(&e["stub"]["left"]), "left hand");
    assert_eq!(xy(&right), keypoints_of(&e["stub"]["right"]), "right hand");

    for (b, key) in [(person_a(), "face_a"), (face_b(), "face_b")] {
        let fb = face::face_box(&b, w, h).unwrap();
        let crop = hand::crop_bgr(&image, fb.x, fb.y, fb.w, fb.w).unwrap();
        let (_, rh, rw) = face::face_input(&crop, face::FACE_INPUT_SIZE);
        let (oh, ow) = (rh / 8, rw / 8);
        let t = Tensor::from_vec(stub_maps(71, oh, ow), (1, 71, oh, ow), &Device::Cpu).unwrap();
        let (hc, wc) = (crop.height() as usize, crop.width() as usize);
        let heat = face::maps_to_crop(&t, hc, wc).unwrap();
        let peaks = face::face_peaks(&heat, 71, hc, wc);
        let ours = Some(
            hand::place_peaks(&peaks, fb.x, fb.y, w, h)
                .iter()
                .map(|k| [k.x, k.y])
                .collect::<Vec<_>>(),
        );
        let want = keypoints_of(&e["stub"][key]);
        assert_eq!(differing(&ours, &want), 0, "{key}: {ours:?} vs {want:?}");
    }
}

/// The formula-weight hands at the small scales of the fixture (0.125 and 0.375 → 46 and 138
/// px). Left hand: the network inputs we build are the reference's (bit-equal padded BGR
/// images); our network's outputs on them are within 1e-4 of the reference's; the reference's
/// own outputs fed to our post-processing give exactly its keypoints; and ours end to end give
/// them too. Right hand: `detect_hands_px` end to end (a body with only the right arm), exact.
#[test]
fn formula_hands_end_to_end() {
    let m = maps();
    let e = expected();
    let image = png("image.png");
    let (hand_net, _) = nets();
    let scales: Vec<f64> = e["formula_hands"]["scales"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let b = left_box();
    let crop = hand::crop_bgr(&image, b.x, b.y, b.w, b.w).unwrap();
    let reference: Vec<Tensor> = (0..scales.len())
        .map(|i| m[&format!("formula.left.out{i}")].clone())
        .collect();
    let mut call = 0;
    let ours_avg = hand::hand_heatmaps_with(&crop, &scales, |x, ph, pw| {
        let want = png(&format!("formula_left_in{call}.png"));
        assert_eq!((pw, ph), (want.width() as usize, want.height() as usize));
        assert!(x == hand::planar_input(&want), "network input {call}");
        let (ours, oh, ow) = hand_net.run(x, ph, pw).unwrap();
        let err = rel_err(&ours, &f32s(&reference[call]));
        eprintln!("hand network at {pw}x{ph}: max|d|/max|ref| = {err:e}");
        assert!(err < 1e-4, "{err}");
        call += 1;
        Ok((ours, oh, ow))
    })
    .unwrap();
    assert_eq!(call, scales.len());
    let mut call = 0;
    let ref_avg = hand::hand_heatmaps_with(&crop, &scales, |_, _, _| {
        let (_, _, oh, ow) = reference[call].dims4().unwrap();
        call += 1;
        Ok((f32s(&reference[call - 1]), oh, ow))
    })
    .unwrap();
    let place = |avg: &[f64]| {
        let peaks = hand::hand_peaks(avg, crop.height() as usize, crop.width() as usize);
        Some(
            hand::place_peaks(&peaks, b.x, b.y, 128, 96)
                .iter()
                .map(|k| [k.x, k.y])
                .collect::<Vec<_>>(),
        )
    };
    let want_left = keypoints_of(&e["formula_hands"]["left"]);
    assert_eq!(
        place(&ref_avg),
        want_left,
        "on the reference's network outputs"
    );
    let dl = differing(&place(&ours_avg), &want_left);

    let mut right_arm = person_a();
    for i in [5, 6, 7] {
        right_arm.keypoints[i] = None;
    }
    let (left, right) = hand::detect_hands_px(hand_net, &right_arm, &image, &scales).unwrap();
    assert!(left.is_none());
    let dr = differing(&xy(&right), &keypoints_of(&e["formula_hands"]["right"]));
    eprintln!("formula hands end to end: {dl} + {dr} of 42 keypoints differ");
    assert_eq!((dl, dr), (0, 0));
}

/// `detect_face` on formula weights with the network input at 64×64 (the fixture's size):
/// every keypoint equal to the reference's, for a face inside the image and one whose crop
/// the image's edge cuts (24×20).
#[test]
fn formula_face_end_to_end() {
    let e = expected();
    let image = png("image.png");
    let (_, face_net) = nets();
    let size = e["formula_face"]["input_size"].as_u64().unwrap() as usize;
    for (b, key) in [(person_a(), "a"), (face_b(), "b")] {
        let ours = face::detect_face_px(face_net, &b, &image, size).unwrap();
        let want = keypoints_of(&e["formula_face"][key]);
        let d = differing(&xy(&ours), &want);
        eprintln!(
            "formula face {key}: {d} of {} keypoints differ",
            want.as_ref().map_or(0, Vec::len)
        );
        assert_eq!(d, 0, "face {key}");
    }
}
