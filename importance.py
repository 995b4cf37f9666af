"""Channel importance: the scores a prune ranks channels by (the lowest go first).

An importance is a function `(model, layers, images=None) -> {conv layer: per-channel scores}` (float64
numpy, one score per output channel; `layers` a list of conv indices or a LayerSet, whose `prunable` are
scored). `images` [N, 3, H, W] are calibration images for criteria that measure activations; criteria that
need none ignore them. Register a new one in IMPORTANCES with a label for tables and whether it needs images:

    scores = IMPORTANCES['gamma'].fn(model, layer_set)          # {layer: |gamma| per channel}
    plan = prune_utils.make_plan(model, layer_set, 'shortcut', percent=0.5, importance='gamma')

Scores of different layers are compared by one global threshold, so a criterion should put them on one scale.
"""
from dataclasses import dataclass

from utils.errors import DarkslimError


@dataclass(frozen=True)
class Importance:
    """A registered criterion: `name` (the --importance value), `label` (for tables: what the score is),
    `fn` (see the module docstring), `needs_images` (whether it measures activations on images)."""
    name: str
    label: str
    fn: object
    needs_images: bool = False

    def scores(self, model, layers, images=None):
        if self.needs_images and images is None:
            raise DarkslimError(f"importance {self.name} measures activations: expected calibration images",
                                param='importance')
        return self.fn(model, layers, images)


def _layers(layers):
    return list(getattr(layers, 'prunable', layers))


def gamma(model, layers, images=None):
    """|gamma| of each channel's BatchNorm: after sparse training (L1 on gamma) a channel with gamma ~ 0 outputs
    a constant, so the smallest go first (network slimming, Liu et al. 2017)."""
    return {i: model.module_list[i][1].weight.detach().abs().double().cpu().numpy() for i in _layers(layers)}


IMPORTANCES = {'gamma': Importance('gamma', '|gamma|', gamma)}


def get_importance(importance):
    """An Importance from its name (or one given as is)."""
    if isinstance(importance, Importance):
        return importance
    if importance not in IMPORTANCES:
        raise DarkslimError(f"{{importance}} {importance!r}; expected one of {', '.join(IMPORTANCES)}",
                            param='importance')
    return IMPORTANCES[importance]
