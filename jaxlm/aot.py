"""`jaxlm aot`'s report: the real train step compiled for a TPU topology on this machine, sized.

    jaxlm aot --config=configs/llama_1b.py --topology=v5p:2x2x2 [--num_slices=2] [--config.F=V ...]

No TPU is needed: libtpu (the `tpu` extra) compiles for abstract devices of the named topology
(`jaxlm.tpu_topology`). The programs compiled are the ones `jaxlm train` runs, from
`Trainer(config, mesh)` (`compile_train` / `compile_eval`): same model, shardings, optimizer,
donation, on the mesh `jaxlm.sharding.make_mesh` builds from the TPU devices, for a global
batch of the task's `batch_spec`. Reported:

* memory per device, from the compiler's buffer assignment: arguments (state + batch), outputs,
  temporaries, generated code; donated state aliases its outputs and is counted once. Compared
  with the chip's HBM; a step that does not fit exits with code 3 (EXIT_DOES_NOT_FIT).
* FLOPs per step: XLA's cost analysis of the compiled program, with every while loop (scanned
  layers, gradient accumulation) weighted by its trip count (`jaxlm.hlo_analysis`), against the
  analytic model FLOPs (`jaxlm.metrics.train_flops_per_token`) and the analytic recomputation
  that the remat policy adds.
* collectives in the compiled program, by kind: ops in the program text and ops executed per
  step (loop bodies times their trip counts), with the bytes they move per device.

The command itself is `jaxlm.commands.aot`.
"""

import copy
import math
import re
import time
from typing import Any, Optional

from jaxlm.compat import compiled_cost
from jaxlm.errors import UserError
from jaxlm.hlo_analysis import (HloProgram, collective_counts, largest_collectives, loop_weighted_flops,
                                splash_kernels)
from jaxlm.tpu_topology import CHIP_HBM_GIB, chip_of, parse_topology, topology_devices

EXIT_DOES_NOT_FIT = 3
GIB = 1024 ** 3


# == Config ==========================================================================================

def prepare_config(config, num_slices: int):
    """A copy of `config` checked and adjusted for compiling on `num_slices` TPU slices."""
    from jaxlm import config_checks  # pylint: disable=import-outside-toplevel
    config = copy.deepcopy(config)
    if config.model.vocab_size <= 0:
        raise UserError(f"model.vocab_size={config.model.vocab_size}: jaxlm aot reads no tokenizer, so "
                        f"give the vocabulary size, e.g. --config.model.vocab_size=32000")
    config_checks.validate(config)
    dcn = config.mesh.get("dcn_data", 1) * config.mesh.get("dcn_fsdp", 1)
    if num_slices > 1 and dcn == 1:
        config.mesh.dcn_data = num_slices  # Data parallel across slices (over DCN).
    elif dcn != num_slices:
        raise UserError(f"mesh.dcn_data x mesh.dcn_fsdp = {dcn} but --num_slices={num_slices}; "
                        f"make them equal (or leave mesh.dcn_* at 1 and pass only --num_slices)")
    return config


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




def remat_recompute_flops_per_token(cfg, seq_len: int, chunked_loss: bool = False,
                                    attention_impl: str = "xla") -> float:
    """Matmul FLOPs the backward pass recomputes under the model's remat policy, per token.

    dots_no_batch saves the weight matmuls but not the batched attention matmuls (QK^T, AV:
    2 x 2·H·Q·T forward FLOPs per layer); full saves nothing, so each layer's forward runs
    again; dots saves every matmul; none recomputes nothing. The chunked loss (loss_chunk_size)
    recomputes each chunk's vocabulary projection (2·d·V) instead of keeping its logits.
    Splash attention's backward kernels run 7 attention matmuls where the model counts 4 (dq
    and dkv each recompute QK^T, and both need dO·V^T): 1.5 x the forward's 2 more per layer.
    """
    from jaxlm import metrics  # pylint: disable=import-outside-toplevel
    attention_fwd = 4 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
    layer_matmuls = metrics.matmul_params(cfg) - cfg.d_model * cfg.vocab_size
    extra = 2.0 * cfg.d_model * cfg.vocab_size if chunked_loss else 0.0
    extra += 1.5 * attention_fwd if attention_impl == "splash" else 0.0
    return extra + {"none": 0.0, "dots": 0.0, "dots_no_batch": float(attention_fwd),
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
    from jaxlm.resolve import check_batch_layout  # pylint: disable=import-outside-toplevel
    from jaxlm.models.attention import choose_impl  # pylint: disable=import-outside-toplevel
    from jaxlm.trainer import Trainer  # pylint: disable=import-outside-toplevel
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    check_batch_layout(config, mesh)
    trainer = Trainer(config, mesh)
    cfg = trainer.model_config
    hbm = CHIP_HBM_GIB[chip] * GIB
    tokens = config.global_batch_size * config.seq_len
    # A classifier's pooled head replaces the vocabulary projection: the task says which it has.
    model_flops = metrics.train_flops_per_token(cfg, config.seq_len, trainer.task.vocab_head) * tokens
    chunked_loss = bool(config.get("loss_chunk_size", 0)) and trainer.task.vocab_head
    attention = choose_impl(cfg.attention_impl, "tpu", cfg.compute_dtype, cfg.dim_per_head)
    recompute = remat_recompute_flops_per_token(cfg, config.seq_len, chunked_loss, attention) * tokens
    report: dict[str, Any] = {
        "topology": topology, "num_slices": num_slices, "chip": chip,
        "device_kind": devices[0].device_kind, "num_devices": len(devices),
        "hbm_per_device_bytes": hbm,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "dcn": {"data": int(config.mesh.get("dcn_data", 1)), "fsdp": int(config.mesh.get("dcn_fsdp", 1))},
        "model": {"params": int(trainer.num_params), "num_layers": cfg.num_layers, "d_model": cfg.d_model,
                  "num_heads": cfg.num_heads, "kv_heads": cfg.kv_heads, "d_ff": cfg.d_ff,
                  "vocab_size": cfg.vocab_size, "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
                  "scan_layers": cfg.scan_layers, "remat_policy": cfg.remat_policy,
                  "attention_impl": attention},
        "optimizer": config.optim.name,
        "batch": {"global_batch_size": config.global_batch_size, "seq_len": config.seq_len,
                  "grad_accum_steps": config.grad_accum_steps, "tokens_per_step": tokens,
                  "loss_chunk_size": int(config.get("loss_chunk_size", 0))},
        "flops": {"analytic_model_per_step": model_flops, "analytic_remat_recompute_per_step": recompute,
                  "analytic_hardware_per_step": model_flops + recompute},
    }

    report["state_bytes_per_device"] = state_bytes_per_device(trainer)

    example = trainer.task.batch_spec(config)  # Shapes and dtypes only: nothing is allocated.
    seconds: dict[str, float] = {}
    report["compile_seconds"] = seconds
    compiled: dict[str, Any] = {}
    steps = {"train": trainer.compile_train, "eval": trainer.compile_eval}
    for step, compile_step in steps.items():
        if step == "eval" and not include_eval:
            continue
        start = time.perf_counter()
        try:
            result = compile_step(example)
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
        compiled[step] = result
    train_c = compiled["train"]

    memory = {step: _memory(c) for step, c in compiled.items()}
    report["memory"] = memory
    peak = max(m.get("total", 0) for m in memory.values())
    report["fits"] = peak <= hbm

    flops = report["flops"]
    cost = compiled_cost(train_c)
    n = len(devices)
    flops["xla_cost_analysis_per_device"] = float(cost.get("flops", 0.0))
    text = train_c.as_text()
    program = HloProgram(text)
    report["splash_kernels"] = splash_kernels(text)
    try:
        per_device, loops = loop_weighted_flops(program)
        flops["compiled_per_device"] = per_device
        flops["compiled_per_step"] = per_device * n
        flops["loops"] = loops
        flops["compiled_over_model"] = per_device * n / model_flops
        flops["compiled_over_hardware"] = per_device * n / (model_flops + recompute)
        flops["method"] = ("XLA cost analysis of the compiled train step per device, with each while-loop "
                           "body weighted by its trip count, x devices"
                           + ("; splash kernels, which XLA counts as 0, from their operand shapes (dense T x S)"
                              if report["splash_kernels"] else ""))
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
        f"{m['param_dtype']}, remat {m['remat_policy']}, scan_layers {m['scan_layers']}, attention {m.get('attention_impl', '?')}"
        f"{' (kernels: ' + ', '.join(r['splash_kernels']) + ')' if r.get('splash_kernels') else ''}; "
        f"optimizer {r['optimizer']}",
        f"batch: {b['global_batch_size']} x {b['seq_len']} = {b['tokens_per_step']:,} tokens/step"
        f"{', grad_accum ' + str(b['grad_accum_steps']) if b['grad_accum_steps'] > 1 else ''}"
        f"{', loss chunks of ' + format(b['loss_chunk_size'], ',') + ' tokens' if b.get('loss_chunk_size') else ''}; "
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
                 f"(remat {m['remat_policy']}{' + chunked loss' if b.get('loss_chunk_size') else ''}"
                 f"{' + splash backward' if m.get('attention_impl') == 'splash' else ''})")
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

