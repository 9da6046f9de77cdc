"""The experiment folder (WORKDIR) and its settings file WORKDIR/config.json.

Layout:
    WORKDIR/config.json             settings shared by the commands, for example `svhn_root` after `augsvhn cluster`
    WORKDIR/clusters.*              colour clusters of the training images (see augsvhn.clusters)
    WORKDIR/models/cluster-<k>/     training run of the model for cluster k
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from augsvhn.errors import DataError
from augsvhn.fsutil import atomic_write_json

CONFIG_NAME = "config.json"


def config_path(workdir: str | os.PathLike) -> Path:
    """Return the path of the settings file of `workdir`."""
    return Path(workdir) / CONFIG_NAME


def cluster_model_dir(workdir: str | os.PathLike, cluster: int) -> Path:
    """Return the training folder of the model for colour cluster `cluster`: WORKDIR/models/cluster-<cluster>."""
    return Path(workdir) / "models" / f"cluster-{int(cluster)}"


def load_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """Return the settings stored in WORKDIR/config.json, or {} when the file does not exist.

    Raises DataError when the file exists but is not a JSON object.
    """
    path = config_path(workdir)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read workdir settings {path}: {error}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"workdir settings {path} is not valid JSON ({error}); fix or delete it") from None
    if not isinstance(config, dict):
        raise DataError(f"workdir settings {path} contains a JSON {type(config).__name__}; expected an object")
    return config


def update_config(workdir: str | os.PathLike, **values: Any) -> dict[str, Any]:
    """Set `values` in WORKDIR/config.json, keep the other keys, and return the new settings.

    Path values are stored as strings. The file is replaced atomically (temporary file in the same folder,
    fsync, rename), so a reader never sees a half-written file. The workdir is created if missing.
    """
    # NOTE: two processes updating the same workdir at the same moment can lose one update, because
    # the read and the rename are not under one lock.
    config = load_config(workdir)
    config.update({key: str(value) if isinstance(value, Path) else value for key, value in values.items()})
    atomic_write_json(config_path(workdir), config)
    return config
