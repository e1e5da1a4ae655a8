"""Recipes: omegaconf YAML files validated against typed schemas, and the objects they build.

A recipe has these top-level keys::

    seed: 0                      # seeds networks, envs (per rank) and the rule
    run_dir: null                # default runs/<env>-<rule>/<time>
    resume: null                 # a checkpoint path, or "last"
    init: null                   # start from the policy of any run's checkpoint (any rule)
    env: {id: CartPole-v1, num_envs: 8, ...}          # unitrain.envs.EnvSpec
                                 # or {id: "mypkg.envs:Reach-v0"} (imports mypkg.envs first)
                                 # or {make: "mypkg.envs:make_env", <factory kwargs>...}
    module: {target: unitrain.MLPPolicy, hidden: [64, 64]}   # class path + constructor args
    optimizer: {name: ppo, lr: 1.0e-3, ...}           # a registered update rule and its fields
    trainer: {max_frames: 100000, devices: 1, ...}    # TrainerConfig
    tune: {optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}, ...}
                                 # the search space of `unitrain tune` (unused by `fit`)

A supervised run sets ``env: null`` and a ``data:`` block (:class:`unitrain.envs.data.DataSpec`, e.g.
``{name: digits, batch_size: 64}``) and bounds training by ``trainer.max_epochs``.

Each block is validated against the dataclass that consumes it (``EnvSpec``, the rule's class,
:class:`TrainerConfig`, the module's constructor signature), so the Python API and recipes share
one definition of every parameter and its valid range. Every error is a one-line
:class:`~unitrain.errors.UserError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from unitrain.envs.data import DataInfo, DataSpec
from unitrain.envs.info import EnvInfo
from unitrain.envs.spec import EnvSpec
from unitrain.errors import ConfigError, UserError, check, check_file
from unitrain.policy.module import RLModule
from unitrain.rules.base import UpdateRule
from unitrain.rules.population.strategy import Strategy, as_rule
from unitrain.rules.registry import get_rule
from unitrain.run.trainer import TrainerConfig
from unitrain.validation import describe, import_object

__all__ = ["Recipe", "TrainerConfig", "load_recipe", "read_recipe", "build_module", "import_object",
           "find_recipe", "SHIPPED"]

_TOP_LEVEL = ("seed", "run_dir", "resume", "init", "env", "data", "module", "optimizer",
              "trainer", "tune")


@dataclass
class Recipe:
    """A validated recipe."""

    source: str
    seed: int
    run_dir: str | None
    resume: str | None
    env: EnvSpec | None
    module: dict[str, Any]
    optimizer: UpdateRule
    trainer: TrainerConfig
    config: dict[str, Any] = field(default_factory=dict)
    data: DataSpec | None = None
    init: str | None = None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        path: the YAML file.
        overrides: ``key=value`` strings (dotted keys), applied on top of the file.

    Raises:
        UserError: with a one-line message naming the file and key.
    """
    src = str(path)
    raw = read_recipe(path)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value, e.g. trainer.max_frames=50000")
    try:
        merged = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise UserError(f"{src}: invalid override: {_first_line(e)}") from None
    for key in merged:
        if key not in _TOP_LEVEL:
            raise UserError(f"{src}: unknown key {key!r}; valid top-level keys: {', '.join(_TOP_LEVEL)}")
    try:
        return _build(src, merged)
    except ConfigError as e:
        raise UserError(f"{src}: {e}") from None


# What a recipe file is, for the messages about one that is not.
_RECIPE = ("expected a recipe YAML, a mapping with keys seed, env, module, optimizer, trainer, ... "
           "(`unitrain recipes` lists the shipped recipes)")


def read_recipe(path: str | Path) -> DictConfig:
    """The mapping in a recipe file, before overrides and validation.

    Raises:
        UserError: the path is missing, a directory, empty or not text, the YAML does not parse,
            or it holds something other than a mapping; one line naming the file.
    """
    src = str(path)
    path = check_file(path, src, "recipe file", _RECIPE, inside=("*.yaml", "*.yml"))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{src}: cannot read it ({e.strerror or type(e).__name__}); "
                        f"{_RECIPE}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        if data.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or a bare pickle
            raise UserError(f"{src}: a binary file (a checkpoint?), not a recipe YAML; evaluate "
                            f"a checkpoint with `unitrain evaluate {src}`, or train from it with "
                            f"`unitrain fit RECIPE init={src}`") from None
        raise UserError(f"{src}: a binary file, not a recipe (not UTF-8 text); {_RECIPE}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise _syntax_error(src, e) from None
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
        raise UserError(f"{src}: no YAML content (only comments, blank lines or null); {_RECIPE}")
    if isinstance(node, yaml.SequenceNode):
        raise UserError(f"{src}: holds a list, not a mapping; {_RECIPE}")
    if not isinstance(node, yaml.MappingNode):
        value = getattr(node, "value", "?")
        raise UserError(f"{src}: holds a single value ({value!r}), not a mapping; {_RECIPE}")
    try:
        raw = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as e:  # what omegaconf's loader refuses: a duplicate key, a tag
        raise _syntax_error(src, e) from None
    assert isinstance(raw, DictConfig)
    return raw


def _syntax_error(src: str, e: yaml.YAMLError) -> UserError:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return UserError(f"{src}: YAML syntax error{where}: {problem}")


def _build(src: str, merged: DictConfig) -> Recipe:
    data = None if merged.get("data") is None else _typed(DataSpec, merged.get("data"), "data")
    env: EnvSpec | None = None
    if data is not None:
        # A data: block selects a supervised run, fed by a dataloader instead of an env.
        if merged.get("env") is not None:
            raise ConfigError("data", "a run has an env or a data: block, not both; "
                                      "set env: null for a supervised run")
    elif "env" in merged and merged.get("env") is None:
        raise ConfigError("data", "missing; a recipe with env: null needs a data: block, "
                                  "e.g. {name: digits}")
    else:
        env = _typed(EnvSpec, _factory_kwargs(merged.get("env")), "env")
    trainer = _typed(TrainerConfig, merged.get("trainer"), "trainer")
    opt_node = merged.get("optimizer")
    if opt_node is None or ("name" not in opt_node and "target" not in opt_node):
        rules = ", ".join(_rule_names())
        raise ConfigError("optimizer.name", f"missing; valid update rules: {rules} (or "
                                            "target: a class path such as mypkg.rules:MyRule)")
    opt_items = OmegaConf.to_container(opt_node, resolve=True)
    if "target" in opt_items:
        rule_cls = _rule_class(str(opt_items.pop("target")))
    else:
        try:
            rule_cls = get_rule(str(opt_items.pop("name")))
        except ConfigError as e:
            raise e.prefixed("optimizer") from None
    rule = as_rule(_typed(rule_cls, OmegaConf.create(opt_items), "optimizer"))
    module = OmegaConf.to_container(merged.get("module") or OmegaConf.create({}), resolve=True)
    module.setdefault("target", "unitrain.MLPPolicy")
    seed = merged.get("seed", 0)
    check(isinstance(seed, int) and seed >= 0, "seed", "an integer >= 0", seed)
    resume = merged.get("resume")
    run_dir = merged.get("run_dir")
    init = merged.get("init")
    if init is not None and resume is not None:
        raise ConfigError("init", "a run either resumes (resume=) or starts from another run's "
                                  "policy (init=), not both")
    return Recipe(src, seed, None if run_dir is None else str(run_dir),
                  None if resume is None else str(resume), env, module, rule, trainer,
                  OmegaConf.to_container(merged, resolve=True), data,
                  None if init is None else str(init))


def _factory_kwargs(node: Any) -> Any:
    """An ``env:`` block with ``make:``: keys that are not :class:`EnvSpec` fields are the
    factory's keyword arguments (``{make: mypkg.envs:make_env, size: 3}``), gathered into
    ``kwargs``."""
    if not isinstance(node, DictConfig) or node.get("make") is None:
        return node
    fields = {f.name for f in dataclasses.fields(EnvSpec)}
    extra = {k: v for k, v in node.items() if k not in fields}
    if not extra:
        return node
    kwargs = dict(node.get("kwargs") or {})
    kwargs.update(extra)
    out = {k: v for k, v in node.items() if k in fields}
    out["kwargs"] = kwargs
    return OmegaConf.create(out)


def _rule_class(target: str) -> type:
    """The update rule or population strategy class a recipe names by its path."""
    cls = import_object(target, "optimizer.target")
    if not (inspect.isclass(cls) and issubclass(cls, (UpdateRule, Strategy))
            and dataclasses.is_dataclass(cls)):
        raise ConfigError("optimizer.target", f"{target!r} is not an update rule or a population "
                                              "strategy (a dataclass subclassing "
                                              "unitrain.optim.UpdateRule or unitrain.optim.Strategy)")
    return cls


def _rule_names() -> list[str]:
    from unitrain.rules.registry import registered_rules

    return list(registered_rules())


def _typed(cls: type, node: Any, prefix: str) -> Any:
    """Validate ``node`` against dataclass ``cls`` and instantiate it."""
    if node is None:
        node = OmegaConf.create({})
    if not isinstance(node, DictConfig):
        raise ConfigError(prefix, f"expected a mapping of {cls.__name__} fields, got {node!r}")
    valid = [f.name for f in dataclasses.fields(cls)]
    # A block composed of another (elite_imitation's ``fit:``) is validated as its own block, so
    # its errors name its keys.
    hints = typing.get_type_hints(cls)
    nested = {f.name: hints[f.name] for f in dataclasses.fields(cls)
              if dataclasses.is_dataclass(hints.get(f.name)) and f.name in node}
    parts = {name: _typed(sub, node[name], f"{prefix}.{name}") for name, sub in nested.items()}
    if parts:
        node = OmegaConf.create({k: v for k, v in node.items() if k not in parts})
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), node)
        obj = OmegaConf.to_object(merged)
        for name, part in parts.items():
            setattr(obj, name, part)
        return obj
    except ConfigKeyError as e:
        key = f"{prefix}.{e.full_key}" if e.full_key else prefix
        hint = _RENAMED.get(key, "")
        valid = _fields_at(cls, str(e.full_key or "")) or valid
        raise ConfigError(key, f"unknown key{hint}; valid keys: {', '.join(valid)}") from None
    except ValidationError as e:
        key = str(e.full_key or "")
        if not key:  # omegaconf does not name the key of a bad list item: ask the class
            try:
                cls(**OmegaConf.to_container(node, resolve=True))
            except ConfigError as own:
                raise own.under(prefix) from None
            except TypeError:
                pass
        value = _value_at(node, key)
        hint = typing.get_type_hints(cls).get(key.split(".")[0]) if key else None
        expected = describe(hint) if hint is not None else "a valid value"
        raise ConfigError(f"{prefix}.{key}" if key else prefix,
                          f"got {value!r}; expected {expected}") from None
    except ConfigError as e:
        raise e.under(prefix) from None
    except OmegaConfBaseException as e:
        raise ConfigError(prefix, _first_line(e)) from None


def _fields_at(cls: type, dotted: str) -> list[str]:
    """The field names of the block that holds ``dotted`` (``early_stop.x`` -> EarlyStop's)."""
    for part in dotted.split(".")[:-1]:
        hint = typing.get_type_hints(cls).get(part)
        blocks = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
        if not blocks:
            return []
        cls = blocks[0]
    return [f.name for f in dataclasses.fields(cls)]


# Keys that were renamed, with what replaced them.
_RENAMED = {"trainer.eval_every": " (rule iterations; now trainer.eval_every_frames, in env frames)"}


def _value_at(node: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(node, key)
    except OmegaConfBaseException:
        return "?"


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def build_module(spec: dict[str, Any], info: EnvInfo | DataInfo,
                 key: str = "module") -> RLModule:
    """Construct the module of a ``module:`` block, filling env-derived arguments by name.

    Args:
        spec: ``{"target": class path, **constructor arguments}``.
        info: the env's (or dataset's) shapes (``obs_dim``, ``act_dim``, ``obs_shape``,
            ``discrete``).
        key: the block's key, for error messages.
    """
    kwargs = dict(spec)
    target = kwargs.pop("target")
    cls = import_object(str(target), f"{key}.target") if isinstance(target, str) else target
    if not (inspect.isclass(cls) and issubclass(cls, RLModule)):
        raise ConfigError(f"{key}.target", f"{target!r} is not a unitrain.RLModule subclass")
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n in params if n != "self"]
    for name in kwargs:
        if name not in params and not accepts_any:
            raise ConfigError(f"{key}.{name}", f"not an argument of {cls.__qualname__}; "
                                               f"valid: {', '.join(names)}")
    for name, value in info.module_kwargs().items():
        if name in params and name not in kwargs:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(key, f"{cls.__qualname__}({_fmt(kwargs)}) failed: {_first_line(e)}") from None


def _fmt(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


# The recipes that install with the package (`unitrain recipes` lists them).
SHIPPED = Path(__file__).resolve().parent.parent / "recipes"


def find_recipe(name: str) -> str:
    """A path to an existing file as given, else a shipped recipe named ``env/rule`` (with or
    without ``recipes/`` in front and ``.yaml`` behind)."""
    if os.path.exists(name):
        return name
    short = name[len("recipes/"):] if name.startswith("recipes/") else name
    for candidate in (SHIPPED / short, SHIPPED / f"{short}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return name
