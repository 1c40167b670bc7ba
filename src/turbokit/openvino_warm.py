"""A warm `--compile openvino` launch: what the last launch compiled, compiled again in the background while
Python is still importing torch and diffusers (issue 6 §1 and §5: warm start ≤ 2 × one image).

A warm launch spends ~5 s importing and ~2 s having OpenVINO load its cached blobs (text encoder, UNet,
decoder), one after the other. OpenVINO compiles in C++ with the GIL released, so started first the loading
overlaps the imports instead of following them. Each launch records the (IR, runtime configuration) pairs it
compiled, in order, under a key of the model and options; the next launch with the same key compiles those
in a thread before it imports anything heavy. A dispatcher takes a prefetched model only when its IR and
configuration are exactly the ones it would compile itself, so a stale record costs background work, never
a wrong model. This module imports nothing heavy: the CLI calls it before torch is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_PREFETCHED: dict[tuple[str, str], Future] = {}


def _canonical(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def launch_key(model: str | Path, dtype: str | None = None, quantize: str | None = None) -> str:
    """What makes two launches compile the same models: the model (a local one by its resolved path), the
    dtype asked for ("auto", the CLI's default, and None, the Python API's, are the same choice) and the
    quantization."""
    dtype = None if dtype == "auto" else dtype
    path = Path(model).expanduser()
    name = str(path.resolve()) if path.exists() else str(model)
    return hashlib.sha256(json.dumps([name, dtype, quantize]).encode()).hexdigest()[:20]


def _record_file(cache: Path, key: str) -> Path:
    return cache / "launches" / f"{key}.json"


class LaunchRecord:
    """The models one launch compiled, in order, written as they are compiled (replacing the last launch's)."""

    def __init__(self, cache: Path, key: str) -> None:
        self.path = _record_file(cache, key)
        self.entries: list[dict[str, Any]] = []

    def add(self, xml: Path, config: dict[str, Any]) -> None:
        entry = {"xml": str(xml), "config": config}
        if entry in self.entries:
            return
        self.entries.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f"{self.path.stem}.partial-{os.getpid()}")
        partial.write_text(json.dumps(self.entries, indent=1), encoding="utf-8")
        os.replace(partial, self.path)


def prefetch(cache: Path, key: str) -> threading.Thread | None:
    """Start compiling, in a background thread, what the last launch with `key` compiled; None when there is
    nothing to compile (no record, an unreadable one, or its models gone from the cache)."""
    try:
        entries = json.loads(_record_file(cache, key).read_text(encoding="utf-8"))
        entries = [e for e in entries if Path(e["xml"]).is_file() and isinstance(e["config"], dict)]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not entries:
        return None
    jobs = []
    for entry in entries:
        future: Future = Future()
        _PREFETCHED[(entry["xml"], _canonical(entry["config"]))] = future
        jobs.append((entry, future))
    thread = threading.Thread(target=_compile, args=(jobs,), name="turbokit-openvino-prefetch", daemon=True)
    thread.start()
    return thread


def _compile(jobs: list[tuple[dict[str, Any], Future]]) -> None:
    try:
        import openvino

        core = openvino.Core()
    except Exception as err:  # any failure: the dispatchers compile, and report, themselves
        for _, future in jobs:
            future.set_exception(err)
        return
    for entry, future in jobs:
        try:
            future.set_result(core.compile_model(entry["xml"], "CPU", entry["config"]))
        except Exception as err:
            future.set_exception(err)


def take(xml: Path, config: dict[str, Any]) -> Any | None:
    """The compiled model prefetched for exactly this IR and configuration (waiting for it if it is still
    being compiled), or None: the caller then compiles it itself."""
    future = _PREFETCHED.pop((str(xml), _canonical(config)), None)
    if future is None:
        return None
    try:
        return future.result()
    except Exception as err:
        log.debug(f"prefetching {xml} failed ({err}); compiling it now")
        return None


def start(model: str | Path, dtype: str | None = None, quantize: str | None = None) -> threading.Thread | None:
    """What a launch with `--compile openvino` calls first: prefetch what its last launch compiled."""
    from turbokit.compile import cache_root

    return prefetch(cache_root() / "openvino", launch_key(model, dtype, quantize))
