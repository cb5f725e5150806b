"""pipeline.storage on its own: the same calls on a local folder and on a bucket of a real S3 API (conftest's `s3`)."""

from __future__ import annotations

import uuid

import pytest

from pipeline.common.config import EbdError
from pipeline.io import storage


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "data")
    return storage.join(request.getfixturevalue("s3"), f"storage-{uuid.uuid4().hex[:8]}")


def test_object_names_with_spaces_percent_hash_and_question_marks_name_themselves(folder):
    names = ["a b.png", "a%41.png", "a#1.png", "a?x.png", "caf\u00e9.png"]
    for i, name in enumerate(names):
        storage.write_bytes(storage.join(folder, "odd", name), bytes([i]) * (i + 1))
    assert [storage.name(p) for p in storage.list_files(storage.join(folder, "odd"))] == sorted(names)
    for i, name in enumerate(names):  # each reads back its own bytes: no name aliases another
        assert storage.read_bytes(storage.join(folder, "odd", name)) == bytes([i]) * (i + 1)


def test_listing_is_sorted_by_path_components_skips_hidden_names_and_matches_suffixes_exactly(folder):
    for rel in ("train/1.tar", "train-x/2.tar", "train/.tmp-3.tar", ".hidden/4.tar", "train/5.TAR", "6.tar"):
        storage.write_bytes(storage.join(folder, *rel.split("/")), b"x")
    listed = [p[len(folder) + 1:] for p in storage.list_files(folder, ".tar")]
    assert listed == ["6.tar", "train/1.tar", "train-x/2.tar"]  # as the local walk always listed them


def test_a_folder_holding_only_a_write_probe_is_still_empty_and_one_with_data_is_not(folder):
    assert storage.is_empty(folder)
    storage.write_bytes(storage.join(folder, f"{storage.PROBE}123"), b"")  # a probe a killed driver left
    assert storage.is_empty(folder)
    storage.write_bytes(storage.join(folder, "run.json"), b"{}")
    assert not storage.is_empty(folder)


def test_a_write_reports_the_size_and_sha256_it_committed(folder):
    import hashlib
    written = storage.write_bytes(storage.join(folder, "x.bin"), b"hello")
    assert written == {"bytes": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    assert storage.file_sha256(storage.join(folder, "x.bin")) == written["sha256"]


def test_a_model_folder_in_a_bucket_is_copied_once_and_again_when_it_changes(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "CACHE_DIR", tmp_path / "cache")
    model = storage.join(s3, f"model-{uuid.uuid4().hex[:8]}")
    storage.write_bytes(storage.join(model, "config.json"), b'{"v": 1}')
    first = storage.local_copy(model)
    assert (first / "config.json").read_bytes() == b'{"v": 1}' and storage.local_copy(model) == first
    storage.write_bytes(storage.join(model, "config.json"), b'{"v": 22}')  # re-exported: new size and time
    second = storage.local_copy(model)
    assert second != first and (second / "config.json").read_bytes() == b'{"v": 22}'
    with pytest.raises(EbdError, match="cannot read s3://ebd-test/nothing-here"):  # one line, no traceback
        storage.local_copy(storage.join(s3, "nothing-here"))


def test_a_cached_model_copy_changed_on_disk_is_fetched_again_not_trusted(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "CACHE_DIR", tmp_path / "cache")
    model = storage.join(s3, f"model-{uuid.uuid4().hex[:8]}")
    storage.write_bytes(storage.join(model, "model.safetensors"), b"weights" * 100)
    copy = storage.local_copy(model)
    (copy / "model.safetensors").write_bytes(b"WEIGHTS" * 100)  # same size, other bytes
    monkeypatch.setattr(storage, "_VERIFIED", set())             # as a new process finds the cache
    assert (storage.local_copy(model) / "model.safetensors").read_bytes() == b"weights" * 100


@pytest.mark.parametrize("evil", ["../../escape.json", "sub/../../escape.json", "/abs.json"])
def test_an_object_key_that_would_leave_the_model_cache_is_refused_in_one_line(s3, tmp_path, monkeypatch, evil):
    import boto3

    monkeypatch.setattr(storage, "CACHE_DIR", tmp_path / "cache")
    prefix = f"model-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")  # the AWS_* environment conftest points at the local S3 server
    client.put_object(Bucket="ebd-test", Key=f"{prefix}/config.json", Body=b"{}")
    client.put_object(Bucket="ebd-test", Key=f"{prefix}/{evil}", Body=b"{}")
    with pytest.raises(EbdError, match="would land outside the local cache") as err:
        storage.local_copy(storage.join(s3, prefix))
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.rglob("*.json")) == []  # nothing written, inside or outside the cache
