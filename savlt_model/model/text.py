"""Class descriptions and the text side of SAVLT.

The descriptions live in ``configs/prompts/*.yaml`` (several prompt sets per file). Encoded by
the frozen text tower and L2-normalised they are the *text anchors* T (C x d): identical at
every hospital, hence the centre-invariant reference of the federated design.
"""

from __future__ import annotations

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
