"""`jaxlm generate`: text from a causal-LM checkpoint, decoded with a KV cache."""

import argparse
import sys

from jaxlm import console
from jaxlm.commands import common
from jaxlm.errors import UserError

NAME = "generate"
HELP = "generate text from a causal-LM checkpoint (KV cache)"
DESCRIPTION = ("Decode from a causal-LM run's checkpoint with a KV cache: greedy (--temperature=0) "
               "or sampling; stops at EOS. One prompt streams token by token; several print in order, "
               "each sequence as one block.")
NEEDS = ("workdir",)


def add_flags(parser: argparse.ArgumentParser) -> None:
    common.add_checkpoint_flags(parser)
    parser.add_argument("--prompt", default=None, help="prompt text")
    parser.add_argument("--prompts_file", default=None, help=".txt (a prompt per line), .jsonl ({\"prompt\": …}) "
                                                             "or .json (a list of strings)")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate per prompt at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sample at this temperature")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--num_samples", type=int, default=1, help="sequences per prompt")


def run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from jaxlm import generate  # pylint: disable=import-outside-toplevel
    from jaxlm.data.tokenizer import eos_id  # pylint: disable=import-outside-toplevel
    texts = generate.read_prompts(args.prompt, args.prompts_file)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise UserError("--max_new_tokens and --num_samples must be at least 1")
    sampling = generate.Sampling(args.temperature, args.top_k, args.top_p)
    sampling.check()
    from jaxlm import bucket_probe  # pylint: disable=import-outside-toplevel
    bucket_probe.check_reachable(args.workdir)  # One line, not gcsfs's 33 s of retries.
    console.log_to_workdir(args.workdir)
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
