"""Compiled HLO text, re-read: computations, while-loop trip counts, loop-weighted FLOPs, collectives.

XLA's cost analysis (what `Compiled.cost_analysis()` reports) counts a while loop's body once,
however many times it runs; scanned layers and gradient accumulation are such loops. This module
splits the text of a compiled program into its computations, finds each loop's trip count and
re-runs the cost analysis per computation, so that `loop_weighted_flops` is the FLOPs one
execution really does. Custom kernels carry no FLOPs in that analysis; splash attention's
Mosaic kernels (`splash_mha_fwd*`, `*_dq*`, `*_dkv*`) are counted from their operand shapes
(`kernel_flops`). `collective_counts` / `largest_collectives` list the cross-device ops with
the bytes they move. Works on any backend's program text (TPU from `jaxlm aot`, CPU in the tests).

    program = HloProgram(compiled.as_text())
    flops_per_device, loops = loop_weighted_flops(program)
"""

import math
import re
from typing import Optional

from jaxlm.compat import hlo_text_cost

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_INSTR_RE = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = ")
_REF_RE = re.compile(r"%([\w.\-]+)")
_CALLEE_RE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation|"
                        r"branch_computations|called_computations|async_execution_thread_computations)="
                        r"(\{[^}]*\}|%[\w.\-]+)")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
_ARRAY_RE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
# Matmuls per splash kernel, each 2·(query elements)·(keys) FLOPs: the forward computes QK^T and
# PV; dq recomputes QK^T and dO·V^T, then dS·K; dkv recomputes both, then P^T·dO and dS^T·Q.
_SPLASH_MATMULS = (("fwd", 2), ("dq", 3), ("dkv", 4))
_SPLASH_KINDS = "|".join(kind for kind, _ in _SPLASH_MATMULS)
_SPLASH_NAME_RE = re.compile(rf"splash_m[hq]a_(?:{_SPLASH_KINDS})\w*")  # anywhere in the text
_SPLASH_RE = re.compile(rf"%splash_m[hq]a_({_SPLASH_KINDS})[\w.\-]* = ")  # an instruction's definition


def splash_kernels(text: str) -> list[str]:
    """The splash attention kernels (Mosaic custom calls) named in a compiled program's text."""
    return sorted(set(_SPLASH_NAME_RE.findall(text)))


def strip_attribute(text: str, name: str) -> str:
    """`text` without any `, name={...}` attribute (braces balanced, quoted strings skipped).

    Pallas kernels' frontend_attributes hold JSON over several lines, which HLO's parser rejects
    when the text is read back; they change neither FLOPs nor buffers."""
    key, out, i = f", {name}={{", [], 0
    while True:
        j = text.find(key, i)
        if j < 0:
            return "".join(out) + text[i:]
        out.append(text[i:j])
        k, depth, quoted = j + len(key) - 1, 0, False
        while k < len(text):
            ch = text[k]
            if quoted:
                if ch == "\\":
                    k += 1
                elif ch == '"':
                    quoted = False
            elif ch == '"':
                quoted = True
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    break
            k += 1
        i = k + 1


def kernel_flops(line: str) -> float:
    """FLOPs of one splash attention kernel call (0 for any other instruction), from the shapes in
    its operand_layout_constraints: queries [..., T, D] are the first floating-point array, keys
    [..., S, D] the next. Counted dense, T x S, as jaxlm.metrics counts attention; under a causal
    mask the kernel skips the blocks above the diagonal, so it does about half that."""
    m = _SPLASH_RE.match(line.lstrip())
    c = re.search(r"operand_layout_constraints=\{(.*?)\}(?:, [a-z_]+=|$)", line)
    if not m or not c:
        return 0.0
    arrays = [[int(d) for d in dims.split(",")] for dtype, dims in _ARRAY_RE.findall(c.group(1))
              if dtype.startswith(("f", "bf")) and dims.count(",") >= 2]  # Not the int8 mask tables.
    if len(arrays) < 2:
        return 0.0
    matmuls = dict(_SPLASH_MATMULS)[m.group(1)]
    return 2.0 * matmuls * math.prod(arrays[0]) * arrays[1][-2]


def _skip_type(text: str, i: int) -> int:
    """Index just past the HLO type starting at text[i] (a tuple type has nested parens)."""
    if text[i] != "(":
        j = text.find(" ", i)
        return len(text) if j < 0 else j
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(text)


class Instruction:
    __slots__ = ("name", "type", "opcode", "line")

    def __init__(self, name: str, type_: str, opcode: str, line: str):
        self.name, self.type, self.opcode, self.line = name, type_, opcode, line


class HloProgram:
    """The compiled HLO text, split into computations, with loop trip counts resolved."""

    def __init__(self, text: str):
        self.text = text = strip_attribute(text, "frontend_attributes")
        lines = text.splitlines()
        self.preamble: list[str] = []  # Everything before the first computation, minus the header.
        self.blocks: dict[str, list[str]] = {}  # computation -> its lines, in text order.
        self.entry: Optional[str] = None
        current: Optional[str] = None
        for n, line in enumerate(lines):
            if current is None:
                m = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
                if m and line.rstrip().endswith("{"):
                    current = m.group(2)
                    self.blocks[current] = [line]
                    if m.group(1):
                        self.entry = current
                elif n > 0:
                    self.preamble.append(line)
            else:
                self.blocks[current].append(line)
                if line.startswith("}"):
                    current = None
        self.instructions: dict[str, list[Instruction]] = {}
        self.defs: dict[str, Instruction] = {}
        for comp, block in self.blocks.items():
            out = []
            for line in block[1:-1]:
                m = _INSTR_RE.match(line)
                if not m:
                    continue
                start = m.end()
                end = _skip_type(line, start)
                op = re.match(r"\s*([a-z][\w\-]*)\(", line[end:])
                ins = Instruction(m.group(1), line[start:end], op.group(1) if op else "", line)
                out.append(ins)
                self.defs[ins.name] = ins
            self.instructions[comp] = out

    # -- call graph -------------------------------------------------------------------------
    def callees(self, comp: str) -> list[str]:
        out = []
        for ins in self.instructions.get(comp, ()):
            for group in _CALLEE_RE.findall(ins.line):
                out.extend(n for n in _REF_RE.findall(group) if n in self.blocks)
        return out

    def reachable(self, root: str) -> list[str]:
        seen, stack = {root}, [root]
        while stack:
            for callee in self.callees(stack.pop()):
                if callee not in seen:
                    seen.add(callee)
                    stack.append(callee)
        return [c for c in self.blocks if c in seen]  # Text order: callees before callers.

    @staticmethod
    def while_parts(ins: Instruction) -> tuple[Optional[str], Optional[str]]:
        body = re.search(r"\bbody=%([\w.\-]+)", ins.line)
        cond = re.search(r"\bcondition=%([\w.\-]+)", ins.line)
        return (body.group(1) if body else None), (cond.group(1) if cond else None)

    def _constant(self, name: str) -> Optional[int]:
        ins = self.defs.get(name)
        if ins is None:
            return None
        m = re.search(r"\bconstant\((-?\d+)\)", ins.line)
        if ins.opcode == "constant" and m:
            return int(m.group(1))
        if ins.opcode in ("copy", "bitcast", "convert"):
            refs = _REF_RE.findall(ins.line.split("=", 1)[1])
            return self._constant(refs[0]) if refs else None
        return None

    def trip_count(self, ins: Instruction) -> Optional[int]:
        """Iterations of a while loop: backend_config's known_trip_count, else `i < N` with
        i starting at a constant (0 when it can't be traced) and stepping by a constant."""
        try:
            return self._trip_count(ins)
        except (AttributeError, IndexError, ValueError):  # A loop of a shape not recognised.
            return None

    def _trip_count(self, ins: Instruction) -> Optional[int]:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.line)
        if m:
            return int(m.group(1))
        body, cond = self.while_parts(ins)
        if cond is None or body is None:
            return None
        root = next((i for i in self.instructions.get(cond, ()) if i.line.lstrip().startswith("ROOT ")), None)
        if root is None or root.opcode != "compare":
            return None
        direction = re.search(r"direction=(\w+)", root.line)
        operands = _REF_RE.findall(root.line.split(root.opcode + "(", 1)[1].split(")", 1)[0])
        if len(operands) != 2 or not direction:
            return None
        lhs, rhs = (self.defs.get(o) for o in operands)
        bound = self._constant(operands[1])
        if lhs is None or bound is None or lhs.opcode != "get-tuple-element":
            return None
        index = int(re.search(r"index=(\d+)", lhs.line).group(1))
        start, step = 0, 1
        init = _REF_RE.findall(ins.line.split("while(", 1)[1].split(")", 1)[0])
        init_ins = self.defs.get(init[0]) if init else None
        if init_ins is not None and init_ins.opcode == "tuple":
            elems = _REF_RE.findall(init_ins.line.split("tuple(", 1)[1].split("), ", 1)[0])
            if index < len(elems):
                value = self._constant(elems[index])
                start = value if value is not None else 0
        body_root = next((i for i in self.instructions.get(body, ()) if i.line.lstrip().startswith("ROOT ")), None)
        if body_root is not None and body_root.opcode == "tuple":
            elems = _REF_RE.findall(body_root.line.split("tuple(", 1)[1])
            nxt = self.defs.get(elems[index]) if index < len(elems) else None
            if nxt is not None and nxt.opcode == "add":
                for ref in _REF_RE.findall(nxt.line.split("add(", 1)[1].split(")", 1)[0]):
                    value = self._constant(ref)
                    if value:
                        step = value
        if direction.group(1) == "LT":
            return max(math.ceil((bound - start) / step), 0)
        if direction.group(1) == "LE":
            return max(math.floor((bound - start) / step) + 1, 0)
        return None

    def loops(self, comp: str) -> list[tuple[Instruction, Optional[int]]]:
        """While loops run by `comp` itself or by computations it calls, other than loop bodies."""
        out, seen, stack = [], {comp}, [comp]
        while stack:
            c = stack.pop()
            for ins in self.instructions.get(c, ()):
                if ins.opcode == "while":
                    out.append((ins, self.trip_count(ins)))
                    continue
                for group in _CALLEE_RE.findall(ins.line):
                    for callee in _REF_RE.findall(group):
                        if callee in self.blocks and callee not in seen:
                            seen.add(callee)
                            stack.append(callee)
        return out

    def multiplicities(self) -> dict[str, int]:
        """How many times each computation runs per execution of the program."""
        mult = {c: 0 for c in self.blocks}
        mult[self.entry] = 1
        for comp in reversed(list(self.blocks)):  # Callers come after their callees in the text.
            if not mult[comp]:
                continue
            for ins in self.instructions[comp]:
                if ins.opcode == "while":
                    body, cond = self.while_parts(ins)
                    n = self.trip_count(ins) or 1
                    if body in mult:
                        mult[body] += mult[comp] * n
                    if cond in mult:
                        mult[cond] += mult[comp] * (n + 1)
                    continue
                for group in _CALLEE_RE.findall(ins.line):
                    for callee in _REF_RE.findall(group):
                        if callee in mult:
                            mult[callee] += mult[comp]
        return mult

    # -- XLA's cost analysis of one computation ---------------------------------------------
    def module_text(self, root: str) -> str:
        """An HLO module with `root` as its entry and what it calls."""
        parts = ["HloModule aot_" + re.sub(r"[^\w]", "_", root)] + self.preamble
        for comp in self.reachable(root):
            block = list(self.blocks[comp])
            header = re.sub(r"^ENTRY ", "", block[0])
            block[0] = ("ENTRY " + header) if comp == root else header
            parts.extend(block)
            parts.append("")
        return "\n".join(parts)




def loop_weighted_flops(program: HloProgram) -> tuple[float, list[dict]]:
    """Per-device FLOPs of one execution, each while-loop body weighted by its trip count.

    XLA's cost analysis (the same one `Compiled.cost_analysis()` runs) counts a loop body once.
    With X(c) its figure for computation c and T(c) the true one,
    T(c) = X(c) + sum over loops w run by c of (n_w * T(body_w) - X(body_w)).
    """
    cache: dict[str, float] = {}
    found: list[dict] = []

    def xla(comp: str) -> float:  # As XLA counts: each reachable computation once.
        if comp not in cache:
            kernels = sum(kernel_flops(ins.line) for c in program.reachable(comp)
                          for ins in program.instructions[c] if ins.opcode == "custom-call")
            cache[comp] = float(hlo_text_cost(program.module_text(comp)).get("flops", 0.0)) + kernels
        return cache[comp]

    def true(comp: str) -> float:
        total = xla(comp)
        for ins, n in program.loops(comp):
            body, _ = program.while_parts(ins)
            if body is None:
                continue
            if n is None:
                raise ValueError(f"the trip count of while loop {ins.name} is unknown")
            name = re.search(r'op_name="([^"]*)"', ins.line)
            found.append({"loop": ins.name, "trips": n, "op": name.group(1) if name else ""})
            total += n * true(body) - xla(body)
        return total

    return true(program.entry), found


def _collectives(program: HloProgram):
    """(kind, instruction, executions per step, bytes out per execution) for each collective."""
    mult = program.multiplicities()
    for comp, instructions in program.instructions.items():
        for ins in instructions:
            kind = ins.opcode[:-len("-start")] if ins.opcode.endswith("-start") else ins.opcode
            if kind not in COLLECTIVES:
                continue
            shapes = [s for s in _ARRAY_RE.findall(ins.type) if s[1]]  # Arrays, not scalar contexts.
            if ins.opcode in ("all-gather-start", "collective-permute-start") and len(shapes) > 1:
                shapes = shapes[len(shapes) // 2:]  # ((operands), (results)): count the results.
            size = sum(_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
                       for dt, dims in shapes)
            yield kind, ins, mult.get(comp, 0), size


def collective_counts(program: HloProgram) -> dict[str, dict]:
    """Collectives by kind: ops in the program, ops executed per step, bytes out per device."""
    out = {kind: {"ops": 0, "executed": 0, "bytes_per_step": 0} for kind in COLLECTIVES}
    for kind, _, runs, size in _collectives(program):
        out[kind]["ops"] += 1
        out[kind]["executed"] += runs
        out[kind]["bytes_per_step"] += runs * size
    return out


def largest_collectives(program: HloProgram, top: int = 6) -> list[dict]:
    """The collectives that move the most bytes per step, with the jax op they come from."""
    rows = []
    for kind, ins, runs, size in _collectives(program):
        op = re.search(r'op_name="([^"]*)"', ins.line)
        rows.append({"kind": kind, "executed": runs, "bytes_per_step": runs * size,
                     "shape": " ".join(f"{dt}[{dims}]" for dt, dims in _ARRAY_RE.findall(ins.type) if dims)[:120],
                     "op": op.group(1) if op else ins.name})
    rows.sort(key=lambda r: -r["bytes_per_step"])
    return rows[:top]

