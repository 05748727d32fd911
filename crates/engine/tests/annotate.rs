//! Annotators on the engine: network preprocessors load from the configured folder on first
//! use, stay resident, are evicted least-recently-used under a budget (never while in use),
//! give the network's own result, and share the device worker with denoising without either
//! starving the other. Weights are formula weights written as real files.
use candle_core::{DType, Device};
use diffusion::pipeline::{Request, StableDiffusion};
use engine::{
    AdapterRegistry, AdapterSettings, AnnotatorPool, AnnotatorSettings, Availability, Engine,
    EngineConfig, EngineError, Event, Job,
};
use neural_annotators::Network;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Removes a test's weight folder when the test ends, passing or not (formula weight files
/// take hundreds of MB).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn weights_folder(networks: &[Network]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "cns-annotators-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for n in networks {
        let path = dir.join(n.file_name()).with_extension("safetensors");
        neural_annotators::formula::write_safetensors(*n, &path).unwrap();
    }
    dir
}

fn engine(root: Option<&Path>, budget: Option<usize>) -> Engine {
    let model = StableDiffusion::embedded(DType::F32, &Device::Cpu).unwrap();
    let adapters = AdapterRegistry::new(AdapterSettings {
        roots: Vec::new(),
        budget_bytes: None,
        dtype: DType::F32,
        device: Device::Cpu,
    })
    .unwrap();
    let pool = AnnotatorPool::new(AnnotatorSettings {
        root: root.map(Path::to_path_buf),
        budget_bytes: budget,
        dtype: DType::F32,
        device: Device::Cpu,
    });
    Engine::start_with(
        vec![("default".into(), model)],
        Arc::new(adapters),
        Arc::new(pool),
        EngineConfig::default(),
    )
}

fn photo(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 + y * 3) as u8,
            ((x ^ y) * 5) as u8,
            if (x / 8 + y / 8) % 2 == 0 { 40 } else { 220 },
        ])
    })
}

fn params() -> annotators::Params {
    annotators::Params::new()
}

#[test]
fn network_preprocessor_runs_on_the_engine_and_matches_the_network() {
    let dir = weights_folder(&[Network::Hed]);
    let _cleanup = Cleanup(dir.clone());
    let engine = engine(Some(&dir), None);
    let image = photo(80, 64);
    let hint = engine
        .annotate("softedge_hed", &image, Some(64), &params(), 0)
        .unwrap();
    // The detector alone, on the same file and the same detect-size image.
    let (direct, _) = neural_annotators::load(
        Network::Hed,
        &dir.join("ControlNetHED.safetensors"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let detect_size = annotators::ops::resize_image(&image, 64);
    let expected = direct.detect("softedge_hed", &detect_size, &[]).unwrap();
    assert_eq!(hint.dimensions(), detect_size.dimensions());
    assert!(
        hint == expected,
        "the engine's hint differs from the detector's"
    );
    // Aliases reach the same network; loaded once for all of them.
    engine
        .annotate("hed", &image, Some(64), &params(), 0)
        .unwrap();
    engine
        .annotate("scribble_hed", &image, Some(64), &params(), 0)
        .unwrap();
    assert_eq!(engine.status().annotators.loads, 1);
    assert_eq!(engine.status().annotators.resident, 1);
    assert!(engine.status().annotators.resident_bytes > 0);
    // Weight-free ones run through the same entry point.
    let canny = engine
        .annotate("canny", &image, Some(64), &params(), 0)
        .unwrap();
    assert_eq!(
        canny,
        annotators::run("canny", &image, 64, &params(), 0).unwrap()
    );
}

#[test]
fn missing_weights_name_the_preprocessor_the_file_and_the_folder() {
    let dir = weights_folder(&[Network::Hed]);
    let _cleanup = Cleanup(dir.clone());
    let engine = engine(Some(&dir), None);
    let pool = engine.annotators();
    let mlsd = annotators::find("mlsd").unwrap();
    assert_eq!(
        pool.availability(mlsd),
        Availability::MissingWeights(vec!["mlsd_large_512_fp32.pth".into()])
    );
    assert_eq!(
        pool.availability(annotators::find("softedge_hed").unwrap()),
        Availability::Ready
    );
    assert_eq!(
        pool.availability(annotators::find("lineart_anime_denoise").unwrap()),
        Availability::NotImplemented
    );
    // Deliberately unsupported ones say why and what to use instead, before any loading.
    let leres = annotators::find("depth_leres").unwrap();
    assert!(matches!(
        pool.availability(leres),
        Availability::Unsupported(_)
    ));
    let err = engine
        .annotate("depth_leres", &photo(64, 64), None, &params(), 0)
        .unwrap_err();
    for part in ["depth_leres", "not supported", "depth_anything_v2"] {
        assert!(err.to_string().contains(part), "{err} lacks {part}");
    }
    let err = engine
        .annotate("mlsd", &photo(64, 64), None, &params(), 0)
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, EngineError::Annotator(_)), "{err:?}");
    for part in [
        "mlsd",
        "mlsd_large_512_fp32.pth",
        &dir.display().to_string(),
    ] {
        assert!(text.contains(part), "{text} lacks {part}");
    }
    // No folder at all.
    let bare = engine_without_folder();
    let err = bare
        .annotate("lineart_anime", &photo(64, 64), None, &params(), 0)
        .unwrap_err();
    assert!(err.to_string().contains("netG.pth"), "{err}");
    // Bad parameters are refused before any loading.
    let mut p = params();
    p.insert("value_threshold".into(), 9.0);
    let err = engine
        .annotate("mlsd", &photo(64, 64), None, &p, 0)
        .unwrap_err();
    assert!(err.to_string().contains("value_threshold"), "{err}");
    assert_eq!(engine.status().annotators.loads, 0);
}

fn engine_without_folder() -> Engine {
    engine(None, None)
}

#[test]
fn budget_evicts_the_least_recently_used_idle_network_and_reloads_on_demand() {
    let dir = weights_folder(&[Network::Hed, Network::LineartRealistic]);
    let _cleanup = Cleanup(dir.clone());
    let hed_bytes = size_of(&dir, Network::Hed);
    let lineart_bytes = size_of(&dir, Network::LineartRealistic);
    // Room for the larger one, not for both.
    let budget = hed_bytes.max(lineart_bytes) + 1;
    let engine = engine(Some(&dir), Some(budget));
    let image = photo(64, 64);
    let first = engine
        .annotate("softedge_hed", &image, Some(64), &params(), 0)
        .unwrap();
    engine
        .annotate("lineart_realistic", &image, Some(64), &params(), 0)
        .unwrap();
    let s = engine.status().annotators;
    assert_eq!((s.loads, s.evictions, s.resident), (2, 1, 1));
    assert!(s.resident_bytes <= budget);
    // HED was evicted: it loads again, and gives the same hint.
    let again = engine
        .annotate("softedge_hed", &image, Some(64), &params(), 0)
        .unwrap();
    assert_eq!(first, again);
    let s = engine.status().annotators;
    assert_eq!((s.loads, s.evictions, s.resident), (3, 2, 1));

    // A network in use is never evicted: holding HED, lineart cannot load.
    let pool = engine.annotators();
    let held = pool.acquire("softedge_hed", Network::Hed).unwrap();
    let err = match pool.acquire("lineart_realistic", Network::LineartRealistic) {
        Ok(_) => panic!("loaded over the budget while HED is in use"),
        Err(e) => e,
    };
    assert!(matches!(err, EngineError::MemoryBudget(_)), "{err:?}");
    assert_eq!(pool.resident(), vec![(Network::Hed, hed_bytes)]);
    drop(held);
    pool.acquire("lineart_realistic", Network::LineartRealistic)
        .unwrap();
    assert_eq!(
        pool.resident(),
        vec![(Network::LineartRealistic, lineart_bytes)]
    );
}

/// Bytes of a network's weights as loaded (f32).
fn size_of(dir: &Path, network: Network) -> usize {
    let path = network.find_file(dir).unwrap();
    neural_annotators::load(network, &path, DType::F32, &Device::Cpu)
        .unwrap()
        .1
}

fn generation(steps: usize) -> Job {
    let mut req = Request::txt2img("a house", 64, 64);
    req.steps = steps;
    Job::new(req)
}

/// Waits for a job's end; the instant it ended.
fn finish(mut handle: engine::JobHandle) -> Instant {
    loop {
        match handle.events.blocking_recv() {
            Some(Event::Done { .. }) => return Instant::now(),
            Some(Event::Failed(e)) => panic!("generation failed: {e}"),
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
}

#[test]
fn annotations_and_generations_share_the_worker_without_starving() {
    let dir = weights_folder(&[Network::Hed]);
    let _cleanup = Cleanup(dir.clone());
    let engine = Arc::new(engine(Some(&dir), None));
    let image = photo(64, 64);
    // Load first, so that the timings below are runs, not loads.
    engine
        .annotate("softedge_hed", &image, Some(64), &params(), 0)
        .unwrap();

    // A long generation is running: a few annotations finish long before it does (one runs
    // between two of its steps; they do not wait for its end).
    let mut handle = engine.submit(generation(40)).unwrap();
    loop {
        if let Some(Event::Step { .. }) = handle.events.blocking_recv() {
            break;
        }
    }
    let annotated: Vec<Instant> = (0..3)
        .map(|_| {
            let (engine, image) = (engine.clone(), image.clone());
            std::thread::spawn(move || {
                engine
                    .annotate("softedge_hed", &image, Some(64), &params(), 0)
                    .unwrap();
                Instant::now()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let steps_when_annotated = engine.status().steps_run;
    let generated = finish(handle);
    assert!(annotated.iter().all(|t| *t < generated));
    assert!(
        steps_when_annotated < 40,
        "annotations waited for the generation ({steps_when_annotated} steps run)"
    );

    // The other way round: a burst of annotations is queued; a short generation submitted
    // after them finishes before the burst is through.
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let (engine, image) = (engine.clone(), image.clone());
            std::thread::spawn(move || {
                engine
                    .annotate("softedge_hed", &image, Some(64), &params(), 0)
                    .unwrap();
                Instant::now()
            })
        })
        .collect();
    let until = Instant::now() + std::time::Duration::from_secs(60);
    while engine.status().annotations_queued < 8 && Instant::now() < until {
        std::thread::yield_now();
    }
    let generated = finish(engine.submit(generation(3)).unwrap());
    let ends: Vec<Instant> = burst.into_iter().map(|t| t.join().unwrap()).collect();
    let after = ends.iter().filter(|t| **t > generated).count();
    assert!(
        after >= 3,
        "the generation waited for the annotation burst ({after} annotations ended after it)"
    );
}

/// OpenPose loads its hand and face networks only when their files are present: a module
/// that needs a part added to the folder after OpenPose loaded reloads it (once), and the
/// module list says which file each module lacks.
#[test]
fn openpose_reloads_when_a_needed_part_arrives() {
    let dir = weights_folder(&[]);
    let _cleanup = Cleanup(dir.clone());
    let [body, hand, _] = neural_annotators::formula::openpose_shapes().unwrap();
    neural_annotators::formula::save_shapes(body, &dir.join("body_pose_model.safetensors"))
        .unwrap();
    let engine = engine(Some(&dir), None);
    let pool = engine.annotators();
    assert_eq!(
        pool.availability(annotators::find("openpose").unwrap()),
        Availability::Ready
    );
    assert_eq!(
        pool.availability(annotators::find("openpose_full").unwrap()),
        Availability::MissingWeights(vec!["hand_pose_model.pth".into(), "facenet.pth".into()])
    );
    // A flat image: the formula-weight body network finds nobody, so the hand network (four
    // scales per hand) has nothing to run on and the test stays quick.
    let image = image::RgbImage::from_pixel(64, 64, image::Rgb([128, 128, 128]));
    engine
        .annotate("openpose", &image, Some(64), &params(), 0)
        .unwrap();
    let err = engine
        .annotate("openpose_hand", &image, Some(64), &params(), 0)
        .unwrap_err();
    assert!(err.to_string().contains("hand_pose_model.pth"), "{err}");
    assert_eq!(engine.status().annotators.loads, 1);

    neural_annotators::formula::save_shapes(hand, &dir.join("hand_pose_model.safetensors"))
        .unwrap();
    engine
        .annotate("openpose_hand", &image, Some(64), &params(), 0)
        .unwrap();
    assert_eq!(
        engine.status().annotators.loads,
        2,
        "reloaded with the hand"
    );
    engine
        .annotate("openpose", &image, Some(64), &params(), 0)
        .unwrap();
    assert_eq!(
        engine.status().annotators.loads,
        2,
        "the reload serves both"
    );
    assert_eq!(engine.status().annotators.resident, 1);
}
