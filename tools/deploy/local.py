"""``savlt deploy-local``: a real Flower deployment (TLS + SuperNode authentication) on 127.0.0.1.

What hospital IT would run on several machines, on one: a CA and a SuperLink certificate,
one EC P-384 key pair per hospital, ``flower-superlink --enable-supernode-auth``, the
hospitals' public keys registered with ``flwr supernode register``, one ``flower-supernode``
per hospital (its data folder in ``--node-config``), then ``flwr run`` of this project against
that SuperLink. Every process is started in its own session and killed, with its descendants,
when the command ends: normally, on error, on timeout, on Ctrl-C or on SIGTERM.
See docs/deploy.md for the same steps by hand.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from client.policy import policy_for, write_policy
from savlt_model.atomic import write_text
from savlt_model.config import PROJECT_ROOT, Config, dump_config, load_config
from savlt_model.data.protocol import data_root
from savlt_model.errors import SavltError
from tools.deploy.certificates import Certificates, write_certificates, write_node_keys
from tools.deploy.flwr_cli import CONNECTION, flwr_cli, flwr_env, supernode_list, write_flwr_config
from tools.deploy.processes import Processes, free_port, managed

log = logging.getLogger(__name__)


@dataclass
class HospitalNode:
    center: str
    private_key: Path
    public_key: Path
    port: int  # the SuperNode's own runtime API port
    policy: Path | None = None  # the run policy the hospital approved (client/policy.py)


def deploy_config(cfg: Config) -> Config:
    """The ``centers`` protocol with one hospital per centre, scored on the hospitals' side.

    The server holds no images, so server-side evaluation is off and every hospital scores
    the global model on its own validation split.
    """
    fl = dataclasses.replace(
        cfg.fl,
        partition="centers",
        server_eval=False,
        client_eval=True,
        held_out=None,
        leave_one_out=False,
        hospitals=len(centers_of(cfg)),
    )
    return dataclasses.replace(cfg, fl=fl)


def centers_of(cfg: Config) -> list[str]:
    return [cfg.data.train_center, *cfg.data.external_centers]


@dataclass
class Deployment:
    """Paths, ports and the job config of one local deployment under ``out``."""

    out: Path
    cfg: Config  # as the ServerApp reads it from ``config_file``
    config_file: Path
    data: Path  # every hospital's DATA folder (each reads only its own centre)
    superlink_port: int
    certs: Certificates
    hospitals: list[HospitalNode]
    env: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"


def prepare(cfg: Config, out: Path) -> Deployment:
    """Job config, certificates, hospital keys, ports and the flwr CLI config under ``out``."""
    out = out.resolve()
    cfg = deploy_config(cfg)
    root = data_root(cfg).resolve()  # the caller generates synthetic data first if asked
    synthetic = dataclasses.replace(cfg.data.synthetic, enabled=False)
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, root=str(root), synthetic=synthetic)
    )
    certs = write_certificates(out / "certs")
    config_file = write_text(out / "config.yaml", dump_config(cfg))
    # every hospital approves exactly this study: what `savlt policy --pin-config` writes
    policy = policy_for(load_config(config_file), pin_config=True)
    hospitals = [
        HospitalNode(
            c,
            *write_node_keys(out / "keys", f"hospital-{c}"),
            free_port(),
            write_policy(out / "policies" / f"hospital-{c}.yaml", policy, str(config_file)),
        )
        for c in centers_of(cfg)
    ]
    dep = Deployment(
        out,
        cfg,
        config_file,
        root,
        free_port(),
        certs,
        hospitals,
        flwr_env(out / "flwr"),
    )
    write_flwr_config(out / "flwr", dep.address, certs.ca)
    return dep


def start_superlink(dep: Deployment, procs: Processes) -> None:
    procs.start(
        "superlink",
        [
            "flower-superlink",
            "--ssl-ca-certfile",
            str(dep.certs.ca),
            "--ssl-certfile",
            str(dep.certs.cert),
            "--ssl-keyfile",
            str(dep.certs.key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(dep.superlink_port),
            "--database",
            str(dep.out / "superlink.db"),
        ],
    )


def wait_for_superlink(dep: Deployment, procs: Processes, timeout: float = 60.0) -> None:
    """Until the Control API answers through TLS (``flwr supernode list`` succeeds)."""
    deadline = time.monotonic() + timeout
    while True:
        if procs.procs["superlink"].poll() is not None:
            raise SavltError(f"flower-superlink exited; see {procs.log_dir / 'superlink.log'}")
        try:
            supernode_list(dep.env)
            return
        except SavltError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def register(dep: Deployment, node: HospitalNode) -> None:
    flwr_cli(dep.env, "supernode", "register", str(node.public_key), CONNECTION, "--format", "json")


def start_supernode(
    dep: Deployment, procs: Processes, node: HospitalNode, name: str | None = None
) -> None:
    """One hospital's SuperNode: TLS to the SuperLink, its private key, its data folder and
    its run policy. Its splits and few-shot draws go to its own state directory
    (``FLWR_HOME/savlt-work``), never into the data folder."""
    node_config = f'data-root="{dep.data}" center="{node.center}"'
    if node.policy is not None:
        node_config += f' policy="{node.policy}"'
    procs.start(
        name or f"hospital-{node.center}",
        [
            "flower-supernode",
            "--superlink",
            dep.address,
            "--root-certificates",
            str(dep.certs.ca),
            "--auth-supernode-private-key",
            str(node.private_key),
            "--port",
            str(node.port),
            "--node-config",
            node_config,
        ],
        env={"FLWR_HOME": str(dep.out / "flwr-nodes" / node.center)},
    )


def submit(dep: Deployment, method: str, seed: int) -> int:
    """``flwr run`` this project against the deployment; the run id."""
    run_config = (
        f"config='{dep.config_file}' overrides='' method='{method}' seed={seed} out='{dep.out}'"
    )
    reply = flwr_cli(
        dep.env,
        "run",
        str(PROJECT_ROOT),
        CONNECTION,
        "--run-config",
        run_config,
        "--format",
        "json",
        timeout=300.0,
    )
    return int(json.loads(reply)["run-id"])


def run_status(dep: Deployment, run_id: int) -> str:
    reply = json.loads(
        flwr_cli(dep.env, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
    )
    return str(reply["runs"][0]["status"])


def wait_for_run(
    dep: Deployment, procs: Processes, run_id: int, result: Path, timeout: float
) -> str:
    """Until the run is finished; its final status (``finished:completed`` on success).

    Each ``flwr ls`` costs seconds of CPU, so it is asked every 15 s, or as soon as the
    job's result file appears; a dead SuperLink or a timeout stops the wait at once.
    """
    deadline = time.monotonic() + timeout
    next_ask = 0.0
    while True:
        if procs.procs["superlink"].poll() is not None:
            raise SavltError(f"flower-superlink exited; see {procs.log_dir / 'superlink.log'}")
        now = time.monotonic()
        if result.is_file() or now >= next_ask:
            status = run_status(dep, run_id)
            if status.startswith("finished"):
                return status
            next_ask = now + 15.0
        if now > deadline:
            flwr_cli(dep.env, "stop", str(run_id), CONNECTION, "--format", "json")
            raise SavltError(f"run {run_id} did not finish in {timeout:.0f} s (status {status})")
        time.sleep(1.0)


def start_federation(dep: Deployment, procs: Processes) -> None:
    """SuperLink up, every hospital's key registered and its SuperNode started."""
    start_superlink(dep, procs)
    wait_for_superlink(dep, procs)
    for node in dep.hospitals:
        register(dep, node)
        start_supernode(dep, procs, node)


def run_job(dep: Deployment, procs: Processes, method: str, timeout: float) -> dict:
    """Submit one federated job to the running federation; its summary (``jobs/<tag>.json``)."""
    seed = dep.cfg.seeds[0]
    result = dep.out / "jobs" / f"{method}_seed{seed}.json"
    result.unlink(missing_ok=True)
    run_id = submit(dep, method, seed)
    log.info("run %d submitted to %s", run_id, dep.address)
    status = wait_for_run(dep, procs, run_id, result, timeout)
    if status != "finished:completed" or not result.is_file():
        raise SavltError(
            f"run {run_id} ended {status}; see {procs.log_dir}/superlink.log and hospital-*.log"
        )
    return json.loads(result.read_text())


def deploy_local(cfg: Config, out: Path, method: str, timeout: float) -> dict:
    """Run one federated job on a fresh local TLS deployment, then tear it all down."""
    dep = prepare(cfg, out)
    with managed(Processes(dep.out / "logs", dep.env)) as procs:
        start_federation(dep, procs)
        return run_job(dep, procs, method, timeout)


def print_summary(summary: dict, out: Path) -> None:
    """Per-round table (hospital-side val scores of the global model) and the events."""
    cols = [
        "round",
        "hospitals",
        "train-loss",
        "hospitals-val-acc_multiclass",
        "hospitals-val-acc_binary",
    ]
    print(
        f"{summary['method']}, seed {summary['seed']}: {summary['rounds']} rounds on the deployment"
    )
    print("  ".join(f"{c:>24}" for c in cols))
    for row in summary["history"]:
        cells = [row.get(c) for c in cols]
        print(
            "  ".join(
                f"{'-' if v is None else (f'{v:.4f}' if isinstance(v, float) else v):>24}"
                for v in cells
            )
        )
    for e in summary["events"]:
        print(f"round {e['round']}: {e['event']} node {e['node']}: {e['reason']}")
    tag = f"{summary['method']}_seed{summary['seed']}"
    print(f"Adapter: {out / 'adapters' / tag}.safetensors")
    print(f"Job: {out / 'jobs'}, logs: {out / 'logs'}")
