"""S3 only through cluster.storage: fetch_uri, the one S3 reader for inputs (jobs hands zebra.data the
local copy): an object, a folder of objects, missing ones named in the error; and the storage
locations handed to Ray Tune (moto's in-process S3)."""
import boto3
import pytest
from moto import mock_aws

from cluster.storage import fetch_uri
from zebra.data import load_texts


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("ZEBRA_CACHE", str(tmp_path / "cache"))
    with mock_aws():
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="corpus")
        s3.put_object(Bucket="corpus", Key="web/a.jsonl", Body=b'{"text": "one"}\n{"text": "two"}\n')
        s3.put_object(Bucket="corpus", Key="web/sub/b.jsonl", Body=b'{"text": "three"}\n')
        yield s3


def test_object_and_folder_land_in_the_cache(bucket, tmp_path):
    one = fetch_uri("s3://corpus/web/a.jsonl")
    assert one == tmp_path / "cache/data/s3/corpus/web/a.jsonl"
    assert load_texts(str(one)) == ["one", "two"]
    folder = fetch_uri("s3://corpus/web/")
    assert folder == tmp_path / "cache/data/s3/corpus/web"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == ["a.jsonl", "sub/b.jsonl"]
    bucket.delete_object(Bucket="corpus", Key="web/sub/b.jsonl")
    assert not (fetch_uri("s3://corpus/web") / "sub/b.jsonl").exists()  # a fresh copy, not the stale one


@pytest.mark.parametrize("uri, named", [("s3://corpus/none/", "s3://corpus/none/: no such object"),
                                        ("s3://corpus/web/zz.jsonl", "s3://corpus/web/zz.jsonl: no such object"),
                                        ("s3://nobucket/web", "s3://nobucket: .* does not exist")])
def test_missing_is_named(bucket, uri, named):
    with pytest.raises(FileNotFoundError, match=named):
        fetch_uri(uri)


def test_pyarrow_locations_for_ray(bucket, tmp_path):
    """Where Ray Tune keeps a search (tune.search): a local folder, or the S3 prefix itself."""
    from cluster.storage import LocalStorage, S3Storage

    assert LocalStorage(tmp_path / "run").pyarrow_location("tune") == (str((tmp_path / "run/tune").resolve()), None)
    assert S3Storage("s3://corpus/team/run").pyarrow_location("tune") == ("s3://corpus/team/run/tune", None)
