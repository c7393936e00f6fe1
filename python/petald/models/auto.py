"""Loading a distributed model: `AutoDistributedModelForCausalLM.from_pretrained(MODEL, ...)`
and the family classes behind it (`DistributedLlamaForCausalLM`, ...). MODEL is what servers
were started with (a model directory, a .gguf file or a Hub id). The config is read, the
family's own model class is built on the meta device (no memory) as a `Distributed<Family>...`
subclass (`distributed_class`), its decoder layers become proxies to a `RemoteSequential` over
the swarm, and only the tensors it keeps outside its layers are read from the checkpoint
(`petald.models.checkpoint`). Families whose blocks servers cannot run are refused with the
reason before the client joins a swarm.

    model = AutoDistributedModelForCausalLM.from_pretrained(
        "SmolLM2-135M-Instruct.Q4_1.gguf", initial_peers=["/ip4/.../p2p/Qm..."])
    out = model.generate(ids, max_new_tokens=20)
    model.close()  # or `with model:`; leaves the swarm"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PretrainedConfig

from petald.client import ClientConfig, RemoteSequential, SwarmClient
from petald.hf_internals import convert_block_tensors
from petald.models import checkpoint
from petald.models.families import distributed_class, served_layers
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
    config_updates: dict[str, object] | None = None,
) -> DistributedModelForCausalLM:
    """The model at `source` with its blocks on the swarm. Joins the swarm through
    `initial_peers` (or `client_config`) unless an already started `client` is given, and waits
    up to `wait_timeout` s until servers announce every block of `model_name` (default: the
    name servers announce `source` under). `dtype`/`torch_dtype` and `device` are those of the
    local parts; hidden states cross the wire on the CPU in that dtype. Fine-tuning
    (petald.models.finetune): `tuning_mode` "ptune"/"deep_ptune" with `pre_seq_len` prompt
    tokens; `active_adapter`, a server adapter's name. `config_updates`: set on the config
    (e.g. a classifier's num_labels). `cls` is the generic class (any family) or a family's."""
    where = checkpoint.locate(source)
    config = checkpoint.read_config(where)
    distributed_class(config, cls)  # a family without this head fails before joining
    served_layers(config)  # a family servers cannot run fails before joining the swarm
    name = model_name or checkpoint.model_name(source)
    n_blocks = config.get_text_config().num_hidden_layers
    owned = None
    if client is None:
        owned = client = SwarmClient(initial_peers, config=client_config).start()
    try:
        client.wait_for_blocks(name, n_blocks, timeout=wait_timeout)
        blocks = RemoteSequential(client, name, n_blocks)
        model = build(
            cls,
            source,
            blocks,
            dtype=torch_dtype or dtype,
            device=device,
            config_updates=config_updates,
        )
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
    config_updates: dict[str, object] | None = None,
) -> DistributedModelForCausalLM:
    """The model around `transformer_blocks` (anything with RemoteSequential's forward and
    inference_session: tests pass local blocks), its local parts read from `source`. `cls` is
    `DistributedModelForCausalLM` (any family) or a family's class (that family only)."""
    where = checkpoint.locate(source)
    config = checkpoint.read_config(where)
    for key, value in (config_updates or {}).items():
        setattr(config, key, value)
    family_cls = distributed_class(config, cls)
    if not issubclass(family_cls, cls):
        raise ValueError(
            f"{source} is a {config.model_type!r} model, not a {cls.__name__}: "
            "load it with AutoDistributedModelForCausalLM"
        )
    torch_dtype = _dtype(dtype, getattr(config, "dtype", None), where)
    model = family_cls.build_local(config, transformer_blocks)
    names = list(model.state_dict())
    state = checkpoint.read_local_tensors(
        where,
        names,
        model.base_model_prefix,
        config,
        convert=lambda raw: convert_block_tensors(_plain(family_cls, config), raw),
    )
    model.load_local_state(state, torch.device(device), torch_dtype)
    model.generation_config = _generation_config(where, config)
    return model


def _plain(family_cls: type[DistributedModelForCausalLM], config: PretrainedConfig) -> Any:
    """The family's own model on the meta device: transformers finds its checkpoint renamings
    by its class name."""
    with torch.device("meta"):
        return family_cls.family(config)  # type: ignore[attr-defined]


def _generation_config(where: checkpoint.Source, config: object) -> GenerationConfig:
    """generation_config.json where the checkpoint has one, else the config's defaults, as
    transformers' from_pretrained does (so generate() behaves as the local model's)."""
    if where.kind != "gguf":
        directory = checkpoint.config_dir(where)
        if (directory / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(str(directory))
    return GenerationConfig.from_model_config(config)


class AutoDistributedModelForCausalLM:
    """Picks the family class from the checkpoint's config, as AutoModelForCausalLM does."""

    @classmethod
    def from_pretrained(cls, source: str | Path, **kwargs: object) -> DistributedModelForCausalLM:
        """See `petald.models.auto.load` for the arguments."""
        return load(DistributedModelForCausalLM, source, **kwargs)  # type: ignore[arg-type]
