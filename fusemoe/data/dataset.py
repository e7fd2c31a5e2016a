"""Torch Dataset over a FlexiModal directory, and the collate that builds the Batch of INTERFACES.md.

Memory-light by construction: Parquet is read once with Arrow, events are sorted by
(stay, time, variable) with numpy, and each series modality is kept as flat arrays plus per-stay
offsets. Observations of different variables at the same time share one time row, so a sample's
series is `values[L, V]` with a mask. Values are z-scored with the manifest's train-only statistics.
An embedding modality is kept as its [R, width] float32 vectors sorted by (stay, time) plus per-stay
offsets; its vectors are used as stored (the model layer-normalises them).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from fusemoe.data.flexi import (
    EVENTS_FILE,
    STAYS_FILE,
    FlexiModalError,
    check_manifest,
    load_manifest,
    norm_arrays,
    read_vectors,
    validate_events,
    vector_array,
)
from fusemoe.data.location import resolve
from fusemoe.data.schema import (
    LABEL_TYPES,
    SPLITS,
    embedding_file,
    embedding_modalities,
    embedding_schema,
    series_modalities,
    static_variables,
)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # binary | regression | multiclass | multilabel
    num_outputs: int = 1
    # Regression: the train split's target mean and std. The head learns the standardised target
    # and the model outputs ``mean + std * head`` (fusemoe.nn.model), so the loss of a target in
    # days weighs like a classification loss instead of swamping it (issue 17).
    target_mean: float = 0.0
    target_std: float = 1.0


@dataclass(frozen=True)
class DataSpec:
    """What the model needs to know about the data: series widths, static width, task heads,
    embedding modality widths."""

    series: dict[str, int]
    static_dim: int
    tasks: list[TaskSpec] = field(default_factory=list)
    static_name: str | None = None  # the static modality's name (its `present` key)
    embeddings: dict[str, int] = field(default_factory=dict)  # embedding modality -> width


def dataset_spec(manifest: dict) -> DataSpec:
    return DataSpec(
        series={m["name"]: len(m["variables"]) for m in series_modalities(manifest)},
        static_dim=len(static_variables(manifest)),
        tasks=[TaskSpec(t["name"], t["kind"], int(t["num_outputs"])) for t in manifest["tasks"]],
        static_name=next(
            (m["name"] for m in manifest["modalities"] if m["kind"] == "static"), None
        ),
        embeddings={m["name"]: int(m["width"]) for m in embedding_modalities(manifest)},
    )


def standardise_regression(spec: DataSpec, directory: str | os.PathLike) -> DataSpec:
    """`spec` with each regression task's ``target_mean``/``target_std`` from the labelled stays
    of the whole train split (every rank computes the same, whatever its shard)."""
    if not any(t.kind == "regression" for t in spec.tasks):
        return spec
    column = {t["name"]: t["column"] for t in load_manifest(directory)["tasks"]}
    wanted = ["split", *(column[t.name] for t in spec.tasks if t.kind == "regression")]
    fs, path = resolve(directory)
    stays = pq.read_table(f"{path}/{STAYS_FILE}", filesystem=fs, columns=wanted)
    stays = _select_stays(stays, "train", 0)
    tasks = []
    for t in spec.tasks:
        if t.kind == "regression":
            y = _label_array(stays.column(column[t.name]), {"kind": t.kind})
            y = y[~np.isnan(y)]
            if y.size < 2 or not np.std(y) > 0:
                raise ValueError(
                    f"task {t.name!r}: standardising its target needs labelled train stays "
                    f"with at least two distinct values, found {y.size} labelled"
                )
            t = dataclasses.replace(t, target_mean=float(y.mean()), target_std=float(y.std()))
        tasks.append(t)
    return dataclasses.replace(spec, tasks=tasks)


def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    arr = col.combine_chunks()
    if not pa.types.is_dictionary(arr.type):
        arr = pc.dictionary_encode(arr)
    codes = arr.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    return codes, arr.dictionary.to_pylist()


@dataclass
class _Series:
    """One modality of a split: time rows and observations, both grouped by stay via offsets."""

    num_vars: int
    row_times: np.ndarray  # f32[R]
    row_offsets: np.ndarray  # i64[N+1]
    obs_row: np.ndarray  # i32[O], global time row of each observation
    obs_var: np.ndarray  # i16[O]
    obs_val: np.ndarray  # f32[O], z-scored
    obs_offsets: np.ndarray  # i64[N+1]


@dataclass
class _Embedding:
    """One embedding modality of a split: vectors sorted by (stay, time), grouped by offsets."""

    times: np.ndarray  # f32[R]
    vectors: np.ndarray  # f32[R, width]
    offsets: np.ndarray  # i64[N+1]


class FlexiModalDataset(Dataset):
    """Stays of one split (`split=None` or "all" for every stay) of a FlexiModal directory.

    `directory` is a local path or a pyarrow URI (``s3://bucket/dir?endpoint_override=...``).
    `tasks` restricts the labels returned (default: all tasks of the manifest); `max_stays > 0`
    keeps only the first stays in file order (quick runs). `shard=(rank, world)` keeps every
    world-th of those stays from the rank-th on, so the ranks of a data-parallel group hold
    disjoint shards whose union is the split; ``split_size`` is the split's size before sharding.
    Only the events of the kept stays are read (a pyarrow filter, applied while scanning).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        split: str | None,
        tasks: list[str] | None = None,
        max_stays: int = 0,
        shard: tuple[int, int] = (0, 1),
    ):
        self.directory = directory
        manifest = load_manifest(directory)
        fs, path = resolve(directory)
        stays = pq.read_table(f"{path}/{STAYS_FILE}", filesystem=fs)
        stays = _select_stays(stays, split, max_stays)
        self.split_size = stays.num_rows
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard rank {rank} outside a world of {world}")
        if world > 1:
            stays = stays.take(np.arange(rank, stays.num_rows, world))
        only_kept = (
            None
            if split in (None, "all") and world == 1
            # combine_chunks: an empty shard's ids must stay a typed (string) value set
            else pc.field("stay_id").isin(stays.column("stay_id").combine_chunks())
        )
        events = pq.read_table(
            f"{path}/{EVENTS_FILE}",
            filesystem=fs,
            read_dictionary=["stay_id", "modality", "variable"],
            filters=only_kept,
        )
        kept = None if only_kept is None else stays.column("stay_id").combine_chunks()
        embeddings = {
            m["name"]: read_vectors(f"{path}/{embedding_file(m['name'])}", fs, kept)
            for m in embedding_modalities(manifest)
        }
        self._setup(stays, events, manifest, None, tasks, 0, embeddings)
        self.split = split

    @classmethod
    def from_tables(
        cls,
        stays: pa.Table,
        events: pa.Table,
        manifest: dict,
        tasks: list[str] | None = None,
    ) -> FlexiModalDataset:
        """All stays of in-memory tables (e.g. records to score), normalised with `manifest`.

        Events are validated strictly against the manifest (FlexiModalError); stays need only
        unique stay ids and the static columns; label columns may be absent or all null.
        Embedding modalities are not read here: the model sees them as missing.
        """
        check_manifest(manifest, "manifest")
        stays = _inference_stays(stays, manifest)
        validate_events(events, stays, manifest, "records", "records")
        self = cls.__new__(cls)
        self.directory = None
        self._setup(stays, events, manifest, None, tasks, 0)
        return self

    def _setup(
        self,
        stays: pa.Table,
        events: pa.Table,
        manifest: dict,
        split: str | None,
        tasks: list[str] | None,
        max_stays: int,
        embeddings: dict[str, pa.Table] | None = None,
    ) -> None:
        self.manifest = manifest
        self.split = split
        all_tasks = {t["name"]: t for t in manifest["tasks"]}
        names = list(all_tasks) if tasks is None else list(tasks)
        missing = [t for t in names if t not in all_tasks]
        if missing:
            raise ValueError(f"unknown task(s) {missing}; the manifest has {list(all_tasks)}")
        self.tasks = [all_tasks[t] for t in names]
        self.spec = dataset_spec(manifest)

        stays = _select_stays(stays, split, max_stays)
        self.stay_ids: list[str] = stays.column("stay_id").to_pylist()
        n = len(self.stay_ids)
        self.labels = {t["name"]: _label_array(stays.column(t["column"]), t) for t in self.tasks}

        self.static_name: str | None = None
        static_vars = static_variables(manifest)
        if static_vars:
            self.static_name = next(
                m["name"] for m in manifest["modalities"] if m["kind"] == "static"
            )
            mean, std = norm_arrays(manifest, self.static_name)
            raw = np.stack(
                [stays.column(v).to_numpy(zero_copy_only=False) for v in static_vars], axis=1
            ).astype(np.float32)
            self.static_mask = np.isfinite(raw).astype(np.float32)
            self.static_values = np.where(self.static_mask > 0, (raw - mean) / std, 0.0).astype(
                np.float32
            )

        stay_codes, stay_dict = _codes(events.column("stay_id"))
        local = pc.index_in(
            pa.array(stay_dict, pa.string()), value_set=pa.array(self.stay_ids, pa.string())
        )
        stay = local.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)[stay_codes]
        keep = stay >= 0
        mod_codes, mod_dict = _codes(events.column("modality"))
        var_codes, var_dict = _codes(events.column("variable"))
        time = events.column("time_h").to_numpy()
        value = events.column("value").to_numpy()
        del events
        self.series: dict[str, _Series] = {}
        for m in series_modalities(manifest):
            name, variables = m["name"], m["variables"]
            sel = keep & (mod_codes == (mod_dict.index(name) if name in mod_dict else -1))
            vmap = np.array(
                [variables.index(v) if v in variables else -1 for v in var_dict], dtype=np.int64
            )
            mean, std = norm_arrays(manifest, name)
            self.series[name] = _build_series(
                n, stay[sel], time[sel], vmap[var_codes[sel]], value[sel], mean, std
            )
        self.embeddings: dict[str, _Embedding] = {}
        for m in embedding_modalities(manifest):
            table = (embeddings or {}).get(m["name"])
            if table is None:  # not given (records to score): no vectors, the modality is missing
                table = embedding_schema(m["width"]).empty_table()
            self.embeddings[m["name"]] = _build_embedding(n, self.stay_ids, table, m["width"])

    def __len__(self) -> int:
        return len(self.stay_ids)

    def num_rows(self) -> np.ndarray:
        """Time rows per stay, summed over the series modalities: the padded length a stay
        brings to a batch (``ShardBatches`` buckets by it)."""
        rows = np.zeros(len(self), np.int64)
        for s in self.series.values():
            rows += np.diff(s.row_offsets)
        return rows

    def batch(self, indices) -> dict:
        """``collate([self[i] for i in indices])``, built with one vectorised scatter per
        modality from the flat arrays instead of per-stay dense arrays and a Python loop."""
        idx = np.asarray(indices, np.int64)
        b = idx.size
        batch: dict = {"series": {}, "present": {}}
        for name, s in self.series.items():
            r0, n_rows = s.row_offsets[idx], s.row_offsets[idx + 1] - s.row_offsets[idx]
            o0, n_obs = s.obs_offsets[idx], s.obs_offsets[idx + 1] - s.obs_offsets[idx]
            length = max(1, int(n_rows.max(initial=0)))
            values = np.zeros((b, length, s.num_vars), np.float32)
            mask = np.zeros((b, length, s.num_vars), np.float32)
            times = np.zeros((b, length), np.float32)
            rows, row_of = _ranges(r0, n_rows)
            times[row_of, rows - np.repeat(r0, n_rows)] = s.row_times[rows]
            obs, obs_of = _ranges(o0, n_obs)
            at = (obs_of, s.obs_row[obs] - np.repeat(r0, n_obs), s.obs_var[obs])
            values[at] = s.obs_val[obs]
            mask[at] = 1.0
            batch["series"][name] = {
                "values": torch.from_numpy(values),
                "mask": torch.from_numpy(mask),
                "times": torch.from_numpy(times),
            }
            batch["present"][name] = torch.from_numpy(n_rows > 0)
        # Embedding modalities (FlexiModal 1.1, where the dataset has them): vectors padded like
        # collate's, a row mask, present where a stay has a vector.
        for name, e in self.embeddings.items():
            e0, n_vec = e.offsets[idx], e.offsets[idx + 1] - e.offsets[idx]
            length = max(1, int(n_vec.max(initial=0)))
            values = np.zeros((b, length, e.vectors.shape[1]), np.float32)
            times = np.zeros((b, length), np.float32)
            mask = np.zeros((b, length), np.float32)
            rows, row_of = _ranges(e0, n_vec)
            at = (row_of, rows - np.repeat(e0, n_vec))
            values[at], times[at], mask[at] = e.vectors[rows], e.times[rows], 1.0
            batch.setdefault("embeddings", {})[name] = {
                "values": torch.from_numpy(values),
                "times": torch.from_numpy(times),
                "mask": torch.from_numpy(mask),
            }
            batch["present"][name] = batch["embeddings"][name]["mask"].sum(1) > 0
        if self.static_name is not None:
            mask = torch.from_numpy(self.static_mask[idx])
            batch["static"] = {"values": torch.from_numpy(self.static_values[idx]), "mask": mask}
            batch["present"][self.static_name] = mask.sum(1) > 0
        batch["labels"] = {t: torch.from_numpy(lab[idx]) for t, lab in self.labels.items()}
        batch["stay_id"] = [self.stay_ids[i] for i in idx.tolist()]
        return batch

    def __getitem__(self, i: int) -> dict:
        series = {}
        for name, s in self.series.items():
            r0, r1 = s.row_offsets[i], s.row_offsets[i + 1]
            o0, o1 = s.obs_offsets[i], s.obs_offsets[i + 1]
            values = np.zeros((r1 - r0, s.num_vars), np.float32)
            mask = np.zeros((r1 - r0, s.num_vars), np.float32)
            rows = s.obs_row[o0:o1] - r0
            values[rows, s.obs_var[o0:o1]] = s.obs_val[o0:o1]
            mask[rows, s.obs_var[o0:o1]] = 1.0
            series[name] = {"times": s.row_times[r0:r1], "values": values, "mask": mask}
        embeddings = {
            name: {
                "times": e.times[e.offsets[i] : e.offsets[i + 1]],
                "values": e.vectors[e.offsets[i] : e.offsets[i + 1]],
            }
            for name, e in self.embeddings.items()
        }
        sample = {
            "stay_id": self.stay_ids[i],
            "series": series,
            "embeddings": embeddings,
            "labels": {t: lab[i] for t, lab in self.labels.items()},
        }
        if self.static_name is not None:
            sample["static"] = {
                "modality": self.static_name,
                "values": self.static_values[i],
                "mask": self.static_mask[i],
            }
        return sample


def _ranges(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated ranges ``starts[j] .. starts[j] + counts[j]`` and, for each element,
    its range's position j."""
    of = np.repeat(np.arange(counts.size), counts)
    first = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(first - starts, counts), of


class Batches(Dataset):
    """A ``FlexiModalDataset`` indexed by lists of stays: ``Batches(ds)[indices]`` is their
    collated batch (``FlexiModalDataset.batch``). For ``DataLoader(Batches(ds),
    sampler=<a batch sampler>, batch_size=None, collate_fn=as_batch)``."""

    def __init__(self, dataset: FlexiModalDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices) -> dict:
        return self.dataset.batch(indices)


def as_batch(batch: dict) -> dict:
    """The collate of ``Batches``: its items are batches already."""
    return batch


def _select_stays(stays: pa.Table, split: str | None, max_stays: int) -> pa.Table:
    if split not in (None, "all"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or 'all', got {split!r}")
        stays = stays.filter(pc.equal(stays.column("split"), split))
    return stays.slice(0, max_stays) if max_stays > 0 else stays


RANK_SEED_STRIDE = 1_000_003  # rank r's random streams are offset by r times this (rank 0: none)


class ShardBatches:
    """Batches of one rank's shard for every epoch: a batch sampler for ``DataLoader``.

    Each epoch permutes the shard with a generator seeded ``seed + epoch`` and cuts it into
    ``batch_size`` chunks (the last smaller), exactly as ``DistributedSampler`` + ``DataLoader``
    do with one rank. Every rank must run the same number of steps (gradient all-reduce,
    expert all-to-all), so with shards of unequal size the largest chunk is halved until there
    are ``num_batches``; unlike ``DistributedSampler`` nothing is repeated to pad, so each stay
    is seen exactly once per epoch over all ranks.

    With ``lengths`` (each stay's padded length, ``FlexiModalDataset.num_rows``) batches are
    bucketed: every window of ``BUCKET_WINDOW`` batches of the permutation is sorted by length
    before it is cut, and the batches are then shuffled, so a batch pads to a length close to
    its stays' own (on P12 the mTAND inputs shrink by a third) while each epoch still mixes
    every length and every stay is drawn from the whole shard.
    """

    BUCKET_WINDOW = 16  # batches per sorted window: P12's padding is within 3% of a full sort

    def __init__(
        self,
        shard_size: int,
        batch_size: int,
        num_batches: int,
        seed: int,
        lengths: np.ndarray | None = None,
        rank: int = 0,
    ):
        if shard_size < num_batches:
            raise ValueError(f"{shard_size} stays cannot fill {num_batches} batches")
        if lengths is not None and len(lengths) != shard_size:
            raise ValueError(f"{len(lengths)} lengths for a shard of {shard_size} stays")
        self.shard_size, self.batch_size, self.num_batches = shard_size, batch_size, num_batches
        self.seed, self.epoch, self.rank = seed, 0, rank
        self.lengths = None if lengths is None else torch.as_tensor(lengths)

    @staticmethod
    def per_rank(split_size: int, world: int, batch_size: int) -> int:
        """Batches every rank runs: enough for the largest shard, ceil(split / world) stays."""
        return max(1, math.ceil(math.ceil(split_size / world) / batch_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        # Each rank permutes its shard with its own stream: with one stream, shards of equal
        # size would get the same permutation, and stays r and r + 1 (neighbours across the
        # rank::world shards) would share a step in every epoch.
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch + RANK_SEED_STRIDE * self.rank)
        order = torch.randperm(self.shard_size, generator=g)
        if self.lengths is not None:
            window = self.BUCKET_WINDOW * self.batch_size
            order = torch.cat(
                [w[torch.argsort(self.lengths[w], stable=True)] for w in order.split(window)]
            )
        order = order.tolist()
        chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        while len(chunks) < self.num_batches:
            j = max(range(len(chunks)), key=lambda c: len(chunks[c]))
            half = (len(chunks[j]) + 1) // 2
            chunks[j : j + 1] = [chunks[j][:half], chunks[j][half:]]
        if self.lengths is not None:
            # Shuffled by a permutation of their length ranks that every rank draws alike (all
            # have num_batches), so at each step the ranks run batches of similar length: a
            # data-parallel step waits for its slowest rank.
            longest = [int(self.lengths[c].max()) if c else 0 for c in chunks]
            by_length = sorted(range(len(chunks)), key=lambda j: longest[j])
            same_on_all_ranks = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(len(chunks), generator=same_on_all_ranks).tolist()
            chunks = [chunks[by_length[j]] for j in perm]
        return iter(chunks)


def length_batches(lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """Fixed batches of stays in order of length (for scoring: a stay's prediction does not
    depend on its batch, so grouping similar lengths only cuts the padding)."""
    order = np.argsort(lengths, kind="stable").tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _inference_stays(stays: pa.Table, manifest: dict) -> pa.Table:
    """Stays to score: unique ids, static columns as float32, labels null where not given."""
    if "stay_id" not in stays.column_names:
        raise FlexiModalError("records", "required column is missing", column="stay_id")
    ids = stays.column("stay_id").cast(pa.string())
    counts = pc.value_counts(ids)
    dup = [x["values"] for x in counts.to_pylist() if x["counts"] > 1]
    if dup:
        raise FlexiModalError("records", f"duplicate stay_id '{dup[0]}'", column="stay_id")
    n = stays.num_rows
    cols = {"stay_id": ids, "split": pa.array(["test"] * n, pa.string())}
    for t in manifest["tasks"]:
        col = stays.column(t["column"]) if t["column"] in stays.column_names else None
        if col is None or pa.types.is_null(col.type):
            col = pa.nulls(n, LABEL_TYPES[t["kind"]])
        cols[t["column"]] = col
    for v in static_variables(manifest):
        if v not in stays.column_names:
            cols[v] = pa.nulls(n, pa.float32())
            continue
        try:
            cols[v] = stays.column(v).cast(pa.float32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise FlexiModalError("records", "static values must be numeric", column=v) from None
    return pa.table(cols)


def _label_array(col: pa.ChunkedArray, task: dict) -> np.ndarray:
    """float32 labels with NaN for missing: [N] (binary, regression, class index) or [N, C]."""
    if task["kind"] == "multilabel":
        c = task["num_outputs"]
        rows = col.to_pylist()
        return np.array([r if r is not None else [np.nan] * c for r in rows], np.float32).reshape(
            -1, c
        )
    arr = col.combine_chunks().cast(pa.float32())
    return arr.fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float32)


def _build_series(
    n: int,
    stay: np.ndarray,
    time: np.ndarray,
    var: np.ndarray,
    value: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
) -> _Series:
    order = np.lexsort((var, time, stay))
    stay, time, var, value = stay[order], time[order], var[order], value[order]
    new_row = np.ones(stay.size, bool)
    new_row[1:] = (stay[1:] != stay[:-1]) | (time[1:] != time[:-1])
    return _Series(
        num_vars=len(mean),
        row_times=time[new_row].astype(np.float32),
        row_offsets=np.searchsorted(stay[new_row], np.arange(n + 1)).astype(np.int64),
        obs_row=(np.cumsum(new_row) - 1).astype(np.int32),
        obs_var=var.astype(np.int16),
        obs_val=((value - mean[var]) / std[var]).astype(np.float32),
        obs_offsets=np.searchsorted(stay, np.arange(n + 1)).astype(np.int64),
    )


def _build_embedding(n: int, stay_ids: list[str], table: pa.Table, width: int) -> _Embedding:
    """Vectors of the stays `stay_ids` (others dropped), sorted by (stay, time)."""
    pos = pc.index_in(table.column("stay_id"), value_set=pa.array(stay_ids, pa.string()))
    stay = pos.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    time = table.column("time_h").to_numpy().astype(np.float32)
    keep = np.flatnonzero(stay >= 0)
    order = keep[np.lexsort((time[keep], stay[keep]))]
    return _Embedding(
        times=time[order],
        vectors=vector_array(table.column("vector").take(order), width),  # one copy, in order
        offsets=np.searchsorted(stay[order], np.arange(n + 1)).astype(np.int64),
    )


def collate(samples: list[dict]) -> dict:
    """Pad a list of samples into the Batch dict of docs/INTERFACES.md."""
    b = len(samples)
    first = samples[0]
    batch: dict = {"series": {}, "present": {}}
    for name in first["series"]:
        lengths = [s["series"][name]["times"].shape[0] for s in samples]
        v = first["series"][name]["values"].shape[1]
        length = max(1, max(lengths))
        values = np.zeros((b, length, v), np.float32)
        mask = np.zeros((b, length, v), np.float32)
        times = np.zeros((b, length), np.float32)
        for j, (s, n) in enumerate(zip(samples, lengths, strict=True)):
            x = s["series"][name]
            values[j, :n], mask[j, :n], times[j, :n] = x["values"], x["mask"], x["times"]
        batch["series"][name] = {
            "values": torch.from_numpy(values),
            "mask": torch.from_numpy(mask),
            "times": torch.from_numpy(times),
        }
        batch["present"][name] = torch.tensor([n > 0 for n in lengths], dtype=torch.bool)
    for name in first.get("embeddings", {}):
        batch.setdefault("embeddings", {})[name] = _pad_embedding(
            [s["embeddings"][name] for s in samples]
        )
        batch["present"][name] = batch["embeddings"][name]["mask"].sum(1) > 0
    if "static" in first:
        values = torch.from_numpy(np.stack([s["static"]["values"] for s in samples]))
        mask = torch.from_numpy(np.stack([s["static"]["mask"] for s in samples]))
        batch["static"] = {"values": values, "mask": mask}
        batch["present"][first["static"]["modality"]] = mask.sum(1) > 0
    batch["labels"] = {
        t: torch.from_numpy(np.stack([np.asarray(s["labels"][t], np.float32) for s in samples]))
        for t in first["labels"]
    }
    batch["stay_id"] = [s["stay_id"] for s in samples]
    return batch


def _pad_embedding(records: list[dict]) -> dict:
    """One embedding modality's vectors of a batch: values [B, T, width], times and mask [B, T]
    (padding rows are 0, T = the most vectors of a sample, at least 1)."""
    lengths = [r["times"].shape[0] for r in records]
    length, width = max(1, max(lengths)), records[0]["values"].shape[1]
    values = np.zeros((len(records), length, width), np.float32)
    times = np.zeros((len(records), length), np.float32)
    mask = np.zeros((len(records), length), np.float32)
    for j, (r, n) in enumerate(zip(records, lengths, strict=True)):
        values[j, :n], times[j, :n], mask[j, :n] = r["values"], r["times"], 1.0
    return {
        "values": torch.from_numpy(values),
        "times": torch.from_numpy(times),
        "mask": torch.from_numpy(mask),
    }


def drop_modalities(batch: dict, p: float, generator: torch.Generator | None = None) -> dict:
    """The batch with each present modality of each sample removed with probability ``p``: its
    ``present`` flag is cleared, so the model sees that modality's learned "missing" tokens.
    Used as training augmentation (``train.modality_dropout``) and for test-time MCAR sweeps."""
    if p <= 0:
        return batch
    present = {}
    for m, flags in batch["present"].items():
        keep = torch.rand(flags.shape, generator=generator) >= p
        present[m] = flags & keep.to(flags.device)
    return {**batch, "present": present}


def batch_to(batch, device: torch.device | str):
    """Move every tensor of a (nested) batch to `device`; other values are returned unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(batch_to(v, device) for v in batch)
    return batch
