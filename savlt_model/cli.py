"""``savlt``: the one command-line entry point.

Every subcommand follows config -> data -> model -> training -> results. A
:class:`SavltError` ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from savlt_model.errors import SavltError

log = logging.getLogger("savlt")


def setup_logging(out_dir: Path | None, verbose: bool) -> None:
    """Console at INFO (DEBUG with -v); the run directory also gets a full log file."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [console]
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out_dir / "savlt.log", encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "fsspec", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("configs/default.yaml"), help="YAML config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set data.shots=32 (repeatable)",
    )
    p.add_argument("--out", type=Path, required=True, help="run directory for results")


def cmd_synth(args: argparse.Namespace) -> None:
    from savlt_model.synth import generate

    summary = generate(args.out, seed=args.seed, scale=args.scale)
    counts = summary.get("counts", {})
    print(
        f"Synthetic data (not clinical) written to {args.out}: "
        + ", ".join(f"{c}={sum(v.values())}" for c, v in counts.items())
    )


def _start_run(args: argparse.Namespace):
    from savlt_model.atomic import write_text
    from savlt_model.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    write_text(args.out / "config.yaml", dump_config(cfg))
    return cfg


def _report(records: list[dict], out: Path, cfg, title: str) -> None:
    from savlt_model.protocol import data_root, is_synthetic
    from savlt_model.results import format_table, write_results, write_summary

    synthetic = is_synthetic(data_root(cfg))
    write_results(out / "results.json", records)
    write_summary(out / "summary.json", records, {"title": title, "synthetic": synthetic})
    print(format_table(records, title=title, synthetic=synthetic))
    print(f"Results: {out / 'results.json'}")


def cmd_train(args: argparse.Namespace) -> None:
    from savlt_model.central import run_central

    cfg = _start_run(args)
    records = run_central(cfg, args.out)
    _report(records, args.out, cfg, f"Centralised SAVLT, K={cfg.data.shots}, seeds {cfg.seeds}")


def cmd_simulate(args: argparse.Namespace) -> None:
    from simulation.runner import run_simulate

    cfg = _start_run(args)
    records = run_simulate(cfg, args.out, resume=args.resume)
    _report(
        records,
        args.out,
        cfg,
        f"SAVLT {cfg.fl.protocol} protocol, {cfg.fl.hospitals} hospitals, {cfg.fl.rounds} rounds, "
        f"K={cfg.data.shots}, seeds {cfg.seeds}",
    )


def cmd_roi_train(args: argparse.Namespace) -> None:
    from savlt_model.roi_unet import train_unet

    report = train_unet(args.data, args.out, epochs=args.epochs, size=args.size, seed=args.seed)
    print(f"U-Net written to {args.out}; " + ", ".join(f"{k}={v}" for k, v in report.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="savlt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on the console")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic multi-centre cervical OCT DATA folder")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="images per class multiplier")
    p.set_defaults(func=cmd_synth, log_dir=None)

    p = sub.add_parser("train", help="centralised SAVLT on the original protocol")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "simulate", help="federated simulation with centralised and local baselines (Flower)"
    )
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(func=cmd_simulate)

    roi = sub.add_parser("roi", help="tissue-mask tools").add_subparsers(
        dest="roi_command", required=True
    )
    p = roi.add_parser("train", help="train the U-Net tissue segmenter on a DATA folder with masks")
    p.add_argument("--data", type=Path, required=True, help="DATA folder (e.g. from savlt synth)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file (.safetensors)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_roi_train, log_dir=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_dir = getattr(args, "log_dir", args.out if hasattr(args, "out") else None)
    setup_logging(log_dir, args.verbose)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except SavltError as exc:
        print(f"savlt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("savlt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
