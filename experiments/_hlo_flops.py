"""Matmul FLOPs of compiled HLO text for `experiments/compile_check.py`, loops counted by their trip counts.

Importing this module does not import jax.
"""
from __future__ import annotations

import re

import numpy as np

from experiments._compile_targets import _COMP, _INSTR, _SHAPE, _dims


def _contracted(line: str, op: str, comp: str, shapes: dict) -> float:
    """Elements each output element of a dot (or of a matmul that XLA:TPU writes as a convolution) sums over.

    A dot sums over its lhs contracting dimensions. A convolution sums over its lhs feature dimension 'f' (divided
    by feature_group_count) and over its window; XLA:TPU writes some matmul transposes as a convolution whose lhs
    spatial dimensions are 1 and padded to the window, so only the window taps that land on the input are counted:
    per spatial dimension min(window, input size).
    """
    operand = re.search(op + r"\((?:[a-z0-9]+\[[0-9,]*\]\S* )?%([\w.\-]+)", line)
    lhs_shape = shapes.get((comp, operand.group(1)), []) if operand else []
    if op == "dot":
        contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
        dims = _dims(contract.group(1)) if contract else []
        if not lhs_shape or any(d >= len(lhs_shape) for d in dims):
            return 1.0
        return float(np.prod([lhs_shape[d] for d in dims]))
    labels = re.search(r"dim_labels=([0-9a-z]+)_", line)
    if not labels or "f" not in labels.group(1) or len(labels.group(1)) != len(lhs_shape):
        return 1.0
    lhs = labels.group(1)
    groups = re.search(r"feature_group_count=(\d+)", line)
    n = lhs_shape[lhs.index("f")] / (int(groups.group(1)) if groups else 1)
    window = re.search(r"window=\{size=([0-9x]+)", line)
    for axis, size in enumerate(_dims(window.group(1).replace("x", ",")) if window else []):
        if str(axis) in lhs:
            n *= min(size, lhs_shape[lhs.index(str(axis))])
    return float(n)


def _operands(line: str, op: str) -> list[str]:
    """The operand names of instruction `op` on an HLO line (index comments and inline shapes dropped)."""
    m = re.search(r"\b" + re.escape(op) + r"\(([^)]*)\)", re.sub(r"/\*[^*]*\*/", "", line))
    return re.findall(r"%([\w.\-]+)", m.group(1)) if m else []


def _defs(lines: list[str]) -> dict[str, str]:
    """Instruction name -> its line, in one computation."""
    return {m.group(1): ln for ln in lines if (m := re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = ", ln))}


def _const(name: str, defs: dict[str, str]) -> int | None:
    """The integer value of `name` when it is a constant (through copies and converts)."""
    for _ in range(8):
        line = defs.get(name, "")
        c = re.search(r"[su]\d+\[\]\S* constant\((-?\d+)\)", line)
        if c:
            return int(c.group(1))
        ops = _operands(line, "copy") or _operands(line, "convert")
        if not ops:
            return None
        name = ops[0]
    return None


def _counted_loop(while_line: str, caller: list[str], comps: dict) -> int | None:
    """Trip count of a loop `for (i = init; i < bound; i += step)` read from the condition (ROOT compare of tuple
    element k with a constant), the body (element k of the ROOT tuple = element k + a constant) and the caller (the
    init tuple's element k, a constant). None when the loop has another form."""
    cond, body = (re.search(key + r"=%([\w.\-]+)", while_line) for key in ("condition", "body"))
    if not cond or not body or cond.group(1) not in comps or body.group(1) not in comps:
        return None
    cdefs = _defs(comps[cond.group(1)])
    root = next((ln for ln in comps[cond.group(1)] if ln.lstrip().startswith("ROOT") and " compare(" in ln), "")
    direction = re.search(r"direction=(\w+)", root)
    ops = _operands(root, "compare")
    if len(ops) != 2 or not direction:
        return None

    def index(name, defs):  # the tuple element a get-tuple-element reads, or None
        m = re.search(r"get-tuple-element\(.*index=(\d+)", defs.get(name, ""))
        return m.group(1) if m else None

    k, bound, flip = index(ops[0], cdefs), _const(ops[1], cdefs), False
    if k is None:
        k, bound, flip = index(ops[1], cdefs), _const(ops[0], cdefs), True
    if k is None or bound is None:
        return None
    bdefs = _defs(comps[body.group(1)])
    root = next((ln for ln in comps[body.group(1)] if ln.lstrip().startswith("ROOT") and " tuple(" in ln), "")
    elems = _operands(root, "tuple")
    nxt = elems[int(k)] if int(k) < len(elems) else ""
    step = next((c for o in _operands(bdefs.get(nxt, ""), "add") if (c := _const(o, bdefs)) is not None), None)
    init_tuple = _operands(while_line, "while")
    tdefs = _defs(caller)
    inits = _operands(tdefs.get(init_tuple[0], ""), "tuple") if init_tuple else []
    init = _const(inits[int(k)], tdefs) if int(k) < len(inits) else None
    if not step or init is None:
        return None
    d = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE"}.get(direction.group(1)) if flip else direction.group(1)
    span = {"LT": bound - init, "LE": bound - init + 1, "GT": init - bound, "GE": init - bound + 1}.get(d)
    if span is None or (span > 0) != (step > 0 if d in ("LT", "LE") else step < 0):
        return None
    return max(0, -(-abs(span) // abs(step)))


def _trip_count(while_line: str, caller: list[str], comps: dict) -> int:
    """A while loop's trip count: XLA's `known_trip_count` (XLA:CPU writes it), else the counted loop read from the
    condition, body and init (XLA:TPU writes no count; its collective-matmul loops step by 2), else the largest
    integer constant of the condition computation or of the fusions it calls."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
    if known:
        return int(known.group(1))
    counted = _counted_loop(while_line, caller, comps)
    if counted is not None:
        return counted
    cond = re.search(r"condition=%([\w.\-]+)", while_line)
    lines = list(comps.get(cond.group(1), [])) if cond else []
    for callee in re.findall(r"calls=%([\w.\-]+)", "\n".join(lines)):
        lines += comps.get(callee, [])
    consts = [int(c) for ln in lines for c in re.findall(r"[su]\d+\[\]\S* constant\((\d+)\)", ln)]
    return max(consts, default=1)


def _phase(line: str) -> str:
    """Which pass a matmul belongs to, from the traced op name: the recomputed forward of a `jax.checkpoint`
    ("recompute"), the backward ("backward") or the forward."""
    meta = re.search(r'op_name="([^"]+)"', line)
    name = meta.group(1) if meta else ""
    if "rematted_computation" in name:
        return "recompute"
    return "backward" if "transpose(" in name else "forward"


def _parse_hlo(hlo_text: str):
    """(computations: name -> instruction lines, entry name, shapes: (computation, value) -> dims)."""
    comps, shapes, entry, name = {}, {}, "", None
    for line in hlo_text.splitlines():
        m = _COMP.match(line)
        if m:
            name = m.group(1)
            comps[name] = []
            for p, _, dims in re.findall(r"([\w.\-]+): " + _SHAPE, m.group(2)):
                shapes[(name, p)] = _dims(dims)
            entry = name if line.startswith("ENTRY") else entry
            continue
        if name is None:
            continue
        im = _INSTR.match(line)
        if im:
            shapes[(name, im.group(1))] = _dims(im.group(3))
        comps[name].append(line)
    return comps, entry, shapes


def dot_flops_by_phase(hlo_text: str) -> dict[str, float]:
    """Matmul FLOPs of compiled HLO text per pass ('forward', 'backward', 'recompute'), following every call.

    Every `dot` (and every `convolution`, XLA:TPU's form of a matmul) contributes 2 x (output elements) x
    (elements summed per output). A computation counts once per call: fusions, `call`s and async wrappers once, a
    while body its trip count times (XLA's own cost analysis counts a loop body once, which undercounts scans over
    layers and micro-batches), nested loops the product of their trip counts. Of a `conditional` the costliest branch
    counts (an upper bound: one branch runs). Custom calls (Pallas kernels such as splash attention) are opaque and
    count nothing.
    """
    comps, entry, shapes = _parse_hlo(hlo_text)
    memo: dict[str, dict[str, float]] = {}

    def add(into, part, n=1.0):
        for k, v in part.items():
            into[k] = into.get(k, 0.0) + n * v

    def walk(c: str, depth: int = 0) -> dict[str, float]:
        if c in memo or depth > 256 or c not in comps:
            return memo.get(c, {})
        total: dict[str, float] = {}
        for line in comps[c]:
            im = _INSTR.match(line)
            if im and im.group(4) in ("dot", "convolution"):
                out = float(np.prod(_dims(im.group(3))))
                add(total, {_phase(line): 2.0 * out * _contracted(line, im.group(4), c, shapes)})
            body = re.search(r"body=%([\w.\-]+)", line)
            if body:
                add(total, walk(body.group(1), depth + 1), _trip_count(line, comps[c], comps))
            for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
                add(total, walk(callee, depth + 1))
            groups = re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", line)
            pair = re.findall(r"(?:true|false)_computation=%([\w.\-]+)", line)
            for group in groups + ([",".join(pair)] if pair else []):
                branches = [walk(b.strip().lstrip("%"), depth + 1) for b in group.split(",") if b.strip()]
                add(total, max(branches, key=lambda d: sum(d.values()), default={}))
        memo[c] = total
        return total

    return walk(entry)


def dot_flops(hlo_text: str) -> float:
    """Matmul FLOPs of compiled HLO text with while bodies counted by their trip counts (`dot_flops_by_phase`)."""
    return sum(dot_flops_by_phase(hlo_text).values())


_KERNEL_TARGETS = ("tpu_custom_call", "mosaic", "triton", "cudnn", "cublas")


def custom_kernel_names(hlo_text: str) -> list[str]:
    """Names of the compute kernels that compiled HLO calls as custom calls (Pallas / Mosaic, Triton, cuDNN, cuBLAS),
    one per call site: their FLOPs are not written in the HLO, so `dot_flops` cannot count them."""
    names = []
    for line in hlo_text.splitlines():
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target and any(k in target.group(1).lower() for k in _KERNEL_TARGETS):
            name = re.match(r"^\s*(?:ROOT )?%([\w\-]+?)(?:\.\d+)*(?:\.clone(?:\.\d+)*)* = ", line)
            names.append(name.group(1) if name else target.group(1))
    return names
