"""`DistributedModelForCausalLM`: the base of `Distributed<Family>ForCausalLM` classes, each a
subclass of the family's own transformers class (`DistributedLlamaForCausalLM` is a
`LlamaForCausalLM`) whose decoder layers are proxies to the swarm
(`petald.models.remote_layers`): everything else in the model is the family's own code, with its
own weights (embeddings, final norm, LM head, whatever else it keeps outside its layers), so any
decoder family that servers can run works here without a table of families. `transformer_blocks`
is a `RemoteSequential` over all blocks (the research path: `model.transformer_blocks[3:7]`).
`forward` is the family's forward: stateless through `transformer_blocks` (logits, loss,
`output_hidden_states`), or one step of a `RemoteCache` when given one (generate).
`generate()` is transformers' own; it only gets a `RemoteCache` (one inference session) instead
of a `DynamicCache`. Built by `petald.models.auto` (`from_pretrained`).

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

import inspect
from contextlib import nullcontext
from functools import cache
from typing import Any

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel

from petald.client import RemoteSequential, SwarmClient, remote_forward
from petald.hf_internals import (
    GENERATION_CACHE_NAME,
    RemoteCacheHooks,
    cache_keyword,
    pop_cache,
    rebuild_non_persistent_buffers,
    remote_attention,
)
from petald.models.cache import RemoteCache
from petald.models.finetune import FineTuningMixin
from petald.models.remote_layers import RemoteLayers

# Keywords a distributed forward handles itself rather than passing to the family's forward:
# the family runs without a local cache, and attention masks and positions reach the blocks.
_OWN_KWARGS = frozenset({"cache_position", "output_attentions", "output_router_logits"})


class DistributedModelForCausalLM(
    RemoteCacheHooks, FineTuningMixin, PreTrainedModel, GenerationMixin
):
    """Listed first among a family class's bases (see `petald.models.auto.distributed_class`);
    `attach` turns the family model, built on the meta device, into a distributed one."""

    transformer_blocks: RemoteSequential
    remote_layers: RemoteLayers
    head_name = "causal LM"  # the head this generic class takes from the family

    @staticmethod
    def auto_mapping() -> Any:
        """config class -> the family's class for this head, as the Auto classes map it."""
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        return MODEL_FOR_CAUSAL_LM_MAPPING

    @classmethod
    def from_pretrained(cls, source: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """The model at `source` with its blocks on the swarm: `petald.models.auto.load`."""
        from petald.models.auto import load  # auto builds on this module

        return load(cls, source, *args, **kwargs)

    @classmethod
    def build_local(
        cls, config: PretrainedConfig, transformer_blocks: RemoteSequential
    ) -> DistributedModelForCausalLM:
        """The family model on the meta device, its decoder layers proxies to
        `transformer_blocks`; `load_local_state` gives the rest weights."""
        from petald.server.families import family_for  # the servers' check of the layers

        with torch.device("meta"):
            model = cls(config)
        model.attach(transformer_blocks, family_for(model).layers_path)
        return model

    def load_local_state(
        self, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
    ) -> None:
        """Assigns the checkpoint's tensors (by state-dict name) to the meta-built modules, in
        `dtype` (floating-point ones) on `device`, and ties the LM head to the embeddings
        where the family does (the checkpoint then need not have a head of its own).
        Non-persistent buffers (rotary frequencies, embedding scales) are in no checkpoint:
        the family's own initialisation computes them, as transformers' from_pretrained does."""
        rebuild_non_persistent_buffers(self, device)
        names = list(self.state_dict())
        tied = self._tied_head_name()
        missing = [n for n in names if n not in state and n != tied]
        if missing:
            raise ValueError(
                f"the checkpoint lacks {missing}: is it a {self.config.model_type} model?"
            )
        self.load_state_dict(
            {
                k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
                for k, v in state.items()
                if k in names
            },
            strict=False,
            assign=True,
        )
        if tied is not None:
            self.tie_weights()
        if stale := [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]:
            raise ValueError(f"unsupported architecture: {stale} cannot be loaded or rebuilt")
        self.eval()
        self.requires_grad_(False)  # frozen by default; fine-tuning (issue 6) opts in

    def _tied_head_name(self) -> str | None:
        """The LM head weight's name where the family ties it to the input embeddings."""
        text = self.config.get_text_config()
        head = self.get_output_embeddings()
        if not getattr(text, "tie_word_embeddings", False) or head is None:
            return None
        for name, module in self.named_modules():
            if module is head:
                return f"{name}.weight"
        return None

    def attach(self, transformer_blocks: RemoteSequential, layers_path: str) -> None:
        """Replaces the decoder layers at `layers_path` with proxies to `transformer_blocks`."""
        # The module whose forward loops over the layers (`model` of `model.layers`): its output
        # is the last hidden state (after the final norm).
        owner = self.get_submodule(layers_path.rpartition(".")[0])
        self.remote_layers = RemoteLayers.install(self, layers_path, owner)
        # No masks built for layers that are not here, where the family's forward runs without
        # them (MPT's does not: it keeps its own attention setting).
        with remote_attention(self.config):
            self._remote_attention = self.remote_layers.probe(owner)
        if not self._remote_attention:
            self.remote_layers.probe(owner)
        self.transformer_blocks = transformer_blocks
        self._sessions: list[RemoteCache] = []  # open inference_session()s, innermost last
        self._client: SwarmClient | None = None  # closed with the model when we started it
        self._final_hidden: list[torch.Tensor] = []  # the base model's output, when asked
        owner.register_forward_hook(self._keep_final_hidden)
        # MoE routers run on the servers: their logits (and an auxiliary loss) are not here.
        for config in {id(c): c for c in (self.config, self.config.get_text_config())}.values():
            if getattr(config, "output_router_logits", False):
                config.output_router_logits = False

    def _keep_final_hidden(self, module: Any, args: Any, output: Any) -> None:
        if self._final_hidden:  # armed by a forward that returns hidden states
            self._final_hidden[0] = output[0]  # last_hidden_state: after the final norm

    def _check_and_adjust_experts_implementation(self, experts_implementation: Any) -> Any:
        return experts_implementation  # MoE experts live in the blocks: the servers' choice

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
        self._draft_overshoot = _draft_overshoot(kwargs, self.generation_config)
        if isinstance(cache, RemoteCache):
            mask = kwargs.get("attention_mask")
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            # A mask longer than the ids means "only the new tokens", transformers' other way
            # of continuing a cache: then nothing is compared.
            if ids is not None and (mask is None or mask.shape[-1] == ids.shape[-1]):
                cache.sync_prefix(ids)
                if _drafts(kwargs) and cache.position:
                    cache.replay_held()  # assisted generation feeds the whole input first
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
        # Prompt-lookup drafts are not cut at generate()'s max_length: the verification step
        # may hold that many tokens more (transformers drops them after).
        max_cache_length += getattr(self, "_draft_overshoot", 0)
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
        cache: RemoteCache | None = None,
        **kwargs: Any,
    ) -> Any:
        """The family's forward. `attention_mask` (batch, seq) with 1 for real tokens (left
        padding); `position_ids` default to 0..seq-1 after what a cache holds, like
        transformers'. With a `RemoteCache` in `cache` (transformers >= 5.24 spelling) or
        `past_key_values`, this is one step of its session."""
        past_key_values = pop_cache(dict(cache=cache, past_key_values=past_key_values))
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if output_attentions:
            raise ValueError("attention weights stay on the servers: output_attentions=False")
        if past_key_values is not None and not isinstance(past_key_values, RemoteCache):
            raise ValueError("past_key_values must be a RemoteCache (model.inference_session)")
        step = past_key_values is not None and use_cache is not False
        every = bool(output_hidden_states)
        if step and every:
            raise ValueError("an inference step returns the last block's output only")

        def run(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
            if step:
                assert past_key_values is not None
                return past_key_values.step(x, attention_mask, position_ids, input_ids), None
            last, hidden = self._run_blocks(x, attention_mask, position_ids, every)
            return last, (hidden[1:] if hidden is not None else None)

        ref = input_ids if input_ids is not None else inputs_embeds
        assert ref is not None
        accepted, cache_arg = _signature(type(self))
        # The family's forward gets what the caller gave, and in a step our RemoteCache as its
        # cache: it then computes positions (learned position embeddings, positions from the
        # padding mask) from what the session holds, exactly as with a local cache; it never
        # writes to it (its layers are the proxies) and builds no masks (remote attention).
        family_kwargs = dict(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=step,
            **{cache_arg: past_key_values if step else None},
            **{k: v for k, v in kwargs.items() if k not in _OWN_KWARGS},
        )
        if accepted is not None:
            family_kwargs = {k: v for k, v in family_kwargs.items() if k in accepted}
        self._final_hidden[:] = [ref] if every else []
        no_masks = remote_attention(self.config) if self._remote_attention else nullcontext()
        try:
            with self.remote_layers.call(run, every) as call, no_masks:
                out = super().forward(**family_kwargs)
            final = self._final_hidden[0] if every else None
        finally:
            self._final_hidden.clear()
        if every:
            assert call.outputs is not None and call.block_input is not None
            # As transformers: the embeddings, each block's output, the last one normed.
            out["hidden_states"] = (call.block_input, *call.outputs[:-1], final)
        if step:
            out[GENERATION_CACHE_NAME] = past_key_values
        return out

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
        if not every and torch.is_grad_enabled() and x.requires_grad:
            # Something before the blocks trains (e.g. unfrozen embeddings): the servers'
            # backward gives the gradient of the blocks' input.
            out = remote_forward(blocks, x.to("cpu"), wire_mask, wire_positions)
            return out.to(x.device, x.dtype), None
        if not every:
            out = blocks(x.to("cpu"), wire_mask, wire_positions)
            return out.to(x.device, x.dtype), None
        stacked = blocks.forward(x.to("cpu"), wire_mask, wire_positions, all_hidden=True)
        stacked = stacked.to(x.device, x.dtype)  # (blocks, batch, seq, hidden)
        return stacked[-1], (x, *stacked.unbind(0))


@cache
def _signature(cls: type) -> tuple[frozenset[str] | None, str]:
    """The keywords the family's forward takes (None: any, through **kwargs), and the one it
    takes its cache under."""
    family_forward = super(DistributedModelForCausalLM, cls).forward  # type: ignore[misc]
    params = inspect.signature(family_forward).parameters
    cache_arg = cache_keyword(family_forward) or GENERATION_CACHE_NAME
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None, cache_arg
    return frozenset(params), cache_arg


def _drafts(kwargs: dict[str, Any]) -> bool:
    """Whether this generate() is assisted (speculative) decoding."""
    return bool(
        kwargs.get("prompt_lookup_num_tokens")
        or kwargs.get("assistant_model") is not None
        or getattr(kwargs.get("generation_config"), "prompt_lookup_num_tokens", None)
        or getattr(kwargs.get("generation_config"), "assistant_model", None) is not None
    )


def _draft_overshoot(kwargs: dict[str, Any], default: Any) -> int:
    """Tokens a prompt-lookup draft may run past generate()'s max_length (its draft length;
    an assistant model's drafts stop at max_length)."""
    config = kwargs.get("generation_config") or default
    n = kwargs.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None))
    return int(n) if isinstance(n, int) and n > 0 else 0
