#!/usr/bin/env python3
"""Writes the CLIP vocabulary assets and the tokenizer / text encoder / VAE parity fixtures.

Run from anywhere: `python tools/parity/make_text_vae_fixtures.py` (versions:
tools/parity/requirements.txt). Outputs:

- crates/diffusion/assets/clip/{vocab.json.gz, merges.txt.gz}: the real CLIP BPE vocabulary
  (what the `tokenizer/` folder of every SD 1.x / 2.x model ships), built from the copy of
  OpenAI's `bpe_simple_vocab_16e6.txt.gz` that the open_clip_torch wheel carries, laid out as
  the Hugging Face `openai/clip-vit-large-patch14` files are. The library embeds them.
- crates/diffusion/tests/fixtures/: tokenizer configs and transformers' token ids for a list of
  awkward prompts, tiny random CLIP text encoders (quick_gelu as SD 1.x, gelu as SD 2.x), a tiny
  AutoencoderKL, the same VAE + SD 1.x text encoder in the original single-file layout, and the
  float32 outputs of transformers / diffusers for them (`text_vae_cases.safetensors`).

Only this script's own outputs are replaced; the fixtures of make_fixtures.py are left alone
(make_fixtures.py, on the other hand, empties the whole directory: run it first).

Weights are f16-exact, as in make_fixtures.py: the f32 references are computed with weights
that f16 represents exactly, and the files store f16, so Rust loading them as f32 is exact.
"""

import os

# Nothing comes from a model hub: every model is built from a config dict.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gzip
import importlib.util
import io
import json
import re
import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch
import transformers
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import diffusers
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import assert_f16_exact, assert_same_state_dict, n_params, perturb_f16_exact  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "crates" / "diffusion" / "tests" / "fixtures"
ASSETS = REPO / "crates" / "diffusion" / "assets" / "clip"
MAX_FIXTURE_BYTES = 1_500_000

# What this script writes under FIXTURES (and deletes before writing).
OUTPUTS = [
    "tokenizer_sd15",
    "tokenizer_sd21",
    "tokenizer_v5_small",
    "tokenizer_cases.json",
    "text_encoder_sd15",
    "text_encoder_sd21",
    "vae",
    "sd15_single_file.safetensors",
    "text_vae_cases.safetensors",
    "text_vae_manifest.json",
]

SEEDS = {
    "text_encoder_sd15.init": 1511,
    "text_encoder_sd15.noise": 1512,
    "text_encoder_sd21.init": 2111,
    "text_encoder_sd21.noise": 2112,
    "vae.init": 1521,
    "vae.noise": 1522,
    "text.ids": 1531,
    "vae.latents": 1532,
    "vae.image": 1533,
    "vae.sample_noise": 1534,
}

# ---------------------------------------------------------------------------------------------
# CLIP vocabulary

OPEN_CLIP_TOKENIZER = None  # the module, loaded by load_open_clip_tokenizer()


def load_open_clip_tokenizer():
    """open_clip's tokenizer module, without importing the open_clip package (which needs
    torchvision and timm for its models)."""
    global OPEN_CLIP_TOKENIZER
    if OPEN_CLIP_TOKENIZER is None:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            sys.exit("open_clip_torch is not installed (pip install -r tools/parity/requirements.txt)")
        path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
        mod_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        OPEN_CLIP_TOKENIZER = module
    return OPEN_CLIP_TOKENIZER


def build_clip_vocab():
    """vocab (token -> id, in id order) and merges, as the HF openai/clip-* files have them:
    the 256 byte symbols, the same with `</w>`, one token per merge, then the two special
    tokens; merges.txt keeps the first 49152 - 256 - 2 = 48894 merges of OpenAI's list."""
    oc = load_open_clip_tokenizer()
    with gzip.open(oc.default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    assert len(merges) == 48894 and all(len(m.split()) == 2 for m in merges)
    symbols = list(oc.bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens) == 49408, "duplicate tokens"
    return vocab, merges


def deterministic_gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(data)
    return buf.getvalue()


def vocab_json(vocab) -> str:
    return json.dumps(vocab, ensure_ascii=False)


def merges_txt(merges) -> str:
    return "#version: 0.2\n" + "\n".join(merges) + "\n"


CLIP_LICENSE = """\
The CLIP BPE vocabulary in this directory (vocab.json.gz, merges.txt.gz) is derived from
`bpe_simple_vocab_16e6.txt.gz` of OpenAI's CLIP (https://github.com/openai/CLIP), as shipped in
the open_clip_torch {open_clip_version} wheel (sha256 of the .gz: {sha256}), laid out as the
Hugging Face `openai/clip-vit-large-patch14` tokenizer files; written by
tools/parity/make_text_vae_fixtures.py.

MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def write_clip_assets(vocab, merges) -> None:
    import hashlib
    import importlib.metadata

    oc = load_open_clip_tokenizer()
    ASSETS.mkdir(parents=True, exist_ok=True)
    (ASSETS / "vocab.json.gz").write_bytes(deterministic_gzip(vocab_json(vocab).encode("utf-8")))
    (ASSETS / "merges.txt.gz").write_bytes(deterministic_gzip(merges_txt(merges).encode("utf-8")))
    sha = hashlib.sha256(Path(oc.default_bpe()).read_bytes()).hexdigest()
    (ASSETS / "LICENSE").write_text(
        CLIP_LICENSE.format(open_clip_version=importlib.metadata.version("open_clip_torch"), sha256=sha)
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer

# Awkward on purpose. The Rust test reads them from tokenizer_cases.json.
PROMPTS = [
    "a photo of a cat",
    "a photograph of an astronaut riding a horse",
    "",
    "   ",
    "A Photo Of A CAT, SHOUTING",
    "masterpiece, best quality, (detailed eyes:1.2), [background], ((sharp focus)), {braces}",
    "(red hair:1.3) AND (blue eyes:0.8) BREAK lora:<name:0.7>",
    "hello!!! world??? ... --- ;;; !?!",
    "wow! so cool!",
    "l'été à Paris, café crème, naïve façade, über, señor",
    "Straße in München, Øresund, Ærø, Łódź, İstanbul",
    "東京の夜景、ネオン、雨",
    "一只猫坐在窗台上",
    "서울의 야경",
    "Москва зимой, снег",
    "αβγ δέλτα ΟΔΥΣΣΕΥΣ",
    "مرحبا بالعالم",
    "emoji 🐱🔥✨ 👩‍🚀 🇫🇷 😀🏻",
    "numbers 1234567890 3.14159 1,000,000 2nd 4k 8K 16:9 100% $100 €50",
    "tabs\tand\nnewlines\r\nand  double  spaces",
    "  leading and trailing spaces   ",
    "it's, they're, I'm, we'll, you'd, can't, don't, she's, IT'S, DON'T",
    "<|startoftext|> and <|endoftext|> literally, x<|endoftext|>y",
    "<|ENDOFTEXT|> uppercase special",
    "cafe\u0301 (NFD) vs caf\u00e9 (NFC)",
    "ﬁ ligature, ① circled, ｆｕｌｌｗｉｄｔｈ, ｶﾀｶﾅ",
    "non\u00a0breaking\u2003em space\u3000ideographic\u0085next line",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "&amp; &lt;html&gt; entities",
    "“curly quotes” and ‘single’ — em dash – en dash …",
    "under_score snake_case kebab-case CamelCase",
    "url https://example.com/path?q=1&x=2 email a.b@c.de #hashtag @mention",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "Ⅻ roman, ² superscript, ½ fraction, ٣ arabic-indic digit",
    "Ǆ titlecase digraph ǅ",
    "control\x00\x07chars",
    " ".join(["a"] * 75),  # exactly one chunk of content
    " ".join(["a"] * 76),  # one token into the second chunk
    " ".join(["a"] * 150),  # exactly two chunks
    "masterpiece, best quality, ultra-detailed, 8k wallpaper, a portrait of a young woman with "
    "long flowing silver hair standing in a field of lavender at golden hour, soft rim light, "
    "bokeh, shallow depth of field, 85mm lens, film grain, kodak portra 400, intricate lace "
    "dress, delicate jewelry, freckles, subtle makeup, gentle smile, looking at viewer, wind, "
    "petals in the air, dramatic clouds, volumetric light, highly detailed skin texture, "
    "sharp focus, trending on artstation, award winning photograph, (cinematic:1.2), "
    "[[low contrast]], negative space, rule of thirds",
]

# Prompts on which open_clip's own tokenizer is expected to differ from transformers', because
# open_clip cleans text with ftfy.fix_text and html.unescape (transformers' CLIPTokenizer does
# neither) or lower-cases with Python's str.lower (context-sensitive final sigma).
OPEN_CLIP_CLEANUP_DIFFS = {
    "αβγ δέλτα ΟΔΥΣΣΕΥΣ": "str.lower gives a final sigma ς, tokenizers' Lowercase σ",
    "ﬁ ligature, ① circled, ｆｕｌｌｗｉｄｔｈ, ｶﾀｶﾅ": "ftfy unfolds ligatures and full/half-width forms",
    "&amp; &lt;html&gt; entities": "open_clip unescapes HTML entities",
    "“curly quotes” and ‘single’ — em dash – en dash …": "ftfy straightens curly quotes",
    "control\x00\x07chars": "ftfy removes control characters",
    "<|startoftext|> and <|endoftext|> literally, x<|endoftext|>y": "open_clip's special tokens are spelled <start_of_text>",
    "zero\u200bwidth\u200djoiner\ufeffbom": "ftfy removes the byte-order mark",
    "non\u00a0breaking\u2003em space\u3000ideographic\u0085next line": "ftfy reads U+0085 as cp1252 '…'",
    "Ǆ titlecase digraph ǅ": "ftfy splits the digraph letters",
}

# The tokenizer configs of the two families, as diffusers' SD folders ship them (reconstructed:
# the hub is not reachable here). Legacy format, no `added_tokens_decoder`: transformers then
# lets special_tokens_map.json override tokenizer_config.json, which is how SD 2.x ends up
# padding with "!" (id 0, OpenCLIP's pad id) while its tokenizer_config.json says otherwise.
def _added(content, normalized=True, typed=False):
    token = {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}
    return {"__type": "AddedToken", **token} if typed else token


def sd_tokenizer_files(pad: str) -> dict:
    config = {
        "add_prefix_space": False,
        "bos_token": _added("<|startoftext|>", typed=True),
        "do_lower_case": True,
        "eos_token": _added("<|endoftext|>", typed=True),
        "errors": "replace",
        "model_max_length": 77,
        "name_or_path": "openai/clip-vit-large-patch14",
        "pad_token": "<|endoftext|>",
        "special_tokens_map_file": "./special_tokens_map.json",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": _added("<|endoftext|>", typed=True),
    }
    special = {
        "bos_token": _added("<|startoftext|>"),
        "eos_token": _added("<|endoftext|>"),
        "pad_token": pad,
        "unk_token": _added("<|endoftext|>"),
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def write_json(path: Path, value, indent=2) -> None:
    path.write_text(json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def tokenizer_reference(tok, name: str) -> dict:
    """transformers' ids: untruncated without bos/eos, and as diffusers calls it (bos + at most 75
    tokens + eos, padded to 77)."""
    added = json.loads(tok.backend_tokenizer.to_str())["added_tokens"]
    return {
        "folder": name,
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "pad_id": tok.pad_token_id,
        "added_tokens": [{k: a[k] for k in ("id", "content", "normalized", "special")} for a in added],
        "ids": [tok(p, add_special_tokens=False).input_ids for p in PROMPTS],
        "input_ids_77": [
            tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids for p in PROMPTS
        ],
    }


def make_tokenizer_fixtures(vocab, merges) -> dict:
    work = FIXTURES / "_vocab_tmp"
    work.mkdir()
    (work / "vocab.json").write_text(vocab_json(vocab), encoding="utf-8")
    (work / "merges.txt").write_text(merges_txt(merges), encoding="utf-8")
    cases = {"prompts": PROMPTS, "tokenizers": {}}
    try:
        for name, pad in [("tokenizer_sd15", "<|endoftext|>"), ("tokenizer_sd21", "!")]:
            folder = FIXTURES / name
            folder.mkdir()
            for file, value in sd_tokenizer_files(pad).items():
                write_json(folder / file, value)
            # Load the folder exactly as diffusers does: vocab and merges next to the configs.
            full = work / name
            shutil.copytree(folder, full)
            shutil.copy(work / "vocab.json", full)
            shutil.copy(work / "merges.txt", full)
            tok = CLIPTokenizer.from_pretrained(str(full), local_files_only=True)
            assert tok.model_max_length == 77
            cases["tokenizers"][name] = tokenizer_reference(tok, name)
        check_against_open_clip(CLIPTokenizer.from_pretrained(str(work / "tokenizer_sd15"), local_files_only=True))

        # What transformers 5 itself writes (tokenizer.json + tokenizer_config.json, no
        # vocab.json / merges.txt), with a cut-down vocabulary to keep the file small: the 512
        # byte symbols, the first 1500 merges, the special tokens (ids 2012, 2013), pad "!".
        small_merges = merges[:1500]
        tokens = list(vocab)[:512] + ["".join(m.split()) for m in small_merges]
        tokens += ["<|startoftext|>", "<|endoftext|>"]
        small_vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
        tok = CLIPTokenizer(vocab=small_vocab, merges=[tuple(m.split()) for m in small_merges], pad_token="!")
        tok.model_max_length = 77
        folder = FIXTURES / "tokenizer_v5_small"
        tok.save_pretrained(str(folder))
        saved = sorted(p.name for p in folder.iterdir())
        assert "vocab.json" not in saved and "merges.txt" not in saved, saved
        tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        cases["tokenizers"]["tokenizer_v5_small"] = tokenizer_reference(tok, "tokenizer_v5_small")
    finally:
        shutil.rmtree(work)

    sd15, sd21 = cases["tokenizers"]["tokenizer_sd15"], cases["tokenizers"]["tokenizer_sd21"]
    assert (sd15["bos_id"], sd15["eos_id"], sd15["pad_id"]) == (49406, 49407, 49407)
    assert (sd21["bos_id"], sd21["eos_id"], sd21["pad_id"]) == (49406, 49407, 0)
    # Widely published ids, as an anchor that the vocabulary is CLIP's.
    assert sd15["input_ids_77"][0][:7] == [49406, 320, 1125, 539, 320, 2368, 49407], sd15["input_ids_77"][0][:7]
    # Chunking boundaries are where intended.
    lengths = {PROMPTS[i]: len(ids) for i, ids in enumerate(sd15["ids"])}
    assert [lengths[" ".join(["a"] * n)] for n in (75, 76, 150)] == [75, 76, 150]
    assert max(lengths.values()) > 75
    write_json(FIXTURES / "tokenizer_cases.json", cases, indent=None)
    return cases


def check_against_open_clip(tok) -> None:
    """The vocabulary files must tokenize like open_clip's own tokenizer, up to the text
    clean-up that differs by design (OPEN_CLIP_CLEANUP_DIFFS)."""
    oc = load_open_clip_tokenizer().SimpleTokenizer()
    differ = []
    for p in PROMPTS:
        ours = tok(p, add_special_tokens=False).input_ids
        theirs = oc.encode(p)
        if ours != theirs:
            differ.append(p)
    unexpected = [p for p in differ if p not in OPEN_CLIP_CLEANUP_DIFFS]
    if unexpected:
        sys.exit(f"transformers and open_clip tokenize differently: {unexpected!r}")
    stale = [p for p in OPEN_CLIP_CLEANUP_DIFFS if p not in differ]
    if stale:
        sys.exit(f"expected open_clip differences did not occur: {stale!r}")
    print(f"  open_clip agrees on {len(PROMPTS) - len(differ)}/{len(PROMPTS)} prompts; the other "
          f"{len(differ)} differ only by open_clip's ftfy/html clean-up, as listed")


# ---------------------------------------------------------------------------------------------
# Text encoders

VOCAB = 1000  # the real 49408 would not fit the size budget; the test ids stay below 1000
TEXT_ENCODER_SD15 = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=VOCAB - 2,
    eos_token_id=VOCAB - 1,
    pad_token_id=1,
    projection_dim=32,
)
TEXT_ENCODER_SD21 = dict(
    TEXT_ENCODER_SD15,
    hidden_size=48,
    intermediate_size=64,
    num_attention_heads=4,
    hidden_act="gelu",
)


def build_text_encoder(name: str, config: dict) -> CLIPTextModel:
    torch.manual_seed(SEEDS[f"{name}.init"])
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    perturb_f16_exact(model, SEEDS[f"{name}.noise"])
    return model


def save_transformers_f16(model, directory: Path) -> None:
    model.half()
    model.save_pretrained(directory, safe_serialization=True)
    model.float()
    reloaded = type(model).from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    assert_same_state_dict(model.state_dict(), reloaded.state_dict(), f"reload of {directory.name}")


def save_diffusers_f16(model, directory: Path) -> None:
    model.half()
    model.save_pretrained(directory, safe_serialization=True)
    model.float()
    reloaded = type(model).from_pretrained(directory, local_files_only=True)
    assert_same_state_dict(model.state_dict(), reloaded.state_dict(), f"reload of {directory.name}")


def text_ids(pad_id: int) -> torch.Tensor:
    """Two rows as the tokenizer makes them: bos, content, eos, padding; different lengths."""
    g = torch.Generator().manual_seed(SEEDS["text.ids"])
    rows = []
    for n in (5, 40):
        content = torch.randint(1, VOCAB - 2, (n,), generator=g).tolist()
        row = [VOCAB - 2] + content + [VOCAB - 1]
        rows.append(row + [pad_id] * (77 - len(row)))
    return torch.tensor(rows, dtype=torch.long)


def run_text_encoder(model: CLIPTextModel, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """diffusers' clip_skip semantics (StableDiffusionPipeline.encode_prompt): the hidden state
    `clip_skip` layers before the last, through final_layer_norm. Computed here rather than by
    the pipeline: in diffusers 0.42.1 with transformers >= 5.6 that code path reads
    `text_encoder.text_model`, which the flattened CLIPTextModel no longer has."""
    out = model(ids, output_hidden_states=True)
    if clip_skip == 0:
        return out.last_hidden_state
    hidden = out.hidden_states[-(clip_skip + 1)]
    return model.final_layer_norm(hidden)


# ---------------------------------------------------------------------------------------------
# VAE

VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)
LATENT = (8, 12)  # non-square; two levels downsample once, so the image is 2x the latent


def build_vae() -> AutoencoderKL:
    torch.manual_seed(SEEDS["vae.init"])
    vae = AutoencoderKL(**VAE).eval()
    perturb_f16_exact(vae, SEEDS["vae.noise"])
    return vae


# ---------------------------------------------------------------------------------------------
# Original single-file layout (SD 1.x `v1-5-pruned-emaonly.safetensors`), the inverse of
# diffusers' convert_ldm_vae_checkpoint / convert_ldm_clip_checkpoint.

VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_vae_key(key: str, n_levels: int) -> str:
    """LDM name (without `first_stage_model.`) of a diffusers AutoencoderKL key."""
    def resnet(inner: str) -> str:
        sub, _, rest = inner.partition(".")
        return f"{VAE_RESNET.get(sub, sub)}.{rest}"

    def attention(inner: str) -> str:
        for new, old in VAE_ATTENTION.items():
            if inner.startswith(new + "."):
                return old + inner[len(new):]
        raise KeyError(inner)

    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        assert part in ("quant_conv", "post_quant_conv"), key
        return key
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        level = int(m[2]) if m[1] == "down" else n_levels - 1 - int(m[2])  # LDM numbers up-levels bottom-up
        return f"{part}.{m[1]}.{level}.block.{m[3]}.{resnet(m[4])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", rest):
        return f"{part}.up.{n_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{part}.mid.attn_1.{attention(m[1])}"
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
    assert rest.split(".")[0] in ("conv_in", "conv_out"), key
    return key


def to_single_file(vae: AutoencoderKL, text_encoder: CLIPTextModel) -> dict:
    out = {}
    n_levels = len(vae.config.block_out_channels)
    for key, tensor in vae.state_dict().items():
        name = "first_stage_model." + ldm_vae_key(key, n_levels)
        tensor = tensor.detach().half()
        # The LDM attention's q/k/v/proj_out are 1x1 convolutions.
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        assert name not in out, name
        out[name] = tensor.contiguous().clone()
    for key, tensor in text_encoder.state_dict().items():
        out["cond_stage_model.transformer.text_model." + key] = tensor.detach().half().contiguous().clone()
    # As in the real checkpoints: the position ids buffer, and other models' tensors.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out["model.diffusion_model.out.2.bias"] = torch.zeros(4, dtype=torch.float16)
    return out


def verify_single_file(path: Path, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> None:
    """diffusers' own conversion must read the single file back to exactly the two models."""
    checkpoint = safetensors.torch.load_file(path)
    converted = convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    assert_same_state_dict(vae.state_dict(), converted, "convert_ldm_vae_checkpoint")
    # As create_diffusers_clip_model_from_ldm does it for the flattened transformers 5 model.
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()}
    converted.pop("embeddings.position_ids")
    assert_same_state_dict(text_encoder.state_dict(), converted, "convert_ldm_clip_checkpoint")
    loaded = AutoencoderKL.from_single_file(
        str(path), config=str(FIXTURES / "vae"), local_files_only=True, torch_dtype=torch.float32
    )
    assert_same_state_dict(vae.state_dict(), loaded.state_dict(), "AutoencoderKL.from_single_file")
    print(f"  {path.name}: diffusers' conversions give back both state dicts exactly")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if diffusers.__version__ != "0.42.1":
        print(f"WARNING: diffusers {diffusers.__version__}, fixtures were specified against 0.42.1")

    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS + ["_vocab_tmp"]:
        path = FIXTURES / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    import importlib.metadata

    manifest = {
        "versions": {
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": importlib.metadata.version("tokenizers"),
            "torch": torch.__version__,
            "open_clip_torch": importlib.metadata.version("open_clip_torch"),
            "ftfy": importlib.metadata.version("ftfy"),
        },
        "models": {},
        "cases": {},
    }
    cases = {}

    print("clip vocabulary")
    vocab, merges = build_clip_vocab()
    write_clip_assets(vocab, merges)
    print("tokenizers")
    make_tokenizer_fixtures(vocab, merges)

    with torch.no_grad():
        print("text encoders")
        encoders = {}
        for family, config, pad_id in [("sd15", TEXT_ENCODER_SD15, VOCAB - 1), ("sd21", TEXT_ENCODER_SD21, 0)]:
            name = f"text_encoder_{family}"
            model = build_text_encoder(name, config)
            assert_f16_exact(model)
            save_transformers_f16(model, FIXTURES / name)
            manifest["models"][name] = {"class": "CLIPTextModel", "parameters": n_params(model), **config}
            ids = text_ids(pad_id)
            cases[f"{family}.text.ids"] = ids
            for k in (0, 1, 2):
                cases[f"{family}.text.clip_skip_{k}"] = run_text_encoder(model, ids, k)
            encoders[family] = model
        # clip_skip must change the output (else its test could not fail).
        assert not torch.allclose(cases["sd15.text.clip_skip_0"], cases["sd15.text.clip_skip_1"], atol=1e-2)

        print("vae")
        vae = build_vae()
        assert_f16_exact(vae)
        save_diffusers_f16(vae, FIXTURES / "vae")
        manifest["models"]["vae"] = {"class": "AutoencoderKL", "parameters": n_params(vae), **VAE}
        h, w = LATENT
        g = torch.Generator().manual_seed(SEEDS["vae.latents"])
        z = torch.randn((2, 4, h, w), generator=g)
        g = torch.Generator().manual_seed(SEEDS["vae.image"])
        image = torch.rand((2, 3, 2 * h, 2 * w), generator=g) * 2 - 1
        g = torch.Generator().manual_seed(SEEDS["vae.sample_noise"])
        noise = torch.randn((2, 4, h, w), generator=g)
        cases["vae.z"] = z
        cases["vae.decoded"] = vae.decode(z).sample
        cases["vae.image"] = image
        posterior = vae.encode(image).latent_dist
        cases["vae.mean"] = posterior.mean
        cases["vae.logvar"] = posterior.logvar
        cases["vae.std"] = posterior.std
        cases["vae.sample_noise"] = noise
        cases["vae.sample"] = posterior.mean + posterior.std * noise

        print("single file")
        path = FIXTURES / "sd15_single_file.safetensors"
        safetensors.torch.save_file(to_single_file(vae, encoders["sd15"]), path)
        verify_single_file(path, vae, encoders["sd15"])

    cases = {k: (v if v.dtype == torch.long else v.detach().float()).contiguous() for k, v in cases.items()}
    cases = {k: (v.to(torch.int64) if v.dtype == torch.long else v) for k, v in cases.items()}
    safetensors.torch.save_file(cases, FIXTURES / "text_vae_cases.safetensors")
    manifest["cases"] = {k: list(v.shape) for k, v in sorted(cases.items())}
    write_json(FIXTURES / "text_vae_manifest.json", manifest)

    total = 0
    for name in OUTPUTS:
        path = FIXTURES / name
        for p in sorted([path] if path.is_file() else path.rglob("*")):
            if p.is_file():
                total += p.stat().st_size
                print(f"  {p.stat().st_size:>10,d}  {p.relative_to(FIXTURES)}")
    print(f"total size of this script's fixtures: {total:,d} bytes ({total / 2**20:.2f} MiB)")
    for p in sorted(ASSETS.iterdir()):
        print(f"  {p.stat().st_size:>10,d}  assets/clip/{p.name}")
    if total > MAX_FIXTURE_BYTES:
        sys.exit(f"fixtures exceed the {MAX_FIXTURE_BYTES:,d}-byte budget")


if __name__ == "__main__":
    main()
