//! HED and PiDiNet against controlnet_aux 0.0.10 on formula weights; fixtures from
//! `tools/parity/neural/make_hed_pidinet.py` (see its header for what each file holds).
//!
//! * network outputs in f32 (max|Δ| / max|ref|): HED's projections within 1e-4, PiDiNet's
//!   logits within 1e-3 (see `pidinet_matches_reference` for why);
//! * post-processing fed the reference's own float maps: byte-equal hints;
//! * `detect` end to end: hints within a stated number of differing pixels;
//! * f16 on the CPU: network outputs within a stated relative bound.
use std::collections::HashMap;
use std::path::PathBuf;

use annotators::ops::PlaneF32;
use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};
use neural_annotators::formula::FormulaWeights;
use neural_annotators::hed::{self, Hed};
use neural_annotators::pidinet::{self, PiDiNet};
use neural_annotators::Network;

const CASES: [&str; 3] = ["dimphoto_96x128_64", "photo_96x128_128", "shapes_64x80_64"];
const HED_MODULES: [&str; 3] = ["softedge_hed", "softedge_hedsafe", "scribble_hed"];
const PIDI_MODULES: [&str; 3] = ["softedge_pidinet", "softedge_pidisafe", "scribble_pidinet"];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hed_pidinet")
}

fn input(case: &str) -> RgbImage {
    image::open(dir().join(format!("{case}_input.png")))
        .unwrap()
        .to_rgb8()
}

fn hint(case: &str, module: &str) -> GrayImage {
    image::open(dir().join(format!("{case}_{module}.png")))
        .unwrap()
        .to_luma8()
}

fn tensors(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(format!("{case}.safetensors")), &Device::Cpu).unwrap()
}

fn plane(t: &Tensor) -> PlaneF32 {
    let (_, _, h, w) = t.dims4().unwrap();
    PlaneF32 {
        width: w,
        height: h,
        channels: 1,
        data: t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    }
}

fn ref_projections(case: &str) -> Vec<PlaneF32> {
    let t = tensors(case);
    (1..=5).map(|i| plane(&t[&format!("hed.p{i}")])).collect()
}

fn ref_edge(case: &str) -> Vec<f32> {
    plane(&tensors(case)["pidinet"]).data
}

fn ref_logits(case: &str) -> Vec<f32> {
    plane(&tensors(case)["pidinet.logits"]).data
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

fn mismatches(a: &GrayImage, b: &GrayImage) -> usize {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .filter(|(x, y)| x != y)
        .count()
}

fn grey_of(rgb: &RgbImage) -> GrayImage {
    assert!(rgb.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        image::Luma([rgb.get_pixel(x, y).0[0]])
    })
}

/// The fixture inputs are what `annotators::ops::resize_image` makes of the originals.
#[test]
fn inputs_are_resize_image_of_the_originals() {
    let orig = |f: &str| {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../annotators/tests/fixtures")
            .join(f);
        image::open(p).unwrap().to_rgb8()
    };
    let mut dim = orig("in_photo_96x128.png");
    dim.pixels_mut()
        .for_each(|p| p.0.iter_mut().for_each(|v| *v = *v / 16 + 1));
    for (case, img, res) in [
        ("dimphoto_96x128_64", dim, 64),
        ("photo_96x128_128", orig("in_photo_96x128.png"), 128),
        ("shapes_64x80_64", orig("in_shapes_64x80.png"), 64),
    ] {
        assert_eq!(
            annotators::ops::resize_image(&img, res),
            input(case),
            "{case}"
        );
    }
}

/// Post-processing on the reference's own float maps reproduces its hints byte for byte.
#[test]
fn post_processing_is_exact_on_reference_maps() {
    for case in CASES {
        let (w, h) = input(case).dimensions();
        let (w, h) = (w as usize, h as usize);
        let projections = ref_projections(case);
        for m in HED_MODULES {
            let ours = hed::hint_from_projections(m, &projections, w, h).unwrap();
            assert_eq!(mismatches(&ours, &hint(case, m)), 0, "{case} {m}");
        }
        let edge = ref_edge(case);
        for m in PIDI_MODULES {
            let ours = pidinet::hint_from_edge_map(m, &edge, w, h).unwrap();
            assert_eq!(mismatches(&ours, &hint(case, m)), 0, "{case} {m}");
        }
    }
}

/// Network outputs in f32 within 1e-4 relative; `detect` end to end, hints within a bound.
///
/// End to end, a hint pixel can differ only where our map and the reference's straddle a `u8`
/// truncation step (|Δ| ≲ 1e-4 of the map's range), which the reference's own maps put there;
/// scribble hints can additionally differ where a plain-hint difference moves a local maximum.
#[test]
fn hed_matches_reference() {
    let vb = FormulaWeights::var_builder(DType::F32, &Device::Cpu);
    let net = Hed::new(vb.clone()).unwrap();
    let det = Network::Hed.build(vb).unwrap();
    for case in CASES {
        let img = input(case);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let ours = net.projections(&img).unwrap();
        let theirs = ref_projections(case);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!((a.width, a.height), (b.width, b.height));
            let e = rel_err(&a.data, &b.data);
            println!("{case} hed.p{}: rel err {e:.2e}", i + 1);
            assert!(e < 1e-4, "{case} hed.p{}: {e}", i + 1);
        }
        for m in HED_MODULES {
            let ours_hint = hed::hint_from_projections(m, &ours, w, h).unwrap();
            let n = mismatches(&ours_hint, &hint(case, m));
            println!("{case} {m}: {n} of {} pixels differ", w * h);
            assert!(n * 1000 <= w * h, "{case} {m}: {n} pixels differ");
        }
        // `detect` is exactly projections + hint_from_projections.
        let m = HED_MODULES[0];
        let d = grey_of(&det.detect(m, &img, &[]).unwrap());
        assert_eq!(d, hed::hint_from_projections(m, &ours, w, h).unwrap());
    }
}

/// PiDiNet's logits are compared (on formula weights they reach several hundred, so the sigmoid
/// map is a steep function of them and its error is not a relative one). Bound 1e-3, not 1e-4:
/// with formula weights the network is ill-conditioned (activations grow to ~2000 by block4_4
/// and the four dilated convs of each CDCM cancel), so much that torch's own float32 logits
/// differ from its float64 ones by 3.9e-5, 2.7e-4 and 2.9e-5 (relative) on the three cases;
/// ours are within the same order of the float32 reference. Hints: a pixel differs
/// where the map straddles a `u8` step; with the logits' error (≲1e-4 of a few hundred) the
/// map's error near logit 0 is ≲1e-2, i.e. up to ±1 grey level on the transition bands, which
/// cover a few per cent of these images; bound: 1 % of the pixels.
#[test]
fn pidinet_matches_reference() {
    let vb = FormulaWeights::var_builder(DType::F32, &Device::Cpu);
    let net = PiDiNet::new(vb.clone()).unwrap();
    let det = Network::Pidinet.build(vb).unwrap();
    for case in CASES {
        let img = input(case);
        let (w, h) = (img.width() as usize, img.height() as usize);
        let e = rel_err(&net.edge_logits(&img).unwrap(), &ref_logits(case));
        println!("{case} pidinet logits: rel err {e:.2e}");
        assert!(e < 1e-3, "{case} pidinet logits: {e}");
        let ours = net.edge_map(&img).unwrap();
        let e = rel_err(&ours, &ref_edge(case));
        println!("{case} pidinet map: max abs err {e:.2e}");
        for m in PIDI_MODULES {
            let ours_hint = pidinet::hint_from_edge_map(m, &ours, w, h).unwrap();
            let n = mismatches(&ours_hint, &hint(case, m));
            println!("{case} {m}: {n} of {} pixels differ", w * h);
            assert!(n * 100 <= w * h, "{case} {m}: {n} pixels differ");
        }
        let m = PIDI_MODULES[0];
        let d = grey_of(&det.detect(m, &img, &[]).unwrap());
        assert_eq!(d, pidinet::hint_from_edge_map(m, &ours, w, h).unwrap());
    }
}

/// f16 on the CPU (every op both networks use has an f16 CPU kernel in candle 0.11): the
/// network outputs against the f32 reference. HED's projections stay within 1e-2 (bound 2e-2);
/// PiDiNet's logits, for the conditioning reasons above, lose ~1e-3 relative per residual
/// block in f16 and end ~1e-1 off (bound 0.25) — f16 is not a faithful precision for it on
/// these weights; the engine should load PiDiNet (0.7 M parameters) in f32.
#[test]
fn f16_networks_within_bound() {
    let vb = FormulaWeights::var_builder(DType::F16, &Device::Cpu);
    let hed_net = Hed::new(vb.clone()).unwrap();
    let pidi_net = PiDiNet::new(vb).unwrap();
    for case in ["dimphoto_96x128_64", "shapes_64x80_64"] {
        let img = input(case);
        let ours = hed_net.projections(&img).unwrap();
        for (i, (a, b)) in ours.iter().zip(&ref_projections(case)).enumerate() {
            let e = rel_err(&a.data, &b.data);
            println!("{case} f16 hed.p{}: rel err {e:.2e}", i + 1);
            assert!(e < 2e-2, "{case} f16 hed.p{}: {e}", i + 1);
        }
        let e = rel_err(&pidi_net.edge_logits(&img).unwrap(), &ref_logits(case));
        println!("{case} f16 pidinet logits: rel err {e:.2e}");
        assert!(e < 0.25, "{case} f16 pidinet logits: {e}");
    }
}
