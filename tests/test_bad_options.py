"""Invalid command-line options end in a click usage error (exit 2) that names the option and the allowed values."""

import numpy as np
import pytest
from click.testing import CliRunner

from augsvhn import clusters as clusters_module
from augsvhn.cli import cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir with a 2-cluster file, enough for `train` to check --cluster (no SVHN data is read)."""
    folder = tmp_path_factory.mktemp("work")
    settings = clusters_module.HistogramSettings()
    clusters_module.save_clusters(
        folder,
        clusters_module.ClusterAssignment(
            k=2, assignment=np.arange(10) % 2, centroids=np.zeros((2, settings.num_features)),
            mean_colours=np.zeros((2, 3)), histogram=settings, data_fingerprint="0" * 64, svhn_root="", seed=0,
            n_init=1, inertia=0.0,
        ),
    )
    return folder


# (command, option, value, texts the message must contain)
CASES = [
    ("generate", "--per-cluster", "0", ["'--per-cluster'", "0 is not in the range x>=1"]),
    ("generate", "--per-cluster", "-5", ["'--per-cluster'", "x>=1"]),
    ("generate", "--per-cluster", "many", ["'--per-cluster'", "'many' is not a valid integer"]),
    ("generate", "--shard-size", "0", ["'--shard-size'", "x>=1"]),
    ("generate", "--batch-size", "-1", ["'--batch-size'", "'-1'"]),
    ("generate", "--steps", "0", ["'--steps'", "x>=1"]),
    ("generate", "--seed", "-1", ["'--seed'", "x>=0"]),
    ("generate", "--sampler", "magic", ["'--sampler'", "'magic' is not one of", "'heun'", "'dpm2m'", "'pc'", "'em'",
                                        "'ode'"]),
    ("generate", "--guidance", "strong", ["'--guidance'", "'strong' is not a valid float"]),
    ("generate", "--guidance", "-0.5", ["'--guidance'", "x>=0"]),
    ("generate", "--guidance", "nan", ["'--guidance'", "'nan' is not a finite number"]),
    ("generate", "--guidance", "inf", ["'--guidance'", "'inf' is not a finite number"]),
    ("generate", "--clusters", "a,b", ["'--clusters'", "not a comma-separated list"]),
    ("generate", "--clusters", "-1", ["'--clusters'", ">= 0"]),
    ("generate", "--label-mode", "skewed", ["'--label-mode'", "'uniform'", "'cluster'"]),
    ("generate", "--device", "tpu", ["'--device'", "'auto'", "'cpu'", "'cuda'"]),
    ("train", "--sde", "brownian", ["'--sde'", "'ve'", "'vp'", "'subvp'"]),
    ("train", "--loss", "l2", ["'--loss'", "'edm'", "'dsm'"]),
    ("train", "--model-size", "huge", ["'--model-size'", "'tiny'", "'small'", "'base'"]),
    ("train", "--max-steps", "0", ["'--max-steps'", "x>=1"]),
    ("train", "--epochs", "-2", ["'--epochs'", "x>=1"]),
    ("train", "--batch-size", "0", ["'--batch-size'", "x>=1"]),
    ("train", "--lr", "0", ["'--lr'", "x>0"]),
    ("train", "--lr", "fast", ["'--lr'", "'fast' is not a valid float"]),
    ("train", "--lr", "nan", ["'--lr'", "not a finite number"]),
    ("train", "--sigma-max", "inf", ["'--sigma-max'", "not a finite number"]),
    ("train", "--label-dropout", "1", ["'--label-dropout'", "0<=x<1"]),
    ("train", "--checkpoint-every", "0", ["'--checkpoint-every'", "x>=1"]),
    ("train", "--cluster", "7", ["'--cluster'", "cluster '7' does not exist", "choose one of all, 0, 1"]),
    ("train", "--cluster", "first", ["'--cluster'", "cluster 'first' does not exist", "choose one of all, 0, 1"]),
    ("cluster", "--k", "1", ["'--k'", "x>=2"]),
    ("cluster", "--bins", "0", ["'--bins'", "1<=x<=256"]),
    ("cluster", "--n-init", "0", ["'--n-init'", "x>=1"]),
    ("show", "--rows-per-cluster", "0", ["'--rows-per-cluster'", "x>=1"]),
]


def command_line(command: str, workdir, tmp_path) -> list[str]:
    """Return a valid command line of `command`, to which one invalid option is appended."""
    if command == "generate":
        return ["generate", "--workdir", str(workdir), "--out", str(tmp_path / "out"), "--per-cluster", "2"]
    if command == "train":
        return ["train", "--workdir", str(workdir)]
    if command == "cluster":
        return ["cluster", "--workdir", str(tmp_path / "new"), "--svhn-root", str(tmp_path)]
    (tmp_path / "shards").mkdir()
    return ["show", str(tmp_path / "shards"), "--out", str(tmp_path / "grid.png")]


@pytest.mark.parametrize(("command", "option", "value", "expected"), CASES, ids=lambda case: str(case))
def test_bad_option_is_usage_error(workdir, tmp_path, command, option, value, expected):
    result = CliRunner().invoke(cli, command_line(command, workdir, tmp_path) + [option, value])
    assert result.exit_code == 2, result.output
    assert "Usage: " in result.output
    assert "Traceback" not in result.output
    message = " ".join(result.output.split())  # click wraps long messages
    for text in expected:
        assert text in message
    assert not (tmp_path / "out").exists()
    assert not (workdir / "models").exists()
