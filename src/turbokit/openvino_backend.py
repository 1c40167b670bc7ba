"""`--compile openvino` (issue 6 §1): the UNet and decoders run by OpenVINO's CPU runtime, converted once per shape.

On a CPU OpenVINO's kernels beat inductor's and oneDNN-through-eager for these models (docs/performance.md);
it is the engine FastSD CPU uses through optimum-intel. turbokit needs only the `openvino` package itself
(`pip install 'turbokit[openvino]'`): optimum-intel's pins conflict with our transformers. The diffusers
classes stay the source of truth: `openvino.convert_model` traces the module's own forward into OpenVINO's
IR at the call's static shapes, from an fp32 copy of the weights (a bf16 graph converts, but runs to NaN).

A module's `forward` is replaced by a dispatcher, as in `turbokit.aot`: per call signature (shapes, dtypes,
non-tensor arguments) it compiles the IR cached under `~/.cache/turbokit/openvino`, converting it the first
time. The key holds the weights' fingerprint, the module's config and OpenVINO's version. Weights are
stored in fp16 when the pipeline computes in 16 bits (lossless for bf16 weights in fp16's normal range) and
OpenVINO keeps its own cache of compiled blobs beside the IR, so a second launch neither converts nor
optimises the graph again. The precision hint follows the pipeline's (bf16 on CPUs that have it).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree

from turbokit.aot import GRAPH_REVISION, call_signature, config_identity, weights_fingerprint
from turbokit.errors import TurbokitError
from turbokit.openvino_warm import LaunchRecord, take

log = logging.getLogger(__name__)

HINTS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}  # INFERENCE_PRECISION_HINT


def require_openvino() -> Any:
    """The `openvino` module, or one clear error saying how to get it."""
    try:
        import openvino
    except ImportError as err:
        raise TurbokitError("--compile openvino needs the openvino package: pip install 'turbokit[openvino]'") from err
    return openvino


def require_nncf() -> Any:
    """NNCF (OpenVINO's quantization library), quiet, or one clear error saying how to get it."""
    try:
        import nncf
    except ImportError as err:
        raise TurbokitError(
            "--quantize int8 with --compile openvino needs nncf: pip install 'turbokit[openvino]'"
        ) from err
    nncf.set_log_level(logging.WARNING)  # it logs every layer it leaves in float at INFO
    return nncf


class ModelOutputs(dict):
    """A transformers `ModelOutput` as a warm launch returns it: the same fields, by name or position. Unpickling
    the output structure with transformers' own class would import transformers (~0.7 s of a 2-core CPU's launch)
    for the text encoders' outputs alone; the pipeline reads their fields by name."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: str | int) -> Any:
        return list(self.values())[key] if isinstance(key, int) else super().__getitem__(key)


_MODEL_OUTPUTS = f"{ModelOutputs.__module__}.{ModelOutputs.__qualname__}"
pytree.register_pytree_node(
    ModelOutputs,
    lambda outputs: (list(outputs.values()), list(outputs.keys())),  # as transformers flattens its outputs
    lambda values, keys: ModelOutputs(zip(keys, values, strict=True)),
    serialized_type_name=_MODEL_OUTPUTS,
)


class _Flat(torch.nn.Module):
    """The module's own (class) forward with every tensor argument positional, the rest fixed: what tracing
    needs. Returns the output's tensors as a flat tuple."""

    def __init__(self, module: torch.nn.Module, spec: pytree.TreeSpec, leaves: list[Any]) -> None:
        super().__init__()
        self.module, self.spec, self.leaves = module, spec, leaves
        self.out_spec: pytree.TreeSpec | None = None  # the output's structure, seen while tracing

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = iter(tensors)
        leaves = [next(given) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        outputs, self.out_spec = pytree.tree_flatten(type(self.module).forward(self.module, *args, **kwargs))
        return tuple(outputs)


def folder_fingerprint(folder: Path) -> str:
    """The identity of a diffusers component folder read from its files, not its tensors: the config (without
    bookkeeping such as `_name_or_path`) and each weights file's name, size and modification time. It lets a
    warm launch find its converted model without reading gigabytes of weights."""
    digest = hashlib.sha256(config_identity(json.loads((folder / "config.json").read_text())))
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != "config.json":
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def ir_folder(cache: Path, name: str, fingerprint: str) -> Path:
    """Where the converted models of one module (all its shapes) live."""
    return cache / f"{name}-{fingerprint}-ov{require_openvino().get_version().split('-')[0]}-g{GRAPH_REVISION}"


def converted_before(folder: Path, cache: Path, name: str) -> bool:
    """True when the model of component folder `folder` has been converted, as `name`, for some shape."""
    if not (folder / "config.json").is_file():
        return False
    return any(ir_folder(cache, name, folder_fingerprint(folder)).glob("*.xml"))


class OpenVinoDispatcher:
    """Stands in for `module.forward`: runs the compiled OpenVINO model of each call signature.

    `source` is the module's diffusers folder, when it came from one: the cache is then keyed on its files, and
    `load` (which reads its weights) supplies the weights to convert a new shape when `module` has none.
    With `quantize="int8"` each shape's model is quantized once: `calibrate(args, kwargs)` must sample with
    the module at the same shapes as the call `args, kwargs`; the inputs it meets calibrate the int8 ranges."""

    def __init__(
        self,
        module: torch.nn.Module,
        cache: Path,
        name: str,
        dtype: torch.dtype,
        threads: int,
        source: Path | None = None,
        load: Callable[[], torch.nn.Module] | None = None,
        quantize: str | None = None,
        calibrate: Callable[[tuple[Any, ...], dict[str, Any]], None] | None = None,
        record: LaunchRecord | None = None,
    ) -> None:
        self.ov = require_openvino()
        self.module, self.name, self.dtype, self.load, self.record = module, name, dtype, load, record
        self.quantize, self.calibrate = quantize, calibrate
        # while calibrating: key, recorded inputs, the fp model's request, its output structure
        self.recording: tuple[str, list[list[np.ndarray]], Any, pytree.TreeSpec] | None = None
        fingerprint = folder_fingerprint(source) if source is not None else weights_fingerprint(module)
        self.folder = ir_folder(cache, name, fingerprint)
        self.config = {
            "INFERENCE_PRECISION_HINT": HINTS[dtype],
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads,
            "CACHE_DIR": str(cache / "compiled"),  # OpenVINO's own cache of optimised blobs: fast second launch
        }
        self.loaded: dict[str, tuple[Callable[..., Any], pytree.TreeSpec]] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = call_signature(args, kwargs)
        tensors = [leaf for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        inputs = [_to_numpy(t) for t in tensors]
        if self.recording is not None and self.recording[0] == key:  # calibrating int8: the fp model, recorded
            _, recorded, request, out_spec = self.recording
            recorded.append([a.copy() for a in inputs])
        else:
            if key not in self.loaded:
                self.loaded[key] = self._load_or_convert(key, args, kwargs)
            request, out_spec = self.loaded[key]
        outputs = request.infer(inputs, share_inputs=True)
        results = [torch.from_numpy(np.array(outputs[i])) for i in range(len(outputs))]
        # OpenVINO's outputs are fp32; eager ones are in the module's dtype, which the next module's call
        # signature (and so its cache key) depends on
        results = [r.to(self.dtype) if r.is_floating_point() else r for r in results]
        return pytree.tree_unflatten(results, out_spec)

    def _out_spec(self, key: str) -> pytree.TreeSpec:
        spec = json.loads((self.folder / f"{key}.json").read_text())["outputs"]
        try:
            return pytree.treespec_loads(spec)
        except NotImplementedError:
            # an output class is a pytree node once its module is imported, which a warm launch has not done:
            # transformers' (the text encoders' outputs) become ModelOutputs, other modules are imported
            spec = re.sub(r'"type": "transformers\.[\w.]+"', f'"type": "{_MODEL_OUTPUTS}"', spec)
            for module in set(re.findall(r'"type": "([\w.]+)\.\w+"', spec)) - {ModelOutputs.__module__}:
                importlib.import_module(module)
            return pytree.treespec_loads(spec)

    def _load_or_convert(self, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        xml, spec_file = self.folder / f"{key}.xml", self.folder / f"{key}.json"
        if not (xml.is_file() and spec_file.is_file()):
            self._convert(xml, spec_file, args, kwargs)
            if self.load is not None:  # its weights can be read again for another shape: free them meanwhile
                self.module.to("meta")
        if self.quantize == "int8":
            xml = self._int8(key, xml, args, kwargs)
        start = time.perf_counter()
        compiled = take(xml, self.config)  # compiled in the background since the launch began, if it was
        if compiled is None:
            compiled = self.ov.Core().compile_model(str(xml), "CPU", self.config)
        log.info(f"loaded {self.name} into OpenVINO in {time.perf_counter() - start:.2f} s")
        if self.record is not None:
            self.record.add(xml, self.config)
        return compiled.create_infer_request(), self._out_spec(key)

    def _int8(self, key: str, xml: Path, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Path:
        """The int8 model of this signature: NNCF's post-training quantization of the converted model, its
        activation ranges calibrated on the inputs the model meets when `calibrate` samples with it."""
        int8 = self.folder / f"{key}-int8.xml"
        if int8.is_file():
            return int8
        nncf = require_nncf()
        if self.calibrate is None:
            raise TurbokitError(f"{self.name} cannot be quantized: nothing to calibrate it with")
        start = time.perf_counter()
        log.info(f"calibrating {self.name} for int8 at this shape (once; cached in {self.folder})")
        fp = self.ov.Core().compile_model(str(xml), "CPU", self.config).create_infer_request()
        self.recording = (key, [], fp, self._out_spec(key))
        try:
            self.calibrate(args, kwargs)
            samples = self.recording[1]
        finally:
            self.recording = None
        log.info(f"quantizing {self.name} to int8 on {len(samples)} recorded inputs")
        model = nncf.quantize(
            self.ov.Core().read_model(str(xml)),
            nncf.Dataset(samples),
            subset_size=len(samples),
            # transformer patterns: attention's activation × activation products get int8 inputs too; SmoothQuant
            # off (it moves activation outliers into weights, and measured worse on this UNet)
            model_type=nncf.ModelType.TRANSFORMER,
            advanced_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1)
            ),
        )
        partial = int8.with_name(f"{int8.stem}.partial-{os.getpid()}.xml")
        self.ov.save_model(model, str(partial), compress_to_fp16=False)
        os.replace(partial.with_suffix(".bin"), int8.with_suffix(".bin"))
        os.replace(partial, int8)
        log.info(f"quantized {self.name} to int8 in {time.perf_counter() - start:.1f} s")
        return int8

    def _convert(self, xml: Path, spec_file: Path, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        start = time.perf_counter()
        log.info(f"converting {self.name} to OpenVINO for this shape (once; cached in {self.folder})")
        leaves, spec = pytree.tree_flatten((args, kwargs))
        fp32 = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
        leaves = [fp32(leaf) for leaf in leaves]
        tensors = tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))
        if not any(not p.is_meta for p in self.module.parameters()):  # no weights (warm start): read them now
            if self.load is None:
                raise TurbokitError(f"{self.name} has no weights to convert to OpenVINO for a new shape")
            log.info(f"reading {self.name}'s weights to convert a new shape")
            flat = _Flat(self.load().float().eval(), spec, leaves)
        else:
            flat = _Flat(_fp32_copy(self.module), spec, leaves)
        with torch.no_grad(), warnings.catch_warnings():
            # tracing specialises Python branches on shapes: intended, the IR is per shape
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            model = self.ov.convert_model(
                flat,
                example_input=tensors,
                input=[
                    (list(t.shape), self.ov.Type.f32 if t.is_floating_point() else self.ov.Type.i64) for t in tensors
                ],
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = xml.with_name(f"{xml.stem}.partial-{os.getpid()}.xml")
        self.ov.save_model(model, str(partial), compress_to_fp16=self.dtype != torch.float32)
        spec_file.write_text(json.dumps({"outputs": pytree.treespec_dumps(flat.out_spec)}))
        os.replace(partial.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(partial, xml)  # the .xml last: a concurrent or killed launch never sees half a model
        log.info(f"converted {self.name} in {time.perf_counter() - start:.1f} s")


def _fp32_copy(module: torch.nn.Module) -> torch.nn.Module:
    """An fp32 copy of `module` without its dispatcher (the instance's `forward`), which is not copyable."""
    dispatcher = module.__dict__.pop("forward", None)
    try:
        return copy.deepcopy(module).float().eval()
    finally:
        if dispatcher is not None:
            module.forward = dispatcher


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """OpenVINO's inputs: floats as fp32 (numpy has no bf16), integers as int64, on the CPU."""
    tensor = tensor.detach().cpu()
    tensor = tensor.float() if tensor.is_floating_point() else tensor.long()
    return tensor.contiguous().numpy()


def compile_openvino(
    module: torch.nn.Module,
    cache: Path,
    name: str,
    dtype: torch.dtype,
    source: Path | None = None,
    load: Callable[[], torch.nn.Module] | None = None,
    quantize: str | None = None,
    calibrate: Callable[[tuple[Any, ...], dict[str, Any]], None] | None = None,
    record: LaunchRecord | None = None,
) -> torch.nn.Module:
    """Make `module` run OpenVINO models from `cache` (converted at the first call of each signature);
    `source` and `load`, `quantize` and `calibrate`: see `OpenVinoDispatcher`; `record` notes each model
    compiled, for the next launch to prefetch (`turbokit.openvino_warm`)."""
    threads = torch.get_num_threads()
    dispatcher = OpenVinoDispatcher(module, cache, name, dtype, threads, source, load, quantize, calibrate, record)
    module.forward = dispatcher
    return module
