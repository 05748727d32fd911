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
/// `state_dict` with `module.`; netG.pth has `module.`), plus the legacy format and
/// `.safetensors`, which users may have too.
fn layouts(network: Network) -> Vec<(&'static str, Option<SaveOptions>)> {
    let real = match network {
        Network::Hed => opts(Format::Zip, StorageDtype::F16, &[], ""),
        Network::Pidinet => opts(Format::Zip, StorageDtype::F32, &["state_dict"], "module."),
        Network::LineartAnime => opts(Format::Zip, StorageDtype::F32, &[], "module."),
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

#[test]
fn every_network_loads_from_every_container() {
    let dir = std::env::temp_dir().join(format!("cns-containers-{}", std::process::id()));
    let image = photo();
    for network in Network::ALL {
        let direct = network
            .build(FormulaWeights::var_builder(DType::F32, &Device::Cpu))
            .unwrap();
        let preprocessor = match network {
            Network::Hed => "softedge_hed",
            Network::Pidinet => "softedge_pidinet",
            Network::Mlsd => "mlsd",
            Network::LineartRealistic => "lineart_realistic",
            Network::LineartCoarse => "lineart_coarse",
            Network::LineartAnime => "lineart_anime",
        };
        let params: Vec<f64> = annotators::find(preprocessor)
            .unwrap()
            .params
            .iter()
            .map(|p| p.default)
            .collect();
        let expected = direct.detect(preprocessor, &image, &params).unwrap();
        let state = neural_annotators::formula::state_dict(network).unwrap();
        for (layout, options) in layouts(network) {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = match options {
                Some(options) => {
                    let tensors: Vec<(String, TensorData)> = state
                        .iter()
                        .map(|(n, s, v)| (n.clone(), TensorData::new(s.clone(), v.clone())))
                        .collect();
                    let path = dir.join(network.file_name());
                    save(&path, &tensors, options).unwrap();
                    path
                }
                None => {
                    let path = dir.join(network.file_name()).with_extension("safetensors");
                    neural_annotators::formula::write_safetensors(network, &path).unwrap();
                    path
                }
            };
            assert_eq!(network.find_file(&dir).unwrap(), path);
            let (loaded, bytes) =
                neural_annotators::load(network, &path, DType::F32, &Device::Cpu).unwrap();
            let weights: usize = state
                .iter()
                .map(|(_, s, _)| s.iter().product::<usize>())
                .sum();
            assert_eq!(bytes, weights * 4, "{network:?} {layout}: bytes loaded");
            let hint = loaded.detect(preprocessor, &image, &params).unwrap();
            assert!(
                hint == expected,
                "{network:?} from the {layout} container differs from the formula weights"
            );
        }
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
