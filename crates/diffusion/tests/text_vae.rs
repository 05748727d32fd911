//! Parity of the tokenizer, the CLIP text encoder and the VAE with transformers / diffusers. The
//! fixtures (tiny random models, transformers' token ids, reference outputs) are written by
//! `tools/parity/make_text_vae_fixtures.py`; every model is loaded through the real loaders.
mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use diffusion::tokenizer::{ClipTokenizer, Family, CHUNK_TOKENS, CONTEXT_LENGTH};

fn tempdir() -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "diffusion-text-vae-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// A complete SD-style `tokenizer/` folder: the fixture's configs plus the vocabulary files
/// (kept once, gzipped, in `assets/clip`).
fn sd_tokenizer_folder(name: &str) -> PathBuf {
    let dir = tempdir();
    let assets = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/clip");
    for file in ["vocab.json", "merges.txt"] {
        std::fs::write(dir.join(file), gunzip(&assets.join(format!("{file}.gz")))).unwrap();
    }
    for entry in std::fs::read_dir(common::fixtures().join(name)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

struct TokenizerCases {
    prompts: Vec<String>,
    tokenizers: serde_json::Map<String, serde_json::Value>,
}

fn tokenizer_cases() -> TokenizerCases {
    let text = std::fs::read_to_string(common::fixtures().join("tokenizer_cases.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    TokenizerCases {
        prompts: serde_json::from_value(json["prompts"].clone()).unwrap(),
        tokenizers: json["tokenizers"].as_object().unwrap().clone(),
    }
}

fn ids(v: &serde_json::Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// Checks a tokenizer against transformers' ids for every prompt: the untruncated tokens, the
/// 77-token input diffusers makes (= our first chunk), and the chunking of the rest.
fn check_tokenizer(tok: &ClipTokenizer, name: &str, cases: &TokenizerCases) {
    let reference = &cases.tokenizers[name];
    let field = |k: &str| reference[k].as_u64().unwrap() as u32;
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id()),
        (field("bos_id"), field("eos_id"), field("pad_id")),
        "{name}: special ids"
    );
    let all_ids = ids(&reference["ids"]);
    let input_ids = ids(&reference["input_ids_77"]);
    for (i, prompt) in cases.prompts.iter().enumerate() {
        let ours = tok.encode(prompt).unwrap();
        assert_eq!(ours, all_ids[i], "{name}: prompt {i} {prompt:?}");
        let chunks = tok.encode_chunks(prompt).unwrap();
        assert_eq!(
            chunks[0].to_vec(),
            input_ids[i],
            "{name}: prompt {i} {prompt:?}"
        );
        assert_eq!(chunks.len(), ours.len().div_ceil(CHUNK_TOKENS).max(1));
        for (c, chunk) in chunks.iter().enumerate() {
            let part = &ours[(c * CHUNK_TOKENS).min(ours.len())..];
            let part = &part[..part.len().min(CHUNK_TOKENS)];
            let mut expected = vec![tok.bos_id()];
            expected.extend(part);
            expected.push(tok.eos_id());
            expected.resize(CONTEXT_LENGTH, tok.pad_id());
            assert_eq!(chunk.to_vec(), expected, "{name}: prompt {i} chunk {c}");
        }
    }
}

#[test]
fn tokenizer_folders_match_transformers() {
    let cases = tokenizer_cases();
    assert!(cases.prompts.len() >= 30);
    for name in ["tokenizer_sd15", "tokenizer_sd21"] {
        let dir = sd_tokenizer_folder(name);
        let tok = ClipTokenizer::from_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        std::fs::remove_dir_all(&dir).ok();
        check_tokenizer(&tok, name, &cases);
    }
    // A folder as transformers 5 writes it: tokenizer.json, no vocab.json / merges.txt.
    let dir = common::fixtures().join("tokenizer_v5_small");
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    check_tokenizer(&tok, "tokenizer_v5_small", &cases);
}

#[test]
fn embedded_tokenizers_match_the_sd_folders() {
    let cases = tokenizer_cases();
    for (family, name) in [
        (Family::Sd1, "tokenizer_sd15"),
        (Family::Sd2, "tokenizer_sd21"),
    ] {
        check_tokenizer(&ClipTokenizer::embedded(family).unwrap(), name, &cases);
    }
}

#[test]
fn sd2_pad_token_splits_exclamation_marks_as_transformers_does() {
    // Recorded from transformers: SD 2.x's pad token "!" is a special token, so every "!" in a
    // prompt becomes id 0, where SD 1.x's tokenizer merges "!!!" into one BPE token.
    let cases = tokenizer_cases();
    let i = cases
        .prompts
        .iter()
        .position(|p| p == "wow! so cool!")
        .unwrap();
    let sd15 = &ids(&cases.tokenizers["tokenizer_sd15"]["ids"])[i];
    let sd21 = &ids(&cases.tokenizers["tokenizer_sd21"]["ids"])[i];
    assert!(!sd15.contains(&0));
    assert_eq!(sd21.iter().filter(|&&t| t == 0).count(), 2);
}

// ---------------------------------------------------------------------------------------------
// Text encoder and VAE

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{fixtures, identical, rel_err};
use diffusion::{AutoencoderKL, ClipTextModel};
use std::collections::HashMap;

/// f32 against transformers' / diffusers' f32 (max |Δ| / max |ref|).
const F32_BOUND: f64 = 1e-4;

struct Cases(HashMap<String, Tensor>);

impl Cases {
    fn load() -> Self {
        let path = fixtures().join("text_vae_cases.safetensors");
        Cases(candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture cases"))
    }

    fn get(&self, name: &str) -> Tensor {
        self.0
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor {name} missing"))
            .clone()
    }
}

fn text_encoder(name: &str, dtype: DType) -> ClipTextModel {
    ClipTextModel::from_diffusers_dir(&fixtures().join(name), dtype, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

fn vae(dtype: DType) -> AutoencoderKL {
    AutoencoderKL::from_diffusers_dir(&fixtures().join("vae"), dtype, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading vae: {e}"))
}

#[test]
fn text_encoders_match_transformers() {
    let cases = Cases::load();
    for (family, act) in [("sd15", "quick_gelu"), ("sd21", "gelu")] {
        let model = text_encoder(&format!("text_encoder_{family}"), DType::F32);
        assert_eq!(model.config.hidden_act, act);
        let ids = cases.get(&format!("{family}.text.ids"));
        for clip_skip in [0, 1, 2] {
            let out = model.forward_with_clip_skip(&ids, clip_skip).unwrap();
            let reference = cases.get(&format!("{family}.text.clip_skip_{clip_skip}"));
            let err = rel_err(&out, &reference);
            eprintln!("{family} text encoder clip_skip {clip_skip} f32 rel err {err:.2e}");
            assert!(
                err <= F32_BOUND,
                "{family} clip_skip {clip_skip}: {err:.3e}"
            );
        }
        // clip_skip matters (the test could fail).
        let a = cases.get(&format!("{family}.text.clip_skip_0"));
        let b = cases.get(&format!("{family}.text.clip_skip_1"));
        assert!(rel_err(&a, &b) > 1e-2);
    }
}

/// Every SD repository's `text_encoder/model.safetensors` predates transformers 5.6 and keeps
/// the `text_model.` level that the fixture (saved by transformers 5.24) no longer has.
#[test]
fn text_encoder_folder_with_text_model_level_loads() {
    let src = fixtures().join("text_encoder_sd15");
    let dir = tempdir();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (format!("text_model.{k}"), v))
        .collect::<HashMap<_, _>>();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let nested = ClipTextModel::from_diffusers_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let ids = Cases::load().get("sd15.text.ids");
    let flat = text_encoder("text_encoder_sd15", DType::F32);
    assert!(identical(
        &nested.forward(&ids).unwrap(),
        &flat.forward(&ids).unwrap()
    ));
}

#[test]
fn chunked_prompt_is_each_chunk_encoded_alone_then_concatenated() {
    let cases = Cases::load();
    let model = text_encoder("text_encoder_sd15", DType::F32);
    let ids = cases.get("sd15.text.ids").to_dtype(DType::U32).unwrap();
    let rows: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    let chunks: Vec<[u32; CONTEXT_LENGTH]> =
        rows.iter().map(|r| r.clone().try_into().unwrap()).collect();
    let out = model.encode_chunks(&chunks, 1).unwrap();
    assert_eq!(out.dims(), [1, 2 * CONTEXT_LENGTH, 32]);
    for (i, _) in chunks.iter().enumerate() {
        let alone = model
            .forward_with_clip_skip(&ids.i(i..i + 1).unwrap(), 1)
            .unwrap();
        let part = out.narrow(1, i * CONTEXT_LENGTH, CONTEXT_LENGTH).unwrap();
        assert!(rel_err(&part, &alone) <= 1e-6, "chunk {i}");
    }
}

#[test]
fn vae_decode_and_encode_match_diffusers() {
    let cases = Cases::load();
    let model = vae(DType::F32);
    let decoded = model.decode(&cases.get("vae.z")).unwrap();
    let err = rel_err(&decoded, &cases.get("vae.decoded"));
    eprintln!("vae decode f32 rel err {err:.2e}");
    assert!(err <= F32_BOUND, "decode: {err:.3e}");

    let dist = model.encode(&cases.get("vae.image")).unwrap();
    for (name, ours) in [
        ("mean", &dist.mean),
        ("logvar", &dist.logvar),
        ("std", &dist.std),
    ] {
        let err = rel_err(ours, &cases.get(&format!("vae.{name}")));
        eprintln!("vae encode {name} f32 rel err {err:.2e}");
        assert!(err <= F32_BOUND, "encode {name}: {err:.3e}");
    }
    let sample = dist.sample(&cases.get("vae.sample_noise")).unwrap();
    let err = rel_err(&sample, &cases.get("vae.sample"));
    assert!(err <= F32_BOUND, "sample: {err:.3e}");
    assert!(identical(&dist.mode(), &dist.mean));
}

#[test]
fn vae_latent_scaling_helpers() {
    let cases = Cases::load();
    let model = vae(DType::F32);
    let sf = model.scaling_factor();
    assert_eq!(sf, 0.18215);
    // decode_latents(latents) is decode(latents / sf), bit for bit. (Against decode(z) with
    // latents = z·sf the comparison would measure how the decoder amplifies the last-bit
    // difference between z·sf/sf and z, not the helper.)
    let latents = (cases.get("vae.z") * sf).unwrap();
    let via_latents = model.decode_latents(&latents).unwrap();
    assert!(identical(
        &via_latents,
        &model.decode(&(&latents / sf).unwrap()).unwrap()
    ));
    assert!(!identical(&via_latents, &model.decode(&latents).unwrap()));
    let image = cases.get("vae.image");
    let noise = cases.get("vae.sample_noise");
    let latents = model.encode_latents(&image, Some(&noise)).unwrap();
    let expected = (cases.get("vae.sample") * sf).unwrap();
    assert!(rel_err(&latents, &expected) <= F32_BOUND);
    let mode = model.encode_latents(&image, None).unwrap();
    assert!(rel_err(&mode, &(cases.get("vae.mean") * sf).unwrap()) <= F32_BOUND);
}

/// f16 against the f32 reference (weights are f16-exact, only activations round). f16 keeps
/// u = 2^-11 ≈ 4.9e-4; a few dozen rounding stages add up to a few u at the worst element:
/// the bound is 20u, 1e-2, as for the UNet.
#[test]
fn f16_within_rounding_bound() {
    let cases = Cases::load();
    let dtype = DType::F16;
    for family in ["sd15", "sd21"] {
        let model = text_encoder(&format!("text_encoder_{family}"), dtype);
        let out = model
            .forward_with_clip_skip(&cases.get(&format!("{family}.text.ids")), 1)
            .unwrap();
        assert_eq!(out.dtype(), dtype);
        let err = rel_err(&out, &cases.get(&format!("{family}.text.clip_skip_1")));
        eprintln!("{family} text encoder f16 rel err {err:.2e}");
        assert!(err <= 1e-2, "{family}: {err:.3e}");
    }
    let model = vae(dtype);
    let decoded = model
        .decode(&cases.get("vae.z").to_dtype(dtype).unwrap())
        .unwrap();
    let err = rel_err(&decoded, &cases.get("vae.decoded"));
    let dist = model
        .encode(&cases.get("vae.image").to_dtype(dtype).unwrap())
        .unwrap();
    let err_mean = rel_err(&dist.mean, &cases.get("vae.mean"));
    eprintln!("vae f16 rel err: decode {err:.2e}, encode mean {err_mean:.2e}");
    assert!(err <= 1e-2 && err_mean <= 1e-2, "{err:.3e} {err_mean:.3e}");
}

// ---------------------------------------------------------------------------------------------
// The original single-file layout

fn single_file() -> PathBuf {
    fixtures().join("sd15_single_file.safetensors")
}

/// A copy of the single file with keys renamed (or dropped when `rename` gives `None`).
fn rewritten(rename: impl Fn(&str) -> Option<String>, file_name: &str) -> (PathBuf, PathBuf) {
    let tensors = candle_core::safetensors::load(single_file(), &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter_map(|(k, v)| rename(&k).map(|k| (k, v)))
        .collect();
    let dir = tempdir();
    let path = dir.join(file_name);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    (dir, path)
}

#[test]
fn single_file_text_encoder_is_the_folder_model() {
    let cases = Cases::load();
    let ids = cases.get("sd15.text.ids");
    let folder = text_encoder("text_encoder_sd15", DType::F32);
    let weights = diffusion::weights::WeightFile::open(&single_file()).unwrap();
    assert!(diffusion::ldm::is_original_sd_checkpoint(&weights));
    let mut inferred = diffusion::ldm::infer_clip_config(&weights).unwrap();
    // Shapes cannot show the head count; inference assumes CLIP's 64-wide heads (1 head for
    // this 32-wide model), the fixture has 4.
    assert_eq!(inferred.num_attention_heads, 1);
    inferred.num_attention_heads = folder.config.num_attention_heads;
    assert_eq!(inferred, folder.config);
    let run = |m: &ClipTextModel| m.forward_with_clip_skip(&ids, 1).unwrap();
    let reference = run(&folder);

    let single = ClipTextModel::from_single_file(
        &single_file(),
        Some(inferred.clone()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(identical(&run(&single), &reference));

    // Older checkpoints have no `text_model.` level.
    let (dir, path) = rewritten(
        |k| {
            Some(k.replace(
                "cond_stage_model.transformer.text_model.",
                "cond_stage_model.transformer.",
            ))
        },
        "flat.safetensors",
    );
    let flat =
        ClipTextModel::from_single_file(&path, Some(inferred), DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(identical(&run(&flat), &reference));
}

#[test]
fn single_file_vae_is_the_folder_model() {
    let cases = Cases::load();
    let folder = vae(DType::F32);
    let weights = diffusion::weights::WeightFile::open(&single_file()).unwrap();
    let mut inferred = diffusion::ldm::infer_vae_config(&weights).unwrap();
    // The norm group count is not in the shapes: SD's 32 is assumed, the fixture has 4.
    assert_eq!(inferred.norm_num_groups, 32);
    inferred.norm_num_groups = folder.config.norm_num_groups;
    inferred.sample_size = folder.config.sample_size.clone();
    assert_eq!(inferred, folder.config);
    let run = |m: &AutoencoderKL| {
        let dist = m.encode(&cases.get("vae.image")).unwrap();
        (
            m.decode(&cases.get("vae.z")).unwrap(),
            dist.mean,
            dist.logvar,
        )
    };
    let reference = run(&folder);
    let check = |m: &AutoencoderKL, what: &str| {
        let ours = run(m);
        assert!(identical(&ours.0, &reference.0), "{what}: decode");
        assert!(identical(&ours.1, &reference.1), "{what}: mean");
        assert!(identical(&ours.2, &reference.2), "{what}: logvar");
    };
    let single = AutoencoderKL::from_single_file(
        &single_file(),
        Some(inferred.clone()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    check(&single, "first_stage_model.*");

    // A standalone LDM VAE file (vae-ft-mse-840000-ema-pruned): no prefix, attention
    // projections already linear in some conversions.
    let (dir, path) = rewritten(
        |k| k.strip_prefix("first_stage_model.").map(str::to_string),
        "vae.safetensors",
    );
    let standalone =
        AutoencoderKL::from_single_file(&path, Some(inferred), DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    check(&standalone, "standalone");
}

#[test]
fn legacy_diffusers_vae_attention_names_load() {
    let folder = vae(DType::F32);
    let src = fixtures().join("vae");
    let dir = tempdir();
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            (k, v)
        })
        .collect();
    assert!(tensors.contains_key("decoder.mid_block.attentions.0.proj_attn.weight"));
    candle_core::safetensors::save(&tensors, dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let legacy = AutoencoderKL::from_diffusers_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let z = Cases::load().get("vae.z");
    assert!(identical(
        &legacy.decode(&z).unwrap(),
        &folder.decode(&z).unwrap()
    ));
}

#[test]
fn sd2_single_file_text_encoder_is_refused_by_name() {
    let (dir, path) = rewritten(
        |k| {
            Some(k.replace(
                "cond_stage_model.transformer.text_model.",
                "cond_stage_model.model.",
            ))
        },
        "sd21.safetensors",
    );
    let err = ClipTextModel::from_single_file(&path, None, DType::F32, &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        err.contains("OpenCLIP") && err.contains("not supported"),
        "{err}"
    );
    assert!(err.contains("sd21.safetensors"), "{err}");
}

#[test]
fn single_file_errors_name_the_key_and_the_layout() {
    let tensors = candle_core::safetensors::load(single_file(), &Device::Cpu).unwrap();
    let key = "first_stage_model.encoder.mid.attn_1.q.weight";
    assert_eq!(tensors[key].dims(), [16, 16, 1, 1]);
    let weights = diffusion::weights::WeightFile::open(&single_file()).unwrap();
    let mut config = diffusion::ldm::infer_vae_config(&weights).unwrap();
    config.norm_num_groups = 4;
    // A missing tensor has no stored name to show: the error names the layout.
    let (dir, path) = rewritten(|k| (k != key).then(|| k.to_string()), "broken.safetensors");
    let err =
        AutoencoderKL::from_single_file(&path, Some(config.clone()), DType::F32, &Device::Cpu)
            .map(|_| ())
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("encoder.mid_block.attentions.0.to_q.weight") && err.contains("missing"),
        "{err}"
    );
    assert!(err.contains("original SD single file"), "{err}");
    assert!(err.contains("broken.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).ok();

    // A mis-shaped attention kernel: named by stored key, model name and both shapes.
    let mut tensors = tensors;
    tensors.insert(
        key.to_string(),
        Tensor::zeros((16, 8, 1, 1), DType::F16, &Device::Cpu).unwrap(),
    );
    let dir = tempdir();
    let path = dir.join("misshaped.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = AutoencoderKL::from_single_file(&path, Some(config), DType::F32, &Device::Cpu)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).ok();
    assert!(err.contains(key) && err.contains("to_q.weight"), "{err}");
    assert!(
        err.contains("[16, 8, 1, 1]") && err.contains("[16, 16, 1, 1]"),
        "{err}"
    );
}
