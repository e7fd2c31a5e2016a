"""Submit a pipeline stage to a running Ray cluster as a Ray Job (the laptop -> cluster path).

    python -m ray_jobs.submit --address http://head:8265 [--params params.yaml] [--follow] -- train
    python -m ray_jobs.submit --address http://head:8265 -- dvc repro train

A single stage name (prepare, train, evaluate, register, tune) becomes
`python -m pipelines.<stage> --params <params>`; anything else after `--` is run verbatim. The
project directory is uploaded as the job's working_dir, without the virtualenv, data, run outputs
and git history: on the cluster, checkpoints and the prepared dataset live on the storage named
by ray.storage_path (e.g. s3://...) and MLflow is a server given by MLFLOW_TRACKING_URI.

Nothing secret travels with the job: its runtime_env is job metadata, readable by anyone who can
reach the dashboard or the Jobs API. Credentials (AWS keys, MLflow user and password) come from
the environment of the cluster's nodes (`ray_jobs.local_cluster` starts its raylets with them;
the KubeRay manifest reads them from Secrets).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys

from ray_jobs.storage import require_reachable_tracking

STAGES = ("prepare", "train", "evaluate", "register", "tune")
EXCLUDES = [
    ".venv",
    "data",
    "runs",
    "mlruns",
    "mlflow.db",
    ".git",
    ".dvc/cache",
    ".dvc/tmp",
    "__pycache__",
    "*.egg-info",
]
# Passed from the submitting shell to the job when set there: addresses only, never credentials.
PASSTHROUGH_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)


def entrypoint(command: list[str], params: str = "params.yaml") -> str:
    """The job's shell command: a known stage name maps to its pipelines module."""
    if not command:
        raise ValueError("nothing to run: give a stage name or a command after `--`")
    if len(command) == 1 and command[0] in STAGES:
        return f"python -m pipelines.{command[0]} --params {shlex.quote(params)}"
    return shlex.join(command)


def submission(
    command: list[str],
    params: str = "params.yaml",
    working_dir: str = ".",
    env: dict[str, str] | None = None,
    submission_id: str | None = None,
) -> dict:
    """Keyword arguments for JobSubmissionClient.submit_job; pure, so it is testable offline."""
    env = os.environ if env is None else env
    env_vars = {k: env[k] for k in PASSTHROUGH_ENV if env.get(k)}
    env_vars |= {"DVC_NO_ANALYTICS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    kwargs = {
        "entrypoint": entrypoint(command, params),
        "runtime_env": {
            "working_dir": working_dir,
            "excludes": list(EXCLUDES),
            "env_vars": env_vars,
        },
        # The driver only coordinates: it must not hold a CPU that a training worker needs.
        "entrypoint_num_cpus": 0,
    }
    if submission_id:
        kwargs["submission_id"] = submission_id
    return kwargs


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, command = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        help="Ray dashboard address, e.g. http://head:8265 (default $RAY_API_SERVER_ADDRESS)",
    )
    parser.add_argument("--params", default="params.yaml", help="params file inside the project")
    parser.add_argument("--working-dir", default=".", help="project directory to upload")
    parser.add_argument("--submission-id", default=None, help="job id (default: generated)")
    parser.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    args = parser.parse_args(ours)
    if not args.address:
        parser.error("--address (or RAY_ADDRESS) is required")
    try:  # MLFLOW_TRACKING_URI unset here: the cluster's own setting decides (the stage checks it)
        require_reachable_tracking(os.environ.get("MLFLOW_TRACKING_URI", "http:"), args.address)
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        kwargs = submission(
            command, args.params, args.working_dir, submission_id=args.submission_id
        )
    except ValueError as e:
        parser.error(str(e))

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(**kwargs)
    print(job_id)
    if not args.follow:
        print(
            f"follow with: ray job logs --address {args.address} --follow {job_id}", file=sys.stderr
        )
        return 0
    asyncio.run(_follow(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
