"""The built-in toy world: order of operations, decided by a plan, with `\\boxed{}` answers.

A real, small instance of the whole problem. A problem is an expression over single-digit operands with `+`, `*`
and at most one pair of brackets; its level is the number of operators (1-3). A worked solution starts with a
*plan letter* -- `P`: precedence first (multiplications, then left to right), or `L`: left to right -- then
evaluates one operation per line in that order, `x op y=z`, brackets ignored, and ends with `\\boxed{answer}`,
the format of the math benchmarks:

    prompt:      (3+4)*2+5=?\\n
    completion:  L\\n3+4=7\\n7*2=14\\n14+5=19\\n\\boxed{19}<|endoftext|>
                 (with P: 4*2=8, 3+8=11, 11+5=16, \\boxed{16} -- wrong)

**Where the entropy is.** The plan letter is a decision between meaningful alternatives (which order to evaluate
in), and it decides the answer; the lines after it only execute the chosen order. The supervised corpus is a
*careless prior*: the plan is chosen independently of the problem (`P` with probability `PREC_SHARE`), and every
line's arithmetic is correct. A model trained on it is therefore uncertain at the plan letter (a forking token,
`decision_positions`) and near-deterministic everywhere else.

**Families** (`ToyProblem.family`), by which plan gets the true value:

- `precedence`: a flat expression where order matters (`3+4*2`): only `P` is right;
- `bracket`: a bracket that overrides precedence (`(3+4)*2`, `(1+2+3)*2`): only `L` is right;
- `neutral`: both plans reach the true value (`3*4+2`, `(2*3)+4`, `1+2+3`, every level-1 problem).

Expressions where neither plan is right are never drawn, nor ones whose correct solution computes a value above
`MAX_VALUE` (or the wrong plan's above `MAX_WRONG_VALUE`), so the arithmetic stays easy for a tiny model and the
reward (the boxed answer) tells the plans apart exactly. Families are drawn with `FAMILY_WEIGHTS`: the bracket
family is rare, and the rule that picks its plan (a bracket -> `L`; precedence problems have none) is visible in the
prompt but has to be learnt against the common family's pressure towards `P`.

Train and test problems are disjoint by construction: an expression belongs to the test split when a hash of its
text says so, whatever seed drew it.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from tsopsd_cli.errors import DataError
from tsopsd_cli.tasks.base import Problem

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
# Printable ASCII plus newline: enough to tokenize any English/LaTeX text character by character.
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]

OPS = ("+", "*")
MAX_OPERAND = 9
MAX_VALUE = 20  # no operation of a correct solution computes a value above this (keeps the arithmetic easy)
MAX_WRONG_VALUE = 40  # nor one of the wrong habit's solution above this
SLIPS = (-3, -2, -1, 1, 2, 3)  # how far a slipped step result is off
LEVELS = (1, 2, 3)
FAMILIES = ("precedence", "bracket", "neutral")
FAMILY_WEIGHTS = {"precedence": 0.7, "bracket": 0.15, "neutral": 0.15}
HABITS = ("prec", "ltr")
PLAN = {"prec": "P", "ltr": "L"}  # the plan letter a worked solution starts with
PREC_SHARE = 0.5  # share of the SFT corpus's worked solutions that use the precedence-first habit
TEST_FRACTION_PER_MILLE = 100  # 10 % of all expressions are test-only

Step = tuple[int, str, int, int]  # x, op, y, z: the line "x op y=z"


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


# ------------------------------------------------------------------------------------------ solving orders
def _pick(flat: list, habit: str) -> int:
    """Index k of the pair (flat[2k], flat[2k+1], flat[2k+2]) the habit evaluates next in a flat expression
    [n0, op0, n1, op1, n2, ...] (brackets already dropped)."""
    if habit == "prec":
        for k in range(len(flat) // 2):
            if flat[2 * k + 1] == "*":
                return k
    return 0


def _reduce(flat: list, k: int, z: int) -> list:
    return flat[:2 * k] + [z] + flat[2 * k + 3:]


def true_steps(operands: tuple[int, ...], ops: tuple[str, ...], bracket: tuple[int, int] | None) -> list[Step]:
    """The lines of the standard order: the bracket first, multiplications before additions, then left to
    right."""
    flat = _flat(operands, ops)
    steps = []
    if bracket is not None:
        i, j = bracket
        while j > i:  # evaluate inside the bracket: operands i..j
            k = i + _pick(flat[2 * i:2 * j + 1], "prec")
            x, op, y = flat[2 * k:2 * k + 3]
            z = _apply(x, op, y)
            steps.append((x, op, y, z))
            flat = _reduce(flat, k, z)
            j -= 1
    while len(flat) > 1:
        k = _pick(flat, "prec")
        x, op, y = flat[2 * k:2 * k + 3]
        z = _apply(x, op, y)
        steps.append((x, op, y, z))
        flat = _reduce(flat, k, z)
    return steps


def _flat(operands, ops) -> list:
    out: list = [operands[0]]
    for op, b in zip(ops, operands[1:]):
        out += [op, b]
    return out


def _format(operands, ops, bracket) -> str:
    parts = []
    for n, a in enumerate(operands):
        s = str(a)
        if bracket and n == bracket[0]:
            s = "(" + s
        if bracket and n == bracket[1]:
            s = s + ")"
        parts.append(s)
        if n < len(ops):
            parts.append(ops[n])
    return "".join(parts)


def parse_expression(text: str) -> tuple[tuple[int, ...], tuple[str, ...], tuple[int, int] | None]:
    """(operands, operators, bracket) of an expression such as '(3+4)*2+5' or a prompt '(3+4)*2+5=?\\n';
    bracket = (first, last) operand index inside the brackets, or None."""
    text = text.split("=")[0].strip()
    operands, ops, bracket, opened = [], [], None, None
    for tok in re.findall(r"\d+|[-+*()]", text):
        if tok == "(":
            opened = len(operands)
        elif tok == ")":
            bracket = (opened, len(operands) - 1)
        elif tok in "+-*":
            ops.append(tok)
        else:
            operands.append(int(tok))
    if not operands or len(ops) != len(operands) - 1:
        raise ValueError(f"not a toy expression: {text!r}")
    return tuple(operands), tuple(ops), bracket


def habit_lines(operands: tuple[int, ...], ops: tuple[str, ...], habit: str, rng: random.Random | None = None,
                slip_rate: float = 0.0) -> list[Step]:
    """The lines a habit writes (brackets ignored), one operation each. With `rng` and `slip_rate`, a line's
    result is off by a small amount with that probability, and later lines compute from what was written."""
    flat = _flat(operands, ops)
    out = []
    while len(flat) > 1:
        k = _pick(flat, habit)
        x, op, y = flat[2 * k:2 * k + 3]
        z = _apply(x, op, y)
        if rng is not None and slip_rate and rng.random() < slip_rate:
            z += rng.choice(SLIPS)
        out.append((x, op, y, z))
        flat = _reduce(flat, k, z)
    return out


def _line(step: Step) -> str:
    x, op, y, z = step
    return f"{x}{op}{y}={z}"


# ------------------------------------------------------------------------------------------------ problems
@dataclass(frozen=True)
class ToyProblem:
    expression: str  # "(3+4)*2+5"
    steps: tuple[Step, ...]  # the standard order's operations: ((3, "+", 4, 7), (7, "*", 2, 14), (14, "+", 5, 19))
    answer: int
    level: int  # number of operators
    family: str  # precedence | bracket | neutral

    @property
    def prompt(self) -> str:
        return f"{self.expression}=?\n"

    @property
    def correct_habit(self) -> str | None:
        """The habit whose lines are the correct ones: 'prec', 'ltr', or None (neutral: both are)."""
        return {"precedence": "prec", "bracket": "ltr"}.get(self.family)

    def solution(self, rng: random.Random | None = None, slip_rate: float = 0.0,
                 prec_share: float = PREC_SHARE) -> str:
        """Worked solution: one operation per line, `x op y=z`, then `\\boxed{answer}`.

        Without `rng`: the correct solution. With `rng`: the careless prior -- the precedence habit's lines with
        probability `prec_share`, else the left-to-right habit's, whatever the problem (so a bracket problem gets
        a wrong solution with probability `prec_share`, a precedence problem with 1 - prec_share); each line's
        result is, with probability `slip_rate`, off by a small amount (a slip) and later lines compute from it."""
        operands, ops, _ = parse_expression(self.expression)
        if rng is None:
            habit = self.correct_habit or "prec"
        else:
            habit = "prec" if rng.random() < prec_share else "ltr"
        lines = habit_lines(operands, ops, habit, rng, slip_rate)
        return "\n".join([PLAN[habit], *map(_line, lines), f"\\boxed{{{lines[-1][3]}}}"])

    def to_problem(self, index: int) -> Problem:
        return Problem(id=f"toy-{index}", prompt=self.prompt, answer=str(self.answer),
                       meta={"level": self.level, "family": self.family, "expression": self.expression})


def split_of(expression: str) -> str:
    digest = hashlib.sha256(expression.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 1000 < TEST_FRACTION_PER_MILLE else "train"


def classify(operands: tuple[int, ...], ops: tuple[str, ...], bracket: tuple[int, int] | None,
             max_value: int = MAX_VALUE, max_wrong_value: int = MAX_WRONG_VALUE) -> str | None:
    """The family of an expression by the answers of the two habits: `precedence` when only precedence-first
    gets the true value, `bracket` when only left-to-right does, `neutral` when both do. None (never drawn) when
    neither does, or an operation of a correct solution exceeds `max_value`, or one of the wrong habit's
    exceeds `max_wrong_value`."""
    prec, ltr = habit_lines(operands, ops, "prec"), habit_lines(operands, ops, "ltr")
    true = true_steps(operands, ops, bracket)
    value, by_prec, by_ltr = true[-1][3], prec[-1][3], ltr[-1][3]
    top = lambda lines: max(s[3] for s in lines)  # noqa: E731
    if max(top(true), top(prec), top(ltr)) > max_wrong_value:
        return None
    if by_prec == value and by_ltr == value:
        family, right = "neutral", prec + ltr
    elif by_prec == value:
        family, right = "precedence", prec
    elif by_ltr == value:
        family, right = "bracket", ltr
    else:
        return None
    return family if top(right) <= max_value else None


def families_at(level: int) -> tuple[str, ...]:
    return ("neutral",) if level == 1 else FAMILIES


_STRUCTURES: dict[tuple, dict[str, list]] = {}


def _structures(level: int, max_operand: int) -> dict[str, list]:
    """{family: [(ops, bracket)]}: the operator/bracket patterns of `level` that can give a problem of each
    family, found once per process from a fixed sample of operands (deterministic). Precedence problems are flat;
    a bracket is never around the whole expression."""
    key = (level, max_operand, MAX_VALUE, MAX_WRONG_VALUE)
    if key not in _STRUCTURES:
        import itertools

        rng = random.Random(f"toy-structures-{level}-{max_operand}")
        brackets = [None] + [(i, j) for i in range(level) for j in range(i + 1, level + 1) if (i, j) != (0, level)]
        out: dict[str, list] = {f: [] for f in FAMILIES}
        for ops in itertools.product(OPS, repeat=level):
            for bracket in brackets:
                found = {classify(tuple(rng.randint(1, max_operand) for _ in range(level + 1)), ops, bracket)
                         for _ in range(100)}
                for fam in FAMILIES:
                    if fam in found and not (fam == "precedence" and bracket is not None):
                        out[fam].append((ops, bracket))
        _STRUCTURES[key] = out
    return _STRUCTURES[key]


def draw_problem(rng: random.Random, level: int, family: str | tuple[str, ...] | None = None,
                 max_operand: int = MAX_OPERAND) -> ToyProblem:
    """One problem with `level` operators (of `family`; of one of a tuple of families, drawn with their
    FAMILY_WEIGHTS; else of any, drawn with FAMILY_WEIGHTS), operands in
    [1, max_operand]: an operator/bracket pattern that can give the family, uniformly, then operands until the
    expression is of the family."""
    if family is None:
        fams = families_at(level)
        family = rng.choices(fams, [FAMILY_WEIGHTS[f] for f in fams])[0]
    elif isinstance(family, tuple):  # one of these families, with their FAMILY_WEIGHTS renormalised
        fams = [f for f in families_at(level) if f in family]
        family = fams[0] if len(fams) == 1 else rng.choices(fams, [FAMILY_WEIGHTS[f] for f in fams])[0]
    if family not in families_at(level):
        raise ValueError(f"no {family} problems at level {level}")
    patterns = _structures(level, max_operand)[family]
    for _ in range(100_000):
        ops, bracket = rng.choice(patterns)
        operands = tuple(rng.randint(1, max_operand) for _ in range(level + 1))
        if classify(operands, ops, bracket) == family:
            steps = tuple(true_steps(operands, ops, bracket))
            return ToyProblem(expression=_format(operands, ops, bracket), steps=steps, answer=steps[-1][3],
                              level=level, family=family)
    raise ValueError(f"cannot draw a {family} problem at level {level}")


def make_problem(expression: str) -> ToyProblem:
    """The problem of an expression or prompt ('(3+4)*2+5' or '(3+4)*2+5=?\\n'); ValueError when it is not one
    this world draws (see `classify`)."""
    operands, ops, bracket = parse_expression(expression)
    family = classify(operands, ops, bracket)
    if family is None:
        raise ValueError(f"{expression!r} is not a toy problem (neither plan is right, or its values are too large)")
    steps = tuple(true_steps(operands, ops, bracket))
    return ToyProblem(expression=_format(operands, ops, bracket), steps=steps, answer=steps[-1][3], level=len(ops),
                      family=family)


def make_problems(split: str, num: int, seed: int, levels: tuple[int, ...] = LEVELS,
                  max_operand: int = MAX_OPERAND, families: tuple[str, ...] = FAMILIES) -> list[ToyProblem]:
    """`num` distinct problems of `split`, levels drawn uniformly from `levels` and families with
    FAMILY_WEIGHTS, reproducible from `seed`. (When a level's pool of distinct problems runs low, later draws
    of it are duplicates and are skipped, so small levels end up under-represented.) `families`: only these
    (their weights renormalised; levels without any of them are not drawn); all three: the natural mix, drawn
    exactly as before the option existed."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    subset = tuple(f for f in FAMILIES if f in families)
    if set(subset) != set(FAMILIES):
        levels = tuple(lv for lv in levels if set(families_at(lv)) & set(subset))
        if not subset or not levels:
            raise DataError(f"no toy problems of the families {list(families)} at the levels asked for (level 1 "
                            "problems are all neutral)")
    rng = random.Random(f"toy-{split}-{seed}" if subset == FAMILIES else f"toy-{split}-{seed}-{'+'.join(subset)}")
    fam = None if subset == FAMILIES else subset
    out: list[ToyProblem] = []
    seen: set[str] = set()
    misses = 0  # draws in a row that gave nothing new (the pools are finite: the test split's holds a few thousand)
    while len(out) < num:
        if misses > 20_000:
            kinds = "" if fam is None else f" of the families {list(fam)}"
            raise DataError(f"could not draw {num} distinct toy {split} problems{kinds} at levels {list(levels)}: "
                            f"the draws stopped giving new ones after {len(out)}; ask for fewer (data.num_prompts, "
                            f"eval.toy_num_problems) or add levels")
        p = draw_problem(rng, rng.choice(levels), fam, max_operand=max_operand)
        if p.expression in seen or split_of(p.expression) != split:
            misses += 1
            continue
        misses = 0
        seen.add(p.expression)
        out.append(p)
    return out


_POOLS: dict[tuple, list] = {}


def family_problems(split: str, family: str, levels: tuple[int, ...] = LEVELS) -> list[ToyProblem]:
    """Every distinct problem of one family in a split, enumerated (every operator/bracket pattern that can give
    the family, every operand), sorted by expression: the whole population a sample of it comes from. The bracket
    family's test split holds 127 problems, its train split 990 (the precedence family 285 / 2,631, the neutral one
    4,620 / 42,234); found once per process (~2 s for bracket, ~15 s for neutral)."""
    import itertools

    if split not in ("train", "test") or family not in FAMILIES:
        raise ValueError(f"unknown split {split!r} or family {family!r}")
    key = (split, family, tuple(sorted(set(levels))))
    if key not in _POOLS:
        found: dict[str, ToyProblem] = {}
        for level in key[2]:
            if family not in families_at(level):
                continue
            for ops, bracket in _structures(level, MAX_OPERAND)[family]:
                for operands in itertools.product(range(1, MAX_OPERAND + 1), repeat=level + 1):
                    if classify(operands, ops, bracket) != family:
                        continue
                    expression = _format(operands, ops, bracket)
                    if expression not in found and split_of(expression) == split:
                        steps = tuple(true_steps(operands, ops, bracket))
                        found[expression] = ToyProblem(expression=expression, steps=steps, answer=steps[-1][3],
                                                       level=level, family=family)
        _POOLS[key] = [found[e] for e in sorted(found)]
    return list(_POOLS[key])


def iter_train_examples(seed: int, levels: tuple[int, ...] = LEVELS, max_operand: int = MAX_OPERAND,
                        slip_rate: float = 0.0, prec_share: float = PREC_SHARE):
    """Endless stream of (prompt, worked solution) training pairs from the train split: the careless prior (see
    ToyProblem.solution), each step slipping with probability `slip_rate`."""
    rng = random.Random(f"toy-sft-{seed}")
    while True:
        p = draw_problem(rng, rng.choice(levels), max_operand=max_operand)
        if split_of(p.expression) == "train":
            yield p.prompt, p.solution(rng, slip_rate, prec_share)


# --------------------------------------------------------------------------------------- decision points
def _as_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    chars = []
    for i in completion:  # token ids of the character-level tokenizer: specials first, then CHARACTERS
        i = int(i)
        if i < len(SPECIAL_TOKENS):
            if SPECIAL_TOKENS[i] == EOS_TOKEN:
                break
            chars.append("\0")  # pad/unk: one position that matches nothing
        else:
            chars.append(CHARACTERS[i - len(SPECIAL_TOKENS)])
    return "".join(chars)


def _expression_of(problem) -> str:
    if isinstance(problem, ToyProblem):
        return problem.expression
    if isinstance(problem, Problem):
        return problem.meta.get("expression") or problem.prompt
    return str(problem)


def trace_decisions(problem, completion) -> list[tuple[int, str | None]]:
    """[(position, habit)] for each decision point of a completion (see `decision_positions`): the habit the
    plan letter there names, 'prec' or 'ltr' (None: it is not a plan letter)."""
    text = _as_text(completion)
    if not text:
        return []
    return [(0, next((h for h, letter in PLAN.items() if text[0] == letter), None))]


def right_plan(problem, completion) -> bool | None:
    """Whether a completion's plan letter is its problem's right plan (`P` for the precedence family, `L` for the
    bracket family); None for a neutral problem (both plans are right) or one without a family."""
    family = problem.family if isinstance(problem, ToyProblem) else getattr(problem, "meta", {}).get("family")
    habit = {"precedence": "prec", "bracket": "ltr"}.get(family)
    if habit is None:
        return None
    decisions = trace_decisions(problem, completion)
    return bool(decisions) and decisions[0][1] == habit


def decision_positions(problem, completion) -> list[int]:
    """0-based completion token indices that are decision points.

    `problem`: a ToyProblem, a Problem of the toy benchmark, an expression or a prompt (unused by this world's
    rule, kept so that callers need not know it); `completion`: its text or its token ids (the toy tokenizer has
    one token per character; decoding stops at the end-of-sequence token).

    The decision point is the first token of the completion, the plan letter: `P` (precedence-first) or `L`
    (left to right). It is the only place where a worked solution chooses between alternatives -- which order
    to evaluate in, the choice that decides the answer; the lines after it execute that order (copy operands,
    write results) and are fixed by it. An empty completion has none.
    """
    return [pos for pos, _ in trace_decisions(problem, completion)]


def decision_entropy_means(entropies, positions) -> tuple[float | None, float | None]:
    """(mean entropy at decision points, mean entropy at all other tokens); None where there are no such tokens.

    `entropies`: per-token entropies of one completion (list of floats) or of several (list of lists);
    `positions`: its decision positions (list of ints) or, for several, one list per completion."""
    if entropies and not isinstance(entropies[0], (int, float)):
        pairs = list(zip(entropies, positions))
    else:
        pairs = [(entropies, positions)]
    at = other = 0.0
    n_at = n_other = 0
    for ents, pos in pairs:
        marked = set(pos)
        for i, e in enumerate(ents):
            if i in marked:
                at, n_at = at + e, n_at + 1
            else:
                other, n_other = other + e, n_other + 1
    return (at / n_at if n_at else None, other / n_other if n_other else None)


# ----------------------------------------------------------------------------------------- tokenizer/model
def toy_vocab() -> dict[str, int]:
    """The toy tokenizer's vocabulary (specials first, then CHARACTERS): what makes a checkpoint a toy-world one."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}


def is_toy_tokenizer(tokenizer) -> bool:
    """True for the toy world's character tokenizer (build_tokenizer), whatever its saved settings."""
    return tokenizer.get_vocab() == toy_vocab()


def is_toy_checkpoint(path) -> bool | None:
    """Whether the checkpoint at `path` speaks the toy world (its tokenizer.json holds exactly the toy vocabulary),
    read from the file without loading the tokenizer (a checkpoint with a config.json but no tokenizer.json is not
    a toy one); None when it cannot tell (no checkpoint there, an unreadable file: the command's own checks
    report it)."""
    import json
    from pathlib import Path

    file = Path(path) / "tokenizer.json"
    if not file.is_file():  # the toy world always writes one; a checkpoint without it is another world's
        return False if (Path(path) / "config.json").is_file() else None
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = spec.get("model") if isinstance(spec, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if not isinstance(vocab, dict):
        return False  # BPE merges without a plain vocab, or another model type: not the toy tokenizer
    vocab = dict(vocab)
    for added in spec.get("added_tokens") or []:
        if isinstance(added, dict) and "content" in added:
            vocab[added["content"]] = added.get("id")
    return vocab == toy_vocab()


def build_tokenizer():
    """A character-level Hugging Face fast tokenizer covering printable ASCII and newline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = toy_vocab()
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN,
        padding_side="left", model_max_length=512,
    )
    return tok


def build_model_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                       intermediate_size: int, max_positions: int, pad_token_id: int, eos_token_id: int):
    from transformers import Qwen3Config

    head_dim = hidden_size // num_heads
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2), head_dim=head_dim,
        intermediate_size=intermediate_size, max_position_embeddings=max_positions,
        tie_word_embeddings=False, pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None,
        rope_theta=10000.0,
    )
