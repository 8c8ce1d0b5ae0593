"""Model-based rewards (clip-t, pickscore, laion-aesthetic, hpsv2.1, imagereward) on tiny random backbones.

Every backbone is written to tmp in the on-disk format the real loader reads (transformers directories,
open_clip / ImageReward ``.pt`` state dicts, .pth / .safetensors heads) and loaded through the reward
factories. Scores are checked against references written here independently: transformers' own image
processor and forward, and plain-torch re-derivations of the open_clip and BLIP/BERT computations that read
the raw checkpoint tensors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from otca.rewards.loading import load_checkpoint
from otca.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    CropPrep,
    LetterboxPrep,
    center_crop,
    shortest_edge_size,
)
from otca.rewards.registry import build_reward, reward_names

torch.set_num_threads(1)

PROMPTS = ["a cat", "a dog on a cat", "a photo of a dog", "cat"]
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "p h", "ph o", "pho t", "phot o</w>", "o f</w>"]


# ----------------------------------------------------------------------------------------------- tiny fixtures


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP ``bytes_to_unicode``), in id order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def write_clip_bpe(directory) -> dict[str, int]:
    """A tiny CLIP-format BPE (vocab.json + merges.txt): bytes, bytes+</w>, merges, then SOT/EOT last."""
    syms = _byte_symbols()
    tokens = syms + [s + "</w>" for s in syms] + ["".join(m.split()) for m in MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return vocab


def write_preprocessor(directory, size: int) -> None:
    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A transformers CLIP snapshot directory: tiny random CLIPModel + BPE files + preprocessor config."""
    from transformers import CLIPConfig, CLIPModel

    d = tmp_path_factory.mktemp("clip")
    vocab = write_clip_bpe(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(d)
    write_preprocessor(d, 32)
    return d


def images(b: int = 4, h: int = 40, w: int = 48, seed: int = 0) -> torch.Tensor:
    """Smooth random RGB images ``[b, 3, h, w]`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 5, 6, generator=g)
    return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


# ------------------------------------------------------------------------------------------- import and errors


def test_import_does_not_load_transformers():
    code = (
        "import sys, otca.rewards, otca.rewards.clip, otca.rewards.pickscore, otca.rewards.aesthetic, "
        "otca.rewards.hps, otca.rewards.imagereward, otca.rewards.videoalign\n"
        "heavy = [m for m in ('transformers', 'open_clip', 'torchvision') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_lists_the_rewards():
    names = reward_names()
    for n in ("clip-t", "pickscore", "laion-aesthetic", "hpsv2.1", "imagereward"):
        assert n in names


@pytest.mark.parametrize(
    "name, options, option, filename",
    [
        ("hpsv2.1", {"path": "/nonexistent/HPS_v2.1_compressed.pt"}, "path", "HPS_v2.1_compressed.pt"),
        ("imagereward", {"path": "/nonexistent/ImageReward.pt"}, "path", "ImageReward.pt"),
        ("laion-aesthetic", {"path": "/nonexistent/sac+logos+ava1-l14-linearMSE.pth"}, "path", "linearMSE.pth"),
        ("clip-t", {"path": "/nonexistent/clip-vit-large-patch14"}, "path", "clip-vit-large-patch14"),
        ("pickscore", {}, "path", "no CLIP model directory given"),
    ],
)
def test_missing_weights_is_a_one_line_error(name, options, option, filename):
    with pytest.raises(FileNotFoundError) as e:
        build_reward(name, **options)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"reward '{name}'" in msg and filename in msg and f"options.{option}" in msg


def test_missing_second_file_names_its_option(clip_dir, tmp_path):
    head = tmp_path / "head.pth"
    torch.save(OrderedDict({"layers.0.weight": torch.zeros(1, 16), "layers.0.bias": torch.zeros(1)}), head)
    with pytest.raises(FileNotFoundError, match=r"options\.clip_path of reward 'laion-aesthetic'"):
        build_reward("laion-aesthetic", path=str(head), clip_path=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer.json nor vocab.json.*options\.processor_path"):
        build_reward("clip-t", path=str(clip_dir), processor_path=str(tmp_path))


class _NotATensor:
    pass


def test_unsafe_pickle_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"state_dict": _NotATensor()}, p)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint("hpsv2.1", p)


# ------------------------------------------------------------------------------------------------ preprocessing


def test_shortest_edge_and_center_crop_by_hand():
    assert shortest_edge_size(300, 200, 224) == (336, 224)
    assert shortest_edge_size(200, 301, 224) == (224, 337)  # 337.12 truncated
    x = torch.arange(35.0).view(1, 1, 5, 7)
    # top = (5 - 3) // 2 = 1, left = (7 - 3) // 2 = 2
    assert torch.equal(center_crop(x, (3, 3)), x[..., 1:4, 2:5])


@pytest.mark.parametrize("hw", [(300, 260), (512, 512), (160, 200), (1024, 768)])
def test_crop_prep_matches_clip_image_processor(hw):
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    h, w = hw
    rng = np.random.default_rng(h + w)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    img = (base[..., None] + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)
    ref = CLIPImageProcessorPil()(images=Image.fromarray(img), return_tensors="pt")["pixel_values"]
    ours = CropPrep(224, (224, 224))(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255)
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    diff = (ours - ref).abs()
    # PIL resamples uint8 and rounds: ~1/255 on average (0.015 after /std), a few levels at most
    assert float(diff.mean()) < 0.006 and float(diff.max()) < 0.08


def test_letterbox_by_hand():
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    # H=6, W=4 -> size 4: scale 2/3, new (4, round(2.67)=3), pad_w 1 -> left 0, right 1
    x = torch.full((1, 3, 6, 4), 0.7)
    out = LetterboxPrep(4)(x)[0]
    assert out.shape == (3, 4, 4)
    torch.testing.assert_close(out[:, :, :3], ((0.7 - mean) / std).expand(3, 4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, :, 3:], (-mean / std).expand(3, 4, 1), atol=1e-6, rtol=0)
    # H=4, W=8 -> new (2, 4), pad_h 2 -> one black row on top, one below
    out = LetterboxPrep(4)(torch.full((1, 3, 4, 8), 0.2))[0]
    torch.testing.assert_close(out[:, 1:3], ((0.2 - mean) / std).expand(3, 2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, [0, 3]], (-mean / std).expand(3, 2, 4), atol=1e-6, rtol=0)


def test_bad_pixels_are_rejected(clip_dir):
    r = build_reward("clip-t", path=str(clip_dir))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        r(images(2) * 2 - 1, PROMPTS[:2])
    with pytest.raises(ValueError, match=r"expects images \[B, C, H, W\]"):
        r(torch.rand(2, 3, 4, 32, 32), PROMPTS[:2])
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        r(images(2), PROMPTS[:3])


# ------------------------------------------------------------------------------------------- clip-t, pickscore


def test_clip_tokenizer_really_tokenizes(clip_dir):
    vocab = json.loads((clip_dir / "vocab.json").read_text())
    tok = build_reward("clip-t", path=str(clip_dir)).tokenizer
    ids = tok("A Cat of a photo")["input_ids"]
    expect = ["<|startoftext|>", "a</w>", "cat</w>", "of</w>", "a</w>", "photo</w>", "<|endoftext|>"]
    assert ids == [vocab[t] for t in expect]  # merges applied, lower-cased, SOT/EOT added


def test_clip_t_is_the_raw_cosine(clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    r = build_reward("clip-t", path=str(clip_dir))
    x = images(4)
    s = r(x, PROMPTS)
    assert s.shape == (4,) and s.dtype == torch.float32 and s.device.type == "cpu"
    assert torch.isfinite(s).all() and (s.abs() <= 1).all()
    # reference: transformers' own forward on the same preprocessed pixels
    model = CLIPModel.from_pretrained(clip_dir).eval()
    t = CLIPTokenizer.from_pretrained(clip_dir)(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=r.prep(x))
    ref = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-5)


def test_clip_t_batching_and_padding_invariance(clip_dir):
    x = images(4)
    full = build_reward("clip-t", path=str(clip_dir), batch_size=16)(x, PROMPTS)
    single = build_reward("clip-t", path=str(clip_dir), batch_size=1)(x, PROMPTS)  # no padding at all
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-5)


def test_grayscale_is_scored_as_rgb(clip_dir):
    r = build_reward("clip-t", path=str(clip_dir))
    g = images(2)[:, :1]
    torch.testing.assert_close(r(g, PROMPTS[:2]), r(g.expand(-1, 3, -1, -1), PROMPTS[:2]))


def test_clip_t_bfloat16_close_to_float32(clip_dir):
    x = images(4)
    s32 = build_reward("clip-t", path=str(clip_dir))(x, PROMPTS)
    s16 = build_reward("clip-t", path=str(clip_dir), dtype="bfloat16")(x, PROMPTS)
    assert s16.dtype == torch.float32
    torch.testing.assert_close(s16, s32, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="reward 'clip-t': option 'dtype': Input should be 'float32', 'float16' or"):
        build_reward("clip-t", path=str(clip_dir), dtype="float8")


def test_pickscore_is_scaled_cosine(clip_dir):
    from transformers import CLIPModel

    x = images(4)
    cos = build_reward("clip-t", path=str(clip_dir))(x, PROMPTS)
    pick = build_reward("pickscore", path=str(clip_dir), processor_path=str(clip_dir))(x, PROMPTS)
    scale = float(CLIPModel.from_pretrained(clip_dir).logit_scale.detach().exp())  # 1/0.07 at init, not 100
    torch.testing.assert_close(pick, scale * cos, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ aesthetic


def _aesthetic_head(dim: int) -> OrderedDict:
    g = torch.Generator().manual_seed(3)
    sizes = [dim, 32, 8, 4, 2, 1]  # the real head is 768-1024-128-64-16-1 at indices 0, 2, 4, 6, 7
    head = OrderedDict()
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:], strict=False), strict=True):
        head[f"layers.{idx}.weight"] = torch.randn(o, i, generator=g) / i**0.5
        head[f"layers.{idx}.bias"] = torch.randn(o, generator=g)
    return head


def test_laion_aesthetic_against_processor_and_plain_mlp(clip_dir, tmp_path):
    from PIL import Image
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil, CLIPModel

    head = _aesthetic_head(16)
    torch.save(head, tmp_path / "head.pth")
    save_file(dict(head), str(tmp_path / "head.safetensors"))
    x = images(3, 64, 80)
    s = build_reward("laion-aesthetic", path=str(tmp_path / "head.pth"), clip_path=str(clip_dir))(x, PROMPTS[:3])
    s2 = build_reward("laion-aesthetic", path=str(tmp_path / "head.safetensors"), clip_path=str(clip_dir))(
        x, PROMPTS[:3]
    )
    assert s.shape == (3,) and torch.isfinite(s).all()
    torch.testing.assert_close(s, s2)
    # reference: transformers' PIL processor on uint8 images, CLIP image features, L2 norm, Linear chain by hand
    u8 = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in x]
    pv = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=u8, return_tensors="pt"
    )["pixel_values"]
    with torch.no_grad():
        e = CLIPModel.from_pretrained(clip_dir).get_image_features(pixel_values=pv).pooler_output
    h = e / e.norm(dim=-1, keepdim=True)
    for idx in (0, 2, 4, 6, 7):
        h = h @ head[f"layers.{idx}.weight"].T + head[f"layers.{idx}.bias"]
    torch.testing.assert_close(s, h.squeeze(-1), atol=0.02, rtol=0)  # uint8 round-off of the processor path


def test_laion_aesthetic_head_width_must_match(clip_dir, tmp_path):
    torch.save(_aesthetic_head(24), tmp_path / "head.pth")
    with pytest.raises(ValueError, match="takes 24-d embeddings"):
        build_reward("laion-aesthetic", path=str(tmp_path / "head.pth"), clip_path=str(clip_dir))


# ---------------------------------------------------------------------------------------------------- hpsv2.1

OC = dict(width=32, heads=2, layers=2, patch=8, image=32, text_width=24, text_heads=2, text_layers=2, embed=16)


def openclip_state(vocab_size: int, seed: int = 0) -> OrderedDict:
    """A random state dict in open_clip's ViT CLIP layout (model.py / transformer.py names and shapes)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def blocks(prefix, d, n):
        out = {}
        for i in range(n):
            p = f"{prefix}{i}."
            out.update({
                p + "ln_1.weight": 1 + rnd(d, scale=0.05), p + "ln_1.bias": rnd(d, scale=0.05),
                p + "attn.in_proj_weight": rnd(3 * d, d), p + "attn.in_proj_bias": rnd(3 * d, scale=0.05),
                p + "attn.out_proj.weight": rnd(d, d), p + "attn.out_proj.bias": rnd(d, scale=0.05),
                p + "ln_2.weight": 1 + rnd(d, scale=0.05), p + "ln_2.bias": rnd(d, scale=0.05),
                p + "mlp.c_fc.weight": rnd(4 * d, d), p + "mlp.c_fc.bias": rnd(4 * d, scale=0.05),
                p + "mlp.c_proj.weight": rnd(d, 4 * d), p + "mlp.c_proj.bias": rnd(d, scale=0.05),
            })
        return out

    w, tw, grid = OC["width"], OC["text_width"], OC["image"] // OC["patch"]
    sd = OrderedDict({
        "positional_embedding": rnd(77, tw),
        "text_projection": rnd(tw, OC["embed"]),
        "logit_scale": torch.tensor(4.6052),
        "visual.class_embedding": rnd(w),
        "visual.positional_embedding": rnd(grid * grid + 1, w),
        "visual.proj": rnd(w, OC["embed"]),
        "visual.conv1.weight": rnd(w, 3, OC["patch"], OC["patch"]),
        "visual.ln_pre.weight": 1 + rnd(w, scale=0.05), "visual.ln_pre.bias": rnd(w, scale=0.05),
    })
    sd.update(blocks("visual.transformer.resblocks.", w, OC["layers"]))
    sd.update({"visual.ln_post.weight": 1 + rnd(w, scale=0.05), "visual.ln_post.bias": rnd(w, scale=0.05)})
    sd["token_embedding.weight"] = rnd(vocab_size, tw)
    sd.update(blocks("transformer.resblocks.", tw, OC["text_layers"]))
    sd.update({"ln_final.weight": 1 + rnd(tw, scale=0.05), "ln_final.bias": rnd(tw, scale=0.05)})
    return sd


def _attention(q_in, kv_in, wq, bq, wk, bk, wv, bv, heads, mask=None):
    """Plain multi-head attention: softmax(q k^T / sqrt(d) + mask) v, heads concatenated."""
    b, lq, d = q_in.shape
    q = F.linear(q_in, wq, bq).view(b, lq, heads, -1).transpose(1, 2)
    k = F.linear(kv_in, wk, bk).view(b, kv_in.shape[1], heads, -1).transpose(1, 2)
    v = F.linear(kv_in, wv, bv).view(b, kv_in.shape[1], heads, -1).transpose(1, 2)
    a = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        a = a + mask
    return (a.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, -1)


def _openclip_tower(x, sd, prefix, n, heads, mask=None):
    """open_clip residual blocks: x + attn(ln_1 x); x + mlp(ln_2 x) with exact GELU."""
    d = x.shape[-1]
    for i in range(n):
        p = f"{prefix}{i}."
        h = F.layer_norm(x, (d,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"], 1e-5)
        wq, wk, wv = sd[p + "attn.in_proj_weight"].chunk(3)
        bq, bk, bv = sd[p + "attn.in_proj_bias"].chunk(3)
        a = _attention(h, h, wq, bq, wk, bk, wv, bv, heads, mask)
        x = x + F.linear(a, sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (d,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"], 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                         sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x


def openclip_reference_score(sd, pixel_values, ids):
    """open_clip's encode_image / encode_text (normalize=True) and their cosine, from the raw state dict.

    ``ids`` [B, 77] padded with 0 like open_clip's tokenizer; text is pooled at argmax(ids) (the EOT)."""
    w, tw = OC["width"], OC["text_width"]
    x = F.conv2d(pixel_values, sd["visual.conv1.weight"], stride=OC["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, w), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"], 1e-5)
    x = _openclip_tower(x, sd, "visual.transformer.resblocks.", OC["layers"], OC["heads"])
    img = F.layer_norm(x[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-5) @ sd["visual.proj"]
    L = ids.shape[1]
    causal = torch.full((L, L), float("-inf")).triu(1)
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:L]
    t = _openclip_tower(t, sd, "transformer.resblocks.", OC["text_layers"], OC["text_heads"], causal)
    t = F.layer_norm(t, (tw,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-5)
    txt = t[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]
    return F.cosine_similarity(img, txt, dim=-1)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hps")
    vocab = write_clip_bpe(d)
    sd = openclip_state(len(vocab))
    torch.save({"state_dict": sd}, d / "HPS_v2.1_compressed.pt")
    return d, sd


def _hps(d, **kw):
    return build_reward("hpsv2.1", path=str(d / "HPS_v2.1_compressed.pt"), tokenizer_path=str(d),
                        vision_heads=OC["heads"], text_heads=OC["text_heads"], **kw)


def test_hps_mapping_reproduces_open_clip(hps_files):
    from transformers import CLIPTokenizer

    d, sd = hps_files
    r = _hps(d)
    x = images(4, 48, 36)  # non-square: exercises the letterbox padding
    s = r(x, PROMPTS)
    assert s.shape == (4,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    t = CLIPTokenizer.from_pretrained(d)(PROMPTS)["input_ids"]
    ids = torch.tensor([row + [0] * (77 - len(row)) for row in t])  # open_clip pads with 0 to 77
    with torch.no_grad():
        ref = openclip_reference_score(sd, LetterboxPrep(OC["image"])(x), ids)
    torch.testing.assert_close(s, ref, atol=1e-4, rtol=1e-4)
    assert r.scale == 1.0  # raw cosine, the logit scale is not applied


def test_hps_batch_size_option(hps_files):
    d, _ = hps_files
    x = images(4)
    torch.testing.assert_close(_hps(d, batch_size=1)(x, PROMPTS), _hps(d, batch_size=3)(x, PROMPTS),
                               atol=1e-5, rtol=1e-5)


def test_hps_rejects_unknown_keys_and_bad_heads(hps_files, tmp_path):
    d, sd = hps_files
    bad = OrderedDict(sd)
    bad["visual.attn_pool.query"] = torch.zeros(2, 2)
    torch.save({"state_dict": bad}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"unknown open_clip keys \['visual.attn_pool.query'\]"):
        build_reward("hpsv2.1", path=str(tmp_path / "bad.pt"), tokenizer_path=str(d), vision_heads=2, text_heads=2)
    with pytest.raises(ValueError, match="vision width 32 is not divisible by vision_heads=3"):
        build_reward("hpsv2.1", path=str(d / "HPS_v2.1_compressed.pt"), tokenizer_path=str(d), vision_heads=3,
                     text_heads=2)


# ------------------------------------------------------------------------------------------------ imagereward

IR = dict(width=32, heads=2, layers=2, patch=8, image=32, text_width=24, text_heads=2, text_layers=2, max_pos=40)
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat", "dog", "on", "photo", "of", "##s"]


def imagereward_state(vocab_rows: int, seed: int = 1) -> OrderedDict:
    """A random state dict in ImageReward.pt's layout: BLIP ViT (timm names), med.py BERT, BLIP projections,
    the MLP head."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def ln(p, d):
        return {p + "weight": 1 + rnd(d, scale=0.05), p + "bias": rnd(d, scale=0.05)}

    def lin(p, o, i):
        return {p + "weight": rnd(o, i), p + "bias": rnd(o, scale=0.05)}

    w, tw, grid, v = IR["width"], IR["text_width"], IR["image"] // IR["patch"], "blip.visual_encoder."
    sd = OrderedDict({v + "cls_token": rnd(1, 1, w), v + "pos_embed": rnd(1, grid * grid + 1, w)})
    sd.update(lin(v + "patch_embed.proj.", w, 1))
    sd[v + "patch_embed.proj.weight"] = rnd(w, 3, IR["patch"], IR["patch"])
    for i in range(IR["layers"]):
        p = f"{v}blocks.{i}."
        sd.update({**ln(p + "norm1.", w), **lin(p + "attn.qkv.", 3 * w, w), **lin(p + "attn.proj.", w, w),
                   **ln(p + "norm2.", w), **lin(p + "mlp.fc1.", 4 * w, w), **lin(p + "mlp.fc2.", w, 4 * w)})
    sd.update(ln(v + "norm.", w))
    t = "blip.text_encoder."
    sd.update({t + "embeddings.position_ids": torch.arange(IR["max_pos"]).expand(1, -1),
               t + "embeddings.word_embeddings.weight": rnd(vocab_rows, tw),
               t + "embeddings.position_embeddings.weight": rnd(IR["max_pos"], tw),
               **ln(t + "embeddings.LayerNorm.", tw)})
    for i in range(IR["text_layers"]):
        p = f"{t}encoder.layer.{i}."
        for a, kv in (("attention.", tw), ("crossattention.", w)):
            sd.update({**lin(p + a + "self.query.", tw, tw), **lin(p + a + "self.key.", tw, kv),
                       **lin(p + a + "self.value.", tw, kv), **lin(p + a + "output.dense.", tw, tw),
                       **ln(p + a + "output.LayerNorm.", tw)})
        sd.update({**lin(p + "intermediate.dense.", 2 * tw, tw), **lin(p + "output.dense.", tw, 2 * tw),
                   **ln(p + "output.LayerNorm.", tw)})
    sd.update({**lin("blip.vision_proj.", 8, w), **lin("blip.text_proj.", 8, tw)})
    sizes = [tw, 32, 8, 4, 2, 1]
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(sizes, sizes[1:], strict=False), strict=True):
        sd.update(lin(f"mlp.layers.{idx}.", o, i))
    return sd


def imagereward_reference(sd, pixel_values, ids, mask):
    """ImageReward.score from the raw state dict: BLIP ViT tokens, BERT with cross-attention, [CLS], MLP."""
    w, tw, v, t = IR["width"], IR["text_width"], "blip.visual_encoder.", "blip.text_encoder."
    x = F.conv2d(pixel_values, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=IR["patch"])
    x = torch.cat([sd[v + "cls_token"].expand(len(x), 1, w), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(IR["layers"]):
        p = f"{v}blocks.{i}."
        h = F.layer_norm(x, (w,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        wq, wk, wv = sd[p + "attn.qkv.weight"].chunk(3)
        bq, bk, bv = sd[p + "attn.qkv.bias"].chunk(3)
        x = x + F.linear(_attention(h, h, wq, bq, wk, bk, wv, bv, IR["heads"]), sd[p + "attn.proj.weight"],
                         sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (w,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    img = F.layer_norm(x, (w,), sd[v + "norm.weight"], sd[v + "norm.bias"], 1e-6)

    def add_norm(p, h, res):
        return F.layer_norm(F.linear(h, sd[p + "dense.weight"], sd[p + "dense.bias"]) + res, (tw,),
                            sd[p + "LayerNorm.weight"], sd[p + "LayerNorm.bias"], 1e-12)

    def attn(p, q_in, kv_in, m=None):
        return _attention(q_in, kv_in, *(sd[f"{p}self.{n}.{k}"] for n in ("query", "key", "value")
                                         for k in ("weight", "bias")), IR["text_heads"], m)

    L = ids.shape[1]
    e = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:L]
    h = F.layer_norm(e, (tw,), sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"], 1e-12)
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(IR["text_layers"]):
        p = f"{t}encoder.layer.{i}."
        h = add_norm(p + "attention.output.", attn(p + "attention.", h, h, pad), h)
        h = add_norm(p + "crossattention.output.", attn(p + "crossattention.", h, img), h)
        mid = F.gelu(F.linear(h, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
        h = add_norm(p + "output.", mid, h)
    r = h[:, 0]
    for idx in (0, 2, 4, 6, 7):
        r = F.linear(r, sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"])
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def ir_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("imagereward")
    (d / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    sd = imagereward_state(len(BERT_WORDS) + 2)  # + [DEC], [ENC] as in BLIP (30522 + 2 = 30524)
    torch.save(sd, d / "ImageReward.pt")
    return d, sd


def _ir(d, path=None, **kw):
    return build_reward("imagereward", path=str(path or d / "ImageReward.pt"), tokenizer_path=str(d),
                        vision_heads=IR["heads"], text_heads=IR["text_heads"], **kw)


def test_imagereward_matches_blip_reference(ir_files):
    from transformers import BertTokenizer

    d, sd = ir_files
    r = _ir(d)
    x = images(4, 40, 56)
    prompts = ["a cat", "A photo of a dog on a cat", "dogs", "cat on a photo of a cat"]
    s = r(x, prompts)
    assert s.shape == (4,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    tok = BertTokenizer.from_pretrained(d)
    t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert t["input_ids"][1, :8].tolist() == [2, 5, 9, 10, 5, 7, 8, 5]  # [CLS] a photo of a dog on a
    with torch.no_grad():
        ref = imagereward_reference(sd, CropPrep(32, (32, 32))(x), t["input_ids"], t["attention_mask"])
    torch.testing.assert_close(s, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_ir(d, batch_size=1)(x, prompts), s, atol=1e-5, rtol=1e-5)


def test_imagereward_strict_keys(ir_files, tmp_path):
    d, sd = ir_files
    extra = OrderedDict(sd)
    extra["blip.itm_head.weight"] = torch.zeros(2, 24)
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"unknown keys \['blip.itm_head.weight'\]"):
        _ir(d, tmp_path / "extra.pt")
    missing = OrderedDict((k, v) for k, v in sd.items() if "crossattention.output.dense.bias" not in k)
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="text encoder does not fit: missing"):
        _ir(d, tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------- videoalign

from otca.rewards.qwen2vl_frames import (  # noqa: E402
    frame_indices,
    patchify,
    resize_frames,
    smart_nframes,
    smart_resize,
)
from otca.rewards.videoalign import SPECIAL_TOKENS  # noqa: E402

VA_TEMPLATE = (
    "\nRate the video.\nVisual: <|VQ_reward|>\nMotion: <|MQ_reward|>\nPrompt - {text_prompt}\nText: <|TA_reward|>\n"
)
VA_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VA_INFERENCE = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -0.25, "MQ_std": 0.5, "TA_mean": 1.0, "TA_std": 4.0}


def test_frame_sampling_by_hand():
    assert smart_nframes(81, 16.0, 2.0, None) == 10  # 81 / 16 * 2 = 10.1 -> 10
    assert smart_nframes(16, 16.0, 2.0, None) == 4  # 2 frames, raised to the minimum of 4
    assert smart_nframes(3, 16.0, 2.0, None) == 2  # capped at the even floor of the length
    assert smart_nframes(81, 16.0, None, 7) == 8  # num_frames rounded to even (round(3.5) = 4)
    assert frame_indices(81, 10) == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]  # linspace(0, 80, 10).round()
    # 480x832: 476x840 > 448^2, beta = sqrt(480*832/200704) = 1.4106 -> floor(340.3/28)*28, floor(589.8/28)*28
    assert smart_resize(480, 832, 28, 128 * 28 * 28, 448 * 448) == (336, 588)
    # 64x64: 56x56 < 128*28^2, beta = sqrt(100352/4096) = 4.95 -> ceil(316.8/28)*28 = 336
    assert smart_resize(64, 64, 28, 128 * 28 * 28, 448 * 448) == (336, 336)
    x = resize_frames(torch.rand(2, 3, 20, 30), (28, 56))
    assert x.shape == (2, 3, 28, 56) and torch.equal(x * 255, (x * 255).round())  # uint8 levels


def test_patchify_matches_qwen2vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = (np.random.default_rng(0).random((56, 84, 3)) * 255).astype(np.uint8)  # multiples of 28: no resize
    ref = Qwen2VLImageProcessorPil()(images=[img], return_tensors="pt")
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    patches, grid = patchify(x, 2, 14, 2)  # one frame, repeated to the temporal patch as for an image
    assert grid == tuple(ref["image_grid_thw"][0].tolist()) == (1, 4, 6)
    torch.testing.assert_close(patches, ref["pixel_values"], atol=1e-5, rtol=0)


def _legacy(key: str) -> str:
    """transformers-5 Qwen2-VL names -> the 4.45 names VideoAlign saved."""
    return key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")


@pytest.fixture(scope="module")
def videoalign_files(tmp_path_factory):
    """A tiny Qwen2-VL base directory and a VideoReward directory with the same weights saved in both
    VideoAlign checkpoint formats, plus the PEFT model they came from (the reference)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import Qwen2Tokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    base, root = tmp_path_factory.mktemp("qwen2vl"), tmp_path_factory.mktemp("videoreward")
    syms = _byte_symbols()
    tok = Qwen2Tokenizer(vocab={s: i for i, s in enumerate(syms + ["ca", "cat"])}, merges=[("c", "a"), ("ca", "t")])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                          "<|vision_end|>", "<|video_pad|>"]})
    tok.chat_template = VA_CHAT
    tok.save_pretrained(base)
    ids = tok.convert_tokens_to_ids(["<|video_pad|>", "<|vision_start|>", "<|vision_end|>"])
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, tie_word_embeddings=True),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=299, video_token_id=ids[0], vision_start_token_id=ids[1], vision_end_token_id=ids[2],
    )
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(base)
    (base / "preprocessor_config.json").write_text(json.dumps({
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}))

    # the trained reward model: resized embeddings (trained), LoRA on the decoder, a reward head
    model.resize_token_embeddings(len(tok) + len(SPECIAL_TOKENS))
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(0.1 * torch.randn_like(model.get_input_embeddings().weight))
    ref = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    head = torch.randn(1, 32) * 0.5
    ckpt_a, ckpt_b = root / "checkpoint-100", root / "checkpoint-50"
    ckpt_a.mkdir(), ckpt_b.mkdir()
    full = {_legacy(k): v.clone() for k, v in ref.state_dict().items()}  # lm_head included, as saved
    full["base_model.model.rm_head.weight"] = head
    torch.save(full, ckpt_a / "model.pth")
    adapter = {_legacy(k): v.clone().contiguous() for k, v in get_peft_model_state_dict(ref).items()}
    save_file(adapter, str(ckpt_b / "adapter_model.safetensors"))
    torch.save({"base_model.model.model.embed_tokens.weight": model.get_input_embeddings().weight.detach().clone(),
                "base_model.model.rm_head.weight": head}, ckpt_b / "non_lora_state_dict.pth")
    (root / "model_config.json").write_text(json.dumps({
        "data_config": {"fps": 2.0, "num_frames": None, "max_frame_pixels": 448 * 448, "sample_type": "uniform",
                        "prompt_template_type": "detailed_special", "eval_dim": ["VQ", "MQ", "TA"]},
        "model_config": {"output_dim": 1, "use_special_tokens": True, "reward_token": "special"},
        "peft_lora_config": {"lora_enable": True, "lora_r": 4, "lora_alpha": 8, "use_rslora": False},
        "inference_config": VA_INFERENCE,
    }))
    (root / "template.txt").write_text(VA_TEMPLATE)
    return base, root, ref.eval(), head


def _videoalign(base, root, **kw):
    return build_reward("videoalign", path=str(root), base_path=str(base),
                        prompt_template_path=str(root / "template.txt"), **kw)


def videos(b=2, f=16, h=64, w=64, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b * f, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return x.view(b, f, 3, h, w).transpose(1, 2).clamp(0, 1)  # [b, 3, f, h, w]


def _videoalign_reference(ref, head, inputs, positions: bool):
    """The PEFT model (LoRA unmerged) through transformers' own multimodal forward, pooled at the reward
    tokens; ``positions``: VideoAlign's sequential positions (else Qwen2-VL's 3D video positions)."""
    ids = inputs["input_ids"]
    pos = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1) if positions else None
    video_type = 2 * (ids == ref.base_model.model.config.video_token_id).int()  # text 0, video 2
    out = ref.base_model.model.model(input_ids=ids, attention_mask=inputs["attention_mask"], position_ids=pos,
                                     mm_token_type_ids=video_type,
                                     pixel_values_videos=inputs["pixel_values_videos"],
                                     video_grid_thw=inputs["video_grid_thw"], use_cache=False)
    logits = (out.last_hidden_state @ head.T).squeeze(-1)  # [b, L]
    raw = torch.stack([logits[ids == i] for i in ref.base_model.model.special_ids], dim=1)  # [b, 3]
    mean = torch.tensor([VA_INFERENCE[f"{d}_mean"] for d in ("VQ", "MQ", "TA")])
    std = torch.tensor([VA_INFERENCE[f"{d}_std"] for d in ("VQ", "MQ", "TA")])
    return (raw - mean) / std


@pytest.mark.parametrize("step", [100, 50])  # 100: full model.pth; 50: adapter + non-LoRA weights
def test_videoalign_matches_peft_reference(videoalign_files, step):
    base, root, ref, head = videoalign_files
    x, prompts = videos(), ["a cat", "cat cat"]
    scorer = _videoalign(base, root, checkpoint_step=step)
    assert scorer.names == ("videoalign/vq", "videoalign/mq", "videoalign/ta")
    s = scorer(x, prompts)  # [B, 3] from one model run
    assert s.shape == (2, 3) and s.dtype == torch.float32 and torch.isfinite(s).all()
    inputs = scorer.prepare(x, prompts)
    assert inputs["video_grid_thw"].tolist() == [[2, 24, 24]] * 2  # 4 frames of 336x336
    ref.base_model.model.special_ids = scorer.tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    with torch.no_grad():
        expect = _videoalign_reference(ref, head, inputs, positions=True)
        mrope = _videoalign_reference(ref, head, inputs, positions=False)
    torch.testing.assert_close(s, expect, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expect, mrope, atol=1e-3)  # the position convention is visible to this test


def test_videoalign_options_and_errors(videoalign_files, tmp_path):
    base, root, _, _ = videoalign_files
    with pytest.raises(FileNotFoundError, match=r"reward 'videoalign'.*options\.base_path"):
        build_reward("videoalign", path=str(root), base_path=str(tmp_path / "none"),
                     prompt_template_path=str(root / "template.txt"))
    (tmp_path / "t.txt").write_text("no tokens here {text_prompt}")
    with pytest.raises(ValueError, match="must hold"):
        build_reward("videoalign", path=str(root), base_path=str(base), prompt_template_path=str(tmp_path / "t.txt"))
    with pytest.raises(FileNotFoundError, match=r"checkpoint-7.*have steps \[50, 100\]"):
        _videoalign(base, root, checkpoint_step=7)
    r = _videoalign(base, root, checkpoint_step=100)
    with pytest.raises(ValueError, match=r"expects videos \[B, C, F, H, W\]"):
        r(images(2), ["a", "b"])
    raw = _videoalign(base, root, checkpoint_step=100, normalize=False, batch_size=1)(videos(), ["a cat", "cat"])
    z = r(videos(), ["a cat", "cat"])
    mean = torch.tensor([VA_INFERENCE[f"{d}_mean"] for d in ("VQ", "MQ", "TA")])
    std = torch.tensor([VA_INFERENCE[f"{d}_std"] for d in ("VQ", "MQ", "TA")])
    torch.testing.assert_close(z, (raw - mean) / std, atol=1e-4, rtol=1e-4)
    ta = _videoalign(base, root, checkpoint_step=100, columns=["TA"])
    assert ta.names == ("videoalign/ta",)
    torch.testing.assert_close(ta(videos(), ["a cat", "cat"]), z[:, 2], atol=1e-5, rtol=1e-5)  # one column: [B]
    z16 = _videoalign(base, root, checkpoint_step=100, dtype="bfloat16")(videos(), ["a cat", "cat"])
    assert z16.dtype == torch.float32
    torch.testing.assert_close(z16, z, atol=0.05, rtol=0.05)
