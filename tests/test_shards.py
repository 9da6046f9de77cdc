"""Shard files, the manifest and their verification."""

import hashlib
import json
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from augsvhn import __version__
from augsvhn.cli import cli
from augsvhn.errors import DataError
from augsvhn.shards import (
    list_complete_shards,
    manifest_entry,
    read_manifest,
    read_shard,
    shard_relative_path,
    verify_shards,
    write_manifest,
    write_shard,
)


def attributes(cluster=0, shard_index=0, **changes):
    values = {
        "cluster": cluster, "shard_index": shard_index, "seed": 3, "sampler": "heun", "steps": 18, "nfe": 35,
        "sde": '{"name":"ve"}', "guidance": 0.0, "label_mode": "uniform", "checkpoint_sha256": "ab" * 32,
        "augsvhn_version": __version__,
    }
    values.update(changes)
    return values


def contents(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)


def make_folder(folder, clusters=(0, 1), counts=(70, 30)):
    """Write shards of `counts` images for each cluster and their manifest, as `augsvhn generate` does."""
    entries = []
    for cluster in clusters:
        for index, n in enumerate(counts):
            images, labels = contents(n, seed=100 * cluster + index)
            path = folder / shard_relative_path(cluster, index)
            sha256 = write_shard(path, images, labels, attributes(cluster, index))
            entries.append(manifest_entry(cluster, index, sha256, labels))
    settings = {"seed": 3, "sampler": "heun", "steps": 18, "guidance": 0.0, "label_mode": "uniform",
                "clusters": {str(k): {"checkpoint_sha256": "ab" * 32, "sde": '{"name":"ve"}'} for k in clusters}}
    write_manifest(folder, entries, settings)
    return folder


def test_shard_round_trip(tmp_path):
    images, labels = contents(70, seed=0)
    path = tmp_path / "cluster-2" / "shard-00004.h5"
    sha256 = write_shard(path, images, labels, attributes(2, 4, extra="kept"))

    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    shard = read_shard(path)
    np.testing.assert_array_equal(shard.images, images)
    np.testing.assert_array_equal(shard.labels, labels)
    assert shard.labels.dtype == np.uint8
    assert shard.attributes == attributes(2, 4, extra="kept")
    assert list(tmp_path.rglob(".*")) == []

    with h5py.File(path) as file:
        assert file["images"].chunks == (64, 32, 32, 3)
        assert file["images"].compression == "gzip"
        assert file["images"].compression_opts == 4
        assert file["images"].shuffle


def test_same_contents_same_bytes(tmp_path):
    images, labels = contents(30, seed=1)
    write_shard(tmp_path / "a.h5", images, labels, attributes())
    time.sleep(1.1)  # HDF5 timestamps have one-second resolution: a tracked time would now differ
    write_shard(tmp_path / "b.h5", images, labels, attributes())
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_write_shard_rejects_bad_contents(tmp_path):
    images, labels = contents(5, seed=2)
    with pytest.raises(ValueError, match="uint8 of shape"):
        write_shard(tmp_path / "x.h5", images.astype(np.float32), labels, attributes())
    with pytest.raises(ValueError, match="digits 0-9"):
        write_shard(tmp_path / "x.h5", images, labels + 10, attributes())
    with pytest.raises(ValueError, match="missing checkpoint_sha256"):
        write_shard(tmp_path / "x.h5", images, labels, {k: v for k, v in attributes().items() if k != "checkpoint_sha256"})
    assert list(tmp_path.iterdir()) == []


def test_list_complete_shards_skips_temporary(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "cluster-0" / ".shard-00002.h5.tmp-77").write_bytes(b"x")
    (tmp_path / "cluster-0" / "notes.txt").write_text("x")
    listed = [(cluster, index) for cluster, index, _ in list_complete_shards(tmp_path)]
    assert listed == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_verify_clean_folder(tmp_path):
    make_folder(tmp_path)
    assert verify_shards(tmp_path) == []
    manifest = read_manifest(tmp_path)
    assert manifest["total_images"] == 200
    assert manifest["augsvhn_version"] == __version__


def test_verify_flipped_bit(tmp_path):
    make_folder(tmp_path)
    path = tmp_path / "cluster-1" / "shard-00000.h5"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify_shards(tmp_path)
    assert problems
    assert all(problem.startswith("cluster-1/shard-00000.h5: ") for problem in problems)
    assert "does not match the manifest" in problems[0]


def test_verify_missing_and_extra_shard(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "cluster-0" / "shard-00001.h5").unlink()
    images, labels = contents(3, seed=9)
    write_shard(tmp_path / "cluster-0" / "shard-00007.h5", images, labels, attributes(0, 7))
    assert verify_shards(tmp_path) == [
        "cluster-0/shard-00001.h5: shard file is missing",
        "cluster-0/shard-00007.h5: shard file is not listed in manifest.json",
    ]


def test_verify_wrong_attribute(tmp_path):
    make_folder(tmp_path)
    path = tmp_path / "cluster-0" / "shard-00000.h5"
    with h5py.File(path, "r+") as file:
        file.attrs["seed"] = 4
    problems = verify_shards(tmp_path)
    assert "cluster-0/shard-00000.h5: attribute 'seed' is 4, the manifest says 3" in problems
    assert any("SHA-256" in problem for problem in problems)


def test_verify_wrong_labels_and_count(tmp_path):
    make_folder(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["count"] = 71
    manifest["shards"][1]["label_counts"] = [3] * 10
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_shards(tmp_path)
    assert "cluster-0/shard-00000.h5: contains 70 images and 70 labels, the manifest lists 71" in problems
    assert any(problem.startswith("cluster-0/shard-00001.h5: label counts") for problem in problems)


def test_verify_missing_attribute_and_bad_labels(tmp_path):
    make_folder(tmp_path)
    path = tmp_path / "cluster-1" / "shard-00001.h5"
    with h5py.File(path, "r+") as file:
        del file.attrs["sampler"]
        file["labels"][0] = 12
    problems = verify_shards(tmp_path)
    assert "cluster-1/shard-00001.h5: attribute 'sampler' is missing" in problems
    assert "cluster-1/shard-00001.h5: labels contain 12, expected digits 0-9" in problems


def test_verify_without_manifest(tmp_path):
    problems = verify_shards(tmp_path)
    assert len(problems) == 1
    assert "manifest.json not found" in problems[0]


def test_read_manifest_rejects_other_json(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": "something else"}')
    with pytest.raises(DataError, match="not an augsvhn shards manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read"):
        read_manifest(tmp_path)


def test_cli_verify(tmp_path):
    make_folder(tmp_path)
    result = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "4 shards, 200 images, all valid" in result.output

    (tmp_path / "cluster-1" / "shard-00001.h5").unlink()
    result = CliRunner().invoke(cli, ["verify", str(tmp_path)])
    assert result.exit_code == 1
    assert "cluster-1/shard-00001.h5: shard file is missing" in result.output
    assert "1 problem(s)" in result.output


def test_cli_show(tmp_path):
    make_folder(tmp_path / "shards", clusters=(0, 3))
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli, ["show", str(tmp_path / "shards"), "--out", str(out), "--rows-per-cluster", "3"])
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.height > image.width / 10 * 6 * 0.5  # 6 rows of 10 images, with titles


@pytest.mark.parametrize(("name", "expected"), [("grid.txt", "the suffix '.txt'"), ("grid", "no suffix")])
def test_cli_show_rejects_unknown_format(tmp_path, name, expected):
    make_folder(tmp_path / "shards")
    result = CliRunner().invoke(cli, ["show", str(tmp_path / "shards"), "--out", str(tmp_path / name)])
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "ending in .png" in result.output
    assert not (tmp_path / name).exists()
    assert not (tmp_path / (name + ".png")).exists()


def test_cli_show_svg(tmp_path):
    make_folder(tmp_path / "shards")
    out = tmp_path / "grid.svg"
    result = CliRunner().invoke(cli, ["show", str(tmp_path / "shards"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert out.read_text().lstrip().startswith("<?xml")


def test_preview_columns_follow_digits():
    from augsvhn.shards import _arrange_by_digit

    labels = np.array([3, 0, 1, 0, 2, 5, 5, 5])
    chosen = _arrange_by_digit(labels, rows=2, columns=4)
    # Row 1: digits 0, 1, 2, 3 in order; row 2: the second 0, then no 1/2/3 left, so the remaining 5s.
    assert [labels[i] for i in chosen[:4]] == [0, 1, 2, 3]
    assert chosen[4] == 3
    assert [labels[i] for i in chosen[5:]] == [5, 5, 5]
    assert _arrange_by_digit(np.array([7]), rows=1, columns=3)[1:] == [None, None]
