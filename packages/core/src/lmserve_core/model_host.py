"""One served model's lifecycle, the same for ``lmserve serve``, ``lmserve_server.build()``, a
Ray Serve replica and ``lmserve_backend_hf.load_model``:

resolve the source and task (``ModelHost.from_settings``: ``plan_serving``, cheap, before any port
opens) -> ``load`` (loading -> ready, or failed) -> ``drain`` (readiness and new requests 503,
in-flight requests get up to a timeout, what is left is aborted) -> ``close`` (the backend stops).

The host is also the registry of served names (the base model's and its LoRA adapters') and
holds the admission gate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum

from lmserve_core.admission import AdmissionGate, Ticket
from lmserve_core.backend import (
    DEFAULT_BATCH_SIZE,
    LoadedEncoder,
    LoadedGenerator,
    LoadRequest,
)
from lmserve_core.encoder import EncoderBackend, EncoderService
from lmserve_core.errors import (
    ConfigurationError,
    InvalidInput,
    LmserveError,
    ModelNotFound,
    ModelNotReady,
)
from lmserve_core.generation.parsers import output_parsing
from lmserve_core.generation.prepare import FrontendOptions, GenerationLimits
from lmserve_core.generation.service import OpenAIGenerationService
from lmserve_core.lora import (
    AdapterBackend,
    AdapterLeases,
    AdapterRegistry,
    LoRAAdapter,
    local_adapter_dir,
    parse_lora_modules,
    read_adapter_config,
    target_modules,
)
from lmserve_core.model_files import download
from lmserve_core.observer import ServingObserver
from lmserve_core.plan import ServingPlan, load_backend_factory, load_converter, plan_serving
from lmserve_core.settings import ServeSettings
from lmserve_core.tasks import Task

logger = logging.getLogger(__name__)


class ModelState(StrEnum):
    loading = "loading"
    ready = "ready"
    failed = "failed"
    draining = "draining"


class ModelHost:
    def __init__(
        self,
        settings: ServeSettings,
        plan: ServingPlan,
        observer: ServingObserver | None = None,
        remote: EncoderBackend | None = None,
    ) -> None:
        """``observer`` gets the metrics hooks of everything this host loads; ``remote``: the
        model runs in another process (an API worker's, ``LoadRequest.remote``)."""
        self.settings = settings
        self.remote = remote
        self.plan = plan
        # The registry of served names (--model_name, --served_model_name): every one reaches
        # this model; the first is the one logs and metrics use.
        self.names = settings.served_names
        self.name = self.names[0]
        self.backend_name = plan.backend
        self.backend_reason = plan.backend_reason
        self.state = ModelState.loading
        self.error: str | None = None
        self.loaded: LoadedEncoder | LoadedGenerator | None = None
        self.service: EncoderService | None = None
        self.generator: OpenAIGenerationService | None = None
        self.created = int(time.time())
        self.load_seconds: float | None = None
        # Bounds the requests this model holds (running + --max_queued_requests waiting);
        # the running slots are refined once the backend is known. Callers admit after
        # ``require``/``require_generator``, so 404 and 503 come before 429.
        running = (settings.max_num_seqs if plan.task.is_generative
                   else settings.max_batch_size or DEFAULT_BATCH_SIZE)  # fmt: skip
        self.gate = AdmissionGate(running_slots=running, max_queued=settings.max_queued_requests)
        self.observer = observer
        # LoRA adapters (--enable_lora): served under their own names next to these.
        self.adapters = AdapterRegistry(self.names)
        # --lora-modules, loaded after the base model; their names are known (503 while
        # loading, not 404) before that.
        self._static_modules = parse_lora_modules(settings.lora_modules or ())
        self._static_adapters = {m.name for m in self._static_modules}
        # Adapters replaced in place, freed once their last request is over.
        self._retiring: set[asyncio.Future[None]] = set()

    @classmethod
    def from_settings(
        cls,
        settings: ServeSettings,
        observer: ServingObserver | None = None,
        remote: EncoderBackend | None = None,
    ) -> ModelHost:
        """Resolve the model's files, task and backend (ConfigurationError names the flag)."""
        return cls(settings, plan_serving(settings), observer, remote)

    @property
    def task(self) -> Task:
        return self.plan.task

    @property
    def ready(self) -> bool:
        if self.state is not ModelState.ready:
            return False
        try:
            if self.generator is not None:
                self.generator.backend.check_health()
            if self.service is not None:
                self.service.backend.check_health()
        except LmserveError:
            return False
        return True

    async def load(self) -> None:
        """Load in a worker thread: the event loop keeps answering health checks."""
        started = time.perf_counter()
        try:
            source = self.plan.source
            config = self.plan.config
            if source.needs_conversion and source.builtin is not None:
                converter = load_converter(source.builtin.layout)
                await asyncio.to_thread(converter, source.builtin)
                config = source.config()  # the real one, now that it exists
            request = LoadRequest(
                self.settings,
                source,
                self.plan.task,
                config,
                asyncio.get_running_loop(),
                observer=self.observer,
                remote=self.remote,
            )
            loaded = await self._load_with_fallback(request)
            if isinstance(loaded, LoadedGenerator):
                self.generator = OpenAIGenerationService(
                    backend=loaded.backend,
                    tokenizer=loaded.tokenizer,
                    facts=loaded.facts,
                    limits=GenerationLimits(
                        max_n=self.settings.max_n,
                        max_logprobs=self.settings.max_logprobs,
                        priority_scheduling=self.settings.scheduling_policy == "priority",
                    ),
                    trust_request_chat_template=self.settings.trust_request_chat_template,
                    options=FrontendOptions(
                        response_role=self.settings.response_role,
                        force_include_usage=self.settings.enable_force_include_usage,
                        prompt_tokens_details=self.settings.enable_prompt_tokens_details,
                        tokens_as_ids=self.settings.return_tokens_as_token_ids,
                        content_format=self.settings.chat_template_content_format.value,
                        tool_call_parser=self.settings.tool_call_parser,
                        enable_auto_tool_choice=self.settings.enable_auto_tool_choice,
                        exclude_tools_when_tool_choice_none=(
                            self.settings.exclude_tools_when_tool_choice_none
                        ),
                    ),
                    observer=self.observer,
                    output_parsing=output_parsing(self.settings, loaded.tokenizer),
                )
                await loaded.backend.start()
            else:
                batch_size = self.settings.max_batch_size or loaded.default_batch_size
                service = EncoderService(
                    task=self.plan.task,
                    tokenizer=loaded.tokenizer,
                    backend=loaded.backend,
                    info=loaded.info,
                    options=loaded.options,
                    max_batch_size=batch_size,
                    max_batch_tokens=self.settings.max_batch_tokens,
                    bucket_lengths=loaded.bucket_lengths,
                    chunk_rows=loaded.chunk_rows,
                    concurrency=loaded.concurrent_batches,
                    max_instances=self.settings.max_instances_per_request,
                    observer=self.observer,
                )
                self.gate.running_slots = batch_size * loaded.concurrent_batches
                await service.start()
                self.service = service
        except LmserveError as exc:
            self._fail(exc.message)
            raise
        except Exception as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
            raise
        self.loaded = loaded
        self.adapters.max_adapters = loaded.max_adapters
        try:
            await self._load_static_adapters()
        except LmserveError as exc:
            self._fail(exc.message)
            raise
        self.load_seconds = time.perf_counter() - started
        if self.state is not ModelState.loading:  # a stop signal came while loading
            return
        self.state = ModelState.ready
        logger.info(
            "model %r ready: %s on the %s backend (%s) in %.1f s",
            self.name, self.task.value, self.backend_name, self.backend_reason, self.load_seconds,
        )  # fmt: skip

    async def _load_with_fallback(self, request: LoadRequest) -> LoadedEncoder | LoadedGenerator:
        try:
            factory = load_backend_factory(self.backend_name)
            return await asyncio.to_thread(factory, request)
        except Exception as exc:
            fallback = self.plan.fallback
            if fallback is None:
                raise
            why = exc.message if isinstance(exc, LmserveError) else f"{type(exc).__name__}: {exc}"
            logger.warning(
                "the %s backend cannot serve %r (%s); falling back to the %s backend",
                self.backend_name, self.plan.source.display_name, why, fallback,
            )  # fmt: skip
            self.backend_reason = f"fell back from {self.backend_name}: {why}"
            self.backend_name = fallback
            factory = load_backend_factory(fallback)
            return await asyncio.to_thread(factory, request)

    # --- LoRA adapters ----------------------------------------------------------------
    def _adapter_backend(self) -> AdapterBackend:
        backend = self.loaded.backend if self.loaded is not None else None
        if not self.settings.enable_lora:
            raise InvalidInput("this server was started without --enable_lora", param="lora_name")
        if not isinstance(backend, AdapterBackend):
            raise InvalidInput(
                f"the {self.backend_name} backend does not serve LoRA adapters", param="lora_name"
            )
        return backend

    async def _load_static_adapters(self) -> None:
        """--lora-modules, once the base model is loaded; an adapter that does not load is a
        startup error naming the flag."""
        modules = self._static_modules
        for module in modules:
            try:
                await self.load_adapter(
                    module.name, module.path, base_model_name=module.base_model_name
                )
            except LmserveError as exc:
                raise ConfigurationError(
                    f"--lora-modules {module.name}={module.path}: {exc.message}",
                    param="lora_modules",
                ) from exc
        if modules:
            logger.info("serving %d LoRA adapter(s): %s", len(modules),
                        ", ".join(m.name for m in modules))  # fmt: skip

    async def load_adapter(
        self, name: str, source: str, *, base_model_name: str | None = None,
        inplace: bool = False,
    ) -> LoRAAdapter:  # fmt: skip
        """Serve the PEFT LoRA folder (or hub id) ``source`` as ``name`` (vLLM's
        load_lora_adapter: the same name twice is refused unless ``inplace``)."""
        registry = self.adapters
        async with registry.lock(name):
            backend = self._adapter_backend()
            if registry.loaded(name) and not inplace:
                raise InvalidInput(
                    f"The lora adapter '{name}' has already been loaded. If you want to load the "
                    "adapter in place, set 'load_inplace' to True.", param="lora_name",
                )  # fmt: skip
            registry.check_room(name)
            directory = local_adapter_dir(source)
            if directory is None:
                try:
                    directory = await asyncio.to_thread(download, source, None, "lora_modules")
                except ConfigurationError as exc:
                    raise ModelNotFound(exc.message, param="lora_path") from exc
            config = await asyncio.to_thread(
                read_adapter_config, directory, max_rank=self.settings.max_lora_rank
            )
            adapter = LoRAAdapter(
                name=name, int_id=registry.next_id(), path=str(directory), source=source,
                rank=int(config["r"]),
                base_model_name=base_model_name if base_model_name in self.names else None,
                target_modules=target_modules(config), task_type=config.get("task_type"),
            )  # fmt: skip
            await backend.add_adapter(adapter)  # a failure leaves the old one serving
            if registry.loaded(name):  # in place: new requests get the new weights at once
                old = registry.replace(adapter)
                if old is not None:  # the old weights go once its requests are over
                    task = asyncio.ensure_future(self._retire(backend, old))
                    self._retiring.add(task)
                    task.add_done_callback(self._retiring.discard)
            else:
                registry.add(adapter)
        logger.info("loaded LoRA adapter %r from %r (rank %d)", name, source, adapter.rank)
        return adapter

    async def _retire(self, backend: AdapterBackend, old: AdapterLeases) -> None:
        try:
            await old.released()
            await backend.remove_adapter(old.adapter)
        except Exception:  # a backend that stopped meanwhile: nothing left to free
            logger.exception("could not free the replaced LoRA adapter %r", old.adapter.name)

    async def unload_adapter(self, name: str) -> None:
        """Stop serving ``name``: new requests for it are 404 at once, those in flight finish
        (up to --shutdown_timeout, else Conflict and it stays), then its weights go."""
        registry = self.adapters
        async with registry.lock(name):
            backend = self._adapter_backend()
            adapter = await registry.drain(name, self.settings.shutdown_timeout)
            try:
                await backend.remove_adapter(adapter)
            finally:
                registry.remove(name)
        logger.info("unloaded LoRA adapter %r", name)

    def adapter_for(self, name: str) -> LoRAAdapter | None:
        """The adapter ``name`` is (None for the base model's names)."""
        return None if name in self.names else self.adapters.get(name)

    def served_name(self, name: str | None) -> str:
        """The name metrics use for a requested one: the adapter's own, the primary name for
        any base alias, "" for a name nothing answers to."""
        if name is None:
            return ""
        if name in self.names:
            return self.name
        return name if self.adapters.get(name) is not None else ""

    def admit(self, name: str, weight: int = 1) -> Ticket:
        """An admission ticket for a request to ``name``; an adapter's requests also hold it
        (an unload waits for them)."""
        if name in self.names or self.adapters.get(name) is None:
            return self.gate.admit(weight)
        lease = self.adapters.lease(name)
        try:
            return self.gate.admit(weight, on_release=lease.release)
        except BaseException:
            lease.release()
            raise

    def _fail(self, message: str) -> None:
        self.state = ModelState.failed
        self.error = message
        logger.error("model %r failed to load: %s", self.name, message)

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests, give those in flight up to ``timeout`` s, abort what is left
        (streams end with an error event their clients can read), then close the model.
        True when everything in flight finished in time."""
        gate = self.gate
        self.start_draining()
        if gate.requests:
            logger.info(
                "stopping: readiness is 503 and new requests get 503; %d request(s) in flight "
                "get up to %.0f s (--shutdown_timeout) to finish", gate.requests, timeout,
            )  # fmt: skip
        else:
            logger.info("stopping: readiness is 503 and new requests get 503; nothing in flight")
        finished = await gate.wait_idle(timeout)
        if not finished:
            logger.warning(
                "%d request(s) still in flight after %.0f s: aborting them", gate.requests, timeout
            )
        await self.close()  # what is left ends with an error event, not a cut
        if not finished:
            await gate.wait_idle(2)  # let those last bytes reach their clients
        return finished

    async def close(self) -> None:
        """Stop the backend; in-flight requests fail with 503. Idempotent."""
        self.start_draining()
        service, self.service = self.service, None
        generator, self.generator = self.generator, None
        if service is not None:
            await service.stop()
        if generator is not None:
            await generator.backend.stop()

    def unfinished_sequences(self) -> int | None:
        """Sequences the generation engine holds (None for encoders); 0 from a dead engine."""
        if self.generator is None:
            return None
        try:
            return self.generator.backend.num_unfinished()
        except Exception:  # a dead engine must not break the metrics page
            return 0

    @property
    def all_names(self) -> list[str]:
        """The base model's names, then each adapter's."""
        return [*self.names, *self.adapters.names]

    def check_name(self, name: str) -> None:
        if self.state is ModelState.loading and name in self._static_adapters:
            return
        if name not in self.names and self.adapters.get(name) is None:
            served = ", ".join(repr(n) for n in self.all_names)
            raise ModelNotFound(f"model {name!r} is not served here (try {served})", param="model")

    def check_usable(self, name: str) -> None:
        self.check_name(name)
        if self.state is ModelState.loading:
            raise ModelNotReady(f"model {name!r} is still loading")
        if self.state is ModelState.draining:
            raise ModelNotReady("the server is shutting down")
        if self.state is ModelState.failed:
            raise ModelNotReady(f"model {name!r} failed to load: {self.error}")

    def start_draining(self) -> None:
        """Readiness 503 and new requests 503 from now on; in-flight ones carry on."""
        if self.state is not ModelState.failed:
            self.state = ModelState.draining

    def require(self, name: str) -> EncoderService:
        """The encoder service for ``name``, or the error a client should see."""
        self.check_usable(name)
        if self.service is None:
            raise InvalidInput(
                f"model {name!r} is a {self.task.value} model: use /openai/v1/completions or "
                "/openai/v1/chat/completions", param="model",
            )  # fmt: skip
        return self.service

    def require_generator(self, name: str) -> OpenAIGenerationService:
        self.check_usable(name)
        if self.generator is None:
            raise InvalidInput(
                f"model {name!r} serves {self.task.value}, not text generation: use "
                f"/v1/models/{name}:predict or /v2/models/{name}/infer", param="model",
            )  # fmt: skip
        self.generator.backend.check_health()
        return self.generator
