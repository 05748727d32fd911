//! Times each network preprocessor on one photo (formula weights, f32, this machine's CPU):
//! the whole detector — detect-size resize, network, post-processing — as `/v1/detect` runs it.
//! Prints one JSON line per preprocessor. `tools/bench/annotators.sh` runs it beside
//! controlnet_aux on the same image and prints the ratios. Depth Anything V2 runs as ViT-L and
//! SegFormer as B5 at 640×640 (what A1111 downloads / the largest ADE20K model), like the
//! reference side.
//!
//! Usage: bench-annotators IMAGE.png [--resolution 512] [--iters 3] [--only NAME,NAME]
use std::time::Instant;

use candle_core::{DType, Device};
use neural_annotators::formula::FormulaWeights;
use neural_annotators::{Architecture, Network};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .ok_or("usage: bench-annotators IMAGE.png [--iters N]")?;
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let iters: usize = flag("--iters").map_or(Ok(3), |s| s.parse())?;
    let resolution: u32 = flag("--resolution").map_or(Ok(512), |s| s.parse())?;
    let only: Option<Vec<String>> =
        flag("--only").map(|s| s.split(',').map(str::to_string).collect());
    let photo = image::open(path)?.to_rgb8();
    let device = Device::Cpu;
    let mut loaded = std::collections::HashMap::new();
    for name in neural_annotators::PREPROCESSORS {
        if only.as_ref().is_some_and(|o| !o.iter().any(|x| x == name)) {
            continue;
        }
        let network = Network::for_preprocessor(name).expect("a network preprocessor");
        let detector = loaded.entry(network).or_insert_with(|| {
            let architecture = match network {
                Network::DepthAnythingV2 => Architecture::DepthAnythingV2(
                    neural_annotators::depth_anything_v2::Config::vitl(),
                ),
                Network::Segformer => {
                    Architecture::Segformer(neural_annotators::segformer::Config::ade_b5())
                }
                n => n.default_architecture(),
            };
            network
                .build_as(
                    FormulaWeights::var_builder(DType::F32, &device),
                    &architecture,
                )
                .expect("builds")
        });
        let pre = annotators::find(name).expect("listed");
        let params: Vec<f64> = pre.params.iter().map(|p| p.default).collect();
        let run = || {
            let started = Instant::now();
            let input = annotators::ops::resize_image(&photo, resolution);
            let hint = detector.detect(name, &input, &params).expect("runs");
            std::hint::black_box(hint);
            started.elapsed().as_secs_f64()
        };
        run(); // warm-up
        let mut times: Vec<f64> = (0..iters).map(|_| run()).collect();
        times.sort_by(f64::total_cmp);
        println!(
            "{{\"impl\": \"controlnet-serve\", \"preprocessor\": \"{name}\", \"median_s\": {:.4}, \"min_s\": {:.4}}}",
            times[times.len() / 2],
            times[0]
        );
    }
    Ok(())
}
