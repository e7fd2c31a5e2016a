"""A FlexiModal directory on S3-compatible object storage (a real moto server) reads exactly like
the same directory on local disk, shards and embedding modalities included; a missing one fails
with one clear line."""

import socket

import numpy as np
import pyarrow.fs as pafs
import pytest

from fusemoe.data.dataset import FlexiModalDataset
from fusemoe.data.flexi import FlexiModalError, load_manifest
from fusemoe.data.synthetic import write_synthetic

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_dataset(tmp_path_factory):
    """(local dir, its s3:// URI) after uploading the directory to a fresh moto bucket the way
    the train stage does (ray_jobs.storage.dataset_uri)."""
    from moto.server import ThreadedMotoServer

    from ray_jobs import storage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    try:
        local = tmp_path_factory.mktemp("uri") / "processed"
        write_synthetic(local, num_stays=60, seed=0, note_width=4)  # with a `note` embedding
        endpoint = f"http://127.0.0.1:{port}"
        s3 = pafs.S3FileSystem(
            endpoint_override=endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        s3.create_dir("bucket")
        query = f"endpoint_override={endpoint}&scheme=http&region=us-east-1"
        uri = storage.dataset_uri(local, f"s3://bucket?{query}", "abc")
        assert uri == f"s3://bucket/datasets/abc?{query}"
        yield local, uri
    finally:
        mp.undo()
        server.stop()


def test_a_dataset_on_s3_reads_like_the_local_copy(s3_dataset):
    local, uri = s3_dataset
    assert load_manifest(uri) == load_manifest(local)
    for shard in ((0, 1), (1, 2)):
        a = FlexiModalDataset(uri, "train", shard=shard)
        b = FlexiModalDataset(local, "train", shard=shard)
        assert a.stay_ids == b.stay_ids and a.split_size == b.split_size
        for name in b.series:
            np.testing.assert_array_equal(a.series[name].obs_val, b.series[name].obs_val)
            np.testing.assert_array_equal(a.series[name].row_times, b.series[name].row_times)
        assert list(b.embeddings) == ["note"]
        np.testing.assert_array_equal(a.embeddings["note"].vectors, b.embeddings["note"].vectors)
        np.testing.assert_array_equal(a.embeddings["note"].offsets, b.embeddings["note"].offsets)


def test_a_missing_dataset_on_s3_names_the_file_without_the_endpoint(s3_dataset):
    _, uri = s3_dataset
    missing = uri.replace("datasets/abc", "datasets/nope")
    with pytest.raises(
        FlexiModalError, match=r"^s3://bucket/datasets/nope/manifest.json: file not found$"
    ):
        load_manifest(missing)
