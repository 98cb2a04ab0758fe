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

import atexit
import dataclasses
import datetime as dt
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client.policy import policy_for, write_policy
from savlt_model.atomic import write_text
from savlt_model.config import PROJECT_ROOT, Config, dump_config, load_config
from savlt_model.errors import SavltError
from simulation.synth import ensure_data

log = logging.getLogger(__name__)

CONNECTION = "savlt-local"  # the SuperLink connection name in OUT/flwr/config.toml
CERT_DAYS = 30
TAG = "SAVLT_DEPLOYMENT"  # environment marker inherited by every process a deployment starts


@dataclass
class Certificates:
    ca: Path  # what SuperNodes and the flwr CLI trust (--root-certificates)
    cert: Path  # the SuperLink's certificate, signed by the CA
    key: Path  # the SuperLink's private key


@dataclass
class HospitalNode:
    center: str
    private_key: Path
    public_key: Path
    port: int  # the SuperNode's own runtime API port
    policy: Path | None = None  # the run policy the hospital approved (client/policy.py)


def _write_private(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def write_certificates(
    out: Path, hosts: Sequence[str] = ("localhost",), ips: Sequence[str] = ("127.0.0.1",)
) -> Certificates:
    """A private CA and a SuperLink certificate whose SANs cover ``hosts`` and ``ips``."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "savlt-fl federation CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    certs = Certificates(out / "ca.crt", out / "superlink.crt", out / "superlink.key")
    write_text(certs.ca, ca.public_bytes(pem).decode())
    write_text(certs.cert, cert.public_bytes(pem).decode())
    _write_private(
        certs.key,
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return certs


def write_node_keys(out: Path, name: str) -> tuple[Path, Path]:
    """One EC P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = _write_private(
        out / name,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    public = out / f"{name}.pub"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + f" {name}\n".encode()
    )
    return private, public


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Every process a deployment starts; :meth:`stop` kills them and all their descendants.

    Flower's SuperLink and SuperNodes start helpers (SuperExec, ServerApp, ClientApps) in
    new sessions, so killing a process group is not enough, and a helper whose parent died
    is re-parented to init. Every process started here carries ``TAG`` in its environment,
    which its descendants inherit: stopping everything kills whatever still carries it.
    """

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.tag = f"{log_dir.resolve()}:{os.getpid()}"
        self.env = {**env, TAG: self.tag}
        self.procs: dict[str, subprocess.Popen] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        with open(self.log_dir / f"{name}.log", "ab") as fh:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})},
                start_new_session=True,
            )
        log.info("started %s (pid %d): %s", name, self.procs[name].pid, " ".join(argv))

    def log_text(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def tagged(self) -> list[psutil.Process]:
        """Live processes that this deployment started, directly or not."""
        found = []
        for p in psutil.process_iter():
            with suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(TAG) == self.tag:
                    found.append(p)
        return found

    def stop(self, name: str | None = None, grace: float = 5.0) -> None:
        """Terminate one process (or all) with its descendants; kill what outlives ``grace``."""
        victims: list[psutil.Process] = []
        for n in [name] if name else list(self.procs):
            proc = self.procs.pop(n)
            with suppress(psutil.Error):
                parent = psutil.Process(proc.pid)
                victims += [parent, *parent.children(recursive=True)]
        if name is None:
            victims += self.tagged()
        for p in victims:
            with suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(victims, timeout=grace)
        for p in alive:
            with suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=grace)


@contextmanager
def managed(processes: Processes) -> Iterator[Processes]:
    """Stop every process on exit, exception, Ctrl-C, SIGTERM or interpreter exit."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    atexit.register(processes.stop)
    try:
        yield processes
    finally:
        processes.stop()
        atexit.unregister(processes.stop)
        signal.signal(signal.SIGTERM, previous)


def flwr_env(home: Path) -> dict[str, str]:
    """Environment for Flower's processes: this venv's tools first, state under ``home``."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env.update(
        {
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def write_flwr_config(home: Path, address: str, ca: Path) -> Path:
    """The flwr CLI's SuperLink connection, in FLWR_HOME so ~/.flwr stays untouched."""
    return write_text(
        home / "config.toml",
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\nroot-certificates = "{ca}"\n',
    )


def flwr_cli(env: dict[str, str], *args: str, timeout: float = 60.0) -> str:
    """Run one ``flwr`` command; its stdout, or a SavltError with its output."""
    try:
        done = subprocess.run(
            ["flwr", *args], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise SavltError(f"flwr {' '.join(args[:2])} did not answer in {timeout:.0f} s") from exc
    failed = bool(done.returncode)
    if "json" in args and not failed:  # with --format json, flwr exits 0 and says success false
        reply = json.loads(done.stdout)
        failed = not reply.get("success", True)
        done.stdout = reply.get("error-message", done.stdout) if failed else done.stdout
    if failed:
        tail = [s.strip() for s in (done.stdout + done.stderr).strip().splitlines()[-3:]]
        raise SavltError(f"flwr {' '.join(args[:2])} failed: {' '.join(tail)}")
    return done.stdout


def supernode_list(env: dict[str, str]) -> list[dict]:
    """``flwr supernode list`` as records (node id, owner, status, ...)."""
    out = json.loads(flwr_cli(env, "supernode", "list", CONNECTION, "--format", "json"))
    return list(out.get("nodes", []))


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
    root = ensure_data(cfg).resolve()  # generates synthetic data if the config asks for it
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
