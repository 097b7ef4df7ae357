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

from engineforge import modelio
from engineforge.errors import ExportError
from engineforge.results import ExportResult
from engineforge.settings import ExportSettings, Section

log = logging.getLogger(__name__)

TOOLS = ("torch", "torchvision", "onnx", "onnxscript")


class Settings(Section):
    checkpoint: dict
    inputs: dict
    opset: int
    export: ExportSettings
    optimize: bool          # optimize in the exporter (only when onnxsim does not run next)
    reference_shapes: dict[str, list[int]]
    task: str
    labels: str | None      # labels array: save reference outputs on the evaluation set too
    samples: int            # reference samples (audit.samples, in whole batches)
    batch: int              # samples per batch of the reference (fits the first profile)


def settings(m: dict, w: dict) -> Settings:
    first = next(iter(m["profiles"].values()))
    batch = modelio.batch_size(m["inputs"], first, m["audit"]["samples"])
    return Settings(checkpoint=m["checkpoint"], inputs=m["inputs"], opset=m["opset"],
                    export=m["export"], optimize=not m["simplify"]["enabled"],
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


def _export(net, model: str, m: Settings, example: tuple, tmp: Path) -> dict:
    """Dynamo first, TorchScript exporter as fallback. Returns export facts."""
    import torch

    names = list(m.inputs)
    dyn = modelio.dynamic_dims(m.inputs)
    # Named, unbounded dims: the ONNX keeps the names, and profile ranges (which only the
    # engine builds use) can change without a re-export.
    dims = {d: torch.export.Dim(d) for axes in dyn.values() for d in axes.values()}
    facts: dict = {"exporter": None, "fallback_reason": None}
    errors = []
    order = ["dynamo", "torchscript"] if m.export.exporter == "dynamo" else ["torchscript"]
    if not m.export.fallback:
        order = order[:1]
    for exporter in order:
        try:
            if exporter == "dynamo":
                shapes = tuple({a: dims[d] for a, d in dyn[n].items()} or None for n in names)
                program = torch.onnx.export(net, example, dynamo=True, input_names=names,
                                            dynamic_shapes=shapes, opset_version=m.opset,
                                            # onnxsim folds and fuses next; optimize only
                                            # when it is off (saves ~1 s on resnet18)
                                            optimize=m.optimize,
                                            verbose=False)
                program.save(str(tmp), external_data=False)
                _drop_stack_traces(tmp)
            else:
                torch.onnx.export(net, example, str(tmp), dynamo=False, input_names=names,
                                  dynamic_axes={n: dyn[n] for n in names if dyn[n]},
                                  opset_version=m.opset, do_constant_folding=True)
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


def _drop_stack_traces(path: Path) -> None:
    """The dynamo exporter records each node's Python stack trace, with absolute paths of
    the checkout and the environment: the same model exported in two directories would
    differ. Those traces go, so exports are reproducible byte for byte."""
    import onnx

    proto = onnx.load(str(path))
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
        shutil.copyfile(job.inputs["checkpoint"], onnx_out)
        facts = {"exporter": "none (onnx checkpoint)", "fallback_reason": None}
        reference = _run_onnx(onnx_out, ref_feed, m.batch)
        eval_ref = _run_onnx(onnx_out, eval_feed, m.batch) if eval_feed else {}
        ref_source = "onnxruntime on the given ONNX (no PyTorch checkpoint)"
    else:
        net = load_module(model, m.checkpoint, job.inputs.get("checkpoint"))
        example = tuple(torch.from_numpy(feed[n]) for n in m.inputs)
        facts = _export(net, model, m, example, onnx_out)
        runnable = net.module() if hasattr(net, "module") and not isinstance(
            net, torch.nn.Module) else net
        out_names = _onnx_outputs(onnx_out)
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


def _sample_shapes(m: Settings) -> dict[str, list[int]]:
    """The reference samples' shapes: ``samples`` of the first profile's opt shape."""
    return {n: [m.samples, *s[1:]] for n, s in m.reference_shapes.items()}


def _run_torch(net, feed: dict, inputs: dict, out_names: list[str], batch: int) -> dict:
    """The module's outputs (tuple, list, dict: flattened in the exporter's order) on
    every sample of ``feed``, in batches of ``batch`` like the audit's."""
    import torch
    from torch.utils._pytree import tree_leaves

    def infer(b: dict) -> dict:
        with torch.inference_mode():
            out = net(*(torch.from_numpy(b[n]) for n in inputs))
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        return {name: o.detach().float().numpy() for name, o in zip(out_names, outs)}

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
