"""Stage 1 — checkpoint → ONNX, plus the PyTorch reference the audit compares against.

Checkpoint kinds: ``state_dict`` (``arch`` import path + .pt/.pth/.safetensors,
or the arch's seeded initial weights), ``torchscript``, ``exported_program``
(.pt2) and ``onnx`` (export skipped). The dynamo exporter runs first; the
TorchScript exporter is the fallback and the reason is recorded.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import pickletools
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from engineforge import modelio
from engineforge.errors import ExportError
from engineforge.results import ExportResult
from engineforge.settings import ExportSettings, Section

log = logging.getLogger(__name__)

TOOLS = ("torch", "torchvision", "onnx", "onnxscript")
# Weights above this go to external data (``model.onnx.data``, published beside the ONNX): one
# protobuf cannot exceed 2 GiB.
EXTERNAL_DATA_BYTES = 1 << 30
ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32"}  # onnx.TensorProto
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Settings(Section):
    checkpoint: dict
    inputs: dict
    # .pt2 only: the program's dims are checked against every profile (other checkpoints'
    # profiles are run through the ONNX by the profiles stage: a profile edit re-exports nothing)
    profiles: dict | None
    opset: int
    export: ExportSettings
    reference_shapes: dict[str, list[int]]
    task: str
    labels: str | None      # labels array: save reference outputs on the evaluation set too
    samples: int            # reference samples (audit.samples, in whole batches)
    batch: int              # samples per batch of the reference (fits the first profile)


def settings(m: dict, w: dict) -> Settings:
    first = next(iter(m["profiles"].values()))
    batch = modelio.batch_size(m["inputs"], first, m["audit"]["samples"])
    return Settings(checkpoint=m["checkpoint"], inputs=m["inputs"], opset=m["opset"],
                    profiles=m["profiles"] if m["checkpoint"]["kind"] == "exported_program"
                    else None,
                    export=m["export"],
                    reference_shapes={i: s["opt"] for i, s in first.items()},
                    task=m["task"], labels=modelio.labels_key(m),
                    samples=modelio.whole_batches(m["audit"]["samples"], batch), batch=batch)


def cache_group(job) -> str:
    return "export"


def load_module(model: str, ckpt: dict, path: Path | None):
    """Build the torch.nn.Module (or ExportedProgram) a checkpoint describes."""
    import torch

    kind = ckpt["kind"]
    key = f"models.{model}.checkpoint"
    root = Path(".")
    try:
        if kind == "torchscript":
            return torch.jit.load(str(path), map_location="cpu").eval()
        if kind == "exported_program":
            return torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001 - any loader failure is the user's file
        log.info("loading %s checkpoint '%s' failed:\n%s", kind, path, _safe_text(err))
        save = {"torchscript": "torch.jit.save(torch.jit.script(model), path)",
                "exported_program": "torch.export.save(torch.export.export(model, args), "
                                    "'model.pt2')"}[kind]
        raise ExportError(f"cannot load {kind} checkpoint '{path}': {_describe_unreadable(path)}"
                          f"; {_first_line(err)}", model=model, key=f"{key}.path",
                          fix=f"check that the file is complete and checkpoint.kind is right; "
                              f"re-save it with {save}") from None

    module_name, attr = ckpt["arch"].split(":")
    if str(root.resolve()) not in sys.path:
        sys.path.insert(0, str(root.resolve()))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ExportError(f"cannot import arch '{ckpt['arch']}': {err}", model=model,
                          key=f"{key}.arch", fix="use 'module:callable' importable from the "
                          "repository root or the environment") from None
    torch.manual_seed(ckpt.get("seed", 0))
    net = factory(**ckpt.get("arch_kwargs", {}))
    if path is not None:
        state = _load_state_dict(model, path, key)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0:3]
            raise ExportError(f"state_dict does not fit arch '{ckpt['arch']}': "
                              f"{' '.join(first)}", model=model, key=f"{key}.path",
                              fix="pair the weights with the arch they were trained with"
                              ) from None
    return net.eval()


def _load_state_dict(model: str, path: Path, key: str) -> dict:
    """Weights only: a pickle that needs code (a class, a function) is refused, never run."""
    import torch

    resave = ("if you trust the file, load it yourself and re-save only the weights: "
              "torch.save(model.state_dict(), 'model.pt') or "
              "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - never torch's advice to turn the safety off
        log.info("loading state_dict '%s' failed (weights only):\n%s", path, _safe_text(err))
        found = _pickled_globals(path, err)
        if found:
            raise ExportError(f"checkpoint '{path}' holds pickled Python objects or code "
                              f"({', '.join(found)}), not just weights: refused for safety "
                              "(weights-only loading; nothing in it was run)", model=model,
                              key=f"{key}.path", fix=resave) from None
        raise ExportError(f"cannot read state_dict '{path}': {_describe_unreadable(path)}",
                          model=model, key=f"{key}.path",
                          fix="check that the file is complete; re-save it with "
                              "torch.save(model.state_dict(), 'model.pt') or safetensors"
                          ) from None
    # training checkpoints: {"state_dict" | "model_state_dict" | "model": weights, "epoch": ...}
    wrapped = [k for k in ("state_dict", "model_state_dict", "model")
               if isinstance(state, dict) and isinstance(state.get(k), dict)]
    state = state[wrapped[0]] if wrapped else state
    if not isinstance(state, dict):
        raise ExportError(f"checkpoint '{path}' holds a {type(state).__name__}, not a "
                          "state_dict (parameter names to tensors)", model=model,
                          key=f"{key}.path", fix=resave)
    other = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if other:
        raise ExportError(f"checkpoint '{path}' holds entries that are not tensors "
                          f"({', '.join(map(str, other[:3]))}), not a state_dict", model=model,
                          key=f"{key}.path", fix=resave)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _safe_text(err: BaseException) -> str:
    """torch's text less its advice to turn weights-only loading off (not even in the log)."""
    unsafe = ("False", "trust", "allowlist", "two options", "Alternatively")
    sentences = re.split(r"(?<=[.:])\s+", _ANSI.sub("", str(err)))
    return " ".join(t for t in sentences if not any(u in t for u in unsafe))


def _first_line(err: BaseException) -> str:
    """'Type: first sentence' of an error, without colour codes."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(err)).splitlines() if ln.strip()]
    first = re.split(r"(?<=\.) ", lines[0])[0] if lines else ""
    return f"{type(err).__name__}: {first}"[:300]


def _describe_unreadable(path: Path) -> str:
    """What a checkpoint that no loader reads looks like, from its first bytes."""
    head = path.read_bytes()[:4] if path.is_file() else b""
    if not head:
        return "the file is empty"
    if head.startswith(b"PK"):
        return "a zip archive that is truncated or corrupt" if not zipfile.is_zipfile(path) \
            else "a zip archive that is not of this checkpoint kind"
    if head.startswith(b"\x80"):
        return "a raw Python pickle, not a torch.save archive"
    return "not a checkpoint of this kind (unknown format: corrupt or random bytes)"


def _pickled_globals(path: Path, err: Exception) -> list[str]:
    """The classes/functions a refused pickle would import (read with pickletools, which
    runs nothing); [] when the file is no pickle with globals."""
    named = re.findall(r"GLOBAL ([\w.]+)", str(err))
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = path.read_bytes()
        strings: list[str] = []
        scanned: list[str] = []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                scanned.append(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                scanned.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
        named += scanned  # only a pickle read to its end (random bytes may look like one)
    except Exception:  # noqa: BLE001 - not a (complete) pickle: nothing more to name
        pass
    found = list(dict.fromkeys(n for n in named if not _weights_only_global(n)))
    return found[:3] + (["..."] if len(found) > 3 else [])


def _weights_only_global(name: str) -> bool:
    """Globals a plain torch.save(state_dict) pickle uses (weights_only allows them)."""
    return (name.startswith(("torch._utils.", "_codecs.")) or name.endswith("Storage")
            or name in ("collections.OrderedDict", "torch.Size", "torch.device"))


def _export(net, model: str, m: Settings, example: tuple, tmp: Path) -> dict:
    """Dynamo first, TorchScript exporter as fallback, then the ONNX is verified against the
    declared inputs. Returns export facts."""
    import torch

    if isinstance(net, torch.export.ExportedProgram):
        check_program_shapes(model, net, m.inputs, m.profiles, m.checkpoint["path"])
    names = list(m.inputs)
    n_out = 0
    dyn = modelio.dynamic_dims(m.inputs)
    # Named, unbounded dims: the ONNX keeps the names, and profile ranges (which only the
    # engine builds use) can change without a re-export.
    dims = {d: torch.export.Dim(d) for axes in dyn.values() for d in axes.values()}
    facts: dict = {"exporter": None, "fallback_reason": None}
    causes = []
    order = ["dynamo", "torchscript"] if m.export.exporter == "dynamo" else ["torchscript"]
    if not m.export.fallback:
        order = order[:1]
    elif isinstance(net, torch.jit.ScriptModule) and len(order) == 2:
        order = ["torchscript"]  # torch.export never takes a ScriptModule
        facts["fallback_reason"] = "dynamo exporter skipped: it cannot export a ScriptModule"
    for exporter in order:
        try:
            if exporter == "dynamo":
                shapes = tuple({a: dims[d] for a, d in dyn[n].items()} or None for n in names)
                program = torch.onnx.export(net, example, dynamo=True, input_names=names,
                                            dynamic_shapes=shapes, opset_version=m.opset,
                                            # the exporter's optimizer folds what onnxsim
                                            # cannot: conv bias chains built from the input
                                            # (CastLike/Expand; then BatchNorm folds into
                                            # the conv), SplitToSequence/SequenceAt
                                            optimize=True,
                                            verbose=False)
                out_names, n_out = _output_names(_traced_outputs(program))
                for value, name in zip(program.model.graph.outputs, out_names or []):
                    value.name = name
                weights = sum(v.const_value.nbytes for v in
                              program.model.graph.initializers.values() if v.const_value)
                program.save(str(tmp), external_data=weights > EXTERNAL_DATA_BYTES)
                _drop_stack_traces(tmp)
                facts["exported_program"] = program.exported_program  # kept as model.pt2
            else:
                out_names, n_out = _output_names(_eager_outputs(net, example))
                torch.onnx.export(net, example, str(tmp), dynamo=False, input_names=names,
                                  output_names=out_names,
                                  dynamic_axes={n: dyn[n] for n in names if dyn[n]},
                                  opset_version=m.opset, do_constant_folding=True)
            facts["exporter"] = exporter
            break
        except Exception as err:  # noqa: BLE001 - recorded, then the fallback runs
            log.info("%s exporter failed:\n%s", exporter, _ANSI.sub("", str(err)),
                     exc_info=True)
            causes.append(f"{exporter} exporter: {_exporter_cause(err)}")
            log.warning("%s: %s", model, causes[-1])
            facts["fallback_reason"] = f"{exporter} exporter failed: {_exporter_cause(err)}"
    if facts["exporter"] is None:
        op = re.search(r"\b(\w+::\w+)", " ".join(causes))
        causes.sort(key=lambda c: "::" not in c)  # the one naming an operator first
        lead = f"unsupported operator {op.group(1)}: " if op else "export failed: "
        raise ExportError(lead + "; ".join(causes), model=model, key=f"models.{model}.export",
                          fix="export the nn.Module from its source (not a traced TorchScript "
                              "with fused ops), try another opset:, or export the ONNX "
                              "yourself and use checkpoint.kind: onnx")
    _verify_onnx(model, m, tmp, {n: list(t.shape) for n, t in zip(names, example)})
    got = len(_onnx_outputs(tmp))
    if got != n_out:
        raise ExportError(f"the exported ONNX has {got} outputs but the model returns {n_out} "
                          "tensors", model=model, key=f"models.{model}.export",
                          fix="return tensors only (a tensor, a tuple/list or a dict of "
                              "tensors), each one a distinct tensor")
    return facts


def _save_program(path: Path | None, program, m: Settings, out_names: list[str],
                  exporter: str) -> str | None:
    """Keep the dynamo exporter's ``torch.export`` program as ``model.pt2`` (for backends
    that build from PyTorch), with the inputs' and outputs' names, named dims, ranks and
    dtypes in its extra file ``engineforge.json``. Without one (ONNX checkpoint, TorchScript
    exporter) the file is left empty; the returned line says what it holds."""
    import torch

    if path is None:  # a job that does not ask for it
        return None
    if program is None:
        path.write_bytes(b"")
        return f"none (exporter: {exporter}; only the dynamo exporter makes one)"
    io = {"inputs": list(m.inputs), "outputs": out_names,
          "dims": modelio.dynamic_dims(m.inputs),
          "ranks": {n: len(s["shape"]) for n, s in m.inputs.items()},
          "dtypes": {n: s.get("dtype", "float32") for n, s in m.inputs.items()}}
    torch.export.save(program, str(path), extra_files={"engineforge.json": json.dumps(io)})
    return "torch.export (dynamo exporter)"


def _exporter_cause(err: Exception) -> str:
    """One line: the dynamo exporter's exception summary, else the error's first line."""
    text = _ANSI.sub("", str(err))
    summary = re.search(r"## Exception summary\s+(.+?)(?:\(Refer to the full|\Z)", text, re.S)
    if summary:  # it can span lines: "<class 'E'>: \nThe message ...\n(Refer to the full ..."
        line = " ".join(summary.group(1).split())
        return re.sub(r"^<class '(?:\w+\.)*(\w+)'>", r"\1", line)[:300]
    return _first_line(err)


def _flat_outputs(out) -> list:
    """A model's output tensors in the exporters' order (pytree: tuples, lists, dicts)."""
    import torch
    from torch.utils._pytree import tree_leaves

    return [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]


def _output_names(out) -> tuple[list[str] | None, int]:
    """ONNX output names when the model returns dicts (their keys, 'a.b' when nested; the
    exporters' own names otherwise) and the number of output tensors."""
    import torch
    from torch.utils._pytree import MappingKey, tree_flatten_with_path

    paths = [path for path, o in tree_flatten_with_path(out)[0] if isinstance(o, torch.Tensor)]
    if not any(isinstance(k, MappingKey) for path in paths for k in path):
        return None, len(paths)
    return [".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
            for path in paths], len(paths)


def _traced_outputs(program):
    """The output structure the dynamo exporter recorded (tensors as placeholders)."""
    import torch
    from torch.utils._pytree import tree_unflatten

    spec = program.exported_program.call_spec.out_spec
    return tree_unflatten([torch.empty(0)] * spec.num_leaves, spec)


def _eager_outputs(net, example: tuple):
    import torch

    with torch.inference_mode():
        return net(*example)


def check_program_shapes(model: str, program, inputs: dict, profiles: dict, path: str,
                         error=ExportError) -> None:
    """A .pt2 only runs the shapes it was exported for: each profile shape must lie in the
    program's range for every input dim (a static dim takes its one size)."""
    import torch

    names = list(program.graph_signature.user_inputs)
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    key = f"models.{model}.checkpoint.path"
    if len(names) != len(inputs):
        raise error(f"the exported program takes {len(names)} inputs {names}, the config "
                    f"declares {len(inputs)} {list(inputs)}", model=model,
                    key=f"models.{model}.inputs", fix="declare one input per argument of the "
                    "program, in its order")
    for (iname, spec), arg in zip(inputs.items(), names):
        shape = list(vals[arg].shape) if vals.get(arg) is not None else []
        if len(shape) != len(spec["shape"]):
            raise error(f"program input '{arg}' has rank {len(shape)}, input '{iname}' is "
                        f"declared with rank {len(spec['shape'])} ({spec['shape']})",
                        model=model, key=f"models.{model}.inputs.{iname}.shape",
                        fix="declare the shape the program was exported with")
        for axis, dim in enumerate(shape):
            if isinstance(dim, torch.SymInt):
                vr = program.range_constraints.get(dim.node.expr)
                lo, hi = _bound(vr.lower if vr else 0), _bound(vr.upper if vr else math.inf)
            else:
                lo = hi = int(dim)
            for pname, profile in profiles.items():
                for which in ("min", "opt", "max"):
                    size = profile[iname][which][axis]
                    if lo <= size <= hi:
                        continue
                    dname = spec["shape"][axis] if isinstance(spec["shape"][axis], str) \
                        else f"dim{axis}"
                    need = (min(p[iname]["min"][axis] for p in profiles.values()),
                            max(p[iname]["max"][axis] for p in profiles.values()))
                    took = f"fixed at {lo}" if lo == hi else f"in [{lo}, {hi}]"
                    keep = f"at {lo}" if lo == hi else f"within [{lo}, {hi}]"
                    raise error(
                        f"'{path}' was exported with input '{iname}' dim {axis} "
                        f"({dname}) {took}, but profile '{pname}' {which} shape needs "
                        f"{dname}={size}", model=model, key=key,
                        fix=f"re-export it with that dim dynamic: torch.export.save("
                            f"torch.export.export(model, args, dynamic_shapes={{'{arg}': "
                            f"{{{axis}: torch.export.Dim('{dname}', min={need[0]}, "
                            f"max={need[1]})}}}}), 'model.pt2'), or keep {dname} {keep} "
                            "in the profiles")


def _bound(value) -> float:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return -math.inf if str(value).startswith("-") else math.inf


def _drop_stack_traces(path: Path) -> None:
    """The dynamo exporter records each node's Python stack trace, with absolute paths of
    the checkout and the environment: the same model exported in two directories would
    differ. Those traces go, so exports are reproducible byte for byte."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)  # weights stay where they are
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
            graphs += [a.g for a in node.attribute if a.HasField("g")]
            graphs += [g for a in node.attribute for g in a.graphs]
    onnx.save(proto, str(path))


def _onnx_outputs(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def _copy_onnx_checkpoint(model: str, m: Settings, src: Path, dest: Path) -> None:
    """An ONNX checkpoint is the export: readable, and verified like one."""
    import onnx

    try:
        onnx.load(str(src), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - DecodeError and friends: the user's file
        log.info("reading ONNX checkpoint '%s' failed:\n%s", src, err)
        raise ExportError(f"ONNX checkpoint '{src}' is not a readable ONNX model: "
                          f"{_describe_unreadable(src)}; {_first_line(err)}", model=model,
                          key=f"models.{model}.checkpoint.path",
                          fix="re-export it (torch.onnx.export) or copy it again; check "
                              "checkpoint.kind") from None
    shutil.copyfile(src, dest)
    _verify_onnx(model, m, dest, None)


def _verify_onnx(model: str, m: Settings, path: Path, traced: dict | None) -> None:
    """The ONNX takes the declared inputs (names, ranks, dtypes, named dims dynamic); the
    profiles stage then runs it at every profile's shapes."""
    import onnx

    given = traced is None  # an ONNX checkpoint, not our export
    proto = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in proto.graph.initializer}
    got = {i.name: i.type.tensor_type for i in proto.graph.input if i.name not in weights}
    key = f"models.{model}.inputs"
    missing = [n for n in m.inputs if n not in got]
    if missing and not given:
        raise ExportError(
            f"the exported ONNX lost declared input(s) {missing} (its inputs: "
            f"{sorted(got) or 'none'}): the exporter recorded them as constants, typically "
            "through a custom torch.autograd.Function or non-torch code (numpy, .item(), "
            "Python numbers) in forward(), or forward() never reads them", model=model, key=key,
            fix="write forward() with torch ops only (or give the autograd.Function a "
                "symbolic()); or export the ONNX yourself and use checkpoint.kind: onnx")
    if missing or set(got) - set(m.inputs):
        raise ExportError(f"the {'ONNX checkpoint' if given else 'exported ONNX'}'s inputs "
                          f"are {sorted(got)}, the config "
                          f"declares {list(m.inputs)}", model=model, key=key,
                          fix="declare every ONNX input under inputs:, named as in the ONNX")
    for name, spec in m.inputs.items():
        tensor = got[name]
        dtype = ONNX_DTYPES.get(tensor.elem_type) or onnx.TensorProto.DataType.Name(
            tensor.elem_type).lower()
        if dtype != spec.get("dtype", "float32"):
            raise ExportError(f"input '{name}' is {dtype} in the ONNX, declared "
                              f"{spec.get('dtype', 'float32')}", model=model,
                              key=f"{key}.{name}.dtype",
                              fix=f"declare dtype: {dtype}" if dtype in ONNX_DTYPES.values()
                              else f"cast inside the model to one of "
                                   f"{sorted(ONNX_DTYPES.values())}")
        dims, declared = tensor.shape.dim, spec["shape"]
        if len(dims) != len(declared):
            raise ExportError(f"input '{name}' has rank {len(dims)} in the ONNX, declared "
                              f"{declared} (rank {len(declared)})", model=model,
                              key=f"{key}.{name}.shape", fix="declare one entry per dimension")
        for axis, (dim, want) in enumerate(zip(dims, declared)):
            if not dim.HasField("dim_value") or dim.dim_value == want:
                continue
            if isinstance(want, str):
                raise ExportError(
                    f"input '{name}' dim {axis} ('{want}') is fixed at {dim.dim_value} in the "
                    f"{'ONNX' if given else 'export'}: the model cannot vary {want} (e.g. a "
                    "Linear or reshape sized for it)", model=model, key=f"{key}.{name}.shape",
                    fix=f"declare it static ({dim.dim_value}) in inputs.{name}.shape and the "
                        f"profiles, or make the model accept any {want}")
            raise ExportError(f"input '{name}' dim {axis} is {dim.dim_value} in the ONNX, "
                              f"declared {want}", model=model, key=f"{key}.{name}.shape",
                              fix=f"declare {dim.dim_value}")


def run(job) -> ExportResult:
    import torch

    t0 = time.perf_counter()
    m, model = job.settings, job.model
    onnx_out, reference_out = job.outputs["onnx"], job.outputs["reference"]
    data, source = _reference_data(job)
    feed = modelio.sample_inputs(m.inputs, m.reference_shapes, seed=m.export.seed, data=data)
    ref_feed = modelio.sample_inputs(m.inputs, _sample_shapes(m), seed=m.export.seed, data=data)
    eval_feed = {n: data[n] for n in m.inputs} if m.labels else None
    if m.checkpoint["kind"] == "onnx":
        _copy_onnx_checkpoint(model, m, job.inputs["checkpoint"], onnx_out)
        facts = {"exporter": "none (onnx checkpoint)", "fallback_reason": None,
                 "program": _save_program(job.outputs.get("program"), None, m, [], "none")}
        reference = _run_onnx(onnx_out, ref_feed, m.batch)
        eval_ref = _run_onnx(onnx_out, eval_feed, m.batch) if eval_feed else {}
        ref_source = "onnxruntime on the given ONNX (no PyTorch checkpoint)"
    else:
        net = load_module(model, m.checkpoint, job.inputs.get("checkpoint"))
        example = tuple(torch.from_numpy(a) for a in export_example(feed, m.inputs).values())
        facts = _export(net, model, m, example, onnx_out)
        runnable = net.module() if hasattr(net, "module") and not isinstance(
            net, torch.nn.Module) else net
        out_names = _onnx_outputs(onnx_out)
        facts["program"] = _save_program(job.outputs.get("program"),
                                         facts.pop("exported_program", None), m, out_names,
                                         facts["exporter"])
        reference = _run_torch(runnable, ref_feed, m.inputs, out_names, m.batch)
        eval_ref = (_run_torch(runnable, eval_feed, m.inputs, out_names, m.batch)
                    if eval_feed else {})
        ref_source = "pytorch eager (cpu, fp32)"
    _check(model, onnx_out)
    arrays = {f"in:{k}": v for k, v in ref_feed.items()}
    arrays |= {f"out:{k}": v for k, v in reference.items()}
    arrays |= {f"eval_out:{k}": v for k, v in eval_ref.items()}
    with open(reference_out, "wb") as f:
        np.savez(f, **arrays)
    return ExportResult(**facts, reference=ref_source, opset=m.opset, outputs=list(reference),
                        reference_samples=m.samples, reference_inputs=source,
                        time_s=round(time.perf_counter() - t0, 3))


def arch_source(ckpt: dict, roots=(Path("."),)) -> str | None:
    """The project's own model-definition file (``models/digits_cnn.py`` for
    ``models.digits_cnn:Net``), so that editing it re-exports. Found on the file system under
    ``roots`` (the working directory, then the workflow's), not imported: this runs while
    Snakemake parses. Installed packages (torchvision, ...) are covered by their versions."""
    if ckpt["kind"] != "state_dict":
        return None
    parts = ckpt["arch"].split(":")[0].split(".")
    for root in roots:
        for candidate in (Path(*parts).with_suffix(".py"), Path(*parts) / "__init__.py"):
            if (Path(root) / candidate).is_file():
                return candidate.as_posix() if root == Path(".") else str(Path(root) / candidate)
    return None


def _reference_data(job) -> tuple[dict | None, str]:
    """The checked data the reference samples come from (evaluation, else calibration) and
    a word on where the samples come from; bad data stops the export here, in one line."""
    m = job.settings
    section = next((s for s in ("evaluation", "calibration") if job.inputs.get(s)), None)
    if section is None:
        return None, f"random (seed {m.export.seed})"
    data = modelio.load_data(job.inputs[section], m.inputs, model=job.model, section=section,
                             labels=m.labels if section == "evaluation" else None,
                             error_cls=ExportError)
    fits = all(list(data[n].shape[1:]) == list(s[1:]) for n, s in m.reference_shapes.items())
    return data, (f"{section} data" if fits else
                  f"random (seed {m.export.seed}): the {section} data's shapes are not the "
                  "first profile's opt shapes")


def export_example(feed: dict, inputs: dict) -> dict:
    """The export's example inputs: ``feed`` with every named dim of size 1 repeated to 2.
    torch.export specialises a dim whose example size is 0 or 1 (torch 2.11: the kept
    program then only runs batch 1, ``Guard failed: x.size()[0] == 1``)."""
    out, dyn = {}, modelio.dynamic_dims(inputs)
    for name, value in feed.items():
        for axis in dyn[name]:
            if value.shape[axis] == 1:
                value = np.repeat(value, 2, axis=axis)
        out[name] = value
    return out


def _sample_shapes(m: Settings) -> dict[str, list[int]]:
    """The reference samples' shapes: ``samples`` of the first profile's opt shape."""
    return {n: [m.samples, *s[1:]] for n, s in m.reference_shapes.items()}


def _run_torch(net, feed: dict, inputs: dict, out_names: list[str], batch: int) -> dict:
    """The module's outputs (tuple, list, dict: flattened in the exporter's order) on
    every sample of ``feed``, in batches of ``batch`` like the audit's."""
    import torch

    def infer(b: dict) -> dict:
        with torch.inference_mode():
            out = net(*(torch.from_numpy(b[n]) for n in inputs))
        return {name: o.detach().float().numpy()
                for name, o in zip(out_names, _flat_outputs(out))}

    return modelio.run_batched(infer, feed, batch)


def _run_onnx(path: Path, feed: dict, batch: int) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return modelio.run_batched(lambda b: dict(zip(names, sess.run(names, b))), feed, batch)


def _check(model: str, path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"exported ONNX fails onnx.checker: {err}".splitlines()[0],
                          model=model, fix="report the exporter bug; try "
                          "export.exporter: torchscript") from None
