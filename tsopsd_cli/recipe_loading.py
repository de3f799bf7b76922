"""Building a recipe: the command's defaults, then `--recipe FILE.yaml`, then the command line (typed flags and
`--set section.field=value`), later layers winning, section by section.

The defaults follow the checkpoint's world (toy or real, tasks.toy.is_toy_checkpoint): on a real checkpoint the toy
world's prompts and completion lengths are not applied silently. Every problem is reported as `field.path: message`
(RecipeError, exit 2) before anything is written; the effective recipe (recipe_to_yaml) is saved beside every
output. What a recipe may say, its fields and their checks, is tsopsd_cli/recipe.py.

Every YAML a recipe is read from (files, `--set` values) goes through `UniqueKeyLoader`: a key given twice in one
mapping (two `optim:` sections, `lr:` twice) is refused with both line numbers, never resolved by the last one
silently. A `--set` value for a text field is that text as written (`eval.prompt_template={question}` is not a
YAML mapping); `data.type` is applied before the other `data.*` overrides whatever their order.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tsopsd_cli.errors import RecipeError
from tsopsd_cli.recipe import PROMPT_FIELDS, RECIPES, DemoRecipe, Section
from tsopsd_cli.tasks import source_types
from tsopsd_cli.tasks.benchmarks import DEFAULT_BENCHMARK

# What a command does with a checkpoint that is not a toy-world one when no recipe or flag names a prompt source
# (tasks.toy.is_toy_checkpoint decides): diagnose and eval sample MATH-500 with reasoning-length completions; rl and
# reheat refuse (training on the toy world's arithmetic would be silently wrong, and no data set is a safe default).
REAL_DIAGNOSE_DATA = {"type": "benchmark", "name": DEFAULT_BENCHMARK, "limit": 64}
REAL_MAX_NEW_TOKENS = 4096


# ------------------------------------------------------------------------------------------- reading the layers
class DuplicateKey(yaml.YAMLError):
    """A mapping of a recipe's YAML that gives one key twice."""

    def __init__(self, key, first: int, second: int):
        super().__init__(f"duplicate key {key!r} (line {first} and line {second}): give each key once")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a mapping that gives a key twice (with both line numbers)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    break
                if seen is not None:
                    raise DuplicateKey(key, seen.line + 1, key_node.start_mark.line + 1)
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML as yaml.safe_load reads it, but a key given twice in one mapping is refused (DuplicateKey)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars and flow collections (1.6, true, null, [1, 2]); anything else is a string."""
    try:
        return load_yaml(text)
    except DuplicateKey:
        raise
    except yaml.YAMLError:
        return text


def _annotations(cls: type, parts: list[str]) -> list:
    """The annotations the field at the dotted path `parts` has in the recipe class `cls` (several when a section
    is a union, such as data's sources; none when no such field)."""
    field = getattr(cls, "model_fields", {}).get(parts[0])
    if field is None:
        return []
    if len(parts) == 1:
        return [field.annotation]
    return [a for m in _models_in(field.annotation) for a in _annotations(m, parts[1:])]


def _models_in(annotation) -> list[type]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _text_only(annotation) -> bool:
    """str, Optional[str] or an Annotated str: a field whose value is text."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _text_only(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return bool(args) and all(_text_only(a) for a in args)
    return annotation is str


def is_text_field(dotted: str) -> bool:
    """True when the dotted path names a text field in every recipe that has it (eval.prompt_template,
    data.question_field, ...)."""
    found = [a for cls in RECIPES.values() for a in _annotations(cls, dotted.split("."))]
    return bool(found) and all(_text_only(a) for a in found)


def set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise RecipeError(f"--set {dotted}: empty field name")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"{dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_set_options(items: list[str]) -> list[tuple[str, Any]]:
    """`section.field=value` items as (dotted key, value): the value read as YAML (parse_value), except that a text
    field keeps the text as written where YAML would read something else (`{question}` is not a mapping)."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item}: expected section.field=value")
        key = key.strip()
        try:
            value = parse_value(raw)
        except DuplicateKey as e:
            raise RecipeError(f"--set {key}: {e}") from None
        if value is not None and not isinstance(value, str) and is_text_field(key):
            value = raw
        out.append((key, value))
    return out


def read_recipe_file(path: Path) -> dict:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe ({e.strerror})") from None
    try:
        data = load_yaml(text)
    except DuplicateKey as e:
        raise RecipeError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping of sections")
    return data


def command_defaults(cls: type[BaseModel]) -> dict:
    """The sections a command's recipe sets apart from their own class defaults, as a tree: rl's `data` is
    ToyData(split="train", num_prompts=4096) and its `rollout` samples 8 completions of up to 1024 tokens, where
    the bare sections would give the test split and 4 of 64. A recipe file or `--set` that names some fields of such
    a section changes those fields and keeps the rest."""
    out = {}
    for name, field in cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            tree = default.model_dump(mode="json", exclude_unset=True)
            if tree and "type" in type(default).model_fields:  # a tagged union (data): keep the tag
                tree["type"] = default.type
            if tree:
                out[name] = tree
    return out


def merge_trees(base: dict, top: dict) -> dict:
    """`top` over `base`, section by section; a section whose `type` differs replaces the base's whole."""
    out = dict(base)
    for key, value in top.items():
        under = out.get(key)
        if isinstance(under, dict) and isinstance(value, dict) and value.get("type", under.get("type")) == \
                under.get("type"):
            out[key] = merge_trees(under, value)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------ building one
def _names_data(keys) -> bool:
    """True when recipe keys or --set keys choose a prompt source (not only how to ask)."""
    return any(k == "data" or (k.startswith("data.") and k[5:] not in PROMPT_FIELDS) for k in keys)


def _real_world_defaults(command: str, tree: dict, user_keys: set[str], user_data: bool) -> None:
    """diagnose and eval on a real checkpoint: MATH-500 and reasoning-length completions, unless the user said."""
    if command == "eval":
        if not {"eval.benchmarks", "eval.data"} & user_keys:
            set_path(tree, "eval.benchmarks", [DEFAULT_BENCHMARK])
        if "rollout.max_new_tokens" not in user_keys:
            set_path(tree, "rollout.max_new_tokens", REAL_MAX_NEW_TOKENS)
    if command == "diagnose":
        if not user_data:
            tree["data"] = dict(REAL_DIAGNOSE_DATA)
        if "rollout.max_new_tokens" not in user_keys:
            set_path(tree, "rollout.max_new_tokens", REAL_MAX_NEW_TOKENS)


def _apply_overrides(tree: dict, overrides: list[tuple[str, Any]]) -> None:
    """`--set` (and typed flags) over the tree; a new `data.type` starts its source afresh, before the other
    `data.*` overrides whatever their order on the command line (a field given before the type is kept)."""
    data_override = any(k.startswith("data.") for k, _ in overrides)
    for key, value in sorted(overrides, key=lambda kv: kv[0] != "data.type"):  # (stable: else in order)
        if key == "data.type" and isinstance(tree.get("data"), dict) and tree["data"].get("type") != value:
            # switching prompt source: the old source's fields do not apply, except how a question is asked
            kept = {f: tree["data"][f] for f in PROMPT_FIELDS if f in tree["data"]}
            tree["data"] = kept if value != "toy" else {}
        set_path(tree, key, value)
    if data_override and isinstance(tree.get("data"), dict) and "type" not in tree["data"]:
        tree["data"]["type"] = "toy"


def _model(cls: type[Section], tree: dict) -> Section:
    """`cls` validated from `tree` (pydantic's ValidationError when it is not valid). DemoRecipe's validator builds
    each stage with build_recipe, handed to it in the validation context: the schema imports nothing of this
    module."""
    return cls.model_validate(tree, context={"build_recipe": build_recipe})


def _validate(cls: type[Section], tree: dict, prefix: str = "") -> Section:
    """The recipe, or RecipeError with one line per problem."""
    try:
        return _model(cls, tree)
    except ValidationError as e:
        raise RecipeError("invalid recipe", lines=_format_errors(e, prefix)) from None


def build_recipe(command: str, recipe_file: Path | None = None,
                 overrides: list[tuple[str, Any]] = (), world: str | None = None) -> Section:
    """Defaults < recipe file < overrides; raises RecipeError with one line per problem.

    `world`: "toy" or "real" (the checkpoint's, tasks.toy.is_toy_checkpoint), or None (unknown: toy defaults). On a
    real checkpoint the toy world's defaults are not applied silently: see REAL_DIAGNOSE_DATA."""
    cls = RECIPES[command]
    tree: dict = read_recipe_file(recipe_file) if recipe_file else {}
    if tree.get("command", command) != command:
        raise RecipeError(f"{recipe_file}: this recipe is for '{tree['command']}', not '{command}'")
    user_data = "data" in tree or _names_data(k for k, _ in overrides)
    user_keys = {k for k, _ in overrides} | {f"{sec}.{f}" for sec, body in tree.items() if isinstance(body, dict)
                                             for f in body}
    tree = merge_trees(command_defaults(cls), tree)
    if world == "real":
        _real_world_defaults(command, tree, user_keys, user_data)
    _apply_overrides(tree, overrides)
    if world == "real" and command in ("rl", "reheat"):  # validation samples as the run's rollouts do
        for f in ("max_new_tokens", "stop"):
            if f"validation.{f}" not in user_keys and f in tree.get("rollout", {}):
                set_path(tree, f"validation.{f}", tree["rollout"][f])
    recipe = _validate(cls, tree, f"{recipe_file}: " if recipe_file else "")
    if world == "real" and command in ("rl", "reheat") and not user_data and \
            not (command == "reheat" and recipe.reheat.method == "fold"):
        raise RecipeError(f"this checkpoint is not a toy-world one and no prompts were given: pass --data "
                          f"FILE.jsonl (fields problem, answer) or a recipe with a data section (docs/{command}.md); "
                          "the built-in toy prompts are for toy checkpoints")
    return recipe


def demo_stage(demo: DemoRecipe, name: str, command: str, **extra: Any) -> Section:
    """The full recipe of one demo stage: its file, its overrides, then `extra` (dots as '.' in keys)."""
    return build_recipe(command, *demo.stage_source(name, **extra))


# ----------------------------------------------------------------------------------- files, errors and output
def _format_errors(err: ValidationError, prefix: str = "") -> list[str]:
    """One `field.path: message` line per problem. The data section's union tag (toy, jsonl, ...: the prompt
    source registry's names) is left out of the path: `data.path`, not `data.jsonl.path`."""
    tags = source_types()
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]
                       if not (isinstance(p, str) and p in tags and e["loc"][0] == "data"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{prefix}{loc or '(recipe)'}: {msg}")
    return lines


def command_of_file(path: Path, tree: dict) -> str:
    """The command a recipe file is for: its `command:` key, else its folder (recipes/<command>/x.yaml)."""
    if "command" in tree:
        return str(tree["command"])
    parent = Path(path).resolve().parent.name
    return {"toy": "toy-init"}.get(parent, parent)


def validate_file(path: Path) -> list[str]:
    """Problems of one recipe file, `file: field.path: message` each; empty when it is valid."""
    try:
        tree = read_recipe_file(path)
        command = command_of_file(path, tree)
        if command not in RECIPES:
            return [f"{path}: cannot tell which command this recipe is for (add 'command: "
                    f"{'|'.join(RECIPES)}')"]
        _validate(RECIPES[command], merge_trees(command_defaults(RECIPES[command]), tree), f"{path}: ")
    except RecipeError as e:
        return e.lines
    return []


def recipe_to_yaml(recipe: Section) -> str:
    tree = recipe.model_dump(mode="json")
    ordered = {"command": tree.pop("command")} if "command" in tree else {}
    return yaml.safe_dump({**ordered, **tree}, sort_keys=False)


def defaults_yaml(command: str) -> str:
    return recipe_to_yaml(_model(RECIPES[command], {}))
