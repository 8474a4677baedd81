"""The measures.csv format (issue 15): one module that the instruments (writer) and the report
(reader) both import, so the file's columns and names are written down once.

Long format, one row per (step, instrument, layer, statistic); described in results/README.md.
`step` is the number of optimisation steps taken before the measurement (0 = at initialisation).
Torch-free on purpose: the report reads the file without importing torch.
"""
from __future__ import annotations

FILE_NAME = "measures.csv"
HEADER = ("step", "instrument", "layer", "statistic", "value")
# Config keys (top level of bnexp/conf/config.yaml) that switch the instruments on and shape them.
# They say how a run was observed, not what was trained: the report groups runs without them.
CONFIG_KEYS = ("measure", "measure_every", "measure_steps")
MODEL_LAYER = "model"          # the layer name of the whole-model instruments (landscape, ...)

# Instrument -> its statistics, in the order the report draws them.
STATISTICS: dict[str, tuple[str, ...]] = {
    # L(theta - eta g) over the step-size grid: min and max; L(theta) itself as `loss`
    "landscape": ("min", "max", "loss"),
    # ||grad L(theta) - grad L(theta - eta g)||_2 over the grid (Santurkar et al. 2018, Fig. 4b)
    "predictiveness": ("min", "max"),
    # the largest ||grad L(theta) - grad L(theta - eta g)||_2 / ||eta g||_2 over the grid (Fig. 4c)
    "beta_smoothness": ("max",),
    # per weight layer: ||G - G'||_2 and cos(G, G') (Santurkar et al. 2018, section 2.2)
    "ics": ("l2", "cos"),
    # per nonlinearity: sigmoid/tanh `saturated`, `mean_derivative`; relu `dead`, `active`
    "saturation": ("saturated", "mean_derivative", "dead", "active"),
    # per weight layer; `effective_step` (lr ||grad W|| / ||W||) only for scale-invariant weights
    "weights": ("weight_norm", "grad_norm", "effective_step"),
}
INSTRUMENTS = tuple(STATISTICS)
WHOLE_MODEL = ("landscape", "predictiveness", "beta_smoothness")   # layer is MODEL_LAYER


def tensorboard_tag(instrument: str, layer: str, statistic: str) -> str:
    """The TensorBoard scalar a measurement is also logged as."""
    return f"measure/{instrument}/{layer}/{statistic}"
