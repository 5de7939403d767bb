"""Checkpoints: safetensors tensors + a JSON document, written atomically, no pickles.

A checkpoint named `P` is two files: `P.safetensors` (every tensor) and `P.json` (everything
else: format version, model configs, step counters, optimizer hyper-parameters, numpy RNG
states, and the sha256 of the tensor file). Arbitrary nested state — optimizer state dicts,
RNG states — is split by `pack`: tensors go to the safetensors file under their path in the
structure, the rest stays JSON with a reference in its place. Loading never runs code from the
file (safetensors + JSON only), which gives `weights_only` semantics by construction.

The JSON file is written last, so a checkpoint whose JSON exists is complete: a crash in the
middle of a save leaves the previous checkpoint as the newest loadable one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_TENSOR = "__tensor__"
_INTDICT = "__intkeys__"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or of an unsupported format."""


def pack(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Split a nested structure into a JSON-able skeleton and a flat tensor dict.

    Args:
        obj: nested dicts/lists/tuples of tensors and JSON scalars (e.g. an optimizer
            `state_dict()`).
        tensors: receives the tensors, keyed by their path (`prefix.a.0.b`).
        prefix: key prefix for this structure.

    Returns:
        The skeleton: tensors replaced by `{"__tensor__": key}`; dicts with int keys (as in
        optimizer states) kept exactly via `{"__intkeys__": [[k, v], ...]}`.
    """
    if isinstance(obj, torch.Tensor):
        key = prefix
        # safetensors rejects shared or non-contiguous storage: store an independent copy
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        if all(isinstance(k, int) for k in obj):
            return {_INTDICT: [[k, pack(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
        raise TypeError(f"cannot store dict keys of mixed types at {prefix}")
    if isinstance(obj, (list, tuple)):
        return [pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix} in a checkpoint")


def unpack(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `pack` (tuples come back as lists)."""
    if isinstance(skel, dict):
        if _TENSOR in skel and len(skel) == 1:
            return tensors[skel[_TENSOR]]
        if _INTDICT in skel and len(skel) == 1:
            return {int(k): unpack(v, tensors) for k, v in skel[_INTDICT]}
        return {k: unpack(v, tensors) for k, v in skel.items()}
    if isinstance(skel, list):
        return [unpack(v, tensors) for v in skel]
    return skel


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file (used to name the generator behind latents and directions)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], kind: str) -> Path:
    """Write `state` as `path.safetensors` + `path.json`, atomically.

    Args:
        path: checkpoint path without suffix (a `.json`/`.safetensors` suffix is ignored).
        state: nested dict of tensors and JSON values (module state dicts, configs, counters).
        kind: what this is ("gan", "gan-train", "encoder", ...), checked on load.

    Returns:
        Path of the JSON file.
    """
    st_path, js_path = _paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(state, tensors, "s")
    tmp_st = st_path.with_name(st_path.name + ".tmp")
    # One metadata entry: safetensors keeps metadata in a hash map whose order varies between
    # calls, and two entries would make identical weights hash differently.
    save_file(tensors, str(tmp_st), metadata={"format": f"cxredit.{kind}"})
    os.chmod(tmp_st, 0o666 & ~_umask())  # safetensors creates its file 0600; honour the umask
    digest = sha256_file(tmp_st)
    os.replace(tmp_st, st_path)
    doc = {"format": "cxredit.checkpoint", "format_version": FORMAT_VERSION, "kind": kind,
           "tensors": st_path.name, "sha256": digest, "state": skeleton}
    tmp_js = js_path.with_name(js_path.name + ".tmp")
    tmp_js.write_text(json.dumps(doc, indent=1))
    os.replace(tmp_js, js_path)
    return js_path


def read_checkpoint_json(path: str | os.PathLike) -> dict:
    """The JSON half of a checkpoint (cheap: no tensors read)."""
    _, js_path = _paths(path)
    if not js_path.exists():
        raise CheckpointError(f"{js_path}: checkpoint not found")
    try:
        doc = json.loads(js_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{js_path}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or doc.get("format") != "cxredit.checkpoint":
        raise CheckpointError(f"{js_path}: not a cxredit checkpoint")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{js_path}: checkpoint format version {doc.get('format_version')}"
                              f" is not supported (expected {FORMAT_VERSION})")
    for key, typ in (("kind", str), ("sha256", str), ("state", dict)):
        if not isinstance(doc.get(key), typ):
            raise CheckpointError(f"{js_path}: damaged checkpoint (no valid {key!r} entry)")
    return doc


def build_module(path: str | os.PathLike, make, weights: dict) -> torch.nn.Module:
    """`make()` (a network built from a checkpoint's config) with the checkpoint's `weights`
    loaded; a config or weights that do not fit each other is a CheckpointError naming `path`
    instead of torch's many-line size-mismatch report."""
    try:
        net = make()
        net.load_state_dict(weights)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: its config and weights do not fit ({first}"
                              f"{' ...' if len(str(e).strip().splitlines()) > 1 else ''})"
                              ) from None
    return net


def load_checkpoint(path: str | os.PathLike, kind: str | None = None,
                    map_location: str | torch.device = "cpu", verify: bool = True,
                    keys: Sequence[str] | None = None) -> dict:
    """Read a checkpoint written by `save_checkpoint`.

    Args:
        path: checkpoint path (with or without suffix).
        kind: expected kind; a mismatch raises CheckpointError.
        map_location: device for the tensors.
        verify: check the sha256 of the tensor file against the JSON.
        keys: read only these top-level entries (e.g. the G_ema weights of a training
            checkpoint, without D and the optimizer states); None = everything.

    Returns:
        The `state` dict as saved (tensors on `map_location`), or its `keys` entries.
    """
    st_path, js_path = _paths(path)
    doc = read_checkpoint_json(js_path)
    if kind is not None and doc.get("kind") != kind:
        raise CheckpointError(f"{js_path}: is a {doc.get('kind')!r} checkpoint, "
                              f"expected {kind!r}")
    if not st_path.exists():
        raise CheckpointError(f"{st_path}: tensor file of the checkpoint is missing")
    if verify and sha256_file(st_path) != doc["sha256"]:
        raise CheckpointError(f"{st_path}: sha256 does not match {js_path.name} "
                              "(file corrupt or replaced)")
    skeleton = doc["state"]
    if keys is not None:
        missing = [k for k in keys if k not in skeleton]
        if missing:
            raise CheckpointError(f"{js_path}: no entry {missing[0]!r} in this checkpoint")
        skeleton = {k: skeleton[k] for k in keys}
    try:
        if keys is None:
            tensors = load_file(str(st_path), device=str(map_location))
        else:  # read only the wanted tensors (safetensors reads lazily, by name)
            prefixes = tuple(f"s.{k}." for k in keys)
            with safe_open(str(st_path), framework="pt", device=str(map_location)) as f:
                tensors = {n: f.get_tensor(n) for n in f.keys()
                           if n.startswith(prefixes) or n[2:] in keys}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise CheckpointError(f"{st_path}: cannot read tensors ({e})") from None
    return unpack(skeleton, tensors)


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint's tensor file, as recorded in its JSON (no hashing)."""
    return read_checkpoint_json(path)["sha256"]
