"""quarl inside verl, without a fork: ``actor_rollout_ref.model.external_lib=quarl.verl``.

verl imports ``external_lib`` in every worker (``HFModelConfig.__post_init__``) before it builds the reference and
actor engines. Importing this package then:
1. checks the verl version (the tested range is 0.9.x from 0.9.1; another one is an ImportError that says so);
2. registers `quarl.verl.engine.QuarlFSDPEngineWithLMHead` in verl's ``EngineRegistry`` for ``language_model`` /
   ``fsdp`` + ``fsdp2`` under every (device, vendor) verl ships its FSDP engine for: (cuda, nvidia), (cuda, amd),
   (npu, huawei). The registry tries (device, vendor) before the device alone, so this replaces verl's engine.

The rollout side is ``rollout.engine_kwargs.vllm.worker_extension_cls=quarl.verl.rollout.QuarlWorkerExtension``
(`quarl.verl.rollout`); the settings are the ``quarl:`` block of `quarl.verl.config`; the reward is
`quarl.verl.reward.compute_score`. Activation is explicit (external_lib + the config): installing quarl registers
nothing, and quarl declares no ``verl.plugins`` entry point.

Without verl installed this package still imports (`quarl.verl.migrate`, `quarl.verl.reward` and
`quarl.verl.config` need no verl), and registers nothing.
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger(__name__)

TESTED = ((0, 9, 1), (0, 10, 0))  # [lowest tested, first untested)
TARGETS = (("cuda", "nvidia"), ("cuda", "amd"), ("npu", "huawei"))
_registered: list[tuple[str, str]] = []


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_version(version: str) -> None:
    """Raise ImportError unless ``version`` is in the tested range (0.9.1 <= v < 0.10)."""
    lo, hi = TESTED
    if not lo <= _version_tuple(version) < hi:
        raise ImportError(f"quarl.verl was tested with verl >= {'.'.join(map(str, lo))}, < {'.'.join(map(str, hi))} "
                          f"and overrides its FSDP engine and vLLM worker extension; this is verl {version}. Install "
                          "the tested release: pip install 'quarl[verl]'")


def activate() -> list[tuple[str, str]]:
    """Check verl's version and register quarl's engine (idempotent); returns the (device, vendor) keys."""
    if _registered:
        return list(_registered)
    import verl

    check_version(verl.__version__)
    from verl.workers.engine.base import EngineRegistry

    from quarl.verl.engine import QuarlFSDPEngineWithLMHead

    for device, vendor in TARGETS:
        EngineRegistry.register("language_model", ["fsdp", "fsdp2"], device=device, vendor=vendor)(
            QuarlFSDPEngineWithLMHead)
        _registered.append((device, vendor))
    logger.info("quarl.verl: FSDP engine registered for %s (verl %s)", _registered, verl.__version__)
    return list(_registered)


def installed() -> bool:
    """True when the verl package is installed (a directory named ``verl`` without one, e.g. a test folder on
    ``sys.path``, is a namespace package with no origin and does not count)."""
    spec = importlib.util.find_spec("verl")
    return spec is not None and spec.origin is not None


if installed():
    activate()
else:
    logger.debug("quarl.verl: verl is not installed; only migrate / reward / config are usable")
