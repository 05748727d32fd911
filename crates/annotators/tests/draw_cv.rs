//! Parity of `annotators::draw_cv` with OpenCV 4.x: `tools/parity/neural/make_openpose_draw.py`
//! → `tests/fixtures/draw_cv/` (cv2's `ellipse2Poly` points, and `fillConvexPoly`, `circle`,
//! `line` drawings, one black 40×32 canvas per case stacked vertically in case order). Every
//! point and every pixel must be equal.

use std::path::PathBuf;

use annotators::draw_cv;
use image::{Rgb, RgbImage};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/draw_cv")
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap()
}

fn i(v: &Value) -> i32 {
    v.as_i64().unwrap() as i32
}

fn pair(v: &Value) -> (i32, i32) {
    (i(&v[0]), i(&v[1]))
}

fn rgb_u8(v: &Value) -> Rgb<u8> {
    Rgb([0, 1, 2].map(|k| v[k].as_u64().unwrap() as u8))
}

/// Compares each case's drawing with its canvas in the stacked sheet `name`.
fn check_sheet(name: &str, cases: &[Value], draw: impl Fn(&mut RgbImage, &Value)) {
    let sheet = image::open(dir().join(name)).unwrap().to_rgb8();
    let all = self::cases();
    let (w, h) = (
        all["canvas"][0].as_u64().unwrap() as u32,
        all["canvas"][1].as_u64().unwrap() as u32,
    );
    assert_eq!(sheet.dimensions(), (w, h * cases.len() as u32));
    let mut failed = Vec::new();
    for (k, case) in cases.iter().enumerate() {
        let mut img = RgbImage::new(w, h);
        draw(&mut img, case);
        let want = image::imageops::crop_imm(&sheet, 0, k as u32 * h, w, h).to_image();
        let diff = img
            .pixels()
            .zip(want.pixels())
            .filter(|(a, b)| a != b)
            .count();
        if diff > 0 {
            failed.push(format!("case {k} {case}: {diff} pixels differ"));
        }
    }
    println!("{name}: {} cases, {} differ", cases.len(), failed.len());
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn ellipse2poly_points_equal_opencv() {
    let all = cases();
    let cases = all["ellipse2poly"].as_array().unwrap();
    for case in cases {
        let got = draw_cv::ellipse2poly(
            pair(&case["center"]),
            pair(&case["axes"]),
            i(&case["angle"]),
            i(&case["arc_start"]),
            i(&case["arc_end"]),
            i(&case["delta"]),
        );
        let want: Vec<(i32, i32)> = case["pts"].as_array().unwrap().iter().map(pair).collect();
        assert_eq!(got, want, "{case}");
    }
    println!("ellipse2poly: {} cases equal", cases.len());
}

#[test]
fn fill_convex_poly_equals_opencv() {
    let all = cases();
    check_sheet("fill.png", all["fill"].as_array().unwrap(), |img, case| {
        let pts: Vec<(i32, i32)> = case["pts"].as_array().unwrap().iter().map(pair).collect();
        draw_cv::fill_convex_poly(img, &pts, rgb_u8(&case["color"]));
    });
}

#[test]
fn circle_equals_opencv() {
    let all = cases();
    check_sheet(
        "circle.png",
        all["circle"].as_array().unwrap(),
        |img, case| {
            draw_cv::circle(
                img,
                pair(&case["center"]),
                i(&case["radius"]),
                rgb_u8(&case["color"]),
                case["filled"].as_bool().unwrap(),
            );
        },
    );
}

#[test]
fn thick_line_equals_opencv() {
    let all = cases();
    check_sheet("line.png", all["line"].as_array().unwrap(), |img, case| {
        // A float colour (hsv_to_rgb * 255), as the hand edges use: OpenCV rounds it.
        let c = Rgb([0, 1, 2].map(|k| {
            draw_cv::saturate_u8(f64::from_bits(case["color_bits"][k].as_u64().unwrap()))
        }));
        draw_cv::line(
            img,
            pair(&case["p0"]),
            pair(&case["p1"]),
            c,
            i(&case["thickness"]),
        );
    });
}

#[test]
fn nothing_outside_and_no_panic_on_extremes() {
    let mut img = RgbImage::new(7, 5);
    let c = Rgb([9, 9, 9]);
    draw_cv::fill_convex_poly(
        &mut img,
        &[
            (i32::MIN / 2, i32::MIN / 2),
            (i32::MAX / 2, 0),
            (0, i32::MAX / 2),
        ],
        c,
    );
    draw_cv::circle(&mut img, (i32::MAX - 3, 2), 4, c, true);
    draw_cv::circle(&mut img, (3, 2), -1, c, true);
    draw_cv::line(&mut img, (i32::MIN / 4, 0), (i32::MAX / 4, 4), c, 9);
    let _ = draw_cv::ellipse2poly((0, 0), (i32::MAX / 4, 4), 33, 0, 360, 0);
    draw_cv::fill_convex_poly(&mut img, &[], c);
}
