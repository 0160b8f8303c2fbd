"""Once per engine: does vLLM's compiled model compute what its eager model computes?

Capture adds operations to the graph inductor compiles (readers of every router's logits,
and on a pruned variant a product of the layer's input). With torch 2.13 and vLLM's CPU
build, inductor's peak-memory reordering (``reorder_for_peak_memory``) once scheduled the
DeepSeek-V3 router's sigmoid before the ``onednn_mm`` that writes the logits it reads,
in an earlier design of capture: log-probabilities were off by 3.5. Turning the pass off
for every model cost the engine about 5% of its throughput against stock vLLM, where
the pass is on. So the pass stays on, as in stock vLLM, and this check guards it: the
first forward pass that serves real tokens runs through the compiled model, then again
eagerly on the same inputs, and the two outputs are compared.

If they differ, that step is served from the eager run, the model runs eagerly from
then on (right, but slower), and the error names ``MOE_PRUNE_INDUCTOR_REORDER=0``, which
turns the pass off at the next start. The server never serves a wrong token, and never
stops for this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: Largest relative error (``|compiled - eager| / |eager|``, over the whole output) that
#: still counts as the same result. Fusion reorders floating-point sums, so outputs
#: differ in their last bits: on the testbed about 1e-7 in float32. A scheduling error
#: reads the wrong memory and is off by the size of the values themselves.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
#: 16-bit floats (and anything not listed) round each op to a few significant digits.
HALF_TOLERANCE = 5e-2

PENDING, PASSED, FAILED, NOT_COMPILED = "pending", "passed", "failed", "not compiled"


def relative_error(compiled: torch.Tensor, eager: torch.Tensor) -> float:
    """``|compiled - eager| / |eager|`` (Frobenius norms, in float64); ``inf`` where the
    shapes differ or a value is finite in one output and not in the other."""
    if compiled.shape != eager.shape:
        return float("inf")
    compiled, eager = compiled.double(), eager.double()
    finite = torch.isfinite(eager)
    if not torch.equal(finite, torch.isfinite(compiled)):
        return float("inf")
    # The same NaN and infinities in both (nan_to_num maps each kind to a value of its own).
    if not torch.equal(compiled[~finite].nan_to_num(), eager[~finite].nan_to_num()):
        return float("inf")
    scale = eager[finite].norm()
    difference = (compiled[finite] - eager[finite]).norm()
    return float(difference / scale) if scale > 0 else float(difference)


@dataclass
class CompileCheck:
    """Where an engine's check stands; reported by the workers' ``moe_prune_status``."""

    state: str
    relative_error: float | None = None
    tolerance: float | None = None
    #: Whether the graph was compiled with inductor's peak-memory reordering on.
    reordering: bool = True

    @classmethod
    def for_model(cls, compiled: bool, reordering: bool = True) -> "CompileCheck":
        return cls(PENDING if compiled else NOT_COMPILED, reordering=reordering)

    @property
    def remedy(self) -> str:
        """What to restart the server with after a failed check."""
        if self.reordering:
            return "Restart it with MOE_PRUNE_INDUCTOR_REORDER=0 (inductor's peak-memory reordering off)"
        return "Reordering was already off: serve this model with --enforce-eager"

    @property
    def pending(self) -> bool:
        return self.state == PENDING

    def judge(self, compiled: torch.Tensor, eager: torch.Tensor) -> bool:
        """Compare the two outputs of one step; True when the compiled one can be served."""
        self.tolerance = TOLERANCE.get(eager.dtype, HALF_TOLERANCE)
        self.relative_error = relative_error(compiled, eager)
        self.state = PASSED if self.relative_error <= self.tolerance else FAILED
        return self.state == PASSED

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "relative_error": self.relative_error, "tolerance": self.tolerance}
