"""Which class a distributed model is: `distributed_class(config, base)` makes
`Distributed<Family>ForCausalLM` (or `...ForSequenceClassification`), a subclass of both petald's
base (`DistributedModelForCausalLM` or the classifier) and the family's own transformers class,
found the way the Auto classes find it (so any family the installed transformers has, with no
table here). `served_layers(config)` says where the family keeps its decoder layers, or raises a
ValueError with the reason servers cannot run them (the same check `petald serve` makes), so an
unsupported family is refused before a client joins a swarm."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import torch
from transformers import PretrainedConfig, PreTrainedModel

if TYPE_CHECKING:
    from petald.models.modeling import DistributedModelForCausalLM


def family_class(config: PretrainedConfig, base: type[DistributedModelForCausalLM]) -> type:
    """The family's own transformers class for `base`'s head (`base.auto_mapping`)."""
    mapping = base.auto_mapping()
    try:
        return mapping[type(config)]  # type: ignore[no-any-return]
    except KeyError:
        raise ValueError(
            f"unsupported architecture: model_type {config.model_type!r} has no "
            f"{base.head_name} class in the installed transformers"
        ) from None


def distributed_class(
    config: PretrainedConfig, base: type[DistributedModelForCausalLM]
) -> type[DistributedModelForCausalLM]:
    """`Distributed<Family>...`: `base`'s generic class (the first in its MRO that declares a
    head) combined with the family's class for that head."""
    generic = next(c for c in base.__mro__ if "head_name" in vars(c))
    return _combined(generic, family_class(config, generic))


@cache
def _combined(generic: type, family: type[PreTrainedModel]) -> type:
    attrs = {
        "__doc__": f"{family.__name__} with its decoder blocks on the swarm "
        f"(see {generic.__name__}).",
        "__module__": "petald.models",
        "family": family,
    }
    return type(f"Distributed{family.__name__}", (generic, family), attrs)


def served_layers(config: PretrainedConfig) -> str:
    """Where the family's decoder layers sit in its causal LM (e.g. `model.layers`); a
    ValueError naming the reason if servers cannot run them."""
    from transformers import AutoModelForCausalLM

    from petald.server.families import family_for

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    return family_for(meta).layers_path


def combined_class(family: type[PreTrainedModel]) -> type:
    """`Distributed<Family>...` for a family class given by name (`petald.models` exports)."""
    from petald.models.classification import DistributedModelForSequenceClassification
    from petald.models.modeling import DistributedModelForCausalLM

    classifier = family.__name__.endswith("ForSequenceClassification")
    generic = (
        DistributedModelForSequenceClassification if classifier else DistributedModelForCausalLM
    )
    return _combined(generic, family)
