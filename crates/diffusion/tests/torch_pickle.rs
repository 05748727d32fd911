//! The torch-pickle reader against files real torch wrote, the writer through the reader in
//! every combination of options, a legacy-format ControlNet through `WeightFile`, and the
//! errors users see for damaged or foreign files.
//!
//! `TORCH_PICKLE_EXPORT=DIR cargo test -p diffusion --test torch_pickle` also leaves every file
//! the writer made in DIR, with a JSON description, for
//! `tools/parity/make_torch_pickle_fixtures.py --check DIR` to load with real torch.
use candle_core::{DType, Device, Tensor};
use diffusion::torch_pickle::{save, Format, SaveOptions, StorageDtype, TensorData, TorchFile};
use diffusion::weights::WeightFile;
use diffusion::{ControlNetConfig, ControlNetModel};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn torch_fixtures() -> PathBuf {
    fixtures().join("torch_pickle")
}

/// A fresh temp folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("torch-pickle-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Exact equality: same dtype, shape and values (compared in f64, which holds every value of
/// every dtype here exactly).
fn assert_same(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dtype(), want.dtype(), "{what}: dtype");
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (g, w) = (flat(got), flat(want));
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(a.to_bits() == b.to_bits(), "{what}[{i}]: {a} vs {b}");
    }
}

/// (a) Files written by torch 2.15, zip and legacy, read value for value.
#[test]
fn real_torch_files_read_exactly() {
    let expected =
        candle_core::safetensors::load(torch_fixtures().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let cases = [
        ("zip_f32_plain.pth", Format::Zip),
        ("legacy_f16_nested.pth", Format::Legacy),
        ("legacy_f32_plain.pth", Format::Legacy),
        ("zip_bf16_model_state_dict.pt", Format::Zip),
        ("zip_f16_module.bin", Format::Zip),
    ];
    let mut seen = 0;
    for (file, format) in cases {
        let path = torch_fixtures().join(file);
        let want: BTreeMap<String, &Tensor> = expected
            .iter()
            .filter_map(|(k, t)| Some((k.strip_prefix(&format!("{file}/"))?.to_string(), t)))
            .collect();
        assert!(want.len() >= 3, "{file}: expected values missing");
        let f = TorchFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.format(), format, "{file}");
        assert_eq!(
            f.keys(),
            want.keys().cloned().collect::<Vec<_>>(),
            "{file}: keys"
        );
        for (key, w) in &want {
            let got = f.get(key).unwrap().unwrap();
            assert_eq!(f.shape(key), Some(w.dims()), "{file}/{key}");
            assert_eq!(f.dtype(key), Some(w.dtype()), "{file}/{key}");
            assert_same(&format!("{file}/{key}"), &got, w);
            seen += 1;
        }
        // The same names and shapes through WeightFile, and the values through a VarBuilder.
        let wf = WeightFile::open(&path).unwrap();
        assert_eq!(wf.keys(), f.keys(), "{file}");
        let vb = wf.into_var_builder(DType::F32, &Device::Cpu);
        for (key, w) in &want {
            if w.dtype().is_float() {
                let got = vb.get(w.dims(), key).unwrap();
                assert_same(key, &got, &w.to_dtype(DType::F32).unwrap());
            }
        }
    }
    // Every view kind is among them: a row at an offset, a transpose, a strided column.
    assert!(seen >= 30, "{seen}");
    assert!(expected.contains_key("legacy_f16_nested.pth/pair.col"));
}

/// Formula values, some not representable in f16/bf16 (so that rounding shows).
fn formula() -> Vec<(String, TensorData)> {
    let make = |name: &str, shape: Vec<usize>, seed: f32| {
        let n: usize = shape.iter().product();
        let values = (0..n)
            .map(|i| ((i as f32 + seed) * 0.7315).sin() * (1.0 + seed) / 3.0)
            .collect();
        (name.to_string(), TensorData::new(shape, values))
    };
    vec![
        make("input_blocks.0.0.weight", vec![4, 3, 3, 3], 1.0),
        make("input_blocks.0.0.bias", vec![4], 2.0),
        make("scalar", vec![], 3.0),
        make("zero_convs.0.0.weight", vec![5, 4, 1, 1], 4.0),
        make("empty", vec![0, 3], 5.0),
        make("norm.weight", vec![300], 6.0),
    ]
}

fn rounded(data: &TensorData, dtype: StorageDtype) -> Tensor {
    let t = Tensor::from_slice(&data.values, data.shape.as_slice(), &Device::Cpu).unwrap();
    match dtype {
        StorageDtype::F32 => t,
        StorageDtype::F16 => t.to_dtype(DType::F16).unwrap(),
        StorageDtype::BF16 => t.to_dtype(DType::BF16).unwrap(),
    }
}

/// (b) What the writer writes, the reader reads: every format, dtype, nesting and prefix.
#[test]
fn writer_round_trips_in_every_combination() {
    let export = std::env::var_os("TORCH_PICKLE_EXPORT").map(PathBuf::from);
    if let Some(dir) = &export {
        std::fs::create_dir_all(dir).unwrap();
    }
    let dir = temp_dir("round-trip");
    let tensors = formula();
    let mut n = 0;
    for format in [Format::Zip, Format::Legacy] {
        for dtype in [StorageDtype::F32, StorageDtype::F16, StorageDtype::BF16] {
            for nest in [
                &[][..],
                &["state_dict"][..],
                &["model"][..],
                &["model", "state_dict"][..],
            ] {
                for prefix in ["", "module."] {
                    let name = format!(
                        "{format:?}_{dtype:?}_{}_{}.pth",
                        if nest.is_empty() {
                            "top".to_string()
                        } else {
                            nest.join("-")
                        },
                        if prefix.is_empty() { "bare" } else { "module" }
                    )
                    .to_lowercase();
                    let opts = SaveOptions {
                        format,
                        dtype,
                        nest: nest.iter().map(|s| s.to_string()).collect(),
                        prefix: prefix.to_string(),
                    };
                    let path = dir.join(&name);
                    save(&path, &tensors, opts.clone()).unwrap();
                    let f = TorchFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(f.format(), format, "{name}");
                    let mut keys: Vec<String> = tensors.iter().map(|(k, _)| k.clone()).collect();
                    keys.sort();
                    assert_eq!(f.keys(), keys, "{name}");
                    for (key, data) in &tensors {
                        let got = f.get(key).unwrap().unwrap();
                        assert_same(&format!("{name}/{key}"), &got, &rounded(data, dtype));
                    }
                    // A key prefix the reader does not strip: only some keys carry it.
                    if let Some(dir) = &export {
                        std::fs::copy(&path, dir.join(&name)).unwrap();
                        let desc = serde_json::json!({
                            "file": name,
                            "format": if format == Format::Zip { "zip" } else { "legacy" },
                            "dtype": format!("{dtype:?}").to_lowercase(),
                            "nesting": nest,
                            "prefix": prefix,
                            "tensors": tensors.iter().map(|(k, d)| serde_json::json!(
                                [k, {"shape": d.shape, "values": d.values}]
                            )).collect::<Vec<_>>(),
                        });
                        std::fs::write(
                            dir.join(name.replace(".pth", ".json")),
                            serde_json::to_string(&desc).unwrap(),
                        )
                        .unwrap();
                    }
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, 48);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `module.` is dropped only when every key has it, and an explicit path picks a dict the
/// default search does not look in.
#[test]
fn prefix_and_nesting_rules() {
    let dir = temp_dir("rules");
    let path = dir.join("mixed.pth");
    let mut tensors = formula();
    tensors[0].0 = format!("module.{}", tensors[0].0);
    save(&path, &tensors, SaveOptions::default()).unwrap();
    let f = TorchFile::open(&path).unwrap();
    assert!(f.contains("module.input_blocks.0.0.weight"));
    assert!(f.contains("input_blocks.0.0.bias"));

    let path = dir.join("depth.pth");
    let opts = SaveOptions {
        format: Format::Legacy,
        nest: vec!["depth_model".into()],
        prefix: "module.".into(),
        ..SaveOptions::default()
    };
    save(&path, &formula(), opts).unwrap();
    let e = TorchFile::open(&path).unwrap_err().to_string();
    assert!(
        e.contains("depth.pth") && e.contains("no state dict found") && e.contains("depth_model"),
        "{e}"
    );
    let f = TorchFile::open_under(&path, &["depth_model"]).unwrap();
    assert!(f.contains("norm.weight"));
    let vb = WeightFile::from_torch(f).into_var_builder(DType::F32, &Device::Cpu);
    assert_eq!(vb.get(300, "norm.weight").unwrap().dims(), [300]);
    let e = TorchFile::open_under(&path, &["shift_model"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no entry \"shift_model\""), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// (c) The ControlNet fixture rewritten in the legacy format (f16 storages, under
/// `model.state_dict`, every key under `module.`) loads through `WeightFile` and gives the very
/// residuals of the safetensors file (its weights are f16-exact).
#[test]
fn legacy_controlnet_loads_like_safetensors() {
    let original = fixtures().join("control_sd15_original.safetensors");
    let weights = candle_core::safetensors::load(&original, &Device::Cpu).unwrap();
    let mut tensors: Vec<(String, TensorData)> = weights
        .iter()
        .map(|(k, t)| (k.clone(), TensorData::from_tensor(t).unwrap()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let dir = temp_dir("controlnet");
    let legacy = dir.join("control_sd15_legacy.pth");
    let opts = SaveOptions {
        format: Format::Legacy,
        dtype: StorageDtype::F16,
        nest: vec!["model".into(), "state_dict".into()],
        prefix: "module.".into(),
    };
    save(&legacy, &tensors, opts).unwrap();
    let file = WeightFile::open(&legacy).unwrap();
    let mut keys: Vec<String> = weights.keys().cloned().collect();
    keys.sort();
    assert_eq!(file.keys(), keys);
    for (k, t) in &weights {
        assert_eq!(file.stored_shape(k).as_deref(), Some(t.dims()), "{k}");
    }

    let config =
        ControlNetConfig::from_file(&fixtures().join("controlnet_sd15/config.json")).unwrap();
    let load = |p: &Path| {
        ControlNetModel::load(p, Some(config.clone()), DType::F32, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let cases =
        candle_core::safetensors::load(fixtures().join("cases.safetensors"), &Device::Cpu).unwrap();
    let x = |k: &str| cases[&format!("sd15.{k}")].clone();
    let run = |m: &ControlNetModel| {
        m.forward(
            &x("sample"),
            &x("timesteps"),
            &x("encoder_hidden_states"),
            &x("cond"),
            1.0,
            false,
        )
        .unwrap()
    };
    let want = run(&load(&original));
    let got = run(&load(&legacy));
    assert_eq!(got.down.len(), want.down.len());
    for (i, (a, b)) in got.down.iter().zip(&want.down).enumerate() {
        assert_same(&format!("down residual {i}"), a, b);
    }
    assert_same("mid residual", &got.mid, &want.mid);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn open_err(path: &Path) -> String {
    let e = WeightFile::open(path)
        .err()
        .expect("opened a bad file")
        .to_string();
    assert!(
        e.contains(&path.display().to_string()),
        "error does not name the file: {e}"
    );
    e
}

/// (d) Damaged and foreign files: errors that name the file and say what is wrong.
#[test]
fn clear_errors_for_truncated_and_foreign_files() {
    let dir = temp_dir("errors");
    for (file, cuts) in [
        ("zip_f32_plain.pth", &[0.5, 0.9, 0.99][..]),
        ("legacy_f32_plain.pth", &[0.05, 0.3, 0.6, 0.99][..]),
        ("legacy_f16_nested.pth", &[0.5, 0.95][..]),
    ] {
        let bytes = std::fs::read(torch_fixtures().join(file)).unwrap();
        for cut in cuts {
            let path = dir.join(format!("cut-{cut}-{file}"));
            std::fs::write(&path, &bytes[..(bytes.len() as f64 * cut) as usize]).unwrap();
            let e = open_err(&path);
            assert!(e.contains("truncated"), "{file} cut at {cut}: {e}");
        }
    }

    let path = dir.join("notes.pth");
    std::fs::write(&path, "these are not weights\n").unwrap();
    let e = open_err(&path);
    assert!(e.contains("not a torch checkpoint"), "{e}");

    let path = dir.join("empty.ckpt");
    std::fs::write(&path, "").unwrap();
    assert!(open_err(&path).contains("empty file"));

    // A plain Python pickle (protocol 2 of {'a': 1}), not torch's.
    let path = dir.join("plain.pt");
    std::fs::write(&path, b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.").unwrap();
    let e = open_err(&path);
    assert!(
        e.contains("legacy torch file") && e.contains("magic number"),
        "{e}"
    );

    // A zip that is not a torch archive: the writer's zip with data.pkl renamed.
    let path = dir.join("other.bin");
    save(&path, &formula(), SaveOptions::default()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let renamed = replace_all(&bytes, b"data.pkl", b"data.txt");
    std::fs::write(&path, renamed).unwrap();
    let e = open_err(&path);
    assert!(e.contains("without data.pkl"), "{e}");

    // A storage type the reader does not know.
    let path = dir.join("odd.pth");
    let bytes = std::fs::read(torch_fixtures().join("legacy_f32_plain.pth")).unwrap();
    std::fs::write(&path, replace_all(&bytes, b"FloatStorage", b"ComplStorage")).unwrap();
    let e = open_err(&path);
    assert!(
        e.contains("legacy torch file")
            && e.contains("unsupported storage type torch.ComplStorage"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn replace_all(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}
