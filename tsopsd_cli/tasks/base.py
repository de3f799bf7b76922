"""What a prompt source hands to the runners."""

from __future__ import annotations

from dataclasses import dataclass, field


def answer_text(value) -> str:
    """A gold answer as text: JSON floats that are integers lose their '.0' (AMC's 27.0 -> '27'); a list gives its
    first element (OlympiadBench); surrounding whitespace is dropped."""
    if isinstance(value, list):
        return answer_text(value[0]) if value else ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def question_text(value, where: str, field: str) -> str:
    """A record's question as the text a template is rendered with. Null, a number, a list... are bad input
    (DataError, exit 2) in every command: rendered, a null became the prompt "None"."""
    if isinstance(value, str):
        return value
    kind = "null" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"
    from tsopsd_cli.errors import DataError

    raise DataError(f"{where}: the question ({field}) is {kind}, not a text")


def render_template(template: str, question: str) -> str:
    """`template` with every `{question}` replaced by `question`; every other character, braces included, as
    written (`'{question} Put your final answer in \\boxed{}.'`, `{answer}`, LaTeX). The one rendering of a prompt
    template, for every command."""
    return template.replace("{question}", str(question))


def apply_chat_template(tokenizer, text: str) -> str:
    """`text` as one user turn of the tokenizer's chat template followed by the generation prompt, as text whose
    tokenization with the tokenizer's usual special tokens gives the template's tokens (a leading BOS the tokenizer
    adds by itself is not written twice)."""
    from tsopsd_cli.errors import DataError

    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat_template is on but this checkpoint's tokenizer has no chat template; turn it off "
                        "(a base model: use a prompt template such as boxed or qa-boxed)")
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and out.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        out = out[len(bos):]
    return out


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the text the model is conditioned on, exactly as it is tokenized
    answer: str | None = None  # gold answer, when known
    meta: dict = field(default_factory=dict)
