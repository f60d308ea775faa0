"""vLLM's engine flags on ``lmserve serve``, defined by vLLM itself (never re-declared).

lmserve owns the flags it shares with vLLM (``--dtype``, ``--max_model_len``,
``--trust_remote_code``, revisions, ``--max_num_seqs``, ``--max_num_batched_tokens``,
``--max_logprobs``, ``--scheduling_policy``, the model and its name) so they mean the same
on both backends; vLLM's spellings of those are refused here with a pointer to lmserve's.
Everything else reaches ``AsyncEngineArgs`` as ``vllm serve`` would pass it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmserve_core.settings import ServeSettings

logger = logging.getLogger(__name__)

# vLLM flag -> the lmserve flag that owns the setting.
OWNED_BY_LMSERVE = {
    "--model": "--model_id / --model_dir",
    "--tokenizer": "--model_id / --model_dir",
    "--revision": "--model_revision",
    "--no-trust-remote-code": "--trust_remote_code (off by default)",
}


def _parser() -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="lmserve serve (vLLM engine flags)", add_help=False)
    AsyncEngineArgs.add_cli_args(parser)
    return parser


def _refuse_owned(argv: Sequence[str]) -> None:
    for arg in argv:
        flag = arg.split("=", 1)[0].replace("_", "-")
        if flag in OWNED_BY_LMSERVE:
            # Exit 2 like any other bad flag (argparse's convention).
            name = arg.split("=", 1)[0]
            print(
                f"lmserve serve: error: {name} is set with {OWNED_BY_LMSERVE[flag]}",
                file=sys.stderr,
            )
            raise SystemExit(2)


def check(argv: Sequence[str]) -> list[str]:
    """The arguments vLLM does not know either (the caller reports them); a known flag with
    a bad value exits 2 with vLLM's message about that flag."""
    _refuse_owned(argv)
    spelled = {_dashed(a): a for a in argv}
    _namespace, unknown = _parser().parse_known_args([_dashed(a) for a in argv])
    return [spelled.get(a, a) for a in unknown]


def _dashed(arg: str) -> str:
    """``--max_num_seqs=4`` -> ``--max-num-seqs=4`` (vLLM's parser only does this in
    parse_args, and we need parse_known_args)."""
    if not arg.startswith("--"):
        return arg
    flag, eq, value = arg.partition("=")
    return flag.replace("_", "-") + eq + value


def help_text() -> str:
    return str(_parser().format_help())


def build_engine_args(
    settings: ServeSettings, model_path: str, *, on_cpu: bool, runner: str | None
) -> Any:
    """AsyncEngineArgs from vLLM's flags plus the settings lmserve owns."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    namespace: argparse.Namespace = _parser().parse_args(list(settings.engine_args))
    # Before from_cli_args: the args object resolves its model on creation, and vLLM's
    # default model is a hub id (which would be looked up, offline or not).
    namespace.model = model_path
    namespace.tokenizer = model_path
    args = AsyncEngineArgs.from_cli_args(namespace)
    args.served_model_name = settings.served_names
    args.trust_remote_code = settings.trust_remote_code
    args.revision = None  # files are already local (resolved by lmserve)
    args.tokenizer_revision = None
    args.max_num_seqs = settings.max_num_seqs
    if settings.max_num_batched_tokens is not None:
        args.max_num_batched_tokens = settings.max_num_batched_tokens
    args.max_logprobs = settings.max_logprobs
    args.scheduling_policy = settings.scheduling_policy.value
    # vLLM's structured-output engine holds only what follows the reasoning to a constraint: it
    # needs the reasoning parser, as `vllm serve --reasoning-parser` gives it.
    if settings.reasoning_parser:
        args.reasoning_parser = settings.reasoning_parser
    if settings.reasoning_parser_plugin:
        args.reasoning_parser_plugin = settings.reasoning_parser_plugin
    # LoRA: lmserve owns the flags (they mean the same on the Hugging Face backend).
    args.enable_lora = settings.enable_lora
    if settings.enable_lora:
        args.max_loras = settings.max_loras
        args.max_lora_rank = settings.max_lora_rank
        args.max_cpu_loras = settings.max_cpu_loras
    if settings.max_length is not None:
        args.max_model_len = settings.max_length
    if settings.dtype != "auto":
        args.dtype = {"half": "float16", "float": "float32"}.get(settings.dtype, settings.dtype)
    elif on_cpu:
        args.dtype = "float32"  # docs/behaviour.md §1: auto is float32 on CPU, on both backends
    if runner is not None:
        args.runner = runner
    given = {a.split("=", 1)[0].replace("_", "-") for a in settings.engine_args}
    if on_cpu and not given & {"--enforce-eager", "--no-enforce-eager"}:
        # torch.compile costs about a minute of startup on CPU; opt in with --no-enforce-eager.
        args.enforce_eager = True
    if (
        on_cpu
        and "--kv-cache-memory-bytes" not in given
        and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    ):
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(default_cpu_kv_cache_gib())
    world = int(args.tensor_parallel_size) * int(args.pipeline_parallel_size)
    bind_set = bool(os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
    if on_cpu and world > 1 and not bind_set and numa_nodes() < world:
        # vLLM's "auto" binds each CPU worker to a NUMA node of its own and refuses to
        # start when there are fewer nodes than workers; unbound threads work anywhere.
        logger.info("%d CPU workers on %d NUMA node(s): VLLM_CPU_OMP_THREADS_BIND=nobind",
                    world, numa_nodes())  # fmt: skip
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    return args


def numa_nodes() -> int:
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    return max(1, len(nodes))


def default_cpu_kv_cache_gib() -> int:
    """A bounded KV cache on CPU: 10% of RAM, between 1 and 4 GiB (vLLM's default is most of it)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 1
    return max(1, min(4, int(total * 0.10 / 2**30)))
