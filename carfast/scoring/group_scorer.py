"""CAR scores of coupled channels: ``score_group`` and ``GroupScorer``, ``score_layer`` and ``LayerScorer`` with the
target taken as a coupling group (``carfast.Group``; ``graph/groups.py`` says what a group is).

Removing channel i of a coupling group removes it from every member: the channel-flow analysis
(``carfast.graph``, with units allowed to pair up) gives its readers, and the engine scores it exactly as
it scores a single layer (``carfast.scoring.scorer.LayerScorer``): the readers whose input no removal changes are cached
consumers (the consumer delta), the others read the channel through a keep mask inside the suffix, and
normalisers renormalise over what remains. Each (channel, image) pair thus gives the logits of the
naive method (remove the channel wherever the stream is read, rerun the whole network), in float32 or,
with ``precision="bf16"``, in bf16 with the float32 re-run of near ties.
"""
from __future__ import annotations

import warnings

from torch import nn

from carfast.scoring.scorer import LayerScorer, one_score
from carfast.scoring.scores import LayerScores
from carfast.scoring.settings import takes_score_options

__all__ = ["GroupScorer", "score_group"]


class GroupScorer(LayerScorer):
    """``LayerScorer`` with its target taken as a coupling group (``LayerScorer(model, Group(layer), data)``):
    ``score(filters=None, per_image=False)`` returns ``LayerScores`` over the group's channels; ``remove(k)``
    removes channel k for good (greedy pruning); ``members`` lists the group's layers.

    Takes the arguments of ``score_group`` except ``filters`` and ``per_image``.
    """

    fn = "score_group"
    as_group = True

    @property
    def num_channels(self) -> int:
        """Deprecated: ``num_filters`` (the scorer's one count, a group's channels here)."""
        warnings.warn("GroupScorer.num_channels is deprecated; use num_filters (the group's channels)",
                      DeprecationWarning, stacklevel=2)
        return self.num_filters


@takes_score_options
def score_group(model: nn.Module, layer, data, *, filters=None, per_image: bool = False, **settings) -> LayerScores:
    """Score each channel of the coupling group of ``layer`` by CAR (``carfast.graph.find_group``).

    ``layer`` names any producer of the group (the stem conv, a block's second conv, a 1x1 shortcut
    conv). Channel i's score is the accuracy lost when channel i is removed from every member of the
    group (so it is gone wherever the residual stream is read), equal image by image to removing it at
    every reader and rerunning the whole network. With channel-padding ("option A") shortcuts each stage
    is its own group (see ``carfast.graph.find_group``). A layer coupled with no other gets the scores
    ``score_layer`` gives. The same as ``score_layer(model, carfast.Group(layer), data, ...)``.

    Args:
        model, data: as ``score_layer`` takes them.
        layer: a name from ``model.named_modules()`` or the module: any producer of the group.
        filters: channel indices of the group to score, in the order wanted (default all).
        per_image: also return ``image_correct`` [F, N] bool and ``base_image_correct`` [N] bool.
        {score_options}
    Returns:
        ``LayerScores`` with ``coupled`` True for a real group and ``members``: the layers of the group and
        how its channels map onto each (``groups.GroupMember``).
    """
    return GroupScorer(model, layer, data, **one_score(settings, "score_group")).score(filters, per_image=per_image)
