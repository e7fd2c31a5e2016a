"""A three-node Ray cluster with object storage and an authenticated MLflow server, on 127.0.0.1.

    python -m ray_jobs.local_cluster up      # moto S3, MLflow (basic auth), Ray head + 2 workers
    eval "$(python -m ray_jobs.local_cluster env)"   # RAY_ADDRESS, MLFLOW_*, AWS_* for this shell
    python -m ray_jobs.local_cluster dvc-remote   # this project's default DVC remote on its S3
    python -m ray_jobs.local_cluster down    # stops every process it started

Everything binds to loopback on free ports. The state (addresses, ports, pids) lives in
`runs/cluster/cluster.json`; generated passwords live in `runs/cluster/secrets/` (mode 0600) and
are never printed: `env` prints `$(cat file)` for them. Each Ray node is one `ray start --block`
process in its own session, so the cluster outlives `up`, and killing a node's process group is a
node failure (tests use `LocalCluster.kill_worker_node`). The raylets, not the jobs, hold the
credentials: a Ray job's metadata carries none.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

DEFAULT_DIR = Path("runs/cluster")
PROJECT = Path(__file__).resolve().parents[1]
BUCKET = "fusemoe"
PIPELINE_USER = "fusemoe-pipeline"
ADMIN_USER = "admin"
REGION = "us-east-1"
# moto accepts any key pair; these are what the nodes, MLflow and DVC are given.
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
NODE_START_ATTEMPTS = 3
SECRET_NAMES = ("admin_password", "pipeline_password", "flask_secret_key")


@contextlib.contextmanager
def mlflow_user(username: str, password: str) -> Iterator[None]:
    """MLflow clients in this process authenticate as `username` inside the block."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(zip(keys, (username, password), strict=True))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, ready, deadline: float, procs: list[subprocess.Popen], log: Path) -> None:
    """Polls `ready()` until true; fails with the log's tail if a process died or time ran out."""
    while not ready():
        for p in procs:
            if p.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
                raise RuntimeError(f"{what} exited with {p.returncode} during start-up:\n{tail}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready before the start-up time limit (log: {log})")
        time.sleep(0.5)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except OSError:
        return False


def _kill_tree(pid: int) -> None:
    """SIGKILL a process, its process group and every descendant (a node dying without warning)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    try:
        os.killpg(pid, signal.SIGKILL)  # each service runs in its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


class LocalCluster:
    """Start/stop the loopback cluster; also a context manager for tests.

    `num_workers` worker nodes with `cpus_per_worker` CPUs each; the head has no CPUs (drivers,
    the Ray Train controller and Tune driver trials run there: `TRAIN_DRIVER` is a custom
    resource on the head for the latter).
    """

    def __init__(
        self,
        cluster_dir: str | Path = DEFAULT_DIR,
        num_workers: int = 2,
        cpus_per_worker: int = 1,
        experiment: str = "fusemoe",
        start_timeout_s: float = 300.0,
    ) -> None:
        self.dir = Path(cluster_dir).resolve()
        self.num_workers, self.cpus_per_worker = num_workers, cpus_per_worker
        self.experiment = experiment
        self.start_timeout_s = start_timeout_s
        self.state: dict[str, Any] = {}
        self._procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------ state and secrets

    @property
    def state_file(self) -> Path:
        return self.dir / "cluster.json"

    @property
    def secrets_dir(self) -> Path:
        return self.dir / "secrets"

    def secret(self, name: str) -> str:
        return (self.secrets_dir / name).read_text().strip()

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, cluster_dir: str | Path = DEFAULT_DIR) -> LocalCluster:
        """The cluster described by `cluster_dir/cluster.json` (started earlier by `up`)."""
        cluster = cls(cluster_dir)
        if not cluster.state_file.is_file():
            raise FileNotFoundError(f"{cluster.state_file}: no cluster here (run `up` first)")
        cluster.state = json.loads(cluster.state_file.read_text())
        cluster.num_workers = len(cluster.state["ray"]["workers"])
        return cluster

    def _write_secrets(self) -> None:
        self.secrets_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.secrets_dir, 0o700)
        for name in SECRET_NAMES:
            path = self.secrets_dir / name
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_urlsafe(24))

    # ------------------------------------------------------------ environments

    @property
    def s3_endpoint(self) -> str:
        return self.state["s3"]["endpoint"]

    @property
    def tracking_uri(self) -> str:
        return self.state["mlflow"]["uri"]

    @property
    def ray_address(self) -> str:
        return self.state["ray"]["gcs_address"]

    @property
    def dashboard_url(self) -> str:
        return self.state["ray"]["dashboard_url"]

    def storage_uri(self, prefix: str = "ray") -> str:
        """A pyarrow URI on the cluster's bucket; the endpoint comes from AWS_ENDPOINT_URL."""
        return f"s3://{BUCKET}/{prefix}"

    def public_env(self) -> dict[str, str]:
        """The non-secret settings a client of this cluster needs."""
        return {
            "RAY_ADDRESS": self.ray_address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_TMPDIR": self.state["ray"]["tmpdir"],
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "MLFLOW_TRACKING_USERNAME": PIPELINE_USER,
            # Drivers on this machine join the loopback nodes (not the machine's address).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # Every port is bound to 127.0.0.1 only, so no token: see the README's "Scaling out".
            "RAY_AUTH_MODE": "disabled",
        }

    def env(self) -> dict[str, str]:
        """public_env plus the credentials (the pipeline user's, the S3 keys): for processes."""
        return {
            **self.public_env(),
            **S3_KEYS,
            "MLFLOW_TRACKING_PASSWORD": self.secret("pipeline_password"),
        }

    def exports(self) -> str:
        """Shell lines for `eval`: secrets are read from their files, never written out."""
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.public_env().items()]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in S3_KEYS.items()]
        pw = shlex.quote(str(self.secrets_dir / "pipeline_password"))
        lines.append(f'export MLFLOW_TRACKING_PASSWORD="$(cat {pw})"')
        return "\n".join(lines)

    def configure_dvc_remote(self, project: str | Path = ".", name: str = "cluster") -> None:
        """Makes `name` (s3://fusemoe/dvc on this cluster) the project's default DVC remote.

        Everything goes to .dvc/config.local (git-ignored): the endpoint changes with every
        cluster and the keys must never be committed.
        """
        dvc = str(Path(sys.executable).parent / "dvc")
        settings = [
            ["remote", "add", "--local", "--force", "--default", name, f"s3://{BUCKET}/dvc"],
            ["remote", "modify", "--local", name, "endpointurl", self.s3_endpoint],
            ["remote", "modify", "--local", name, "region", REGION],
            ["remote", "modify", "--local", name, "access_key_id", S3_KEYS["AWS_ACCESS_KEY_ID"]],
            [
                "remote",
                "modify",
                "--local",
                name,
                "secret_access_key",
                S3_KEYS["AWS_SECRET_ACCESS_KEY"],
            ],
        ]
        env = self._base_env()
        for args in settings:
            subprocess.run([dvc, *args], cwd=project, env=env, check=True, timeout=120)

    def _base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.pop("AWS_PROFILE", None)
        # Job entrypoints (`python -m pipelines.train`, `dvc ...`) find this environment's tools.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env | {"DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0"}

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        """A service in its own session (outlives this process; killpg stops all of it)."""
        log = self.dir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
            )
        self._procs.append(proc)
        return proc

    # ------------------------------------------------------------ start / stop

    def start(self) -> LocalCluster:
        """Starts S3, MLflow and Ray; on any failure stops what was started and re-raises."""
        if self.state_file.is_file():
            raise RuntimeError(f"{self.state_file} exists: a cluster is up (run `down` first)")
        self.dir.mkdir(parents=True, exist_ok=True)
        # S3 is in memory, so a new cluster starts with empty tracking stores too.
        for db in ("mlflow.db", "basic_auth.db"):
            (self.dir / db).unlink(missing_ok=True)
        self._write_secrets()
        deadline = time.monotonic() + self.start_timeout_s
        self.state = {"dir": str(self.dir)}
        try:
            self._start_s3(deadline)
            self._start_mlflow(deadline)
            self._start_ray(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_s3(self, deadline: float) -> None:
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}"
        moto = str(Path(sys.executable).parent / "moto_server")
        proc = self._spawn("s3", [moto, "-H", "127.0.0.1", "-p", str(port)], self._base_env())
        self.state["s3"] = {"endpoint": endpoint, "bucket": BUCKET, "pid": proc.pid}
        self._save()
        _wait("moto S3", lambda: _http_ok(endpoint), deadline, [proc], self.dir / "logs/s3.log")
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"],
        )
        s3.create_bucket(Bucket=BUCKET)

    def _start_mlflow(self, deadline: float) -> None:
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        ini = self.dir / "basic_auth.ini"
        ini.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{self.dir / 'basic_auth.db'}\n"
            f"admin_username = {ADMIN_USER}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env = self._base_env() | S3_KEYS
        env |= {
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.secret("admin_password"),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret("flask_secret_key"),
        }
        mlflow = str(Path(sys.executable).parent / "mlflow")
        cmd = [
            mlflow,
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.dir / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{BUCKET}/mlflow-artifacts",
        ]
        proc = self._spawn("mlflow", cmd, env)
        self.state["mlflow"] = {"uri": uri, "pid": proc.pid, "users": [PIPELINE_USER]}
        self._save()
        _wait(
            "MLflow server",
            lambda: _http_ok(f"{uri}/health"),
            deadline,
            [proc],
            self.dir / "logs/mlflow.log",
        )
        self._create_pipeline_user()

    def admin_client(self):
        """The basic-auth admin API (users, permissions); call it inside `as_admin()`."""
        from mlflow.server.auth.client import AuthServiceClient

        return AuthServiceClient(self.tracking_uri)

    def as_admin(self):
        return mlflow_user(ADMIN_USER, self.secret("admin_password"))

    def _create_pipeline_user(self) -> None:
        """The pipeline's own user; it creates the experiment, so it holds MANAGE on it."""
        import mlflow

        password = self.secret("pipeline_password")
        with self.as_admin():
            self.admin_client().create_user(PIPELINE_USER, password)
        with mlflow_user(PIPELINE_USER, password):
            mlflow.MlflowClient(self.tracking_uri).create_experiment(self.experiment)

    def _node_env(self) -> dict[str, str]:
        """What every raylet (and so every job driver and worker) runs with."""
        return self._base_env() | self.env() | {"RAY_TMPDIR": self.state["ray"]["tmpdir"]}

    def _ray_node(self, name: str, spec: dict) -> subprocess.Popen:
        """One Ray node as a `python -m ray_jobs.local_cluster node SPEC` process (see serve_node)."""
        cmd = [sys.executable, "-m", "ray_jobs.local_cluster", "node", json.dumps(spec)]
        env = self._node_env()
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT), env.get("PYTHONPATH")]))
        return self._spawn(name, cmd, env)

    def _start_ray(self, deadline: float) -> None:
        gcs, dash = free_port(), free_port()
        # Ray's sockets live under the temp dir (a ~107-character limit): keep it short, and
        # the cluster's own, so no plain ray.init() elsewhere on the machine joins it.
        tmpdir = f"/tmp/ray-lc-{hashlib.sha256(str(self.dir).encode()).hexdigest()[:8]}"
        self.state["ray"] = {
            "gcs_address": f"127.0.0.1:{gcs}",
            "dashboard_url": f"http://127.0.0.1:{dash}",
            "tmpdir": tmpdir,
            "head": None,
            "workers": [],
        }
        head = self._ray_node(
            "ray-head",
            {
                "head": True,
                "gcs_server_port": gcs,
                "num_cpus": 0,
                "resources": {"TRAIN_DRIVER": 4},
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dash,
                "ray_client_server_port": free_port(),
                "temp_dir": tmpdir,
            },
        )
        self.state["ray"]["head"] = {"pid": head.pid}
        self._save()
        _wait(
            "Ray head",
            lambda: len(self.alive_nodes()) >= 1,
            deadline,
            [head],
            self.dir / "logs/ray-head.log",
        )
        for _ in range(self.num_workers):
            self._add_worker(deadline)

    def alive_nodes(self) -> list[dict]:
        """The nodes the dashboard's state API lists as ALIVE ([] while it is not up)."""
        url = f"{self.dashboard_url}/api/v0/nodes?limit=100&detail=1"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                nodes = json.loads(r.read())["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return []
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def _add_worker(self, deadline: float) -> int:
        index = len(self.state["ray"]["workers"])
        before = len(self.alive_nodes())
        name = f"ray-worker-{index}"
        proc = self._ray_node(
            name, {"head": False, "gcs_address": self.ray_address, "num_cpus": self.cpus_per_worker}
        )
        self.state["ray"]["workers"].append({"pid": proc.pid, "alive": True})
        self._save()
        _wait(
            f"Ray worker node {index}",
            lambda: len(self.alive_nodes()) > before,
            deadline,
            [proc],
            self.dir / f"logs/{name}.log",
        )
        return index

    def add_worker_node(self, timeout_s: float = 180.0) -> int:
        """Starts one more worker node; returns its index (for kill_worker_node)."""
        index = self._add_worker(time.monotonic() + timeout_s)
        self.num_workers = len(self.state["ray"]["workers"])
        return index

    def kill_worker_node(self, index: int, timeout_s: float = 180.0) -> None:
        """Hard-kills worker node `index`: its raylet, object store and every worker process.

        Returns once Ray lists the node as dead, so a following `add_worker_node` (which waits
        for the count of live nodes to grow) cannot mistake the death for the new node's arrival.
        """
        alive = len(self.alive_nodes())
        node = self.state["ray"]["workers"][index]
        _kill_tree(node["pid"])
        node["alive"] = False
        self._save()
        deadline = time.monotonic() + timeout_s
        while len(self.alive_nodes()) >= alive:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Ray still lists worker node {index} as alive after {timeout_s} s"
                )
            time.sleep(0.5)

    def _pids(self) -> list[int]:
        ray = self.state.get("ray", {})
        nodes = [w["pid"] for w in ray.get("workers", [])]
        nodes += [ray["head"]["pid"]] if ray.get("head") else []
        services = [self.state[s]["pid"] for s in ("mlflow", "s3") if s in self.state]
        return nodes + services

    def stop(self) -> None:
        """Kills every process this cluster started (workers first, then head, MLflow, S3)."""
        for pid in self._pids():
            _kill_tree(pid)
        for proc in self._procs:
            proc.wait(timeout=30)
        self._procs.clear()
        self.state_file.unlink(missing_ok=True)

    def running_pids(self) -> list[int]:
        """Pids of this cluster's processes (and their children) that are still alive."""
        alive: list[int] = []
        for pid in self._pids():
            try:
                root = psutil.Process(pid)
                alive += [p.pid for p in [root, *root.children(recursive=True)] if p.is_running()]
            except psutil.NoSuchProcess:
                pass
        return alive

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_node(spec: dict) -> None:
    """Runs one Ray node in this process until SIGTERM (what `ray start --block` does).

    Not `ray start` itself: it turns 127.0.0.1 into the machine's address unless
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and with that setting it refuses to start worker nodes.
    With it set here, every node, driver and worker of the cluster stays on loopback.
    """
    import ray._private.node
    import ray._private.parameter

    head = spec.pop("head")
    defaults = {
        "node_ip_address": "127.0.0.1",
        "num_gpus": 0,
        "object_store_memory": 200 * 1024 * 1024,
        "min_worker_port": 0,
        "max_worker_port": 0,
        "dashboard_agent_listen_port": free_port(),
        "metrics_export_port": free_port(),
        "runtime_env_agent_port": free_port(),
    }
    if not head:
        defaults |= {"include_log_monitor": False, "node_manager_port": 0}
    for attempt in range(NODE_START_ATTEMPTS):
        params = ray._private.parameter.RayParams(**(defaults | spec))
        try:
            node = ray._private.node.Node(
                params, head=head, shutdown_at_exit=True, spawn_reaper=True
            )
            break
        except Exception:
            # Ray gives a raylet 30 s to register, which a busy 2-core machine can exceed.
            if attempt + 1 == NODE_START_ATTEMPTS:
                raise
            for child in psutil.Process().children(recursive=True):
                child.kill()
            print(f"node start-up timed out; retrying ({attempt + 2}/{NODE_START_ATTEMPTS})")

    def stop(*_) -> None:
        node.kill_all_processes(check_alive=False, allow_graceful=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    while not node.dead_processes():
        time.sleep(1)
    node.kill_all_processes(check_alive=False, allow_graceful=False)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("up", "down", "env", "status", "dvc-remote"))
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="cluster state directory")
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (up)")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs per worker (up)")
    parser.add_argument("--experiment", default="fusemoe", help="MLflow experiment to create")
    if argv is None and sys.argv[1:2] == ["node"]:
        serve_node(json.loads(sys.argv[2]))
        return 0
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            cluster = LocalCluster(
                args.dir, args.workers, args.cpus_per_worker, experiment=args.experiment
            ).start()
            print(
                f"local cluster up: Ray {cluster.ray_address} (dashboard {cluster.dashboard_url}, "
                f"{cluster.num_workers} worker nodes), MLflow {cluster.tracking_uri}, "
                f"S3 {cluster.s3_endpoint} bucket {BUCKET}; passwords in {cluster.secrets_dir}/\n"
                f'use it from a shell: eval "$(python -m ray_jobs.local_cluster env)"'
            )
        elif args.command == "dvc-remote":
            LocalCluster.load(args.dir).configure_dvc_remote(".")
            print("DVC remote 'cluster' (default) set in .dvc/config.local")
        elif args.command == "env":
            print(LocalCluster.load(args.dir).exports())
        elif args.command == "status":
            cluster = LocalCluster.load(args.dir)
            print(json.dumps(cluster.state | {"alive_nodes": len(cluster.alive_nodes())}, indent=2))
        else:
            try:
                cluster = LocalCluster.load(args.dir)
            except FileNotFoundError:
                print(f"no cluster in {args.dir}: nothing to stop")
                return 0
            cluster.stop()
            print("local cluster down")
    except (FileNotFoundError, RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
