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
