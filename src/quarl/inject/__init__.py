"""quarl.inject: where quantization / hardware error enters a model.

    from quarl.inject import attach, InjectionSpec
    inj = attach(model, InjectionSpec(error_type="nvfp4", injection_point="both", apply_during="both"))
    with inj.phase("rollout"):
        ...
    inj.stats()
    inj.detach()          # model bit-identical to before attach

Modules: `spec` (InjectionSpec, schemes), `select` (filter_fn(module, fqn) -> bool), `errors` (error models and
their STE), `weights` (cached weight error), `activations` (input/output hooks), `telemetry`, `injector`
(the Injector), `oplevel` (F.linear / matmul interception inside a context manager), `experts` (fused MoE experts,
per expert), `hardware` (named chip presets).
"""

from quarl.inject.injector import Injector, attach
from quarl.inject.oplevel import OpInjector, inject_ops
from quarl.inject.select import make_filter_fn, select_modules
from quarl.inject.spec import SCHEMES, ApplyDuring, InjectionPoint, InjectionSpec, Phase

__all__ = [
    "SCHEMES", "ApplyDuring", "InjectionPoint", "InjectionSpec", "Injector", "OpInjector", "Phase", "attach",
    "inject_ops", "make_filter_fn", "select_modules",
]
