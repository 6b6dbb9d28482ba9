"""Declarative compression recipes: small frozen dataclasses that round-trip through TOML/YAML/JSON.

A recipe says *what* to do (which pattern, how sparse, which quantization); `edgesparse.compress`
decides *how*. Every value is validated when the recipe is built, so a typo fails before any work.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesparse.errors import EdgesparseError

QUANT_MODES = ("none", "int8", "int8-dynamic", "int4w")
ACT_METHODS = ("cats", "chess", "teal")
SCOPES = ("layer", "global")
PRUNE_METHODS = ("auto", "magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class Pattern:
    """Which weights may be zeroed together: `unstructured`, `block:RxC`, `nm:N:M` or `channel`.

    Block RxC groups R consecutive output rows with C consecutive input columns of the weight seen
    as a matrix [out, in*kh*kw] (so `4x1` is four output channels sharing one input element, the
    SpMM layout's output-channel block). N:M keeps N of every M consecutive input elements.
    """

    kind: str
    rows: int = 1
    cols: int = 1
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        text = str(text).strip().lower()
        if text == "unstructured":
            return cls("unstructured")
        if text == "channel":
            return cls("channel")
        if match := re.fullmatch(r"block:(\d+)x(\d+)", text):
            rows, cols = int(match[1]), int(match[2])
            if rows < 1 or cols < 1 or rows * cols < 2:
                raise EdgesparseError(f"block pattern {text!r} needs R,C >= 1 and more than one element")
            return cls("block", rows=rows, cols=cols)
        if match := re.fullmatch(r"nm(?::(\d+):(\d+))?", text):
            n, m = (int(match[1]), int(match[2])) if match[1] else (2, 4)
            if not 1 <= n < m:
                raise EdgesparseError(f"N:M pattern {text!r} needs 1 <= N < M (got N={n}, M={m})")
            return cls("nm", n=n, m=m)
        raise EdgesparseError(
            f"unknown pattern {text!r}", hint="use unstructured, block:RxC (e.g. block:4x1), nm:N:M (e.g. nm:2:4) or channel"
        )

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block:{self.rows}x{self.cols}"
        if self.kind == "nm":
            return f"nm:{self.n}:{self.m}"
        return self.kind

    @property
    def implied_sparsity(self) -> float | None:
        """N:M fixes the sparsity at 1 - N/M; other patterns take it from the recipe."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None


def check_sparsity(value: Any, where: str = "sparsity") -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise EdgesparseError(f"{where} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= value < 1.0:
        raise EdgesparseError(f"{where} must be in [0, 1), got {value}", hint="0.9 means 90% of weights are zero")
    return value


@dataclass(frozen=True)
class Schedule:
    """Gradual pruning over a fine-tune loop (Zhu & Gupta 2017, cubic schedule).

    steps=0 means one-shot pruning. Otherwise sparsity rises from `initial_sparsity` at step
    `begin` to the target at step `end` (default: 3/4 of `steps`), updated every `every` steps,
    and the remaining steps fine-tune at the final sparsity with masks held fixed.
    """

    steps: int = 0
    begin: int = 0
    end: int | None = None
    every: int = 10
    initial_sparsity: float = 0.0

    def __post_init__(self):
        if self.steps < 0 or self.begin < 0 or self.every < 1:
            raise EdgesparseError("schedule needs steps >= 0, begin >= 0 and every >= 1")
        if self.steps and not self.begin <= self.end_step <= self.steps:
            raise EdgesparseError(f"schedule end ({self.end_step}) must lie between begin ({self.begin}) and steps ({self.steps})")
        check_sparsity(self.initial_sparsity, "schedule.initial_sparsity")

    @property
    def end_step(self) -> int:
        return self.end if self.end is not None else self.begin + (3 * (self.steps - self.begin)) // 4

    def sparsity_at(self, step: int, final: float) -> float:
        """s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3, held at s_f after the end step."""
        if step < self.begin:
            return 0.0
        span = self.end_step - self.begin
        if span <= 0 or step >= self.end_step:
            return final
        # sparsity only changes on update steps, as in the paper's t0 + k*dt grid
        step = self.begin + ((step - self.begin) // self.every) * self.every
        progress = (step - self.begin) / span
        return final + (self.initial_sparsity - final) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        return self.begin <= step <= self.end_step and ((step - self.begin) % self.every == 0 or step == self.end_step)


@dataclass(frozen=True)
class LayerRule:
    """Per-layer override: layers whose name matches the glob get this sparsity/pattern, or stay dense."""

    match: str
    sparsity: float | None = None
    pattern: str | None = None
    exclude: bool = False

    def __post_init__(self):
        if self.sparsity is not None:
            check_sparsity(self.sparsity, f"override {self.match!r} sparsity")
        if self.pattern is not None:
            Pattern.parse(self.pattern)


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float = 0.0
    pattern: str = "unstructured"
    scope: str = "layer"
    keep_first_last_dense: bool = True
    exclude: tuple[str, ...] = ()
    overrides: tuple[LayerRule, ...] = ()
    schedule: Schedule = field(default_factory=Schedule)
    # how weights are chosen: magnitude (gradual inside a fine-tune, or one-shot), or calibrated
    # one-shot wanda / sparsegpt (edgesparse.prune_llm). auto: magnitude when a fine-tune hook
    # runs the schedule, else wanda when the model is all linear layers and has calibration
    # inputs (an LM exported without fine-tuning), else magnitude.
    method: str = "auto"
    calib_batches: int = 8  # calibration batches wanda / sparsegpt read

    def __post_init__(self):
        pattern = Pattern.parse(self.pattern)
        if self.method not in PRUNE_METHODS:
            raise EdgesparseError(f"unknown prune method {self.method!r} (use one of {', '.join(PRUNE_METHODS)})")
        if self.calib_batches < 1:
            raise EdgesparseError("prune.calib_batches must be >= 1")
        if self.method in ("wanda", "sparsegpt") and pattern.kind == "channel":
            raise EdgesparseError(f"--prune-method {self.method} chooses weights, not channels", hint="use an element pattern (unstructured, nm:2:4, block:RxC)")
        check_sparsity(self.sparsity)
        implied = pattern.implied_sparsity
        if implied is not None and self.sparsity not in (0.0, implied) and abs(self.sparsity - implied) > 1e-9:
            raise EdgesparseError(
                f"pattern {pattern} fixes sparsity at {implied:.3g}, but sparsity {self.sparsity} was asked for",
                hint="leave --prune out with an N:M pattern",
            )
        if self.scope not in SCOPES:
            raise EdgesparseError(f"unknown prune scope {self.scope!r} (use one of {', '.join(SCOPES)})")
        if self.scope == "global" and pattern.kind != "unstructured":
            raise EdgesparseError("global scope works with the unstructured pattern only")
        if self.scope == "global" and self.method in ("wanda", "sparsegpt"):
            raise EdgesparseError(f"global scope works with magnitude pruning only (not {self.method})")

    @property
    def parsed_pattern(self) -> Pattern:
        return Pattern.parse(self.pattern)

    @property
    def target_sparsity(self) -> float:
        implied = self.parsed_pattern.implied_sparsity
        return implied if implied is not None else self.sparsity

    @property
    def active(self) -> bool:
        return self.target_sparsity > 0 or any(r.sparsity for r in self.overrides)


@dataclass(frozen=True)
class QuantConfig:
    """`int8`: static PT2E (calibrated activations); `int8-dynamic`: activations scaled at run time;
    `int4w`: int4 weights with int8 dynamic activations (8da4w) on linear layers."""

    mode: str = "none"
    calib_batches: int = 32
    group_size: int = 32
    method: str = "auto"  # int4w rounding: gptq | rtn (round to nearest) | auto (gptq when calibration data exists)
    # static int8: the first and last conv/linear stay fp32 (a CNN loses most of its int8 accuracy
    # to the raw image's and the logits' per-tensor scales; XNNPACK runs those two layers in fp32).
    # None (default): yes for models whose first layer is a conv, no otherwise.
    keep_first_last_fp32: bool | None = None

    def __post_init__(self):
        if self.mode not in QUANT_MODES:
            raise EdgesparseError(f"unknown quantization {self.mode!r} (use one of {', '.join(QUANT_MODES)})")
        if self.method not in ("auto", "gptq", "rtn"):
            raise EdgesparseError(f"unknown quantization method {self.method!r} (use auto, gptq or rtn)")
        if self.calib_batches < 1 or self.group_size < 1:
            raise EdgesparseError("quant.calib_batches and quant.group_size must be >= 1")
        if self.keep_first_last_fp32 is not None and not isinstance(self.keep_first_last_fp32, bool):
            raise EdgesparseError(f"quant.keep_first_last_fp32 must be true or false (got {self.keep_first_last_fp32!r})")


@dataclass(frozen=True)
class ActSparsityConfig:
    """Activation sparsity: zero the activations below a threshold calibrated to hit `target`.
    cats: one threshold per MLP on |act(gate x)|; chess: one per MLP neuron (channel); teal: one
    per linear layer on its input. `finetune_steps` > 0 runs a short recovery fine-tune (the
    model's own hook, or the built-in one for demo LMs) with the thresholds in place."""

    method: str = "cats"
    target: float = 0.0
    calib_tokens: int = 1024
    finetune_steps: int = 0

    def __post_init__(self):
        if self.method not in ACT_METHODS:
            raise EdgesparseError(f"unknown activation-sparsity method {self.method!r} (use one of {', '.join(ACT_METHODS)})")
        if not 0.0 <= self.target < 1.0:
            raise EdgesparseError(f"act_sparsity.target must be in [0, 1) (got {self.target})")
        if self.calib_tokens < 16 or self.finetune_steps < 0:
            raise EdgesparseError("act_sparsity.calib_tokens must be >= 16 and finetune_steps >= 0")

    @property
    def active(self) -> bool:
        return self.target > 0


@dataclass(frozen=True)
class Recipe:
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    act_sparsity: ActSparsityConfig = field(default_factory=ActSparsityConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        data = dict(data or {})
        _reject_unknown(data, cls, "recipe")
        prune = dict(data.get("prune") or {})
        _reject_unknown(prune, PruneConfig, "prune")
        if "schedule" in prune:
            _reject_unknown(prune["schedule"] or {}, Schedule, "prune.schedule")
            prune["schedule"] = Schedule(**(prune["schedule"] or {}))
        rules = []
        for rule in prune.get("overrides") or ():
            _reject_unknown(rule, LayerRule, "prune.overrides[]")
            rules.append(LayerRule(**rule))
        prune["overrides"] = tuple(rules)
        prune["exclude"] = tuple(prune.get("exclude") or ())
        quant = dict(data.get("quant") or {})
        _reject_unknown(quant, QuantConfig, "quant")
        act = dict(data.get("act_sparsity") or {})
        _reject_unknown(act, ActSparsityConfig, "act_sparsity")
        try:
            return cls(prune=PruneConfig(**prune), quant=QuantConfig(**quant), act_sparsity=ActSparsityConfig(**act))
        except TypeError as exc:  # e.g. a string where a number belongs
            raise EdgesparseError(f"invalid recipe: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise EdgesparseError(f"recipe file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            elif path.suffix == ".json":
                data = json.loads(text)
            else:
                raise EdgesparseError(f"recipe {path.name}: unsupported extension (use .toml, .yaml or .json)")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
            raise EdgesparseError(f"recipe {path.name} is not valid {path.suffix[1:]}: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise EdgesparseError(f"recipe {path.name} must hold a table/mapping at the top level")
        return cls.from_dict(data)


def _reject_unknown(data: dict, cls: type, where: str) -> None:
    if not isinstance(data, dict):
        raise EdgesparseError(f"recipe section {where} must be a table/mapping")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise EdgesparseError(f"unknown key(s) in {where}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
