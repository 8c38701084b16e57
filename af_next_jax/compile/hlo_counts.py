"""What a compiled step does per device, counted from its optimized HLO text with loops unrolled.

XLA's `cost_analysis()` counts a while loop's body once, so a scanned 28-layer decoder reads as one
layer and remat's recomputation cannot be seen in it. Here every computation is weighted by how many
times one step runs it: a while body by its trip count (XLA's known_trip_count, else the bound of the
`counter < N` compare in its condition, counting from 0 by the step the body adds: 1 for jax's scan and
fori_loop, 2 for XLA's bidirectional collective matmuls), a fusion or call by the weight of its caller.
Counted per device:

  matmul_flops      2 x multiply-adds of every `dot` and `convolution` (TPU writes most matmuls as
                    convolutions: output elements x the kernel's input features x the window positions
                    that meet the input; strides and dilations are taken as 1)
  collective_bytes  {kind: bytes of results} of every collective, per step (loop bodies x trip count;
                    an async start counts its result, not the operand it also returns; a collective
                    whose groups hold one device each moves nothing and is not counted)

Not seen: work inside custom calls (Pallas kernels: the flash / ring attention cores on TPU and GPU)
and elementwise work. Loops whose trip count cannot be read count once and are listed in `unknown_loops`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

from af_next_jax.compile.report import COLLECTIVES, _DTYPE_BYTES

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\((?P<params>.*)\)\s*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)"
                          r"\s+(?P<op>[a-z][\w\-]*)\((?P<operands>[^)]*)\)(?P<attributes>.*)$")
_PARAMETER = re.compile(r"(?P<name>[\w.\-]+):\s*(?P<shape>[a-z0-9]+\[[0-9,]*\])")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_CALLEES = re.compile(r"(?:calls|to_apply|body|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_BODY = re.compile(r"body=%?([\w.\-]+)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(?P<sizes>[^\]]*)\]\s*\{(?P<axes>[^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")
_LISTED_GROUPS = re.compile(r"replica_groups=\{\{([^}]*)\}")


@dataclasses.dataclass
class HloCounts:
    matmul_flops: float
    collective_bytes: dict[str, float]
    unknown_loops: list[str]
    # {scope: {kind: bytes}} when `count` is given scopes: each collective under the first scope whose text
    # its op_name metadata contains, else under "other".
    collective_bytes_by_scope: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _dims(shape: str) -> list[int]:
    found = _ARRAY.search(shape)
    return [int(d) for d in found.group(2).split(",") if d] if found else []


def _array_bytes(shape: str) -> int:
    return sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
               for dtype, dims in _ARRAY.findall(shape))


def _result_bytes(shape: str, started: bool) -> int:
    """Bytes a collective delivers: an async `-start` returns (its operand, its result, context...): the
    second array; a plain collective returns its result (a tuple when it moves several arrays)."""
    arrays = _ARRAY.findall(shape)
    if started and len(arrays) >= 2:
        dtype, dims = arrays[1]
        return math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
    return _array_bytes(shape)


def _group_size(attributes: str) -> int | None:
    """Devices in each group of a collective, from its replica_groups in any of XLA's three spellings
    (mesh axes, iota, listed); None when it names none (all devices)."""
    mesh = _MESH_GROUPS.search(attributes)
    if mesh:
        sizes = {name.strip("'"): int(size) for name, size in re.findall(r"('[^']*')=(\d+)", mesh.group("sizes"))}
        named = [axis.strip().strip("'") for axis in mesh.group("axes").split(",") if axis.strip()]
        return math.prod(sizes.get(axis, 1) for axis in named)
    iota = _IOTA_GROUPS.search(attributes)
    if iota:
        return int(iota.group(1))
    listed = _LISTED_GROUPS.search(attributes)
    return len(listed.group(1).split(",")) if listed else None


@dataclasses.dataclass
class _Computation:
    shapes: dict[str, str] = dataclasses.field(default_factory=dict)     # value name -> its shape text
    lines: list[re.Match] = dataclasses.field(default_factory=list)


def _parse(hlo_text: str) -> tuple[dict[str, _Computation], str]:
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations[header.group("name")] = _Computation()
            if line.startswith("ENTRY"):
                entry = header.group("name")
            for parameter in _PARAMETER.finditer(header.group("params")):
                current.shapes[parameter.group("name")] = parameter.group("shape")
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if instruction:
            current.shapes[instruction.group("name")] = instruction.group("shape")
            current.lines.append(instruction)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _counter_step(condition: _Computation, body: _Computation | None) -> int:
    """By how much the body advances the counter the condition compares: 1 unless the body's ROOT tuple
    puts `counter + c` (a constant c) back at the counter's index. XLA's bidirectional windowed einsum
    loops (collective matmuls) do two steps' work an iteration and count by 2."""
    counter = next((re.search(r"index=(\d+)", line.group("attributes")) for line in condition.lines
                    if line.group("op") == "get-tuple-element"), None)
    root = next((line for line in (body.lines if body else []) if line.group("op") == "tuple"
                 and line.group(0).lstrip().startswith("ROOT")), None)
    if counter is None or root is None:
        return 1
    operands = [o.strip().lstrip("%") for o in re.sub(r"/\*.*?\*/", "", root.group("operands")).split(",")]
    if int(counter.group(1)) >= len(operands):
        return 1
    lines = {line.group("name"): line for line in body.lines}
    update = lines.get(operands[int(counter.group(1))].split()[-1].lstrip("%"))
    if update is None or update.group("op") != "add":
        return 1
    added = [lines.get(o.strip().split()[-1].lstrip("%")) for o in update.group("operands").split(",")]
    steps = [int(value) for line in added if line is not None and line.group("op") == "constant"
             for value in re.findall(r"constant\((\d+)\)", line.group(0))]
    return steps[0] if len(steps) == 1 and steps[0] > 0 else 1


def _trip_count(attributes: str, condition: _Computation | None, computations: dict,
                body: _Computation | None = None) -> int | None:
    """The loop's trip count: XLA's own `known_trip_count` when it wrote one, else N of the condition
    `counter < N` (an LT compare, in the condition or a fusion it calls, against its one constant),
    divided by the counter's step (`_counter_step`)."""
    known = _KNOWN_TRIPS.search(attributes)
    if known:
        return int(known.group(1))
    if condition is None:
        return None
    constants = [int(value) for line in condition.lines if line.group("op") == "constant"
                 for value in re.findall(r"constant\((-?\d+)\)", line.group(0))]
    compared = [line for computation in [condition] + [computations.get(c) for line in condition.lines
                                                        for c in _CALLEES.findall(line.group("attributes"))]
                if computation is not None for line in computation.lines
                if line.group("op") == "compare" and "direction=LT" in line.group("attributes")]
    return -(-constants[0] // _counter_step(condition, body)) if len(constants) == 1 and compared else None


def _operand_shape(computation: _Computation, operand: str) -> str:
    operand = operand.strip()
    inline = _ARRAY.match(operand)               # CPU / GPU text prints the operand's shape inline
    return operand if inline else computation.shapes.get(operand.split()[-1].lstrip("%"), "")


def _matmul_flops(computation: _Computation, line: re.Match) -> float:
    output = math.prod(_dims(line.group("shape")))
    operands = [o for o in re.split(r",\s*(?![^\[]*\])", line.group("operands")) if o.strip()]
    if line.group("op") == "dot":
        contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line.group("attributes"))
        lhs = _dims(_operand_shape(computation, operands[0]))
        reduced = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
        return 2.0 * output * reduced
    labels = re.search(r"dim_labels=([^_]*)_([^-]*)->", line.group("attributes"))
    lhs, kernel = _dims(_operand_shape(computation, operands[0])), _dims(_operand_shape(computation, operands[1]))
    if not labels or len(labels.group(1)) != len(lhs) or len(labels.group(2)) != len(kernel):
        return 0.0
    lhs_sizes = dict(zip(labels.group(1), lhs))
    # Per output element: the kernel's input features x, per spatial dimension, the window positions that
    # meet the (unpadded) input: TPU writes a dot's extra dimensions as windows over a size-1 input.
    reduced = math.prod(size if label == "i" else min(size, lhs_sizes.get(label, size))
                        for label, size in zip(labels.group(2), kernel) if label != "o")
    return 2.0 * output * reduced


def count(hlo_text: str, scopes: dict[str, str] | None = None) -> HloCounts:
    """Matmul FLOPs and collective bytes of one run of the program, per device (see the module doc);
    with `scopes` ({label: text of the op_name path}), the collective bytes split by where they come from."""
    computations, entry = _parse(hlo_text)
    weight: dict[str, float] = collections.defaultdict(float)
    unknown = []

    def visit(name: str, times: float) -> None:
        if name not in computations:
            return
        weight[name] += times
        for line in computations[name].lines:
            attributes = line.group("attributes")
            if line.group("op") == "while":
                condition, body = _CONDITION.search(attributes).group(1), _BODY.search(attributes).group(1)
                trips = _trip_count(attributes, computations.get(condition), computations, computations.get(body))
                if trips is None:
                    unknown.append(line.group("name"))
                visit(body, times * (trips or 1))
                continue
            for callee in _CALLEES.findall(attributes):
                visit(callee, times)
            for branches in _BRANCHES.findall(attributes):
                for callee in branches.split(","):
                    visit(callee.strip().lstrip("%"), times)

    visit(entry, 1.0)
    flops, collectives = 0.0, collections.defaultdict(float)
    by_scope = collections.defaultdict(lambda: collections.defaultdict(float))
    for name, times in weight.items():
        computation = computations[name]
        for line in computation.lines:
            op = line.group("op")
            if op in ("dot", "convolution"):
                flops += times * _matmul_flops(computation, line)
            kind = op[:-len("-start")] if op.endswith("-start") else op
            if kind in COLLECTIVES and _group_size(line.group("attributes")) != 1:  # a group of one moves nothing
                moved = times * _result_bytes(line.group("shape"), started=op != kind)
                collectives[kind] += moved
                if scopes is not None:
                    op_name = _OP_NAME.search(line.group("attributes"))
                    path = op_name.group(1) if op_name else ""
                    by_scope[next((label for label, text in scopes.items() if text in path), "other")][kind] += moved
    return HloCounts(flops, dict(collectives), unknown, {scope: dict(kinds) for scope, kinds in by_scope.items()})
