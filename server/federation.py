"""One federated training job (method x seed) as the ServerApp runs it.

Builds the server's reference model (fingerprints, initial payload, LoRA scalings), resumes
from the last completed round when asked, drives :class:`SavltStrategy`, scores the final
global adapter and writes everything under the run directory.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from savlt_model.adapters import lora_scalings, trainable_state
from savlt_model.atomic import write_json
from savlt_model.central import adapter_meta
from savlt_model.checkpoint import save_adapter
from savlt_model.config import Config
from savlt_model.errors import SavltError
from savlt_model.evaluation import save_figures, score_centers
from savlt_model.protocol import data_root, is_synthetic
from savlt_model.results import make_record
from savlt_model.train import build_model, cached_model, image_sets
from savlt_model.wire import RoundPlan
from server.strategy import (
    RoundLog,
    SavltStrategy,
    load_checkpoint,
    save_checkpoint,
    with_privacy,
)
from simulation.protocols import build_protocol

log = logging.getLogger(__name__)


@dataclass
class FederatedJob:
    cfg: Config
    method: str
    seed: int
    out_dir: Path
    resume: bool = False

    @property
    def tag(self) -> str:
        return f"{self.method}_seed{self.seed}"

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoints" / f"{self.tag}.safetensors"

    @property
    def result_file(self) -> Path:
        return self.out_dir / "jobs" / f"{self.tag}.json"


def local_steps(cfg: Config) -> int:
    """Per-round local steps; by default the centralised budget is shared by all hospitals."""
    if cfg.fl.local_steps:
        return cfg.fl.local_steps
    return max(1, math.ceil(cfg.total_iterations / (cfg.fl.rounds * cfg.fl.hospitals)))


def run_federated(grid: Grid, job: FederatedJob) -> dict:
    """Train, checkpoint every round, score the final global model; returns the job summary."""
    cfg, method, seed = job.cfg, job.method, job.seed
    reference = build_model(cfg, seed)
    steps = local_steps(cfg)

    def plan_for(round_: int) -> RoundPlan:
        return RoundPlan(
            cfg,
            method,
            seed,
            round_,
            steps,
            steps * cfg.fl.rounds,
            reference.backbone_fingerprint,
            reference.anchor_fingerprint,
        )

    loaded = load_checkpoint(job.checkpoint) if job.resume else None
    if loaded:
        state, done, history = loaded
        log.info("%s: resuming after round %d of %d", job.tag, done, cfg.fl.rounds)
    else:
        state, done, history = trainable_state(reference), 0, RoundLog()
    tests = (
        image_sets(cfg, build_protocol(cfg, seed).tests, train=False) if cfg.fl.server_eval else {}
    )

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        round_ = done + server_round
        if server_round == 0 and done:  # already scored before the restart
            return None
        model = cached_model(cfg, seed)
        model.load_global_state(arrays.to_torch_state_dict())
        scores = score_centers(model, tests, cfg.train.eval_batch_size)
        flat = {}
        for center, s in scores.items():
            history.evals.append(
                {
                    "method": method,
                    "center": center,
                    "round": round_,
                    **{k: s.metrics[k] for k in ("acc_5class", "acc_binary", "auc_binary")},
                }
            )
            flat[f"{center}-acc_5class"] = s.metrics["acc_5class"]
        if server_round:  # persist the curves together with the state they describe
            save_checkpoint(job.checkpoint, arrays.to_torch_state_dict(), round_, history)
        return MetricRecord(flat)

    strategy = SavltStrategy(
        plan_for=plan_for,
        scalings=lora_scalings(reference),
        checkpoint=job.checkpoint,
        start_round=done,
        history=history,
        num_hospitals=cfg.fl.hospitals,
        min_hospitals=cfg.fl.min_hospitals or cfg.fl.hospitals,
        client_eval=cfg.fl.client_eval,
        fraction_train=cfg.fl.fraction_train,
    )
    if done < cfg.fl.rounds:
        with_privacy(strategy, cfg, method).start(
            grid=grid,
            initial_arrays=ArrayRecord(state),
            num_rounds=cfg.fl.rounds - done,
            timeout=cfg.fl.round_timeout,
            evaluate_fn=evaluate_global if tests else None,
        )
    final = load_checkpoint(job.checkpoint)
    if final is None:
        raise SavltError(
            f"{job.tag}: no round completed (every hospital failed?); no global adapter written. "
            "See the log for the hospitals' errors"
        )
    state, rounds_done, history = final
    model = cached_model(cfg, seed)
    model.load_global_state(state)
    upload = max((r["upload-bytes"] for r in history.rows), default=0)
    summary = {
        "method": method,
        "seed": seed,
        "rounds": rounds_done,
        "upload_bytes": upload,
        "download_bytes": max((r["download-bytes"] for r in history.rows), default=0),
        "history": history.rows,
        "curves": history.evals,
        "events": history.events,
        "records": [],
    }
    if tests:
        scores = score_centers(model, tests, cfg.train.eval_batch_size)
        synthetic = is_synthetic(data_root(cfg))
        summary["records"] = [
            make_record(
                method,
                c,
                seed,
                cfg.data.shots,
                s.metrics,
                protocol=cfg.fl.protocol,
                rounds=rounds_done,
                upload_bytes=upload,
            )
            for c, s in scores.items()
        ]
        save_figures(scores, model, job.out_dir / "figures", job.tag, synthetic)
    save_adapter(
        job.out_dir / "adapters" / f"{job.tag}.safetensors",
        state,
        adapter_meta(model, cfg, method=method, seed=seed, rounds=rounds_done),
    )
    write_json(job.result_file, summary)
    return summary
