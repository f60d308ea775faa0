"""The serving settings: one typed model from which the CLI and its env twins are generated.

Every field becomes ``--name`` and ``--name-with-dashes`` on the command line and reads
``LMSERVE_NAME`` from the environment; the field description is the ``--help`` text.
Extra spellings are listed under ``aliases`` in ``json_schema_extra``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmserve_core.tasks import Task, parse_task


class Backend(StrEnum):
    """Which backend runs the model (``--backend``)."""

    auto = "auto"
    huggingface = "huggingface"
    vllm = "vllm"
    onnx = "onnx"


class LogFormat(StrEnum):
    text = "text"
    json = "json"


class SchedulingPolicy(StrEnum):
    """The order in which waiting generation requests start (vLLM's ``--scheduling-policy``)."""

    fcfs = "fcfs"
    priority = "priority"


class ContentFormat(StrEnum):
    """How message content reaches the chat template (vLLM's --chat-template-content-format)."""

    auto = "auto"
    string = "string"
    openai = "openai"


class PredictorProtocol(StrEnum):
    v2 = "v2"
    grpc_v2 = "grpc-v2"


DTYPE_CHOICES = ("auto", "float16", "half", "bfloat16", "float32", "float")


def flag(description: str, *, aliases: tuple[str, ...] = (), group: str = "model") -> Any:
    """``Field`` metadata that makes a settings field a command-line flag: its help text, other
    names and the help group it is listed under (``lmserve_server.flags`` reads it)."""
    return {
        "description": description,
        "json_schema_extra": {"aliases": list(aliases), "group": group},
    }


class ToolStrictLevel(StrEnum):
    auto = "auto"
    function = "function"
    parameter = "parameter"


class ServeSettings(BaseModel):
    """Everything ``lmserve serve`` can be told."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- which model -------------------------------------------------------------
    model_name: Annotated[
        str,
        Field(min_length=1, **flag(
            "Name used in URLs and in the OpenAI 'model' field (KServe's single name; see "
            "--served_model_name for several)."
        )),
    ] = "model"  # fmt: skip
    served_model_name: Annotated[
        list[str] | None,
        Field(min_length=1, **flag(
            "Serve the model under these names, as vLLM's --served-model-name A B: each one "
            "works in URLs and the 'model' field, and the model lists are made of them (the "
            "first is the name in logs and metrics). With --model_name set too, that name "
            "comes first and the others are aliases."
        )),
    ] = None  # fmt: skip
    model_dir: Annotated[
        str | None,
        Field(
            **flag(
                "Local directory of a saved Hugging Face model (config.json, weights, tokenizer)."
            )
        ),
    ] = None
    model_id: Annotated[
        str | None,
        Field(
            **flag(
                "Hugging Face model id, or a built-in name (smollm2-135m-instruct, all-minilm-l6-v2). "
                "Wins over --model_dir. "
                "With HF_HUB_OFFLINE=1 only the local cache is used."
            )
        ),
    ] = None
    model_revision: Annotated[
        str | None,
        Field(**flag("Revision (branch, tag or commit) of the model weights on the hub.")),
    ] = None
    tokenizer_revision: Annotated[
        str | None, Field(**flag("Revision of the tokenizer on the hub."))
    ] = None
    task: Annotated[
        Task | None,
        Field(
            **flag(
                "Task to serve: text_generation, text2text_generation, fill_mask, token_classification, "
                "sequence_classification, text_embedding, rerank (pipeline spellings such as "
                "text-classification also work; score is rerank). Default: inferred from the model "
                "files (a CrossEncoder folder or a one-label classifier is a reranker)."
            )
        ),
    ] = None
    backend: Annotated[
        Backend,
        Field(
            **flag(
                "auto: vLLM for generative tasks when it supports the model, else Hugging Face; "
                "huggingface; vllm; onnx (encoders: exported once to ONNX, cached, run by ONNX "
                "Runtime in-process)."
            )
        ),
    ] = Backend.auto
    dtype: Annotated[
        str,
        Field(
            **flag(
                "Weights dtype: auto (float16 on GPU, float32 on CPU; encoders float32), "
                "float16/half, bfloat16, float32/float."
            )
        ),
    ] = "auto"
    trust_remote_code: Annotated[
        bool, Field(**flag("Allow custom model and tokenizer code from the model repository."))
    ] = False

    # --- tokenization ------------------------------------------------------------
    max_length: Annotated[
        int | None,
        Field(
            gt=0,
            **flag(
                "Tokenizer max length and context limit. Default: from the model config.",
                aliases=("max_model_len",),
                group="tokenizer",
            ),
        ),
    ] = None
    disable_lower_case: Annotated[
        bool,
        Field(
            **flag(
                "Force lower-casing off. Default: the tokenizer's own setting (never forced on).",
                group="tokenizer",
            )
        ),
    ] = False
    disable_special_tokens: Annotated[
        bool,
        Field(
            **flag(
                "Encode encoder inputs without special tokens ([CLS], [SEP], ...).",
                group="tokenizer",
            )
        ),
    ] = False
    return_token_type_ids: Annotated[
        bool, Field(**flag("Pass token_type_ids to the model / predictor.", group="tokenizer"))
    ] = False

    # --- generation --------------------------------------------------------------
    chat_template: Annotated[
        str | None,
        Field(
            **flag(
                "Jinja chat template FILE to use instead of the tokenizer's.", group="generation"
            )
        ),
    ] = None
    trust_request_chat_template: Annotated[
        bool,
        Field(
            **flag(
                "Allow a per-request 'chat_template' in chat completions (off: refused with 400).",
                group="generation",
            )
        ),
    ] = False
    chat_template_content_format: Annotated[
        ContentFormat,
        Field(
            **flag(
                "How message content reaches the chat template, as vLLM's flag: string (text "
                "parts joined), openai (a list of {'type': 'text', 'text'} parts) or auto (openai "
                "when the template loops over a message's content).",
                group="openai",
            )
        ),
    ] = ContentFormat.auto
    response_role: Annotated[
        str,
        Field(
            min_length=1,
            **flag(
                "The role of chat completion messages (vLLM's --response-role).", group="openai"
            ),
        ),
    ] = "assistant"
    enable_force_include_usage: Annotated[
        bool,
        Field(
            **flag(
                "End every stream with a usage chunk, asked for or not (vLLM's flag).",
                group="openai",
            )
        ),
    ] = False
    enable_prompt_tokens_details: Annotated[
        bool,
        Field(
            **flag(
                "Report usage.prompt_tokens_details.cached_tokens: prompt tokens served from "
                "the prefix cache (vLLM's flag; the Hugging Face backend has no prefix cache).",
                group="openai",
            )
        ),
    ] = False
    return_tokens_as_token_ids: Annotated[
        bool,
        Field(
            **flag(
                "Write logprob tokens as 'token_id:N' (vLLM's flag; a request can set "
                "'return_tokens_as_token_ids' itself).",
                group="openai",
            )
        ),
    ] = False
    enable_auto_tool_choice: Annotated[
        bool,
        Field(
            **flag(
                "Parse tool calls out of the output for tool_choice 'auto' (vLLM's flag; needs "
                "--tool_call_parser).",
                group="openai",
            )
        ),
    ] = False
    tool_call_parser: Annotated[
        str | None,
        Field(
            **flag(
                "The model's tool-call format, by vLLM's parser name (hermes, llama3_json, "
                "mistral, pythonic, qwen3_xml, ...): every parser vLLM ships where vLLM is "
                "installed, on both backends; hermes, llama3_json, mistral and pythonic without.",
                group="openai",
            )
        ),
    ] = None
    tool_parser_plugin: Annotated[
        str | None,
        Field(
            **flag(
                "A Python FILE that registers more tool parsers with vLLM (vLLM's flag).",
                group="openai",
            )
        ),
    ] = None
    tool_strict_level: Annotated[
        ToolStrictLevel,
        Field(
            **flag(
                "How far vLLM's structural tags hold tool calls to the tools: auto (as "
                "tool_choice and each tool's 'strict' say), function (the call envelope "
                "always), parameter (the arguments' schemas too). vLLM's flag.",
                group="openai",
            )
        ),
    ] = ToolStrictLevel.auto
    exclude_tools_when_tool_choice_none: Annotated[
        bool,
        Field(
            **flag(
                "Leave the tools out of the prompt when tool_choice is 'none' (vLLM's flag).",
                group="openai",
            )
        ),
    ] = False
    reasoning_parser: Annotated[
        str | None,
        Field(
            **flag(
                "Move the model's reasoning out of 'content' into 'reasoning', by vLLM's "
                "reasoning parser name (deepseek_r1, qwen3, ...; needs vLLM installed).",
                group="openai",
            )
        ),
    ] = None
    reasoning_parser_plugin: Annotated[
        str | None,
        Field(
            **flag(
                "A Python FILE that registers more reasoning parsers with vLLM (vLLM's flag).",
                group="openai",
            )
        ),
    ] = None
    # --- LoRA adapters (vLLM's flags) ---------------------------------------------------
    enable_lora: Annotated[
        bool,
        Field(**flag(
            "Serve LoRA adapters next to the base model: a request picks one by 'model' "
            "(vLLM's flag; on both backends).", group="lora",
        )),
    ] = False  # fmt: skip
    lora_modules: Annotated[
        list[str] | None,
        Field(min_length=1, **flag(
            "Adapters to serve from startup, as vLLM's --lora-modules: name=path, or JSON "
            "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; path is a local PEFT "
            "folder or a hub id. Several may follow the flag. Needs --enable_lora.",
            group="lora",
        )),
    ] = None  # fmt: skip
    max_loras: Annotated[
        int,
        Field(ge=1, **flag(
            "Most distinct adapters in one batch (vLLM's flag): requests for more wait their "
            "turn.", group="lora",
        )),
    ] = 1  # fmt: skip
    max_lora_rank: Annotated[
        int,
        Field(ge=1, **flag(
            "Highest adapter rank served (vLLM's flag); an adapter of a higher rank is refused. "
            "The vLLM backend takes 1, 8, 16, 32, 64, 128, 256, 320 or 512.", group="lora",
        )),
    ] = 16  # fmt: skip
    max_cpu_loras: Annotated[
        int | None,
        Field(ge=1, **flag(
            "Adapters kept in memory (vLLM's flag, at least --max_loras). The Hugging Face "
            "backend keeps every adapter loaded, so this is the most it serves at once; "
            "default: no limit there, --max_loras on vLLM.", group="lora",
        )),
    ] = None  # fmt: skip
    enable_lora_runtime_updates: Annotated[
        bool,
        Field(**flag(
            "Serve POST /openai/v1/load_lora_adapter and /unload_lora_adapter (vLLM's bodies; "
            "also on with VLLM_ALLOW_RUNTIME_LORA_UPDATING=true). Off by default: anyone "
            "with the API key may then load files from this machine.", group="lora",
        )),
    ] = False  # fmt: skip
    enable_request_id_headers: Annotated[
        bool,
        Field(
            **flag(
                "vLLM's flag for echoing X-Request-Id on responses: lmserve always does, so "
                "this is accepted for vLLM command lines and changes nothing.",
                group="openai",
            )
        ),
    ] = False
    max_num_seqs: Annotated[
        int,
        Field(
            gt=0,
            **flag("Most sequences generated together (continuous batching).", group="generation"),
        ),
    ] = 32
    max_num_batched_tokens: Annotated[
        int | None,
        Field(
            gt=0,
            **flag(
                "Most tokens one generation step processes (vLLM's --max-num-batched-tokens, "
                "chunked prefill): each running sequence takes one, and waiting prompts are "
                "prefilled in the rest, a long one in pieces over several steps, so a burst "
                "of arrivals does not stall running streams. At least --max_num_seqs. Default: "
                "vLLM's own on --backend vllm; 512 (or --max_num_seqs, if larger) on the "
                "Hugging Face engine.",
                group="generation",
            ),
        ),
    ] = None
    max_n: Annotated[
        int, Field(gt=0, **flag("Largest 'n' (choices per request) accepted.", group="generation"))
    ] = 16
    scheduling_policy: Annotated[
        SchedulingPolicy,
        Field(
            **flag(
                "Order in which waiting generation requests start, as vLLM's "
                "--scheduling-policy: fcfs (arrival) or priority (a request's 'priority', lower "
                "first, then arrival). With fcfs a request that sets 'priority' is refused.",
                group="generation",
            ),
        ),
    ] = SchedulingPolicy.fcfs
    max_logprobs: Annotated[
        int,
        Field(
            ge=-1,
            **flag(
                "Most log probabilities a request may ask for per token ('logprobs' on "
                "completions, 'top_logprobs' on chat), as vLLM's --max-logprobs; -1: no limit "
                "(the vocabulary).",
                group="generation",
            ),
        ),
    ] = 20

    # --- outputs -----------------------------------------------------------------
    return_probabilities: Annotated[
        bool,
        Field(
            **flag(
                "Return softmax probabilities instead of the argmax for fill_mask, token and "
                "sequence classification.",
                group="outputs",
            )
        ),
    ] = False
    return_raw_logits: Annotated[
        bool,
        Field(
            **flag(
                "Return the model's raw logits (FP32) instead of post-processed predictions.",
                group="outputs",
            )
        ),
    ] = False
    return_offsets_mapping: Annotated[
        bool,
        Field(
            **flag(
                "token_classification: return each token's [start, end) character offsets "
                "beside its prediction.",
                group="outputs",
            )
        ),
    ] = False

    # --- Triton bridge -----------------------------------------------------------
    tensor_input_names: Annotated[
        str | None,
        Field(
            **flag(
                "Comma list of tokenizer outputs sent as V2 input tensors to a Triton predictor "
                "(e.g. input_ids,attention_mask).",
                group="predictor",
            )
        ),
    ] = None
    predictor_host: Annotated[
        str | None,
        Field(
            **flag(
                "HOST:PORT of a Triton server (HOST alone: port 80, as KServe passes it): "
                "tokenize here, run the model there.",
                group="predictor",
            )
        ),
    ] = None
    predictor_protocol: Annotated[
        PredictorProtocol,
        Field(**flag("Protocol to the predictor: v2 (REST) or grpc-v2.", group="predictor")),
    ] = PredictorProtocol.v2

    # --- server ------------------------------------------------------------------
    host: Annotated[
        str, Field(**flag("Address to listen on (container images set 0.0.0.0).", group="server"))
    ] = "127.0.0.1"
    http_port: Annotated[int, Field(ge=0, le=65535, **flag("HTTP port.", group="server"))] = 8080
    grpc_port: Annotated[
        int, Field(ge=0, le=65535, **flag("gRPC port (see --enable_grpc).", group="server"))
    ] = 8081
    enable_grpc: Annotated[
        bool,
        Field(**flag(
            "Serve the Open Inference Protocol over gRPC on --grpc_port too: on by default, as "
            "KServe's model server; --enable_grpc false turns it off.", group="server"
        )),
    ] = True  # fmt: skip
    api_workers: Annotated[
        int,
        Field(
            ge=1,
            **flag(
                "HTTP front-end processes (parsing, validation, tokenization, batching, response "
                "encoding) sharing --http_port, all feeding the one process that holds the model "
                "(vLLM's --api-server-count). Encoder tasks on --backend huggingface or onnx only; "
                "anything else (generation, vLLM, --predictor_host, --enable_lora, serve-ray) is "
                "refused at start. Each worker has its own queue (--max_queued_requests); gRPC "
                "is served by the first worker; /metrics adds up all workers. Default 1: one "
                "process serves everything.",
                group="server",
            ),
        ),
    ] = 1
    max_batch_size: Annotated[
        int | None,
        Field(
            gt=0,
            **flag(
                "Most instances one encoder batch takes from the queue. Default: 64 for models "
                "run in this process (--backend huggingface or onnx), which run a batch of mixed "
                "lengths as length-sorted forward passes of at most 16 rows so short inputs do "
                "not pad to long ones; 32 otherwise (a Triton model lmserve exports takes 32).",
                group="server",
            ),
        ),
    ] = None
    max_batch_tokens: Annotated[
        int,
        Field(
            gt=0,
            **flag(
                "Most padded tokens (instances x longest input) one encoder forward pass takes; "
                "bounds activation memory. A batch over it (a single request too) runs as "
                "length-sorted passes within it.",
                group="server",
            ),
        ),
    ] = 16384
    max_request_body_bytes: Annotated[
        int,
        Field(
            gt=0,
            **flag(
                "Largest accepted request body; larger gets 413 before parsing.", group="server"
            ),
        ),
    ] = 16 * 1024 * 1024
    max_queued_requests: Annotated[
        int,
        Field(
            ge=0,
            **flag(
                "Most requests a model holds waiting beyond those it is running (an encoder's "
                "batches in flight, a generator's --max_num_seqs sequences). When full, new "
                "requests get 429 with Retry-After (gRPC: RESOURCE_EXHAUSTED).",
                group="server",
            ),
        ),
    ] = 256
    max_instances_per_request: Annotated[
        int,
        Field(
            gt=0,
            **flag(
                "Most instances (texts, token lists) one encoder request may carry; more is a 400.",
                group="server",
            ),
        ),
    ] = 1024
    ray_cluster_timeout: Annotated[
        float,
        Field(
            ge=0,
            **flag(
                "vLLM with --distributed-executor-backend ray: seconds to wait for the Ray "
                "cluster named by RAY_ADDRESS to offer the GPUs that --tensor-parallel-size x "
                "--pipeline-parallel-size need (workers may still be joining), then fail.",
                group="scale-out",
            ),
        ),
    ] = 600
    shutdown_timeout: Annotated[
        float,
        Field(
            ge=0,
            **flag(
                "Seconds that in-flight requests (streams too) get to finish after SIGTERM or "
                "SIGINT; readiness and new requests answer 503 meanwhile. Then the server exits. "
                "Unloading a LoRA adapter waits as long for its requests (then 409).",
                group="server",
            ),
        ),
    ] = 30.0
    api_key: Annotated[
        str | None,
        Field(
            repr=False,
            **flag(
                "Require 'Authorization: Bearer KEY' on every inference and metadata route "
                "(HTTP and gRPC); health and metrics stay open.",
                group="security",
            ),
        ),
    ] = None
    allowed_origins: Annotated[
        str | None,
        Field(
            **flag(
                "Comma list of origins allowed by CORS ('*' for any). Default: CORS off.",
                group="security",
            )
        ),
    ] = None
    torch_threads: Annotated[
        int | None,
        Field(
            gt=0,
            **flag(
                "torch intra-op threads for the model. Default: the number of CPU cores.",
                group="server",
            ),
        ),
    ] = None
    log_level: Annotated[
        str, Field(**flag("Log level: debug, info, warning, error.", group="logging"))
    ] = "info"
    log_format: Annotated[
        LogFormat,
        Field(
            **flag(
                "text: one readable line per event; json: one JSON object per line (for log "
                "collectors), request fields as keys.",
                group="logging",
            )
        ),
    ] = LogFormat.text
    log_requests: Annotated[
        bool,
        Field(
            **flag(
                "Also log each inference request's body (prompts, inputs; first 4 KiB) at INFO. "
                "Off by default: prompts can be private.",
                group="logging",
            )
        ),
    ] = False

    # `vllm serve` engine flags given to `lmserve serve`, validated by the vLLM backend's own
    # argument parser (never re-declared here); not a flag itself.
    engine_args: Annotated[tuple[str, ...], Field(json_schema_extra={"cli": False})] = ()

    @field_validator("task", mode="before")
    @classmethod
    def _parse_task(cls, value: object) -> object:
        return parse_task(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_batched_tokens(self) -> ServeSettings:
        if (
            self.max_num_batched_tokens is not None
            and self.max_num_batched_tokens < self.max_num_seqs
        ):
            raise ValueError(
                f"--max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"--max_num_seqs ({self.max_num_seqs}): every running sequence takes a token "
                "of each step"
            )
        return self

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, value: str) -> str:
        if value not in DTYPE_CHOICES:
            raise ValueError(f"must be one of {', '.join(DTYPE_CHOICES)}")
        return value

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("must be one of debug, info, warning, error, critical")
        return value.lower()

    @field_validator("api_key")
    @classmethod
    def _check_api_key(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("served_model_name")
    @classmethod
    def _check_served_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not name.strip() for name in value):
            raise ValueError("names must not be empty")
        return value

    @property
    def lora_runtime_updates(self) -> bool:
        """--enable_lora_runtime_updates, or vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING."""
        import os

        env = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower()
        return self.enable_lora and (self.enable_lora_runtime_updates or env in ("1", "true"))

    @property
    def served_names(self) -> list[str]:
        """Every name the model answers to, the primary one first."""
        if not self.served_model_name:
            return [self.model_name]
        names = list(self.served_model_name)
        if "model_name" in self.model_fields_set:  # said explicitly: KServe's name stays first
            names.insert(0, self.model_name)
        return list(dict.fromkeys(names))

    @property
    def allowed_origin_list(self) -> list[str]:
        if not self.allowed_origins:
            return []
        return [o.strip() for o in self.allowed_origins.split(",") if o.strip()]

    @property
    def tensor_input_name_list(self) -> list[str]:
        if not self.tensor_input_names:
            return []
        return [n.strip() for n in self.tensor_input_names.split(",") if n.strip()]


class ExportSettings(BaseModel):
    """Everything ``lmserve export`` can be told."""

    model_config = ConfigDict(extra="forbid")

    model_dir: Annotated[
        str | None, Field(**flag("Local directory of a saved Hugging Face model.", group="export"))
    ] = None
    model_id: Annotated[
        str | None,
        Field(**flag("Hugging Face model id or built-in name (all-minilm-l6-v2); wins over "
                     "--model_dir.", group="export")),
    ] = None  # fmt: skip
    task: Annotated[
        str | None,
        Field(**flag("sequence_classification, token_classification, fill_mask, "
                     "text_embedding or rerank (pipeline spellings too); inferred from the model "
                     "files when absent.", group="export")),
    ] = None  # fmt: skip
    tensor_input_names: Annotated[
        str,
        Field(min_length=1, **flag("Comma list of tokenizer outputs that become the INT64 graph "
                                   "inputs, in this order, e.g. input_ids,attention_mask "
                                   "(required).", group="export")),
    ]  # fmt: skip
    output: Annotated[
        str,
        Field(min_length=1, **flag("Triton model repository to write into (required).",
                                   group="export")),
    ]  # fmt: skip
    model_name: Annotated[
        str, Field(min_length=1, **flag("Model folder and config name.", group="export"))
    ] = "model"
    max_batch_size: Annotated[
        int, Field(gt=0, **flag("config.pbtxt max_batch_size.", group="export"))
    ] = 32
    opset: Annotated[
        int | None,
        Field(gt=0, **flag("ONNX opset (default: the exporter's own); below 18 uses the "
                           "TorchScript exporter.", group="export")),
    ] = None  # fmt: skip


def canonical_dtype(dtype: str, *, on_gpu: bool, task: Task) -> str:
    """Resolve ``--dtype`` to float16 / bfloat16 / float32 (docs/behaviour.md §1)."""
    normal = {"half": "float16", "float": "float32"}.get(dtype, dtype)
    if normal != "auto":
        return normal
    if not task.is_generative:
        return "float32"
    return "float16" if on_gpu else "float32"
