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
from savlt_model.methods import describe, federated_methods

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
    # Flower prints to the console with its own handler; send its records to our log file
    # too, but not a second time to the console.
    flwr_log = logging.getLogger("flwr")
    flwr_log.propagate = False
    flwr_log.handlers[:] = [h for h in flwr_log.handlers if not isinstance(h, logging.FileHandler)]
    if out_dir is not None:
        flwr_log.addHandler(fh)
    for noisy in (
        "PIL",
        "matplotlib",
        "urllib3",
        "filelock",
        "fsspec",
        "httpx",
        "huggingface_hub",
        "alembic",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config_args(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--config", type=Path, default=Path("configs/default.yaml"), help="YAML config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set data.shots=32 (repeatable)",
    )
    if out:
        p.add_argument("--out", type=Path, required=True, help="run directory for results")


def _bad_file_arg(p: argparse.ArgumentParser) -> None:
    """The inference commands' bad-file policy (training reads it from data.on_bad_file)."""
    p.add_argument(
        "--on-bad-file",
        choices=("stop", "skip"),
        default="stop",
        help="a missing or unreadable image stops the command (default) or is skipped, "
        "counted and warned about",
    )


def cmd_synth(args: argparse.Namespace) -> None:
    from synthetic.write import add_family_centres, generate

    if args.held_out_family:  # adds to an existing DATA folder (made here if absent)
        if not args.out.exists():
            generate(args.out, seed=args.seed, scale=args.scale)
        written = add_family_centres(
            args.out, args.held_out_family, args.family_seed, args.seed, args.scale
        )
        print(
            f"Held-out style family {args.family_seed} (synthetic, test-only) in {args.out}: "
            f"{len(written)} centre(s) written, {args.held_out_family - len(written)} already there"
        )
        return
    summary = generate(args.out, seed=args.seed, scale=args.scale)
    counts = summary.get("counts", {})
    print(
        f"Synthetic data (not clinical) written to {args.out}: "
        + ", ".join(f"{c}={sum(v.values())}" for c, v in counts.items())
    )


def _start_run(args: argparse.Namespace):
    from savlt_model.atomic import write_text
    from savlt_model.config import dump_config, load_config, with_key

    cfg = load_config(args.config, args.overrides)
    if cfg.data.work_dir is None:  # the run's splits and few-shot draws, next to its results
        cfg = with_key(cfg, "data.work_dir", str((args.out / "work").resolve()))
    write_text(args.out / "config.yaml", dump_config(cfg))
    return cfg


def _report(records: list[dict], out: Path, cfg, title: str) -> None:
    from reporting.results import format_table, write_results, write_summary
    from reporting.tensorboard import write_run_events
    from savlt_model.config import dump_config
    from savlt_model.data.protocol import data_root, is_synthetic

    synthetic = is_synthetic(data_root(cfg))
    write_results(out / "results.json", records)
    write_summary(out / "summary.json", records, {"title": title, "synthetic": synthetic})
    table = format_table(records, title=title, synthetic=synthetic)
    print(table)
    print(f"Results: {out / 'results.json'}")
    if cfg.tracking.tensorboard:
        write_run_events(out, table, dump_config(cfg))
        print(f"TensorBoard: tensorboard --logdir {out}")


def cmd_train(args: argparse.Namespace) -> None:
    from reporting.report import write_report
    from simulation.baselines import run_central

    cfg = _start_run(args)
    records = run_central(cfg, args.out)
    _report(records, args.out, cfg, f"Centralised SAVLT, K={cfg.data.shots}, seeds {cfg.seeds}")
    print(f"Report: {write_report(args.out)}")


def cmd_simulate(args: argparse.Namespace) -> None:
    from reporting.report import write_report
    from simulation.runner import run_simulate

    cfg = _start_run(args)
    records = run_simulate(cfg, args.out, resume=args.resume)
    _report(
        records,
        args.out,
        cfg,
        f"SAVLT {cfg.fl.partition} partition, {cfg.fl.hospitals} hospitals, "
        f"{cfg.fl.rounds} rounds, "
        f"K={cfg.data.shots}, seeds {cfg.seeds}",
    )
    print(f"Report: {write_report(args.out)}")


def cmd_federation_config(args: argparse.Namespace) -> None:
    from savlt_model.config import load_config
    from simulation.resources import actor_resources

    cfg = load_config(args.config, args.overrides)
    print(actor_resources(cfg, cfg.seeds[0]).federation_config(cfg.fl.hospitals))


def cmd_export(args: argparse.Namespace) -> None:
    from tools.export import export_model

    out = export_model(args.run, args.out, method=args.method, seed=args.seed)
    print(
        f"Exported to {out}: peft adapter (PeftModel.from_pretrained(open_clip_model, '{out}')) "
        "+ SAVLT head; use it with `savlt predict` / `savlt evaluate`"
    )


def cmd_predict(args: argparse.Namespace) -> None:
    import csv
    import io

    from savlt_model.atomic import write_text
    from tools.inference import predict_images

    rows = predict_images(args.model, args.images, args.on_bad_file)
    header = ["file", "class", "probability", "decision", "high_risk"]
    cells = [
        [r["file"], r["class"], f"{r['probability']:.4f}", r["decision"], f"{r['high_risk']:.4f}"]
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    for line in [header, *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    if args.csv:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow([*header, *(f"p_{c}" for c in rows[0]["probs"])])
        writer.writerows([*c, *rows[i]["probs"].values()] for i, c in enumerate(cells))
        print(f"CSV: {write_text(args.csv, buf.getvalue())}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from savlt_model.metrics import METRIC_KEYS
    from tools.inference import evaluate_folder

    out = args.out or args.model / f"eval_{args.data.name}"
    metrics = evaluate_folder(
        args.model, args.data, out, recentre=args.recentre, on_bad_file=args.on_bad_file
    )
    print(f"{args.data} ({metrics['n']} images):")
    for key in METRIC_KEYS:
        value = metrics[key]
        print(f"  {key:<12} {'n/a' if value is None else f'{value:.2f}'}")
    print(f"Report: {out / 'report.md'}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from tools.inference import calibrate_model

    done = calibrate_model(args.model, args.data, args.out, on_bad_file=args.on_bad_file)
    print(
        f"Calibrated to {done['scans']} unlabelled scans of {args.data} (shift score "
        f"{done['shift_score']:.2f}): the label-free guard took {done['choice']!r} "
        f"({done['reason']}); {done['referral_rate']:.0%} of these scans would be referred: "
        f"{done['out']}"
    )


def cmd_site_check(args: argparse.Namespace) -> None:
    from tools.site_check import format_site_check, site_check, write_site_check

    report = site_check(args.model, args.folder, args.labels, args.on_bad_file)
    print(format_site_check(report))
    print(f"JSON: {write_site_check(report, args.out)}")


def cmd_report(args: argparse.Namespace) -> None:
    from reporting.report import write_report

    print(f"Report: {write_report(args.run)}")


def cmd_deploy_local(args: argparse.Namespace) -> None:
    from savlt_model.config import load_config
    from synthetic.write import ensure_data
    from tools.deploy.local import deploy_local, print_summary

    cfg = load_config(args.config, args.overrides)
    ensure_data(cfg)  # the demo's hospitals get synthetic data when the config asks for it
    print_summary(deploy_local(cfg, args.out, args.method, args.timeout), args.out)


def cmd_policy(args: argparse.Namespace) -> None:
    from client.policy import policy_for, write_policy
    from savlt_model.config import load_config

    cfg = load_config(args.config, args.overrides)
    policy = policy_for(cfg, methods=args.method or None, pin_config=args.pin_config)
    path = write_policy(args.out, policy, source=str(args.config))
    print(
        f"Policy written to {path}: methods {', '.join(policy.methods)}, at most "
        f"{policy.max_rounds} rounds of {policy.max_local_steps} local steps"
        + (", central DP required" if policy.require_dp else "")
        + (", this exact run config only" if policy.run_config_sha256 else "")
        + '. Review it, then name it in the SuperNode\'s node config: policy="FILE"'
    )


def cmd_audit(args: argparse.Namespace) -> None:
    from client.audit import summarise

    print(summarise(args.file))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from synthetic.corpus import make_corpus
    from tools.pretrain import pretrain

    summary = pretrain(
        args.out, make_corpus, seed=args.seed, images=args.images, epochs=args.epochs
    )
    print(
        f"Pretrained savlt-tiny written to {args.out} (held-out zero-shot accuracy "
        f"{summary['heldout_zero_shot_acc']}); use it with --set model.pretrained={args.out}. "
        "Measured: it does not improve SAVLT at this budget (docs/simulation.md)."
    )


def cmd_roi_train(args: argparse.Namespace) -> None:
    from tools.unet_train import train_unet

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
    p.add_argument(
        "--held-out-family",
        type=int,
        default=0,
        metavar="N",
        help="add N test-only centres of a held-out scanner-style family (synthetic/family.py)",
    )
    p.add_argument("--family-seed", type=int, default=0, help="which family (0: tuning)")
    p.set_defaults(func=cmd_synth, log_dir=None)

    p = sub.add_parser("train", help="centralised SAVLT on the original protocol")
    _config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "simulate",
        help="federated simulation with centralised and local baselines (Flower)",
        description="Runs every method of fl.methods for every seed. Methods:\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "federation-config",
        help="flwr run's --federation-config for a config: hospitals and actor resources",
    )
    _config_args(p, out=False)
    p.set_defaults(func=cmd_federation_config, log_dir=None)

    p = sub.add_parser(
        "pretrain", help="opt-in: contrastive pretraining of savlt-tiny on a synthetic corpus"
    )
    p.add_argument("--out", type=Path, required=True, help="checkpoint file (.pt)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--epochs", type=int, default=5)
    p.set_defaults(func=cmd_pretrain, log_dir=None)

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

    p = sub.add_parser("export", help="write a run's adapter as a peft model dir + SAVLT head")
    p.add_argument("--run", type=Path, required=True, help="run directory (train / simulate)")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--method", help="method (central, fedavg, ...) or adapter file name")
    p.add_argument("--seed", type=int, help="seed, when the run has several")
    p.set_defaults(func=cmd_export, log_dir=None)

    p = sub.add_parser("predict", help="classify images with an exported model")
    p.add_argument("--model", type=Path, required=True, help="directory from savlt export")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    p.add_argument("--csv", type=Path, help="also write the predictions (with every class) here")
    _bad_file_arg(p)
    p.set_defaults(func=cmd_predict, log_dir=None)

    p = sub.add_parser("evaluate", help="score an exported model on a labelled centre folder")
    p.add_argument("--model", type=Path, required=True, help="directory from savlt export")
    p.add_argument("--data", type=Path, required=True, help="ROOT/<centre> with images/<class>/")
    p.add_argument("--out", type=Path, help="output directory (default MODEL/eval_<centre>)")
    p.add_argument(
        "--recentre",
        action="store_true",
        help="also score re-centred on this folder's own scans (label-free, transductive)",
    )
    _bad_file_arg(p)
    p.set_defaults(func=cmd_evaluate, log_dir=None)

    p = sub.add_parser(
        "calibrate",
        help="adapt an exported model to a new site's unlabelled scans (label-free)",
    )
    p.add_argument("--model", type=Path, required=True, help="directory from savlt export")
    p.add_argument("--data", type=Path, required=True, help="folder of the site's scans")
    p.add_argument("--out", type=Path, required=True, help="calibrated model directory")
    _bad_file_arg(p)
    p.set_defaults(func=cmd_calibrate, log_dir=None)

    p = sub.add_parser(
        "site-check",
        help="is an exported model safe on a new scanner's unlabelled scans? (go / no-go)",
    )
    p.add_argument("folder", type=Path, help="folder of the new site's unlabelled scans")
    p.add_argument("--model", type=Path, required=True, help="directory from savlt export")
    p.add_argument(
        "--labels",
        type=Path,
        help="small labelled spot check: a CSV file,class (relative to FOLDER) or class folders",
    )
    p.add_argument("--out", type=Path, default=Path("site_check.json"), help="JSON report")
    _bad_file_arg(p)
    p.set_defaults(func=cmd_site_check, log_dir=None)

    p = sub.add_parser(
        "deploy-local",
        help="real Flower deployment on 127.0.0.1: TLS, authenticated SuperNodes, one per centre",
    )
    _config_args(p)
    p.add_argument("--method", default="text-anchored", choices=federated_methods())
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take")
    p.set_defaults(func=cmd_deploy_local)

    p = sub.add_parser(
        "policy",
        help="write a hospital's run policy (what it agrees to run) from a study's config",
        description="Writes the policy that approves the config as it is: its federated "
        "methods, backbone and text-anchor fingerprints, rounds, local steps and DP setting "
        "(docs/deploy.md). A hospital names it in its SuperNode's node config (policy=FILE).",
    )
    _config_args(p, out=False)  # the study's config and its overrides, as every command takes
    p.add_argument("--out", type=Path, required=True, help="policy file (.yaml) to write")
    p.add_argument(
        "--method",
        action="append",
        choices=federated_methods(),
        help="approve only this method (repeatable; default: the config's federated methods)",
    )
    p.add_argument(
        "--pin-config",
        action="store_true",
        help="approve only this exact run config (its SHA-256), not just its limits",
    )
    p.set_defaults(func=cmd_policy, log_dir=None)

    p = sub.add_parser("audit", help="summarise a hospital's audit log: what left it, by reply")
    p.add_argument("file", type=Path, help="the hospital's <work dir>/audit/<hospital>.jsonl")
    p.set_defaults(func=cmd_audit, log_dir=None)

    p = sub.add_parser("report", help="(re)write RUN_DIR/report.md")
    p.add_argument("--run", type=Path, required=True, help="run directory")
    p.set_defaults(func=cmd_report, log_dir=None)
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
