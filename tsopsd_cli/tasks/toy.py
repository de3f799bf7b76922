"""The built-in toy world: seeded multi-step arithmetic with `\\boxed{}` answers.

A real, small instance of the whole problem. Each problem chains 1-3 integer operations; the worked solution
writes one step per line and ends with `\\boxed{answer}`, the format of the math benchmarks. Commutative steps
(`+`, `*`) are written in a random operand order in the worked solutions, so a model trained on them has a real
choice to make at each step: that is the entropy which RL later collapses and reheating restores.

Train and test problems are disjoint by construction: an expression belongs to the test split when a hash of its
text says so, whatever seed drew it.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from tsopsd_cli.tasks.base import Problem

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
# Printable ASCII plus newline: enough to tokenize any English/LaTeX text character by character.
CHARACTERS = ["\n"] + [chr(c) for c in range(32, 127)]

OPS = ("+", "-", "*")
MAX_OPERAND = 9
SLIPS = (-3, -2, -1, 1, 2, 3)  # how far a slipped step result is off
LEVELS = (1, 2, 3)
TEST_FRACTION_PER_MILLE = 100  # 10 % of all expressions are test-only


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


@dataclass(frozen=True)
class ToyProblem:
    expression: str  # "(7+5)*3"
    steps: tuple[tuple[int, str, int], ...]  # ((7, "+", 5), (12, "*", 3))
    answer: int
    level: int

    @property
    def prompt(self) -> str:
        return f"{self.expression}=?\n"

    def solution(self, rng: random.Random | None = None, slip_rate: float = 0.0) -> str:
        """Worked solution. With `rng`, commutative steps get a random operand order, and each step's result is,
        with probability `slip_rate`, off by a small amount (a slip); later steps then compute correctly from the
        slipped value, so the final answer is wrong, as in a careless but coherent written solution."""
        lines = []
        value = None
        for a, op, b in self.steps:
            a = a if value is None else value
            x, y = (b, a) if rng is not None and op in "+*" and rng.random() < 0.5 else (a, b)
            value = _apply(a, op, b)
            if rng is not None and slip_rate and rng.random() < slip_rate:
                value += rng.choice(SLIPS)
            lines.append(f"{x}{op}{y}={value}")
        lines.append(f"\\boxed{{{value}}}")
        return "\n".join(lines)

    def to_problem(self, index: int) -> Problem:
        return Problem(id=f"toy-{index}", prompt=self.prompt, answer=str(self.answer),
                       meta={"level": self.level, "expression": self.expression})


def split_of(expression: str) -> str:
    digest = hashlib.sha256(expression.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") % 1000 < TEST_FRACTION_PER_MILLE else "train"


def draw_problem(rng: random.Random, level: int, max_operand: int = MAX_OPERAND) -> ToyProblem:
    """One problem with `level` chained operations on operands in [1, max_operand]."""
    value = rng.randint(1, max_operand)
    expression = str(value)
    steps = []
    for i in range(level):
        op = rng.choice(OPS)
        b = rng.randint(1, max_operand)
        if i > 0:
            expression = f"({expression})"
        expression = f"{expression}{op}{b}"
        steps.append((value, op, b))
        value = _apply(value, op, b)
    return ToyProblem(expression=expression, steps=tuple(steps), answer=value, level=level)


def make_problems(split: str, num: int, seed: int, levels: tuple[int, ...] = LEVELS,
                  max_operand: int = MAX_OPERAND) -> list[ToyProblem]:
    """`num` distinct problems of `split`, levels drawn uniformly from `levels`, reproducible from `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng = random.Random(f"toy-{split}-{seed}")
    out: list[ToyProblem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < num:
        attempts += 1
        if attempts > 200 * num + 10_000:
            raise ValueError(f"cannot draw {num} distinct {split} problems at levels {levels}")
        p = draw_problem(rng, rng.choice(levels), max_operand)
        if p.expression in seen or split_of(p.expression) != split:
            continue
        seen.add(p.expression)
        out.append(p)
    return out


def iter_train_examples(seed: int, levels: tuple[int, ...] = LEVELS, max_operand: int = MAX_OPERAND,
                        slip_rate: float = 0.0):
    """Endless stream of (prompt, worked solution) training pairs from the train split, each step slipping with
    probability `slip_rate` (see ToyProblem.solution)."""
    rng = random.Random(f"toy-sft-{seed}")
    while True:
        p = draw_problem(rng, rng.choice(levels), max_operand)
        if split_of(p.expression) == "train":
            yield p.prompt, p.solution(rng, slip_rate)


def build_tokenizer():
    """A character-level Hugging Face fast tokenizer covering printable ASCII and newline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
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
