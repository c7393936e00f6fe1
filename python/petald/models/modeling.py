"""`DistributedModelForCausalLM`: a transformers `PreTrainedModel` + `GenerationMixin` whose
decoder blocks run on the swarm. It holds the family's local parts (embeddings, final norm, LM
head; `petald.models.families`) and `transformer_blocks`, a `RemoteSequential` over all blocks.
`forward` is the family's *ForCausalLM forward with the block loop replaced: stateless through
`transformer_blocks` (logits, loss, `output_hidden_states`), or one step of a `RemoteCache`
when given one (generate). `generate()` is transformers' own; it only gets a `RemoteCache` (one
inference session) instead of a `DynamicCache`. Built by `petald.models.auto.from_pretrained`.

Sessions across generate() calls (multi-turn chat):

    with model.inference_session(max_length=1024) as session:
        out = model.generate(ids, max_new_tokens=50)            # prefill + 50 steps
        ids = torch.cat([out, next_user_turn_ids], 1)           # the WHOLE conversation
        out = model.generate(ids, max_new_tokens=50)            # only the new tokens are sent

While a session is open, generate() uses it: given the whole sequence so far, it keeps the
longest prefix the servers hold and rolls back the rest (so a chat template that re-renders
earlier turns differently still gives exact results). A session has a fixed batch size, so beam
search inside one needs `batch=num_beams`; outside a session every generate() opens its own."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel

from petald.client import RemoteSequential, SwarmClient
from petald.hf_internals import GENERATION_CACHE_NAME, RemoteCacheHooks, causal_lm_output, pop_cache
from petald.models.cache import RemoteCache
from petald.models.families import Layout, layout_for
from petald.models.finetune import FineTuningMixin


class DistributedModelForCausalLM(
    RemoteCacheHooks, FineTuningMixin, PreTrainedModel, GenerationMixin
):
    config_class = PretrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    layout: Layout | None = None  # set by the family classes; None: taken from the config

    def __init__(
        self,
        config: PretrainedConfig,
        transformer_blocks: RemoteSequential,
        local_modules: dict[str, nn.Module],
    ) -> None:
        """`local_modules`: the family's modules by their *ForCausalLM path (e.g.
        `model.norm`), built on the meta device; `load_local_state` gives them weights."""
        super().__init__(config)
        self.layout = self.layout or layout_for(config)
        self.base_model_prefix = self.layout.norm.split(".")[0]
        for path in self.layout.paths:
            parent: nn.Module = self
            *parents, leaf = path.split(".")
            for name in parents:
                if not hasattr(parent, name):
                    parent.add_module(name, nn.Module())
                parent = getattr(parent, name)
            parent.add_module(leaf, local_modules[path])
        self.transformer_blocks = transformer_blocks
        self._sessions: list[RemoteCache] = []  # open inference_session()s, innermost last
        self._client: SwarmClient | None = None  # closed with the model when we started it
        self.post_init()

    @classmethod
    def from_pretrained(cls, source: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The model at `source` with its blocks on the swarm: `petald.models.auto.load`."""
        from petald.models.auto import load  # auto builds on this module

        return load(cls, source, *args, **kwargs)

    def _check_and_adjust_experts_implementation(self, experts_implementation: Any) -> Any:
        return experts_implementation  # MoE experts live in the blocks: the servers' choice

    def load_local_state(
        self, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        """Assigns the checkpoint's tensors (by state-dict name) to the meta-built modules, in
        `dtype` on `device`; ties the LM head to the embeddings where the config
        says so (the checkpoint then has no LM head of its own)."""
        embed_weight = f"{self.layout.embeddings[0]}.weight"
        head_weight = f"{self.layout.lm_head}.weight"
        tie = getattr(self.config.get_text_config(), "tie_word_embeddings", False)
        if head_weight not in state and tie and embed_weight in state:
            state = {**state, head_weight: state[embed_weight]}
        missing = [n for n in self.state_dict() if n not in state]
        if missing:
            raise ValueError(f"the checkpoint lacks {missing}: is it a {self.layout.family}?")
        self.load_state_dict(
            {k: v.to(device=device, dtype=dtype) for k, v in state.items()},
            strict=False,
            assign=True,
        )
        if tie:
            self.lm_head_module.weight = self.get_submodule(self.layout.embeddings[0]).weight
        self._rebuild_buffers(device, dtype)
        self.eval()
        self.requires_grad_(False)  # frozen by default; fine-tuning (issue 6) opts in

    def _rebuild_buffers(self, device: torch.device, dtype: torch.dtype) -> None:
        """Non-persistent buffers are in no checkpoint and were built on the meta device. The
        one kind the local parts have is a constant its module also keeps as a float
        (`scalar_<name>`, e.g. Gemma's embedding scale); anything else is unsupported."""
        for path, module in self.named_modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if not buffer.is_meta:
                    continue
                value = getattr(module, f"scalar_{name}", None)
                if not isinstance(value, float | int):
                    raise ValueError(f"unsupported architecture: {path}.{name} cannot be rebuilt")
                module.register_buffer(
                    name, torch.tensor(value, device=device, dtype=dtype), persistent=False
                )

    @property
    def lm_head_module(self) -> nn.Module:
        return self.get_submodule(self.layout.lm_head)

    def get_input_embeddings(self) -> nn.Module:
        return self.get_submodule(self.layout.embeddings[0])

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head_module

    # ---- sessions ----------------------------------------------------------------------------

    def inference_session(self, max_length: int, batch: int = 1) -> RemoteCache:
        """One inference session (a KV cache on the servers) for up to `max_length` tokens per
        sequence; generate() calls continue it until it is closed (use `with`). It can also
        be passed as `past_key_values` to `generate()` or to the model itself."""
        session = self._new_cache(max_length=max_length, batch=batch, on_close=self._forget)
        self._sessions.append(session)
        return session

    def _forget(self, session: RemoteCache) -> None:
        if session in self._sessions:
            self._sessions.remove(session)

    @property
    def active_session(self) -> RemoteCache | None:
        return self._sessions[-1] if self._sessions else None

    def close(self) -> None:
        """Ends open sessions, and leaves the swarm if from_pretrained joined it."""
        for session in list(self._sessions):
            session.close()
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- generation ------------------------------------------------------------------------

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """transformers' generate(), with the KV cache on the servers: the open
        `inference_session` if any (continued, see the module doc), else a session opened
        for this call and closed after it."""
        cache = pop_cache(kwargs)  # `cache` or `past_key_values`, as the caller spelled it
        owned = None
        if cache is None and kwargs.get("use_cache", True):
            cache = self.active_session
            if cache is None:
                owned = cache = self._new_cache()
        if cache is not None:
            kwargs[GENERATION_CACHE_NAME] = cache  # what this transformers' generate() reads
        if isinstance(cache, RemoteCache):
            mask = kwargs.get("attention_mask")
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            # A mask longer than the ids means "only the new tokens", transformers' other way
            # of continuing a cache: then nothing is compared.
            if ids is not None and (mask is None or mask.shape[-1] == ids.shape[-1]):
                cache.sync_prefix(ids)
        try:
            return super().generate(inputs, *args, **kwargs)
        finally:
            if owned is not None:
                owned.close()

    def check_generation_cache(self, cache: Any, max_cache_length: int) -> None:
        """generate() is about to run with `cache` (RemoteCacheHooks): only a RemoteCache will
        do, and it must hold `max_cache_length` tokens."""
        if cache is not None and not isinstance(cache, RemoteCache):
            raise ValueError(
                f"{type(cache).__name__}: the KV cache of a distributed model is on the servers; "
                "pass a model.inference_session(...) or no past_key_values"
            )
        if isinstance(cache, RemoteCache) and cache.max_length is None:
            cache.max_length = max_cache_length  # the session this generate() opened
        elif isinstance(cache, RemoteCache) and max_cache_length > cache.max_length:
            raise ValueError(
                f"this inference session holds {cache.max_length} tokens per sequence; this "
                f"generate() may need {max_cache_length}: lower max_new_tokens or open the "
                "session with a larger max_length"
            )

    # ---- forward ---------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: RemoteCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: RemoteCache | None = None,
        **kwargs: Any,
    ) -> Any:
        """As the family's *ForCausalLM.forward. `attention_mask` (batch, seq) with 1 for real
        tokens (left padding); `position_ids` default to 0..seq-1 like transformers'. With a
        `RemoteCache` in `cache` (transformers >= 5.24 spelling) or `past_key_values`, this is
        one step of its session."""
        past_key_values = pop_cache(dict(cache=cache, past_key_values=past_key_values))
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if output_attentions:
            raise ValueError("attention weights stay on the servers: output_attentions=False")
        if past_key_values is not None and not isinstance(past_key_values, RemoteCache):
            raise ValueError("past_key_values must be a RemoteCache (model.inference_session)")
        if inputs_embeds is None:
            inputs_embeds = self.layout.embed(self, input_ids)
        hidden_states: tuple[torch.Tensor, ...] | None = None
        if past_key_values is not None and use_cache is not False:
            if output_hidden_states:
                raise ValueError("an inference step returns the last block's output only")
            out = past_key_values.step(inputs_embeds, attention_mask, position_ids, input_ids)
        else:
            out, hidden_states = self._run_blocks(
                inputs_embeds, attention_mask, position_ids, bool(output_hidden_states)
            )
        out = self.get_submodule(self.layout.norm)(out)
        if hidden_states is not None:  # as transformers: the last one with the final norm
            hidden_states = (*hidden_states[:-1], out)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head_module(out[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.get_text_config().vocab_size)
        return causal_lm_output(
            loss=loss, logits=logits, cache=past_key_values, hidden_states=hidden_states
        )

    def _new_cache(self, **kwargs: Any) -> RemoteCache:
        """A cache over the remote blocks; with fine-tuning on (petald.models.finetune), one
        that carries the prompts and adapters to the servers."""
        tuning = self.remote_tuning
        if tuning is not None:
            return tuning.new_cache(self.transformer_blocks, **kwargs)
        return RemoteCache(self.transformer_blocks, **kwargs)

    def _run_blocks(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor | None,
        every: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Stateless pass; with `every`, also (embeddings, block 0 output, ..., last output)."""
        if self.remote_tuning is not None:  # differentiable, with prompts/adapters (issue 6)
            return self.remote_tuning.run_blocks(self.transformer_blocks, x, mask, positions, every)
        wire_mask = None if mask is None else mask.to("cpu")
        wire_positions = None if positions is None else positions.to("cpu")
        blocks = self.transformer_blocks
        if not every:
            out = blocks(x.to("cpu"), wire_mask, wire_positions)
            return out.to(x.device, x.dtype), None
        stacked = blocks.forward(x.to("cpu"), wire_mask, wire_positions, all_hidden=True)
        stacked = stacked.to(x.device, x.dtype)  # (blocks, batch, seq, hidden)
        return stacked[-1], (x, *stacked.unbind(0))
