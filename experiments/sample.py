"""Sample text from a trained causal language model, printed as it is drawn.

    python -m experiments.sample --workdir runs/lm_stdlib --prompt "def " \\
        [--max_new_tokens 200] [--temperature 0.8] [--top_k 40] [--top_p 0.95] \\
        [--seed 0] [--num_samples 3] [--step latest|best|N]

Loads the model of the workdir's checkpoint with `kexue.load` (parameters only, one
device) and continues the prompt with its key/value cache (`CausalLM.stream`: one
jitted single-token step at a time), printing each piece of text as soon as it is
drawn. `--temperature 0` is greedy decoding; otherwise a token is drawn from the
softmax at that temperature, restricted to the `top_k` most likely tokens and to the
`top_p` nucleus. Sample `i` uses the key `fold_in(key(seed), i)`: the same seed gives
the same text. Generation stops at `<eos>` (the end of a training document) or after
`max_new_tokens`; an empty prompt starts a new document. The text goes to stdout, one
status line to stderr. Errors (an unknown workdir or step, a workdir of another
task, a bad setting) are one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from experiments.cli import fail, parse_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory of experiments.train.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue (empty: a new document).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to draw at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Draw among the k most likely tokens only.")
_TOP_P = flags.DEFINE_float("top_p", None, "Draw from the nucleus of this probability mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same text.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples to draw, one after another.")
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: a step number, 'latest' or 'best'.")
flags.mark_flag_as_required("workdir")




def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax

    import kexue
    from experiments.run import prompt_ids, stream_text
    from kexue import models

    if _NUM_SAMPLES.value < 1:
        fail(f"--num_samples: expected a positive int; got {_NUM_SAMPLES.value}")
    try:
        trained = kexue.load(_WORKDIR.value, _STEP.value)
        if trained.kind != "lm":
            raise ValueError(f"{_WORKDIR.value} holds a {trained.kind!r} model "
                             f"({trained.spec.name}); experiments.sample continues causal "
                             "language models (experiments.predict applies ner and "
                             "multilabel models)")
        models.check_sampling(temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                              top_p=_TOP_P.value, vocab_size=trained.spec.transformer.vocab_size)
        if _MAX_NEW_TOKENS.value < 1:
            raise ValueError(f"--max_new_tokens: expected a positive int; "
                             f"got {_MAX_NEW_TOKENS.value}")
    except ValueError as error:
        fail(str(error))
    greedy = _TEMPERATURE.value == 0
    settings = "greedy" if greedy else ", ".join(
        f"{name} {value}" for name, value in (("temperature", _TEMPERATURE.value),
                                              ("top-k", _TOP_K.value), ("top-p", _TOP_P.value),
                                              ("seed", _SEED.value)) if value is not None)
    length = prompt_ids(trained.tokenizer, _PROMPT.value).shape[1] + _MAX_NEW_TOKENS.value
    beyond = (f"; up to {length} tokens, beyond the training length {trained.seq_len}"
              if length > trained.seq_len else "")
    print(f"[{trained.spec.name} of {trained.workdir}, step {trained.step}; {settings}"
          f"{beyond}]", file=sys.stderr, flush=True)
    for index in range(_NUM_SAMPLES.value):
        if _NUM_SAMPLES.value > 1:
            print(f"{'' if index == 0 else chr(10)}--- sample {index + 1} of "
                  f"{_NUM_SAMPLES.value}", flush=True)
        key = None if greedy else jax.random.fold_in(jax.random.key(_SEED.value), index)
        print(_PROMPT.value, end="", flush=True)
        for piece in stream_text(trained.model, trained.tokenizer, _PROMPT.value,
                                 max_new_tokens=_MAX_NEW_TOKENS.value, rng=key,
                                 temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                 top_p=_TOP_P.value):
            print(piece, end="", flush=True)
        print(flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
