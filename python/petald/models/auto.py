"""Loading a distributed model: `AutoDistributedModelForCausalLM.from_pretrained(MODEL, ...)`
and the family classes behind it (`DistributedLlamaForCausalLM`, ...). MODEL is what servers
were started with (a model directory, a .gguf file or a Hub id). The config is read, the whole
model is built on the meta device (no memory) only to take the family's own embedding, norm and
LM head modules out of it, and just their tensors are read from the checkpoint
(`petald.models.checkpoint`); the decoder blocks become a `RemoteSequential` over the swarm.

    model = AutoDistributedModelForCausalLM.from_pretrained(
        "SmolLM2-135M-Instruct.Q4_1.gguf", initial_peers=["/ip4/.../p2p/Qm..."])
    out = model.generate(ids, max_new_tokens=20)
    model.close()  # or `with model:`; leaves the swarm"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from petald.client import ClientConfig, RemoteSequential, SwarmClient
from petald.models import checkpoint
from petald.models.families import LAYOUTS, layout_for
from petald.models.modeling import DistributedModelForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(
    dtype: str | torch.dtype, config_dtype: object, source: checkpoint.Source
) -> torch.dtype:
    """ "auto": the checkpoint's declared dtype (float32 for GGUF, which is dequantized)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        declared = getattr(torch, config_dtype, None) if isinstance(config_dtype, str) else None
        declared = config_dtype if isinstance(config_dtype, torch.dtype) else declared
        if source.kind == "gguf" or declared not in DTYPES.values():
            return torch.float32
        assert isinstance(declared, torch.dtype)
        return declared
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)} or a torch.dtype")


def load(
    cls: type[DistributedModelForCausalLM],
    source: str | Path,
    *,
    initial_peers: Sequence[str] = (),
    client: SwarmClient | None = None,
    client_config: ClientConfig | None = None,
    model_name: str | None = None,
    dtype: str | torch.dtype = "auto",
    torch_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    wait_timeout: float = 60.0,
    tuning_mode: str | None = None,
    pre_seq_len: int = 0,
    active_adapter: str | None = None,
) -> DistributedModelForCausalLM:
    """The model at `source` with its blocks on the swarm. Joins the swarm through
    `initial_peers` (or `client_config`) unless an already started `client` is given, and waits
    up to `wait_timeout` s until servers announce every block of `model_name` (default: the
    name servers announce `source` under). `dtype`/`torch_dtype` and `device` are those of the
    local parts; hidden states cross the wire on the CPU in that dtype. Fine-tuning
    (petald.models.finetune): `tuning_mode` "ptune"/"deep_ptune" with `pre_seq_len` prompt
    tokens; `active_adapter`, a server adapter's name."""
    where = checkpoint.locate(source)
    config = checkpoint.read_config(where)
    layout_for(config)  # an unsupported architecture fails before joining the swarm
    name = model_name or checkpoint.model_name(source)
    n_blocks = config.get_text_config().num_hidden_layers
    owned = None
    if client is None:
        owned = client = SwarmClient(initial_peers, config=client_config).start()
    try:
        client.wait_for_blocks(name, n_blocks, timeout=wait_timeout)
        blocks = RemoteSequential(client, name, n_blocks)
        model = build(cls, source, blocks, dtype=torch_dtype or dtype, device=device)
        model.setup_tuning(tuning_mode, pre_seq_len, active_adapter)
    except BaseException:
        if owned is not None:
            owned.close()
        raise
    model._client = owned
    return model


def build(
    cls: type[DistributedModelForCausalLM],
    source: str | Path,
    transformer_blocks: RemoteSequential,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
) -> DistributedModelForCausalLM:
    """The model around `transformer_blocks` (anything with RemoteSequential's forward and
    inference_session: tests pass local blocks), its local parts read from `source`."""
    where = checkpoint.locate(source)
    config = checkpoint.read_config(where)
    layout = layout_for(config)
    if cls.layout is None:  # the generic class: the family's own, for isinstance checks
        cls = FAMILY_CLASSES[config.model_type]
    elif cls.layout != layout:
        raise ValueError(
            f"{source} is a {config.model_type!r} model, not a {cls.layout.family}: "
            "load it with AutoDistributedModelForCausalLM"
        )
    torch_dtype = _dtype(dtype, getattr(config, "dtype", None), where)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    local = {path: meta.get_submodule(path) for path in layout.paths}
    del meta  # the meta decoder layers go; only the local parts' modules are kept
    model = cls(config, transformer_blocks, local)
    names = list(model.state_dict())
    state = checkpoint.read_local_tensors(where, names, model.base_model_prefix, config)
    model.load_local_state(state, torch.device(device), torch_dtype)
    model.generation_config = _generation_config(where, config)
    return model


def _generation_config(where: checkpoint.Source, config: object) -> GenerationConfig:
    """generation_config.json where the checkpoint has one, else the config's defaults, as
    transformers' from_pretrained does (so generate() behaves as the local model's)."""
    if where.kind != "gguf":
        directory = checkpoint.config_dir(where)
        if (directory / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(str(directory))
    return GenerationConfig.from_model_config(config)


def _family_class(model_type: str) -> type[DistributedModelForCausalLM]:
    layout = LAYOUTS[model_type]
    name = f"Distributed{layout.family}ForCausalLM"
    doc = f"{layout.family} with its decoder blocks on the swarm (see DistributedModelForCausalLM)."
    attrs = {"layout": layout, "__doc__": doc, "__module__": __name__}
    return type(name, (DistributedModelForCausalLM,), attrs)


FAMILY_CLASSES = {model_type: _family_class(model_type) for model_type in LAYOUTS}


class AutoDistributedModelForCausalLM:
    """Picks the family class from the checkpoint's config, as AutoModelForCausalLM does."""

    @classmethod
    def from_pretrained(cls, source: str | Path, **kwargs: object) -> DistributedModelForCausalLM:
        """See `petald.models.auto.load` for the arguments."""
        return load(DistributedModelForCausalLM, source, **kwargs)  # type: ignore[arg-type]
