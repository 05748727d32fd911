//! The original single-file SD 1.x checkpoint (`v1-5-pruned-emaonly.safetensors` layout): the
//! tiny pipeline folder's UNet, VAE and text encoder written as one file by
//! `tools/parity/make_single_file_fixtures.py` (UNet keys by the inverse of diffusers'
//! conversion, read back exactly by diffusers' converters). Loaded from that file the models are
//! the folder's, value for value, so everything they make must be identical.
mod common;

use candle_core::{DType, Device, Tensor};
use common::{final_latents, fixtures, identical, parity_request, rel_err};
use diffusion::pipeline::{SingleFileConfigs, StableDiffusion};
use diffusion::schedulers::SchedulerKind;
use diffusion::weights::WeightFile;
use diffusion::{ClipTextConfig, ClipTokenizer, UNet2DConditionModel, UNetConfig, VaeConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn single_file() -> PathBuf {
    fixtures().join("pipeline_sd15_single_file.safetensors")
}

fn folder() -> PathBuf {
    fixtures().join("pipeline_sd15")
}

/// The folder's own configs: the tiny models' norm group counts and head counts are not SD's,
/// and no shape shows them.
fn folder_configs() -> SingleFileConfigs {
    let dir = folder();
    SingleFileConfigs {
        unet: Some(UNetConfig::from_file(&dir.join("unet/config.json")).unwrap()),
        vae: Some(VaeConfig::from_file(&dir.join("vae/config.json")).unwrap()),
        text_encoder: Some(
            ClipTextConfig::from_file(&dir.join("text_encoder/config.json")).unwrap(),
        ),
    }
}

fn load_single_file(path: &Path) -> diffusion::Result<StableDiffusion> {
    let tokenizer = ClipTokenizer::from_dir(&folder().join("tokenizer")).unwrap();
    StableDiffusion::load_single_file(
        path,
        folder_configs(),
        Some(tokenizer),
        DType::F32,
        &Device::Cpu,
    )
}

#[test]
fn single_file_gives_the_folders_final_latents() {
    let dev = Device::Cpu;
    let from_folder = StableDiffusion::load(&folder(), DType::F32, &dev).unwrap();
    let from_file = load_single_file(&single_file()).unwrap();
    let cases: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("pipeline_cases.safetensors"), &dev)
            .unwrap();
    // The single file has no scheduler config: SD 1.5's is used, which the folder ships.
    assert_eq!(from_file.scheduler_config, from_folder.scheduler_config);
    let mut ddim_latents = None;
    for (name, kind) in [
        ("ddim", SchedulerKind::Ddim),
        ("unipc", SchedulerKind::UniPc),
    ] {
        let req = parity_request(kind, &cases["latents"]);
        let ours = final_latents(&from_file, &req);
        let reference = final_latents(&from_folder, &req);
        assert!(identical(&ours, &reference), "{name}: latents differ");
        // And so within the folder's bound of diffusers' (tests/pipeline.rs).
        let err = rel_err(&ours, &cases[&format!("{name}.latents")]);
        eprintln!("{name}: single-file final latents rel err {err:.2e} against diffusers");
        assert!(err <= 1e-4, "{name}: {err:.3e}");
        ddim_latents.get_or_insert(ours);
    }
    // The latents do not go through the VAE's decoder: decode them with both.
    let latents = ddim_latents.unwrap();
    let decode = |sd: &StableDiffusion| sd.vae.decode_latents(&latents).unwrap();
    assert!(identical(&decode(&from_file), &decode(&from_folder)));
}

#[test]
fn unet_config_read_off_the_file_is_the_folders_but_for_the_group_count() {
    let weights = WeightFile::open(&single_file()).unwrap();
    let mut inferred = diffusion::ldm::infer_unet_config(&weights).unwrap();
    let expected = UNetConfig::from_file(&folder().join("unet/config.json")).unwrap();
    // No shape shows the norm group count: inference assumes SD's 32, the tiny UNet has 16.
    assert_eq!(inferred.encoder.norm_num_groups, 32);
    assert_eq!(expected.encoder.norm_num_groups, 16);
    inferred.encoder.norm_num_groups = expected.encoder.norm_num_groups;
    // The resolved spec holds every encoder field (levels, channels, resnets, attention heads,
    // depth and cross-attention width, projections, ...); the up path and the output are apart.
    assert_eq!(inferred.resolve().unwrap(), expected.resolve().unwrap());
    assert_eq!(inferred.up_block_types, expected.up_block_types);
    assert_eq!(inferred.out_channels, expected.out_channels);

    // The UNet loaded with that config is the folder's.
    let dev = Device::Cpu;
    let from_file =
        UNet2DConditionModel::from_single_file(weights, Some(inferred), DType::F32, &dev).unwrap();
    let from_folder =
        UNet2DConditionModel::from_diffusers_dir(&folder().join("unet"), DType::F32, &dev).unwrap();
    let cases = common::Cases::load();
    let sample = cases.get("sd15.sample");
    let timesteps = cases.get("sd15.timesteps");
    let states = cases.get("sd15.encoder_hidden_states");
    let run = |m: &UNet2DConditionModel| m.forward(&sample, &timesteps, &states, None).unwrap();
    assert!(identical(&run(&from_file), &run(&from_folder)));

    // The UNet's config left to inference (as `load` leaves all three): the tiny UNet's 48
    // channels do not split into SD's 32 groups, and the error says so by name.
    let configs = SingleFileConfigs {
        unet: None,
        ..folder_configs()
    };
    let err = StableDiffusion::load_single_file(&single_file(), configs, None, DType::F32, &dev)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("48"), "{err}");
    assert!(err.contains("norm_num_groups 32"), "{err}");
}

/// A copy of the single file without `key`.
fn without(key: &str) -> (PathBuf, PathBuf) {
    let mut tensors = candle_core::safetensors::load(single_file(), &Device::Cpu).unwrap();
    assert!(tensors.remove(key).is_some(), "{key} is not in the fixture");
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "diffusion-single-file-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    (dir, path)
}

fn load_error(path: &Path) -> String {
    load_single_file(path).map(|_| ()).unwrap_err().to_string()
}

#[test]
fn missing_unet_tensors_are_errors_naming_the_file_and_the_key() {
    // Loaded with a config: a missing tensor has no stored name to show, the error names the
    // model's name and the layout.
    let (dir, path) = without("model.diffusion_model.output_blocks.1.1.conv.weight");
    let err = load_error(&path);
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains("up_blocks.0.upsamplers.0.conv.weight") && err.contains("missing"),
        "{err}"
    );
    assert!(err.contains("original SD single file"), "{err}");
    assert!(err.contains("broken.safetensors"), "{err}");

    // With the config read off the shapes, a tensor inference reads is named by its stored key.
    let (dir, path) = without("model.diffusion_model.out.2.weight");
    let weights = WeightFile::open(&path).unwrap();
    let err = diffusion::ldm::infer_unet_config(&weights)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains("`model.diffusion_model.out.2.weight` is missing"),
        "{err}"
    );
    assert!(err.contains("broken.safetensors"), "{err}");
}
