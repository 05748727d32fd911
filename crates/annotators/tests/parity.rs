//! Parity with OpenCV: the fixtures are OpenCV's outputs written by
//! `tools/parity/make_annotator_fixtures.py` (see `fixtures/manifest.json`).
//!
//! Every comparison prints its agreement and requires equality. Canny, the resizes and the
//! tile resample are integer / fixed-point arithmetic and OpenCV's order of operations; the
//! float Gaussian blurs (XDoG, lineart_standard) sum in a different order than OpenCV's SIMD
//! code, so on other images a value at a truncation boundary could in principle come out one
//! level apart — these fixtures show none.

use std::path::PathBuf;

use annotators::{ops, preprocess};
use image::{GrayImage, RgbImage};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rgb(name: &str) -> RgbImage {
    image::open(fixtures().join(name)).unwrap().to_rgb8()
}

fn gray(name: &str) -> GrayImage {
    image::open(fixtures().join(name)).unwrap().to_luma8()
}

fn input(m: &Value, case: &Value) -> RgbImage {
    rgb(m["inputs"][case["input"].as_str().unwrap()]
        .as_str()
        .unwrap())
}

fn cases<'a>(m: &'a Value, op: &str) -> Vec<&'a Value> {
    let v: Vec<&Value> = m["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["op"] == op)
        .collect();
    assert!(!v.is_empty(), "no {op} cases in the manifest");
    v
}

/// Fraction of equal bytes, max and mean absolute difference.
fn compare(ours: &[u8], theirs: &[u8]) -> (f64, u8, f64) {
    assert_eq!(ours.len(), theirs.len(), "sizes differ");
    let mut same = 0usize;
    let mut max = 0u8;
    let mut sum = 0u64;
    for (a, b) in ours.iter().zip(theirs) {
        let d = a.abs_diff(*b);
        same += (d == 0) as usize;
        max = max.max(d);
        sum += d as u64;
    }
    let n = ours.len() as f64;
    (same as f64 / n, max, sum as f64 / n)
}

fn first_channel(img: &RgbImage) -> Vec<u8> {
    img.pixels().map(|p| p[0]).collect()
}

#[test]
fn canny_matches_opencv_exactly() {
    let m = manifest();
    for case in cases(&m, "canny") {
        let img = input(&m, case);
        let want = gray(case["output"].as_str().unwrap());
        let got = ops::canny(
            &img,
            case["low"].as_f64().unwrap(),
            case["high"].as_f64().unwrap(),
        );
        assert_eq!(got.dimensions(), want.dimensions());
        let (agree, _, _) = compare(got.as_raw(), want.as_raw());
        let edges = want.as_raw().iter().filter(|&&v| v == 255).count();
        println!(
            "canny {} {}/{}: {:.4}% of pixels agree ({} edge pixels in OpenCV's)",
            case["input"],
            case["low"],
            case["high"],
            agree * 100.0,
            edges
        );
        assert_eq!(got.as_raw(), want.as_raw(), "canny differs for {case}");
    }
}

#[test]
fn resize_image_against_opencv() {
    let m = manifest();
    for case in cases(&m, "resize_image") {
        let img = input(&m, case);
        let want = rgb(case["output"].as_str().unwrap());
        let got = ops::resize_image(&img, case["resolution"].as_u64().unwrap() as u32);
        assert_eq!(got.dimensions(), want.dimensions(), "size for {case}");
        let (agree, max, mean) = compare(got.as_raw(), want.as_raw());
        println!(
            "resize_image {} {}x{} -> {}x{}: {:.2}% of bytes equal, max |diff| {max}, mean {mean:.4}",
            case["input"],
            img.width(),
            img.height(),
            got.width(),
            got.height(),
            agree * 100.0
        );
        assert_eq!(
            got.as_raw(),
            want.as_raw(),
            "resize_image {case}: max |diff| {max}"
        );
    }
}

#[test]
fn canny_preprocessor_against_opencv() {
    let m = manifest();
    for case in cases(&m, "canny_pipeline") {
        let img = input(&m, case);
        let want = gray(case["output"].as_str().unwrap());
        let mut params = annotators::Params::new();
        params.insert("low_threshold".into(), case["low"].as_f64().unwrap());
        params.insert("high_threshold".into(), case["high"].as_f64().unwrap());
        let res = case["resolution"].as_u64().unwrap() as u32;
        let got = annotators::run("canny", &img, res, &params, 0).unwrap();
        let (agree, _, _) = compare(&first_channel(&got), want.as_raw());
        println!(
            "canny preprocessor {} at {res}: {:.4}% of pixels agree",
            case["input"],
            agree * 100.0
        );
        assert_eq!(
            first_channel(&got),
            *want.as_raw(),
            "canny preprocessor {case}"
        );
    }
}

#[test]
fn scribble_xdog_against_opencv() {
    let m = manifest();
    for case in cases(&m, "scribble_xdog") {
        let img = input(&m, case);
        let want = gray(case["output"].as_str().unwrap());
        // The reference ran on the fixture input as is (no resize).
        let got = preprocess::scribble_xdog(&img, case["threshold"].as_f64().unwrap());
        let (agree, _, _) = compare(&first_channel(&got), want.as_raw());
        println!(
            "scribble_xdog {} thr {}: {:.4}% of pixels agree",
            case["input"],
            case["threshold"],
            agree * 100.0
        );
        assert_eq!(first_channel(&got), *want.as_raw(), "scribble_xdog {case}");
    }
}

#[test]
fn lineart_standard_against_opencv() {
    let m = manifest();
    for case in cases(&m, "lineart_standard") {
        let img = input(&m, case);
        let want = gray(case["output"].as_str().unwrap());
        let got = first_channel(&preprocess::lineart_standard(&img));
        let (agree, max, mean) = compare(&got, want.as_raw());
        println!(
            "lineart_standard {}: {:.3}% equal, max |diff| {max}, mean {mean:.4}",
            case["input"],
            agree * 100.0
        );
        assert_eq!(got, *want.as_raw(), "lineart_standard {case}");
    }
}

#[test]
fn tile_resample_against_opencv() {
    let m = manifest();
    for case in cases(&m, "tile_resample") {
        let img = input(&m, case);
        let want = rgb(case["output"].as_str().unwrap());
        let mut params = annotators::Params::new();
        params.insert("down_sampling_rate".into(), case["rate"].as_f64().unwrap());
        let got = annotators::run("tile_resample", &img, 512, &params, 0).unwrap();
        assert_eq!(got.dimensions(), want.dimensions());
        let (agree, max, mean) = compare(got.as_raw(), want.as_raw());
        println!(
            "tile_resample rate {}: {:.2}% equal, max |diff| {max}, mean {mean:.4}",
            case["rate"],
            agree * 100.0
        );
        assert_eq!(got.as_raw(), want.as_raw(), "tile_resample {case}");
    }
}

#[test]
fn shuffle_from_given_noise_against_opencv() {
    let m = manifest();
    for case in cases(&m, "shuffle_from_grid") {
        let img = input(&m, case);
        let want = rgb(case["output"].as_str().unwrap());
        let grid = |k: &str| -> Vec<f64> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
                .collect()
        };
        let f = case["f"].as_u64().unwrap() as usize;
        let got = preprocess::shuffle_from_grids(&img, &grid("grid_x"), &grid("grid_y"), f);
        let (agree, max, mean) = compare(got.as_raw(), want.as_raw());
        println!(
            "shuffle from given noise {}: {:.2}% of bytes equal, max |diff| {max}, mean {mean:.4}",
            case["input"],
            agree * 100.0
        );
        assert_eq!(got.as_raw(), want.as_raw(), "shuffle {}", case["input"]);
    }
}
