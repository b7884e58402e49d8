"""`jaxlm aot`: compile the real train step for a TPU topology on this machine, and size it.

    jaxlm aot --config=configs/llama_1b.py --topology=v5p:2x2x2 [--num_slices=2] [--config.F=V ...]

No TPU is needed: libtpu (the `tpu` extra) compiles for abstract devices of the named topology
(`jax.experimental.topologies`). The programs compiled are the ones `jaxlm train` runs, from
`Trainer(config, mesh)` (`compile_train` / `compile_eval`, or `compile`): same model, shardings,
optimizer, donation, on the mesh `jaxlm.sharding.make_mesh` builds from the TPU devices. Reported:

* memory per device, from the compiler's buffer assignment: arguments (state + batch), outputs,
  temporaries, generated code; donated state aliases its outputs and is counted once. Compared
  with the chip's HBM; a step that does not fit exits with code 3 (EXIT_DOES_NOT_FIT).
* FLOPs per step: XLA's cost analysis of the compiled program, with every while loop (scanned
  layers, gradient accumulation) weighted by its trip count (XLA counts a loop body once),
  against the analytic model FLOPs (`jaxlm.metrics.train_flops_per_token`) and the analytic
  recomputation that the remat policy adds.
* collectives in the compiled program, by kind: ops in the program text and ops executed per
  step (loop bodies times their trip counts), with the bytes they move per device.

This module imports nothing heavy at import time: the CLI builds its parser from it.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Optional

from jaxlm.errors import UserError

EXIT_DOES_NOT_FIT = 3
GIB = 1024 ** 3

# HBM per chip (Cloud TPU system architecture pages), GiB.
CHIP_HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# device_kind of the compile-only devices -> chip name.
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
# Chips with two TensorCores that JAX drives as one device (megacore), as on Cloud TPU VMs.
MEGACORE = ("v4", "v5p")
TOPOLOGY_EXAMPLES = "v5e:2x2, v5e:2x4, v5e:4x4, v5p:2x2x2, v5p:4x4x4, v4:2x2x1, v6e:2x2"
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_TOPOLOGY_RE = re.compile(r"^(v4|v5e|v5p|v6e)[:=_](\d+(?:x\d+){1,2})$")


# == Topology ===================================================================================

def parse_topology(topology: str) -> tuple[str, str]:
    """'v5p:2x2x2' -> ('v5p', '2x2x2'); a UserError naming --topology otherwise."""
    m = _TOPOLOGY_RE.match((topology or "").strip().lower())
    if not m:
        raise UserError(f"--topology={topology!r}: expected CHIP:SHAPE with CHIP one of "
                        f"{', '.join(CHIP_HBM_GIB)}, e.g. {TOPOLOGY_EXAMPLES}")
    return m.group(1), m.group(2)


@contextlib.contextmanager
def _native_stderr_to(path: str):
    """Sends file descriptor 2 (where libtpu's C++ logging goes) to `path` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def topology_devices(topology: str, num_slices: int = 1) -> list:
    """Compile-only TPU devices for `topology` (x num_slices slices)."""
    chip, _ = parse_topology(topology)
    name = topology.strip().lower()
    if num_slices < 1:
        raise UserError(f"--num_slices={num_slices}: must be 1 or more")
    import importlib.util  # pylint: disable=import-outside-toplevel
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise UserError("jaxlm aot compiles for TPUs with libtpu, which is not installed: "
                        "pip install 'jaxlm[tpu]'")
    # Compiling needs no chip: skip libtpu's one-process-per-TPU lock (/tmp/libtpu_lockfile),
    # which any other jax process on this machine that probed for a TPU may hold, and the
    # GCE metadata queries.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    import jax  # pylint: disable=import-outside-toplevel
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    kwargs: dict[str, Any] = {"chip_config_name": "megacore"} if chip in MEGACORE else {}
    if num_slices > 1:
        kwargs["num_slices"] = num_slices
    # libtpu logs "could not determine TPU worker hostnames" etc. when it starts on a machine
    # without TPUs; keep that out of the report, but show it if something fails.
    with tempfile.NamedTemporaryFile(prefix="jaxlm_libtpu_", suffix=".log", delete=False) as log:
        log_path = log.name
    try:
        with _native_stderr_to(log_path):
            try:
                jax.devices()  # Backends first (a TPU probe happens here), then the topology.
                devices = list(topologies.get_topology_desc(topology_name=name, platform="tpu",
                                                            **kwargs).devices)
                error = None
            except Exception as e:  # pylint: disable=broad-except
                devices, error = [], e
        if error is not None:
            text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "TPU support not installed" in text:
                raise UserError("jaxlm aot compiles for TPUs with libtpu, which is not installed: "
                                "pip install 'jaxlm[tpu]'") from error
            with open(log_path, errors="replace") as f:
                native = f.read().strip()
            if native and os.environ.get("JAXLM_LOG_LEVEL", "").lower() == "debug":
                print(native, file=sys.stderr)
            raise UserError(f"--topology={topology}{f' --num_slices={num_slices}' if num_slices > 1 else ''}: "
                            f"libtpu refused it ({text}); examples: {TOPOLOGY_EXAMPLES}") from error
    finally:
        os.unlink(log_path)
    return devices


def chip_of(devices: list, fallback: str) -> str:
    return DEVICE_KINDS.get(getattr(devices[0], "device_kind", ""), fallback)


# == Config ==========================================================================================

def prepare_config(config, num_slices: int):
    """A copy of `config` checked and adjusted for compiling on `num_slices` TPU slices."""
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    config = copy.deepcopy(config)
    if config.model.vocab_size <= 0:
        raise UserError(f"model.vocab_size={config.model.vocab_size}: jaxlm aot reads no tokenizer, so "
                        f"give the vocabulary size, e.g. --config.model.vocab_size=32000")
    config_lib.validate(config)
    dcn = config.mesh.get("dcn_data", 1) * config.mesh.get("dcn_fsdp", 1)
    if num_slices > 1 and dcn == 1:
        config.mesh.dcn_data = num_slices  # Data parallel across slices (over DCN).
    elif dcn != num_slices:
        raise UserError(f"mesh.dcn_data x mesh.dcn_fsdp = {dcn} but --num_slices={num_slices}; "
                        f"make them equal (or leave mesh.dcn_* at 1 and pass only --num_slices)")
    if config.model.attention_impl == "auto":
        config.model.attention_impl = "xla"  # What "auto" picks on a TPU, whatever this host is.
    return config


def batch_example(config, task) -> dict:
    """The task's global batch as shapes and dtypes only (nothing is allocated)."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    if hasattr(task, "batch_example"):  # A task may describe its own batch.
        return task.batch_example(config)
    b, t = config.global_batch_size, config.seq_len
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, np.dtype(dtype))  # noqa: E731
    if config.task == "causal_lm":
        return {"inputs": spec((b, t), "int32"), "targets": spec((b, t), "int32"),
                "weights": spec((b, t), "float32")}
    if config.task == "masked_lm":
        return {"inputs": spec((b, t), "int32"), "targets": spec((b, t), "int32"),
                "weights": spec((b, t), "float32"), "padding_mask": spec((b, t), "bool")}
    if config.task == "classification":
        return {"inputs": spec((b, t), "int32"), "padding_mask": spec((b, t), "bool"),
                "token_type_ids": spec((b, t), "int32"), "labels": spec((b,), "int32"),
                "weights": spec((b,), "float32")}
    raise UserError(f"task={config.task}: jaxlm aot does not know this task's batch layout")


# == Compiled HLO: computations, loops, collectives, FLOPs ============================================

_INSTR_RE = re.compile(r"^\s+(?:ROOT )?%([\w.\-]+) = ")
_REF_RE = re.compile(r"%([\w.\-]+)")
_CALLEE_RE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation|"
                        r"branch_computations|called_computations|async_execution_thread_computations)="
                        r"(\{[^}]*\}|%[\w.\-]+)")
_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
_ARRAY_RE = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


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
        self.text = text
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
    def _while_parts(ins: Instruction) -> tuple[Optional[str], Optional[str]]:
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
        body, cond = self._while_parts(ins)
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
                    body, cond = self._while_parts(ins)
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


def _xla_cost(module_text: str) -> dict:
    """XLA's HloCostAnalysis of an HLO module given as text, run by the CPU client.

    The analysis is the one `Compiled.cost_analysis()` runs for TPU (on a whole compiled TPU
    program the two agree to the FLOP); only the bindings' location moves between jax releases.
    """
    import jax  # pylint: disable=import-outside-toplevel
    from jax._src import lib as jax_lib  # pylint: disable=import-outside-toplevel
    from jaxlib import xla_client  # pylint: disable=import-outside-toplevel
    ext = getattr(jax_lib, "_jax", None) or getattr(xla_client, "_xla", None)
    parse = (getattr(getattr(xla_client, "hlo", None), "hlo_module_from_text", None)
             or getattr(ext, "hlo_module_from_text", None))
    analyse = getattr(ext, "hlo_module_cost_analysis", None)
    if parse is None or analyse is None:
        raise NotImplementedError(f"this jax ({jax.__version__}) exposes no HLO text parser / cost analysis")
    return dict(analyse(jax.devices("cpu")[0].client, parse(module_text)))


def loop_weighted_flops(program: HloProgram) -> tuple[float, list[dict]]:
    """Per-device FLOPs of one execution, each while-loop body weighted by its trip count.

    XLA's cost analysis (the same one `Compiled.cost_analysis()` runs) counts a loop body once.
    With X(c) its figure for computation c and T(c) the true one,
    T(c) = X(c) + sum over loops w run by c of (n_w * T(body_w) - X(body_w)).
    """
    cache: dict[str, float] = {}
    found: list[dict] = []

    def xla(comp: str) -> float:
        if comp not in cache:
            cache[comp] = float(_xla_cost(program.module_text(comp)).get("flops", 0.0))
        return cache[comp]

    def true(comp: str) -> float:
        total = xla(comp)
        for ins, n in program.loops(comp):
            body, _ = program._while_parts(ins)  # pylint: disable=protected-access
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


# == The report =======================================================================================

def _memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    get = lambda name: int(getattr(stats, name, 0) or 0)  # noqa: E731
    mem = {"arguments": get("argument_size_in_bytes"), "outputs": get("output_size_in_bytes"),
           "aliased": get("alias_size_in_bytes"), "temporaries": get("temp_size_in_bytes"),
           "generated_code": get("generated_code_size_in_bytes")}
    # Donated state: the outputs that alias an argument's buffer take no memory of their own.
    mem["total"] = (mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
                    + mem["generated_code"])
    return mem


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # Older jax: one dict per program.
        cost = cost[0] if cost else {}
    return dict(cost or {})


def remat_recompute_flops_per_token(cfg, seq_len: int) -> float:
    """Matmul FLOPs the backward pass recomputes under the model's remat policy, per token.

    dots_no_batch saves the weight matmuls but not the batched attention matmuls (QK^T, AV:
    2 x 2·H·Q·T forward FLOPs per layer); full saves nothing, so each layer's forward runs
    again; dots saves every matmul; none recomputes nothing.
    """
    from jaxlm import metrics  # pylint: disable=import-outside-toplevel
    attention_fwd = 4 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
    layer_matmuls = metrics.matmul_params(cfg) - cfg.d_model * cfg.vocab_size
    return {"none": 0.0, "dots": 0.0, "dots_no_batch": float(attention_fwd),
            "full": float(2 * layer_matmuls + attention_fwd)}[cfg.remat_policy]


def state_bytes_per_device(trainer) -> int:
    """Bytes of the train state (params + optimizer state) on the fullest device, from the shardings."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    leaves = jax.tree.leaves(trainer.abstract_state)
    shardings = jax.tree.leaves(trainer.state_shardings)
    return int(sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                   for a, s in zip(leaves, shardings)))


_OOM_RE = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|[Ee]xceeds available HBM|exceeded hbm capacity")


def _parse_size(text: str) -> Optional[float]:
    m = re.match(r"([\d.]+)\s*([KMGT]?)(i?B?)?", text)
    if not m:
        return None
    scale = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}[m.group(2)]
    return float(m.group(1)) * scale


def aot_report(config, topology: str, num_slices: int = 1, include_eval: bool = True) -> dict:
    """Compiles the train (and eval) step of `config` for `topology` and reports its figures.

    Never raises for a step that does not fit: the report says fits=False and why.
    """
    chip, _ = parse_topology(topology)
    config = prepare_config(config, num_slices)
    devices = topology_devices(topology, num_slices)
    chip = chip_of(devices, chip)

    from jaxlm import metrics, sharding  # pylint: disable=import-outside-toplevel
    from jaxlm import train as train_lib  # pylint: disable=import-outside-toplevel
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    train_lib.check_batch_layout(config, mesh)
    trainer = train_lib.Trainer(config, mesh)
    cfg = trainer.model_config
    hbm = CHIP_HBM_GIB[chip] * GIB
    tokens = config.global_batch_size * config.seq_len
    model_flops = metrics.train_flops_per_token(cfg, config.seq_len) * tokens
    if config.task == "classification":  # A pooled classifier head instead of the vocabulary projection.
        model_flops -= 6 * cfg.d_model * cfg.vocab_size * tokens
    recompute = remat_recompute_flops_per_token(cfg, config.seq_len) * tokens
    report: dict[str, Any] = {
        "topology": topology, "num_slices": num_slices, "chip": chip,
        "device_kind": devices[0].device_kind, "num_devices": len(devices),
        "hbm_per_device_bytes": hbm,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "dcn": {"data": int(config.mesh.get("dcn_data", 1)), "fsdp": int(config.mesh.get("dcn_fsdp", 1))},
        "model": {"params": int(trainer.num_params), "num_layers": cfg.num_layers, "d_model": cfg.d_model,
                  "num_heads": cfg.num_heads, "kv_heads": cfg.kv_heads, "d_ff": cfg.d_ff,
                  "vocab_size": cfg.vocab_size, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
                  "scan_layers": cfg.scan_layers, "remat_policy": cfg.remat_policy},
        "optimizer": config.optim.name,
        "batch": {"global_batch_size": config.global_batch_size, "seq_len": config.seq_len,
                  "grad_accum_steps": config.grad_accum_steps, "tokens_per_step": tokens},
        "flops": {"analytic_model_per_step": model_flops, "analytic_remat_recompute_per_step": recompute,
                  "analytic_hardware_per_step": model_flops + recompute},
    }

    report["state_bytes_per_device"] = state_bytes_per_device(trainer)

    example = batch_example(config, trainer.task)
    seconds: dict[str, float] = {}
    report["compile_seconds"] = seconds
    compiled: dict[str, Any] = {}
    split = hasattr(trainer, "compile_train") and hasattr(trainer, "compile_eval")
    steps = (("train", "compile_train"), ("eval", "compile_eval")) if split else (("train+eval", "compile"),)
    for step, method in steps:
        if step == "eval" and not include_eval:
            continue
        start = time.perf_counter()
        try:
            result = getattr(trainer, method)(example)
        except Exception as e:  # pylint: disable=broad-except
            message = str(e).strip()
            if not _OOM_RE.search(message):
                raise
            seconds[step] = time.perf_counter() - start
            report.update(fits=False, failed_step=step, compiler_error=message.splitlines()[0])
            m = (re.search(r"required[^(]*\(([\d.]+\s*[KMGT]?i?B?)\) exceeds available HBM "
                           r"\(([\d.]+\s*[KMGT]?i?B?)\)", message)
                 or re.search(r"Used ([\d.]+\s*[KMGT]?i?B?) of ([\d.]+\s*[KMGT]?i?B?) hbm", message))
            if m:
                report["compiler_required_bytes"] = _parse_size(m.group(1))
                report["compiler_available_bytes"] = _parse_size(m.group(2))
            return report
        seconds[step] = time.perf_counter() - start
        if step == "train+eval":
            compiled["train"], compiled["eval"] = result
        else:
            compiled[step] = result
    train_c = compiled["train"]

    memory = {step: _memory(c) for step, c in compiled.items()}
    report["memory"] = memory
    peak = max(m.get("total", 0) for m in memory.values())
    report["fits"] = peak <= hbm

    flops = report["flops"]
    cost = _cost(train_c)
    n = len(devices)
    flops["xla_cost_analysis_per_device"] = float(cost.get("flops", 0.0))
    program = HloProgram(train_c.as_text())
    try:
        per_device, loops = loop_weighted_flops(program)
        flops["compiled_per_device"] = per_device
        flops["compiled_per_step"] = per_device * n
        flops["loops"] = loops
        flops["compiled_over_model"] = per_device * n / model_flops
        flops["compiled_over_hardware"] = per_device * n / (model_flops + recompute)
        flops["method"] = ("XLA cost analysis of the compiled train step per device, with each while-loop "
                           "body weighted by its trip count, x devices")
    except Exception as e:  # pylint: disable=broad-except  # The figure is missing, not wrong.
        flops["compiled_per_step"] = None
        flops["method"] = f"unavailable: the compiled HLO could not be re-analysed ({type(e).__name__}: {e})"
    report["collectives"] = collective_counts(program)
    report["largest_collectives"] = largest_collectives(program)
    return report


# == Formatting =======================================================================================

def _gib(b: float) -> str:
    return f"{b / GIB:8.2f} GiB"


def _flops(f: Optional[float]) -> str:
    if f is None:
        return "n/a"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if abs(f) >= scale:
            return f"{f / scale:.3f} {unit}"
    return f"{f:.3g} FLOP"


def format_report(report: dict) -> str:
    r, m, b = report, report["model"], report["batch"]
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    slices = f" x {r['num_slices']} slices (dcn data={r['dcn']['data']}, fsdp={r['dcn']['fsdp']})" \
        if r["num_slices"] > 1 else ""
    lines = [
        f"jaxlm aot: {r['topology']}{slices}: {r['num_devices']} x {r['device_kind']} "
        f"({CHIP_HBM_GIB[r['chip']]} GiB HBM each), mesh {mesh}",
        f"model: {m['params']:,} params, {m['num_layers']} layers, d_model {m['d_model']}, {m['num_heads']} heads "
        f"({m['kv_heads']} kv), d_ff {m['d_ff']}, vocab {m['vocab_size']}; compute {m['dtype']}, params "
        f"{m['param_dtype']}, remat {m['remat_policy']}, scan_layers {m['scan_layers']}; optimizer {r['optimizer']}",
        f"batch: {b['global_batch_size']} x {b['seq_len']} = {b['tokens_per_step']:,} tokens/step"
        f"{', grad_accum ' + str(b['grad_accum_steps']) if b['grad_accum_steps'] > 1 else ''}; "
        "compiled in " + ", ".join(f"{v:.1f}s ({k})" for k, v in r.get("compile_seconds", {}).items()),
    ]
    hbm = r["hbm_per_device_bytes"]
    state = f"train state (params + optimizer) {r['state_bytes_per_device'] / GIB:.2f} GiB per device"
    if "memory" not in r:
        lines.append(f"{state}, {hbm / GIB:.0f} GiB HBM")
        lines.append("")
        lines.append(f"DOES NOT FIT: the TPU compiler ran out of HBM compiling the {r.get('failed_step')} step: "
                     f"{r.get('compiler_error', '')}")
        return "\n".join(lines)
    lines.append(state)
    steps = list(r["memory"])
    lines += ["", "memory per device          " + "".join(f"{s + ' step':>15}" for s in steps)]
    rows = (("arguments", "arguments"), ("outputs", "outputs"), ("  aliased (donated)", "aliased"),
            ("temporaries", "temporaries"), ("generated code", "generated_code"), ("total", "total"))
    for label, key in rows:
        sign = "-" if key == "aliased" else " "
        lines.append(f"  {label:<22}" + "".join(f"  {sign}{_gib(r['memory'][s].get(key, 0))}" for s in steps))
    tr = r["memory"]["train"]
    lines.append(f"  {'HBM of the chip':<22}   {_gib(hbm)}   ({100 * tr['total'] / hbm:.1f}% used by the train step)")
    lines.append("  (total = arguments + outputs - aliased + temporaries + generated code: the donated "
                 "train state is counted once)")
    f = r["flops"]
    lines += ["", "FLOPs per step (all devices)"]
    lines.append(f"  compiled (XLA)          {_flops(f.get('compiled_per_step'))}")
    lines.append(f"  analytic model          {_flops(f['analytic_model_per_step'])}   "
                 f"(train_flops_per_token x {b['tokens_per_step']:,} tokens)")
    lines.append(f"  + remat recompute       {_flops(f['analytic_remat_recompute_per_step'])}   "
                 f"(remat {m['remat_policy']})")
    if f.get("compiled_per_step"):
        rest = f["compiled_per_step"] - f["analytic_hardware_per_step"]
        lines.append(f"  compiled / model        {f['compiled_over_model']:.4f}")
        lines.append(f"  compiled / (model + recompute) {f['compiled_over_hardware']:.4f}   "
                     f"(rest {_flops(rest)}: elementwise ops, softmax, norms, optimizer update)")
        trips = ", ".join(f"{x['trips']}" for x in f.get("loops", []))
        lines.append(f"  method: {f['method']}"
                     + (f"; loops found with trip counts {trips}" if trips else "")
                     + f". Uncorrected XLA figure: {_flops(f['xla_cost_analysis_per_device'])} per device.")
    else:
        lines.append(f"  compiled: {f['method']}")
    lines += ["", "collectives in the compiled train step   in program   executed/step   bytes/step/device"]
    for kind, c in r["collectives"].items():
        lines.append(f"  {kind:<38}{c['ops']:>10}{c['executed']:>16}   {_gib(c['bytes_per_step'])}")
    if r.get("largest_collectives"):
        lines.append("  largest (bytes/step/device, executions, result shape, op):")
        for c in r["largest_collectives"]:
            op = c["op"].replace("jit(train_step)/", "")
            lines.append(f"    {c['kind']:<18} {_gib(c['bytes_per_step'])}  x{c['executed']:<4} "
                         f"{c['shape'][:60]}  {op[-90:]}")
    lines.append("")
    status = "FITS" if r["fits"] else "DOES NOT FIT"
    lines.append(f"{status}: " + ", ".join(f"{s} step {r['memory'][s]['total'] / GIB:.2f} GiB" for s in steps)
                 + f" of {hbm / GIB:.0f} GiB HBM per device")
    return "\n".join(lines)


def does_not_fit_line(report: dict) -> str:
    hbm = report["hbm_per_device_bytes"]
    where = f"on {report['topology']}" + (f" x {report['num_slices']} slices" if report["num_slices"] > 1 else "")
    if "memory" in report:
        total = max(m["total"] for m in report["memory"].values())
        return (f"does not fit {where}: {total / GIB:.2f} GiB per device exceeds the {hbm / GIB:.0f} GiB HBM "
                f"of a {report['chip']} chip; shard more (mesh.fsdp), remat more, or lower the batch")
    return (f"does not fit {where} ({hbm / GIB:.0f} GiB HBM per {report['chip']} chip): "
            f"{report.get('compiler_error', '')} Shard more (mesh.fsdp), remat more, or lower the batch")


# == CLI ==============================================================================================

def cmd_aot(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm.cli import load_run_config  # pylint: disable=import-outside-toplevel
    config = load_run_config(args.config, overrides)
    report = aot_report(config, args.topology, args.num_slices)
    report["config"] = args.config
    report["overrides"] = dict(overrides)
    print(format_report(report), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    if not report["fits"]:
        print(f"jaxlm: error: {does_not_fit_line(report)}", file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    return 0


def add_aot_parser(subparsers) -> argparse.ArgumentParser:
    aot = subparsers.add_parser(
        "aot", help="compile the train step for a TPU topology here: memory, FLOPs, collectives",
        description="Compile the real train step (model, shardings, optimizer) for a TPU topology on "
                    "this machine, with no TPU (needs the tpu extra: pip install 'jaxlm[tpu]'), and "
                    "report memory per device against the chip's HBM, FLOPs per step and the "
                    f"collectives. Exits {EXIT_DOES_NOT_FIT} when the step does not fit. Override "
                    "config fields with --config.FIELD=VALUE (model.vocab_size must be set).")
    aot.add_argument("--config", required=False, help="recipe file, e.g. configs/llama_1b.py")
    aot.add_argument("--topology", required=False,
                     help=f"TPU slice as CHIP:SHAPE, e.g. {TOPOLOGY_EXAMPLES}")
    aot.add_argument("--num_slices", type=int, default=1,
                     help="slices joined over DCN (data parallel across them: mesh.dcn_data)")
    aot.add_argument("--json_out", default=None, help="also write the report as JSON to this file")
    aot.add_argument("--help_config", action="store_true", help="list every config field and exit")
    aot.set_defaults(handler=cmd_aot, needs=("config", "topology"))
    return aot


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m jaxlm.aot --config=… --topology=…`: the `jaxlm aot` command on its own."""
    from jaxlm import cli  # pylint: disable=import-outside-toplevel
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="jaxlm")
    add_aot_parser(parser.add_subparsers(dest="command"))
    try:
        rest, overrides = cli.split_overrides(argv)
        args = parser.parse_args(["aot", *rest])
        if args.help_config:
            from jaxlm.config import describe_fields  # pylint: disable=import-outside-toplevel
            print(describe_fields())
            return 0
        for name in args.needs:
            if not getattr(args, name):
                raise UserError(f"--{name} is required: jaxlm aot --help shows an example")
        return cmd_aot(args, overrides)
    except UserError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr, flush=True)
        return cli.EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
