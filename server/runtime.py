"""Assembles the pieces from Settings: model -> registry -> engine -> engine thread."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from server.config import EngineConfig, Settings
from server.engine.async_engine import AsyncEngine
from server.engine.backends import select_backends
from server.engine.engine import LLMEngine
from server.engine.grammar import GrammarCompiler
from server.engine.sequence import SamplingParams, Sequence
from server.errors import AdapterNotFoundError, MixError, RequestError
from server.lora import mixing, startup_modules
from server.lora.combination import CAT, Combination
from server.lora.mixing import MixPart
from server.lora.registry import AdapterRecord, AdapterRegistry
from server.lora.store import AdapterStore
from server.model import generation_defaults
from server.model.chat_template import load_chat_template
from server.model.loader import BaseModel, load_base, resolve_device, resolve_dtype
from server.model.source import resolve_model

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    base: BaseModel
    registry: AdapterRegistry
    engine: LLMEngine
    async_engine: AsyncEngine
    # the checkpoint's sampling defaults (generation_defaults.py): for fields a request leaves out
    generation_defaults: dict[str, float] = field(default_factory=dict)
    # --served-model-name's names after the first: requests may send them for the base model,
    # which answers, lists its adapters under and counts in metrics by the first (vLLM's reading)
    aliases: tuple[str, ...] = ()

    @cached_property
    def grammar(self) -> GrammarCompiler:
        """Structured output's compiler (it indexes the vocabulary once: built at warm-up)."""
        return GrammarCompiler(
            self.base.tokenizer, self.base.model.config.vocab_size, eos_token_ids=self.base.eos_token_ids
        )

    @property
    def model_id(self) -> str:
        return self.base.model_id

    @property
    def base_names(self) -> tuple[str, ...]:
        return (self.base.model_id, *self.aliases)

    def is_base(self, name: str) -> bool:
        return name in self.base_names

    def resolve(
        self,
        model: str,
        may_use: Callable[[str], bool] = lambda _: True,
        adapters: list[MixPart] | None = None,
        combination: Combination | None = None,
    ) -> AdapterRecord | None:
        """The `model` field of a request: the base id (None), an adapter's current version, or a
        mix of adapters (mixing.py) spelled in `model` or given as the `adapters` field (then
        `model` is the base id). An adapter the caller's key may not use is unknown to it (the same
        404, before any lookup: the store is not searched for another tenant's name); in a mix,
        every part must be usable. `combination` (the body field) applies to a mix only."""
        if combination is not None and adapters is None and not mixing.is_spelling(model):
            raise MixError(
                "`combination` applies to a mix: give `adapters`, or spell the mix in `model`", "combination"
            )
        if adapters is not None:
            if not self.is_base(model):
                if mixing.is_spelling(model):
                    raise MixError(
                        "give a mix either in `adapters` or spelled in `model`, not both", "adapters"
                    )
                raise MixError(
                    f"with `adapters`, `model` must be the base model's id {self.base.model_id!r}", "model"
                )
            parts, param = mixing.check_parts(adapters, "adapters"), "adapters"
        elif self.is_base(model):
            return None
        elif mixing.is_spelling(model):
            parts, param = mixing.parse(model), "model"
        else:
            return self._adapter(model, may_use, "model")
        records = [(self._adapter(p.name, may_use, param), p.weight) for p in parts]
        return mixing.mix_record(records, self.registry.max_rank, param, combination or CAT)

    def _adapter(self, name: str, may_use: Callable[[str], bool], param: str) -> AdapterRecord:
        if self.is_base(name):  # only a mix's part gets here with the base's id
            raise MixError(f"the base model {name!r} cannot be part of a mix: name adapters only", param)
        if not may_use(name):
            raise AdapterNotFoundError(name, param)
        try:
            return self.registry.resolve(name)
        except AdapterNotFoundError:
            raise AdapterNotFoundError(name, param) from None

    def text_prompt(self, text: str) -> list[int]:
        return [int(i) for i in self.base.tokenizer.encode(text)]

    def sequence(
        self, request_id: str, prompt: list[int], params: SamplingParams, adapter: AdapterRecord | None
    ) -> Sequence:
        limit = self.base.max_model_len
        virtual = adapter.virtual_tokens if adapter is not None else 0
        if len(prompt) + virtual + params.max_tokens > limit:
            prefix = f"{virtual} virtual tokens of the adapter, " if virtual else ""
            raise RequestError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt) + virtual + params.max_tokens} tokens ({prefix}{len(prompt)} in the messages, "
                f"{params.max_tokens} in the completion). "
                "Please reduce the length of the messages or completion.",
                "messages",
            )
        return Sequence(request_id, prompt, params, adapter=adapter, eos_token_ids=self.base.eos_token_ids)


def build_runtime(settings: Settings) -> Runtime:
    path, model_id = resolve_model(settings.model, settings.cache_dir)
    names = settings.served_model_name or [model_id]
    model_id = names[0]
    # checked before the model loads: a bad template stops the start in a moment
    template = None if settings.chat_template is None else load_chat_template(settings.chat_template)
    defaults = generation_defaults.resolve(settings.generation_config, path)
    modules = startup_modules.check(settings.lora_modules, names)
    if defaults:
        log.info("sampling defaults from the checkpoint's generation config: %s", defaults)
    device = resolve_device(settings.device)
    backends = select_backends(
        device,
        lora=settings.lora_backend,
        lora_dtype=settings.lora_dtype,
        compute_dtype=resolve_dtype(settings.dtype, device),
        attention=settings.attention_backend,
        batch_invariant=settings.batch_invariant,
        cuda_graphs=settings.cuda_graphs,
        block_size=settings.block_size,
    )
    base = load_base(
        path,
        model_id,
        quantization=settings.quantization,
        device=settings.device,
        dtype=settings.dtype,
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        max_model_len=settings.max_model_len,
        base_gemm=backends.base_gemm,
        lora_backend=backends.lora,
        lora_dtype=backends.lora_dtype,
        dequant=backends.dequant,
    )
    if template is not None:  # before anything reads the tokenizer's template
        base.tokenizer.chat_template = template
        log.info("chat template: --chat-template, in place of the tokenizer's")
    elif not getattr(base.tokenizer, "chat_template", None):
        log.warning(
            "the tokenizer has no chat template: chat requests get a 400 until --chat-template is given"
        )
    config = EngineConfig(
        max_loras=settings.max_loras,
        max_cpu_loras=settings.max_cpu_loras,
        max_lora_rank=settings.max_lora_rank,
        max_num_seqs=settings.max_num_seqs,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        prefill_chunk_tokens=settings.prefill_chunk_tokens,
        attention_backend=backends.attention,
        cuda_graphs=backends.cuda_graphs,
        max_model_len=base.max_model_len,
        kv_cache_tokens=max(settings.kv_cache_tokens, base.max_model_len),
        block_size=settings.block_size,
        max_queue=settings.max_queue,
        max_saved_module_bytes=settings.max_saved_module_bytes,
        max_cpu_lora_bytes=settings.max_cpu_lora_bytes,
    )
    registry = AdapterRegistry(
        base.linear_shapes,
        settings.max_lora_rank,
        AdapterStore(settings.store_dir),
        saveable=base.saveable,
        max_saved_bytes=settings.max_saved_module_bytes,
        dims=base.dims,
        factor_dtype=base.lora_dtype,
    )
    restored = registry.restore()
    log.info("%d adapters restored from %s", len(restored), settings.store_dir)
    if settings.import_adapters is not None and settings.import_adapters.is_dir():
        registry.scan(settings.import_adapters)
    if modules:
        named = startup_modules.register(registry, modules)
        log.info("--lora-modules: %s", ", ".join(f"{r.name} ({r.version[:12]})" for r in named))
    for shadowed in sorted({r.name for r in registry.records()} & set(names)):  # the base resolves first
        log.warning("the adapter named %r is shadowed by the base model's id; rename one of them", shadowed)
    engine = LLMEngine(base, registry, config)
    async_engine = AsyncEngine(engine, config.max_queue)
    return Runtime(settings, base, registry, engine, async_engine, defaults, tuple(names[1:]))
