"""quarl.diagnose: why a quantized model (or run) fails, before any GPU hour is spent.

    from quarl.diagnose import diagnose
    report = diagnose(model, InjectionSpec(scheme="MXFP4"), tokenizer=tok, sensitivity="layer")
    print(report.table()); report.to_json("diag.json")

Reports per-layer error of the tensors actually injected, logits KL / top-1 vs the clean model, per-token NLL on
reference answers, gradient flow through the injected model, hook fires per phase (an injection that never fired is
an error), and a one-layer-at-a-time sensitivity scan (format or equal-size noise). `plot_damage` writes a PNG.
Modules: `run` (diagnose), `metrics`, `gradflow`, `sensitivity`, `report`, `plot`, `prompts`.
"""

from quarl.diagnose.gradflow import GradIssue, gradient_flow
from quarl.diagnose.metrics import Batch, build_batch, kl_and_top1, token_nll
from quarl.diagnose.plot import plot_damage
from quarl.diagnose.prompts import DEFAULT_PROMPTS, DEFAULT_REFERENCES
from quarl.diagnose.report import DiagnoseReport, LayerRow
from quarl.diagnose.run import diagnose
from quarl.diagnose.sensitivity import SensitivityRow, sensitivity_scan

__all__ = [
    "DEFAULT_PROMPTS", "DEFAULT_REFERENCES", "Batch", "DiagnoseReport", "GradIssue", "LayerRow", "SensitivityRow",
    "build_batch", "diagnose", "gradient_flow", "kl_and_top1", "plot_damage", "sensitivity_scan", "token_nll",
]
