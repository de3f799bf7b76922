"""A reward with variance for tiny random models (which never answer correctly), used through the pluggable
`grpo.reward: module:function` hook."""


def even_length(completions, answers):
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completions]
