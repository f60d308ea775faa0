"""LoRA adapters in the Hugging Face generation engine: PEFT's mixed-adapter batches.

Adapters are made here with PEFT on the tiny llama (``init_lora_weights=False``: random, non-zero
A and B, so each one changes the output), saved with ``save_pretrained`` and served through
``AdapterBackend.add_adapter``. The reference for each adapter is plain PEFT with that adapter
alone (and the model without PEFT for the base), decoded greedily one whole forward pass per
token, no cache, no batch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _support.tiny_models import model_path
from lmserve_backend_hf import create_backend
from lmserve_core.backend import LoadRequest
from lmserve_core.errors import InvalidInput
from lmserve_core.generation.params import GenerationRequest, SamplingParams, TokenEvent
from lmserve_core.lora import AdapterBackend, LoRAAdapter
from lmserve_core.model_files import ModelSource, read_model_config
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9], [20, 21, 22], [40, 41, 42, 43, 44, 45, 46], [60, 61]]
MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _save_adapter(
    directory: Path, seed: int, targets: list[str], base: str = "llama", rank: int = 8
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path(base), dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                        fan_in_fan_out=base == "gpt2")  # fmt: skip
    get_peft_model(model, config).save_pretrained(directory, save_embedding_layers=False)
    return directory


def _adapter(name: str, int_id: int, path: Path) -> LoRAAdapter:
    return LoRAAdapter(name=name, int_id=int_id, path=str(path), source=str(path), rank=8)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": _save_adapter(root / "a", 1, ["q_proj", "v_proj"]),
        "b": _save_adapter(root / "b", 2, ["q_proj", "v_proj"]),
        # Other target modules than a and b: PEFT wraps more layers for it.
        "c": _save_adapter(root / "c", 3, ["k_proj", "o_proj", "up_proj"]),
        "gpt2": _save_adapter(root / "gpt2", 4, ["c_attn"], base="gpt2"),
    }


def _reference(prompt: list[int], adapter: Path | None, tokens: int = MAX_TOKENS) -> list[int]:
    """Greedy tokens from plain PEFT with only ``adapter`` (None: the model without PEFT)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_path("llama"), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def references(adapter_dirs: dict[str, Path]) -> dict[tuple[str | None, int], list[int]]:
    return {
        (name, i): _reference(prompt, None if name is None else adapter_dirs[name])
        for name in (None, "a", "b", "c")
        for i, prompt in enumerate(PROMPTS)
    }


class Engine:
    """The engine of the tiny llama with LoRA on, running on an event loop of its own."""

    def __init__(self, max_loras: int, *, start: bool = True) -> None:
        path = model_path("llama")
        settings = ServeSettings(torch_threads=1, enable_lora=True, max_loras=max_loras)
        request = LoadRequest(settings, ModelSource(path, str(path)), Task.text_generation,
                              read_model_config(path))  # fmt: skip
        self.engine: Any = create_backend(request).backend
        self.loop = asyncio.new_event_loop()
        if start:
            self.loop.run_until_complete(self.engine.start())
        self._ids = 0

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.stop())
        self.loop.close()

    def add(self, adapter: LoRAAdapter) -> None:
        self.loop.run_until_complete(self.engine.add_adapter(adapter))

    def remove(self, adapter: LoRAAdapter) -> None:
        self.loop.run_until_complete(self.engine.remove_adapter(adapter))

    async def tokens(
        self, prompt: list[int], adapter: LoRAAdapter | None, params: SamplingParams = GREEDY
    ) -> list[int]:
        self._ids += 1
        request = GenerationRequest(f"r{self._ids}", list(prompt), params, adapter=adapter)
        events: list[TokenEvent] = [e async for e in self.engine.generate(request)]
        assert events[-1].finish_reason == "length"
        return [e.token_id for e in events if e.token_id is not None]

    def run(self, *jobs: tuple[list[int], LoRAAdapter | None]) -> list[list[int]]:
        """All ``jobs`` at once (they share the engine's batches): each one's tokens."""

        async def together() -> list[list[int]]:
            return list(await asyncio.gather(*(self.tokens(p, a) for p, a in jobs)))

        return self.loop.run_until_complete(together())


@pytest.fixture()
def engine() -> Iterator[Engine]:
    runner = Engine(max_loras=4)
    try:
        yield runner
    finally:
        runner.close()


def _lora_layers(model: Any) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def _hooks(model: Any) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_mixed_adapter_batches_match_peft_and_running_alone(
    engine: Engine, adapter_dirs: dict[str, Path], references: dict[Any, list[int]]
) -> None:
    a, b = _adapter("a", 1, adapter_dirs["a"]), _adapter("my-adapter.v2", 2, adapter_dirs["b"])
    assert isinstance(engine.engine, AdapterBackend)
    engine.add(a)
    engine.add(b)
    served = {None: None, "a": a, "b": b}
    for name in ("a", "b"):  # adapters change the output
        assert any(references[(name, i)] != references[(None, i)] for i in range(len(PROMPTS)))

    alone = {(name, i): engine.run((prompt, adapter))[0]
             for name, adapter in served.items() for i, prompt in enumerate(PROMPTS)}  # fmt: skip
    jobs = [(name, i) for i in range(len(PROMPTS)) for name in served]
    engine.engine.max_step_size = 0
    together = engine.run(*((PROMPTS[i], served[name]) for name, i in jobs))
    assert engine.engine.max_step_size >= 3  # base, a and b rows decoded in the same steps
    for (name, i), tokens in zip(jobs, together, strict=True):
        assert tokens == alone[(name, i)] == references[(name, i)], (name, i)


def test_adapters_with_other_target_modules_and_removal(
    engine: Engine, adapter_dirs: dict[str, Path], references: dict[Any, list[int]]
) -> None:
    model = engine.engine.model
    hooks_before = _hooks(model)
    a, c = _adapter("a", 1, adapter_dirs["a"]), _adapter("c", 3, adapter_dirs["c"])
    engine.add(a)
    engine.add(c)
    jobs = [(PROMPTS[0], a), (PROMPTS[1], c), (PROMPTS[2], None), (PROMPTS[0], c)]
    assert engine.run(*jobs) == [references[("a", 0)], references[("c", 1)],
                                 references[(None, 2)], references[("c", 0)]]  # fmt: skip
    with_c = _lora_layers(model)
    engine.remove(c)
    assert _lora_layers(model) < with_c  # c's own layers are plain modules again
    assert engine.run((PROMPTS[1], a), (PROMPTS[1], None)) == [
        references[("a", 1)], references[(None, 1)]
    ]  # fmt: skip
    with pytest.raises(InvalidInput, match="not loaded"):
        engine.run((PROMPTS[0], c))
    engine.remove(a)
    # The last adapter gone, the model is the plain base model again: no wrappers, no hooks.
    assert _lora_layers(model) == 0 and _hooks(model) == hooks_before
    assert not hasattr(model, "peft_config")
    assert engine.run(*((p, None) for p in PROMPTS)) == [
        references[(None, i)] for i in range(len(PROMPTS))
    ]
    engine.add(c)  # and PEFT wraps it afresh
    assert engine.run((PROMPTS[3], c)) == [references[("c", 3)]]


def test_max_loras_serialises_adapters(
    adapter_dirs: dict[str, Path], references: dict[Any, list[int]]
) -> None:
    runner = Engine(max_loras=1)
    try:
        a, b = _adapter("a", 1, adapter_dirs["a"]), _adapter("b", 2, adapter_dirs["b"])
        runner.add(a)
        runner.add(b)
        lora = runner.engine._lora
        seen: list[frozenset[str]] = []

        def record(module: Any, args: Any, kwargs: Any) -> None:
            names = lora.current
            seen.append(frozenset(names or ()) - {"__base__"})

        handle = runner.engine.model.register_forward_pre_hook(record, with_kwargs=True)
        jobs = [(PROMPTS[i % len(PROMPTS)], adapter)
                for i, adapter in enumerate([a, b, None, a, b, None, b, a])]  # fmt: skip
        runner.engine.max_step_size = 0
        results = runner.run(*jobs)
        handle.remove()
        names = {id(a): "a", id(b): "b", id(None): None}
        for i, ((_, adapter), tokens) in enumerate(zip(jobs, results, strict=True)):
            assert tokens == references[(names[id(adapter)], i % len(PROMPTS))], i
        assert seen and all(len(adapters) <= 1 for adapters in seen)
        assert {frozenset({"lora_1"}), frozenset({"lora_2"})} <= set(seen)
        assert runner.engine.max_step_size >= 2  # base rows still run beside an adapter
        # Nothing left held back (the last rows leave within one more step).
        for _ in range(200):
            if runner.engine.num_unfinished() == 0:
                break
            time.sleep(0.01)
        assert runner.engine.num_unfinished() == 0 and not runner.engine._held
    finally:
        runner.close()


def test_bad_adapters_are_refused_and_serving_goes_on(
    engine: Engine, adapter_dirs: dict[str, Path], references: dict[Any, list[int]],
    tmp_path: Path,
) -> None:  # fmt: skip
    import shutil

    model = engine.engine.model
    a = _adapter("a", 1, adapter_dirs["a"])
    # Before any adapter (PEFT would wrap the model) and next to a loaded one.
    for loaded in ([], [a]):
        for adapter in loaded:
            engine.add(adapter)
        layers = _lora_layers(model)
        with pytest.raises(InvalidInput, match=r"c_attn.*not found in the base model") as exc:
            engine.add(_adapter("gpt2", 10, adapter_dirs["gpt2"]))
        assert exc.value.param == "lora_path" and "'gpt2'" in exc.value.message

        corrupt = tmp_path / f"corrupt{len(loaded)}"
        shutil.copytree(adapter_dirs["b"], corrupt)
        (corrupt / "adapter_model.safetensors").write_bytes(b"\x00not safetensors\xff" * 16)
        with pytest.raises(InvalidInput, match="cannot read the weights"):
            engine.add(_adapter("corrupt", 11, corrupt))

        # Right names, wrong shapes: rank 4 weights under a config that says 8.
        shapes = _save_adapter(tmp_path / f"shapes{len(loaded)}", 5, ["q_proj", "v_proj"], rank=4)
        config = json.loads((shapes / "adapter_config.json").read_text())
        (shapes / "adapter_config.json").write_text(json.dumps(config | {"r": 8}))
        with pytest.raises(InvalidInput, match="size mismatch"):
            engine.add(_adapter("shapes", 12, shapes))

        assert _lora_layers(model) == layers  # nothing half-loaded left behind
        assert engine.engine.adapters == loaded
        assert engine.run((PROMPTS[0], None), *((PROMPTS[1], x) for x in loaded)) == [
            references[(None, 0)], *(references[("a", 1)] for _ in loaded)
        ]  # fmt: skip


def test_the_engines_names_give_pefts_mixed_batch_forward(adapter_dirs: dict[str, Path]) -> None:
    """Names handed to the layers once per batch (``current``) give exactly what PEFT's own
    ``forward(adapter_names=...)`` gives, linear and embedding LoRA layers alike."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmserve_backend_hf.lora import BASE, PeftAdapters

    def fresh() -> Any:
        return AutoModelForCausalLM.from_pretrained(model_path("llama"), dtype=torch.float32)

    dirs = {**adapter_dirs, "emb": _save_adapter(adapter_dirs["a"].parent / "emb", 6,
                                                 ["embed_tokens", "v_proj"])}  # fmt: skip
    names = ["a", "c", "emb"]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20],
                        [21, 22, 23, 24]])  # fmt: skip
    rows = ["a", BASE, "c", "emb", "a"]

    reference: Any = PeftModel.from_pretrained(fresh(), dirs["a"], adapter_name="a")
    for name in names[1:]:
        reference.load_adapter(dirs[name], adapter_name=name)
    reference.eval()
    with torch.inference_mode():
        expected = reference(input_ids=ids, adapter_names=rows).logits
        plain = fresh().eval()(input_ids=ids).logits
    model = fresh().eval()
    lora = PeftAdapters(model, device=torch.device("cpu"))
    served = [_adapter(name, i + 1, dirs[name]) for i, name in enumerate(names)]
    for adapter in served:
        lora.add(adapter)
    keys = {name: lora.key(adapter) for name, adapter in zip(names, served, strict=True)}
    lora.current = lora.row_adapters([keys.get(row, BASE) for row in rows])
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    lora.current = None
    assert torch.equal(got, expected)
    assert not torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    with torch.inference_mode():  # no names: the base model on every row
        assert torch.equal(model(input_ids=ids).logits, plain)


def test_encoder_decoder_adapters(tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    path = model_path("t5")
    torch.manual_seed(3)
    config = LoraConfig(r=8, lora_alpha=512, target_modules=["q", "v", "o", "wi", "wo"],
                        init_lora_weights=False, task_type="SEQ_2_SEQ_LM")  # fmt: skip
    get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(path), config).save_pretrained(tmp_path)
    prompt = [5, 6, 7, 8, 1]

    def reference(adapter: bool) -> list[int]:
        model: Any = AutoModelForSeq2SeqLM.from_pretrained(path)
        if adapter:
            model = PeftModel.from_pretrained(model, tmp_path)
        model.eval()
        out = [model.config.decoder_start_token_id]
        with torch.inference_mode():
            for _ in range(8):
                logits = model(input_ids=torch.tensor([prompt]),
                               decoder_input_ids=torch.tensor([out])).logits  # fmt: skip
                out.append(int(logits[0, -1].argmax()))
        return out[1:]

    settings = ServeSettings(torch_threads=1, enable_lora=True, max_loras=2)
    request = LoadRequest(settings, ModelSource(path, str(path)), Task.text2text_generation,
                          read_model_config(path))  # fmt: skip
    engine: Any = create_backend(request).backend
    adapter = _adapter("t5-adapter", 1, tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def scenario() -> list[list[int]]:
        await engine.start()
        try:
            await engine.add_adapter(adapter)

            async def one(name: str, a: LoRAAdapter | None) -> list[int]:
                request = GenerationRequest(name, prompt, params, adapter=a)
                return [e.token_id async for e in engine.generate(request)]

            return list(await asyncio.gather(one("base", None), one("lora", adapter)))
        finally:
            await engine.stop()

    base, with_adapter = asyncio.run(scenario())
    assert base == reference(False) and with_adapter == reference(True) and base != with_adapter


def test_adapters_load_before_start_and_while_requests_run(
    adapter_dirs: dict[str, Path], references: dict[Any, list[int]]
) -> None:
    """Weights change between two steps of running requests, which go on unaffected."""
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    expected = _reference(PROMPTS[2], None, tokens=200)
    runner = Engine(max_loras=2, start=False)
    try:
        a, b = _adapter("a", 1, adapter_dirs["a"]), _adapter("b", 2, adapter_dirs["b"])
        runner.add(a)  # no model thread yet: loads in place
        runner.loop.run_until_complete(runner.engine.start())

        async def scenario() -> tuple[list[int], list[int], list[int]]:
            engine = runner.engine
            base = asyncio.create_task(runner.tokens(PROMPTS[2], None, long))
            on_a = asyncio.create_task(runner.tokens(PROMPTS[2], a, long))
            while engine.running < 2:  # both decoding: b comes and goes between steps
                await asyncio.sleep(0.001)
            await engine.add_adapter(b)
            on_b = await runner.tokens(PROMPTS[0], b)
            await engine.remove_adapter(b)
            return await base, await on_a, on_b

        base, on_a, on_b = runner.loop.run_until_complete(scenario())
        assert base == expected and on_b == references[("b", 0)]
        assert on_a[:MAX_TOKENS] == references[("a", 2)]
    finally:
        runner.close()


def test_unknown_adapter_and_lora_off() -> None:
    runner = Engine(max_loras=1)
    try:
        ghost = _adapter("ghost", 99, Path("/nonexistent"))
        with pytest.raises(InvalidInput, match="'ghost' is not loaded"):
            runner.run((PROMPTS[0], ghost))
    finally:
        runner.close()
    path = model_path("llama")
    request = LoadRequest(ServeSettings(torch_threads=1), ModelSource(path, str(path)),
                          Task.text_generation, read_model_config(path))  # fmt: skip
    plain = create_backend(request).backend
    assert plain._lora is None
    with pytest.raises(InvalidInput, match="--enable_lora"):
        asyncio.run(plain.add_adapter(_adapter("a", 1, Path("/nonexistent"))))
