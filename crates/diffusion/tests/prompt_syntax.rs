//! A1111's prompt syntax on the embedded model's text encoder: without emphasis the embeddings
//! are the plain path's bit for bit; with it, each chunk is z · weight scaled back to its mean.
use candle_core::{DType, Device, Tensor};
use diffusion::clip::apply_emphasis;
use diffusion::pipeline::{Request, StableDiffusion};
use diffusion::prompt_syntax::PromptSyntax::{self, Plain, A1111};

fn model() -> StableDiffusion {
    StableDiffusion::embedded(DType::F32, &Device::Cpu).unwrap()
}

fn embed(sd: &StableDiffusion, syntax: PromptSyntax, prompt: &str, negative: &str) -> Tensor {
    sd.prompt_embeddings_in(syntax, prompt, negative, 0, true)
        .unwrap()
}

/// `[rows, tokens, dim]` as nested vectors.
fn values(t: &Tensor) -> Vec<Vec<Vec<f32>>> {
    t.to_vec3::<f32>().unwrap()
}

fn mean(v: &[Vec<f32>]) -> f64 {
    let n = v.len() * v[0].len();
    v.iter().flatten().map(|&x| x as f64).sum::<f64>() / n as f64
}

#[test]
fn without_emphasis_a1111_is_the_plain_path_bit_for_bit() {
    let sd = model();
    let long = vec!["a"; 100].join(" ");
    for (prompt, negative) in [
        ("a photo of a cat", "blurry"),
        ("", ""),
        (long.as_str(), "low quality, jpeg artifacts"),
    ] {
        let plain = embed(&sd, Plain, prompt, negative);
        let a1111 = embed(&sd, A1111, prompt, negative);
        assert_eq!(values(&plain), values(&a1111), "{prompt:?}");
    }
    // Extra-network tags leave the prompt (not the negative prompt, as in A1111).
    assert_eq!(
        values(&embed(&sd, A1111, "a cat <lora:style:0.7>", "")),
        values(&embed(&sd, Plain, "a cat", ""))
    );
    // The pipeline request reads its field; Plain is the default.
    let mut req = Request::txt2img("a (cat:1.4)", 64, 64);
    assert_eq!(req.prompt_syntax, Plain);
    let plain = sd.encode_prompt(&req, true).unwrap();
    assert_eq!(
        values(&plain),
        values(&embed(&sd, Plain, "a (cat:1.4)", ""))
    );
    req.prompt_syntax = A1111;
    let a1111 = sd.encode_prompt(&req, true).unwrap();
    assert_eq!(
        values(&a1111),
        values(&embed(&sd, A1111, "a (cat:1.4)", ""))
    );
    assert_ne!(values(&plain), values(&a1111));
}

/// "cat" (position 2, after bos and "a") at 1.5 and "sofa" (position 5) at 1/1.1.
fn sofa_weights() -> [f32; 77] {
    let mut w = [1.0f32; 77];
    w[2] = 1.5;
    w[5] = (1.0 / 1.1f64) as f32;
    w
}

#[test]
fn emphasis_applies_to_the_weighted_chunk_only() {
    let sd = model();
    let plain = embed(&sd, A1111, "a cat on a sofa", "blurry");
    let weighted = embed(&sd, A1111, "a (cat:1.5) on a [sofa]", "blurry");
    // The negative row (first) is untouched, the prompt's is A1111's emphasis of the same
    // tokens' encoding.
    let (p, w) = (values(&plain), values(&weighted));
    assert_eq!(p[0], w[0]);
    let want = apply_emphasis(&plain.narrow(0, 1, 1).unwrap(), &sofa_weights()).unwrap();
    assert_eq!(w[1], values(&want)[0]);
    assert_ne!(w[1], p[1]);
}

#[test]
fn emphasis_scales_tokens_then_restores_the_chunk_mean() {
    // The embedded model's final layer norm has no bias, so its outputs have a mean of ~1e-9
    // and the ratio of means is noise; a shifted copy has a mean that means something (real
    // CLIP models have a biased final layer norm).
    let sd = model();
    let z = embed(&sd, Plain, "a cat on a sofa", "")
        .narrow(0, 1, 1)
        .unwrap()
        .affine(1.0, 0.25)
        .unwrap();
    let w = sofa_weights();
    let zw = values(&apply_emphasis(&z, &w).unwrap()).remove(0);
    let z = values(&z).remove(0);
    assert_eq!(z.len(), 77);
    let scaled: Vec<Vec<f32>> = z
        .iter()
        .zip(w)
        .map(|(row, w)| row.iter().map(|&x| x * w).collect())
        .collect();
    let k = mean(&z) / mean(&scaled);
    assert!(
        (k - 1.0).abs() > 1e-3,
        "the test needs a mean that moves: {k}"
    );
    for i in 0..77 {
        for (d, (&got, &x)) in zw[i].iter().zip(&z[i]).enumerate() {
            let want = x as f64 * w[i] as f64 * k;
            assert!(
                (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "token {i} dim {d}: {got} vs {want}"
            );
        }
    }
    assert!((mean(&zw) - mean(&z)).abs() <= 1e-6, "the mean is restored");
}

#[test]
fn a_mean_too_close_to_zero_is_not_restored() {
    // The embedded model's chunk means are ~1e-9 (no final layer-norm bias): A1111's ratio of
    // means would be noise there, so the weights alone apply.
    let sd = model();
    let z = embed(&sd, Plain, "a cat on a sofa", "")
        .narrow(0, 1, 1)
        .unwrap();
    let zv = values(&z).remove(0);
    let scale =
        zv.iter().flatten().map(|x| x.abs() as f64).sum::<f64>() / (77.0 * zv[0].len() as f64);
    assert!(mean(&zv).abs() < 1e-6 * scale);
    let w = sofa_weights();
    let zw = values(&apply_emphasis(&z, &w).unwrap()).remove(0);
    for i in 0..77 {
        let want: Vec<f32> = zv[i].iter().map(|&x| x * w[i]).collect();
        assert_eq!(zw[i], want, "token {i}");
    }
}

#[test]
fn emphasis_is_per_chunk() {
    let sd = model();
    // Chunk 1 gets the emphasis of "(cat:1.3)"; chunk 2 ("dog") has none and stays as encoded.
    let both = embed(&sd, A1111, "(cat:1.3) BREAK dog", "");
    let plain = embed(&sd, A1111, "cat BREAK dog", "");
    assert_eq!(both.dims()[1], 154);
    let mut w = [1.0f32; 77];
    w[1] = 1.3;
    let cat = apply_emphasis(
        &plain.narrow(0, 1, 1).unwrap().narrow(1, 0, 77).unwrap(),
        &w,
    );
    let (both, plain) = (values(&both), values(&plain));
    assert_eq!(both[1][..77], values(&cat.unwrap())[0][..]);
    assert_eq!(both[1][77..], plain[1][77..]);
    // The negative prompt is padded with an empty chunk and has its own emphasis.
    assert_eq!(both[0], plain[0]);
    assert_eq!(both[0][77..], both[0][..77]);
    let neg = values(&embed(&sd, A1111, "dog", "(blurry:1.3)"));
    let unweighted = values(&embed(&sd, A1111, "dog", "blurry"));
    assert_eq!(neg[1], unweighted[1]);
    assert_ne!(neg[0], unweighted[0]);
}

#[test]
fn apply_emphasis_with_unit_weights_is_the_identity() {
    let sd = model();
    let z = sd
        .text_encoder
        .encode_chunks(&sd.tokenizer.encode_chunks("a cat").unwrap(), 0)
        .unwrap();
    let same = apply_emphasis(&z, &[1.0; 77]).unwrap();
    assert_eq!(values(&z), values(&same));
    assert!(apply_emphasis(&z, &[1.0; 76]).is_err());
    // In f16 the result is f16, computed in f32.
    let h = z.to_dtype(DType::F16).unwrap();
    let mut w = [1.0f32; 77];
    w[2] = 1.2;
    let out = apply_emphasis(&h, &w).unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let want = apply_emphasis(&h.to_dtype(DType::F32).unwrap(), &w).unwrap();
    let got = values(&out.to_dtype(DType::F32).unwrap());
    let want = values(
        &want
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap(),
    );
    assert_eq!(got, want);
}
