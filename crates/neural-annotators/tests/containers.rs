//! Every network loads from the containers users have — its file name, torch zip or legacy
//! pickle, f16 or f32 storage, nested under `state_dict`, `module.` on every key — and gives
//! exactly what the same formula weights give when built directly.
use candle_core::{DType, Device};
use diffusion::torch_pickle::{save, Format, SaveOptions, StorageDtype, TensorData};
use neural_annotators::formula::FormulaWeights;
use neural_annotators::Network;

fn photo() -> image::RgbImage {
    image::RgbImage::from_fn(64, 64, |x, y| {
        let disc = (x as i32 - 30).pow(2) + (y as i32 - 34).pow(2) < 300;
        image::Rgb(if disc {
            [20, 150, 230]
        } else {
            [(x * 3) as u8, (y * 4) as u8, ((x + y) % 32 * 6) as u8]
        })
    })
}

fn opts(format: Format, dtype: StorageDtype, nest: &[&str], prefix: &str) -> SaveOptions {
    SaveOptions {
        format,
        dtype,
        nest: nest.iter().map(|s| s.to_string()).collect(),
        prefix: prefix.into(),
    }
}

/// The layouts of the real files (ControlNetHED.pth is f16; table5_pidinet.pth nests under
/// `state_dict` with `module.`; netG.pth has `module.`; scannet.pt nests under `model` with
/// `module.`; upernet_global_small.pth is an mmcv checkpoint, under `state_dict`), plus the
/// legacy format and `.safetensors`, which users may have too. SegFormer comes as a Hugging
/// Face folder: safetensors only.
fn layouts(network: Network) -> Vec<(&'static str, Option<SaveOptions>)> {
    let real = match network {
        Network::Hed => opts(Format::Zip, StorageDtype::F16, &[], ""),
        Network::Pidinet => opts(Format::Zip, StorageDtype::F32, &["state_dict"], "module."),
        Network::LineartAnime => opts(Format::Zip, StorageDtype::F32, &[], "module."),
        Network::NormalBae => opts(Format::Zip, StorageDtype::F32, &["model"], "module."),
        Network::Uniformer => opts(Format::Zip, StorageDtype::F32, &["state_dict"], ""),
        Network::Segformer => return vec![("safetensors", None)],
        _ => opts(Format::Zip, StorageDtype::F32, &[], ""),
    };
    vec![
        ("real", Some(real)),
        (
            "legacy",
            Some(opts(
                Format::Legacy,
                StorageDtype::F16,
                &["model"],
                "module.",
            )),
        ),
        ("safetensors", None),
    ]
}

/// The large networks (MiDaS 121 M values, NormalBAE 73 M, UniFormer 51 M, OpenPose's three
/// files) are not written three times here (hundreds of MB each); their own tests write and
/// load their real layout (`tests/midas.rs`, `tests/normal_bae.rs`, `tests/uniformer.rs`,
/// `tests/openpose_body.rs`, `tests/openpose_hand_face.rs`; the server's
/// `tests/annotators.rs` serves OpenPose from a legacy pickle).
const COVERED_ELSEWHERE: [Network; 4] = [
    Network::Midas,
    Network::NormalBae,
    Network::Uniformer,
    Network::Openpose,
];

/// The `.pth` name the folder lookup finds for the default architecture.
fn pth_name(network: Network) -> &'static str {
    match network {
        Network::DepthAnythingV2 => "depth_anything_v2_vits.pth",
        n => n.file_name(),
    }
}

#[test]
fn every_network_loads_from_every_container() {
    let dir = std::env::temp_dir().join(format!("cns-containers-{}", std::process::id()));
    let image = photo();
    let mut tested = Vec::new();
    for network in Network::ALL {
        if COVERED_ELSEWHERE.contains(&network) {
            continue;
        }
        tested.push(network);
        let state = neural_annotators::formula::state_dict(network).unwrap();
        let weights: usize = state
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum();
        let direct = network
            .build(FormulaWeights::var_builder(DType::F32, &Device::Cpu))
            .unwrap();
        let preprocessor = neural_annotators::PREPROCESSORS
            .into_iter()
            .find(|p| Network::for_preprocessor(p) == Some(network))
            .unwrap();
        let params: Vec<f64> = annotators::find(preprocessor)
            .unwrap()
            .params
            .iter()
            .map(|p| p.default)
            .collect();
        let expected = direct.detect(preprocessor, &image, &params).unwrap();
        for (layout, options) in layouts(network) {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = match options {
                Some(options) => {
                    let tensors: Vec<(String, TensorData)> = state
                        .iter()
                        .map(|(n, s, v)| (n.clone(), TensorData::new(s.clone(), v.clone())))
                        .collect();
                    let path = dir.join(pth_name(network));
                    save(&path, &tensors, options).unwrap();
                    path
                }
                None => neural_annotators::formula::write_into_folder(network, &dir).unwrap(),
            };
            assert_eq!(network.find_file(&dir).unwrap(), path);
            let (loaded, bytes) =
                neural_annotators::load(network, &path, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(bytes, weights * 4, "{network:?} {layout}: bytes loaded");
            let hint = loaded.detect(preprocessor, &image, &params).unwrap();
            assert!(
                hint == expected,
                "{network:?} from the {layout} container differs from the formula weights"
            );
        }
    }
    assert_eq!(tested.len() + COVERED_ELSEWHERE.len(), Network::ALL.len());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Depth Anything V2 takes its size from the file name (ViT-L first, as A1111 uses it), and
/// SegFormer its architecture from the folder's `config.json`, without which it is an error.
#[test]
fn depth_anything_and_segformer_find_their_architecture() {
    let dir = std::env::temp_dir().join(format!("cns-containers-arch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let err = Network::DepthAnythingV2.find_file(&dir).unwrap_err();
    for f in [
        "depth_anything_v2_vitl.pth",
        "depth_anything_v2_vitb.safetensors",
        "depth_anything_v2_vits.pth",
    ] {
        assert!(err.contains(f), "{err} lacks {f}");
    }
    for f in [
        "depth_anything_v2_vits.pth",
        "depth_anything_v2_vitb.pth",
        "depth_anything_v2_vitl.pth",
    ] {
        std::fs::write(dir.join(f), b"").unwrap();
        let found = Network::DepthAnythingV2.find_file(&dir).unwrap();
        assert_eq!(found, dir.join(f), "the largest present wins");
        match Network::DepthAnythingV2.architecture(&found).unwrap() {
            neural_annotators::Architecture::DepthAnythingV2(cfg) => assert_eq!(
                cfg,
                neural_annotators::depth_anything_v2::Config::from_file_name(f).unwrap()
            ),
            other => panic!("{other:?}"),
        }
    }
    // SegFormer: a downloaded hub folder, found by its name; config.json required.
    let hub = dir.join("segformer-b0-finetuned-ade-512-512");
    std::fs::create_dir_all(&hub).unwrap();
    std::fs::write(hub.join("model.safetensors"), b"").unwrap();
    let found = Network::Segformer.find_file(&dir).unwrap();
    assert_eq!(found, hub.join("model.safetensors"));
    let err = Network::Segformer
        .architecture(&found)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(
        hub.join("config.json"),
        neural_annotators::formula::SEGFORMER_B0_CONFIG,
    )
    .unwrap();
    std::fs::write(hub.join("preprocessor_config.json"), r#"{"size": 640}"#).unwrap();
    match Network::Segformer.architecture(&found).unwrap() {
        neural_annotators::Architecture::Segformer(cfg) => assert_eq!(
            cfg,
            neural_annotators::segformer::Config::b0().with_processor_size(640, 640)
        ),
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_or_foreign_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("cns-containers-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = Network::Mlsd.find_file(&dir).unwrap_err();
    assert!(err.contains("mlsd_large_512_fp32.pth") && err.contains(&dir.display().to_string()));
    // A file of another network: the error names the tensor that is missing.
    let path = dir.join(Network::Mlsd.file_name());
    let tensors: Vec<(String, TensorData)> = neural_annotators::formula::state_dict(Network::Hed)
        .unwrap()
        .into_iter()
        .map(|(n, s, v)| (n, TensorData::new(s, v)))
        .collect();
    save(&path, &tensors, SaveOptions::default()).unwrap();
    let err = match neural_annotators::load(Network::Mlsd, &path, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("HED weights loaded as M-LSD"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("mlsd_large_512_fp32.pth"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
