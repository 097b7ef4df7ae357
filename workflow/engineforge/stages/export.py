"""Stage 1 — checkpoint → ONNX, plus the PyTorch reference the audit compares against.

Checkpoint kinds: ``state_dict`` (``arch`` import path + .pt/.pth/.safetensors,
or the arch's seeded initial weights), ``torchscript``, ``exported_program``
(.pt2) and ``onnx`` (export skipped). The dynamo exporter runs first; the
TorchScript exporter is the fallback and the reason is recorded.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from engineforge import cache, modelio
from engineforge.config import reference_data, stage_slice
from engineforge.errors import ExportError
from engineforge.sidecar import atomic_path, make_sidecar, read_json, write_json
from engineforge.versions import tool_versions

log = logging.getLogger(__name__)


def load_module(model: str, m: dict, root: Path):
    """Build the torch.nn.Module (or ExportedProgram) a checkpoint describes."""
    import torch

    ckpt = m["checkpoint"]
    kind = ckpt["kind"]
    key = f"models.{model}.checkpoint"
    path = root / ckpt["path"] if ckpt.get("path") else None
    try:
        if kind == "torchscript":
            return torch.jit.load(str(path), map_location="cpu").eval()
        if kind == "exported_program":
            return torch.export.load(str(path))
    except Exception as err:  # noqa: BLE001 - any loader failure is the user's file
        raise ExportError(f"cannot load {kind} checkpoint '{path}': {err}", model=model,
                          key=f"{key}.path", fix="check the file and checkpoint.kind") from None

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
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"cannot read state_dict '{path}': {err}".splitlines()[0],
                          model=model, key=f"{key}.path",
                          fix="save with torch.save(model.state_dict()) or safetensors "
                              "(weights_only loading: no pickled code)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"],
                                                                        dict):
        state = state["state_dict"]
    return state


def _export(net, model: str, m: dict, example: tuple, tmp: Path) -> dict:
    """Dynamo first, TorchScript exporter as fallback. Returns export facts."""
    import torch

    names = list(m["inputs"])
    dyn = modelio.dynamic_dims(m)
    # Named, unbounded dims: the ONNX keeps the names, and profile ranges (which only the
    # engine builds use) can change without a re-export.
    dims = {d: torch.export.Dim(d) for axes in dyn.values() for d in axes.values()}
    facts: dict = {"exporter": None, "fallback_reason": None}
    errors = []
    order = ["dynamo", "torchscript"] if m["export"]["exporter"] == "dynamo" else [
        "torchscript"]
    if not m["export"]["fallback"]:
        order = order[:1]
    for exporter in order:
        try:
            if exporter == "dynamo":
                shapes = tuple({a: dims[d] for a, d in dyn[n].items()} or None for n in names)
                program = torch.onnx.export(net, example, dynamo=True, input_names=names,
                                            dynamic_shapes=shapes, opset_version=m["opset"],
                                            # onnxsim folds and fuses next; optimize only
                                            # when it is off (saves ~1 s on resnet18)
                                            optimize=not m["simplify"]["enabled"],
                                            verbose=False)
                program.save(str(tmp), external_data=False)
            else:
                torch.onnx.export(net, example, str(tmp), dynamo=False, input_names=names,
                                  dynamic_axes={n: dyn[n] for n in names if dyn[n]},
                                  opset_version=m["opset"], do_constant_folding=True)
            facts["exporter"] = exporter
            break
        except Exception as err:  # noqa: BLE001 - recorded, then the fallback runs
            reason = f"{exporter} exporter failed: {type(err).__name__}: " + (
                str(err).strip().splitlines() or [""])[0][:300]
            log.warning("%s: %s", model, reason)
            errors.append(reason)
            facts["fallback_reason"] = reason
    if facts["exporter"] is None:
        raise ExportError("; ".join(errors), model=model, key=f"models.{model}.export",
                          fix="check the model exports with torch.onnx.export, or export it "
                              "yourself and use checkpoint.kind: onnx")
    return facts


def _onnx_outputs(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def run(model: str, m: dict, onnx_out: Path, reference_out: Path, sidecar_path: Path,
        root: Path = Path(".")) -> dict:
    import torch

    t0 = time.perf_counter()
    root = Path(root)
    onnx_out, reference_out = Path(onnx_out), Path(reference_out)
    ckpt = m["checkpoint"]
    first_profile = next(iter(m["profiles"].values()))
    opt_shapes = modelio.shapes_at(first_profile, "opt")
    data = modelio.load_npz(root / reference_data(m)["path"]) if reference_data(m) else None
    feed = modelio.sample_inputs(m, opt_shapes, seed=m["export"]["seed"], data=data)
    inputs = {"checkpoint": root / ckpt["path"]} if ckpt.get("path") else {}
    if reference_data(m):
        inputs["reference_data"] = root / reference_data(m)["path"]
    arch_source = _arch_source(ckpt, root)
    if arch_source:
        inputs["arch_source"] = arch_source
    if cache.try_restore("export", inputs=inputs, config_slice=stage_slice(m, "export"),
                         tools=tool_versions("export"),
                         outputs={"onnx": onnx_out, "reference": reference_out},
                         sidecar_path=Path(sidecar_path)):
        return read_json(sidecar_path)

    with atomic_path(onnx_out) as tmp:
        if ckpt["kind"] == "onnx":
            shutil.copyfile(root / ckpt["path"], tmp)
            facts = {"exporter": "none (onnx checkpoint)", "fallback_reason": None}
            reference = _run_onnx(tmp, feed)
            eval_ref = _run_onnx(tmp, _eval_feed(m, root)) if "evaluation" in m else {}
            ref_source = "onnxruntime on the given ONNX (no PyTorch checkpoint)"
        else:
            net = load_module(model, m, root)
            example = tuple(torch.from_numpy(feed[n]) for n in m["inputs"])
            facts = _export(net, model, m, example, tmp)
            runnable = net.module() if hasattr(net, "module") and not isinstance(
                net, torch.nn.Module) else net
            out_names = _onnx_outputs(tmp)
            reference = _run_torch(runnable, feed, m, out_names)
            eval_ref = (_run_torch(runnable, _eval_feed(m, root), m, out_names)
                        if "evaluation" in m else {})
            ref_source = "pytorch eager (cpu, fp32)"
        _check(model, tmp)
        arrays = {f"in:{k}": v for k, v in feed.items()}
        arrays |= {f"out:{k}": v for k, v in reference.items()}
        arrays |= {f"eval_out:{k}": v for k, v in eval_ref.items()}
        with atomic_path(reference_out) as rtmp, open(rtmp, "wb") as f:
            np.savez(f, **arrays)

    result = {**facts, "reference": ref_source, "opset": m["opset"],
              "outputs": list(reference), "time_s": round(time.perf_counter() - t0, 3)}
    side = make_sidecar(stage="export", model=model, inputs=inputs,
                        config_slice=stage_slice(m, "export"),
                        tools=tool_versions("export"),
                        outputs={"onnx": onnx_out, "reference": reference_out}, result=result)
    write_json(sidecar_path, side)
    return side


def _arch_source(ckpt: dict, root: Path) -> Path | None:
    """The project's own model-definition file, so that editing it re-exports.

    Installed packages (torchvision, ...) are covered by their versions instead.
    """
    if ckpt["kind"] != "state_dict":
        return None
    if str(root.resolve()) not in sys.path:
        sys.path.insert(0, str(root.resolve()))
    try:
        spec = importlib.util.find_spec(ckpt["arch"].split(":")[0])
    except (ImportError, ValueError):
        return None
    origin = Path(spec.origin) if spec and spec.origin else None
    if origin and origin.is_file() and "site-packages" not in origin.parts:
        return origin
    return None


def _eval_feed(m: dict, root: Path) -> dict:
    data = modelio.load_npz(root / m["evaluation"]["path"])
    return {n: data[n].astype(modelio.input_dtype(m, n)) for n in m["inputs"]}


def _run_torch(net, feed: dict, m: dict, out_names: list[str]) -> dict:
    import torch

    with torch.inference_mode():
        out = net(*(torch.from_numpy(feed[n]) for n in m["inputs"]))
    outs = out if isinstance(out, (tuple, list)) else [out]
    return {name: o.detach().float().numpy() for name, o in zip(out_names, outs)}


def _run_onnx(path: Path, feed: dict) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def _check(model: str, path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"exported ONNX fails onnx.checker: {err}".splitlines()[0],
                          model=model, fix="report the exporter bug; try "
                          "export.exporter: torchscript") from None
