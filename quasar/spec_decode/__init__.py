"""Speculative decoding: the scheduler, acceptance, sampling, and the drafters (one file each),
registered here by `drafter.method` name: a new drafter is its own module plus one line below."""
from .draft_model import DraftModelDrafter
from .drafter import Draft, Drafter
from .hierarchical import HierarchicalDrafter
from .ngram import NgramDrafter
from .quantized_self import QuantizedSelfDrafter

DRAFTERS: dict[str, type[Drafter]] = {
    Drafter.name: Drafter,
    NgramDrafter.name: NgramDrafter,
    QuantizedSelfDrafter.name: QuantizedSelfDrafter,
    DraftModelDrafter.name: DraftModelDrafter,
    HierarchicalDrafter.name: HierarchicalDrafter,
}


def make_drafter(cfg, runner, sampling, draft_runner=None) -> Drafter:
    """cfg: quasar.config.DrafterConfig; runner: the verifier's ModelRunner (QSpec drafts through
    it in draft mode); draft_runner: the draft model's ModelRunner (draft_model)."""
    return DRAFTERS[cfg.method].from_config(cfg, runner, sampling, draft_runner)


__all__ = ["DRAFTERS", "Draft", "Drafter", "make_drafter"]
