"""`DiagnoseReport`: everything `quarl.diagnose.diagnose` found, as a dataclass, a terminal table and JSON.

The library returns the report; only the CLI prints it (`DiagnoseReport.table`). ``errors`` holds the findings that
make a run untrustworthy (a declared injection that never fired, gradients cut); the CLI exits non-zero on them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quarl.diagnose.gradflow import GradIssue
from quarl.diagnose.sensitivity import SensitivityRow


@dataclass(frozen=True)
class LayerRow:
    """Per injected module: hook fires per phase and the error of the tensors actually injected."""

    module: str
    cls: str
    fires: dict[str, int]  # phase -> injected calls (diagnosis forward + gradient-flow pass)
    weight: dict[str, float]  # rel_err, sqnr_db, zero_frac, amax, outlier (empty when not injected)
    input: dict[str, float]
    output: dict[str, float]
    input_scale: str = ""  # activation-scale mode bound to the input, e.g. "static (calibrated amax 3.2)"; "" = none
    format: str = ""  # the format applied to this module (a precision plan may give it another one)


@dataclass
class DiagnoseReport:
    """The diagnosis of one (model, spec) pair on a handful of prompts."""

    spec: dict[str, Any]  # InjectionSpec.to_dict()
    phase: str  # phase the injected forward ran in
    n_sequences: int
    n_tokens: int
    kl: float  # mean KL(clean ‖ injected) per token, nats
    top1: float  # top-1 agreement with the clean model
    nll_clean: float | None = None  # per-token NLL on reference answers, clean model
    nll_injected: float | None = None  # same, injected
    layers: list[LayerRow] = field(default_factory=list)
    fires_by_phase: dict[str, int] = field(default_factory=dict)
    never_fired: list[str] = field(default_factory=list)
    grad_phase: str | None = None  # None when the gradient-flow check was skipped
    grad_checked: int = 0
    grad_issues: list[GradIssue] = field(default_factory=list)
    sensitivity: list[SensitivityRow] = field(default_factory=list)
    sensitivity_mode: str | None = None  # e.g. 'layer / quantization', 'block / noise'
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # per module: format applied, or "none (plan rule ...)"

    @property
    def ok(self) -> bool:
        """True when no finding makes the run untrustworthy."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become strings 'inf' / '-inf' / 'nan')."""
        return _finite(dataclasses.asdict(self))

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize (and optionally write) as indented JSON."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def table(self) -> str:
        """A readable multi-section text report for the terminal."""
        s = self.spec
        rotation = f", rotation={s['rotation']}" if s.get("rotation", "none") != "none" else ""
        lines = [f"quarl diagnose: {s['error_type']} on {s['injection_point']} (apply_during={s['apply_during']}, "
                 f"use_ste={s['use_ste']}{rotation}), phase={self.phase}, {self.n_sequences} sequences / "
                 f"{self.n_tokens} tokens",
                 f"logits vs clean: KL {self.kl:.4g} nats/token, top-1 agreement {self.top1:.1%}"]
        if self.nll_clean is not None:
            lines.append(f"reference-answer NLL: clean {self.nll_clean:.4f} -> injected {self.nll_injected:.4f} "
                         f"nats/token")
        lines.append(f"hook fires by phase: {self.fires_by_phase}")
        scales = _input_scales(self.layers)
        if scales:
            lines.append(f"activation scales: {scales}")
        lines += _formats(self.formats, s)
        lines += ["", _layer_table(self.layers)]
        if self.grad_phase is not None:
            lines += ["", f"gradient flow ({self.grad_phase}): {self.grad_checked} inputs/params checked, "
                      f"{len(self.grad_issues)} without gradient"]
            lines += [f"  {g.kind:5s} {g.problem:4s} {g.name}" for g in self.grad_issues[:20]]
            if len(self.grad_issues) > 20:
                lines.append(f"  ... {len(self.grad_issues) - 20} more")
        if self.sensitivity:
            lines += ["", f"sensitivity ({self.sensitivity_mode}), most damaging first:", _sens_table(self.sensitivity)]
        lines += [""] + [f"note: {n}" for n in self.notes] + [f"ERROR: {e}" for e in self.errors]
        return "\n".join(lines).rstrip() + "\n"


def _fmt(stats: dict[str, float], key: str, spec: str) -> str:
    value = stats.get(key)
    return "-" if value is None else format(value, spec)


def _layer_table(rows: list[LayerRow]) -> str:
    head = (f"{'module':44s} {'fires':>6s} {'W rel':>7s} {'W SQNR':>7s} {'W zero':>7s} {'W out':>6s} "
            f"{'X rel':>7s} {'X SQNR':>7s} {'X zero':>7s} {'X amax':>8s} {'X out':>6s}")
    legend = ("W = the weight, X = the input (or output) tensor actually injected; rel = ||e(t)-t||/||t||, "
              "zero = fraction of zeros after injection, out = max|t|/rms(t)")
    out = [legend, head, "-" * len(head)]
    for r in rows:
        x = r.input or r.output
        out.append(f"{r.module[-44:]:44s} {sum(r.fires.values()):6d} {_fmt(r.weight, 'rel_err', '7.4f')} "
                   f"{_fmt(r.weight, 'sqnr_db', '7.2f')} {_fmt(r.weight, 'zero_frac', '7.3f')} "
                   f"{_fmt(r.weight, 'outlier', '6.1f')} {_fmt(x, 'rel_err', '7.4f')} {_fmt(x, 'sqnr_db', '7.2f')} "
                   f"{_fmt(x, 'zero_frac', '7.3f')} {_fmt(x, 'amax', '8.3g')} {_fmt(x, 'outlier', '6.1f')}")
    return "\n".join(out)


def _input_scales(rows: list[LayerRow]) -> str:
    """Summary of the input scale modes applied: ``"static (calibrated amax 3.2) on 1 module, ..."``, or the one
    mode shared by every module (static amaxes differ per module, so they are summarized as a range)."""
    modes = [r.input_scale for r in rows if r.input_scale]
    if not modes:
        return ""
    static = [float(m.rpartition(" ")[2].rstrip(")")) for m in modes if m.startswith("static (calibrated amax ")]
    other = sorted({m for m in modes if not m.startswith("static (")})
    parts = [f"{m} on {modes.count(m)} modules" for m in other]
    if static:
        parts.append(f"static (calibrated amax {min(static):.4g} .. {max(static):.4g}) on {len(static)} modules")
    return ", ".join(parts)


def _formats(formats: dict[str, str], spec: dict[str, Any]) -> list[str]:
    """Lines on the formats applied: a summary, then every module whose format is not the spec's (plan overrides)."""
    if not formats or not spec.get("plan"):
        return []
    kinds = [f.split(" (")[0] for f in formats.values()]
    lines = ["formats applied (precision plan): " + ", ".join(f"{k} on {kinds.count(k)} modules"
                                                               for k in sorted(set(kinds)))]
    other = [(m, f) for m, f in formats.items() if f != spec["error_type"]]
    lines += [f"  {m:44s} {f}" for m, f in other[:40]]
    if len(other) > 40:
        lines.append(f"  ... {len(other) - 40} more")
    return lines


def _sens_table(rows: list[SensitivityRow]) -> str:
    out = [f"{'rank':>4s} {'unit':44s} {'KL':>10s} {'top-1':>7s} {'NLL':>8s} {'sigma':>8s}"]
    for i, r in enumerate(rows, 1):
        nll = "-" if r.nll is None else f"{r.nll:8.4f}"
        sigma = "-" if r.noise_scale is None else f"{r.noise_scale:8.4f}"
        out.append(f"{i:4d} {r.unit[-44:]:44s} {r.kl:10.4g} {r.top1:7.1%} {nll:>8s} {sigma:>8s}")
    return "\n".join(out)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
