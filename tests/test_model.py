"""The SAVLT model on real open_clip + peft: what trains, what is uploaded, what loads."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from savlt_model.config import load_config
from savlt_model.errors import SavltError
from savlt_model.model.adapters import load_trainable_state, payload_parameters, trainable_state
from savlt_model.model.backbone import load_backbone
from savlt_model.model.savlt import SavltModel


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("savlt-tiny")


def _cfg(*overrides: str):
    return load_config(None, ["model.lora.last_n_blocks=2", *overrides])


def test_only_adapters_prototypes_pooling_and_projection_train(tiny):
    model = SavltModel(_cfg("model.prompt_context=4", "model.lora.text=true"), tiny)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = set()
    for name in trainable:
        if ".lora_A." in name or ".lora_B." in name:
            kinds.add(
                "text-lora"
                if name.startswith("clip.base_model.model.transformer")
                else "vision-lora"
            )
            continue
        assert name in {
            "clip.base_model.model.visual.proj",
            "prototypes",
            "roi_pool.query",
            "roi_pool.proj.weight",
            "roi_pool.proj.bias",
            "text.ctx",
        }, name
    assert kinds == {"text-lora", "vision-lora"}
    # vision LoRA only in the last 2 of 6 blocks, on the q/k/v and output projection Linears
    vision = sorted({n.split(".attn")[0] for n in trainable if "visual.transformer" in n})
    assert [v.rsplit(".", 1)[1] for v in vision] == ["4", "5"]
    layers = {n.split(".attn.")[1].split(".")[0] for n in trainable if "visual.transformer" in n}
    assert layers == {"qkv", "out_proj"}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("visual.transformer.resblocks.0.attn.in_proj_weight" in n for n in frozen)
    assert any("visual.transformer.resblocks.5.attn.qkv.base_layer.weight" in n for n in frozen)
    assert any(n.endswith("token_embedding.weight") for n in frozen)


def test_text_lora_uses_its_own_rank(tiny):
    model = SavltModel(_cfg("model.lora.text=true", "model.lora.r=8", "model.lora.text_r=2"), tiny)
    shapes = {k: tuple(v.shape) for k, v in trainable_state(model).items()}
    text_a = [s for k, s in shapes.items() if k.startswith("clip.transformer") and "lora_A" in k]
    vis_a = [s for k, s in shapes.items() if k.startswith("clip.visual") and "lora_A" in k]
    assert text_a and all(s[0] == 2 for s in text_a)
    assert vis_a and all(s[0] == 8 for s in vis_a)


def test_payload_round_trip_reproduces_outputs(tiny):
    cfg = _cfg("model.lora.dropout=0.0")
    torch.manual_seed(0)
    a, b = SavltModel(cfg, tiny), SavltModel(cfg, tiny)
    with torch.no_grad():  # make every trainable tensor non-trivial (LoRA B starts at zero)
        for p in payload_parameters(a).values():
            p.add_(torch.randn_like(p) * 0.05)
    images = torch.randn(3, 3, 128, 128)
    assert not torch.allclose(a(images).logits, b(images).logits)
    state = trainable_state(a)
    assert set(state) == set(payload_parameters(b))
    load_trainable_state(b, state)
    torch.testing.assert_close(a.eval()(images).logits, b.eval()(images).logits)


def test_payload_rejects_wrong_keys_and_shapes(tiny):
    model = SavltModel(_cfg(), tiny)
    state = trainable_state(model)
    with pytest.raises(SavltError, match="missing"):
        load_trainable_state(model, {k: v for k, v in state.items() if k != "prototypes"})
    bad = dict(state, prototypes=torch.zeros(2, 2))
    with pytest.raises(SavltError, match="shape"):
        load_trainable_state(model, bad)


def test_payload_is_small_for_vit_b16():
    """The federated upload: under 2% of ViT-B/16's parameters and under 1% of its bytes."""
    backbone = load_backbone("ViT-B-16")
    total = sum(p.numel() for p in backbone.model.parameters())
    model = SavltModel(load_config(None), backbone)
    state = trainable_state(model)
    payload = sum(t.numel() for t in state.values())
    payload_bytes = sum(t.numel() * t.element_size() for t in state.values())
    model_bytes = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    assert 140e6 < total < 160e6
    assert payload / total < 0.02
    assert payload_bytes / model_bytes < 0.01
    assert any(".lora_A." in k for k in state)


def test_local_checkpoint_file_loads(tiny, tmp_path):
    other = load_backbone("savlt-tiny", init_seed=7)
    assert other.fingerprint != tiny.fingerprint
    path = tmp_path / "tiny.pt"
    torch.save(other.model.state_dict(), path)
    loaded = load_backbone("savlt-tiny", str(path))
    assert loaded.fingerprint == other.fingerprint
    assert loaded.weights == str(path)


def test_random_init_is_deterministic_and_warns(caplog):
    with caplog.at_level("WARNING"):
        a = load_backbone("savlt-tiny")
    assert "randomly initialised" in caplog.text
    assert load_backbone("savlt-tiny").fingerprint == a.fingerprint


@pytest.mark.parametrize(
    ("name", "pretrained", "message"),
    [
        ("no-such-model", None, "unknown open_clip model"),
        ("savlt-tiny", "/nonexistent/weights.pt", "does not exist"),
        ("savlt-tiny", "laion2b_s34b_b79k", "not an open_clip tag"),
    ],
)
def test_bad_backbone_settings_are_named(name, pretrained, message):
    with pytest.raises(SavltError, match=message):
        load_backbone(name, pretrained)


def test_timm_vision_tower_works(tmp_path):
    """BiomedCLIP's vision tower is a timm ViT; an offline timm config exercises that path."""
    cfg = {
        "embed_dim": 64,
        "vision_cfg": {
            "timm_model_name": "vit_tiny_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 1,
        },
    }
    (tmp_path / "timm-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "timm-tiny-test.json")
    backbone = load_backbone("timm-tiny-test")
    model = SavltModel(load_config(None, ["model.name=timm-tiny-test"]), backbone)
    names = set(trainable_state(model))
    assert any("trunk.blocks.11.attn.qkv.lora_A" in n for n in names)
    assert any("visual.head.proj" in n for n in names)
    out = model(torch.randn(2, 3, 224, 224))
    assert out.logits.shape == (2, 5)
    out.logits.sum().backward()


def test_loss_uses_both_branches(tiny):
    model = SavltModel(_cfg("model.align_weight=0.5"), tiny)
    images, labels = torch.randn(4, 3, 128, 128), torch.tensor([0, 1, 2, 3])
    out = model(images)
    expected = 0.5 * torch.nn.functional.cross_entropy(out.text_logits, labels) + 0.5 * (
        torch.nn.functional.cross_entropy(out.proto_logits, labels)
    )
    torch.testing.assert_close(model.loss(out, labels), expected)
    assert model.loss(out, labels, anchor_weight=1.0) > model.loss(out, labels)
    torch.testing.assert_close(out.logits, 0.5 * out.text_logits + 0.5 * out.proto_logits)


def test_cached_model_takes_successive_global_states_exactly(tiny):
    """Reusing one model across rounds equals rebuilding it, FedEx residuals included (dense
    in one round, as low-rank factors in the next)."""
    from savlt_model.model.adapters import residual_targets

    cfg = _cfg("model.lora.dropout=0.0")
    reused = SavltModel(cfg, tiny).eval()
    targets = residual_targets(reused)
    torch.manual_seed(1)

    def state_with_residuals(scale: float, rank: int = 0) -> dict:
        state = {k: v + scale * torch.randn_like(v) for k, v in trainable_state(reused).items()}
        for k, (w, _) in targets.items():
            if rank:
                state[k + ".B"] = scale * torch.randn(w.shape[0], rank)
                state[k + ".A"] = torch.randn(rank, w.shape[1])
            else:
                state[k] = scale * torch.randn_like(w)
        return state

    first, second = state_with_residuals(0.01), state_with_residuals(0.02, rank=5)
    reused.load_global_state(first)
    reused.train()  # a training forward: peft's merge/unmerge nudges the frozen weights
    reused(torch.randn(2, 3, 128, 128)).logits.sum().backward()
    reused.eval().load_global_state(second)
    fresh = SavltModel(cfg, tiny).eval()
    fresh.load_global_state(second)
    images = torch.randn(2, 3, 128, 128)
    torch.testing.assert_close(reused(images).logits, fresh(images).logits)


def test_server_scalings_match_what_the_model_applies(tiny):
    """A residual of -s·B·A per layer (s from lora_scalings) must cancel the LoRA exactly.

    This is what makes the FedEx aggregation exact; it also catches a delta applied more
    than once (peft 0.21 does so for a MultiheadAttention out_proj, hence LinearAttention).
    """
    from savlt_model.model.adapters import lora_pairs, lora_scalings

    cfg = _cfg("model.lora.dropout=0.0")
    model = SavltModel(cfg, tiny).eval()
    plain = SavltModel(cfg, tiny).eval()
    torch.manual_seed(2)
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in trainable_state(model).items()}
    without_lora = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in state.items()}
    scalings = lora_scalings(model)
    for prefix, a_key, b_key in lora_pairs(list(state)):
        state[f"residual.{prefix}"] = -scalings[prefix] * state[b_key] @ state[a_key]
    model.load_global_state(state)
    plain.load_global_state(without_lora)
    images = torch.randn(2, 3, 128, 128)
    torch.testing.assert_close(model(images).logits, plain(images).logits, atol=1e-4, rtol=1e-4)


def test_prototype_lr_scale_moves_only_the_prototypes_faster(tiny):
    """One AdamW step: the prototypes move lr_scale times as far (Adam's first step is
    lr * g / |g| per element), every other tensor exactly as with the shared lr."""
    from torch.utils.data import TensorDataset

    from savlt_model.train import train_steps

    images = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(images, torch.arange(8) % 5)
    moved = {}
    for scale in (1.0, 50.0):
        cfg = _cfg(f"train.prototype_lr_scale={scale}", "train.batch_size=8")
        torch.manual_seed(0)  # the same prototypes and projection start for both
        model = SavltModel(cfg, tiny)
        before = trainable_state(model)
        train_steps(model, data, cfg, steps=1, seed=0)
        after = trainable_state(model)
        moved[scale] = {k: after[k] - before[k] for k in before}
    ratio = moved[50.0]["prototypes"].abs().mean() / moved[1.0]["prototypes"].abs().mean()
    assert ratio == pytest.approx(50.0, rel=0.02)
    for key, delta in moved[1.0].items():
        if key != "prototypes":
            assert torch.equal(delta, moved[50.0][key]), key


def test_ffa_freezes_a_from_the_seed_alone(tiny):
    """FFA-LoRA: A is drawn from the seed and the layer name (not the global RNG), frozen, and
    left out of the payload; B is trained and sent."""
    from savlt_model.model.adapters import freeze_lora_a, frozen_lora_a

    cfg = _cfg("fl.lora_aggregation=ffa")
    models = []
    for rng_state in (0, 1):  # whatever the global RNG did before, the same A
        torch.manual_seed(rng_state)
        model = SavltModel(cfg, tiny)
        freeze_lora_a(model, 42)
        models.append(model)
    a0, a1 = frozen_lora_a(models[0]), frozen_lora_a(models[1])
    assert a0 and a0.keys() == a1.keys()
    assert all(torch.equal(a0[k], a1[k]) for k in a0)
    assert len({float(v.sum()) for v in a0.values()}) == len(a0)  # each layer its own draw
    payload = trainable_state(models[0])
    assert not any(".lora_A." in k for k in payload)
    assert any(".lora_B." in k for k in payload)
    freeze_lora_a(models[1], 43)
    assert not torch.equal(next(iter(frozen_lora_a(models[1]).values())), next(iter(a0.values())))
