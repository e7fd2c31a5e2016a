"""DVC stage `prepare`: raw data -> FlexiModal directory (`data.out_dir`), written atomically.

`python -m pipelines.prepare [--params params.yaml]` reads only the `data` section:
- source: physionet2012 (the verified raw files in download_dir, filled by the `download` stage
  from a local mirror or PhysioNet),
  synthetic (synthetic.num_stays / synthetic.seed; synthetic.note_width > 0 adds the `note`
  embedding modality the label needs), or flexi (a user's FlexiModal directory in
  flexi_dir, validated and re-written with fresh train-only statistics; a missing `split`
  column is filled by the seeded stratified split, grouped by `subject_id` when present),
  or meds (a MEDS dataset + label file, `data.meds`; see fusemoe/data/meds.py).
- split, seed, los_threshold_days; verify_digests (default true) for modified P12 copies.
Bad input prints one line `error: <file, record/row, column: problem>` and exits 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fusemoe.data.flexi import (
    EVENTS_FILE,
    STAYS_FILE,
    SUBJECT_COLUMN,
    EventsNotGrouped,
    FlexiModalError,
    assign_splits,
    load_manifest,
    read_embeddings,
    read_tables,
    sha256_file,
    write_flexi,
)
from fusemoe.data.schema import embedding_file
from pipelines import config
from pipelines.download import DEFAULT_DIR as DOWNLOAD_DIR

SOURCES = config.DATA_SOURCES


SPILL_PREFIX = ".prepare-events-"  # + "<pid>-<random>": a killed run's spill is found by its pid


def remove_stale_spills(parent: Path) -> None:
    """Spill directories of prepare runs that were killed (SIGKILL skips their clean-up)."""
    import psutil

    for d in parent.glob(f"{SPILL_PREFIX}*"):
        pid = d.name[len(SPILL_PREFIX) :].split("-")[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def prepare(data: dict, params_file: str = "params.yaml") -> dict:
    """Build `data.out_dir` from the `data` params; returns the written manifest."""
    source = data.get("source", "physionet2012")
    out_dir = data.get("out_dir", "data/processed")
    split = list(data.get("split", [0.7, 0.15, 0.15]))
    seed = int(data.get("seed", 0))
    threshold = float(data.get("los_threshold_days", 7))
    if source == "physionet2012":
        from fusemoe.data.physionet2012 import read_physionet2012

        # The parsed events wait on disk beside the output until the stays are known, then
        # stream through write_flexi: memory follows a parse chunk, not the data set.
        parent = Path(out_dir).resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_spills(parent)
        prefix = f"{SPILL_PREFIX}{os.getpid()}-"
        with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as spill:
            stays, events, manifest = read_physionet2012(
                data.get("download_dir") or DOWNLOAD_DIR,
                split=split,
                seed=seed,
                los_threshold_days=threshold,
                verify=bool(data.get("verify_digests", True)),
                spill_dir=spill,
            )
            return write_flexi(out_dir, stays, events, manifest)
    if source == "synthetic":
        from fusemoe.data.synthetic import synthesize

        syn = data.get("synthetic") or {}
        stays, events, manifest, embeddings = synthesize(
            num_stays=int(syn.get("num_stays", 2000)),
            seed=int(syn.get("seed", 0)),
            missingness=syn.get("missingness"),
            split=split,
            los_threshold_days=threshold,
            note_width=int(syn.get("note_width", 0)),
        )
        return write_flexi(out_dir, stays, events, manifest, embeddings=embeddings)
    if source == "flexi":
        flexi_dir = Path(data.get("flexi_dir") or "")
        if not str(data.get("flexi_dir") or ""):
            raise FlexiModalError(
                params_file, "data.flexi_dir must be set when data.source is flexi"
            )
        if flexi_dir.resolve() == Path(out_dir).resolve():
            raise FlexiModalError(params_file, "data.flexi_dir and data.out_dir must differ")
        manifest = load_manifest(flexi_dir)
        stays, events = read_tables(flexi_dir, batches=True)  # events read batch by batch
        embeddings = read_embeddings(flexi_dir, manifest)
        if "split" not in stays.column_names:
            binary = [t["column"] for t in manifest["tasks"] if t["kind"] == "binary"]
            group = SUBJECT_COLUMN if SUBJECT_COLUMN in stays.column_names else None
            names = assign_splits(
                stays.to_pandas(), split, seed, binary[0] if binary else None, group_col=group
            )
            stays = stays.add_column(1, "split", [names.tolist()])
            manifest["split"] = {"fractions": split, "seed": seed, "stratify": binary[:1]}
        manifest.setdefault("source", f"flexi:{flexi_dir}")
        files = [STAYS_FILE, EVENTS_FILE] + [embedding_file(m) for m in embeddings]
        manifest["source_hashes"] = {name: sha256_file(flexi_dir / name) for name in files}
        names = (str(flexi_dir / STAYS_FILE), str(flexi_dir / EVENTS_FILE))
        kwargs = {
            "names": names,
            "embeddings": embeddings,
            "embedding_names": {m: str(flexi_dir / embedding_file(m)) for m in embeddings},
        }
        try:
            return write_flexi(out_dir, stays, events, manifest, **kwargs)
        except EventsNotGrouped:  # rows not kept together by stay: checked as one table
            events = read_tables(flexi_dir)[1]
            return write_flexi(out_dir, stays, events, manifest, **kwargs)
    if source == "meds":
        from fusemoe.data.meds import read_meds

        stays, events, manifest = read_meds(data["meds"], split=split, seed=seed)
        names = ("stays (from MEDS labels)", "events (from MEDS data)")
        # sorted by stay: streamed, so the checks' temporaries follow a batch
        return write_flexi(out_dir, stays, events.to_batches(), manifest, names=names)
    raise FlexiModalError(params_file, f"data.source '{source}' is not one of {SOURCES}")


def summary(manifest: dict, out_dir: str, seconds: float) -> str:
    c = manifest["counts"]
    splits = "/".join(str(c["splits"][s]) for s in ("train", "val", "test"))
    rates = [
        f"{name} {r['positive_rate']['all']:.1%}"
        for name, r in manifest["label_rates"].items()
        if "positive_rate" in r and r["positive_rate"]["all"] is not None
    ]
    missing = ", ".join(
        f"{m} {v['all']:.1%}" for m, v in manifest["missingness"]["modality"].items()
    )
    return (
        f"prepare: {manifest['source']} -> {out_dir}: {c['stays']} stays (train/val/test {splits}), "
        f"{c['events']:,} events; positive rate {', '.join(rates)}; modality missing {missing} "
        f"[{seconds:.1f} s]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
    args = parser.parse_args(argv)
    try:
        data = config.load(args.params, ("data",))["data"]
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        manifest = prepare(data, args.params)
    except FlexiModalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary(manifest, data.get("out_dir", "data/processed"), time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
