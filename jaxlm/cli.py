"""`jaxlm <command>`: the command line. Thin: parse, set up the process, call the library.

A UserError becomes one line on stderr and exit code 2; a diverged run exits 1 with its reason.
"""

import argparse
import inspect
import os
import sys
from typing import Callable, Optional

from jaxlm.errors import UserError

EXIT_USER_ERROR = 2


def hide_gpus_from_tensorflow() -> None:
    """TensorFlow (pulled in by tfds and clu) must never take GPU memory from JAX."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError:
        return
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # Already initialised elsewhere with no GPU visible: nothing to hide.


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separates `--config.a.b=value` overrides from the other arguments."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg}: missing value; write --config.{key}=VALUE")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (GPU clusters and tests; TPU VMs need none)")
    group.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
    group.add_argument("--num_processes", type=int, default=None, help="total number of processes")
    group.add_argument("--process_id", type=int, default=None, help="this process's index")
    group.add_argument("--initialization_timeout", type=int, default=300,
                       help="seconds to wait for the other processes at start-up")
    group.add_argument("--heartbeat_timeout", type=int, default=30,
                       help="seconds without a peer's heartbeat before the run stops with an error")


def initialize_distributed(args: argparse.Namespace) -> None:
    """Joins the other processes of a multi-host run, with timeouts so a dead peer is an error.

    On CPU the collectives go through gloo (tests run several processes on localhost).
    """
    import jax  # pylint: disable=import-outside-toplevel
    explicit = [args.coordinator_address, args.num_processes, args.process_id]
    multi_host_tpu = (os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0
                      or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))
    if all(v is None for v in explicit) and not multi_host_tpu:
        return
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise UserError("--coordinator_address, --num_processes and --process_id go together: give all three")
    if "jax_cpu_collectives_implementation" in jax.config.values:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                  process_id=args.process_id, initialization_timeout=args.initialization_timeout,
                  heartbeat_timeout_seconds=args.heartbeat_timeout)
    accepted = inspect.signature(jax.distributed.initialize).parameters
    # On a TPU slice the runtime knows the peers: only the timeouts are passed.
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in accepted and v is not None})


def load_run_config(spec: str, overrides: dict[str, str]):
    from jaxlm import config as config_lib  # pylint: disable=import-outside-toplevel
    config = config_lib.load_config(spec)
    config_lib.check_known_fields(config)
    config_lib.apply_overrides(config, overrides)
    return config


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import train as train_lib  # pylint: disable=import-outside-toplevel
    config = load_run_config(args.config, overrides)
    initialize_distributed(args)
    final = train_lib.train_and_evaluate(config, args.workdir)
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
        print(train_lib.format_final(final), flush=True)
    return 0


# == eval, generate, export, bench: a finished run's checkpoint, used ==================================
def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=False, help="run directory written by `jaxlm train`")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    which.add_argument("--best", action="store_true", help="the best checkpoint (DIR/best, kept with best_metric)")


def cmd_eval(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import evaluate  # pylint: disable=import-outside-toplevel
    initialize_distributed(args)
    result = evaluate.evaluate_checkpoint(args.workdir, overrides, step=args.step, best=args.best, split=args.split)
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
        print(evaluate.format_table(result), flush=True)
    return 0


def cmd_generate(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import generate  # pylint: disable=import-outside-toplevel
    from jaxlm.data.tokenizer import eos_id  # pylint: disable=import-outside-toplevel
    texts = generate.read_prompts(args.prompt, args.prompts_file)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise UserError("--max_new_tokens and --num_samples must be at least 1")
    sampling = generate.Sampling(args.temperature, args.top_k, args.top_p)
    sampling.check()
    generator, tokenizer, _ = generate.load_run_generator(args.workdir, overrides, args.step, args.best)
    texts = [t for t in texts for _ in range(args.num_samples)]
    prompts = generate.encode_prompts(tokenizer, texts)
    context, longest = generator.cfg.max_len, max(len(p) for p in prompts)
    if longest >= context:
        raise UserError(f"a prompt is {longest} tokens long; the model's context is {context} "
                        f"(model.max_len): shorten it")
    max_new = min(args.max_new_tokens, context - longest)
    if max_new < args.max_new_tokens:
        print(f"jaxlm: note: --max_new_tokens={args.max_new_tokens} lowered to {max_new} to fit the "
              f"model's context of {context} tokens", file=sys.stderr, flush=True)
    eos = eos_id(tokenizer)
    stream = generate.TextStream(tokenizer, texts, eos, lambda text: print(text, end="", flush=True))
    generator.generate(prompts, max_new, sampling, seed=args.seed, eos_id=eos, on_tokens=stream)
    stream.close()
    return 0


def cmd_predict(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import numpy as np  # pylint: disable=import-outside-toplevel
    from jaxlm import predict  # pylint: disable=import-outside-toplevel
    classifier, predictions = predict.run_predict(
        args.workdir, args.input, args.output, overrides, step=args.step, best=args.best,
        text_column=args.text_column, text_pair_column=args.text_pair_column, batch_size=args.batch_size,
        overwrite=args.overwrite)
    counts = np.bincount(predictions.labels, minlength=len(classifier.label_names))
    summary = ", ".join(f"{name} {count}" for name, count in zip(classifier.label_names, counts))
    print(f"labelled {len(predictions.labels)} rows with step {classifier.step} ({summary}); wrote {args.output}",
          flush=True)
    return 0


def cmd_export(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import export  # pylint: disable=import-outside-toplevel
    result = export.export_run(args.workdir, args.out, overrides, step=args.step, best=args.best)
    print(f"exported step {result.step} as a Hugging Face {result.family} model to {result.out_dir}: "
          f"{', '.join(result.files)}", flush=True)
    return 0


def cmd_bench(args: argparse.Namespace, overrides: dict[str, str]) -> int:  # pylint: disable=unused-argument
    from jaxlm import bench  # pylint: disable=import-outside-toplevel
    if args.mode != "decode":
        raise UserError(f"--mode={args.mode}: only 'decode' is available")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch_sizes={args.batch_sizes}: expected comma-separated integers, e.g. 1,16") from None
    bench.decode_bench(batch_sizes, args.prompt_len, args.new_tokens, args.rounds)
    return 0


def add_inference_commands(sub) -> None:
    evaluate = sub.add_parser(
        "eval", help="evaluate a checkpoint on this machine's devices",
        description="Restore a checkpoint's params (written on any mesh) onto this machine's devices and "
                    "compute the task's eval metrics, as training does. Writes DIR/eval/<split>_step<N>.json "
                    "and TensorBoard scalars. --config.FIELD=VALUE overrides the run's config, e.g. "
                    "--config.data.eval_file=other.txt.")
    add_checkpoint_flags(evaluate)
    evaluate.add_argument("--split", default="", help="eval (default: the run's eval split) | another split "
                                                      "of the run's tfds dataset, e.g. test")
    add_distributed_flags(evaluate)
    evaluate.set_defaults(handler=cmd_eval, needs=("workdir",))

    gen = sub.add_parser(
        "generate", help="generate text from a causal-LM checkpoint (KV cache)",
        description="Decode from a causal-LM run's checkpoint with a KV cache: greedy (--temperature=0) "
                    "or sampling; stops at EOS. One prompt streams token by token; several print as "
                    "each finishes.")
    add_checkpoint_flags(gen)
    gen.add_argument("--prompt", default=None, help="prompt text")
    gen.add_argument("--prompts_file", default=None, help=".txt (a prompt per line), .jsonl ({\"prompt\": …}) "
                                                          "or .json (a list of strings)")
    gen.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate per prompt at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sample at this temperature")
    gen.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    gen.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--num_samples", type=int, default=1, help="sequences per prompt")
    gen.set_defaults(handler=cmd_generate, needs=("workdir",))

    predict = sub.add_parser(
        "predict", help="label a file of texts with a classification checkpoint",
        description="Classify every row of --input (CSV/TSV/JSONL with a text column, or .txt with one text "
                    "per line) with a classification run's checkpoint. --output (.csv/.tsv/.jsonl) gets the "
                    "input's columns plus label (the predicted class name), score (its probability) and "
                    "prob_<class> per class. Texts are tokenized and truncated as in training.")
    add_checkpoint_flags(predict)
    predict.add_argument("--input", required=False, help="file to label: .csv, .tsv, .jsonl or .txt")
    predict.add_argument("--output", required=False, help="new file for the predictions: .csv, .tsv or .jsonl")
    predict.add_argument("--text_column", default="", help="column/key of the text (default: the run's "
                                                           "data.text_column)")
    predict.add_argument("--text_pair_column", default="", help="second text column of a pair classifier "
                                                                "(default: the run's data.text_pair_column)")
    predict.add_argument("--batch_size", type=int, default=64, help="rows per forward pass")
    predict.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    predict.set_defaults(handler=cmd_predict, needs=("workdir", "input", "output"))

    export = sub.add_parser(
        "export", help="export a checkpoint as a Hugging Face model directory",
        description="Write config.json, model.safetensors and the tokenizer files of a run's checkpoint in "
                    "the Hugging Face layout (GPT-2, Llama or BERT family, whichever the model config is), "
                    "for transformers' from_pretrained.")
    add_checkpoint_flags(export)
    export.add_argument("--out", required=False, help="new (or empty) output directory")
    export.set_defaults(handler=cmd_export, needs=("workdir", "out"))

    bench = sub.add_parser(
        "bench", help="benchmarks (decode: jaxlm vs transformers generate())",
        description="--mode=decode: KV-cache decoding tokens/s of the GPT-2-shape model of "
                    "/work/shared/bench/peer_hf_torch.py, jaxlm and transformers' generate() alternating "
                    "on this machine; medians.")
    bench.add_argument("--mode", default="decode", help="decode")
    bench.add_argument("--batch_sizes", default="1,16", help="comma-separated batch sizes")
    bench.add_argument("--prompt_len", type=int, default=64, help="prompt tokens")
    bench.add_argument("--new_tokens", type=int, default=128, help="tokens generated per sequence")
    bench.add_argument("--rounds", type=int, default=5, help="timed runs of each, alternating")
    bench.set_defaults(handler=cmd_bench, needs=())
# == end of eval, generate, export, bench ===============================================================


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxlm", description="JAX/Flax training stack for language models.",
        epilog="Run `jaxlm COMMAND --help` for a command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train", help="train or resume a run (causal LM, masked LM, classification)",
        description="Train a model from a config recipe. Running the same command again resumes "
                    "from the last checkpoint in --workdir. Override any config field with "
                    "--config.FIELD=VALUE (e.g. --config.steps=200 --config.mesh.fsdp=8); "
                    "--help_config lists the fields.")
    train.add_argument("--config", required=False, help="recipe file, e.g. configs/tiny_shakespeare.py[:runlocal]")
    train.add_argument("--workdir", required=False, help="run directory (checkpoints, metrics.jsonl, TensorBoard)")
    train.add_argument("--help_config", action="store_true", help="list every config field and exit")
    add_distributed_flags(train)
    train.set_defaults(handler=cmd_train, needs=("config", "workdir"))
    add_inference_commands(sub)
    from jaxlm.aot import add_aot_parser  # pylint: disable=import-outside-toplevel  (imports stay light)
    add_aot_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        rest, overrides = split_overrides(argv)
        args = parser.parse_args(rest)
        if args.command is None:
            parser.print_help()
            return EXIT_USER_ERROR
        if getattr(args, "help_config", False):
            from jaxlm.config import describe_fields  # pylint: disable=import-outside-toplevel
            print(describe_fields())
            return 0
        for name in getattr(args, "needs", ()):
            if not getattr(args, name):
                raise UserError(f"--{name} is required: jaxlm {args.command} --help shows an example")
        setup_logging()
        hide_gpus_from_tensorflow()
        handler: Callable[..., int] = args.handler
        return handler(args, overrides)
    except UserError as e:
        print(f"jaxlm: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("jaxlm: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # pylint: disable=broad-except
        from jaxlm.train import TrainingDiverged  # pylint: disable=import-outside-toplevel
        if isinstance(e, TrainingDiverged):
            print(f"jaxlm: training diverged: {e}", file=sys.stderr, flush=True)
            return 1
        raise


class _OwnInfoOnly:
    """Keeps INFO lines from jaxlm and clu's progress reports; libraries' INFO chatter (orbax
    logs a dozen lines per save) is dropped. Warnings and errors always pass.
    JAXLM_LOG_LEVEL=debug shows everything."""

    KEEP = (os.sep + "jaxlm" + os.sep, "periodic_actions.py", "logging_writer.py")

    def filter(self, record) -> bool:
        import logging as py_logging  # pylint: disable=import-outside-toplevel
        return record.levelno >= py_logging.WARNING or any(k in record.pathname for k in self.KEEP)


def setup_logging() -> None:
    from absl import logging  # pylint: disable=import-outside-toplevel
    logging.use_absl_handler()
    level = os.environ.get("JAXLM_LOG_LEVEL", "info")
    logging.set_verbosity(level)
    handler = logging.get_absl_handler()
    handler.python_handler.stream = sys.stderr
    if level != "debug":
        handler.addFilter(_OwnInfoOnly())


if __name__ == "__main__":
    sys.exit(main())
