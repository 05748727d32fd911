//! The CLIP tokenizer of SD 1.x / 2.x, token for token as transformers' `CLIPTokenizer` loads it
//! from a diffusers `tokenizer/` folder, and A1111-style chunking of long prompts.
//!
//! The reference is transformers 5 (what diffusers 0.42 runs with). There the slow, pure-Python
//! `CLIPTokenizer` (with its ftfy / BasicTokenizer clean-up) is gone: `CLIPTokenizer` is a
//! `tokenizers`-library pipeline built in code from vocab + merges — NFC, every whitespace run to
//! one space, lower-case; CLIP's split regex; byte-level symbols; BPE with `</w>` word ends — no
//! matter whether the folder ships `vocab.json` + `merges.txt` or a `tokenizer.json` (from which
//! only the vocabulary, merges and added tokens are taken). This module builds the same pipeline
//! with the same Rust `tokenizers` crate, so the text handling is the reference's own code; what
//! is ours is reading the folder's special tokens as transformers does (see [`SpecialTokens`]).
//!
//! Consequences worth knowing: HTML entities and mojibake are left as typed (open_clip, which
//! SD 2.x was trained with, cleans them with ftfy); and SD 2.x folders, whose pad token is "!",
//! turn every "!" in a prompt into the pad token id 0, because transformers registers the pad
//! token as a special token matched before tokenization. That is what diffusers feeds SD 2.x.
use serde_json::Value;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::prompt_syntax::Segment;
use crate::{Error, Result};

/// The text encoder's sequence length: bos, 75 tokens, eos.
pub const CONTEXT_LENGTH: usize = 77;
/// Prompt tokens per chunk.
pub const CHUNK_TOKENS: usize = CONTEXT_LENGTH - 2;

/// One text-encoder input: bos, up to 75 prompt tokens, eos, padding.
pub type TokenChunk = [u32; CONTEXT_LENGTH];

/// A text-encoder input with A1111's emphasis multiplier for each position (1.0 for bos, eos
/// and padding), see [`ClipTokenizer::encode_weighted_chunks`].
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedChunk {
    pub tokens: TokenChunk,
    pub weights: [f32; CONTEXT_LENGTH],
}

/// A1111's `comma_padding_backtrack` default: a chunk that fills up moves the tokens after its
/// last comma to the next chunk when that comma is at most this many tokens from the end.
pub const COMMA_BACKTRACK: usize = 20;

/// transformers' `CLIPTokenizer` split pattern (the one of OpenAI's CLIP, with its two special
/// tokens spelled the Hugging Face way).
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// The real CLIP vocabulary (OpenAI's BPE, as the `tokenizer/` folders of SD ship it), gzipped.
static EMBEDDED_VOCAB: &[u8] = include_bytes!("../assets/clip/vocab.json.gz");
static EMBEDDED_MERGES: &[u8] = include_bytes!("../assets/clip/merges.txt.gz");

/// Which SD family's tokenizer conventions the embedded vocabulary is used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: pads with `<|endoftext|>`.
    Sd1,
    /// SD 2.x: pads with `!` (id 0).
    Sd2,
}

/// An added token as transformers registers it with the `tokenizers` backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    pub content: String,
    pub single_word: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    /// Matched in the normalized (lower-cased, …) text rather than the raw text.
    pub normalized: bool,
    pub special: bool,
}

impl TokenSpec {
    /// A special token given as a plain string: transformers makes it
    /// `AddedToken(content, special=True)`, which is not normalized.
    fn plain(content: &str) -> Self {
        Self {
            content: content.to_string(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special: true,
        }
    }

    /// A token given as a string or as an `AddedToken` dict (`__type` optional). A dict without
    /// `special` gets `special_default`; without `normalized`, `not special` (AddedToken's rule).
    fn from_json(value: &Value, special_default: bool, what: &str) -> Result<Self> {
        match value {
            Value::String(s) => Ok(Self::plain(s)),
            Value::Object(map) => {
                let content = map.get("content").and_then(Value::as_str).ok_or_else(|| {
                    Error::Config(format!("{what}: added token without a `content` string"))
                })?;
                let flag =
                    |k: &str, default: bool| map.get(k).and_then(Value::as_bool).unwrap_or(default);
                let special = flag("special", special_default);
                Ok(Self {
                    content: content.to_string(),
                    single_word: flag("single_word", false),
                    lstrip: flag("lstrip", false),
                    rstrip: flag("rstrip", false),
                    normalized: flag("normalized", !special),
                    special,
                })
            }
            other => Err(Error::Config(format!(
                "{what}: expected a string or a token object, got {other}"
            ))),
        }
    }

    fn to_added_token(&self) -> AddedToken {
        AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized)
    }
}

/// The special tokens of a tokenizer folder, resolved as transformers 5 resolves them.
///
/// - The named tokens (bos, eos, unk, pad) come from `tokenizer_config.json`; when that file has
///   no `added_tokens_decoder` (the older format every SD 1.x / 2.x repository has),
///   `special_tokens_map.json` overrides it. Missing names take `CLIPTokenizer`'s defaults.
/// - The added tokens are the `added_tokens_decoder` entries (or, in the older format, the
///   `added_tokens` of `tokenizer.json` when there is one), plus every named token not among
///   them. A named token whose content is an added token takes that token's flags; otherwise,
///   when several names share a content, the last of bos, eos, unk, pad decides its flags (so
///   SD 1.5's plain-string pad `<|endoftext|>` makes eos match the raw text only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: String,
    pub eos: String,
    pub unk: String,
    pub pad: String,
    /// In the order transformers adds them.
    pub added: Vec<TokenSpec>,
    /// Ids the folder declares for added tokens (`added_tokens_decoder` / `tokenizer.json`).
    pub declared_ids: HashMap<String, u32>,
}

impl SpecialTokens {
    /// Resolves the special tokens from a folder's JSON files (each optional).
    pub fn resolve(
        tokenizer_config: Option<&Value>,
        special_tokens_map: Option<&Value>,
        tokenizer_json: Option<&Value>,
    ) -> Result<Self> {
        const NAMES: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];
        let mut named: HashMap<&str, TokenSpec> = HashMap::new();
        let config_obj = tokenizer_config.and_then(Value::as_object);
        if let Some(cfg) = config_obj {
            for name in NAMES {
                if let Some(v) = cfg.get(name).filter(|v| !v.is_null()) {
                    named.insert(name, TokenSpec::from_json(v, false, name)?);
                }
            }
        }
        // (id, token), sorted by id as transformers adds them.
        let mut decoder: Vec<(u32, TokenSpec)> = Vec::new();
        match config_obj.and_then(|c| c.get("added_tokens_decoder")) {
            Some(Value::Object(entries)) => {
                for (id, v) in entries {
                    let id = id.parse().map_err(|_| {
                        Error::Config(format!("added_tokens_decoder: bad token id {id:?}"))
                    })?;
                    decoder.push((id, TokenSpec::from_json(v, false, "added_tokens_decoder")?));
                }
            }
            Some(other) => {
                return Err(Error::Config(format!(
                    "added_tokens_decoder: expected an object, got {other}"
                )))
            }
            None => {
                if let Some(map) = special_tokens_map.and_then(Value::as_object) {
                    for name in NAMES {
                        if let Some(v) = map.get(name).filter(|v| !v.is_null()) {
                            named.insert(name, TokenSpec::from_json(v, true, name)?);
                        }
                    }
                }
                if let Some(list) = tokenizer_json.and_then(|t| t.get("added_tokens")) {
                    for v in list.as_array().into_iter().flatten() {
                        let id = v.get("id").and_then(Value::as_u64).ok_or_else(|| {
                            Error::Config("tokenizer.json: added token without an id".into())
                        })?;
                        decoder.push((id as u32, TokenSpec::from_json(v, false, "added_tokens")?));
                    }
                }
            }
        }
        decoder.sort_by_key(|(id, _)| *id);

        let default = |name: &str| if name == "bos_token" { BOS } else { EOS };
        let mut specs: Vec<TokenSpec> = NAMES
            .iter()
            .map(|&name| {
                let mut spec = named
                    .remove(name)
                    .unwrap_or_else(|| TokenSpec::plain(default(name)));
                spec.special = true;
                spec
            })
            .collect();
        // A named token whose content is an added token is that token.
        for spec in &mut specs {
            if let Some((_, t)) = decoder.iter().find(|(_, t)| t.content == spec.content) {
                *spec = t.clone();
            }
        }
        let mut added: Vec<TokenSpec> = decoder.iter().map(|(_, t)| t.clone()).collect();
        for (i, spec) in specs.iter().enumerate() {
            if added.iter().any(|t| t.content == spec.content) {
                continue;
            }
            // The last named token with this content decides its flags.
            let last = specs[i..]
                .iter()
                .rev()
                .find(|s| s.content == spec.content)
                .unwrap_or(spec);
            added.push(last.clone());
        }
        let mut contents = specs.into_iter().map(|s| s.content);
        let mut next = || contents.next().expect("four named tokens");
        let (bos, eos, unk, pad) = (next(), next(), next(), next());
        Ok(Self {
            bos,
            eos,
            unk,
            pad,
            added,
            declared_ids: decoder.into_iter().map(|(id, t)| (t.content, id)).collect(),
        })
    }

    /// What the SD folders' configs resolve to (see the module tests and
    /// `tests/fixtures/tokenizer_sd15`, `tokenizer_sd21`).
    pub fn for_family(family: Family) -> Self {
        let token = |content: &str, normalized: bool| TokenSpec {
            normalized,
            ..TokenSpec::plain(content)
        };
        let (pad, added) = match family {
            Family::Sd1 => (EOS, vec![token(BOS, true), token(EOS, false)]),
            Family::Sd2 => (
                "!",
                vec![token(BOS, true), token(EOS, true), token("!", false)],
            ),
        };
        Self {
            bos: BOS.into(),
            eos: EOS.into(),
            unk: EOS.into(),
            pad: pad.into(),
            added,
            declared_ids: HashMap::new(),
        }
    }
}

/// The CLIP tokenizer with its special-token ids.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .finish()
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&read_text(path)?)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// `merges.txt` as the `tokenizers` crate reads it: `#version` lines skipped, every other line
/// exactly two space-separated symbols.
fn parse_merges(text: &str, what: &str) -> Result<Vec<(String, String)>> {
    text.lines()
        .filter(|l| !l.starts_with("#version"))
        .enumerate()
        .map(|(i, line)| match line.split(' ').collect::<Vec<_>>()[..] {
            [a, b] => Ok((a.to_string(), b.to_string())),
            _ => Err(Error::Config(format!(
                "{what}: merge {} is not two symbols: {line:?}",
                i + 1
            ))),
        })
        .collect()
}

fn parse_vocab(text: &str, what: &str) -> Result<HashMap<String, u32>> {
    serde_json::from_str(text).map_err(|e| Error::Config(format!("{what}: {e}")))
}

type VocabAndMerges = (HashMap<String, u32>, Vec<(String, String)>);

/// Vocabulary and merges of a `tokenizer.json` BPE model (merges as `"a b"` or `["a", "b"]`).
fn tokenizer_json_model(json: &Value, what: &str) -> Result<VocabAndMerges> {
    let model = json
        .get("model")
        .ok_or_else(|| Error::Config(format!("{what}: no `model`")))?;
    if let Some(t) = model.get("type").and_then(Value::as_str) {
        if t != "BPE" {
            return Err(Error::Config(format!("{what}: a {t} model, CLIP's is BPE")));
        }
    }
    let vocab = serde_json::from_value(model.get("vocab").cloned().unwrap_or(Value::Null))
        .map_err(|e| Error::Config(format!("{what}: model.vocab: {e}")))?;
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::Config(format!("{what}: no model.merges list")))?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let pair = match m {
                Value::String(s) => s
                    .split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(v) => match &v[..] {
                    [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
                    _ => None,
                },
                _ => None,
            };
            pair.ok_or_else(|| Error::Config(format!("{what}: merge {} is not a pair: {m}", i + 1)))
        })
        .collect::<Result<_>>()?;
    Ok((vocab, merges))
}

fn gunzip(bytes: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut out)
        .expect("the embedded CLIP vocabulary is valid gzip and UTF-8");
    out
}

fn tok_err(e: tokenizers::Error) -> Error {
    Error::Config(format!("tokenizer: {e}"))
}

impl ClipTokenizer {
    /// Loads a diffusers `tokenizer/` folder: `vocab.json` + `merges.txt`, or `tokenizer.json`
    /// (preferred when present, as transformers does), plus `tokenizer_config.json` and
    /// `special_tokens_map.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tokenizer_json = read_optional_json(&dir.join("tokenizer.json"))?;
        let (vocab, merges) = match &tokenizer_json {
            Some(json) => {
                tokenizer_json_model(json, &dir.join("tokenizer.json").display().to_string())?
            }
            None => {
                let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
                if !vocab_path.is_file() || !merges_path.is_file() {
                    return Err(Error::Config(format!(
                        "{}: a CLIP tokenizer folder needs tokenizer.json, or vocab.json and merges.txt",
                        dir.display()
                    )));
                }
                (
                    parse_vocab(&read_text(&vocab_path)?, &vocab_path.display().to_string())?,
                    parse_merges(
                        &read_text(&merges_path)?,
                        &merges_path.display().to_string(),
                    )?,
                )
            }
        };
        let special = SpecialTokens::resolve(
            read_optional_json(&dir.join("tokenizer_config.json"))?.as_ref(),
            read_optional_json(&dir.join("special_tokens_map.json"))?.as_ref(),
            tokenizer_json.as_ref(),
        )?;
        Self::new(vocab, merges, &special)
            .map_err(|e| Error::Config(format!("{}: {e}", dir.display())))
    }

    /// The real CLIP vocabulary embedded in the library, with a family's special tokens: the
    /// same tokenizer as the `tokenizer/` folder of an SD 1.x / 2.x repository.
    pub fn embedded(family: Family) -> Result<Self> {
        let vocab = parse_vocab(&gunzip(EMBEDDED_VOCAB), "embedded vocab.json")?;
        let merges = parse_merges(&gunzip(EMBEDDED_MERGES), "embedded merges.txt")?;
        Self::new(vocab, merges, &SpecialTokens::for_family(family))
    }

    /// Builds the pipeline of transformers' `CLIPTokenizer.__init__`.
    pub fn new(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        special: &SpecialTokens,
    ) -> Result<Self> {
        let vocab: Vocab = vocab.into_iter().collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(special.unk.clone())
            .fuse_unk(false)
            .build()
            .map_err(tok_err)?;
        let mut tokenizer = Tokenizer::new(bpe);
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(tok_err)?
            .into(),
            Lowercase.into(),
        ]);
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(tok_err)?;
        let split = Split::new(
            SplitPattern::Regex(SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tok_err)?;
        // add_prefix_space=false, trim_offsets=true, use_regex=true: Python's defaults but the
        // first, which CLIPTokenizer sets.
        let byte_level = ByteLevel::new(false, true, true);
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            byte_level.into(),
        ])));
        tokenizer
            .add_tokens(special.added.iter().map(TokenSpec::to_added_token))
            .map_err(tok_err)?;
        let id = |content: &str| {
            tokenizer.token_to_id(content).ok_or_else(|| {
                Error::Config(format!(
                    "special token {content:?} is not in the vocabulary"
                ))
            })
        };
        for (content, &declared) in &special.declared_ids {
            let actual = id(content)?;
            if actual != declared {
                return Err(Error::Config(format!(
                    "added token {content:?} is declared with id {declared} but gets id {actual}"
                )));
            }
        }
        let (bos, eos, pad) = (id(&special.bos)?, id(&special.eos)?, id(&special.pad)?);
        Ok(Self {
            tokenizer,
            bos,
            eos,
            pad,
        })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    /// The prompt's token ids, without bos/eos, never truncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(tok_err)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// bos, `tokens` (at most 75), eos, padding.
    fn wrap(&self, tokens: &[u32]) -> TokenChunk {
        debug_assert!(tokens.len() <= CHUNK_TOKENS);
        let mut chunk = [self.pad; CONTEXT_LENGTH];
        chunk[0] = self.bos;
        chunk[1..=tokens.len()].copy_from_slice(tokens);
        chunk[tokens.len() + 1] = self.eos;
        chunk
    }

    /// The input of an empty prompt: bos, eos, padding.
    pub fn empty_chunk(&self) -> TokenChunk {
        self.wrap(&[])
    }

    /// The prompt as text-encoder inputs, A1111-style: its tokens cut into runs of 75 (A1111
    /// moves a cut back to a comma up to 20 tokens earlier; this does not,
    /// [`Self::encode_weighted_chunks`] does), each wrapped in
    /// bos … eos and padded to 77. The embeddings of the chunks, concatenated along
    /// the sequence axis, condition the UNet; nothing is dropped. A prompt of at most 75 tokens
    /// is one chunk, identical to what diffusers feeds the text encoder (whose truncation to 77
    /// is exactly the first chunk of a longer prompt). Always at least one chunk.
    pub fn encode_chunks(&self, text: &str) -> Result<Vec<TokenChunk>> {
        let tokens = self.encode(text)?;
        if tokens.is_empty() {
            return Ok(vec![self.empty_chunk()]);
        }
        Ok(tokens.chunks(CHUNK_TOKENS).map(|c| self.wrap(c)).collect())
    }

    /// Appends empty-prompt chunks until there are `n` (A1111 pads the shorter of the prompt
    /// and the negative prompt so that classifier-free guidance can batch them).
    pub fn pad_chunks(&self, chunks: &mut Vec<TokenChunk>, n: usize) {
        while chunks.len() < n {
            chunks.push(self.empty_chunk());
        }
    }

    /// The id of `,` as a word of its own (`,</w>`), where A1111's chunks may be cut.
    pub fn comma_id(&self) -> Option<u32> {
        self.tokenizer.token_to_id(",</w>")
    }

    /// bos, `tokens` with their weights, eos, padding; weight 1 outside the tokens.
    fn wrap_weighted(&self, tokens: &[(u32, f32)]) -> WeightedChunk {
        let ids: Vec<u32> = tokens.iter().map(|&(t, _)| t).collect();
        let mut weights = [1.0f32; CONTEXT_LENGTH];
        for (w, &(_, weight)) in weights[1..].iter_mut().zip(tokens) {
            *w = weight;
        }
        WeightedChunk {
            tokens: self.wrap(&ids),
            weights,
        }
    }

    /// A prompt parsed in A1111's syntax ([`crate::prompt_syntax`]) as text-encoder inputs, as
    /// A1111's `tokenize_line`: every text segment tokenized on its own, each token with its
    /// segment's weight; chunks of 75 tokens wrapped in bos … eos and padded; `BREAK` closes
    /// the current chunk (padded, even if empty); a chunk that fills up while its last comma is
    /// at most [`COMMA_BACKTRACK`] tokens from its end is closed after that comma, the tokens
    /// after it starting the next chunk (a comma that itself opens a chunk is not remembered).
    /// Always at least one chunk; no chunk is added for an empty tail after the last `BREAK`.
    pub fn encode_weighted_chunks(&self, segments: &[Segment]) -> Result<Vec<WeightedChunk>> {
        let comma = self.comma_id();
        let mut chunks = Vec::new();
        let mut current: Vec<(u32, f32)> = Vec::with_capacity(CHUNK_TOKENS);
        let mut last_comma: Option<usize> = None;
        let close = |chunks: &mut Vec<WeightedChunk>,
                     current: &mut Vec<(u32, f32)>,
                     last_comma: &mut Option<usize>| {
            chunks.push(self.wrap_weighted(current));
            current.clear();
            *last_comma = None;
        };
        for segment in segments {
            let (text, weight) = match segment {
                Segment::Break => {
                    close(&mut chunks, &mut current, &mut last_comma);
                    continue;
                }
                Segment::Text { text, weight } => (text, *weight as f32),
            };
            for token in self.encode(text)? {
                if Some(token) == comma {
                    last_comma = Some(current.len());
                } else if let Some(c) = last_comma.filter(|&c| {
                    current.len() == CHUNK_TOKENS && CHUNK_TOKENS - c <= COMMA_BACKTRACK
                }) {
                    let moved = current.split_off(c + 1);
                    close(&mut chunks, &mut current, &mut last_comma);
                    current = moved;
                }
                if current.len() == CHUNK_TOKENS {
                    close(&mut chunks, &mut current, &mut last_comma);
                }
                current.push((token, weight));
            }
        }
        if !current.is_empty() || chunks.is_empty() {
            close(&mut chunks, &mut current, &mut last_comma);
        }
        Ok(chunks)
    }

    /// [`Self::empty_chunk`] with weights 1.
    pub fn empty_weighted_chunk(&self) -> WeightedChunk {
        self.wrap_weighted(&[])
    }

    /// [`Self::encode_weighted_chunks`] of the prompt and the negative prompt, the shorter
    /// padded with empty chunks to the same number.
    pub fn encode_pair_weighted(
        &self,
        prompt: &[Segment],
        negative: &[Segment],
    ) -> Result<(Vec<WeightedChunk>, Vec<WeightedChunk>)> {
        let mut positive = self.encode_weighted_chunks(prompt)?;
        let mut negative = self.encode_weighted_chunks(negative)?;
        let n = positive.len().max(negative.len());
        for chunks in [&mut positive, &mut negative] {
            while chunks.len() < n {
                chunks.push(self.empty_weighted_chunk());
            }
        }
        Ok((positive, negative))
    }

    /// The prompt and the negative prompt, with the same number of chunks.
    pub fn encode_pair(
        &self,
        prompt: &str,
        negative: &str,
    ) -> Result<(Vec<TokenChunk>, Vec<TokenChunk>)> {
        let mut positive = self.encode_chunks(prompt)?;
        let mut negative = self.encode_chunks(negative)?;
        let n = positive.len().max(negative.len());
        self.pad_chunks(&mut positive, n);
        self.pad_chunks(&mut negative, n);
        Ok((positive, negative))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd_config(pad: &str) -> (Value, Value) {
        let typed = |c: &str| {
            serde_json::json!({"__type": "AddedToken", "content": c, "lstrip": false,
                "normalized": true, "rstrip": false, "single_word": false})
        };
        let plain = |c: &str| {
            serde_json::json!({"content": c, "lstrip": false, "normalized": true,
                "rstrip": false, "single_word": false})
        };
        let config = serde_json::json!({
            "bos_token": typed(BOS), "eos_token": typed(EOS), "unk_token": typed(EOS),
            "pad_token": EOS, "model_max_length": 77,
        });
        let map = serde_json::json!({
            "bos_token": plain(BOS), "eos_token": plain(EOS), "unk_token": plain(EOS),
            "pad_token": pad,
        });
        (config, map)
    }

    /// (content, normalized), sorted by content.
    fn flags(s: &SpecialTokens) -> Vec<(String, bool)> {
        let mut v: Vec<_> = s
            .added
            .iter()
            .map(|t| (t.content.clone(), t.normalized))
            .collect();
        v.sort();
        v
    }

    /// The resolution rules against what transformers 5.24 gave for these configs (recorded in
    /// tests/fixtures/tokenizer_cases.json for the folder variants).
    #[test]
    fn special_tokens_resolve_like_transformers() {
        let (config, map) = sd_config(EOS);
        let sd15 = SpecialTokens::resolve(Some(&config), Some(&map), None).unwrap();
        assert_eq!(sd15.pad, EOS);
        // The plain-string pad comes last and makes <|endoftext|> un-normalized.
        assert_eq!(flags(&sd15), [(EOS.into(), false), (BOS.into(), true)]);
        assert_eq!(flags(&sd15), flags(&SpecialTokens::for_family(Family::Sd1)));

        let (config, map) = sd_config("!");
        let sd2 = SpecialTokens::resolve(Some(&config), Some(&map), None).unwrap();
        assert_eq!(sd2.pad, "!");
        assert_eq!(
            flags(&sd2),
            [("!".into(), false), (EOS.into(), true), (BOS.into(), true)]
        );
        assert_eq!(flags(&sd2), flags(&SpecialTokens::for_family(Family::Sd2)));

        // The newer format: added_tokens_decoder wins, special_tokens_map.json is ignored.
        let config = serde_json::json!({
            "added_tokens_decoder": {
                "49406": {"content": BOS, "normalized": true, "special": true},
                "49407": {"content": EOS, "normalized": false, "special": true},
            },
            "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": "!",
        });
        let s = SpecialTokens::resolve(Some(&config), Some(&map), None).unwrap();
        assert_eq!(
            flags(&s),
            [("!".into(), false), (EOS.into(), false), (BOS.into(), true)]
        );
        assert_eq!(s.declared_ids[EOS], 49407);

        // No files at all: CLIPTokenizer's defaults, all plain strings.
        let s = SpecialTokens::resolve(None, None, None).unwrap();
        assert_eq!((s.bos.as_str(), s.pad.as_str()), (BOS, EOS));
        assert_eq!(flags(&s), [(EOS.into(), false), (BOS.into(), false)]);
    }

    #[test]
    fn merges_parse_like_the_tokenizers_crate() {
        let m = parse_merges("#version: 0.2\ni n\nt h</w>\n", "m").unwrap();
        assert_eq!(m, [("i".into(), "n".into()), ("t".into(), "h</w>".into())]);
        assert!(parse_merges("#version: 0.2\ni n x\n", "m").is_err());
    }

    #[test]
    fn chunks() {
        let tok = ClipTokenizer::embedded(Family::Sd1).unwrap();
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (49406, 49407, 49407)
        );
        let tok2 = ClipTokenizer::embedded(Family::Sd2).unwrap();
        assert_eq!(tok2.pad_id(), 0);

        let one = tok.encode_chunks("a photo of a cat").unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0][..7], [49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(one[0][7..].iter().all(|&t| t == 49407));
        assert_eq!(tok.encode_chunks("").unwrap(), vec![tok.empty_chunk()]);

        let long = vec!["a"; 160].join(" ");
        let chunks = tok.encode_chunks(&long).unwrap();
        assert_eq!(chunks.len(), 3);
        for (i, c) in chunks.iter().enumerate() {
            let n = if i < 2 { 75 } else { 10 };
            assert_eq!(c[0], 49406);
            assert!(c[1..=n].iter().all(|&t| t == 320), "chunk {i}");
            assert_eq!(c[n + 1], 49407);
        }
        let (p, n) = tok.encode_pair(&long, "blurry").unwrap();
        assert_eq!((p.len(), n.len()), (3, 3));
        assert_eq!(n[1], tok.empty_chunk());
        assert_eq!(n[2], tok.empty_chunk());
        let (p, n) = tok.encode_pair("", &long).unwrap();
        assert_eq!((p.len(), n.len()), (3, 3));
    }
}
