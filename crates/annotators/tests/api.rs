//! Behaviour of the public API: the module table, parameter checking, sizes, determinism.

use annotators::{find, list, run, AnnotatorError, Params};
use image::{Rgb, RgbImage};

/// A small image with structure: gradient, a bright square, a dark diagonal line.
fn test_image(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let mut p = Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 128]);
        if x > w / 4 && x < w / 2 && y > h / 4 && y < h / 2 {
            p = Rgb([240, 240, 240]);
        }
        if (x as i64 - y as i64).abs() <= 1 {
            p = Rgb([10, 10, 10]);
        }
        p
    })
}

fn params(kv: &[(&str, f64)]) -> Params {
    kv.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn every_listed_preprocessor_runs_or_needs_weights() {
    let img = test_image(70, 50);
    let mut ran = Vec::new();
    for pre in list() {
        match run(pre.name, &img, 64, &Params::new(), 1) {
            Ok(out) => {
                assert!(
                    pre.model_free,
                    "{} ran but is listed as needing weights",
                    pre.name
                );
                assert!(out.width() > 0 && out.height() > 0, "{}", pre.name);
                if pre.resolution.is_some() {
                    // 50 -> 64, 70 * 64/50 = 89.6 -> 64
                    assert_eq!(out.dimensions(), (64, 64), "{}", pre.name);
                }
                ran.push(pre.name);
            }
            Err(AnnotatorError::NeedsWeights(n)) => {
                assert_eq!(n, pre.name);
                assert!(
                    !pre.model_free,
                    "{} is model_free but needs weights",
                    pre.name
                );
                assert!(
                    !pre.weights.is_empty(),
                    "{} lists no weight files",
                    pre.name
                );
            }
            Err(e) => panic!("{}: unexpected error {e}", pre.name),
        }
    }
    for want in [
        "none",
        "canny",
        "invert",
        "tile_resample",
        "shuffle",
        "scribble_xdog",
        "lineart_standard",
    ] {
        assert!(ran.contains(&want), "{want} did not run");
    }
}

#[test]
fn module_table_is_consistent() {
    let mut names = std::collections::HashSet::new();
    for pre in list() {
        for n in std::iter::once(&pre.name).chain(pre.aliases) {
            assert!(names.insert(*n), "name {n} used twice");
        }
        for s in pre.params.iter().chain(pre.resolution.iter()) {
            assert!(
                s.min <= s.default && s.default <= s.max,
                "{}.{}",
                pre.name,
                s.name
            );
            assert!(s.step > 0.0, "{}.{}", pre.name, s.name);
        }
        assert!(std::ptr::eq(find(pre.name).unwrap(), pre), "{}", pre.name);
    }
    for name in [
        "mlsd",
        "softedge_hed",
        "openpose",
        "depth_midas",
        "normal_bae",
    ] {
        assert!(!find(name).unwrap().model_free, "{name}");
    }
    let canny = find("canny").unwrap();
    let names: Vec<_> = canny.params.iter().map(|p| (p.name, p.default)).collect();
    assert_eq!(names, [("low_threshold", 100.0), ("high_threshold", 200.0)]);
    assert_eq!(canny.default_resolution(), 512);
}

#[test]
fn aliases_and_unknown_names() {
    assert_eq!(find("None").unwrap().name, "none");
    assert_eq!(find("depth").unwrap().name, "depth_midas");
    assert_eq!(find("hed").unwrap().name, "softedge_hed");
    assert_eq!(find("lineart").unwrap().name, "lineart_realistic");
    assert!(find("no_such_module").is_none());
    let img = test_image(8, 8);
    assert_eq!(
        run("no_such_module", &img, 512, &Params::new(), 0),
        Err(AnnotatorError::UnknownPreprocessor("no_such_module".into()))
    );
    assert!(matches!(
        run("depth", &img, 512, &Params::new(), 0),
        Err(AnnotatorError::NeedsWeights(n)) if n == "depth_midas"
    ));
}

fn bad_param_name(r: Result<RgbImage, AnnotatorError>) -> String {
    match r {
        Err(AnnotatorError::BadParam { name, .. }) => name,
        other => panic!("expected BadParam, got {other:?}"),
    }
}

#[test]
fn bad_params_are_named() {
    let img = test_image(64, 64);
    for (kv, name) in [
        (params(&[("low_threshold", f64::NAN)]), "low_threshold"),
        (params(&[("high_threshold", 256.0)]), "high_threshold"),
        (params(&[("low_threshold", 0.0)]), "low_threshold"),
        (
            params(&[("high_threshold", f64::INFINITY)]),
            "high_threshold",
        ),
        (params(&[("threshold", 10.0)]), "threshold"), // not a canny parameter
    ] {
        assert_eq!(bad_param_name(run("canny", &img, 64, &kv, 0)), name);
    }
    assert_eq!(
        bad_param_name(run(
            "tile_resample",
            &img,
            64,
            &params(&[("down_sampling_rate", 9.0)]),
            0
        )),
        "down_sampling_rate"
    );
    assert_eq!(
        bad_param_name(run(
            "scribble_xdog",
            &img,
            64,
            &params(&[("threshold", -3.0)]),
            0
        )),
        "threshold"
    );
    // Weight-needing modules check their parameters too.
    assert_eq!(
        bad_param_name(run(
            "mlsd",
            &img,
            512,
            &params(&[("value_threshold", 5.0)]),
            0
        )),
        "value_threshold"
    );
    for res in [0, 63, 2049, u32::MAX] {
        assert_eq!(
            bad_param_name(run("canny", &img, res, &Params::new(), 0)),
            "processor_res"
        );
    }
    // Preprocessors without a resolution ignore it.
    assert!(run("invert", &img, 0, &Params::new(), 0).is_ok());
    // The message names the parameter too.
    let e = run(
        "canny",
        &img,
        64,
        &params(&[("low_threshold", f64::NAN)]),
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("low_threshold"), "{e}");
}

#[test]
fn output_sizes_follow_resize_image() {
    // (input w, h, resolution) -> detect (w, h), worked out by hand from controlnet_aux's rule.
    let cases = [
        ((300, 200, 512), (768, 512)), // k 2.56: 768 x 512
        ((200, 300, 512), (512, 768)),
        ((512, 544, 512), (512, 512)), // 544 / 64 = 8.5 rounds to even 8
        ((512, 608, 512), (512, 640)), // 9.5 rounds to even 10
        ((100, 100, 64), (64, 64)),
        ((640, 480, 480), (640, 512)),  // 480 / 64 = 7.5 -> 8
        ((1000, 700, 256), (384, 256)), // 365.7 / 64 = 5.7 -> 6
        ((33, 20, 100), (192, 128)),    // 165 / 64 = 2.58 -> 3; 100 / 64 = 1.56 -> 2
    ];
    for ((w, h, res), want) in cases {
        let img = test_image(w, h);
        for name in ["canny", "scribble_xdog", "lineart_standard", "shuffle"] {
            let out = run(name, &img, res, &Params::new(), 0).unwrap();
            assert_eq!(out.dimensions(), want, "{name} {w}x{h} at {res}");
        }
    }
    // Preprocessors without a detect resolution keep the input size.
    let img = test_image(33, 20);
    for name in ["none", "invert", "tile_resample"] {
        assert_eq!(
            run(name, &img, 512, &Params::new(), 0)
                .unwrap()
                .dimensions(),
            (33, 20)
        );
    }
}

#[test]
fn empty_and_oversized_images_are_errors() {
    let empty = RgbImage::new(0, 10);
    for pre in list().iter().filter(|p| p.model_free) {
        assert!(
            matches!(
                run(pre.name, &empty, 512, &Params::new(), 0),
                Err(AnnotatorError::EmptyImage { .. })
            ),
            "{}",
            pre.name
        );
    }
    // 1 x 20000 at resolution 512 would be a 512 x 10 240 000 detect image.
    let strip = RgbImage::new(1, 20_000);
    assert!(matches!(
        run("canny", &strip, 512, &Params::new(), 0),
        Err(AnnotatorError::ImageTooLarge { .. })
    ));
    // Without a detect resolution the same strip is fine.
    assert_eq!(
        run("invert", &strip, 512, &Params::new(), 0)
            .unwrap()
            .dimensions(),
        (1, 20_000)
    );
    // Tiny inputs still work (upscaled to the detect size; tile_resample clamps to 1x1).
    let tiny = test_image(1, 1);
    for pre in list().iter().filter(|p| p.model_free) {
        let p = if pre.name == "tile_resample" {
            params(&[("down_sampling_rate", 8.0)])
        } else {
            Params::new()
        };
        let out = run(pre.name, &tiny, 64, &p, 0).unwrap();
        assert!(out.width() >= 1 && out.height() >= 1, "{}", pre.name);
    }
}

#[test]
fn shuffle_is_deterministic_per_seed() {
    let img = test_image(96, 64);
    let a = run("shuffle", &img, 64, &Params::new(), 7).unwrap();
    let b = run("shuffle", &img, 64, &Params::new(), 7).unwrap();
    let c = run("shuffle", &img, 64, &Params::new(), 8).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let resized = annotators::ops::resize_image(&img, 64);
    assert_ne!(a, resized, "shuffle left the image unchanged");
    // The warp samples inside the image: every output colour lies within the input's range.
    let (lo, hi) = resized
        .as_raw()
        .iter()
        .fold((255u8, 0u8), |(l, h), &v| (l.min(v), h.max(v)));
    assert!(a.as_raw().iter().all(|&v| v >= lo && v <= hi));
}

#[test]
fn simple_preprocessors() {
    let img = test_image(40, 30);
    assert_eq!(run("none", &img, 512, &Params::new(), 0).unwrap(), img);
    let inv = run("invert", &img, 512, &Params::new(), 0).unwrap();
    for (a, b) in inv.as_raw().iter().zip(img.as_raw()) {
        assert_eq!(*a, 255 - *b);
    }
    assert_eq!(run("invert", &inv, 512, &Params::new(), 0).unwrap(), img);

    // tile_resample: below 1.1 the image is returned as is; else int(size / rate).
    let same = run(
        "tile_resample",
        &img,
        512,
        &params(&[("down_sampling_rate", 1.05)]),
        0,
    );
    assert_eq!(same.unwrap(), img);
    let half = run(
        "tile_resample",
        &img,
        512,
        &params(&[("down_sampling_rate", 2.0)]),
        0,
    );
    assert_eq!(half.unwrap().dimensions(), (20, 15));
    let third = run(
        "tile_resample",
        &img,
        512,
        &params(&[("down_sampling_rate", 3.3)]),
        0,
    );
    assert_eq!(third.unwrap().dimensions(), (12, 9));
}

#[test]
fn canny_finds_edges_only_where_there_are_some() {
    let flat = RgbImage::from_pixel(64, 64, Rgb([120, 30, 200]));
    let out = run("canny", &flat, 64, &Params::new(), 0).unwrap();
    assert!(out.as_raw().iter().all(|&v| v == 0));

    let step = RgbImage::from_fn(64, 64, |x, _| {
        if x < 32 {
            Rgb([0, 0, 0])
        } else {
            Rgb([200, 200, 200])
        }
    });
    let out = run("canny", &step, 64, &Params::new(), 0).unwrap();
    for y in 0..64 {
        let row: Vec<u32> = (0..64).filter(|&x| out.get_pixel(x, y)[0] == 255).collect();
        assert_eq!(row.len(), 1, "row {y}: {row:?}");
        assert!((31..=32).contains(&row[0]), "row {y}: {row:?}");
    }
    // Thresholds matter: a weak step disappears under high ones.
    let weak = RgbImage::from_fn(64, 64, |x, _| {
        if x < 32 {
            Rgb([100, 100, 100])
        } else {
            Rgb([115, 115, 115])
        }
    });
    let lo = run(
        "canny",
        &weak,
        64,
        &params(&[("low_threshold", 10.0), ("high_threshold", 20.0)]),
        0,
    )
    .unwrap();
    let hi = run("canny", &weak, 64, &Params::new(), 0).unwrap();
    assert!(lo.as_raw().contains(&255));
    assert!(hi.as_raw().iter().all(|&v| v == 0));
}

#[test]
fn thresholds_map_onto_params() {
    let canny = find("canny").unwrap();
    assert_eq!(
        canny.params_from_thresholds(50.0, -1.0),
        params(&[("low_threshold", 50.0)])
    );
    assert_eq!(
        canny.params_from_thresholds(-1.0, 120.0),
        params(&[("high_threshold", 120.0)])
    );
    let xdog = find("scribble_xdog").unwrap();
    assert_eq!(
        xdog.params_from_thresholds(20.0, 64.0),
        params(&[("threshold", 20.0)])
    );
    assert!(find("invert")
        .unwrap()
        .params_from_thresholds(3.0, 4.0)
        .is_empty());
}
