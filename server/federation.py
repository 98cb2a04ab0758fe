"""One federated training job (method x seed) as the ServerApp runs it.

Builds the server's reference model (fingerprints, initial payload, LoRA scalings), resumes
from the last completed round when asked, and drives :class:`SavltStrategy`, which
checkpoints every round under the run directory. The method's registry entry supplies the
hospitals' loss terms for every round's plan.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from savlt_model.budget import local_steps
from savlt_model.calibration import (
    Calibration,
    calibration_from_dict,
    calibration_to_dict,
    fit_calibrations,
)
from savlt_model.config import Config
from savlt_model.errors import SavltError
from savlt_model.evaluation import Evaluate
from savlt_model.messages import RoundPlan
from savlt_model.methods import get_method
from savlt_model.model.adapters import lora_scalings, trainable_state
from savlt_model.model.build import build_model
from server.accounting import privacy_spent
from server.calibration import federated_calibration_sums
from server.privacy import epsilon_line, with_privacy
from server.strategy import RoundLog, SavltStrategy, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class FederatedJob:
    cfg: Config
    method: str
    seed: int
    out_dir: Path
    resume: bool = False
    # node id -> the dataset size its operator registered (a FedAvg weight uses at most it)
    registered: dict[str, int] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.method}_seed{self.seed}"

    @property
    def checkpoint(self) -> Path:
        return self.out_dir / "checkpoints" / f"{self.tag}.safetensors"

    @property
    def adapter_file(self) -> Path:
        return self.out_dir / "adapters" / f"{self.tag}.safetensors"

    @property
    def result_file(self) -> Path:
        return self.out_dir / "jobs" / f"{self.tag}.json"


def run_federated(grid: Grid, job: FederatedJob, evaluate: Evaluate | None = None) -> dict:
    """Train and checkpoint every round; returns the job summary (:func:`job_summary`).

    ``evaluate`` is the centralised evaluation, injected by whoever starts the ServerApp
    (:func:`savlt_model.evaluation.centre_evaluator`): the server itself never reads an image.
    """
    cfg, method, seed = job.cfg, job.method, job.seed
    terms = get_method(method).losses(cfg.methods)
    class_means = get_method(method).wants_class_means(cfg.methods)
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
            terms,
            feature_centring=cfg.fl.feature_centring,
            class_means=class_means,
        )

    loaded = load_checkpoint(job.checkpoint) if job.resume else None
    if loaded:
        state, done, history = loaded
        log.info("%s: resuming after round %d of %d", job.tag, done, cfg.fl.rounds)
    else:
        state, done, history = trainable_state(reference), 0, RoundLog()

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        round_ = done + server_round
        if server_round == 0 and done:  # already scored before the restart
            return None
        every = cfg.fl.eval_every
        if round_ != cfg.fl.rounds and (every == 0 or round_ % every):
            return None  # curves at the rounds asked for; the last round is always scored
        scores = evaluate(arrays.to_torch_state_dict())
        flat = {}
        for center, s in scores.items():
            history.evals.append(
                {
                    "method": method,
                    "center": center,
                    "round": round_,
                    **{k: s.metrics[k] for k in ("acc_multiclass", "acc_binary", "auc_binary")},
                }
            )
            flat[f"{center}-acc_multiclass"] = s.metrics["acc_multiclass"]
        if server_round:  # persist the curves together with the state they describe
            save_checkpoint(job.checkpoint, arrays.to_torch_state_dict(), round_, history)
        return MetricRecord(flat)

    strategy = SavltStrategy(
        plan_for=plan_for,
        scalings=lora_scalings(reference),
        anchors=reference.anchors.detach().cpu(),
        checkpoint=job.checkpoint,
        start_round=done,
        history=history,
        num_hospitals=cfg.fl.hospitals,
        min_hospitals=cfg.fl.min_hospitals or cfg.fl.hospitals,
        client_eval=cfg.fl.client_eval,
        fraction_train=cfg.fl.fraction_train,
        registered=job.registered,
    )
    if done < cfg.fl.rounds:
        with_privacy(strategy, cfg, method).start(
            grid=grid,
            initial_arrays=ArrayRecord(state),
            num_rounds=cfg.fl.rounds - done,
            timeout=cfg.fl.round_timeout,
            evaluate_fn=evaluate_global if evaluate else None,
        )
    calibrate_job(grid, job, plan_for(cfg.fl.rounds), reference.anchors.shape)
    summary = job_summary(job)[1]
    if summary["privacy"] is not None:
        print(f"{job.tag}: central DP {epsilon_line(summary['privacy'])}")
    return summary


def calibrate_job(grid: Grid, job: FederatedJob, plan: RoundPlan, anchors: torch.Size) -> None:
    """Fit the final global model's calibrations with the hospitals (server.calibration) and
    checkpoint them with it; a resumed job that already has them is left as it is."""
    final = load_checkpoint(job.checkpoint)
    if final is None or final[2].calibration is not None:
        return
    state, rounds, history = final

    def event(node: str, kind: str, reason: str) -> None:
        log.warning("calibration: %s from node %s: %s", kind, node, reason)
        history.events.append({"round": rounds, "node": node, "event": kind, "reason": reason})

    n_classes, dim = anchors
    sums = federated_calibration_sums(
        grid, state, plan.to_record(), dim, n_classes, job.cfg.fl.round_timeout, event
    )
    if sums is None:
        log.warning("%s: no hospital sent validation sums; the model stays uncalibrated", job.tag)
        history.calibration = {"inductive": None, "recentred": None}
    else:
        inductive, recentred = fit_calibrations(sums, job.cfg.calibration)
        history.calibration = {
            "inductive": calibration_to_dict(inductive),
            "recentred": None if recentred is None else calibration_to_dict(recentred),
        }
    save_checkpoint(job.checkpoint, state, rounds, history)


def job_calibrations(summary: dict) -> tuple[Calibration, Calibration | None] | None:
    """(inductive, re-centring) calibrations of a finished job, or None (uncalibrated)."""
    cal = summary.get("calibration") or {}
    if cal.get("inductive") is None:
        return None
    recentred = cal.get("recentred")
    return (
        calibration_from_dict(cal["inductive"]),
        None if recentred is None else calibration_from_dict(recentred),
    )


def job_summary(job: FederatedJob) -> tuple[dict[str, torch.Tensor], dict]:
    """(final global state, summary) of a job from its last checkpoint.

    The summary holds the per-round history, the server's per-round scores (``curves``),
    refused or failed hospitals (``events``), the bytes moved and, with central DP, the
    (epsilon, delta) spent over the rounds done (``privacy``); scoring the final model
    is the caller's (:mod:`reporting.finish`, or the ``flwr run`` ServerApp's log).
    """
    final = load_checkpoint(job.checkpoint)
    if final is None:
        raise SavltError(
            f"{job.tag}: no round completed (every hospital failed?); no global adapter written. "
            "See the log for the hospitals' errors"
        )
    state, rounds_done, history = final
    summary = {
        "method": job.method,
        "seed": job.seed,
        "rounds": rounds_done,
        "upload_bytes": max((r["upload-bytes"] for r in history.rows), default=0),
        "download_bytes": max((r["download-bytes"] for r in history.rows), default=0),
        "history": history.rows,
        "curves": history.evals,
        "events": history.events,
        "calibration": history.calibration,
        "privacy": None
        if job.cfg.privacy.mode == "none"
        else privacy_spent(job.cfg.privacy, rounds_done),
    }
    return state, summary
